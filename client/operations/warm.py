"""Warm hospital workers: the start-up cost of torch, MONAI and Opacus paid once per daemon.

Flower's SuperExec starts one fresh `flwr-clientapp` process per task, which imports torch,
MONAI, Opacus and Flower (~7 s on 2 cores) and decodes the site's images again, every round.
The hospital's executor (`aseanfl-superexec`) instead keeps, with Python's `forkserver`, one
parent process that has imported those libraries and nothing of any app bundle. For each run
it forks a worker from that parent; the worker serves every task of that run, one after the
other (tasks are handed to it by token over a pipe), and leaves when the run has been idle for
IDLE_S or a task of another run arrives. For every task the worker does what `flwr-clientapp`
does, with the hospital's gate around it:

* the task's app bundle (FAB) is hashed and checked against the hospital's allow-list before
  it is unpacked or imported, for every task; nothing of an unapproved bundle is imported;
* a worker runs one bundle only: its first approved bundle is imported afresh from the
  unpacked bundle (the daemon's own copies of the same package names are dropped first, so
  the approved code is what runs) and a task with another bundle is refused;
* every reply is written to the audit log (hash chain, in order) before it leaves; where the
  log cannot be written (a full disk), the reply stays and a fixed error reply goes instead;
* the site's decoded images stay in the worker's memory for the run (client/training/site.py caches
  them), so they are read once per run, not once per message.

Finished workers are reaped by the forkserver, so no zombies are left behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.allowlist import AppNotApproved, only_task

from client.config import load_site
from client.operations.gate import SITE_ENV, AuditUnwritable, approved_bundle, audited_push
from client.operations.status import write as write_status

log = logging.getLogger("aseanfl")
AUDIT_DOWN = "the hospital cannot write its audit log (disk full or not writable), so it sends nothing else"
IDLE_S = 1800.0  # a worker whose run has sent nothing for this long leaves (its memory is freed)
# Third-party modules an aseanfl ClientApp imports; none of them is app-bundle code.
PRELOAD = [
    "numpy", "scipy.signal", "PIL.Image", "sklearn.metrics", "pydantic", "yaml", "torch", "torch.nn",
    "monai", "monai.networks.nets", "monai.transforms", "monai.metrics", "monai.losses", "opacus",
    "flwr.app", "flwr.clientapp", "flwr.supernode.runtime.run_clientapp",
]


def _bundle_packages(app_dir: Path) -> set[str]:
    return {p.stem for p in app_dir.iterdir()
            if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file())}


def _forget(names: set[str]) -> None:
    """Drop already imported modules of these top-level names, so they are imported afresh from
    the unpacked bundle (the daemon's own `client` package is imported before it)."""
    for mod in [m for m in sys.modules if m.split(".", 1)[0] in names]:
        del sys.modules[mod]


class TaskRunner:
    """One worker's tasks: Flower's flwr-clientapp steps, behind the hospital's gate, without
    leaving the process after each one."""

    def __init__(self, site):
        from flwr.cli.install import install_from_fab
        from flwr.supernode.runtime import run_clientapp as rc

        self.rc, self.site = rc, site
        self.install = install_from_fab
        self.push = audited_push(site, rc.push_message)
        self.bundle: str | None = None

    def _client(self, spec):
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor

        retry = make_simple_http_retry_invoker()
        certs = Path(spec.root_certificates_path).read_bytes() if spec.root_certificates_path else None
        client = RuntimeHttpClient.from_server_address(
            server_address=spec.runtime_api_address, insecure=spec.insecure, root_certificates=certs,
            interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(spec.token)],
            retry_invoker=retry)
        return client, retry

    def _app(self, run, fab):
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if self.bundle is None:
            _forget(_bundle_packages(get_project_dir(run.fab_id, run.fab_version, fab.hash_str)))
            self.bundle = fab.hash_str
        elif fab.hash_str != self.bundle:  # never two bundles' code in one process
            raise AppNotApproved(f"this worker runs app bundle {self.bundle}; bundle {fab.hash_str} needs a new one")
        return get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, fab.hash_str)

    def _pull(self, client):
        """Flower's pull_task_input, asking for the message's parts every 0.05-0.2 s instead of
        after 1, 2, 4 s: the SuperNode offers the task while it still downloads the message."""
        from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
        from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=E0611
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf)
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.app import Message

        res = client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
        context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
        pulled = client.PullMessages(PullAppMessagesRequest())
        if not pulled.messages_list:
            raise RuntimeError("No messages received from Runtime API")
        node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
            return_type=Message, initial_backoff=0.05, backoff_cap=0.2, max_tries_per_object=None)  # Flower's 2 h limit holds
        message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's: the id is not in the content
        return message, context, run, fab

    def deliver(self, client, reply, message, context) -> bool:
        """Audit the reply, then hand it to the SuperNode. If the audit log cannot be written, the
        reply does not leave; a fixed error reply (no arrays, no metrics) goes in its place, so the
        server is told and the SuperNode, which waits for a reply to every task, does not hang.
        False when that happened."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode

        try:
            self.push(client, reply, context)
            return True
        except AuditUnwritable as exc:
            log.error("%s: %s; the reply was not sent, an error reply went instead", self.site.site, exc)
            self.rc.push_message(client, Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=AUDIT_DOWN),
                                                 reply_to=message), context)
            return False

    def run(self, spec) -> str:
        """Serve one task (its token is in `spec`); '' when it completed, else the reason."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http

        import torch

        rc = self.rc
        client, retry = self._client(spec)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            t0 = time.monotonic()
            message, context, run, fab = self._pull(client)
            t1 = time.monotonic()
            # every task's bundle, before anything of it is unpacked or imported
            if approved_bundle(self.site, fab.content, run.run_id) != fab.hash_str:
                raise AppNotApproved(f"the app bundle's content does not match its stated sha256 {fab.hash_str}")
            first = self.bundle is None
            if first:
                self.install(fab.content, skip_prompt=True)
            app = self._app(run, fab)
            t2 = time.monotonic()
            reply = app(message=message, context=context)
            t3 = time.monotonic()
            print(f"aseanfl worker {os.getpid()}: run {run.run_id} {message.metadata.message_type} task: message "
                  f"{t1 - t0:.2f} s, bundle check{' + import' if first else ''} {t2 - t1:.2f} s, app {t3 - t2:.2f} s "
                  f"(torch threads {torch.get_num_threads()})", flush=True)  # where a round's time goes, in the daemon's log
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - Flower's flwr-clientapp answers every failure
            code, details = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
            if isinstance(ex, LoadClientAppError):
                code, details = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to load `ClientApp`"
            log.error("ClientApp raised an exception", exc_info=None if isinstance(ex, AppNotApproved) else ex)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        try:
            if reply is not None and context is not None and not self.deliver(client, reply, message, context):
                status, details = SubStatus.FAILED, details or "the reply could not be audited; an error reply went instead"
        except Exception as ex:  # noqa: BLE001
            log.error("Failed to push reply message", exc_info=ex)
            status, details = SubStatus.FAILED, details or "the reply could not be handed to the SuperNode"
        finally:
            retry.max_tries = 1
            if message is not None:  # for the console's daemon page
                write_status(self.site, "last-task", run=message.metadata.run_id, type=message.metadata.message_type,
                             round=message.metadata.group_id, ok=not details, details=details[:500])
            rc.push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()
        return details


def _serve(conn, superexec_pid: int) -> None:
    """A worker: tasks from `conn` until the executor says stop (its run idle, another run) or goes
    away. Only the executor decides when a worker leaves, so no task is sent to a leaving one."""
    import logging
    import sys

    from flwr.supercore.app_utils import start_parent_process_monitor

    logger = logging.getLogger("aseanfl")  # the app's own lines (e.g. a model scored) reach the daemon's log
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("aseanfl: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # once, not again through the root logger's handler
    start_parent_process_monitor(superexec_pid)  # the daemon killed: no worker lingers
    runner = TaskRunner(load_site(Path(os.environ[SITE_ENV])))
    try:
        while (spec := conn.recv()) is not None:
            conn.send(runner.run(spec))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return


@dataclass
class _Worker:
    run_id: int
    process: multiprocessing.process.BaseProcess
    conn: object
    busy: bool = False
    used: float = field(default_factory=time.monotonic)

    def settle(self) -> None:
        """Take the worker's 'task done' notes; a worker that died is no longer busy."""
        try:
            while self.conn.poll():
                self.conn.recv()
                self.busy, self.used = False, time.monotonic()
        except (EOFError, OSError):
            self.busy = False

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)


class WarmExecutor:
    """A Flower SuperExec executor (launch/reconcile/close) whose tasks go to warm workers."""

    def __init__(self):
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        from multiprocessing import forkserver

        forkserver.ensure_running()  # the imports happen now, while the hospital waits for its first task
        self.workers: list[_Worker] = []

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, *args, **kwargs) -> None:
        del args, kwargs

    def _start(self, run_id: int) -> _Worker:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_serve, args=(child, os.getpid()), name=f"aseanfl-worker-run-{run_id}",
                                daemon=False)
        proc.start()
        child.close()
        worker = _Worker(run_id, proc, parent)
        self.workers.append(worker)
        return worker

    def launch(self, spec, run_id: int = 0):
        from flwr.supercore.superexec.executor import LaunchResult

        self.reconcile()
        for other in [w for w in self.workers if w.run_id != run_id and not w.busy]:
            other.stop()  # a new run: the idle workers of earlier runs leave
            self.workers.remove(other)
        worker = next((w for w in self.workers if w.run_id == run_id and not w.busy), None)
        try:
            worker = worker or self._start(run_id)
            worker.conn.send(spec)
        except (OSError, ValueError) as exc:
            return LaunchResult.failed(f"could not hand the task to a worker: {exc}")
        worker.busy, worker.used = True, time.monotonic()
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        for worker in list(self.workers):
            worker.settle()
            if not worker.busy and time.monotonic() - worker.used > IDLE_S:
                worker.stop()  # its run has been quiet for long: free its memory
            if not worker.process.is_alive():  # stopped, or it crashed: reaped by the forkserver
                worker.process.join(timeout=0)
                self.workers.remove(worker)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers.clear()


def install() -> None:
    """Make this process's Flower SuperExec hand its ClientApp tasks to warm workers."""
    import importlib

    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")  # the module, not the function

    class RunPlugin(AutoExecPlugin):
        def launch_task(self, token, task):
            from flwr.supercore.constant import TaskType
            from flwr.supercore.superexec.executor import LaunchResult

            if self._get_supported_task_type(task) != TaskType.CLIENT_APP:
                return LaunchResult.failed(f"task {task.task_id}: this hospital runs ClientApp tasks only")
            spec = self._build_execution_spec(token=token, task_type=TaskType.CLIENT_APP, task_id=task.task_id)
            return self.executor.launch(spec, run_id=task.run_id)

    superexec.AutoExecPlugin = RunPlugin
    superexec.get_executor = lambda *args, **kwargs: WarmExecutor()


def superexec_main() -> None:
    """Flower's SuperExec, taking ClientApp tasks only and running them in warm workers."""
    from flwr.supercore.cli import flower_superexec
    from flwr.supercore.constant import TaskType

    only_task(TaskType.CLIENT_APP)  # run by the warm workers, not by a command
    install()
    flower_superexec()
