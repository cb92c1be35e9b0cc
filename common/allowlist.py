"""sha256 allow-lists of app bundles (FABs): a hospital's approved-apps.yaml and the server's.
Shared by the hospital's gate and the coordinator's gate: each runs only bundles on its own list."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import yaml


class AppNotApproved(Exception):
    """A bundle is not on the allow-list of the party asked to run it (hospital or server)."""


class AllowListUnreadable(Exception):
    """The allow-list file cannot be read or parsed."""


def approved_hashes(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    items = data.get("approved") or []
    if not isinstance(items, list):
        raise ValueError(f"{path}: 'approved' must be a list of entries with a sha256")
    return {str(e["sha256"]): e for e in items if isinstance(e, dict) and "sha256" in e}


def _check(sha256: str) -> str:
    sha256 = sha256.strip().lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"{sha256!r} is not a sha256 (64 hex digits)")
    return sha256


def _write(path: Path, entries: dict[str, dict], who: str) -> None:
    text = (f"# sha256 of the app bundles {who} runs\n"
            + yaml.safe_dump({"approved": list(entries.values())}, sort_keys=False))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # never half a list


def approve(path: Path, sha256: str, note: str = "", who: str = "this hospital", by: str = "") -> bool:
    """Add a bundle hash to the allow-list (`by`: the person, kept with it); False if it was there already."""
    sha256 = _check(sha256)
    entries = approved_hashes(path)
    if sha256 in entries:
        return False
    entries[sha256] = {"sha256": sha256, "approved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "note": note}
    if by:
        entries[sha256]["approved_by"] = by
    _write(path, entries, who)
    return True


def revoke(path: Path, sha256: str, who: str = "this hospital") -> bool:
    """Take a bundle hash off the allow-list; False if it was not on it."""
    sha256 = _check(sha256)
    entries = approved_hashes(path)
    if entries.pop(sha256, None) is None:
        return False
    _write(path, entries, who)
    return True


def fab_hash(path: Path) -> str:
    """sha256 of a built app bundle (.fab), as Flower computes it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundle_hash(fab_content: bytes) -> str:
    return hashlib.sha256(fab_content).hexdigest()


def check_approved(path: Path, fab_content: bytes) -> tuple[bool, str]:
    """(is the bundle on the allow-list at `path`, its sha256); AllowListUnreadable if the list
    cannot be read. Each gate words its own refusal (a hospital's reply names no local path)."""
    digest = bundle_hash(fab_content)
    try:
        approved = approved_hashes(path)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise AllowListUnreadable(str(exc)) from None
    return digest in approved, digest


def only_task(task_type, command: str | None = None) -> None:
    """Make this process's Flower SuperExec take tasks of one type only, run by `command` (None:
    the executor runs them its own way), so no agent, connector or model task of a bundle ever
    runs here."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

    AutoExecPlugin.supported_task_types = frozenset({task_type})
    AutoExecPlugin.visible_output_task_types = frozenset({task_type})  # its refusals reach the daemon's log
    if command is not None:
        TASK_TYPE_TO_COMMAND[task_type] = str(Path(sys.executable).parent / command)
