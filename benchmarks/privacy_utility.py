"""Privacy-utility on real data: 5 non-IID hospitals (Dirichlet 0.3) share pneumoniamnist; test
AUC after the same rounds with DP-SGD at every hospital (epsilon per hospital, the ledger's 'auto'
accountant: the tightest of RDP, PRV and PLD) and without DP, over several seeds; the noise each
accountant would have needed for the same plan is printed beside it.

    python -m benchmarks.privacy_utility [--epsilons 8] [--seeds 42,1,2] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import PNEUMONIA, selected
from client.training.accounting import noise_for
from simulations.config import load_config
from simulations.federation import site_counts
from simulations.runner import simulate


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=PNEUMONIA)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--epsilons", default="8")
    ap.add_argument("--seeds", default="42,1,2")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.data.name}: 5 hospitals, Dirichlet(0.3), {args.rounds} rounds x 1 local epoch, cnn, batch 64, "
          f"delta = 1/(10 n) per hospital; seeds {seeds}; test AUC at the best federated validation round "
          "(and the last), mean ± sd")
    print("| epsilon (per hospital) | test AUC (best val round) | test AUC (last round) | max epsilon spent | "
          "noise auto / rdp / prv / pld (largest hospital) | seconds |\n|---|---|---|---|---|---|")
    for epsilon in [float(e) for e in args.epsilons.split(",")] + [None]:
        best, last, spent, seconds, noise = [], [], [], [], "-"
        for seed in seeds:
            with tempfile.TemporaryDirectory() as out:
                overrides = {
                    "data.path": str(args.data), "sites": 5, "partition.scheme": "dirichlet", "partition.alpha": 0.3,
                    "server.rounds": args.rounds, "train.local_epochs": 1, "train.batch_size": 64, "seed": seed,
                    "server.output_dir": out,
                }
                if epsilon is not None:
                    overrides.update({"privacy.enabled": True, "privacy.target_epsilon": epsilon})
                cfg = load_config(None, overrides)
                run_dir = simulate(cfg)
                sel, fin, _ = selected(run_dir)
                rows = json.loads((run_dir / "summary.json").read_text())
                best.append(sel)
                last.append(fin)
                seconds.append(rows["seconds"])
                eps = [r["epsilon"] for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").open())
                       if r.get("epsilon") is not None]
                spent.append(max(eps) if eps else 0.0)
            if epsilon is not None and seed == seeds[0]:
                n = max(c.n_train for c in site_counts(cfg))
                batches = -(-n // 64)
                noise = " / ".join(f"{noise_for(epsilon, 1 / (10 * n), 1 / batches, batches * args.rounds, a):.3f}"
                                   for a in ("auto", "rdp", "prv", "pld"))
        label = "no DP" if epsilon is None else f"{epsilon:g}"
        spent_text = "-" if epsilon is None else f"{max(spent):.2f}"
        print(f"| {label} | {_spread(best)} | {_spread(last)} | {spent_text} | {noise} | "
              f"{statistics.mean(seconds):.0f} |", flush=True)


if __name__ == "__main__":
    main()
