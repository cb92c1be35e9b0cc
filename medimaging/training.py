"""Local training and evaluation loops, and the metrics they report."""

from __future__ import annotations

import math

import torch
from monai.metrics import compute_roc_auc
from torch.utils.data import DataLoader, TensorDataset

from .datasets import Split


def loader(split: Split, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(split.x, split.y), batch_size=batch_size, shuffle=shuffle, generator=generator)


def train_epochs(
    model: torch.nn.Module, split: Split, epochs: int, batch_size: int, lr: float, optimizer: str, seed: int
) -> tuple[float, int]:
    """Train in place; returns (mean training loss over the last epoch, optimisation steps)."""
    model.train()
    opt_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    kwargs = {} if optimizer == "adam" else {"momentum": 0.9}
    opt = opt_cls(model.parameters(), lr=lr, **kwargs)
    loss_fn = torch.nn.CrossEntropyLoss()
    steps, last_loss = 0, math.nan
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for x, y in loader(split, batch_size, shuffle=True, seed=seed + epoch):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            steps += 1
            total += loss.item() * len(y)
            seen += len(y)
        last_loss = total / max(seen, 1)
    return last_loss, steps


def auc(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """ROC AUC: binary, or macro one-vs-rest for several classes; NaN where undefined."""
    present = torch.unique(labels)
    if len(present) < 2:
        return math.nan
    if num_classes == 2:
        return float(compute_roc_auc(probs[:, 1], labels))
    onehot = torch.nn.functional.one_hot(labels, num_classes)
    keep = [c for c in range(num_classes) if c in present]  # classes absent locally have no AUC
    return float(compute_roc_auc(probs[:, keep], onehot[:, keep], average="macro"))


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, num_classes: int, batch_size: int = 256) -> dict[str, float]:
    """Loss, accuracy and AUC of `model` on `split`."""
    model.eval()
    logits = torch.cat([model(x) for x, _ in loader(split, batch_size, shuffle=False)])
    loss = torch.nn.functional.cross_entropy(logits, split.y).item()
    probs = torch.softmax(logits, dim=1)
    accuracy = (probs.argmax(1) == split.y).float().mean().item()
    return {"loss": loss, "accuracy": accuracy, "auc": auc(probs, split.y, num_classes)}
