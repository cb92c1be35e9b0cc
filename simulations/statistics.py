"""`aseanfl stats` on simulated hospitals: each hospital's statistics computed from its own share
of the data by the same code a deployed hospital answers `aseanfl stats -f` with
(client/training/describe.py), pooled and written as a deployment's are."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from client.config import StatisticsSite
from client.training.describe import statistics
from client.training.hospital import Hospital
from medimaging.datasets import SiteData, Split, npz_info, spatial_dims_of, targets
from medimaging.stats import npz_meta
from protocol.messages import DescribeSpec
from server.records.report import data_line
from server.records.statistics import write_statistics

from simulations.config import SimulationConfig, dump_config
from simulations.federation import _local_arrays, _splits, _synthetic, resolved, task_shape


def _uint8(x: np.ndarray) -> np.ndarray:
    """The synthetic default's float images (N, 1, S, S[, S]) as the 0-255 pixels (N, S, S[, S])
    of a hospital's export."""
    if x.dtype == np.uint8:
        return x
    return np.clip(np.rint(np.asarray(x[:, 0], np.float64) * 255), 0, 255).astype(np.uint8)


def class_names(cfg: SimulationConfig, count: int) -> list[str]:
    """A folder's class names (data.files), the synthetic default's, or an npz's label indices
    (a MedMNIST npz names none)."""
    if cfg.data.files is not None:
        from medimaging.files import decode

        return list(decode(cfg.data.files, seed=cfg.seed).inventory.classes)
    if cfg.data.path is None and cfg.data.synthetic.task == "classification":
        return ["normal", "lesion"]
    if cfg.data.path is None:
        return ["background", "lesion"]
    return [f"class-{i}" for i in range(count)]


def simulated_hospital(cfg: SimulationConfig, index: int, size: int, names: list[str], policy: StatisticsSite) -> Hospital:
    """Simulated hospital `index` as `aseanfl stats` sees it: its splits, names and images' meta."""
    train, val = _splits(cfg, index, size)
    (x, _y), own = _local_arrays(cfg, index)
    images = [x] + ([own[0]] if own is not None else [])
    test = None
    if cfg.data.path is None:  # the synthetic default: each hospital also holds its share of the test split
        xt, yt = _synthetic(cfg, index)[1]
        test, images = Split(torch.empty(len(yt), 0), targets(yt, size)), images + [xt]
    modality = "npz" if cfg.data.path is not None else "synthetic"
    pixels = [_uint8(a) for a in images]
    meta = [m for a in pixels for m in npz_meta(a, spatial_dims_of(a), modality)]
    return Hospital(data=SiteData(name=cfg.sites[index], train=train, val=val), test=test, num_classes=len(names),
                    classes=names, meta=meta, statistics=policy, ledger_root=Path(cfg.server.output_dir) / ".stats-keys")


def simulate_statistics(cfg: SimulationConfig, min_count: int, out: Path | None = None) -> Path:
    """Every simulated hospital's statistics, pooled, in a run-style folder; returns the folder."""
    cfg = resolved(cfg)
    shape = task_shape(cfg)
    names = class_names(cfg, npz_info(cfg.data.path).classes if cfg.data.path is not None else 2)
    policy = StatisticsSite(min_count=min_count)
    spec = DescribeSpec(request="simulated", image_size=shape.image_size, min_count=min_count)
    results = {}
    for i, site in enumerate(cfg.sites):
        results[site] = statistics(simulated_hospital(cfg, i, shape.image_size, names, policy), spec)
    root = out or cfg.server.output_dir
    folder = root / f"stats-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = root / f"stats-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_config(cfg, data_line(shape.data())))
    write_statistics(folder, results, min_count, folder.name)
    return folder

