"""Where a hospital trains: the device and the CPU threads, decided where the hardware is (a
deployed hospital in its site.yaml, a simulation by the resources its engine gives each
simulated hospital), never by the coordinator."""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from medimaging.config import Strict

if TYPE_CHECKING:
    import torch


Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}  # name -> torch's autocast dtype (None: off)
# torch is imported where it is used: a site.yaml is read (every `aseanfl client` command) without it


def precision_dtype(name: str) -> "torch.dtype | None":
    import torch

    return None if PRECISIONS[name] is None else getattr(torch, PRECISIONS[name])


def precision_name(dtype: "torch.dtype | None") -> str:
    return next(name for name in PRECISIONS if precision_dtype(name) == dtype)


class ComputeConfig(Strict):
    """site.yaml `compute`: the hospital's own hardware."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto = a CUDA GPU when there is one, else the CPU; cpu; cuda; cuda:N")
    threads: int | None = Field(None, ge=1, le=4096,
                                description="CPU threads for training and evaluation; None = every core this process may use")
    precision: Precision = Field(
        "auto", description="auto = bf16 mixed precision on a GPU that has it (fp16 with a grad scaler on older GPUs "
        "for non-private training), fp32 on the CPU; fp32; bf16 (also faster on CPUs with bf16 units); fp16 (GPU "
        "only, not with DP-SGD)")
    deterministic: bool = Field(False, description="deterministic algorithms only (cuDNN, cuBLAS): same seed, same "
                                "numbers on a GPU too, at some speed")


class ComputeUnavailable(ValueError):
    """The configured device is not on this machine; the message names the setting."""


def cores() -> int:
    """The CPU cores this process may run on (its affinity; a container's or taskset's limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_device(spec: str, setting: str = "compute.device") -> torch.device:
    """The torch device for `spec` (auto, cpu, cuda, cuda:N); ComputeUnavailable naming
    `setting` when it asks for a GPU this machine does not have."""
    import torch

    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda")
    if not torch.cuda.is_available():
        raise ComputeUnavailable(f"{setting}: {spec} asks for a CUDA GPU, but this machine has none that torch can use "
                                 f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                                 "set it to auto or cpu, or install a CUDA build of torch")
    index, count = int(spec.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise ComputeUnavailable(f"{setting}: {spec}, but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return torch.device(f"cuda:{index}")


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (batches go there)."""
    return next(model.parameters()).device


def resolve_precision(spec: str, device: torch.device, private: bool, setting: str = "compute.precision") -> torch.dtype | None:
    """The autocast dtype for training and evaluation on `device`, or None for fp32.
    ComputeUnavailable naming `setting` where the combination cannot work: fp16 on the CPU (no
    fast kernels), bf16 on a GPU without it, fp16 with DP-SGD (a grad scaler scales the
    per-sample gradients Opacus clips, so the clipping bound would be wrong)."""
    import torch

    cuda = device.type == "cuda"
    bf16 = not cuda or torch.cuda.is_bf16_supported()
    if spec == "auto":
        if not cuda:
            return None  # fp32: numbers that do not depend on whether the CPU has bf16 units (bf16: opt in)
        return torch.bfloat16 if bf16 else (None if private else torch.float16)
    if spec == "fp32":
        return None
    if spec == "bf16":
        if not bf16:
            raise ComputeUnavailable(f"{setting}: bf16, but {torch.cuda.get_device_name(device)} has no bf16; use fp16 or fp32")
        return torch.bfloat16
    if not cuda:
        raise ComputeUnavailable(f"{setting}: fp16 is for CUDA GPUs (the CPU has no fast fp16 kernels); use bf16 or fp32")
    if private:
        raise ComputeUnavailable(f"{setting}: fp16 needs a grad scaler, which scales the per-sample gradients DP-SGD "
                                 "clips (the clipping bound would be wrong); use bf16 or fp32 with privacy.enabled")
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the forward pass and the loss, or nothing for fp32."""
    import torch

    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def set_deterministic(on: bool) -> None:
    """Deterministic algorithms only (an op without one raises, naming itself), or torch's defaults."""
    import torch

    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspace
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
