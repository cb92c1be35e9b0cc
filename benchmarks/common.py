"""Helpers shared by the benchmarks: plain-PyTorch reference training on the same site data."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medimaging.datasets import Split
from medimaging.models import build_model
from medimaging.training import evaluate, train_epochs
from server.engine.updates import initial_arrays
from server.records.outputs import read_rows
from simulations.config import SimulationConfig
from simulations.federation import global_test, site_data, task_shape


PNEUMONIA = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"


def federation_args(ap: argparse.ArgumentParser) -> None:
    """--data (pneumoniamnist beside the repo), --sites 5, --rounds 5, --local-epochs 1."""
    ap.add_argument("--data", type=Path, default=PNEUMONIA)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)


def final_global(run_dir: Path) -> dict:
    """The last round's global row of a run."""
    return [r for r in read_rows(run_dir) if r["site"] == "global"][-1]


def sites(cfg: SimulationConfig):
    shape = task_shape(cfg)
    return [site_data(cfg, i, shape.image_size) for i in range(len(cfg.sites))]


def fresh_model(cfg: SimulationConfig) -> torch.nn.Module:
    shape = task_shape(cfg)
    model = build_model(cfg.model, shape.in_channels, shape.num_classes, shape.image_size)
    model.load_state_dict(initial_arrays(cfg, shape).to_torch_state_dict())
    return model


def centralized(cfg: SimulationConfig, epochs: int) -> tuple[dict[str, float], float]:
    """Train one model on the union of all sites' training splits; (test scores, seconds)."""
    data = sites(cfg)
    pooled = Split(torch.cat([s.train.x for s in data]), torch.cat([s.train.y for s in data]))
    model, t = fresh_model(cfg), time.perf_counter()
    tr = cfg.train
    train_epochs(model, pooled, epochs, tr.batch_size, tr.lr, tr.optimizer, cfg.seed, augment=tr.augment)
    seconds = time.perf_counter() - t
    return evaluate(model, global_test(cfg), task_shape(cfg).num_classes), seconds
