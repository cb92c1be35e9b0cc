"""The hospital's audit log: one JSON line per message that leaves the site, chained by sha256
(each entry holds the hash of the one before), so an edited, removed or reordered line shows.

`verify` checks the chain and that nothing but model arrays and the allowed aggregate metrics
left: no record, metric or config key outside the schema, no string naming the data folder or
one of its files."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from common.i18n import Line, Reason
from common.packing import STYPE, header, is_packed

from protocol.messages import (CLASSES_KEY, FEATURES_KEY, REFUSAL_KEY, SCORES_KEY, STATISTICS_KEY, EvalMetrics, Refusal,
                               TrainMetrics)

GENESIS = "0" * 64
_METRIC_KEYS = {f.alias or n for m in (TrainMetrics, EvalMetrics) for n, f in m.model_fields.items()}
_REFUSAL_KEYS = {f.alias or n for n, f in Refusal.model_fields.items()}
_SECAGG_KEYS = {v for k, v in vars(Key).items() if k.isupper()}
# record name -> (record kind, allowed keys; None = any array name)
ALLOWED = {
    "arrays": ("arrays", None),
    "metrics": ("metrics", _METRIC_KEYS),
    "site": ("configs", {"name"}),
    REFUSAL_KEY: ("configs", _REFUSAL_KEYS),
    SCORES_KEY: ("configs", {"json", "model-sha256"}),  # federated evaluation: medimaging.scoring.SiteScores
    CLASSES_KEY: ("configs", {"names", "task"}),  # the class names, asked before a run (not patient data)
    STATISTICS_KEY: ("configs", {"json"}),  # `aseanfl stats -f`: medimaging.stats.SiteStats
    # head calibration: per class image counts and feature sums, a feature moment, each summed over
    # at least min_cases images of a class (medimaging/calibration.py)
    FEATURES_KEY: ("arrays", {"count", "sum", "moment"}),
    RECORD_KEY_CONFIGS: ("configs", _SECAGG_KEYS),  # SecAgg+: keys, shares, the masked vector
    "fitres.parameters": ("arrays", set()),  # SecAgg+ empties it before the reply leaves
    "fitres.metrics": ("metrics", set()),
    "fitres.status": ("configs", {"code", "message"}),
    "fitres.num_examples": ("metrics", {"num_examples"}),
}
EVENTS = {"app approved", "app rejected", "app approval revoked"}
EVENT_KEYS = {"time", "event", "sha256", "by", "note", "prev", "hash"}
_FLOAT_KINDS = ("float", "bfloat", "int", "uint")


def _value(v):
    """What the log keeps of a config/metric value: numbers and short strings as they are,
    bytes as length + sha256 (SecAgg+ shares and masked vectors)."""
    if isinstance(v, list):
        return [_value(x) for x in v[:64]] + ([f"... {len(v)} items"] if len(v) > 64 else [])
    if isinstance(v, bytes):
        return {"bytes": len(v), "sha256": hashlib.sha256(v).hexdigest()}
    return v


def _dtype(code: str) -> str:
    """numpy's name for a safetensors dtype code (F32 -> float32, BF16 -> bfloat16)."""
    kind = code.rstrip("0123456789")
    return {"F": "float", "BF": "bfloat", "I": "int", "U": "uint"}.get(kind, kind.lower()) + code[len(kind):]


def _arrays(record) -> tuple[dict, int, bytes]:
    """(entries, bytes, what the digest covers) of an ArrayRecord; a packed one is described by
    the arrays inside it, from its header."""
    if is_packed(record):
        blob = next(iter(record.values())).data
        order, head = header(blob)
        entries = {k: {"dtype": _dtype(head[k]["dtype"]), "shape": head[k]["shape"],
                       "bytes": head[k]["data_offsets"][1] - head[k]["data_offsets"][0], "packed": STYPE} for k in order}
        return entries, len(blob), blob
    entries = {k: {"dtype": a.dtype, "shape": list(a.shape), "bytes": len(a.data)} for k, a in record.items()}
    return entries, sum(len(a.data) for a in record.values()), b"".join(k.encode() + a.data for k, a in record.items())


def describe(msg: Message) -> dict:
    """The log entry's body for one outbound message."""
    body: dict = {
        "run": msg.metadata.run_id, "round": msg.metadata.group_id, "type": msg.metadata.message_type,
        "records": {}, "bytes": 0,
    }
    if msg.has_error():
        body["error"] = {"code": msg.error.code, "reason": msg.error.reason}
        return body
    digest = hashlib.sha256()
    for name, record in sorted(msg.content.items()):
        kind = {"ArrayRecord": "arrays", "MetricRecord": "metrics", "ConfigRecord": "configs"}[type(record).__name__]
        if kind == "arrays":
            entries, size, covered = _arrays(record)
            digest.update(covered)
        else:
            entries = {k: _value(v) for k, v in record.items()}
            blob = json.dumps(entries, sort_keys=True, default=str).encode()
            size = len(blob)
            digest.update(name.encode() + blob)
        body["records"][name] = {"kind": kind, "entries": entries, "bytes": size}
        body["bytes"] += size
    body["sha256"] = digest.hexdigest()
    return body


class AuditLog:
    """Append-only: opened with O_APPEND, an exclusive lock per entry, fsync'ed."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, body: dict) -> dict:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            prev = last_hash(self.path)
            entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **body, "prev": prev}
            entry["hash"] = _hash(entry)
            line, size = (json.dumps(entry, sort_keys=True) + "\n").encode(), os.fstat(fd).st_size
            try:
                if os.write(fd, line) != len(line):  # a full disk can take part of it
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # no half line: the chain stays intact
                raise
            return entry
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _hash(entry: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in entry.items() if k != "hash"}, sort_keys=True).encode()).hexdigest()


def last_hash(path: Path) -> str:
    """The hash the next entry chains to; a Reason where the last line is damaged."""
    if not path.is_file() or path.stat().st_size == 0:
        return GENESIS
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 1_000_000))
        last = f.read().splitlines()[-1]
    try:
        return json.loads(last)["hash"]
    except (ValueError, KeyError, TypeError):  # nothing is added after a damaged line: the chain would hide it
        raise Reason("{file}: the audit log's last line is damaged (not JSON, or no hash); nothing more is added to it "
                     "until it is looked at: run `aseanfl client audit`", file=path) from None


@dataclass
class AuditReport:
    entries: int = 0
    bytes: int = 0
    runs: dict[int, set] = field(default_factory=dict)  # run -> rounds seen
    decisions: int = 0  # the steward's app decisions (local records, not sent)
    models: set = field(default_factory=set)  # sha256 of the models this hospital scored (federated evaluation)
    problems: list[str] = field(default_factory=list)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _scores_problems(entries: dict, line: int) -> list[str]:
    """An evaluation reply must hold exactly the fixed schema of figures, for a named model."""
    import re

    from pydantic import ValidationError

    from medimaging.scoring import SiteScores

    problems = []
    if not re.fullmatch(r"[0-9a-f]{64}", str(entries.get("model-sha256", ""))):
        problems.append(Line("line {line}: scores without the sha256 of the model they score", line=line))
    try:
        SiteScores.model_validate_json(str(entries.get("json", "")))
    except ValidationError as exc:
        problems.append(Line("line {line}: scores.json is not the fixed schema of figures ({count} problem(s), first: "
                             "{field})", line=line, count=exc.error_count(), field=exc.errors()[0]["loc"]))
    return problems


def _statistics_problems(entries: dict, line: int) -> list[str]:
    """A statistics reply must hold exactly the fixed schema of counts."""
    from pydantic import ValidationError

    from medimaging.stats import SiteStats

    try:
        SiteStats.model_validate_json(str(entries.get("json", "")))
    except ValidationError as exc:
        return [Line("line {line}: statistics.json is not the fixed schema of counts ({count} problem(s), first: "
                     "{field})", line=line, count=exc.error_count(), field=exc.errors()[0]["loc"])]
    return []


def verify(path: Path, site: str, forbidden: list[str] = ()) -> AuditReport:
    """Check the chain and every entry's content; `forbidden`: strings that must never appear
    in a sent value (the data folder, file names)."""
    report, prev = AuditReport(), GENESIS
    if not path.is_file():
        report.problems.append(Line("{file}: no audit log (nothing was sent yet, or the log was removed)", file=path))
        return report
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            report.problems.append(Line("line {line}: not JSON (the log was edited or cut)", line=number))
            prev = None
            continue
        if entry.get("prev") != prev or entry.get("hash") != _hash(entry):
            report.problems.append(Line("line {line}: the hash chain breaks here (an entry was edited, removed or "
                                        "reordered)", line=number))
        prev = entry.get("hash")
        if "event" in entry:  # a decision taken at the hospital (client/operations/approvals.py); nothing left
            if entry["event"] not in EVENTS or set(entry) - EVENT_KEYS:
                report.problems.append(Line("line {line}: not a message and not a known local decision", line=number))
            report.decisions += 1
            continue
        report.entries += 1
        report.bytes += int(entry.get("bytes", 0))
        report.runs.setdefault(entry.get("run"), set()).add(entry.get("round"))
        for name, record in entry.get("records", {}).items():
            allowed = ALLOWED.get(name)
            if allowed is None or allowed[0] != record.get("kind"):
                report.problems.append(Line("line {line}: record {record} ({kind}) is not allowed to leave", line=number,
                                            record=repr(name), kind=record.get("kind")))
                continue
            keys = allowed[1]
            for key, value in record.get("entries", {}).items():
                if keys is not None and key not in keys:
                    report.problems.append(Line("line {line}: {key} is not an allowed key", line=number, key=f"{name}.{key}"))
                if record["kind"] == "arrays" and not str(value.get("dtype", "")).startswith(_FLOAT_KINDS):
                    report.problems.append(Line("line {line}: array {key} has dtype {dtype}, not a model tensor", line=number,
                                                key=key, dtype=value.get("dtype")))
                for text in _strings(value):
                    hits = [f for f in forbidden if f and f in text]
                    if hits:
                        report.problems.append(Line("line {line}: {key} contains {value}", line=number, key=f"{name}.{key}",
                                                    value=repr(hits[0])))
            if name == "site" and record.get("entries", {}).get("name") not in (None, site):
                report.problems.append(Line("line {line}: site.name is not this hospital's id {site}", line=number,
                                            site=repr(site)))
            if name == STATISTICS_KEY:
                report.problems += _statistics_problems(record.get("entries", {}), number)
            if name == SCORES_KEY:
                report.problems += _scores_problems(record.get("entries", {}), number)
                report.models.add(str(record.get("entries", {}).get("model-sha256")))
        reason = entry.get("error", {}).get("reason", "")
        for f in forbidden:
            if f and f in reason:
                report.problems.append(Line("line {line}: an error reason contains {value}", line=number, value=repr(f)))
    return report


def forbidden_strings(site) -> list[str]:
    """What must never appear in a sent value: the data folder, and the names of its files (of
    a PACS source: the UIDs of what was retrieved; the PACS is not asked again)."""
    from medimaging.files import base, inventory

    forbidden = [str(base(site.data))]
    try:
        if site.data.dicomweb is not None:
            files = list(base(site.data).rglob("*")) if base(site.data).is_dir() else []
            forbidden += sorted({p.name.partition("-")[2] or p.name for p in files})
        else:
            files = [p for i in inventory(site.data).items for p in (i.path, i.mask) if p is not None]
            forbidden += sorted({p.name for p in files if len(p.stem) >= 4})
    except ValueError:
        pass  # an unreadable data folder still gets its log checked
    return forbidden
