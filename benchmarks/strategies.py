"""Each aggregation strategy on pneumoniamnist, IID and Dirichlet(0.3) hospitals, vs
centralized training of the same model for the same epochs (rounds x local epochs).

    python -m benchmarks.strategies [--sites 5] [--rounds 5] [--only fedavg,fedadam]
"""

from __future__ import annotations

import argparse
import tempfile

from benchmarks.common import centralized, federation_args, final_global
from simulations.config import load_config
from simulations.runner import simulate
from strategies.config import STRATEGIES

def main() -> None:
    ap = argparse.ArgumentParser()
    federation_args(ap)
    ap.add_argument("--only", default=",".join(STRATEGIES))
    args = ap.parse_args()
    names = args.only.split(",")
    epochs = args.rounds * args.local_epochs
    print(f"{args.data.name}: {args.sites} hospitals, {args.rounds} rounds x {args.local_epochs} local epoch(s), "
          f"cnn; centralized: {epochs} epochs on the pooled training splits; cells: test AUC")
    results: dict[str, dict[str, float]] = {}
    central = None
    for scheme in ("iid", "dirichlet"):
        for name in names:
            with tempfile.TemporaryDirectory() as out:
                cfg = load_config(None, {
                    "data.path": str(args.data), "sites": args.sites, "server.rounds": args.rounds,
                    "train.local_epochs": args.local_epochs, "partition.scheme": scheme, "partition.alpha": 0.3,
                    "strategy.name": name, "strategy.num_malicious": 0 if name == "bulyan" else 1,
                    "server.output_dir": out,
                    # SCAFFOLD corrects plain SGD steps (RunConfig refuses Adam), at the personalization benchmark's lr
                    **({"train.optimizer": "sgd", "train.lr": 0.01} if name == "scaffold" else {}),
                })
                results.setdefault(name, {})[scheme] = final_global(simulate(cfg))["test_auc"]
            print(f"  {name:14} {scheme:9} {results[name][scheme]:.4f}", flush=True)
            if central is None:
                central = centralized(cfg, epochs)[0]["auc"]
    print("\n| strategy | IID | Dirichlet(0.3) |\n|---|---|---|")
    for name in names:
        print(f"| {name} | {results[name]['iid']:.3f} | {results[name]['dirichlet']:.3f} |")
    print(f"| centralized | {central:.3f} | |")
    best = max((v, f"{n} {s}") for n, r in results.items() for s, v in r.items())
    print(f"best federated: {best[1]} {best[0]:.3f}, centralized - best = {central - best[0]:+.3f}")


if __name__ == "__main__":
    main()
