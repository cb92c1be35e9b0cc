"""Cost of SecAgg+: the same federation with and without it, in one run of this script.
Prints steady-state round time (rounds after the first, which starts Ray), bytes each way
per hospital and round, and the final test AUC of both.

    python -m benchmarks.secagg_cost [--rounds 4] [--sites 6]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile

from simulations.config import load_config
from simulations.runner import simulate


def _measure(out: str, sites: int, rounds: int, secure: bool) -> dict:
    sets = {"sites": sites, "server.rounds": rounds, "server.output_dir": out}
    if secure:
        sets["strategy.secure_aggregation.num_shares"] = 1.0
    run_dir = simulate(load_config(None, sets))
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["site"] not in ("global",) and r["round"] != "0"]
    return {
        "round_s": statistics.median(summary["round_seconds"][1:]),
        "up": statistics.mean(int(r["bytes_from_site"]) for r in rows),
        "down": statistics.mean(int(r["bytes_to_site"]) for r in rows),
        "auc": summary["final"]["test_auc"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--sites", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        plain = _measure(out, args.sites, args.rounds, secure=False)
        secure = _measure(out, args.sites, args.rounds, secure=True)
    print(f"{args.sites} hospitals, {args.rounds} rounds (steady-state rounds: median of rounds 2..{args.rounds})")
    print(f"{'':10} {'round s':>8} {'KB up':>8} {'KB down':>8} {'test AUC':>9}")
    for name, m in (("FedAvg", plain), ("SecAgg+", secure)):
        print(f"{name:10} {m['round_s']:8.2f} {m['up'] / 1e3:8.1f} {m['down'] / 1e3:8.1f} {m['auc']:9.3f}")
    print(f"ratio SecAgg+/FedAvg: round time {secure['round_s'] / plain['round_s']:.2f}x, "
          f"upload {secure['up'] / plain['up']:.2f}x")


if __name__ == "__main__":
    main()
