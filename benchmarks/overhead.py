"""Federation overhead: wall time of a simulated run / wall time of the same local training
steps in a plain PyTorch loop (same sites, data, model, epochs; no Flower, no Ray).

    python benchmarks/overhead.py [--rounds 5] [--sites 6]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from benchmarks.common import fresh_model, sites
from medimaging.training import evaluate, train_epochs
from simulations.config import load_config
from simulations.federation import global_test
from simulations.runner import simulate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sites", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, {"sites": args.sites, "server.rounds": args.rounds, "server.output_dir": out})
        t = time.perf_counter()
        run_dir = simulate(cfg)
        fl_total = time.perf_counter() - t
        summary = json.loads((run_dir / "summary.json").read_text())
        fl_rounds, per_round = summary["seconds"], summary["round_seconds"]

    torch.set_num_threads(os.cpu_count() or 1)
    data, tr, test = sites(cfg), cfg.train, global_test(cfg)

    def plain_loop(with_eval: bool) -> float:
        t = time.perf_counter()
        for rnd in range(cfg.server.rounds):
            for site in data:
                model = fresh_model(cfg)
                train_epochs(model, site.train, tr.local_epochs, tr.batch_size, tr.lr, tr.optimizer, rnd)
                if with_eval:
                    evaluate(model, site.val, 2)
            if with_eval:
                evaluate(model, test, 2)
        return time.perf_counter() - t

    train_epochs(fresh_model(cfg), data[0].train, 1, tr.batch_size, tr.lr, tr.optimizer, 0)  # warm-up
    plain, plain_eval = plain_loop(False), plain_loop(True)

    print(f"sites={args.sites} rounds={args.rounds} local_epochs={tr.local_epochs} model={cfg.model.name} cores={os.cpu_count()}")
    print(f"plain PyTorch loop (training steps only):      {plain:7.1f} s")
    print(f"plain loop + the same evaluations per round:   {plain_eval:7.1f} s")
    print(f"simulated federation, rounds only:             {fl_rounds:7.1f} s   ratio {fl_rounds / plain:5.2f}x")
    print(f"simulated federation, incl. Ray start/stop:    {fl_total:7.1f} s   ratio {fl_total / plain:5.2f}x")
    steady = sum(per_round[1:]) / max(len(per_round) - 1, 1)  # round 1 also starts the Ray workers
    print(f"first round (Ray workers start, import, build their data): {per_round[0]:5.1f} s")
    print(f"later rounds, mean:                             {steady:5.1f} s   plain loop per round "
          f"{plain_eval / cfg.server.rounds:5.1f} s   ratio {steady / (plain_eval / cfg.server.rounds):5.2f}x")
    print(f"Flower+Ray share (rounds only vs plain loop with the same evaluations): {fl_rounds / plain_eval:5.2f}x")


if __name__ == "__main__":
    main()
