"""Fine-tuning a pretrained model at 5 hospitals, four ways: from scratch, the whole model, the
classifier head only (model.freeze: [body]) and LoRA adapters with the head (model.adapters);
test AUC after rounds 1, 3 and 10, and the bytes each round moves, 3 seeds.

The pretrained model: smallresnet trained centrally on PneumoniaMNIST images that no hospital
holds (the first --pretrain-images of its training split, a public set of the same modality,
as last year's contest model would be), then given a fresh classifier head, as a model for
another task would get one (model.new_head). The 5 hospitals hold the rest of the training
split (IID), validate on the official validation split's share and are tested on the official
test split. Every mode uses Adam and 1 local epoch a round (lr 1e-3; --adapter-lr sets the head-only
and LoRA modes' own, as adapters are usually trained at a larger rate); LoRA's rank is 2.

Goals (issue 32): LoRA or head-only within 0.01 test AUC of full fine-tuning after round 10, at
no more than 5 % of its bytes per round; fine-tuning from the checkpoint ahead of from-scratch at
round 3.

    python -m benchmarks.transfer [--seeds 42,1,2] [--rounds 10] [--pretrain-images 1000]
        [--pretrain-epochs 10] [--modes scratch,full,head,lora] [--rank 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from benchmarks.common import PNEUMONIA
from medimaging.config import ModelConfig
from medimaging.datasets import Split, load_npz, targets, to_tensor
from medimaging.models import build_model, head_keys
from medimaging.training import evaluate, train_epochs
from server.records.outputs import read_rows
from simulations.config import load_config
from simulations.runner import simulate

MODES = {
    "scratch": {},
    "full": {"model.weights": None},
    "head": {"model.weights": None, "model.freeze": ["body"]},
    "lora": {"model.weights": None, "model.adapters": {"rank": 2}},
}


def pretrain(data: dict, images: int, epochs: int, folder: Path, seed: int) -> tuple[Path, float]:
    """The public model: smallresnet on the first `images` training images, then a new head;
    (its file, the pretrained model's test AUC before its head was replaced)."""
    x, y = to_tensor(data["train_images"][:images], 28), targets(data["train_labels"][:images], 28)
    test = Split(to_tensor(data["test_images"], 28), targets(data["test_labels"], 28))
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="smallresnet"), 1, 2, 28)
    train_epochs(model, Split(x, y), epochs, 32, 1e-3, "adam", seed)
    auc = evaluate(model, test, 2)["auc"]
    fresh = build_model(ModelConfig(name="smallresnet"), 1, 2, 28)  # a new head, as model.new_head starts one
    state = model.state_dict()
    state.update({k: v for k, v in fresh.state_dict().items() if k in head_keys(fresh)})
    path = folder / f"pretrained-{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path, auc


def hospitals_file(data: dict, held_out: int, folder: Path) -> Path:
    """The npz the hospitals share: the training images the pretraining did not see."""
    path = folder / "hospitals.npz"
    np.savez(path, **{**data, "train_images": data["train_images"][held_out:],
                      "train_labels": data["train_labels"][held_out:]})
    return path


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=PNEUMONIA)
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--pretrain-images", type=int, default=1000)
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--modes", default="scratch,full,head,lora")
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--adapter-lr", type=float, default=None, help="head and lora modes' lr (default --lr)")
    args = ap.parse_args()
    seeds, modes = [int(s) for s in args.seeds.split(",")], args.modes.split(",")
    data = load_npz(str(args.data))
    marks = sorted({1, min(3, args.rounds), args.rounds})
    auc = {m: {r: [] for r in marks} for m in modes}
    later, first, seconds, pre_auc = {m: [] for m in modes}, {m: [] for m in modes}, {m: [] for m in modes}, []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        npz = hospitals_file(data, args.pretrain_images, folder)
        for seed in seeds:
            weights, pre = pretrain(data, args.pretrain_images, args.pretrain_epochs, folder, seed)
            pre_auc.append(pre)
            for mode in modes:
                sets = {k: (str(weights) if k == "model.weights" else v) for k, v in MODES[mode].items()}
                if mode == "lora":
                    sets["model.adapters"] = {"rank": args.rank}
                sets["train.lr"] = args.adapter_lr if mode in ("head", "lora") and args.adapter_lr else args.lr
                cfg = load_config(None, {
                    "data.path": str(npz), "sites": args.sites, "server.rounds": args.rounds, "seed": seed,
                    "train.local_epochs": 1, "model.name": "smallresnet", "data.image_size": 28,
                    "server.output_dir": str(folder / "runs"), **sets})
                started = time.perf_counter()
                rows = [r for r in read_rows(simulate(cfg)) if r["site"] == "global" and r["round"] > 0]
                seconds[mode].append(time.perf_counter() - started)
                for r in marks:
                    auc[mode][r].append(rows[r - 1]["test_auc"])
                moved = [r["bytes_to_site"] + r["bytes_from_site"] for r in rows]
                first[mode].append(moved[0])
                later[mode].append(statistics.mean(moved[1:]) if len(moved) > 1 else moved[0])
                print(f"seed {seed} {mode}: test AUC " + ", ".join(f"round {r} {auc[mode][r][-1]:.3f}" for r in marks)
                      + f"; bytes round 1 {moved[0]:,}, later rounds {later[mode][-1]:,.0f}", flush=True)
    full = statistics.mean(later["full"]) if "full" in later and later["full"] else None
    print(f"\nPneumoniaMNIST: pretrained on {args.pretrain_images} training images held out from the hospitals "
          f"({args.pretrain_epochs} epochs; its test AUC before the new head {_spread(pre_auc)}); {args.sites} IID "
          f"hospitals on the other {len(data['train_images']) - args.pretrain_images}; smallresnet, 1 local epoch, "
          f"Adam lr {args.lr:g}" + (f" ({args.adapter_lr:g} for head and lora)" if args.adapter_lr else "")
          + f", LoRA rank {args.rank}; seeds {seeds}; mean ± sd")
    print("| mode | " + " | ".join(f"test AUC round {r}" for r in marks)
          + " | bytes round 1 (all hospitals, both ways) | bytes a later round | of full fine-tuning's | seconds a run |")
    print("|---|" + "---|" * (len(marks) + 4))
    for mode in modes:
        share = f"{100 * statistics.mean(later[mode]) / full:.1f} %" if full else ""
        print(f"| {mode} | " + " | ".join(_spread(auc[mode][r]) for r in marks)
              + f" | {statistics.mean(first[mode]):,.0f} | {statistics.mean(later[mode]):,.0f} | {share} | "
                f"{statistics.mean(seconds[mode]):.0f} |")


if __name__ == "__main__":
    main()
