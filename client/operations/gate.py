"""The hospital's gate around the app code it runs: app approval and the audit log.

Flower's SuperNode hands each task to an executor (SuperExec). The daemon starts its own,
`aseanfl-superexec`, which runs the tasks in warm workers (client/operations/warm.py) with two checks
around the app's own code:

* before a task's bundle is installed, its sha256 must be on the hospital's allow-list
  (approved-apps.yaml); otherwise the bundle is never unpacked or imported and the server gets
  an error reply saying so;
* every reply is written to the audit log before it is handed to the SuperNode.

(Flower's own `--trusted-entities` needs signatures issued by a SuperLink with app
verification, which the open-source SuperLink does not issue; the hash allow-list works with it.)
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from pathlib import Path

from common.i18n import _
from common.allowlist import AllowListUnreadable, AppNotApproved, bundle_hash, check_approved

from client.operations.audit import AuditLog, describe
from client.config import SiteConfig, load_site

SITE_ENV = "ASEANFL_SITE_CONFIG"  # the daemon's site.yaml, inherited by the executor and app processes
log = logging.getLogger("aseanfl")


def approved_bundle(site: SiteConfig, fab_content: bytes, run_id: int | None = None) -> str:
    """The bundle's sha256, once it passed the hospital's allow-list (when approval is on);
    AppNotApproved, worded for the server's log (no local path), otherwise; a refused bundle
    is listed for the steward as a request (client/operations/approvals.py)."""
    if not site.require_approval:
        return bundle_hash(fab_content)
    try:
        approved, digest = check_approved(site.approved_apps, fab_content)
    except AllowListUnreadable as exc:  # the local log names the file, the reply does not
        log.error(_("{site}: cannot read the app allow-list, so nothing runs: {reason}", site=site.site, reason=exc))
        raise AppNotApproved(f"hospital {site.site} cannot read its app allow-list; nothing runs") from None
    if not approved:
        log.error(_("{site}: refused app bundle {sha256}: it is not an approved app (not in {file}); review it, then "
                    "`aseanfl client approve` or the console's Apps page", site=site.site, sha256=digest,
                    file=site.approved_apps))
        try:
            from client.operations.approvals import record_refusal

            record_refusal(site, digest, run_id, len(fab_content))
        except Exception as exc:  # noqa: BLE001 - listing it is a courtesy; the refusal stands whatever happens
            log.error("%s: the refused bundle could not be listed for approval: %s", site.site, exc)
        raise AppNotApproved(f"app bundle sha256 {digest} is not approved by hospital {site.site} "
                             "(`aseanfl client approve` there)")
    return digest


class AuditUnwritable(OSError):
    """The audit log could not be written (a full disk, say): the reply must not leave."""


def audited_push(site: SiteConfig, push):
    audit = AuditLog(site.audit_log)

    def push_and_record(client, message, context):
        try:
            audit.append(describe(message))  # recorded before it leaves: a failed push still shows
        except OSError as exc:
            raise AuditUnwritable(exc.errno, f"the audit log {site.audit_log} cannot be written: {exc.strerror}") from exc
        except ValueError as exc:  # its last line is damaged: nothing leaves until the log is looked at
            raise AuditUnwritable(errno.EIO, str(exc)) from exc
        return push(client, message, context)

    return push_and_record


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


POLL_S = 1.0  # an idle SuperNode asks the server for work this often (Flower: every 3 s)
BUSY_POLL_S = 0.2  # ... and this often right after it answered a task: the next one is near
POLL_GROWTH = 1.1  # each empty ask after that waits 10 % longer, back to POLL_S within ~8 s
LOCAL_WAIT_S = 0.05  # the SuperNode's waits on its own in-memory state (Flower: 0.5 s)


class _PollClock:
    """The `time` module as Flower's SuperNode loop sees it. Its 3 s wait between empty pulls
    becomes BUSY_POLL_S right after a task, growing to POLL_S while nothing comes (a run's next
    message follows a reply within a second or two; an idle hospital asks once a second, ~9
    asks more per task than a flat 1 s); its 0.5 s waits for the local reply become LOCAL_WAIT_S."""

    def __init__(self, poll: float = POLL_S, busy: float = BUSY_POLL_S, growth: float = POLL_GROWTH):
        self.poll, self.busy, self.growth = poll, busy, growth
        self.next = poll

    def answered(self) -> None:
        self.next = self.busy

    def sleep(self, seconds: float) -> None:
        if seconds == 3:
            time.sleep(self.next)
            self.next = min(self.poll, self.next * self.growth)
        else:
            time.sleep(LOCAL_WAIT_S if seconds == 0.5 else seconds)

    def __getattr__(self, name):
        return getattr(time, name)


REFUSED_AT_FRONT = 3  # the SuperNode's exit code when the front refused it (the daemon asks the door why)


def _stop_when_refused(call):
    """A Fleet call the front refuses (a revoked certificate, a node key not this hospital's)
    ends the SuperNode with one line, instead of Flower's traceback from its heartbeat thread
    and retries of a door that stays shut."""
    import httpx

    def refused_at_front(self, **kwargs):
        try:
            return call(self, **kwargs)
        except httpx.HTTPStatusError as exc:
            try:
                said = exc.response.text.strip()
            except (httpx.HTTPError, RuntimeError, UnicodeError):
                said = ""
            if exc.response.status_code == 403 and said.startswith("aseanfl front"):
                print(f"aseanfl: {said}; the SuperNode stops", flush=True)
                os._exit(REFUSED_AT_FRONT)  # from any thread, at once: nothing of this connection is left to save
            raise

    return refused_at_front


def _reply_waiting(state) -> bool:
    """A reply in the SuperNode's state not yet sent (peeked at: it stays for the push stage)."""
    store, lock = getattr(state, "msg_store", None), getattr(state, "lock_msg_store", None)
    if store is None or lock is None:  # another NodeState: Flower's own behaviour
        return False
    with lock:
        return any(e.message.metadata.reply_to_message_id and not e.is_retrieved for e in store.values())


def _pull_then_push_what_waits(pull):
    """Flower's loop pushes replies only after it took a task, and then only until the first
    reply: a task taken while another (e.g. of a run the coordinator had just stopped) was still
    being computed had its own reply wait until the server sent another task, which it does not
    do before that reply comes (a run's first question waited out its whole timeout). An empty
    pull with a reply waiting now goes on to the push stage."""

    def pull_and_store(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is None and _reply_waiting(kwargs.get("state")):
            return 0  # not None: the loop's push stage sends the waiting reply
        return run_id

    return pull_and_store


def supernode_main() -> None:
    """`aseanfl-supernode`: Flower's SuperNode whose Fleet client presents the hospital's client
    certificate (Flower's own has no option for one)."""
    from flwr.supernode.cli import flower_supernode
    from flwr.supernode import start_client_internal
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    context = client_tls(load_site(Path(os.environ[SITE_ENV])))

    def from_server_address(cls, server_address, insecure, root_certificates, interceptors, *, retry_invoker=None):
        del insecure, root_certificates  # always TLS, with the kit's CA and client certificate
        return cls(f"https://{server_address}", interceptors=interceptors, verify=context, retry_invoker=retry_invoker)

    FleetHttpClient.from_server_address = classmethod(from_server_address)
    FleetHttpClient._unary_unary = _stop_when_refused(FleetHttpClient._unary_unary)
    clock, push = _PollClock(), start_client_internal._push_messages

    def push_messages(*args, **kwargs):  # the loop calls it once per task it took: a run is active
        try:
            return push(*args, **kwargs)
        finally:
            clock.answered()

    start_client_internal.time, start_client_internal._push_messages = clock, push_messages
    start_client_internal._pull_and_store_message = _pull_then_push_what_waits(start_client_internal._pull_and_store_message)
    # A task is listed as soon as the server announced it, while its parts may still be on the way;
    # Flower then waits 1 s, 2 s, 4 s ... before asking the server again: 0.1-1 s instead.
    start_client_internal.pull_objects = functools.partial(pull_objects, initial_backoff=0.1, backoff_cap=1.0)
    flower_supernode()
