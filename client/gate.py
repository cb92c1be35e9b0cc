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

import logging
import os
from pathlib import Path

from aseanfl.allowlist import AllowListUnreadable, AppNotApproved, check_approved, only_task

from .audit import AuditLog, describe
from .config import SiteConfig, load_site

SITE_ENV = "ASEANFL_SITE_CONFIG"  # the daemon's site.yaml, inherited by the executor and app processes
log = logging.getLogger("aseanfl")


def _gated_install(site: SiteConfig, install):
    def install_if_approved(fab_content: bytes, *args, **kwargs):
        if site.require_approval:
            try:
                approved, digest = check_approved(site.approved_apps, fab_content)
            except AllowListUnreadable as exc:  # the local log names the file, the reply does not
                log.error("%s: cannot read the allow-list: %s", site.site, exc)
                raise AppNotApproved(f"hospital {site.site} cannot read its app allow-list; nothing runs") from None
            if not approved:
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
    from flwr.supercore.constant import TaskType

    only_task(TaskType.CLIENT_APP, "aseanfl-clientapp")
    flower_superexec()


def mutual_tls(ca: Path, cert: Path, key: Path):
    """An SSL context that checks the server against `ca` and presents `cert`."""
    import ssl

    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


def client_tls(site: SiteConfig):
    """TLS to the federation's front: its CA, and this hospital's client certificate."""
    c = site.connection
    return mutual_tls(c.root_certificates, c.client_certificate, c.client_key)


def supernode_main() -> None:
    """`aseanfl-supernode`: Flower's SuperNode whose Fleet client presents the hospital's client
    certificate (Flower's own has no option for one)."""
    from flwr.supernode.cli import flower_supernode
    from flwr.supernode.fleet_http_client import FleetHttpClient

    context = client_tls(load_site(Path(os.environ[SITE_ENV])))

    def from_server_address(cls, server_address, insecure, root_certificates, interceptors, *, retry_invoker=None):
        del insecure, root_certificates  # always TLS, with the kit's CA and client certificate
        return cls(f"https://{server_address}", interceptors=interceptors, verify=context, retry_invoker=retry_invoker)

    FleetHttpClient.from_server_address = classmethod(from_server_address)
    flower_supernode()
