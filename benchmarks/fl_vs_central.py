"""Federated vs centralized test AUC on real data (pneumoniamnist): same model, same epochs
of data (rounds x local epochs = centralized epochs), same training images.

    python benchmarks/fl_vs_central.py [--data ../shared/data/medmnist/pneumoniamnist.npz]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import centralized
from simulations.config import load_config
from simulations.runner import simulate

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)
    args = ap.parse_args()
    epochs = args.rounds * args.local_epochs
    print(f"{args.data.name}: {args.sites} sites, {args.rounds} rounds x {args.local_epochs} local epoch(s) "
          f"vs centralized {epochs} epochs, model cnn")
    print("| setting | test AUC | test accuracy | seconds |\n|---|---|---|---|")
    for scheme in ("iid", "dirichlet"):
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(None, {
                "data.path": str(args.data), "sites": args.sites, "server.rounds": args.rounds,
                "train.local_epochs": args.local_epochs, "partition.scheme": scheme, "partition.alpha": 0.3,
                "server.output_dir": out,
            })
            run_dir = simulate(cfg)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            final = [r for r in rows if r["site"] == "global"][-1]
            seconds = json.loads((run_dir / "summary.json").read_text())["seconds"]
        label = "FedAvg, IID" if scheme == "iid" else "FedAvg, Dirichlet(0.3)"
        print(f"| {label} | {final['test_auc']:.3f} | {final['test_accuracy']:.3f} | {seconds:.0f} |")
        if scheme == "iid":
            scores, secs = centralized(cfg, epochs)
            print(f"| centralized (pooled site training splits) | {scores['auc']:.3f} | {scores['accuracy']:.3f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
