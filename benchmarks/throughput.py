"""The training step the throughput benchmarks (dp_cost, hardware) time: light on imports, so
each case's memory is its own."""

from __future__ import annotations

import torch

from medimaging.datasets import Split
from medimaging.training import train_epochs


def train_case(model: torch.nn.Module, data: Split, steps: int, batch: int, mode: str,
               precision: torch.dtype | None = None) -> None:
    """One epoch of `steps` batches: plain (mode "none") or DP-SGD with Opacus' `mode`
    ("hooks", "ghost") at noise 1.0, as the throughput benchmarks measure it; `precision`: the
    autocast dtype (None: fp32)."""
    from client.config import PrivacyConfig, TrainConfig
    from client.training.privacy import DPPlan, train_private

    if mode == "none":
        train_epochs(model, data, 1, batch, 1e-3, "adam", 0, precision=precision)
        return
    plan = DPPlan(noise_multiplier=1.0, sample_rate=1 / steps, steps_per_round=steps, delta=1e-5, accountant="rdp")
    train_private(model, data, TrainConfig(local_epochs=1, batch_size=batch),
                  PrivacyConfig(enabled=True, grad_sample_mode=mode), plan, 0, precision=precision)
