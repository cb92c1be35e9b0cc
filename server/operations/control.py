"""The coordinator's side of a deployment: the SuperLink (loopback only), its executor (approved
ServerApps only), the public front (nginx, mutual TLS, Fleet API only), hospital registration and
revocation, starting runs and reading status through Flower's Control API over loopback (the
`flwr` CLI, with its connection kept in the federation folder, never in pyproject.toml)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import tomli_w

from common.i18n import _

from server.operations.bundle import app_bundle, staged_app
from server.operations.provision import Federation

RUNS_ENV = "ASEANFL_RUNS_DIR"  # run folders on the coordinator's disk (read by the ServerApp)

_BIN = Path(sys.executable).parent


def flwr_env(fed: Federation) -> dict[str, str]:
    home = fed.server_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
        "default": fed.name,
        fed.name: {"address": fed.superlink, "root-certificates": str(fed.server_dir / "ca.crt")},
    }}))
    return {
        **os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", RUNS_ENV: str(fed.server_dir / "runs"),
        "PATH": str(_BIN) + os.pathsep + os.environ.get("PATH", ""), "NO_COLOR": "1", "COLUMNS": "200",
    }


def superlink_command(fed: Federation) -> list[str]:
    """The SuperLink on loopback only: its one port serves Fleet, Control and Runtime APIs, and
    the Control API has no authentication in open-source Flower. The front is the public door.
    `aseanfl-superlink` is Flower's, refusing replies pushed in another node's name (server.operations.gate)."""
    s = fed.server_dir
    host, port = fed.superlink.rsplit(":", 1)
    return [
        str(_BIN / "aseanfl-superlink"), "--ssl-ca-certfile", str(s / "ca.crt"), "--ssl-certfile", str(s / "server.crt"),
        "--ssl-keyfile", str(s / "server.key"), "--database", str(s / "state.db"), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--isolation", "process", "--host", host, "--port", port,
    ]


def serverexec_command(fed: Federation) -> list[str]:
    return [str(_BIN / "aseanfl-serverexec"), "--runtime-api-address", fed.superlink,
            "--root-certificates", str(fed.server_dir / "ca.crt"), "--parent-pid", str(os.getpid())]


def server_allowlist(fed: Federation) -> Path:
    return fed.server_dir / "approved-apps.yaml"


def flwr(fed: Federation, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(_BIN / "flwr"), *args], env=flwr_env(fed), capture_output=True, text=True, timeout=timeout)


def _json(proc: subprocess.CompletedProcess) -> dict:
    text = proc.stdout[proc.stdout.find("{"):] if "{" in proc.stdout else ""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"success": False, "error-message": (proc.stderr or proc.stdout).strip()[-500:]}


def wait_ready(fed: Federation, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(_("the SuperLink exited with code {code} (is {address} already in use?)", code=proc.returncode,
                                 address=fed.superlink))
        if _json(flwr(fed, "supernode", "list", fed.name, "--format", "json")).get("success"):
            return
        time.sleep(1)
    raise TimeoutError(_("the SuperLink at {address} did not answer within {seconds} s", address=fed.superlink,
                           seconds=f"{timeout:g}"))


def register_sites(fed: Federation) -> dict[str, str]:
    """Register every enrolled hospital key the SuperLink does not know yet, unregister revoked
    ones and the old key of a re-enrolled one; site -> node id. Kept in server/registered.json
    (with each key's sha256 in server/registered-keys.json; cleared when the state database is new)."""
    import hashlib

    path, keys_path = fed.server_dir / "registered.json", fed.server_dir / "registered-keys.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    keys = json.loads(keys_path.read_text()) if keys_path.is_file() else {}
    revoked, active = fed.revoked, fed.sites()

    def unregister(site: str, why: str) -> None:
        res = _json(flwr(fed, "supernode", "unregister", known[site], fed.name, "--format", "json"))
        if not res.get("success") and "not found" not in str(res.get("error-message", "")).lower():
            raise RuntimeError(f"unregistering {site}'s node key: {res.get('error-message', res)}")
        known[f"{site} ({why} {known[site]})" if why == "old key" else f"{site} ({why})"] = known.pop(site)
        keys.pop(site, None)
        path.write_text(json.dumps(known, indent=1) + "\n")  # `aseanfl status` still names the node
        keys_path.write_text(json.dumps(keys, indent=1) + "\n")

    for site in [s for s in known if s in revoked]:
        unregister(site, "revoked")
    for site in active:
        digest = hashlib.sha256(fed.public_key(site).read_bytes()).hexdigest()
        if site in known and keys.get(site, digest) != digest:  # re-enrolled with a new node key
            unregister(site, "old key")
        if site in known:
            keys.setdefault(site, digest)
            continue
        res = _json(flwr(fed, "supernode", "register", str(fed.public_key(site)), fed.name, "--name", site, "--format", "json"))
        if not res.get("success"):
            raise RuntimeError(f"registering {site}: {res.get('error-message', res)}")
        known[site], keys[site] = str(res["node-id"]), digest
    path.write_text(json.dumps(known, indent=1) + "\n")
    keys_path.write_text(json.dumps(keys, indent=1) + "\n")
    return {site: node for site, node in known.items() if site in active}


def _exit(*_) -> None:
    raise SystemExit(0)


def _say(line: str) -> None:
    print(line, flush=True)  # a log file or journald sees it at once


def _stamp(fed: Federation) -> tuple:
    """Changes when a hospital is revoked (federation.json, the CRL), added (a new kit) or
    re-enrolled (its node key)."""
    return (*(p.stat().st_mtime_ns if p.exists() else 0 for p in (fed.root / "federation.json", fed.server_dir / "crl.pem")),
            *fed.sites(), *(fed.public_key(s).stat().st_mtime_ns for s in fed.sites()))


def check_ca_key_away(fed: Federation) -> None:
    """The CA key must not be in the folder the server serves from (the ServerApp runs there)."""
    for path in (fed.root / "ca.key", fed.root / "ca" / "ca.key", fed.server_dir / "ca.key"):
        if path.exists():
            raise RuntimeError(_("{file}: the federation's CA key is in the server's folder; anyone who runs code as "
                                 "the server could issue hospital certificates. Keep it where provisioning runs "
                                 "(docs/security.md)", file=path))


MAX_RESTARTS = 3  # SuperLink crashes tolerated within 10 minutes before the server gives up


def _start_link(fed: Federation, env: dict, procs: dict[str, subprocess.Popen]) -> None:
    """(Re)start the SuperLink and, once it answers, its executor (stopping what is left of both)."""
    for name in ("executor", "SuperLink"):
        proc = procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    procs["SuperLink"] = subprocess.Popen(superlink_command(fed), env=env)
    wait_ready(fed, proc=procs["SuperLink"])
    (fed.server_dir / "started-at").write_text(f"{time.time():.3f}\n")  # `aseanfl status`: seen since?
    procs["executor"] = subprocess.Popen(serverexec_command(fed), env=env)


def run_server(fed: Federation, log: Callable[[str], None] = _say) -> int:
    """`aseanfl server start`: the SuperLink on loopback, its executor and the public front, in the
    foreground; hospitals registered once it answers; revocations applied while it runs."""
    from server.operations import front
    from server.operations.gate import SERVER_ALLOWLIST_ENV

    check_ca_key_away(fed)
    front.nginx_binary()  # fail before anything starts
    from server.operations.provision import default_ca_dir

    if os.access(default_ca_dir(fed.root) / "ca.key", os.R_OK):
        log(_("warning: this account can read the CA key {file}; in production keep it off this machine, or run the "
              "server as an account that cannot (docs/security.md)", file=default_ca_dir(fed.root) / "ca.key"))
    if not (fed.server_dir / "state.db").exists():
        (fed.server_dir / "registered.json").unlink(missing_ok=True)
        (fed.server_dir / "registered-keys.json").unlink(missing_ok=True)
    env = {**flwr_env(fed), SERVER_ALLOWLIST_ENV: str(server_allowlist(fed))}
    procs: dict[str, subprocess.Popen] = {}
    signal.signal(signal.SIGTERM, _exit)  # systemd's stop: take the children down with us
    try:
        _start_link(fed, env, procs)
        for site, node in register_sites(fed).items():
            log(_("registered {site}: node {node}", site=site, node=node))
        procs["front"] = front.start(fed)
        log(_("SuperLink for {federation}: public front on {front} (mutual TLS, Fleet API only), SuperLink on "
              "{address} (loopback); registered hospitals only; Ctrl-C stops it", federation=fed.name, front=fed.listen,
              address=fed.superlink))
        stamp, active = _stamp(fed), set(fed.sites())
        restarts: list[float] = []
        while True:
            for name, proc in list(procs.items()):
                if proc.poll() is None:
                    continue
                if name == "front":
                    why = front.last_error(fed)
                    log(_("error: the front exited (code {code}): {reason}; stopping the server", code=proc.returncode,
                          reason=why) if why else
                        _("error: the front exited (code {code}); stopping the server", code=proc.returncode))
                    return 1
                restarts = [t for t in restarts if t > time.monotonic() - 600] + [time.monotonic()]
                if len(restarts) > MAX_RESTARTS:
                    log(_("error: the {process} exited (code {code}) {times} times in 10 minutes; stopping the server "
                          "(see the lines above for why)", process=name, code=proc.returncode, times=len(restarts)))
                    return 1
                log(_("error: the {process} exited (code {code}); restarting the SuperLink and its executor (state and "
                      "registrations are kept in state.db). A run it was serving is lost after its last finished round: "
                      "continue it with `aseanfl run --resume RUN_ID`", process=name, code=proc.returncode))
                _start_link(fed, env, procs)
                log(_("SuperLink restarted"))
                break
            if _stamp(fed) != stamp:  # a hospital revoked or added while we run
                front.reload(fed, procs["front"])
                try:
                    registered = register_sites(fed)
                except RuntimeError as exc:  # the SuperLink busy or restarting: try again in a second
                    log(_("error: {reason}; retrying", reason=exc))
                else:
                    stamp, now = _stamp(fed), set(registered)
                    for site in sorted(active - now):
                        log(_("revoked {site}: its certificate is refused at the front, its node key unregistered",
                              site=site))
                    for site in sorted(now - active):
                        log(_("registered {site}: node {node}", site=site, node=registered[site]))
                    active = now
            time.sleep(1.0)
    finally:
        for proc in reversed(list(procs.values())):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _started_at(fed: Federation) -> float | None:
    try:
        return float((fed.server_dir / "started-at").read_text())
    except (OSError, ValueError):
        return None


SILENT_S = 15  # a hospital online for Flower but not heard at the front for longer: "silent"


def status(fed: Federation) -> dict:
    from server.operations import front

    nodes = _json(flwr(fed, "supernode", "list", fed.name, "--format", "json"))
    runs = _json(flwr(fed, "list", fed.name, "--format", "json"))
    path = fed.server_dir / "registered.json"
    names = {v: k for k, v in (json.loads(path.read_text()) if path.is_file() else {}).items()}
    seen = front.last_seen(fed)
    started = _started_at(fed)
    for node in nodes.get("nodes", []):
        node["site"] = site = names.get(str(node.get("node-id")), "?")
        if site in seen:
            node["last-seen"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seen[site]))
        if node.get("status") == "online" and started and seen.get(site, 0) < started:
            # Flower keeps a node "online" from before a restart until its heartbeat would have expired
            node["status"] = "not seen since the server restarted"
        elif node.get("status") == "online" and site in seen and time.time() - seen[site] > SILENT_S:
            # a live daemon asks the front for work every second; Flower waits a minute of missed
            # heartbeats before it calls a killed one offline
            node["status"] = "silent"
    return {"nodes": nodes.get("nodes", []), "runs": runs.get("runs", []),
            "problems": [r["error-message"] for r in (nodes, runs) if not r.get("success")]}


def _run_status(fed: Federation, run_id: int) -> str | None:
    """The run's status on the SuperLink, or None when the SuperLink does not answer."""
    res = _json(flwr(fed, "list", fed.name, "--run-id", str(run_id), "--format", "json"))
    if not res.get("success"):
        return None
    runs = res.get("runs", [])
    return runs[0].get("status", "") if runs else ""


def start_run(fed: Federation, config_yaml: str, overrides: list[str], app: Path, out: Path,
              echo: Callable[[str], None] = print, timeout: float = 3600,
              resume: int | None = None, run_config: dict | None = None,
              folders: str = "runs") -> tuple[int, str, Path | None]:
    """Submit the run (or one that continues run `resume` in its folder; or, with `run_config`,
    another job of the ServerApp, e.g. an evaluation writing into server/`folders`), stream its
    log until it ends, copy its folder to `out`. Returns (run id, final status or "lost" when
    the SuperLink stopped answering, local run folder or None)."""
    from common.allowlist import approved_hashes, bundle_hash

    bundle = app_bundle(app)
    digest = bundle_hash(bundle)
    if digest not in approved_hashes(server_allowlist(fed)):
        raise PermissionError(_("app bundle sha256 {sha256} ({app}) is not approved on this server; review the change, "
                                "then `aseanfl server approve`", sha256=digest, app=app))
    from common.i18n import current

    run_config = {**(run_config or {"mode": "deployment", "config-yaml": config_yaml, "set": " ".join(overrides)}),
                  "lang": current()}  # the ServerApp's log lines and report in the coordinator's language
    if resume is not None:  # the lost run's ServerApp is dead (its folder is free): Flower still says "running"
        run_config["resume"] = str(resume)
        flwr(fed, "stop", str(resume), fed.name, "--format", "json")
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = Path(tmp) / "run.toml"
        cfg_file.write_text(tomli_w.dumps(run_config))
        staged = staged_app(bundle, Path(tmp) / "app")  # same bundle, same hash; Flower would walk a .venv too
        proc = subprocess.Popen([str(_BIN / "flwr"), "run", str(staged), fed.name, "--run-config", str(cfg_file), "--stream"],
                                env=flwr_env(fed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run_id, last = None, ""
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            last = line.strip() or last
            if run_id is None and (m := re.search(r"started run (\d+)", line)):
                run_id = int(m.group(1))
            if "aseanfl:" in line or "ERROR" in line or "started run" in line or "refused" in line:
                echo(line.rstrip())
            if time.monotonic() > deadline:
                proc.kill()
                break
        proc.wait()
    if run_id is None:
        raise RuntimeError(_("the SuperLink did not start the run (is `aseanfl server start` running?); flwr said: "
                             "{said}", said=last[-300:]) if last else
                           _("the SuperLink did not start the run (is `aseanfl server start` running?)"))
    final: str | None = ""
    for _attempt in range(30):  # the stream ends a moment before the status is written
        final = _run_status(fed, run_id)
        if final is None or final.startswith("finished"):
            break
        time.sleep(1)
    if final is None:
        return run_id, "lost", None
    source = fed.server_dir / folders / f"run-{resume if resume is not None else run_id}"
    local = None
    if source.is_dir():
        local = out / source.name
        shutil.copytree(source, local, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock", ".*.tmp"))
    return run_id, final, local
