"""Privacy-utility on real data: 5 non-IID hospitals (Dirichlet 0.3) share pneumoniamnist;
test AUC after the same rounds at epsilon 1, 3, 8 (DP-SGD at every hospital) and without DP.

    python -m benchmarks.privacy_utility [--data ../shared/data/medmnist/pneumoniamnist.npz]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import PNEUMONIA, final_global
from simulations.config import load_config
from simulations.runner import simulate

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=PNEUMONIA)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"{args.data.name}: 5 hospitals, Dirichlet(0.3), {args.rounds} rounds x 1 local epoch, cnn, "
          "batch 64, delta = 1/(10 n) per hospital")
    print("| epsilon (per hospital) | test AUC | test accuracy | max epsilon spent | seconds |\n|---|---|---|---|---|")
    for epsilon in (1.0, 3.0, 8.0, None):
        with tempfile.TemporaryDirectory() as out:
            overrides = {
                "data.path": str(args.data), "sites": 5, "partition.scheme": "dirichlet", "partition.alpha": 0.3,
                "server.rounds": args.rounds, "train.local_epochs": 1, "train.batch_size": 64,
                "server.output_dir": out,
            }
            if epsilon is not None:
                overrides.update({"privacy.enabled": True, "privacy.target_epsilon": epsilon})
            run_dir = simulate(load_config(None, overrides))
            final = final_global(run_dir)
            seconds = json.loads((run_dir / "summary.json").read_text())["seconds"]
        spent = "-" if final["epsilon"] is None else f"{final['epsilon']:.2f}"
        label = "no DP" if epsilon is None else f"{epsilon:g}"
        print(f"| {label} | {final['test_auc']:.3f} | {final['test_accuracy']:.3f} | {spent} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
