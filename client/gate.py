"""The hospital's gate around Flower's app processes: app approval and the audit log.

Flower's SuperNode hands each task to an executor (SuperExec) that starts one `flwr-clientapp`
process per task; that process installs the run's app bundle (FAB) and runs it. The daemon
starts its own SuperExec whose ClientApp command is `aseanfl-clientapp`: Flower's
`flwr-clientapp` with two checks wrapped around it, outside the app's own code:

* before the bundle is installed, its sha256 must be on the hospital's allow-list
  (approved-apps.yaml); otherwise the bundle is never unpacked or imported and the server gets
  an error reply saying so;
* every reply is written to the audit log before it is handed to the SuperNode.

(Flower's own `--trusted-entities` needs signatures issued by a SuperLink with app
verification, which the open-source SuperLink does not issue; the hash allow-list works with it.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from .audit import AuditLog, describe
from .config import SiteConfig, load_site

SITE_ENV = "ASEANFL_SITE_CONFIG"  # the daemon's site.yaml, inherited by the executor and app processes
log = logging.getLogger("aseanfl")


class AppNotApproved(Exception):
    """The run's app bundle is not on this hospital's allow-list."""


def approved_hashes(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    items = data.get("approved") or []
    if not isinstance(items, list):
        raise ValueError(f"{path}: 'approved' must be a list of entries with a sha256")
    return {str(e["sha256"]): e for e in items if isinstance(e, dict) and "sha256" in e}


def approve(path: Path, sha256: str, note: str = "") -> bool:
    """Add a bundle hash to the allow-list; False if it was there already."""
    sha256 = sha256.strip().lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"{sha256!r} is not a sha256 (64 hex digits)")
    entries = approved_hashes(path)
    if sha256 in entries:
        return False
    entries[sha256] = {"sha256": sha256, "approved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "note": note}
    path.write_text("# sha256 of the app bundles this hospital runs (aseanfl client approve)\n"
                    + yaml.safe_dump({"approved": list(entries.values())}, sort_keys=False))
    return True


def fab_hash(path: Path) -> str:
    """sha256 of a built app bundle (.fab), as Flower computes it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _gated_install(site: SiteConfig, install):
    def install_if_approved(fab_content: bytes, *args, **kwargs):
        digest = hashlib.sha256(fab_content).hexdigest()
        try:
            approved = approved_hashes(site.approved_apps) if site.require_approval else {}
        except (OSError, ValueError, yaml.YAMLError) as exc:  # the local log names the file, the reply does not
            log.error("%s: cannot read the allow-list: %s", site.site, exc)
            raise AppNotApproved(f"hospital {site.site} cannot read its app allow-list; nothing runs") from None
        if site.require_approval and digest not in approved:
            log.error("%s: refused app bundle %s (not in %s)", site.site, digest, site.approved_apps)
            raise AppNotApproved(f"app bundle sha256 {digest} is not approved by hospital {site.site} "
                                 "(`aseanfl client approve` there)")
        return install(fab_content, *args, **kwargs)

    return install_if_approved


def _audited_push(site: SiteConfig, push):
    audit = AuditLog(site.audit_log)

    def push_and_record(client, message, context):
        audit.append(describe(message))  # recorded before it leaves: a failed push still shows
        return push(client, message, context)

    return push_and_record


def clientapp_main() -> None:
    """`aseanfl-clientapp`: Flower's flwr-clientapp behind the approval check and the audit log."""
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    site = load_site(Path(os.environ[SITE_ENV]))
    run_clientapp.install_from_fab = _gated_install(site, run_clientapp.install_from_fab)
    run_clientapp.push_message = _audited_push(site, run_clientapp.push_message)
    flwr_clientapp()


def superexec_main() -> None:
    """Flower's SuperExec, launching `aseanfl-clientapp` instead of `flwr-clientapp`."""
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType

    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(Path(sys.executable).parent / "aseanfl-clientapp")
    flower_superexec()
