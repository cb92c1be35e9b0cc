"""How many SuperNodes one SuperLink holds, measured on loopback with light SuperNodes: a real
`flower-superlink` (its SQLite state on disk, as a deployment runs it) and N real
`flower-supernode` processes that register and then poll for work and send heartbeats as a
waiting hospital's daemon does (process isolation, no app running: the idle load every
connected hospital puts on the server between and during rounds). Per N: seconds until all are
registered and online, the SuperLink's CPU share and memory while they wait (60 s), and each
SuperNode's memory. TLS and node authentication are left out here (each adds a handshake per
connection and a signature check per request; the deployment benchmark has them).
Linux only (/proc).

    python -m benchmarks.superlink [--nodes 10,25,50] [--idle 60]
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _online(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM node WHERE status = 'online'").fetchone()[0]
    except sqlite3.Error:
        return 0


def measure(nodes: int, idle: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        db, fleet = Path(tmp) / "state.db", _free_port()  # one port: Fleet, Control and Runtime APIs (Flower 1.41-1.42)
        env = {**os.environ, "FLWR_HOME": tmp, "FLWR_TELEMETRY_ENABLED": "0"}
        link = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--database", str(db), "--isolation", "process",
             "--host", "127.0.0.1", "--port", str(fleet)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        supernodes: list[subprocess.Popen] = []
        try:
            time.sleep(3)
            start = time.monotonic()
            for _ in range(nodes):
                supernodes.append(subprocess.Popen(
                    [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fleet}",
                     "--isolation", "process", "--port", str(_free_port())],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            while _online(db) < nodes:
                if time.monotonic() - start > 600 or link.poll() is not None:
                    raise SystemExit(f"{nodes} SuperNodes: only {_online(db)} online after "
                                     f"{time.monotonic() - start:.0f} s")
                time.sleep(0.5)
            joined = time.monotonic() - start
            time.sleep(5)  # let the SuperNodes' start-up settle before the idle window
            cpu0, t0 = _cpu_seconds(link.pid), time.monotonic()
            time.sleep(idle)
            cpu = (_cpu_seconds(link.pid) - cpu0) / (time.monotonic() - t0)
            still = _online(db)
            node_rss = sorted(_rss(p.pid) for p in supernodes)
            return {"nodes": nodes, "joined_s": joined, "online_after": still, "link_cpu": cpu,
                    "link_rss_mb": _rss(link.pid) / 2**20, "node_rss_mb": node_rss[len(node_rss) // 2] / 2**20}
        finally:
            for p in supernodes + [link]:
                p.terminate()
            for p in supernodes + [link]:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="10,25,50")
    ap.add_argument("--idle", type=float, default=60.0)
    args = ap.parse_args()
    print(f"cores={os.cpu_count()}")
    print("| SuperNodes | all online after (s) | online at the end | SuperLink CPU while they wait (share of a core) | "
          "SuperLink RSS (MiB) | SuperNode RSS, median (MiB) |")
    print("|---|---|---|---|---|---|")
    for n in (int(v) for v in args.nodes.split(",")):
        m = measure(n, args.idle)
        print(f"| {n} | {m['joined_s']:.0f} | {m['online_after']} | {m['link_cpu']:.3f} | {m['link_rss_mb']:.0f} | "
              f"{m['node_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
