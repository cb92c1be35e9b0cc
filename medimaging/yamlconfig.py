"""YAML config files + dotted overrides -> a validated pydantic schema, with errors that name
the field (shared by the simulation, the coordinator and the hospital daemon)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from common.i18n import N_, Reason, _


class ConfigError(Exception):
    """A config problem, already phrased for the user (one line per problem)."""


# pydantic's sentences, one msgid each (English as pydantic words it), in the reader's language;
# a type not listed keeps pydantic's English
PYDANTIC = {
    "missing": N_("Field required"),
    "int_parsing": N_("Input should be a valid integer, unable to parse string as an integer"),
    "int_type": N_("Input should be a valid integer"),
    "int_from_float": N_("Input should be a valid integer, got a number with a fractional part"),
    "float_parsing": N_("Input should be a valid number, unable to parse string as a number"),
    "float_type": N_("Input should be a valid number"),
    "bool_parsing": N_("Input should be a valid boolean, unable to interpret input"),
    "bool_type": N_("Input should be a valid boolean"),
    "string_type": N_("Input should be a valid string"),
    "dict_type": N_("Input should be a valid dictionary"),
    "list_type": N_("Input should be a valid list"),
    "greater_than": N_("Input should be greater than {gt}"),
    "greater_than_equal": N_("Input should be greater than or equal to {ge}"),
    "less_than": N_("Input should be less than {lt}"),
    "less_than_equal": N_("Input should be less than or equal to {le}"),
    "literal_error": N_("Input should be one of: {expected}"),
    "enum": N_("Input should be one of: {expected}"),
    "string_pattern_mismatch": N_("String should match pattern '{pattern}'"),
    "too_short": N_("List should have at least {min_length} item(s)"),
    "string_too_short": N_("String should have at least {min_length} character(s)"),
    "model_type": N_("Input should be a mapping of settings"),
    "model_attributes_type": N_("Input should be a mapping of settings"),
}


def _sentence(err: dict) -> str:
    """pydantic's message for one problem, in the reader's language where we have it."""
    ctx = err.get("ctx") or {}
    if err["type"] == "value_error" and isinstance(ctx.get("error"), Reason):
        return ctx["error"].text.render()
    msgid = PYDANTIC.get(err["type"])
    if msgid is None:
        return err["msg"].removeprefix("Value error, ")
    values = {k: v for k, v in ctx.items() if isinstance(v, (int, float, str))}
    if "expected" in values:  # "'a', 'b' or 'c'": pydantic's English "or" becomes a plain list
        values["expected"] = ", ".join(x.strip() for x in re.split(r",| or ", str(values["expected"])) if x.strip())
    return _(msgid, **values)


def describe(exc: ValidationError) -> str:
    """One line per problem: 'field.path: what is wrong (got value)', in the reader's language
    (field names stay as written in the YAML)."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            lines.append(_("{field}: unknown field", field=where))
            continue
        msg = _sentence(err)
        if err["type"] == "missing" or isinstance(value, (dict, list)):
            lines.append(_("{field}: {problem}", field=where, problem=msg) if where else msg)
        else:
            lines.append(_("{field}: {problem} (got {value})", field=where, problem=msg, value=repr(str(value))) if where
                         else msg)
    return "\n".join(lines)


def parse_sets(items: list[str]) -> dict:
    """['train.lr=0.01', 'sites=3'] -> {'train.lr': 0.01, 'sites': 3} (values read as YAML)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(_("{item} is not key=value", item=repr(item)))
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def set_dotted(tree: dict, dotted: str, value) -> None:
    """tree['a']['b'] = value for 'a.b'."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(_("{field}: '{key}' is not a section", field=dotted, key=key))
    node[leaf] = value


def read_config(path: Path | None, overrides: dict | None, schema: type[BaseModel]):
    """YAML file (optional) + dotted overrides -> validated `schema`; ConfigError on any problem."""
    tree: dict = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(_("config file not found: {file}", file=path))
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(_("{file}: cannot be read ({reason})", file=path, reason=exc.strerror)) from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = None
        if text is None or "\0" in text:  # not UTF-8, or binary that happens to decode
            raise ConfigError(_("{file}: not a text file (a YAML config is UTF-8 text); is it the right file?", file=path))
        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(_("{file}: not valid YAML: {reason}", file=path, reason=" ".join(str(exc).split()))) from None
        if tree is None:
            raise ConfigError(_("{file}: the file is empty (or only comments); write the settings in it, or leave out "
                                "--config to use the defaults", file=path))
        if not isinstance(tree, dict):
            raise ConfigError(_("{file}: expected a mapping of sections at the top level", file=path))
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    try:
        return schema.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


def flat_overrides(tree: dict, prefix: str = "") -> dict:
    """A nested config as dotted overrides: {"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat_overrides(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
