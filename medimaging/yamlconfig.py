"""YAML config files + dotted overrides -> a validated pydantic schema, with errors that name
the field (shared by the simulation, the coordinator and the hospital daemon)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(Exception):
    """A config problem, already phrased for the user (one line per problem)."""


def describe(exc: ValidationError) -> str:
    """One line per problem: 'field.path: what is wrong (got value)'."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg, value = err["msg"].removeprefix("Value error, "), err.get("input")
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown field")
            continue
        got = "" if err["type"] == "missing" or isinstance(value, (dict, list)) else f" (got {str(value)!r})"
        lines.append(f"{where}: {msg}{got}" if where else msg)
    return "\n".join(lines)


def parse_sets(items: list[str]) -> dict:
    """['train.lr=0.01', 'sites=3'] -> {'train.lr': 0.01, 'sites': 3} (values read as YAML)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def set_dotted(tree: dict, dotted: str, value) -> None:
    """tree['a']['b'] = value for 'a.b'."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{key}' is not a section")
    node[leaf] = value


def read_config(path: Path | None, overrides: dict | None, schema: type[BaseModel]):
    """YAML file (optional) + dotted overrides -> validated `schema`; ConfigError on any problem."""
    tree: dict = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = None
        if text is None or "\0" in text:  # not UTF-8, or binary that happens to decode
            raise ConfigError(f"{path}: not a text file (a YAML config is UTF-8 text); is it the right file?")
        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: " + " ".join(str(exc).split())) from None
        if tree is None:
            raise ConfigError(f"{path}: the file is empty (or only comments); write the settings in it, "
                              "or leave out --config to use the defaults")
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    try:
        return schema.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
