"""What the connected hospitals say about their data, never a per-image value: their class names,
asked before every deployed run and evaluation (hospitals that name or order the classes
differently would train against each other and learn nothing, silently), and their statistics
(`aseanfl stats -f`: server/records/statistics.py writes them)."""

from __future__ import annotations

import logging
import re

from flwr.app import ConfigRecord, RecordDict
from pydantic import ValidationError

from common.i18n import _
from medimaging.stats import SiteStats
from medimaging.yamlconfig import ConfigError
from protocol.messages import CLASSES_KEY, STATISTICS_KEY, DescribeSpec

from server.engine.exchange import ask_every_site
from server.engine.names import site_name

log = logging.getLogger("aseanfl")
KEYS = {"classes": CLASSES_KEY, "stats": STATISTICS_KEY}


def ask(grid, known: dict[int, str], spec: DescribeSpec, what: str, timeout: float) -> dict[str, ConfigRecord | str]:
    """Each connected hospital's answer (its reply record), or why there is none, by the name
    the server knows its node by."""
    replies, missing = ask_every_site(grid, known, lambda: RecordDict({"config": spec.to_config()}), f"query.{what}",
                                      spec.request, timeout)
    out: dict[str, ConfigRecord | str] = dict(missing)
    for reply in replies:
        site = site_name(reply, known)
        if reply.has_error():  # Flower's "<class 'X'>:<'why'>" -> why
            out[site] = "error: " + re.sub(r"^<class '[^']*'>:<'(.*)'>$", r"\1", str(reply.error.reason), flags=re.S)
        else:
            out[site] = reply.content.config_records.get(KEYS[what]) or f"error: no {KEYS[what]} record in its reply"
    return out


def agreed_classes(answers: dict[str, ConfigRecord | str], wanted: list[str] | None) -> list[str] | None:
    """The federation's class names: `wanted` (federation.yaml task.classes) or, unset, the
    names every hospital that answered gives. ConfigError naming the hospitals and their names
    where they disagree (in the names or their order); hospitals that did not answer are left
    to refuse their tasks, which carry the agreed names."""
    names = {site: [str(n) for n in rec["names"]] for site, rec in sorted(answers.items()) if not isinstance(rec, str)}
    groups: dict[tuple[str, ...], list[str]] = {}
    for site, got in names.items():
        groups.setdefault(tuple(got), []).append(site)
    said = "; ".join(f"{', '.join(sites)}: {', '.join(group)}" for group, sites in groups.items())
    fix = _("map each hospital's names in its site.yaml `classes:` (its name: the federation's)")
    if wanted is not None:
        differ = {site for site, got in names.items() if got != wanted}
        if differ:
            raise ConfigError(_("task.classes is {wanted}; hospitals {sites} name or order their classes otherwise "
                                "({said}); nothing was sent; {fix}", wanted=", ".join(wanted),
                                sites=", ".join(sorted(differ)), said=said, fix=fix))
        return wanted
    if len(groups) > 1:
        raise ConfigError(_("the hospitals disagree on the classes or their order ({said}); nothing was sent; {fix}, "
                            "or set task.classes", said=said, fix=fix))
    return list(next(iter(groups))) if groups else None


def check_classes(grid, known: dict[int, str], image_size: int, wanted: list[str] | None, request: str,
                  timeout: float) -> list[str] | None:
    """Ask every connected hospital for its class names; the agreed names (agreed_classes)."""
    answers = ask(grid, known, DescribeSpec(request=request, image_size=image_size), "classes", timeout)
    for site, rec in answers.items():
        if isinstance(rec, str):
            log.warning(_("{site}: its class names are unknown ({why})", site=site, why=rec))
    try:
        agreed = agreed_classes(answers, wanted)
    except ConfigError as exc:
        log.error(_("refused: {reason}", reason=exc))  # `aseanfl run` shows the ServerApp's aseanfl: lines
        raise
    if agreed is not None:
        log.info(_("classes agreed by {count} hospital(s): {names}", count=sum(not isinstance(r, str) for r in answers.values()),
                   names=", ".join(agreed)))
    return agreed


def site_statistics(answers: dict[str, ConfigRecord | str]) -> dict[str, SiteStats | str]:
    """Each hospital's statistics, checked against the fixed schema, or why there are none."""
    out: dict[str, SiteStats | str] = {}
    for site, rec in answers.items():
        if isinstance(rec, str):
            out[site] = rec
            continue
        try:
            out[site] = SiteStats.model_validate_json(str(rec["json"]))
        except (KeyError, ValidationError) as exc:
            out[site] = f"error: its statistics break the schema ({type(exc).__name__})"
    return out
