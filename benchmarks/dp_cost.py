"""DP-SGD cost per built-in model: training throughput (samples/s) with and without DP, their
ratio, and peak memory. Each measurement runs in its own process so peak RSS is its own.

    python -m benchmarks.dp_cost [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CASES = [("cnn", "none"), ("cnn", "hooks"), ("resnet18", "none"), ("resnet18", "hooks"),
         ("densenet121", "none"), ("densenet121", "hooks"), ("densenet121", "ghost")]


def measure(model_name: str, mode: str, steps: int, batch: int = 32, size: int = 32) -> dict:
    from benchmarks.throughput import train_case
    from medimaging.config import ModelConfig
    from medimaging.datasets import Split
    from medimaging.models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = steps * batch
    data = Split(torch.randn(n, 1, size, size), torch.randint(0, 2, (n,)))
    model = build_model(ModelConfig(name=model_name), 1, 2, size, private=mode != "none")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    train_case(model, data, steps, batch, mode)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"samples_per_s": n / seconds, "peak_mb": peak / 1024, "train_mb": (peak - base) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.steps)))
        return
    results = {}
    for model_name, mode in CASES:
        out = subprocess.run([sys.executable, "-m", "benchmarks.dp_cost", "--steps", str(args.steps), "--one", model_name, mode],
                             capture_output=True, text=True, check=True)
        results[(model_name, mode)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"1 CPU thread, batch 32, 32x32 images, {args.steps} steps")
    print("| model | DP-SGD | samples/s | DP / non-DP throughput | peak RSS MB | added by training MB |")
    print("|---|---|---|---|---|---|")
    for (model_name, mode), r in results.items():
        ratio = r["samples_per_s"] / results[(model_name, "none")]["samples_per_s"]
        print(f"| {model_name} | {mode} | {r['samples_per_s']:.0f} | {ratio:.2f} | {r['peak_mb']:.0f} | {r['train_mb']:.0f} |")


if __name__ == "__main__":
    main()
