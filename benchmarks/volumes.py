"""3D volumes against the published reference: AdrenalMNIST3D (MedMNIST v2, 28^3, its own
train / val / test splits) federated at 5 hospitals, against the same model trained centrally on
the pooled training volumes, 3 seeds. The test AUC is read at the round (epoch) with the best
validation AUC, as MedMNIST v2 selects its models; beside it the round with the lowest validation
loss (the federation's is the pooled loss, where its AUC is a mean of five AUCs on about 20
volumes each) and the last round.

Reference: MedMNIST v2 (Yang et al., Scientific Data 2023), AdrenalMNIST3D, ResNet-18 + 3D:
test AUC 0.827 (ResNet-18 + ACS 0.839, ResNet-50 + 3D 0.828). resnet18 in 3D is 33.2 M parameters;
smallresnet 0.9 M (2.7 %).

    python -m benchmarks.volumes [--seeds 42,1,2] [--rounds 10] [--scheme iid] [--model smallresnet]
        [--batch-size 8] [--strategy fedavg] [--lr-schedule constant]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import best_index, centralized_history, fresh_model, selected
from simulations.config import load_config
from simulations.runner import simulate

ADRENAL = Path(__file__).resolve().parents[1] / "tests" / "data" / "adrenalmnist3d.npz"
REFERENCE = 0.827


def _spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ADRENAL)
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--scheme", default="iid", choices=["iid", "dirichlet"])
    ap.add_argument("--model", default="smallresnet")
    ap.add_argument("--batch-size", type=int, default=8)  # ~238 volumes a hospital: 30 steps a round at 8, 8 at 32
    ap.add_argument("--strategy", default="fedavg")
    ap.add_argument("--lr-schedule", default="constant", choices=["constant", "step", "cosine"])
    ap.add_argument("--no-central", action="store_true")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    fed_sel, fed_loss, fed_last, cen_sel, cen_loss, cen_last, round_s, params = [], [], [], [], [], [], [], 0
    for seed in seeds:
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(None, {
                "data.path": str(args.data), "sites": args.sites, "server.rounds": args.rounds, "seed": seed,
                "train.local_epochs": 1, "partition.scheme": args.scheme, "model.name": args.model,
                "train.augment.flip": True, "server.output_dir": out, "train.batch_size": args.batch_size,
                "strategy.name": args.strategy, "train.lr_schedule": args.lr_schedule,
            })
            run_dir = simulate(cfg)
            sel, last, rnd = selected(run_dir)
            by_loss, _, loss_rnd = selected(run_dir, by="loss")
            summary = json.loads((run_dir / "summary.json").read_text())
        params = sum(p.numel() for p in fresh_model(cfg).parameters())
        fed_sel.append(sel)
        fed_loss.append(by_loss)
        fed_last.append(last)
        round_s += summary["round_seconds"][1:]  # round 1 also starts the hospitals' processes
        line = f"seed {seed}: federated {sel:.3f} (round {rnd}), by loss {by_loss:.3f} (round {loss_rnd}), last {last:.3f}"
        if not args.no_central:
            hist = centralized_history(cfg, args.rounds)
            e_auc, e_loss = best_index(hist), best_index(hist, by="loss")
            cen_sel.append(hist[e_auc]["test_auc"])
            cen_loss.append(hist[e_loss]["test_auc"])
            cen_last.append(hist[-1]["test_auc"])
            line += (f"; centralized {cen_sel[-1]:.3f} (epoch {e_auc + 1}), by loss {cen_loss[-1]:.3f} "
                     f"(epoch {e_loss + 1}), last {cen_last[-1]:.3f}")
        print(line, flush=True)
    print(f"\n{args.data.name}: {args.sites} hospitals ({args.scheme}), {args.strategy}, {args.rounds} rounds x 1 local "
          f"epoch, batch {args.batch_size}, {args.model} ({params / 1e6:.2f} M parameters), flips on each axis; seeds "
          f"{seeds}; lr schedule {args.lr_schedule}; mean ± sd")
    print("| setting | test AUC (best validation AUC round) | (lowest validation loss round) | (last round) "
          "| seconds a round |\n|---|---|---|---|---|")
    print(f"| federated | {_spread(fed_sel)} | {_spread(fed_loss)} | {_spread(fed_last)} | {statistics.mean(round_s):.0f} |")
    if cen_sel:
        print(f"| centralized | {_spread(cen_sel)} | {_spread(cen_loss)} | {_spread(cen_last)} | |")
    print(f"| MedMNIST v2 ResNet-18 + 3D | {REFERENCE} | | | |")


if __name__ == "__main__":
    main()
