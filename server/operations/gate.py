"""The coordinator's gate: its ServerApp processes run only app bundles the coordinator approved.

Flower's SuperLink runs in `--isolation process`; `aseanfl server start` starts this executor
beside it. It takes ServerApp tasks only (no agent, connector or model task of any bundle runs
here) and launches each as `aseanfl-serverapp`: Flower's `flwr-serverapp` whose bundle is checked
against server/approved-apps.yaml before it is unpacked. So a local user who reaches the
SuperLink's loopback Control API can submit a run, but its code never runs as the server.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from common.allowlist import AllowListUnreadable, AppNotApproved, check_approved, only_task

SERVER_ALLOWLIST_ENV = "ASEANFL_SERVER_APPROVED"  # the server's approved-apps.yaml
log = logging.getLogger("aseanfl")


def check_bundle(allowlist: Path, fab_content: bytes) -> str:
    """The bundle's sha256 if the server approved it; AppNotApproved otherwise."""
    try:
        approved, digest = check_approved(allowlist, fab_content)
    except AllowListUnreadable as exc:
        raise AppNotApproved(f"the server cannot read its app allow-list {allowlist} ({exc}); nothing runs") from None
    if not approved:
        raise AppNotApproved(f"app bundle sha256 {digest} is not approved on this server; nothing of it ran "
                             "(review it, then `aseanfl server approve`)")
    return digest


def serverapp_main() -> None:
    """`aseanfl-serverapp`: Flower's flwr-serverapp behind the server's allow-list."""
    import importlib

    from flwr.superlink.cli import flwr_serverapp

    # the module, not the function of the same name that flwr.superlink.runtime exports
    run_serverapp = importlib.import_module("flwr.superlink.runtime.run_serverapp")

    allowlist = Path(os.environ[SERVER_ALLOWLIST_ENV])
    install = run_serverapp.install_from_fab

    def install_if_approved(fab_content: bytes, *args, **kwargs):
        try:
            check_bundle(allowlist, fab_content)
        except AppNotApproved as exc:
            print(f"aseanfl: refused: {exc}", flush=True)  # reaches the run's log and `aseanfl run`
            raise
        return install(fab_content, *args, **kwargs)

    run_serverapp.install_from_fab = install_if_approved
    from flwr.superlink.grid import http_grid
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    # A reply is listed as soon as its hospital announced it, while its parts may still be on the
    # way; Flower then waits 1 s, 2 s, 4 s ... before asking again. Ask every 0.05-0.5 s (local calls).
    http_grid.pull_objects = functools.partial(pull_objects, initial_backoff=0.05, backoff_cap=0.5)
    flwr_serverapp()


class _Reaping:
    """Flower's subprocess executor starts each ServerApp process and never waits for it, so a
    finished one stays a zombie under the executor: wait for finished children at every poll."""

    def __init__(self, executor):
        self.executor = executor

    def reconcile(self) -> None:
        self.executor.reconcile()
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def __getattr__(self, name):
        return getattr(self.executor, name)


def serverexec_main() -> None:
    """`aseanfl-serverexec`: Flower's SuperExec for the coordinator's ServerApp tasks only."""
    import importlib

    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TaskType

    only_task(TaskType.SERVER_APP, "aseanfl-serverapp")
    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")  # the module, not the function
    make = superexec.get_executor
    superexec.get_executor = lambda *args, **kwargs: _Reaping(make(*args, **kwargs))
    flower_superexec()


class ForgedSender(PermissionError):
    """A pushed reply whose sender is not the node that signed the request."""


def check_senders(request) -> None:
    """Every reply in a Fleet push-messages request must come from the node that signed it.
    Flower checks the request's node id against its signature, and a reply's sender against
    the task's recipient, but not the reply's sender against the signer: a hospital that learnt
    another's task id could answer it in that hospital's name."""
    signer = request.node.node_id
    for message in request.messages_list:
        if message.metadata.src_node_id != signer:
            raise ForgedSender(f"node {signer} pushed a reply that claims to come from node "
                               f"{message.metadata.src_node_id}")


# How long a restarted hospital's node is kept out while a task its previous SuperNode took is
# unanswered: the ServerApp polls every 0.2 s, so it sees the node offline well within this.
LOST_TASK_GRACE_S = 30.0


def unanswered_tasks(state, node_id: int) -> int:
    """Tasks delivered to `node_id` that are neither answered nor expired, if Flower counts the node
    offline now (a SuperNode may only activate then); 0 while it is online."""
    import time

    from sqlalchemy import exists, func, select

    from flwr.supercore.state.schema.linkstate_models import MessageIns, MessageRes, Node
    from flwr.supercore.utils import uint64_to_int64

    if not hasattr(state, "session"):  # Flower's in-memory state (aseanfl's SuperLink keeps a database)
        return 0
    node, now = uint64_to_int64(node_id), time.time()
    with state.session() as session:
        online_until = session.scalar(select(Node.online_until).where(Node.node_id == node))
        if online_until is not None and online_until > now:
            return 0
        return session.scalar(select(func.count()).select_from(MessageIns).where(
            MessageIns.dst_node_id == node, MessageIns.delivered_at != "",
            MessageIns.created_at + MessageIns.ttl > now,
            ~exists().where(MessageRes.reply_to_message_id == MessageIns.message_id))) or 0


class LostTaskGate:
    """Flower delivers a task once. If a hospital's SuperNode dies holding one (a crash, kill -9)
    and its restarted daemon activates the node again before the ServerApp has polled while the
    node was offline, Flower never answers the task for it and the round waits for its timeout.
    So a node is activated only once no task delivered to its previous connection is
    unanswered: meanwhile the ServerApp finds the node offline, gets Flower's 'node unavailable'
    reply and goes on; the daemon retries within seconds. Never longer than
    LOST_TASK_GRACE_S per node, so a task nobody polls for (a dead run) cannot keep it out."""

    def __init__(self, activate, grace: float = LOST_TASK_GRACE_S) -> None:
        self.activate, self.grace, self.held = activate, grace, {}

    def __call__(self, request, state):
        import time

        from flwr.supercore.error import ApiErrorCode, FlowerError

        node_id = state.get_node_id_by_public_key(request.public_key)
        waiting = unanswered_tasks(state, node_id) if node_id is not None else 0
        if waiting:
            first = self.held.setdefault(node_id, time.monotonic())
            if time.monotonic() - first < self.grace:
                print(f"aseanfl: node {node_id} activates again with {waiting} task(s) of its previous connection "
                      "unanswered: held until the ServerApp has counted them lost", flush=True)
                raise FlowerError(ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED,
                                  f"aseanfl: {waiting} task(s) delivered to this node's previous connection are not "
                                  "answered yet; activate again in a few seconds")
        self.held.pop(node_id, None)
        return self.activate(request=request, state=state)


def superlink_main() -> None:
    """`aseanfl-superlink`: Flower's SuperLink whose Fleet API refuses a reply pushed in another
    node's name (check_senders), with 403 and a line in its log, and activates a restarted node
    only once the tasks its previous connection took are counted lost (LostTaskGate)."""
    from fastapi import HTTPException

    from flwr.superlink.cli import flower_superlink
    from flwr.superlink.servicer.fleet import fleet_handlers

    push = fleet_handlers.push_messages
    fleet_handlers.activate_node = LostTaskGate(fleet_handlers.activate_node)

    def push_messages_checked(request, state):
        try:
            check_senders(request)
        except ForgedSender as exc:
            print(f"aseanfl: refused: {exc}", flush=True)  # the server's log
            raise HTTPException(status_code=403, detail=f"aseanfl: refused: {exc}") from None
        return push(request=request, state=state)

    fleet_handlers.push_messages = push_messages_checked  # the Fleet router calls it through the module
    flower_superlink()
