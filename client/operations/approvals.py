"""The steward's decisions on app bundles. A bundle the gate refused because it was not approved
is kept as a request (state/app-requests.json: its sha256, the run and the server that asked,
when, its size), to approve or reject from the console; approving writes approved-apps.yaml
(atomically) and every decision (approve, reject, revoke) is an entry of the audit log's hash
chain, with the console user who made it. Nothing here is sent."""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from common.allowlist import approve as allow, approved_hashes, revoke as disallow

from client.operations.audit import AuditLog, last_hash
from client.config import SiteConfig

KEEP_RUNS = 10  # the latest runs that asked for a bundle


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def requests_path(site: SiteConfig) -> Path:
    return site.state_dir / "app-requests.json"


@contextmanager
def _locked(site: SiteConfig):
    """The requests file, read under an exclusive lock, written back atomically on leaving."""
    path = requests_path(site)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            data = {}  # a damaged file: the next refusal lists its bundle again
        yield data
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)


def record_refusal(site: SiteConfig, digest: str, run_id: int | None, size: int) -> None:
    """The gate refused `digest` (not on the allow-list): list it for the steward."""
    with _locked(site) as data:
        entry = data.setdefault(digest, {"sha256": digest, "first_asked": _now(), "asked": 0, "runs": [],
                                         "state": "pending"})
        entry.update(last_asked=_now(), size=size, asked=entry["asked"] + 1,
                     server=site.connection.server if site.connection else "")
        if run_id is not None and run_id not in entry["runs"]:
            entry["runs"] = [*entry["runs"], run_id][-KEEP_RUNS:]


def requests(site: SiteConfig) -> list[dict]:
    """Every refused bundle not approved since, newest request first."""
    path, approved = requests_path(site), approved_hashes(site.approved_apps)
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        data = {}
    return sorted((e for d, e in data.items() if d not in approved), key=lambda e: e.get("last_asked", ""), reverse=True)


def _decided(site: SiteConfig, event: str, digest: str, by: str, note: str = "") -> None:
    AuditLog(site.audit_log).append({"event": event, "sha256": digest, "by": by, "note": note})


def approve(site: SiteConfig, digest: str, by: str, note: str = "") -> bool:
    last_hash(site.audit_log)  # a damaged log refuses before the allow-list changes: no decision goes unrecorded
    new = allow(site.approved_apps, digest, note, f"hospital {site.site}", by=by)
    if new:
        _decided(site, "app approved", digest, by, note)
        with _locked(site) as data:
            if digest in data:
                data[digest].update(state="approved", decided_by=by, decided_at=_now())
    return new


def reject(site: SiteConfig, digest: str, by: str, note: str = "") -> bool:
    with _locked(site) as data:
        if digest not in data or data[digest].get("state") == "rejected":
            return False
        data[digest].update(state="rejected", decided_by=by, decided_at=_now())
    _decided(site, "app rejected", digest, by, note)
    return True


def revoke(site: SiteConfig, digest: str, by: str, note: str = "") -> bool:
    last_hash(site.audit_log)
    gone = disallow(site.approved_apps, digest, f"hospital {site.site}")
    if gone:
        _decided(site, "app approval revoked", digest, by, note)
    return gone
