"""The README's scale-out path: the same simulation joins a running Ray cluster (here a
one-node cluster on 127.0.0.1 that the test starts and stops). The cluster lives in its own
temp dir, so other Ray users on the machine neither see it nor get stopped by this test."""

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from processes import live_processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(marks: list[str]) -> set[int]:
    """Processes whose command line names this cluster (its temp dir or GCS port), with their children."""
    procs = live_processes()
    pids = {pid for pid, (_, cmd) in procs.items() if any(m in cmd for m in marks)}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in pids} - pids
        pids |= children
        grew = bool(children)
    return pids - {os.getpid()}


def _stop_cluster(marks: list[str]) -> None:
    pids = _cluster_pids(marks)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3  # Ray's GCS server may ignore SIGTERM
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        pids = {p for p in pids if Path(f"/proc/{p}").exists()}


def _simulate(out: Path, *sets: str, env: dict) -> subprocess.Popen:
    """`aseanfl simulate` with 2 sites, 1 round, started in the background."""
    args = [sys.executable, "-m", "aseanfl", "simulate", "--sites", "2", "--rounds", "1", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _finished(proc: subprocess.Popen, out: Path) -> None:
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    (run_dir,) = out.iterdir()
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert {r["site"] for r in rows if r["round"] == "1"} == {"nanning", "hanoi", "global"}


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster on 127.0.0.1 that is the machine's "current" cluster for
    processes given its env (RAY_TMPDIR); yields (address, env); stopped and checked after."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray is None:
        pytest.skip("ray CLI not installed next to this Python")
    port = _free_port()
    base = tempfile.mkdtemp(prefix="aseanfl-ray-")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": base}
    marks = [base, f"127.0.0.1:{port}", f":{port} "]
    # 16 CPUs declared (more than this machine has): a run that joined it by mistake would fit
    start = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=16",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={base}/ray"]
    try:
        subprocess.run(start, check=True, capture_output=True, timeout=120, env=env)
        yield f"127.0.0.1:{port}", env
        status = subprocess.run([ray, "status", f"--address=127.0.0.1:{port}"], capture_output=True, text=True,
                                timeout=60, env=env)
        assert "1 node" in status.stdout.lower() or "node_" in status.stdout.lower(), status.stdout
    finally:
        _stop_cluster(marks)
        shutil.rmtree(base, ignore_errors=True)
    assert not _cluster_pids(marks), "the test's Ray cluster left processes behind"


def test_simulation_joins_a_running_ray_cluster(tmp_path, cluster):
    address, env = cluster  # 8 CPUs per site: two Flower actors on the 16-CPU cluster
    _finished(_simulate(tmp_path, f"engine.ray_address={address}", "engine.cpus_per_site=8", env=env), tmp_path)


def test_engine_failure_ends_the_run_with_a_clear_error_not_a_hang(tmp_path, cluster):
    """Sites asking for 8 CPUs each. Not asked to join, the run starts its own Ray instance (this
    machine's CPUs), not the 16-CPU cluster that is this machine's current one (a CI failure once
    came from joining a stranger's cluster); there Flower's actor pool ends up empty, the engine
    dies, and Flower leaves its ServerApp thread waiting: the run must still end, clearly."""
    _, env = cluster
    base = [sys.executable, "-m", "aseanfl", "simulate", "--sites", "2", "--rounds", "1", "--out", str(tmp_path)]
    run = subprocess.run([*base, "--set", "engine.cpus_per_site=8"], capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "error: the simulation engine failed" in run.stderr and "ActorPool is empty" in run.stderr, run.stderr[-2000:]
    assert "partial results in" in run.stderr
    closed = _free_port()  # nothing listens there: a clear config error at once, not Ray's minutes of retries
    run = subprocess.run([*base, "--set", f"engine.ray_address=127.0.0.1:{closed}"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "engine.ray_address: no Ray cluster answers" in run.stderr, run.stderr[-2000:]
