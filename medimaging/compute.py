"""Where a hospital trains: the device and the CPU threads, decided where the hardware is (a
deployed hospital in its site.yaml, a simulation by the resources its engine gives each
simulated hospital), never by the coordinator."""

from __future__ import annotations

import os

import torch
from pydantic import Field

from .config import Strict


class ComputeConfig(Strict):
    """site.yaml `compute`: the hospital's own hardware."""

    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="auto = a CUDA GPU when there is one, else the CPU; cpu; cuda; cuda:N")
    threads: int | None = Field(None, ge=1, le=4096,
                                description="CPU threads for training and evaluation; None = every core this process may use")


class ComputeUnavailable(ValueError):
    """The configured device is not on this machine; the message names the setting."""


def cores() -> int:
    """The CPU cores this process may run on (its affinity; a container's or taskset's limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_device(spec: str, setting: str = "compute.device") -> torch.device:
    """The torch device for `spec` (auto, cpu, cuda, cuda:N); ComputeUnavailable naming
    `setting` when it asks for a GPU this machine does not have."""
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
