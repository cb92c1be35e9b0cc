"""The README's scale-out path: the same simulation joins a running Ray cluster (here a
one-node cluster on 127.0.0.1 that the test starts and stops)."""

import csv
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_simulation_joins_a_running_ray_cluster(tmp_path):
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray is None:
        pytest.skip("ray CLI not installed next to this Python")
    port = _free_port()
    start = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats"]
    subprocess.run(start, check=True, capture_output=True, timeout=120)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "aseanfl", "simulate", "--sites", "2", "--rounds", "1", "--out", str(tmp_path / "out"),
             "--set", f"engine.ray_address=127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=300,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        status = subprocess.run([ray, "status", f"--address=127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
        assert "1 node" in status.stdout.lower() or "node_" in status.stdout.lower(), status.stdout
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)
    (run_dir,) = (tmp_path / "out").iterdir()
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert {r["site"] for r in rows if r["round"] == "1"} == {"nanning", "hanoi", "global"}
