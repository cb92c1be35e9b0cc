"""A real deployment on loopback, attacked. `aseanfl provision`, `aseanfl server start` (the
SuperLink on 127.0.0.1 only, its approved-apps-only executor, and the nginx front on 127.0.0.2,
which stands for the server's public interface: mutual TLS, Fleet API only), four `aseanfl client
start` daemons (SuperNodes presenting their client certificates) each reading its own folder of
PNG files, and `aseanfl run` over loopback. Three hospitals approved the app, one did not; the
server is restarted before the run, so the run also shows that the daemons reconnect by
themselves. Then an outsider, a curious hospital, a malicious member hospital and a local user
on the server try what they should not, and a hospital is revoked. Every hospital enrolled as in
production: its keys made in its own folder (hospitals/<site>), never in the federation's. Every
process is stopped at the end."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import yaml
import pytest
from attacks import PATHS, fleet_post, flwr_as, forged_reply, marker_app, post, raw_post, rss_mib, signed_headers
from console_steps import data_view, hospitals_view, start_and_stop, start_consoles, steward_approves, watch_run
from consoles import login
from contest_steps import CONTEST, central, contest
from PIL import Image
from safetensors.numpy import load_file
from processes import descendants, listening, live_processes, zombies

from medimaging.compute import cores
from server.evaluation.federated import sha256
from simulations.local_deployment import BIN, LocalDeployment, aseanfl, free_port

APPROVED, UNAPPROVED = ["site-a", "site-b", "site-c"], "site-d"
REVOKED = "site-c"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, chromium):
    tmp = tmp_path_factory.mktemp("deploy")
    with LocalDeployment(tmp, APPROVED, "asean-test", host="127.0.0.2") as dep:
        assert dep.provision().returncode == 0
        # a hospital joining later: provisioning it leaves the others' keys alone
        before = (dep.kit("site-a") / "node.key").read_bytes()
        res = dep.provision(["site-a", UNAPPROVED])
        assert res.returncode == 0 and UNAPPROVED in res.stdout and "kept" in res.stdout, res.stdout
        assert (dep.kit("site-a") / "node.key").read_bytes() == before
        app_hash = aseanfl("app-hash").stdout.strip()
        assert len(app_hash) == 64
        for i, site in enumerate([*APPROVED, UNAPPROVED]):
            # site-a trains with DP-SGD, the others without; 300 images each, so a federation can learn
            # site-b trains on every core (the kit's default), the others on one thread each
            dep.prepare_site(site, i, dp=site == "site-a", samples=300, threads=None if site == "site-b" else 1)
            if site != UNAPPROVED:
                assert dep.approve(site, app_hash).returncode == 0
        dep.start_server()
        for site in [*APPROVED, UNAPPROVED]:
            dep.start_site(site)
        assert dep.wait_online({*APPROVED, UNAPPROVED}) >= {*APPROVED, UNAPPROVED}
        dep.stop("server")  # the coordinator restarts its server: the hospitals find it again
        dep.start_server()
        # the coordinator watches the run in the console; site-d's steward has the other console
        urls, shots = start_consoles(dep, UNAPPROVED), tmp / "screenshots"
        coordinator = login(chromium, urls["console-server"], "coordinator", shots)
        started, before, done = time.monotonic(), set((dep.fed / "server" / "runs").glob("run-*")), {}
        running = threading.Thread(target=lambda: done.update(run=dep.run(
            "--rounds", "2", "--set", "task.image_size=32", "--set", "train.local_epochs=5",
            "--set", "strategy.calibrate_head=true", "--set", "strategy.personal_heads=true",  # site-a (DP-SGD) refuses
            "--set", "wait_for_sites=4", "--set", "wait_timeout_s=120", timeout=600)))
        running.start()
        watched = watch_run(coordinator, urls["console-server"], dep, before)
        running.join()
        run, seconds = done["run"], time.monotonic() - started
        time.sleep(3)  # the last tasks' processes end
        out = {"fed": dep.fed, "tmp": tmp, "run": run, "seconds": seconds, "hash": app_hash, "dep": dep,
               "listening": _listening(dep), "zombies": {n: zombies(descendants(p.pid)) for n, p in dep.procs.items()},
               "watched": watched, "shots": shots}
        apps = dep.kit(UNAPPROVED) / "state" / "flwr-home" / "apps"
        out["unpacked before approval"] = apps.exists() and any(apps.iterdir())
        out["hospitals"] = hospitals_view(coordinator, urls["console-server"], "coordinator-hospitals")
        # the region's contest, while site-d has not approved the bundle: it refuses to score
        out["contest"] = contest(dep, tmp, next((tmp / "results").glob("run-*")) / "model.safetensors", coordinator,
                                 urls["console-server"])
        # the hospitals' statistics (site-d has not approved the bundle: it refuses), then the console's Data page
        out["stats"] = aseanfl("stats", "-f", str(dep.fed), "--wait-for-sites", "4", "--min-count", "5", "--out",
                               str(tmp / "statistics"), timeout=300)
        out["data page"] = data_view(coordinator, urls["console-server"], "coordinator-data")
        # the steward of the hospital that refused the bundle approves it in the page: it trains from the next run
        out["steward"] = steward_approves(chromium, urls[f"console-{UNAPPROVED}"], app_hash, shots)
        out["crash"] = _server_killed_then_resumed(dep, tmp)
        out["rogue"] = _rogue_supernode(tmp, dep)
        out["no_cert"] = _supernode_without_client_certificate(dep)
        out.update(_attack(dep, tmp, run.stdout))
        out["console run"] = start_and_stop(coordinator, urls["console-server"], dep)
        out["impostor"] = _impostor_round(dep, tmp)
        out["adapters"] = _adapters_round(dep, tmp)
        out["added"] = _add_while_running(dep, "site-e")
        out["front"] = _member_attacks_the_front(dep, "site-e")
        out["hospitals after adding"] = hospitals_view(coordinator, urls["console-server"], "coordinator-hospitals-added")
        out["revoked"] = _revoke(dep, REVOKED)
        out["hospitals after revoking"] = hospitals_view(coordinator, urls["console-server"], "coordinator-hospitals-revoked")
        out["coordinator errors"] = list(coordinator.errors)
        out["private keys on the coordinator's side"] = [
            p.relative_to(tmp).as_posix() for folder in (dep.fed, tmp / "federation-ca") for p in folder.rglob("*")
            if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
        yield out
    time.sleep(2)
    assert _processes_using(tmp) == [], "processes left running after the deployment test"


def _server_killed_then_resumed(dep: LocalDeployment, tmp: Path) -> dict:
    """A 3-round FedAvgM run: `kill -9` of the whole server (aseanfl server start, SuperLink,
    executor, ServerApp, front) while round 2 trains; the server started again; `aseanfl run
    --resume`; while the resumed round 2 trains, site-a's daemon is killed (-9) and started again
    (as systemd would). site-a trains with DP-SGD; its hospital allows 40 epsilon in all, so the
    rounds that run again are accounted, not refused."""
    from server.engine.checkpoint import round_of

    kit = dep.kit("site-a")
    (kit / "site.yaml").write_text((kit / "site.yaml").read_text().replace(
        "  target_epsilon: 8.0\n", "  target_epsilon: 8.0\n  budget_epsilon: 40.0\n"))
    runs, results = dep.fed / "server" / "runs", tmp / "resumed"
    before = set(runs.iterdir())
    args = ["--rounds", "3", "--strategy", "fedavgm", "--set", "strategy.server_momentum=0.5", "--set", "task.image_size=32",
            "--set", "strategy.compression.codec=int8",  # compressed updates, deployed: decoded by the server
            "--set", "strategy.compression.downlink=int8",  # and the model sent down as deltas
            "--set", "strategy.fedper=true",  # personalization, deployed: each hospital keeps its head
            "--set", "train.local_epochs=8", "--set", "wait_for_sites=4", "--set", "wait_timeout_s=120"]
    proc = subprocess.Popen([str(BIN / "aseanfl"), "run", "-f", str(dep.fed), "--out", str(results), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp)
    deadline, folder = time.monotonic() + 300, None
    while time.monotonic() < deadline and (folder is None or round_of(folder) != 1):
        folder = next(iter(set(runs.iterdir()) - before), None)
        time.sleep(0.2)
    assert folder is not None and round_of(folder) == 1, "round 1 of the run to crash did not finish"
    time.sleep(2)  # round 2's training is under way
    server = dep.procs.pop("server")
    os.killpg(server.pid, 9)
    killed = time.monotonic()
    server.wait()
    lost_said = proc.communicate(timeout=300)[0]
    out = {"lost": (proc.returncode, lost_said, time.monotonic() - killed), "folder": folder,
           "rows after crash": (folder / "metrics.csv").read_text(),
           "left": [cmd for cmd in _processes_using(tmp)  # the hospitals' daemons and the consoles live on
                    if not any(k in cmd for k in ("client start", "aseanfl-supernode", "aseanfl-superexec", " console "))]}
    restarted = time.time()
    dep.start_server()
    out["status after restart"] = (restarted, aseanfl("status", "-f", str(dep.fed)).stdout)
    ledger = kit / "state" / "privacy" / "site-a.json"

    def charged() -> list:
        return [e["round"] for e in json.loads(ledger.read_text())["entries"] if e["run"] == folder.name]

    log, crashed_run = dep.root / "site-a.log", re.search(r"run (\d+): the server was lost", lost_said)
    start = log.stat().st_size
    proc = subprocess.Popen([str(BIN / "aseanfl"), "run", "-f", str(dep.fed), "--out", str(results), "--resume",
                             folder.name.removeprefix("run-")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp)
    # the resumed run's round 2 reaches site-a (a task of the dead run may still be finishing
    # there: it charges the ledger too, rightly, and its reply is refused by the SuperLink)
    deadline, before_resume = time.monotonic() + 300, None
    while time.monotonic() < deadline and before_resume is None:
        text = log.read_bytes()[start:].decode(errors="replace")
        if any(run != (crashed_run and crashed_run.group(1)) for run in
               re.findall(r"\[RUN (\d+), ROUND 2\]\n.*Receiving: train message", text)):
            before_resume = charged()
        time.sleep(0.05)
    while time.monotonic() < deadline and before_resume is not None and len(charged()) == len(before_resume):
        time.sleep(0.05)
    out["ledger at kill"] = charged()
    if before_resume is not None and len(out["ledger at kill"]) > len(before_resume):  # charged: it trains now
        daemon = dep.procs.pop("site-a")
        os.killpg(daemon.pid, 9)
        daemon.wait()
        dep.start_site("site-a")  # as systemd would
    out["resumed"] = (proc.communicate(timeout=600)[0], proc.returncode)
    out["ledger before resume"] = before_resume
    out["results"] = results / folder.name
    out["ledger"] = json.loads((kit / "state" / "privacy" / "site-a.json").read_text())
    out["superlink killed"] = _kill_the_superlink_alone(dep)
    return out


def _kill_the_superlink_alone(dep: LocalDeployment, timeout: float = 120) -> str:
    """kill -9 of the SuperLink process only: `aseanfl server start` restarts it (the attacks
    and the revocation that follow run against the restarted one)."""
    log = dep.root / "server.log"
    start = log.stat().st_size
    links = [pid for pid, (_, cmd) in live_processes().items()
             if "aseanfl-superlink" in cmd and str(dep.fed) in cmd]
    for pid in links:
        os.kill(pid, 9)
    deadline = time.monotonic() + timeout
    while "SuperLink restarted" not in (said := log.read_bytes()[start:].decode(errors="replace")):
        if time.monotonic() > deadline or dep.procs["server"].poll() is not None:
            break
        time.sleep(0.5)
    return said if links else "no SuperLink process found"


def _processes_using(folder: Path) -> list[str]:
    """Command lines of live processes that name `folder` (servers, daemons, SuperNodes, app processes)."""
    return [cmd for _, cmd in live_processes().values() if str(folder) in cmd]


def _listening(dep: LocalDeployment) -> dict[str, set]:
    """Listening sockets of the server's process tree and of each hospital daemon's."""
    return {name: listening(descendants(proc.pid)) for name, proc in dep.procs.items()}


def _rogue_supernode(tmp: Path, dep: LocalDeployment) -> subprocess.CompletedProcess:
    """A node key the coordinator never registered, presented with a valid hospital certificate
    (site-d's, say a curious hospital's second machine): the door admits it, node auth does not."""
    from server.operations.provision import provision

    other, _ = provision(tmp / "rogue", "rogue", ["intruder"], dep.address)
    env = {**os.environ, "ASEANFL_SITE_CONFIG": str(dep.kit(UNAPPROVED) / "site.yaml")}
    return subprocess.run(
        [str(BIN / "aseanfl-supernode"), "--superlink", dep.address, "--root-certificates", str(dep.fed / "ca.crt"),
         "--auth-supernode-private-key", str(other.site_kit("intruder") / "node.key"), "--max-retries", "1",
         "--isolation", "process", "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, env=env)


def _supernode_without_client_certificate(dep: LocalDeployment, timeout: float = 30, after: float = 3) -> str:
    """Flower's own SuperNode with a registered hospital key but no client certificate; what it
    said until 3 s after the door's refusal, or in 30 s (after the refusal it stays up, retrying
    nothing: waiting the whole 30 s only cost the suite time)."""
    cmd = [str(BIN / "flower-supernode"), "--superlink", dep.address, "--root-certificates", str(dep.fed / "ca.crt"),
           "--auth-supernode-private-key", str(dep.kit(UNAPPROVED) / "node.key"), "--max-retries", "1",
           "--isolation", "process", "--port", str(free_port())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    said, refused = [], threading.Event()

    def read() -> None:
        for line in proc.stdout:
            said.append(line)
            text = "".join(said)  # the two words may come on different lines
            if "403 Forbidden" in text and "activate-node" in text:
                refused.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if refused.wait(timeout):
        time.sleep(after)  # anything it says after the refusal (a node identity would show here)
    os.killpg(proc.pid, 9)
    proc.wait()
    reader.join(10)
    return "".join(said)


def _attack(dep: LocalDeployment, tmp: Path, run_log: str) -> dict:
    """The outsider (with the CA certificate every kit holds, and with none), the curious hospital
    (a valid client certificate) and a local user on the server (loopback) try to take over."""
    from flwr.proto.control_pb2 import ListRunsRequest

    marker = tmp / "takeover-ran"
    app = marker_app(tmp / "takeover", marker)
    run_id = found.group(1) if (found := re.search(r"run (\d+):", run_log)) else "1"
    nodes = json.loads((dep.fed / "server" / "registered.json").read_text())
    intruder_pub = tmp / "rogue" / "sites" / "intruder" / "node.pub"
    ca, home = dep.fed / "ca.crt", tmp / "outsider"
    outsider = {
        "list runs": ["ls", "target", "--format", "json"],
        "start a run": ["run", str(app), "target", "--format", "json"],
        "stop a run": ["stop", run_id, "target", "--format", "json"],
        "read a run's log": ["log", run_id, "target", "--show"],
        "register a node": ["supernode", "register", str(intruder_pub), "target", "--format", "json"],
        "unregister a hospital": ["supernode", "unregister", nodes["site-b"], "target", "--format", "json"],
        "list hospitals": ["supernode", "ls", "target", "--format", "json"],
    }
    out = {"outsider": {what: flwr_as(home, dep.address, ca, *args) for what, args in outsider.items()}}
    site = dep.kit("site-a")
    body = ListRunsRequest().SerializeToString()
    out["http"] = {(who, path): post(dep.address, path, **how, body=body) for path in PATHS for who, how in (
        ("no certificate, no server check", {"ca": False}),
        ("CA certificate only", {"ca": ca}),
        ("hospital certificate", {"ca": ca, "cert": (site / "client.crt", site / "client.key")}))}
    # the same request on the SuperLink's own (loopback) port is answered: the refused paths are real
    out["loopback list-runs"] = post(f"127.0.0.1:{dep.local_port}", "/v1/control/list-runs",
                                     ca=dep.fed / "server" / "ca.crt", body=body)
    # a local user on the server machine reaches the loopback Control API and submits the bundle
    local = flwr_as(tmp / "local-user", f"127.0.0.1:{dep.local_port}", dep.fed / "server" / "ca.crt",
                    "run", str(app), "target", "--stream", timeout=180)
    local_id = re.search(r"started run (\d+)", local.stdout)
    status = flwr_as(tmp / "local-user", f"127.0.0.1:{dep.local_port}", dep.fed / "server" / "ca.crt",
                     "ls", "target", "--run-id", local_id.group(1) if local_id else "0", "--format", "json")
    out["local user"] = {"run": local, "status": status}
    out["aseanfl run unapproved"] = dep.run("--app", str(app), "--rounds", "1", timeout=120)
    out["marker"] = marker.exists()
    return out


def _impostor_round(dep: LocalDeployment, tmp: Path) -> dict:
    """A member hospital speaks for another. site-a's daemon, with its own kit, certificate and
    node key, declares `site: site-b` in its site.yaml (a run's worker reads it anew). site-b's
    daemon is paused while the round's tasks go out; meanwhile site-a pushes a reply to site-b's
    task in site-b's name (the task id read from the SuperLink's database stands for a leaked
    one), and `aseanfl status` is read. Then site-b goes on and answers its task itself."""
    site_yaml = dep.kit("site-a") / "site.yaml"
    honest = site_yaml.read_text()
    site_yaml.write_text(honest.replace("site: site-a\n", "site: site-b\n", 1))
    nodes = json.loads((dep.fed / "server" / "registered.json").read_text())
    paused = dep.procs["site-b"]
    os.killpg(paused.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    out: dict = {}
    try:
        assert "site: site-b" in site_yaml.read_text()
        results = tmp / "impostor"
        proc = subprocess.Popen([str(BIN / "aseanfl"), "run", "-f", str(dep.fed), "--out", str(results), "--rounds", "1",
                                 "--set", "task.image_size=32", "--set", "train.local_epochs=1", "--set", "wait_for_sites=4",
                                 "--set", "wait_timeout_s=120", "--set", "server.round_timeout_s=300"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp)
        deadline, body = time.monotonic() + 180, None
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            body = forged_reply(dep.fed / "server" / "state.db", int(nodes["site-b"]), int(nodes["site-a"]))
            time.sleep(0.2)
        a = dep.kit("site-a")
        out["forged"] = body is not None and fleet_post(dep.address, "/v1/fleet/push-messages", dep.fed / "ca.crt",
                                                        (a / "client.crt", a / "client.key"), a / "node.key", body)
        # paused 17 s: Flower still counts site-b online (it waits a minute of missed heartbeats), the front has
        # not heard it for longer than SILENT_S
        time.sleep(max(0.0, 17 - (time.monotonic() - stopped)))
        out["status while paused"] = aseanfl("status", "-f", str(dep.fed)).stdout
    finally:
        os.killpg(paused.pid, signal.SIGCONT)
    try:
        out["run"] = (proc.communicate(timeout=400)[0], proc.returncode)
        out["rows"] = _rows(results)
    finally:
        site_yaml.write_text(honest)
    out["server log"] = (dep.root / "server.log").read_text(errors="replace")
    return out


def _adapters_round(dep: LocalDeployment, tmp: Path) -> dict:
    """One round that fine-tunes LoRA adapters (rank 2) on the first run's model, as a coordinator
    starts it from a MONAI bundle: `aseanfl run` with task.bundle (a bundle made here with
    monai.bundle of that model: its network_def is the cnn's Classifier) and model.adapters
    (site-a trains with DP-SGD)."""
    import shutil

    from monai.bundle import init_bundle

    start = next((tmp / "results").glob("run-*")) / "model.safetensors"
    bundle = tmp / "bundles" / "cxr_cnn"
    bundle.parent.mkdir()
    net = {"_target_": "Classifier", "in_shape": [1, 32, 32], "classes": 2, "channels": [16, 32, 64],
           "strides": [2, 2, 2], "num_res_units": 0, "dropout": 0.1}
    io = {"inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [32, 32]}},
          "outputs": {"pred": {"type": "probabilities", "format": "classification", "num_channels": 2}}}
    init_bundle(bundle, metadata_str={"version": "1.0.0", "network_data_format": io},
                inference_str={"network_def": net})
    shutil.copy(start, bundle / "models" / "model.safetensors")
    results = tmp / "adapters"
    res = aseanfl("run", "-f", str(dep.fed), "--out", str(results), "--rounds", "1", "--set", f"task.bundle={bundle}",
                  "--set", "train.local_epochs=2", "--set", "wait_for_sites=4", "--set", "wait_timeout_s=120",
                  "--set", "model.adapters.rank=2", timeout=400, cwd=tmp)
    return {"run": res, "start": start, "folder": next(results.glob("run-*"), results)}


def _member_attacks_the_front(dep: LocalDeployment, member: str) -> dict:
    """A member hospital's admitted certificate (`member`'s, its daemon not running) against the
    front: bodies far over the cap, the same body within it, another hospital's node key with
    its certificate (by hand and with a real SuperNode), and a flood of requests."""
    import httpx
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.node_pb2 import Node

    from client.operations.gate import mutual_tls

    kit, other, ca = dep.kit(member), dep.kit("site-b"), dep.fed / "ca.crt"
    cert = (kit / "client.crt", kit / "client.key")
    link = next(pid for pid, (_, cmd) in live_processes().items() if "aseanfl-superlink" in cmd and str(dep.fed) in cmd)
    out: dict = {"rss before": rss_mib(link)}
    # signed with the member's own node key: only the size stands between these bodies and the SuperLink
    headers = signed_headers(kit / "node.key")
    out["oversize"] = raw_post(dep.address, "/v1/fleet/push-object", ca, cert, 256 << 20, headers=headers)
    out["oversize chunked"] = raw_post(dep.address, "/v1/fleet/push-object", ca, cert, 64 << 20, chunked=True,
                                       headers=headers)
    time.sleep(1)
    out["rss after"] = rss_mib(link)
    out["within the cap"] = raw_post(dep.address, "/v1/fleet/push-object", ca, cert, 4 << 20, headers=headers)
    nodes = json.loads((dep.fed / "server" / "registered.json").read_text())
    beat = SendNodeHeartbeatRequest(node=Node(node_id=int(nodes["site-b"])), heartbeat_interval=30).SerializeToString()
    out["site-b's key, member's certificate"] = fleet_post(dep.address, "/v1/fleet/send-node-heartbeat", ca, cert,
                                                           other / "node.key", beat)
    out["site-b's key, site-b's certificate"] = fleet_post(dep.address, "/v1/fleet/send-node-heartbeat", ca,
                                                           (other / "client.crt", other / "client.key"),
                                                           other / "node.key", beat)
    env = {**os.environ, "ASEANFL_SITE_CONFIG": str(dep.kit(UNAPPROVED) / "site.yaml")}  # site-d's certificate
    out["supernode"] = subprocess.run(
        [str(BIN / "aseanfl-supernode"), "--superlink", dep.address, "--root-certificates", str(ca),
         "--auth-supernode-private-key", str(other / "node.key"), "--max-retries", "1", "--isolation", "process",
         "--port", str(free_port())], capture_output=True, text=True, timeout=120, env=env)
    # a flood of signed Fleet calls the front forwards (a heartbeat of the member's own node)
    own = SendNodeHeartbeatRequest(node=Node(node_id=int(nodes[member])), heartbeat_interval=30).SerializeToString()
    with httpx.Client(verify=mutual_tls(ca, *cert), timeout=30) as client:
        started, codes = time.monotonic(), []
        for _ in range(600):
            headers = {"content-type": "application/protobuf", "accept": "application/protobuf",
                       **signed_headers(kit / "node.key")}
            codes.append(client.post(f"https://{dep.address}/v1/fleet/send-node-heartbeat", content=own,
                                     headers=headers).status_code)
        out["flood"], out["flood seconds"] = codes, time.monotonic() - started
    out["access log"] = (dep.fed / "server" / "front" / "access.log").read_text(errors="replace")
    return out


def _add_while_running(dep: LocalDeployment, site: str, timeout: float = 60) -> str:
    """A hospital provisioned while the server runs: the server registers its key by itself."""
    assert dep.provision([site]).returncode == 0
    log, deadline = dep.root / "server.log", time.monotonic() + timeout
    while f"registered {site}: node" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(1)
    return aseanfl("status", "-f", str(dep.fed)).stdout


def _revoke(dep: LocalDeployment, site: str, timeout: float = 90) -> dict:
    """`aseanfl provision --revoke` while everything runs; the hospital's daemon must say why it is out."""
    log = dep.root / f"{site}.log"
    start = log.stat().st_size
    res = aseanfl("provision", "--federation", "asean-test", "--out", str(dep.fed), "--revoke", site)
    deadline = time.monotonic() + timeout
    # the daemon's own line, which follows its SuperNode's (it asks the door why): waiting for the first
    # "certificate revoked" alone left it 3 s, too little on a loaded machine
    while "refused at the federation server's door" not in log.read_bytes()[start:].decode(errors="replace") \
            and time.monotonic() < deadline:
        time.sleep(1)
    kit = dep.kit(site)
    door = post(dep.address, "/aseanfl/door", ca=dep.fed / "ca.crt", cert=(kit / "client.crt", kit / "client.key"))
    time.sleep(3)  # whatever else the daemon says about it
    return {"provision": res, "log": log.read_text(errors="replace"), "door": door,
            "said since": log.read_bytes()[start:].decode(errors="replace"),
            "status": aseanfl("status", "-f", str(dep.fed)).stdout}


def _rows(results: Path) -> list[dict]:
    run_dir = next(results.glob("run-*"))
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_two_rounds_complete_and_the_federation_learns(deployed):
    run = deployed["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "finished:completed" in run.stdout
    run_dir = next((deployed["tmp"] / "results").glob("run-*"))
    for name in ("model.safetensors", "metrics.csv", "report.md", "summary.json", "config.yaml"):
        assert (run_dir / name).is_file(), name
    rows = _rows(deployed["tmp"] / "results")
    for rnd in ("1", "2"):
        ok = {r["site"] for r in rows if r["round"] == rnd and r["status"] == "ok" and r["val_auc"]}
        assert ok == set(APPROVED), (rnd, ok)
    # the inputs are real images (not blank), and the deployed federation learns from them
    for site in APPROVED:
        pixels = np.stack([np.asarray(Image.open(p)) for p in sorted((deployed["tmp"] / "pacs" / site).glob("*/*.png"))[:20]])
        assert pixels.std() > 10, f"{site}'s PNG files are blank"
    auc = {r["round"]: float(r["val_auc"]) for r in rows if r["site"] == "global"}
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"deployed: federated val AUC by round {auc}; round seconds {summary['round_seconds']}, "
          f"whole run incl. waiting {deployed['seconds']:.1f} s")
    assert auc["2"] > 0.65, auc  # chance is 0.5 (blank images gave exactly 0.5)
    # head calibration, deployed: every hospital is asked; site-a trains with DP-SGD (its kit's policy)
    # and refuses, site-d has not approved the bundle; site-b and site-c release their sums through
    # the front (4.2 MB each) and get their own heads
    cal = summary["calibration"]
    assert cal["status"] == "calibrated" and cal["hospitals"] == 2, cal
    assert "not available at a hospital that trains with DP-SGD" in cal["sites"]["site-a"], cal["sites"]
    assert {s: cal["sites"][s].split(":")[0] for s in ("site-b", "site-c")} == {"site-b": "released", "site-c": "released"}
    assert cal["sites"][UNAPPROVED].startswith("error"), cal["sites"]
    assert cal["bytes_from_sites"] > 2 * 8 * 1024 * 1025 // 2, cal  # both moments came through the front
    assert (run_dir / "model_calibrated.safetensors").exists()
    scored = cal["calibrated"]["sites"]
    assert {s for s, v in scored.items() if v["pers_val_auc"] is not None} == {"site-b", "site-c"}, scored
    assert scored["site-a"]["val_auc"] is not None, scored  # site-a still validates the calibrated model
    # b and c keep the model with their own head on their own disks, with its card; site-a has none
    for site in APPROVED:
        own = deployed["tmp"] / "hospitals" / site / "state" / run_dir.name / "personal" / site
        if site == "site-a":
            assert not own.exists(), own
            continue
        assert sorted(p.name for p in own.iterdir()) == ["card.yaml", "model.safetensors", "scores.json"], own
        kept = json.loads((own / "scores.json").read_text())
        assert kept["kind"] == "personal-head" and kept["accuracy"] == pytest.approx(scored[site]["pers_val_accuracy"])
        assert load_file(str(own / "model.safetensors")).keys() == load_file(str(run_dir / "model.safetensors")).keys()


def _worker_lines(site: str, deployed) -> list[tuple[str, str, str]]:
    """(worker pid, message type, the rest) of each task the hospital's daemon served in the run."""
    run_id = re.search(r"run (\d+): finished", deployed["run"].stdout).group(1)
    text = (deployed["tmp"] / f"{site}.log").read_text(errors="replace")
    return re.findall(rf"aseanfl worker (\d+): run {run_id} ([\w.]+) task: (.*)", text)


def test_each_hospital_serves_its_run_from_one_warm_worker(deployed):
    """No process per message: one worker per run at each hospital, forked from a parent that
    imported torch/MONAI/Opacus before the run; the bundle is imported once, at the first task
    (the server's question for the class names), after its check; later tasks only check it again."""
    for site in APPROVED:
        lines = _worker_lines(site, deployed)
        # then the head calibration's question (site-a refuses it: DP-SGD) and its validation
        assert [t for _, t, _ in lines] == ["query.classes"] + ["train", "evaluate"] * 2 + ["query.features", "evaluate"], lines
        assert len({pid for pid, _, _ in lines}) == 1, lines
        assert "bundle check + import" in lines[0][2] and all("+ import" not in rest for _, _, rest in lines[1:]), lines
        # its site.yaml's compute.threads, or every core the daemon may use (not Flower's or our old 1)
        threads = {re.search(r"\(torch threads (\d+)\)", rest).group(1) for _, _, rest in lines}
        assert threads == {str(cores() if site == "site-b" else 1)}, (site, threads)
    # the hospital that did not approve the bundle checked it and imported nothing of it
    assert _worker_lines(UNAPPROVED, deployed) == []
    assert "site-d: refused app bundle" in (deployed["tmp"] / f"{UNAPPROVED}.log").read_text(errors="replace")


HEAD = {"final.1.weight", "final.1.bias"}  # the cnn's classifier head (medimaging.models.head_keys)


def test_the_crash_runs_compressed_updates_are_decoded_and_their_residuals_stay_at_the_hospitals(deployed):
    crash, hosp = deployed["crash"], deployed["tmp"] / "hospitals"
    name = crash["folder"].name
    rows = list(csv.DictReader((crash["results"] / "metrics.csv").open()))
    model = load_file(str(crash["results"] / "model.safetensors"))
    fp32 = sum(v.nbytes for v in model.values())
    for site in ("site-b", "site-c"):
        ok = [r for r in rows if r["site"] == site and r["status"] == "ok"]
        assert ok and all(0.2 < int(r["bytes_from_site"]) / fp32 < 0.3 for r in ok), (site, ok)
        assert (hosp / site / "state" / "compression" / f"{name}.safetensors").is_file()
        ids = {int(name.removeprefix("run-")), *map(int, re.findall(r"run (\d+) \(continuing", crash["resumed"][0]))}
        logged = [json.loads(line) for line in (hosp / site / "audit.jsonl").read_text().splitlines()]
        sent = [e["records"]["arrays"]["entries"] for e in logged
                if e.get("run") in ids and e.get("type") == "train" and "arrays" in e.get("records", {})]
        assert len(sent) >= 3 and len(ids) == 2, (len(sent), ids)
        for entries in sent:  # what left: codes and scales only, no weights, no residual, no head (FedPer)
            assert {k.split(":")[0] for k in entries} == {"q", "s"}, sorted(entries)[:4]
            assert {k.split(":", 1)[1] for k in entries} & HEAD == set(), sorted(entries)
            assert len({k.split(":", 1)[1] for k in entries if k.startswith("q:")}) == len(model) - len(HEAD)
            assert {v["dtype"] for k, v in entries.items() if k.startswith("q:")} == {"int8"}
        res = aseanfl("client", "audit", "-c", str(hosp / site / "site.yaml"))
        assert res.returncode == 0, res.stdout
        # the model came down as deltas against the copy each hospital keeps beside its ledgers: the
        # resumed server sends it in full once (it forgot what each holds), then deltas or nothing
        ids_kept = [p for p in (hosp / site / "state" / "compression").glob("run-*.model.safetensors")]
        assert ids_kept, site
        # its own model (the shared body with its FedPer head) stays on its disk, head and all
        own = hosp / site / "state" / name / "personal" / site
        assert json.loads((own / "scores.json").read_text())["kind"] == "fedper", own
        assert HEAD <= set(load_file(str(own / "model.safetensors"))), own
        last = [r for r in rows if r["site"] == site and r["round"] == "3"]
        assert last and int(last[0]["bytes_to_site"]) < 0.6 * fp32, (site, last)


def test_run_resumes_after_the_server_is_killed_and_loses_at_most_the_round_in_flight(deployed):
    crash = deployed["crash"]
    code, said, seconds = crash["lost"]
    run_id = crash["folder"].name.removeprefix("run-")
    assert code == 1 and "the server was lost" in said and f"--resume {run_id}" in said, said[-2000:]
    assert "rounds 1-1 are kept" in said and "Traceback" not in said, said[-2000:]
    print(f"`aseanfl run` said the server was lost {seconds:.0f} s after the kill")
    assert crash["left"] == [], crash["left"]  # kill -9 took the ServerApp down with the rest
    resumed, code = crash["resumed"]
    assert code == 0 and "finished:completed" in resumed, resumed[-3000:]
    assert f"continuing run {run_id}" in resumed and "resuming run-" in resumed, resumed[-3000:]
    rows = list(csv.DictReader((crash["results"] / "metrics.csv").open()))
    glob = [r["round"] for r in rows if r["site"] == "global"]
    assert glob == ["1", "2", "3"], glob  # every round once
    summary = json.loads((crash["results"] / "summary.json").read_text())
    assert summary["resumed_after_round"] == 1 and len(summary["round_seconds"]) == 3
    assert (crash["results"] / "report.md").is_file()


def test_status_right_after_a_restart_calls_no_hospital_online_that_was_not_heard_since(deployed):
    restarted, said = deployed["crash"]["status after restart"]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in said.splitlines() if line.startswith("│ site-")]
    assert {r[0] for r in rows} >= set(APPROVED), said
    for site, _, state, *_, seen in rows:
        if state == "online":  # Flower's word: only if the hospital reached the front since the restart
            assert seen and time.mktime(time.strptime(seen, "%Y-%m-%d %H:%M:%S")) >= int(restarted), (site, said)
        else:
            assert state in ("not seen since the server restarted", "offline", "registered"), (site, said)


def test_server_restarts_a_superlink_that_died_under_it(deployed):
    said = deployed["crash"]["superlink killed"]
    lines = [line for line in said.splitlines() if line.startswith("error: the SuperLink exited")]
    assert lines and "restarting the SuperLink" in lines[0] and "--resume" in lines[0], said[-2000:]
    assert "SuperLink restarted" in said and deployed["dep"].procs["server"].poll() is None, said[-2000:]


def test_a_hospital_killed_while_training_is_left_out_then_rejoins(deployed):
    crash = deployed["crash"]
    at_kill = crash["ledger at kill"]
    assert crash["ledger before resume"] is not None, "the resumed run's round 2 never reached site-a"
    assert at_kill == crash["ledger before resume"] + [2], at_kill  # killed after it charged the re-run round 2
    rows = {(r["round"], r["site"]): r for r in csv.DictReader((crash["results"] / "metrics.csv").open())}
    lost = rows[("2", "site-a")]
    assert lost["status"] == "no-reply", lost
    assert "site-a went offline" in crash["resumed"][0], crash["resumed"][0][-3000:]
    assert {rows[("2", s)]["status"] for s in ("site-b", "site-c")} == {"ok"}
    # restarted as systemd would, it trains again in the next round
    back = rows[("3", "site-a")]
    assert back["status"] == "ok" and back["train_loss"] and back["val_auc"], back
    # its privacy ledger: every round charged before it trained, the interrupted ones too, within its budget
    entries = [e for e in crash["ledger"]["entries"] if e["run"] == crash["folder"].name]
    assert [e["round"] for e in entries] == at_kill + [3], entries
    spent = [e["epsilon_after"] for e in crash["ledger"]["entries"]]
    assert spent == sorted(spent) and spent[-1] <= 40.0, spent
    assert float(back["epsilon"]) == spent[-1]


def test_finished_app_processes_leave_no_zombies(deployed):
    assert deployed["zombies"] == {name: [] for name in deployed["zombies"]}, deployed["zombies"]


def test_outsider_can_do_nothing_on_the_public_address(deployed):
    for what, res in deployed["outsider"].items():
        said = res.stdout + res.stderr
        assert "403 Forbidden" in said and '"success": true' not in said, (what, said[-800:])
    for (who, path), resp in deployed["http"].items():
        if who == "hospital certificate" and path == "/aseanfl/door":  # the certificate was presented and is good
            assert resp.status_code == 200 and "admitted CN=site-a" in resp.text, resp.text
            continue
        assert resp.status_code == 403 and resp.text.startswith("aseanfl front: refused"), (who, path, resp.text[:200])
        if who == "hospital certificate":
            assert "only the Fleet API" in resp.text, (path, resp.text)
    assert deployed["loopback list-runs"].status_code == 200  # the refused paths are real ones
    assert not deployed["marker"], "code submitted by an attacker ran on the server"


def test_local_user_cannot_run_unapproved_code_as_the_server(deployed):
    local = deployed["local user"]
    said = local["run"].stdout + local["run"].stderr
    assert "is not approved on this server" in said, said[-2000:]
    runs = json.loads(local["status"].stdout[local["status"].stdout.find("{"):])["runs"]
    assert runs and runs[0]["status"] == "finished:failed", runs
    res = deployed["aseanfl run unapproved"]
    assert res.returncode == 1 and "is not approved on this server" in res.stderr, res.stderr
    assert not deployed["marker"]


def test_only_the_front_listens_beyond_loopback(deployed):
    dep, found = deployed["dep"], deployed["listening"]
    front_host, front_port = dep.address.rsplit(":", 1)
    assert found["server"] == {(front_host, int(front_port)), ("127.0.0.1", dep.local_port)}, found["server"]
    for name in [*APPROVED, UNAPPROVED, "console-server", f"console-{UNAPPROVED}"]:  # daemons and consoles: loopback only
        assert found[name] and {host for host, _ in found[name]} == {"127.0.0.1"}, (name, found[name])


def test_supernode_without_client_certificate_is_refused_at_the_door(deployed):
    said = deployed["no_cert"]
    assert "403 Forbidden" in said and "activate-node" in said, said[-1500:]
    assert "SuperNode ID" not in said  # it never got a node identity


def test_revoked_hospital_is_refused_and_told_why(deployed):
    rev = deployed["revoked"]
    assert rev["provision"].returncode == 0, rev["provision"].stdout + rev["provision"].stderr
    lines = [line for line in rev["log"].splitlines() if "refused at the federation server's door" in line]
    assert lines and "certificate revoked" in lines[-1] and "ask the coordinator" in lines[-1], rev["log"][-2000:]
    assert rev["door"].status_code == 403 and "FAILED:certificate revoked" in rev["door"].text
    # one line from its SuperNode and one from its daemon; no traceback of Flower's heartbeat thread
    assert "Traceback" not in rev["said since"] and "HTTPStatusError" not in rev["said since"], rev["said since"][-3000:]
    assert "Run transitioned" not in rev["said since"], rev["said since"][-3000:]
    row = [line for line in rev["status"].splitlines() if f"{REVOKED} (revoked)" in line]
    assert row and "unregistered" in row[0], rev["status"]


def test_hospital_added_while_running_is_registered(deployed):
    row = [line for line in deployed["added"].splitlines() if "site-e " in line]
    assert row and "registered" in row[0], deployed["added"]


def test_ca_key_stays_off_the_server(tmp_path):
    res = aseanfl("provision", "--federation", "keys", "--sites", "h1", "--out", str(tmp_path / "federation"))
    assert res.returncode == 0, res.stderr
    ca = tmp_path / "federation-ca"
    assert (ca / "ca.key").stat().st_mode & 0o777 == 0o600 and ca.stat().st_mode & 0o777 == 0o700
    private = [p.relative_to(tmp_path).as_posix() for p in (tmp_path / "federation").rglob("*")
               if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert sorted(private) == ["federation/server/server.key", "federation/sites/h1/client.key",
                               "federation/sites/h1/node.key"], private
    # a CA key copied into the server's folder: the server refuses to start, saying why
    (tmp_path / "federation" / "ca").mkdir()
    (tmp_path / "federation" / "ca" / "ca.key").write_bytes((ca / "ca.key").read_bytes())
    res = aseanfl("server", "start", "-f", str(tmp_path / "federation"), timeout=60)
    assert res.returncode == 1 and "CA key is in the server's folder" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_unapproved_app_is_refused_by_the_hospital(deployed):
    rows = _rows(deployed["tmp"] / "results")
    # its error replies carry no site record: the server names it by its registered node id
    refused = [r for r in rows if r["site"] == UNAPPROVED]
    assert [r["status"] for r in refused] == ["error", "error"], refused
    assert not [r for r in rows if r["site"].startswith("node-")], rows
    assert "is not approved by hospital site-d" in deployed["run"].stdout
    # the bundle was never unpacked at site-d (before its steward approved it, after the run)
    assert not deployed["unpacked before approval"]


def test_the_contest_ranks_two_submissions_as_the_central_figures_do(deployed):
    """Two teams' models scored at the hospitals on their held-out test files: the leaderboard
    (terminal and console) ranks them as the AUC computed centrally on the union of the
    hospitals' test cases does, with the same figures (the pooled AUC on the score grid); each
    hospital's figures are its own test cases'; the hospital that has not approved the app
    refuses; an identical model is not scored again; a broken file is refused before anything
    is sent."""
    from medimaging.scoring import GRID, _rank_auc
    from server.evaluation.contest import leaderboard
    from server.operations.provision import load_federation

    c, tmp = deployed["contest"], deployed["tmp"]
    for key in ("evaluate", "federated", "baseline team", "copycat", "leaderboard"):
        assert c[key].returncode == 0, (key, c[key].stdout[-2000:], c[key].stderr[-2000:])
    assert "not scored again" in c["copycat"].stdout and not c["scored again"]
    figures = {}
    for name, model in (("federated", c["model"]), ("baseline", c["baseline"])):
        scores = central(deployed["tmp"] / "hospitals", APPROVED, model)
        p = np.concatenate([scores[s][0] for s in APPROVED])
        y = np.concatenate([scores[s][1] for s in APPROVED]) == 1
        figures[name] = {"exact": _rank_auc(p, y), "grid": _rank_auc(np.floor(np.round(p * (GRID - 1), 10)) / (GRID - 1), y),
                         "sites": scores}
    contest, board = leaderboard(load_federation(deployed["fed"]), CONTEST)
    assert [r["team"] for r in board] == sorted(figures, key=lambda t: -figures[t]["exact"]), (board, figures)
    assert [r["rank"] for r in board] == [1, 2] and "copycat" not in {r["team"] for r in board}
    for r in board:
        f = figures[r["team"]]
        assert r["value"] == pytest.approx(f["grid"], abs=2e-3) and abs(r["value"] - f["exact"]) < 0.01, (r, f)
        assert r["low"] < r["value"] < r["high"] and r["scored"] == 3 and r["asked"] == 4
    assert figures["federated"]["exact"] > 0.65 > figures["baseline"]["exact"] - 0.1  # real models, really apart
    # `aseanfl evaluate -f` on the run's model: each hospital's figures are those of its own test cases
    results = {r["evaluation"]: r for r in (json.loads(p.read_text()) for p in (tmp / "evaluations").glob("run-*/evaluation.json"))}
    result = next(r for name, r in results.items() if name.startswith("eval-"))
    assert result["model_sha256"] == sha256(c["model"])
    # the same model scored twice (`aseanfl evaluate -f`, then the team's submission): the same numbers
    again = results[f"{CONTEST}-{result['model_sha256'][:12]}"]
    assert again["sites"] == result["sites"] and again["pooled"] == result["pooled"]
    for site in APPROVED:
        s, (probs, labels) = result["sites"][site], figures["federated"]["sites"][site]
        assert s["split"] == "test" and s["cases"] == len(labels), s
        if s["auc"]["value"] is not None:
            assert s["auc"]["value"] == pytest.approx(_rank_auc(probs, labels == 1), abs=1e-6)
        else:
            assert "fewer than min_cases" in s["auc"]["withheld"]
    assert "is not approved by hospital site-d" in result["sites"][UNAPPROVED]["error"]
    text = c["leaderboard"].stdout
    assert text.index("federated") < text.index("baseline") and "95 % CI" in text
    assert [row[:2] for row in c["console"]] == [["1", "federated"], ["2", "baseline"]], c["console"]
    assert c["cut"].returncode == 2 and not c["sent for the cut file"], c["cut"].stderr
    assert "not a readable safetensors file, or cut short" in c["cut"].stderr and "Traceback" not in c["cut"].stderr
    assert len(c["cut"].stderr.strip().splitlines()) == 1
    for site in APPROVED:  # each hospital's own log names the models it scored
        assert f"scored model {sha256(c['baseline'])[:12]}" in (tmp / f"{site}.log").read_text(errors="replace")


def test_stats_describes_the_hospitals_data_with_counts_only_and_the_run_checked_their_classes(deployed):
    """`aseanfl stats -f`: each approved hospital's cases per class and split add up to the PNG
    files in its folder (pooled: the union's), the unapproved one refuses, the Data page shows
    the same table; each hospital's audit log holds the statistics reply, which its own audit
    checks against the fixed schema of counts; the training run began with the hospitals'
    class names agreed."""
    res, tmp = deployed["stats"], deployed["tmp"]
    assert res.returncode == 0 and "Traceback" not in res.stderr, (res.stdout[-2000:], res.stderr[-2000:])
    result = json.loads(next((tmp / "statistics").glob("run-*/stats.json")).read_text())
    assert "is not approved by hospital site-d" in result["sites"][UNAPPROVED]["error"], result["sites"][UNAPPROVED]
    files = {site: {c: len(list((tmp / "pacs" / site / c).glob("*.png"))) for c in ("lesion", "normal")} for site in APPROVED}
    for site in APPROVED:
        s = result["sites"][site]
        assert s["classes"] == ["lesion", "normal"] and s["min_count"] == 10  # the kit's floor beats the 5 asked
        for k, c in enumerate(s["classes"]):
            assert sum(v["cases"][split][k]["value"] for v in [s] for split in v["cases"]) == files[site][c], (site, s)
        assert s["modality"]["PNG"]["value"] == sum(files[site].values())
    pooled = result["pooled"]
    for k, c in enumerate(pooled["classes"]):
        assert sum(pooled["cases"][split][k]["value"] for split in pooled["cases"]) == sum(f[c] for f in files.values())
    page = deployed["data page"]
    assert page["pooled|train"] == [str(int(v["value"])) for v in pooled["cases"]["train"]], page
    for site in APPROVED:
        logged = [json.loads(line) for line in (tmp / "hospitals" / site / "audit.jsonl").read_text().splitlines()]
        sent = [e for e in logged if e.get("type") == "query.stats"]
        assert len(sent) == 1 and set(sent[0]["records"]) == {"statistics", "site"}, sent
        assert json.loads(sent[0]["records"]["statistics"]["entries"]["json"])["cases"] == result["sites"][site]["cases"]
        assert any(e.get("type") == "query.classes" for e in logged)  # asked before the run and the evaluation
    assert "classes agreed by" in deployed["run"].stdout, deployed["run"].stdout[-3000:]


def test_unregistered_key_is_refused_even_with_a_valid_certificate(deployed):
    """The front refuses it first (not site-d's registered node key); Flower's node auth stands behind."""
    rogue = deployed["rogue"]
    said = rogue.stdout + rogue.stderr
    assert rogue.returncode == 3 and "not signed with the node key registered for CN=site-d" in said, said[-1500:]


def test_audit_log_covers_every_round_and_holds_nothing_forbidden(deployed):
    hosp = deployed["tmp"] / "hospitals"
    impostor = {int(i) for i in re.findall(r"run (\d+): finished", deployed["impostor"]["run"][0])}
    for site in APPROVED:
        res = aseanfl("client", "audit", "-c", str(hosp / site / "site.yaml"))
        logged = [json.loads(line) for line in (hosp / site / "audit.jsonl").read_text().splitlines()]
        if site == "site-a":  # its own log shows the run its daemon answered as site-b, and only that
            lied = [i + 1 for i, e in enumerate(logged) if e.get("run") in impostor]  # class names, train, evaluate
            problems = [line for line in res.stdout.splitlines() if line.startswith("problem")]
            assert res.returncode == 1 and len(lied) == 3 and problems == [
                f"problem line {n}: site.name is not this hospital's id 'site-a'" for n in lied], res.stdout
        else:
            assert res.returncode == 0, res.stdout
        # the approval given before the run is in the chain, as a local decision, first
        assert logged[0]["event"] == "app approved" and logged[0]["sha256"] == deployed["hash"], logged[0]
        entries = [e for e in logged if "event" not in e]
        first = int(re.search(r"run (\d+): finished", deployed["run"].stdout).group(1))
        assert {(e["round"], e["type"]) for e in entries if e["run"] == first and e["type"] != "query.features"} == \
            {(r, t) for r in ("1", "2") for t in ("train", "evaluate")} | {(f"classes-{first}", "query.classes")}
        assert all(set(e["records"]) <= {"arrays", "metrics", "site"} for e in entries
                   if e["type"] not in ("evaluate.contest", "query.classes", "query.stats", "query.features"))
        released = [e for e in entries if e["type"] == "query.features"]  # the head calibration's sums
        if site == "site-a":  # its refusal is logged, with nothing sent
            assert [e["run"] for e in released] == [first] and released[0]["bytes"] == 0 and \
                "DP-SGD" in released[0]["error"]["reason"] and "feature-sums" not in released[0].get("records", {}), released
        else:
            assert [e["run"] for e in released] == [first] and set(released[0]["records"]) == {"feature-sums", "site"}, released
        named = [e for e in entries if e["type"] == "query.classes"]  # the class names, and nothing else
        assert named and all(set(e["records"]) == {"classes", "site"} for e in named)
        assert all(e["records"]["classes"]["entries"] == {"names": ["lesion", "normal"], "task": "classification"}
                   for e in named), named
        # the contest: only the fixed figures left, each for a named model (`client audit` checked the schema)
        scored = [e for e in entries if e["type"] == "evaluate.contest"]
        assert {e["records"]["scores"]["entries"]["model-sha256"] for e in scored} == \
            {sha256(deployed["contest"]["model"]), sha256(deployed["contest"]["baseline"])}
        assert all(set(e["records"]) == {"scores", "site"} for e in scored) and len(scored) == 3  # evaluate + 2 teams
        # model arrays left packed (one object per record), and the log names every tensor inside
        model = load_file(str(next((deployed["tmp"] / "results").glob("run-*")) / "model.safetensors"))
        for e in (e for e in entries if e["run"] == first and e["type"] == "train"):
            sent = e["records"]["arrays"]["entries"]
            assert set(sent) == set(model) and all(v["packed"] == "safetensors" for v in sent.values()), sent
            assert all(sent[k]["shape"] == list(v.shape) and sent[k]["bytes"] == v.nbytes for k, v in model.items())
        raw = (hosp / site / "audit.jsonl").read_text()
        assert "patient-" not in raw and "pacs" not in raw
    # the refusing hospital logged its error replies, which carry no data
    res = aseanfl("client", "audit", "-c", str(hosp / UNAPPROVED / "site.yaml"))
    assert res.returncode == 0, res.stdout


def test_a_round_with_lora_adapters_sends_only_the_adapters_and_the_head(deployed):
    """The frozen layers reach each hospital once, in its first task of the run, and never come
    back: every hospital's audit log shows its training reply carried exactly the adapters and the
    head; the run's model holds the start file's layers unchanged."""
    from medimaging.config import AdapterConfig, ModelConfig
    from medimaging.finetune import frozen_keys
    from medimaging.models import build_model

    run = deployed["adapters"]["run"]
    assert run.returncode == 0 and "finished:completed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    assert "fine-tuning LoRA adapters (rank 2) and the classifier head" in run.stdout, run.stdout[-3000:]
    card = yaml.safe_load((deployed["adapters"]["folder"] / "config.yaml").read_text())
    assert card["model"]["name"] == "monai" and card["task"]["image_size"] == 32 and card["task"]["bundle"]
    rows = [r for r in csv.DictReader((deployed["adapters"]["folder"] / "metrics.csv").open()) if r["round"] == "1"]
    assert {r["site"] for r in rows if r["status"] == "ok"} == {*APPROVED, UNAPPROVED}, rows
    start, model = load_file(str(deployed["adapters"]["start"])), load_file(str(deployed["adapters"]["folder"] /
                                                                                  "model.safetensors"))
    lora = build_model(ModelConfig(weights="start", adapters=AdapterConfig(rank=2)), 1, 2, 32)
    trainable = set(lora.state_dict()) - frozen_keys(lora)
    assert set(model) == set(lora.state_dict()) and trainable and all(".lora_" in k or k.startswith("final.")
                                                                       for k in trainable)
    assert all(np.array_equal(model[k], start[k.replace(".base_layer", "")]) for k in frozen_keys(lora))
    number = int(re.search(r"run (\d+): finished", run.stdout).group(1))
    for site in APPROVED:
        logged = [json.loads(line) for line in (deployed["tmp"] / "hospitals" / site / "audit.jsonl").read_text().splitlines()]
        trained = [e for e in logged if e.get("run") == number and e.get("type") == "train"]
        assert len(trained) == 1 and set(trained[0]["records"]["arrays"]["entries"]) == trainable, trained
    full = sum(v.nbytes for v in model.values())  # each hospital's training and validation replies together
    assert all(int(r["bytes_from_site"]) < 0.2 * full for r in rows if r["site"] != "global"), rows


def test_audit_detects_an_edited_log(deployed, tmp_path):
    kit = deployed["tmp"] / "hospitals" / "site-b"
    lines = (kit / "audit.jsonl").read_text().splitlines()
    sent = next(i for i, line in enumerate(lines) if json.loads(line).get("type") == "train")  # the first update
    entry = json.loads(lines[sent])
    entry["records"]["metrics"]["entries"]["patient-name"] = "DOE^JANE"  # something that must not leave
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text((kit / "site.yaml").read_text().replace("audit_log: audit.jsonl", f"audit_log: {tmp_path / 'audit.jsonl'}")
                         .replace("approved_apps: approved-apps.yaml", f"approved_apps: {kit / 'approved-apps.yaml'}"))
    (tmp_path / "audit.jsonl").write_text("\n".join([*lines[:sent], json.dumps(entry), *lines[sent + 1:]]) + "\n")
    res = aseanfl("client", "audit", "-c", str(site_yaml))
    assert res.returncode == 1
    assert "hash chain breaks" in res.stdout and "metrics.patient-name is not an allowed key" in res.stdout


def test_run_config_errors_are_named_before_anything_is_sent(tmp_path):
    bad = tmp_path / "federation.yaml"
    bad.write_text("task:\n  num_classes: 1\nstrategy:\n  name: fedsomething\n")
    res = aseanfl("run", "-f", str(tmp_path / "nowhere"), "--config", str(bad), "--set", "server.rounds=0")
    assert res.returncode == 2
    for field in ("task.num_classes", "strategy.name", "server.rounds"):
        assert f"config error: {field}" in res.stderr, res.stderr


def test_public_port_in_use_is_named(tmp_path):
    import socket

    with socket.socket() as taken:  # something else already holds the federation's public port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = aseanfl("provision", "--federation", "busy", "--sites", "h1", "--out", str(tmp_path / "federation"),
                      "--address", f"127.0.0.1:{port}", "--local-port", str(free_port()))
        assert res.returncode == 0, res.stderr
        res = aseanfl("server", "start", "-f", str(tmp_path / "federation"), timeout=120)
    said = res.stdout + res.stderr
    assert res.returncode == 1 and "error: the front exited" in said and "Address already in use" in said, said[-1500:]
    assert "Traceback" not in said
    assert _processes_using(tmp_path) == []  # the SuperLink and the executor went down with it


def test_coordinator_watches_the_run_live_in_the_console_and_downloads_its_folder(deployed):
    w = deployed["watched"]
    # one point per hospital that reported a validation AUC, plus the federation's, per round
    assert w["points"] == sorted(set(w["points"])) and w["points"][-1] == 2 * (len(APPROVED) + 1), w["points"]
    assert len(w["points"]) >= 2 and w["updates"] >= 1 and w["same page"], w  # it grew while watched, no reload
    assert "finished" in w["state"] and "2 of 2 rounds" in w["state"], w["state"]
    assert w["statuses"][UNAPPROVED] == ["error", "error"], w["statuses"]  # the refusing hospital shows, in red
    assert all(w["statuses"][s] == ["ok", "ok"] for s in APPROVED), w["statuses"]
    on_server = (w["folder"] / "metrics.csv").read_bytes()
    downloaded = (next((deployed["tmp"] / "results").glob("run-*")) / "metrics.csv").read_bytes()
    assert w["zipped metrics.csv"] == on_server == downloaded
    assert "completed" in w["runs row"] and "2 / 2" in w["runs row"], w["runs row"]
    assert w["errors"] == [] and deployed["coordinator errors"] == []


def test_steward_approves_the_refused_bundle_in_the_console_and_the_hospital_then_trains(deployed):
    s, sha = deployed["steward"], deployed["hash"]
    first = re.search(r"run (\d+): finished", deployed["run"].stdout).group(1)
    assert sha in s["pending"] and first in s["pending"] and "127.0.0.2" in s["pending"], s["pending"]
    assert "approved" in s["notice"] and s["still pending"] == 0, s["notice"]
    assert "steward (console)" in s["approved"] and "data protection officer" in s["approved"], s["approved"]
    kit = deployed["tmp"] / "hospitals" / UNAPPROVED
    assert sha in (kit / "approved-apps.yaml").read_text()
    events = [json.loads(line) for line in (kit / "audit.jsonl").read_text().splitlines() if '"event"' in line]
    assert [(e["event"], e["sha256"], e["by"]) for e in events] == [("app approved", sha, "steward (console)")], events
    assert "Chain intact" in s["audit"] and "app approved" in s["audit"], s["audit"][:500]
    pngs = len(list((deployed["tmp"] / "pacs" / UNAPPROVED).glob("*/*.png")))
    assert f"{pngs} usable images" in s["data"] and pngs > 100, s["data"][:500]
    assert "connected" in s["daemon"], s["daemon"]
    assert s["errors"] == []
    # the next run (the one the server is killed in) trains at that hospital from round 1
    rows = list(csv.DictReader(deployed["crash"]["rows after crash"].splitlines()))
    there = [r for r in rows if r["site"] == UNAPPROVED and r["round"] == "1"]
    assert there and there[0]["status"] == "ok" and there[0]["val_auc"], rows


def test_coordinator_starts_a_run_from_the_console_and_stops_it(deployed):
    c = deployed["console run"]
    fields = {f for f, _ in c["errors"]}
    assert {"server.rounds", "strategy.name"} <= fields, c["errors"]
    assert any("greater than or equal to 1" in e for f, e in c["errors"] if f == "server.rounds"), c["errors"]
    assert not c["sent when invalid"]
    assert c["after start"].endswith("/runs?started=1") and "name: fedprox" in c["strategy"], c
    assert "stop requested" in c["stop notice"] and not c["busy after stop"], c
    assert "stopped" in c["runs row"], c["runs row"]  # Flower's finished:stopped


def test_coordinator_sees_hospitals_provisioned_added_and_revoked(deployed):
    assert set(deployed["hospitals"]) == {*APPROVED, UNAPPROVED}, deployed["hospitals"]
    assert all(v == "online" for v in deployed["hospitals"].values()), deployed["hospitals"]
    assert "site-e" in deployed["hospitals after adding"], deployed["hospitals after adding"]
    assert deployed["hospitals after revoking"][REVOKED] == "revoked", deployed["hospitals after revoking"]


def test_every_console_page_was_photographed_with_content(deployed):
    from PIL import Image

    names = {p.stem for p in deployed["shots"].glob("*.png")}
    for name in ("coordinator-run", "coordinator-runs", "coordinator-hospitals", "coordinator-start-errors", "coordinator-contests",
                 "coordinator-data",
                 "hospital-data", "hospital-apps-pending", "hospital-apps", "hospital-audit", "hospital-daemon",
                 "hospital-privacy"):
        assert name in names, (name, sorted(names))
        pixels = np.asarray(Image.open(deployed["shots"] / f"{name}.png").convert("L"))
        assert pixels.std() > 10 and pixels.shape[0] >= 400, name  # not a blank page
    print(f"screenshots: {deployed['shots']}")


def test_a_hospital_that_answers_as_another_is_left_out_under_its_own_name(deployed):
    """site-a's daemon declared itself site-b: its reply is named by its node key (site-a),
    left out as rejected:identity; site-b's row is site-b's own reply."""
    imp = deployed["impostor"]
    said, code = imp["run"]
    assert code == 0 and "finished:completed" in said, said[-3000:]
    rows = [r for r in imp["rows"] if r["round"] == "1"]
    assert sorted(r["site"] for r in rows) == sorted([*APPROVED, UNAPPROVED, "global"]), rows  # one row each
    by_site = {r["site"]: r for r in rows}
    a = by_site["site-a"]
    assert a["status"] == "rejected:identity" and not a["train_loss"] and not a["num_train"], a
    assert int(a["bytes_from_site"]) > 0  # it did answer: the reply reached the server
    assert {by_site[s]["status"] for s in ("site-b", "site-c", UNAPPROVED)} == {"ok"}, rows
    assert by_site["global"]["status"].startswith("3 trained"), by_site["global"]
    assert "the reply of site-a (its registered node key) declares itself as site-b" in said, said[-3000:]


def test_a_reply_pushed_in_another_hospitals_name_is_refused_by_the_superlink(deployed):
    """site-a signs a push of a reply to site-b's open task that claims to come from site-b:
    Flower alone would store it (the reply's sender is the task's recipient); aseanfl's
    SuperLink refuses it because the signer is not the sender. site-b's own reply, sent once it
    went on, is the one the round took (a stored forged error reply would have made it 'error')."""
    imp = deployed["impostor"]
    forged = imp["forged"]
    assert forged is not False, "site-b's task never appeared in the SuperLink's database"
    assert forged.status_code == 403 and "claims to come from node" in forged.text, (forged.status_code, forged.text)
    assert "aseanfl: refused: node" in imp["server log"] and "pushed a reply that claims" in imp["server log"]
    rows = {r["site"]: r for r in imp["rows"] if r["round"] == "1"}
    assert rows["site-b"]["status"] == "ok" and rows["site-b"]["train_loss"], rows["site-b"]


def test_an_oversize_body_is_refused_at_the_front_and_the_superlink_never_sees_it(deployed):
    f = deployed["front"]
    for key in ("oversize", "oversize chunked"):
        assert f[key].startswith("HTTP/1.1 413") and "over 6 MiB" in f[key], (key, f[key][:300])
    grew = f["rss after"] - f["rss before"]
    print(f"SuperLink RSS {f['rss before']:.0f} MiB before, {f['rss after']:.0f} MiB after 320 MiB of refused bodies")
    assert grew < 40, (f["rss before"], f["rss after"])
    # the same junk within the cap reaches the SuperLink, which answers it itself: the path is live
    within = f["within the cap"]
    assert within.startswith("HTTP/1.1 4") and not within.startswith("HTTP/1.1 413"), within[:300]
    assert "aseanfl front" not in within, within[:300]
    assert re.search(r'CN=site-e" SUCCESS "POST /v1/fleet/push-object HTTP/1.1" 413 ', f["access log"])


def test_a_certificate_is_admitted_only_with_its_own_hospitals_node_key(deployed):
    f = deployed["front"]
    bad, good = f["site-b's key, member's certificate"], f["site-b's key, site-b's certificate"]
    assert bad.status_code == 403 and "not signed with the node key registered for CN=site-e" in bad.text, bad.text
    assert good.status_code == 200, (good.status_code, good.text[:200])  # the same request with site-b's certificate
    sn = f["supernode"]
    said = sn.stdout + sn.stderr
    assert sn.returncode == 3 and "not signed with the node key registered for CN=site-d" in said, said[-1500:]
    assert "Traceback" not in said and "SuperNode ID" not in said, said[-1500:]


def test_a_flood_from_one_certificate_is_cut_to_its_rate(deployed):
    from server.operations.front import BURST, RATE_PER_S

    f = deployed["front"]
    codes, seconds = f["flood"], f["flood seconds"]
    admitted = codes.count(200)
    assert set(codes) <= {200, 429}, set(codes)
    assert admitted <= BURST + RATE_PER_S * seconds + 2, (admitted, seconds)
    assert codes.count(429) > 0 or seconds > (len(codes) - BURST) / RATE_PER_S, (admitted, seconds)


def test_status_calls_a_hospital_that_went_quiet_silent_before_flower_calls_it_offline(deployed):
    said = deployed["impostor"]["status while paused"]
    rows = {line.split("│")[1].strip(): line for line in said.splitlines() if line.startswith("│ site-")}
    assert "silent (not heard for over 15 s)" in rows["site-b"], said
    assert " online " in rows["site-c"], said  # the others are heard every second


def test_no_hospital_private_key_is_written_on_the_coordinators_side(deployed):
    assert deployed["private keys on the coordinator's side"] == ["federation/server/server.key",
                                                                  "federation-ca/ca.key"], \
        deployed["private keys on the coordinator's side"]
    kit = deployed["fed"] / "sites" / "site-a"
    assert sorted(p.name for p in kit.iterdir()) == ["approved-apps.yaml", "ca.crt", "client.crt", "node.pub",
                                                     "server-address", "site.yaml"]
