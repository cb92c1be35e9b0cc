"""Federated vs centralized test AUC on real data (pneumoniamnist): same model, same epochs
of data (rounds x local epochs = centralized epochs), same training images.

    python benchmarks/fl_vs_central.py [--data ../shared/data/medmnist/pneumoniamnist.npz]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from benchmarks.common import centralized, federation_args, final_global
from simulations.config import load_config
from simulations.runner import simulate

def main() -> None:
    ap = argparse.ArgumentParser()
    federation_args(ap)
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
            final = final_global(run_dir)
            seconds = json.loads((run_dir / "summary.json").read_text())["seconds"]
        label = "FedAvg, IID" if scheme == "iid" else "FedAvg, Dirichlet(0.3)"
        print(f"| {label} | {final['test_auc']:.3f} | {final['test_accuracy']:.3f} | {seconds:.0f} |")
        if scheme == "iid":
            scores, secs = centralized(cfg, epochs)
            print(f"| centralized (pooled site training splits) | {scores['auc']:.3f} | {scores['accuracy']:.3f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
