"""Helpers shared by the benchmarks: plain-PyTorch reference training on the same site data."""

from __future__ import annotations

import time

import torch

from medimaging.datasets import Split
from medimaging.models import build_model
from medimaging.training import evaluate, train_epochs
from server.loop import initial_arrays
from simulations.config import SimulationConfig
from simulations.federation import global_test, site_data, task_shape


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
    train_epochs(model, pooled, epochs, tr.batch_size, tr.lr, tr.optimizer, cfg.seed)
    seconds = time.perf_counter() - t
    return evaluate(model, global_test(cfg), task_shape(cfg).num_classes), seconds
