"""Training throughput on the hardware a hospital has: samples/s per built-in model, on the CPU
with 1 thread and with every core, and on the GPU where there is one; without DP and with
DP-SGD (Opacus hooks). Each case runs in its own process, so its thread count and memory are
its own. The device and thread settings are the ones a hospital's site.yaml `compute` gives
(medimaging/compute.py); batches go to the device as in training. A second table: mixed
precision (compute.precision: bf16, and fp16 on a GPU) against fp32, plain and DP-SGD.

    python -m benchmarks.hardware [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

MODELS = [("cnn", 2, 64), ("resnet18", 2, 64), ("densenet121", 2, 64), ("unet", 3, 32)]


def measure(model_name: str, dims: int, size: int, device: str, threads: int, dp: bool, steps: int,
            batch: int = 16, precision: str = "fp32") -> dict:
    from benchmarks.throughput import train_case
    from medimaging.compute import precision_dtype, resolve_device
    from medimaging.config import ModelConfig
    from medimaging.datasets import Split
    from medimaging.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n = steps * batch
    shape = (n, 1) + (size,) * dims
    y = torch.randint(0, 2, (n,) + (size,) * dims) if model_name == "unet" else torch.randint(0, 2, (n,))
    data = Split(torch.randn(shape), y)
    model = build_model(ModelConfig(name=model_name), 1, 2, size, private=dp, spatial_dims=dims).to(resolve_device(device))
    start = time.perf_counter()
    train_case(model, data, steps, batch, "hooks" if dp else "none", precision_dtype(precision))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"samples_per_s": n / (time.perf_counter() - start)}


def main() -> None:
    from medimaging.compute import cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--one", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        name, dims, size, device, threads, dp, precision = args.one
        print(json.dumps(measure(name, int(dims), int(size), device, int(threads), dp == "dp", args.steps,
                                 precision=precision)))
        return
    settings = [("cpu", 1), ("cpu", cores())] + ([("cuda", 1)] if torch.cuda.is_available() else [])
    where = f"{cores()} CPU cores" + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU")
    print(f"{where}; batch 16, {args.steps} steps, fp32; samples/s (DP-SGD with Opacus hooks)")
    print("| model | input | " + " | ".join(f"{d} {t} thread{'s' * (t > 1)}" if d == "cpu" else d for d, t in settings)
          + " | DP-SGD: " + " | DP-SGD: ".join(f"{d} {t}" if d == "cpu" else d for d, t in settings) + " |")
    print("|---|---|" + "---|" * (2 * len(settings)))
    for name, dims, size in MODELS:
        cells = [_cell(args.steps, name, dims, size, device, threads, dp, "fp32")
                 for dp in ("plain", "dp") for device, threads in settings]
        print(f"| {name} | {dims}D {size}px | " + " | ".join(cells) + " |")
    mixed = [("cpu", cores(), "bf16")] + ([("cuda", 1, "bf16"), ("cuda", 1, "fp16")] if torch.cuda.is_available() else [])
    print("\nMixed precision (autocast), samples/s; fp32 of the same device in the table above; DP-SGD: fp16 is refused")
    print("| model | " + " | ".join(f"{d} {p}" for d, _, p in mixed) + " | DP-SGD: "
          + " | DP-SGD: ".join(f"{d} {p}" for d, _, p in mixed if p != "fp16") + " |")
    print("|---|" + "---|" * (len(mixed) + sum(p != "fp16" for _, _, p in mixed)))
    for name, dims, size in MODELS:
        cells = [_cell(args.steps, name, dims, size, d, t, "plain", p) for d, t, p in mixed]
        cells += [_cell(args.steps, name, dims, size, d, t, "dp", p) for d, t, p in mixed if p != "fp16"]
        print(f"| {name} | " + " | ".join(cells) + " |")


def _cell(steps: int, name: str, dims: int, size: int, device: str, threads: int, dp: str, precision: str) -> str:
    out = subprocess.run([sys.executable, "-m", "benchmarks.hardware", "--steps", str(steps), "--one",
                          name, str(dims), str(size), device, str(threads), dp, precision], capture_output=True, text=True)
    if out.returncode:
        return f"failed ({out.stderr.strip().splitlines()[-1][:60]})"
    return f"{json.loads(out.stdout.strip().splitlines()[-1])['samples_per_s']:.1f}"


if __name__ == "__main__":
    main()
