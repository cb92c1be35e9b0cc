"""`aseanfl client start`: the hospital daemon. A Flower SuperNode (mutual TLS to the federation's
front with the hospital's client certificate, authenticated with the site's node key) plus the
gate's SuperExec, which runs each run's tasks in a warm worker (client/operations/warm.py: app approval,
audit log). Every port they open is on 127.0.0.1. The daemon asks the front's door whether this
hospital is admitted before it connects, and again every DOOR_CHECK_S while connected: a refusal
(revoked, or a kit of another federation) is one clear line in its log, and it stops connecting
until the door admits it again. The SuperNode retries the server without limit, so a restarted
server finds its hospitals again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.i18n import ENV, Reason, _, current
from medimaging.compute import ComputeUnavailable, resolve_device, resolve_precision

from client.config import SiteConfig
from client.operations.gate import REFUSED_AT_FRONT, SITE_ENV, client_tls
from client.training.site import SITE_CONFIG_KEY
from client.operations.status import write as write_status

DOOR_CHECK_S = 15.0


def door(site: SiteConfig) -> tuple[bool | None, str]:
    """(admitted, what the front said): True/False, or None where the server cannot be reached."""
    import http.client
    import ssl

    host, port = site.connection.server.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=client_tls(site), timeout=10)
    try:
        conn.request("GET", "/aseanfl/door")
        resp = conn.getresponse()
        said = resp.read(500).decode(errors="replace").strip()
    except ssl.SSLError as exc:
        return False, _("TLS with {server} failed: {reason} (a kit of another federation?)", server=site.connection.server,
                        reason=exc.reason or exc)
    except OSError as exc:
        return None, _("cannot reach the federation server at {server}: {reason}", server=site.connection.server,
                       reason=exc.strerror or exc)
    finally:
        conn.close()
    if resp.status == 200:
        return True, said
    if resp.status == 403 and "aseanfl front" in said:
        return False, said.replace("aseanfl front: ", "").replace("refused: ", "")
    return False, _("{server} is not an aseanfl front (HTTP {status})", server=site.connection.server, status=resp.status)


def daemon_env(site: SiteConfig, site_path: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        SITE_ENV: str(site_path),
        ENV: current(),  # its workers speak the daemon's language
        "FLWR_HOME": str(site.state_dir / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # a local call: a task waits 0.2 s, not Flower's 1 s
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


def supernode_command(site: SiteConfig, site_path: Path) -> list[str]:
    c = site.connection
    if c is None:
        raise Reason("{file}: no connection section (server, root_certificates, node_key)", file=site_path)
    for label, path in (("connection.root_certificates", c.root_certificates), ("connection.node_key", c.node_key),
                        ("connection.client_certificate", c.client_certificate), ("connection.client_key", c.client_key)):
        if not path.is_file():
            raise Reason("{file}: {field}: file not found: {path}", file=site_path, field=label, path=path)
    try:
        client_tls(site)
    except (OSError, ValueError) as exc:
        raise Reason("{file}: connection.client_certificate/client_key: not a usable certificate and key ({reason})",
                     file=site_path, reason=exc) from None
    bin_dir = Path(sys.executable).parent
    return [
        str(bin_dir / "aseanfl-supernode"), "--superlink", c.server, "--root-certificates", str(c.root_certificates),
        "--auth-supernode-private-key", str(c.node_key), "--isolation", "process",
        "--host", "127.0.0.1", "--port", str(c.runtime_port),
        "--node-config", f'{SITE_CONFIG_KEY}="{site_path}"',
    ]


def superexec_command(site: SiteConfig) -> list[str]:
    port = site.connection.runtime_port
    return [str(Path(sys.executable).parent / "aseanfl-superexec"), "--runtime-api-address", f"127.0.0.1:{port}",
            "--insecure", "--parent-pid", str(os.getpid())]


def _port_free(port: int) -> bool:
    """No live listener on the port. Connections of a daemon that was just killed linger in
    TIME_WAIT; the SuperNode's server binds over them (SO_REUSEADDR), so this check does too."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_daemon(site: SiteConfig, site_path: Path, log=print) -> int:
    """Run until SIGTERM/SIGINT. If the SuperNode gives up (server down for long, key not yet
    registered) both processes are started again after a back-off of up to 30 s."""
    try:
        device = resolve_device(site.compute.device)  # a GPU asked for and missing: said now, not at the first task
        resolve_precision(site.compute.precision, device, site.privacy.enabled)
    except ComputeUnavailable as exc:
        raise Reason("{file}: {reason}", file=site_path, reason=exc) from None
    commands = supernode_command(site, site_path)
    if not _port_free(site.connection.runtime_port):
        raise Reason("{file}: connection.runtime_port {port} is in use on this machine (another daemon?); give each "
                     "daemon its own port", file=site_path, port=site.connection.runtime_port)
    env = daemon_env(site, site_path)
    site.state_dir.mkdir(parents=True, exist_ok=True)
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    backoff, last = 2.0, ""
    server = site.connection.server

    problem = {"error": "", "at": None}

    def state(now: str, said: str = "") -> None:  # for the console's daemon page
        if now in ("refused", "waiting", "reconnecting"):
            problem.update(error=said, at=time.time())
        write_status(site, "daemon", pid=os.getpid(), server=server, state=now, said=said, since=time.time(),
                     last_error=problem["error"], last_error_at=problem["at"])

    def pause(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.2)

    while not stopping:
        admitted, said = door(site)
        if admitted is not True:
            if said != last:  # one line per change, not one per retry
                state("refused" if admitted is False else "waiting", said)
                log(_("{site}: refused at the federation server's door: {reason}; ask the coordinator (revoked "
                      "hospital, or another federation's kit)", site=site.site, reason=said) if admitted is False else
                    _("{site}: waiting for the server: {reason}", site=site.site, reason=said))
                last = said
            backoff = min(backoff * 2, 60.0)
            pause(backoff)
            continue
        if last:
            log(_("{site}: {said}", site=site.site, said=said))
            last = ""
        started = time.monotonic()
        state("connected", said)
        node = subprocess.Popen(commands, env=env)
        time.sleep(1.0)  # the SuperNode opens its Runtime API before the executor connects
        executor = subprocess.Popen(superexec_command(site), env=env)
        checked, refused = time.monotonic(), False
        try:
            while not stopping and node.poll() is None and executor.poll() is None:
                time.sleep(0.5)
                if time.monotonic() - checked > DOOR_CHECK_S:
                    checked = time.monotonic()
                    refused = door(site)[0] is False
                    if refused:
                        break  # revoked while connected: the loop above says so
        finally:
            _stop([executor, node])
        if stopping:
            break
        if node.returncode == REFUSED_AT_FRONT:  # its one line is in the log; the door says whether for good
            refused = door(site)[0] is False
        quick = time.monotonic() - started < 60
        backoff = min(backoff * 2, 10.0) if quick else 2.0
        if not refused:
            again = _("the SuperNode stopped (code {code}); connecting again in {seconds} s", code=node.returncode,
                      seconds=f"{backoff:g}")
            log(_("{site}: {said} (right after this daemon was restarted, the server refuses the node until it lets "
                  "the previous connection go, within 60 s of its last heartbeat)", site=site.site, said=again) if quick
                else _("{site}: {said}", site=site.site, said=again))
            state("reconnecting", again)
        pause(backoff)
    state("stopped")
    return 0
