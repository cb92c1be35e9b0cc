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


def superlink_main() -> None:
    """`aseanfl-superlink`: Flower's SuperLink whose Fleet API refuses a reply pushed in another
    node's name (check_senders), with 403 and a line in its log."""
    from fastapi import HTTPException

    from flwr.superlink.cli import flower_superlink
    from flwr.superlink.servicer.fleet import fleet_handlers

    push = fleet_handlers.push_messages

    def push_messages_checked(request, state):
        try:
            check_senders(request)
        except ForgedSender as exc:
            print(f"aseanfl: refused: {exc}", flush=True)  # the server's log
            raise HTTPException(status_code=403, detail=f"aseanfl: refused: {exc}") from None
        return push(request=request, state=state)

    fleet_handlers.push_messages = push_messages_checked  # the Fleet router calls it through the module
    flower_superlink()
