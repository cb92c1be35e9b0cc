"""Federated vs centralized test AUC on real data (pneumoniamnist): same model, same epochs
of data (rounds x local epochs = centralized epochs), same training images, several seeds
(the test split has 624 images: one seed's AUC moves by about 0.005).

    python -m benchmarks.fl_vs_central [--rounds-list 5,10] [--strategies fedavg,fedavgm]
                                       [--seeds 42,1,2] [--scheme iid] [--alpha 0.3] [--model cnn]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from benchmarks.common import centralized, federation_args, final_global
from simulations.config import load_config
from simulations.runner import simulate


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    federation_args(ap)
    ap.add_argument("--rounds-list", default="5,10", help="budgets: rounds (x --local-epochs) = centralized epochs")
    ap.add_argument("--strategies", default="fedavg,fedavgm")
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--scheme", default="iid", choices=["iid", "dirichlet"])
    ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration (--scheme dirichlet)")
    ap.add_argument("--model", default="cnn", help="model.name")
    return ap


def config_for(args: argparse.Namespace, rounds: int, strategy: str, seed: int, out: str):
    """One federated run of the table, as the command line asked for it."""
    return load_config(None, {
        "data.path": str(args.data), "sites": args.sites, "server.rounds": rounds, "seed": seed,
        "train.local_epochs": args.local_epochs, "partition.scheme": args.scheme,
        "partition.alpha": args.alpha, "strategy.name": strategy, "server.output_dir": out,
        "model.name": args.model,
    })


def main() -> None:
    args = parser().parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    scheme = f"Dirichlet({args.alpha:g})" if args.scheme == "dirichlet" else args.scheme
    print(f"{args.data.name}: {args.sites} sites ({scheme}), rounds x {args.local_epochs} local epoch(s) vs "
          f"centralized for as many epochs, model {args.model}, seeds {seeds}; test AUC, mean over seeds (per seed)")
    print("| epochs | setting | test AUC | per seed | centralized - this |\n|---|---|---|---|---|")
    for rounds in (int(r) for r in args.rounds_list.split(",")):
        central: list[float] = []
        rows = []
        for name in args.strategies.split(","):
            aucs = []
            for seed in seeds:
                with tempfile.TemporaryDirectory() as out:
                    cfg = config_for(args, rounds, name, seed, out)
                    aucs.append(final_global(simulate(cfg))["test_auc"])
                if len(central) < len(seeds):  # the same pooled images and start model for every strategy
                    central.append(centralized(cfg, rounds * args.local_epochs)[0]["auc"])
            rows.append((name, aucs))
        c = statistics.mean(central)
        epochs = rounds * args.local_epochs
        print(f"| {epochs} | centralized | {c:.4f} | {' '.join(f'{v:.3f}' for v in central)} | |")
        for name, aucs in rows:
            m = statistics.mean(aucs)
            print(f"| {epochs} | {name}, {rounds} rounds | {m:.4f} | {' '.join(f'{v:.3f}' for v in aucs)} | {c - m:+.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
