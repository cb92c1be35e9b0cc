"""Helpers shared by the benchmarks: plain-PyTorch reference training on the same site data."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from medimaging.datasets import Split
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
    """The federation's start model (2D or 3D, as the data is)."""
    shape = task_shape(cfg)
    model = shape.model(cfg)
    model.load_state_dict(initial_arrays(cfg, shape).to_torch_state_dict())
    return model


def best_index(entries: list[dict], by: str = "auc") -> int:
    """The index of the entry (a round's global row, an epoch of centralized_history) with the
    best validation AUC (by="loss": the lowest validation loss); the earliest of equals."""
    if by == "loss":
        return min(range(len(entries)), key=lambda i: (entries[i]["val_loss"] if entries[i].get("val_loss") is not None
                                                       else math.inf, i))
    return max(range(len(entries)), key=lambda i: (entries[i]["val_auc"] if entries[i].get("val_auc") is not None
                                                   else -1.0, -i))


def selected(run_dir: Path, by: str = "auc") -> tuple[float, float, int]:
    """(test AUC of the round with the best federated validation AUC (by="loss": the lowest
    validation loss), last round's test AUC, that round): MedMNIST's protocol selects the model on
    the validation split. The federation's validation loss is the pooled one (a mean weighted by
    cases), where its AUC is a weighted mean of each hospital's AUC on its few cases."""
    rows = [r for r in read_rows(run_dir) if r["site"] == "global" and r["round"] > 0]
    best = rows[best_index(rows, by)]
    return best["test_auc"], rows[-1]["test_auc"], best["round"]


def centralized_history(cfg: SimulationConfig, epochs: int) -> list[dict[str, float]]:
    """The same model trained on the pooled training images for `epochs` epochs; after each epoch
    its pooled validation AUC and loss and its test AUC (val_auc, val_loss, test_auc)."""
    data = sites(cfg)
    pooled = Split(torch.cat([s.train.x for s in data]), torch.cat([s.train.y for s in data]))
    val = Split(torch.cat([s.val.x for s in data]), torch.cat([s.val.y for s in data]))
    model, test, classes, tr = fresh_model(cfg), global_test(cfg), task_shape(cfg).num_classes, cfg.train
    history = []
    for epoch in range(1, epochs + 1):  # one epoch at a time: the optimiser restarts, as a round's does
        lr = tr.lr * tr.lr_factor(epoch - 1, epochs)  # train.lr_schedule, as the federation's rounds have it
        train_epochs(model, pooled, 1, tr.batch_size, lr, tr.optimizer, cfg.seed + epoch, augment=tr.augment)
        v = evaluate(model, val, classes)
        history.append({"val_auc": v["auc"], "val_loss": v["loss"], "test_auc": evaluate(model, test, classes)["auc"]})
    return history


def centralized_selected(cfg: SimulationConfig, epochs: int) -> tuple[float, float, int, float]:
    """centralized_history's (test AUC at the best validation AUC's epoch, at the last epoch, that
    epoch, seconds)."""
    start = time.perf_counter()
    history = centralized_history(cfg, epochs)
    epoch = best_index(history)
    return history[epoch]["test_auc"], history[-1]["test_auc"], epoch + 1, time.perf_counter() - start


def centralized(cfg: SimulationConfig, epochs: int) -> tuple[dict[str, float], float]:
    """Train one model on the union of all sites' training splits; (test scores, seconds)."""
    data = sites(cfg)
    pooled = Split(torch.cat([s.train.x for s in data]), torch.cat([s.train.y for s in data]))
    model, t = fresh_model(cfg), time.perf_counter()
    tr = cfg.train
    if tr.lr_schedule == "constant":
        train_epochs(model, pooled, epochs, tr.batch_size, tr.lr, tr.optimizer, cfg.seed, augment=tr.augment)
    else:  # a scheduled lr: epoch by epoch, the optimiser restarting as each round's does
        for epoch in range(epochs):
            train_epochs(model, pooled, 1, tr.batch_size, tr.lr * tr.lr_factor(epoch, epochs), tr.optimizer,
                         cfg.seed + epoch + 1, augment=tr.augment)
    seconds = time.perf_counter() - t
    return evaluate(model, global_test(cfg), task_shape(cfg).num_classes), seconds
