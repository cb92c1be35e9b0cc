"""Federations of 10, 100 and 1000 simulated hospitals, all asked each round or a sampled share
(strategy.fraction_train = fraction_evaluate): wall time per round, the server's aggregation
time per round (decode, screen and aggregate the updates: summary.json's aggregate_seconds), the
peak memory of the whole process tree (the `aseanfl simulate` driver plus Ray's processes and
workers, sampled every 0.5 s from /proc: the sum of RSS, which counts shared pages once per
process, and of PSS, which splits them), and the bytes per round both ways.

Each configuration is a fresh `aseanfl simulate` process on pneumoniamnist (IID; at 1000 sites a
hospital holds 4-5 of its 4708 training images: this measures the framework, not learning).
Linux only (/proc).

    python -m benchmarks.scale [--only 1000x0.1] [--data ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import PNEUMONIA
from server.records.outputs import read_rows

# (sites, fraction, rounds): the two goals are 1000 x 0.1 x 5 and 100 x 1.0 x 10
RUNS = [(10, 1.0, 5), (10, 0.1, 5), (100, 1.0, 10), (100, 0.1, 5), (1000, 1.0, 2), (1000, 0.1, 5)]


def _tree(root: int) -> list[int]:
    """root and all its descendants, from /proc/<pid>/stat's parent ids."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parents.get(pid, [])
    return out


def _memory(pids: list[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes over `pids`."""
    rss = pss = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


class Peak(threading.Thread):
    """Samples the process tree under `pid` until stopped; keeps the peaks."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.done = pid, every, threading.Event()
        self.rss = self.pss = self.driver = self.processes = 0

    def run(self) -> None:
        while not self.done.wait(self.every):
            pids = _tree(self.pid)
            rss, pss = _memory(pids)
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self.driver = max(self.driver, _memory([self.pid])[0])
            self.processes = max(self.processes, len(pids))


def measure(data: Path, sites: int, fraction: float, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "aseanfl", "simulate", "--sites", str(sites), "--rounds", str(rounds),
               "--data", str(data), "--set", f"server.output_dir={out}", "--set", f"strategy.fraction_train={fraction}",
               "--set", f"strategy.fraction_evaluate={fraction}", "--set", "train.local_epochs=1"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = Peak(proc.pid)
        peak.start()
        _, err = proc.communicate()
        wall = time.perf_counter() - start
        peak.done.set()
        peak.join()
        if proc.returncode:
            raise SystemExit(f"{sites} sites x {fraction}: aseanfl simulate failed: {err.strip()[-800:]}")
        run_dir = next(Path(out).iterdir())
        summary = json.loads((run_dir / "summary.json").read_text())
        rows = [r for r in read_rows(run_dir) if r["site"] == "global" and r["round"]]
        asked = [r for r in read_rows(run_dir) if r["site"] != "global" and r["status"] == "ok"]
    later = summary["round_seconds"][1:] or summary["round_seconds"]  # round 1 also starts Ray's workers
    return {
        "sites": sites, "fraction": fraction, "rounds": rounds, "wall_s": wall,
        "round_s": statistics.mean(later), "first_round_s": summary["round_seconds"][0],
        "aggregate_ms": 1000 * statistics.mean(summary["aggregate_seconds"].values()),
        "trained_per_round": len(asked) / rounds,
        "mb_per_round": statistics.mean(r["bytes_to_site"] + r["bytes_from_site"] for r in rows) / 1e6,
        "rss_gb": peak.rss / 2**30, "pss_gb": peak.pss / 2**30, "driver_gb": peak.driver / 2**30,
        "processes": peak.processes, "final_test_auc": rows[-1]["test_auc"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=PNEUMONIA)
    ap.add_argument("--only", help="one configuration, SITESxFRACTION, e.g. 1000x0.1")
    args = ap.parse_args()
    runs = [r for r in RUNS if not args.only or f"{r[0]}x{r[1]:g}" == args.only]
    print(f"cores={os.cpu_count()} data={args.data.name}")
    print("| sites | sampled | rounds | trained/round | wall (s) | s/round (after 1st) | 1st round (s) | "
          "aggregation (ms/round) | MB/round | peak RSS tree (GiB) | peak PSS tree (GiB) | driver RSS (GiB) | "
          "processes | final test AUC |")
    print("|" + "---|" * 14)
    for sites, fraction, rounds in runs:
        m = measure(args.data, sites, fraction, rounds)
        print(f"| {sites} | {fraction:.0%} | {rounds} | {m['trained_per_round']:.0f} | {m['wall_s']:.0f} | "
              f"{m['round_s']:.1f} | {m['first_round_s']:.1f} | {m['aggregate_ms']:.1f} | {m['mb_per_round']:.1f} | "
              f"{m['rss_gb']:.2f} | {m['pss_gb']:.2f} | {m['driver_gb']:.2f} | {m['processes']} | "
              f"{m['final_test_auc']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
