"""Compressed updates on real data: 5 hospitals share pneumoniamnist (IID and Dirichlet 0.3),
the same start model per seed; each codec against uncompressed: upload bytes per hospital and
round as a share of fp32 (measured: metrics.csv's bytes_from_site, what the server received),
and the final test AUC (mean over seeds, and its difference from uncompressed on the same seeds).
With --segmentation, the same on the synthetic 3D segmentation task (test Dice).
Also the seconds a round's upload takes per hospital on a 2 Mbit/s uplink. With --downlink the
server's model goes down in the same codec (strategy.compression.downlink): the download per
hospital and round from round 2 on (round 1 is the first contact: the full model).

    python -m benchmarks.compression [--rounds 10] [--seeds 3] [--codecs none,fp16,int8,int4] [--segmentation]
                                     [--downlink]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import PNEUMONIA
from server.records.outputs import read_rows
from simulations.config import load_config
from simulations.runner import simulate

UPLINK_BPS = 2_000_000  # a provincial hospital's uplink, bits per second


def _run(overrides: dict) -> tuple[float, float, float, float]:
    """(final test score, mean upload and download bytes per hospital and round, fp32 bytes of one
    update)."""
    with tempfile.TemporaryDirectory() as out:
        run_dir = simulate(load_config(None, {**overrides, "server.output_dir": out}))
        rows = read_rows(run_dir)
        from safetensors.numpy import load_file

        fp32 = sum(v.nbytes for v in load_file(str(run_dir / "model.safetensors")).values())
    final = [r for r in rows if r["site"] == "global"][-1]
    score = final.get("test_dice") if final.get("test_dice") is not None else final["test_auc"]
    up = [r["bytes_from_site"] for r in rows if r["site"] != "global" and r["status"] == "ok" and r["bytes_from_site"]]
    down = [r["bytes_to_site"] for r in rows if r["site"] != "global" and r["status"] == "ok" and r["round"] > 1]
    return float(score), statistics.mean(up), statistics.mean(down), fp32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=PNEUMONIA)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--codecs", default="none,fp16,int8,int4")
    ap.add_argument("--segmentation", action="store_true", help="the synthetic 3D segmentation task instead")
    ap.add_argument("--downlink", action="store_true", help="the server's model goes down in the same codec too")
    args = ap.parse_args()
    codecs = args.codecs.split(",")
    if args.segmentation:
        base = {"data.synthetic.task": "segmentation", "data.synthetic.spatial_dims": 3, "model.name": "unet",
                "train.lr": 0.01, "data.synthetic.samples_per_site": 40, "data.synthetic.test_per_site": 20,
                "train.batch_size": 8, "sites": 3, "server.rounds": args.rounds}  # as tests/test_segmentation.py
        setups = {"3D segmentation": base}
        metric = "Dice"
    else:
        base = {"data.path": str(args.data), "sites": 5, "server.rounds": args.rounds, "train.local_epochs": 1,
                "train.batch_size": 64}
        setups = {"IID": {**base, "partition.scheme": "iid"},
                  "Dirichlet(0.3)": {**base, "partition.scheme": "dirichlet", "partition.alpha": 0.3}}
        metric = "AUC"
    print(f"{'synthetic 3D segmentation' if args.segmentation else args.data.name}: {args.rounds} rounds, "
          f"seeds 1..{args.seeds}, error feedback on, block 256")
    down_cols = " download / round / hospital (rounds 2+) | share of fp32 |" if args.downlink else ""
    print(f"| partition | codec | upload / round / hospital | share of fp32 | s at 2 Mbit/s |{down_cols} test {metric} "
          f"(mean) | vs none (mean of paired differences) |\n|" + "---|" * (9 if args.downlink else 7))
    for label, overrides in setups.items():
        scores: dict[str, list[float]] = {}
        for codec in codecs:
            ups, downs, fp32 = [], [], 0.0
            for seed in range(1, args.seeds + 1):
                sets = {**overrides, "seed": seed, "strategy.compression.codec": codec}
                if args.downlink:
                    sets["strategy.compression.downlink"] = codec
                score, up, down, fp32 = _run(sets)
                scores.setdefault(codec, []).append(score)
                ups.append(up)
                downs.append(down)
            up, down = statistics.mean(ups), statistics.mean(downs)
            down_cells = f" {down / 1e3:,.1f} kB | {down / fp32:.1%} |" if args.downlink else ""
            diff = "-" if codec == "none" or "none" not in scores else \
                f"{statistics.mean(a - b for a, b in zip(scores[codec], scores['none'], strict=True)):+.4f}"
            print(f"| {label} | {codec} | {up / 1e3:,.1f} kB | {up / fp32:.1%} | {8 * up / UPLINK_BPS:.2f} |{down_cells} "
                  f"{statistics.mean(scores[codec]):.4f} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
