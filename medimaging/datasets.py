"""Image arrays -> model-ready tensors, MedMNIST npz loading and train/val splits."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, Resize, ScaleIntensityRange
from monai.utils import convert_to_tensor


@dataclass
class Split:
    """Images (N, C, S, S) float32 and labels: integer class (N,), or 0/1 float per finding
    (N, K) for a multi-label task (several findings on one image)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    @property
    def multilabel(self) -> bool:
        return self.y.ndim == 2

    def class_counts(self, num_classes: int) -> list[int]:
        """Images per class; for multi-label, images with each finding."""
        if self.multilabel:
            return self.y.sum(0).long().tolist()
        return torch.bincount(self.y, minlength=num_classes).tolist()


@dataclass
class SiteData:
    """What one hospital trains and validates on. Stays on the hospital."""

    name: str
    train: Split
    val: Split


def to_tensor(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 (N,H,W[,C]) or float [0,1] (N,C,H,W) -> float32 (N,C,S,S) scaled to [-1, 1]."""
    if images.dtype == np.uint8:
        arr = images[..., None] if images.ndim == 3 else images
        arr = np.moveaxis(arr, -1, 1).astype(np.float32)
        top = 255.0
    else:
        arr, top = images.astype(np.float32), 1.0
    n, c, h, w = arr.shape
    steps = [ScaleIntensityRange(a_min=0.0, a_max=top, b_min=-1.0, b_max=1.0)]
    if (h, w) != (image_size, image_size):
        # Resize treats the first axis as channels, so (N*C, H, W) resizes all images at once.
        steps.insert(0, Resize(spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=False))
    out = Compose(steps)(torch.from_numpy(arr.reshape(n * c, h, w)))
    return convert_to_tensor(out, track_meta=False).reshape(n, c, image_size, image_size).float()


def labels_1d(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels).reshape(len(labels)).astype(np.int64)


def is_multilabel(labels: np.ndarray) -> bool:
    return labels.ndim == 2 and labels.shape[1] > 1


def labels_array(labels: np.ndarray) -> np.ndarray:
    """MedMNIST labels as training targets: int64 classes (N,), or float32 0/1 (N, K) multi-label."""
    return np.asarray(labels, dtype=np.float32) if is_multilabel(labels) else labels_1d(labels)


def partition_labels(labels: np.ndarray) -> np.ndarray:
    """The label a partitioner splits by: the class, or for multi-label the first finding."""
    return labels_1d(labels[:, 0]) if is_multilabel(labels) else labels_1d(labels)


@lru_cache(maxsize=2)
def load_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of a MedMNIST file, read once per process."""
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def npz_info(path: Path) -> tuple[int, int, int]:
    """(channels, native side, number of classes or findings) of a MedMNIST file."""
    arrays = load_npz(str(path))
    images = arrays["train_images"]
    channels = 1 if images.ndim == 3 else images.shape[-1]
    if is_multilabel(arrays["train_labels"]):
        return channels, images.shape[1], arrays["train_labels"].shape[1]
    labels = np.concatenate([labels_1d(arrays[k]) for k in ("train_labels", "test_labels")])
    return channels, images.shape[1], int(labels.max()) + 1


def split_train_val(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified-by-shuffle local split; at least one validation image."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(y) * val_fraction)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return Split(x[train_idx], y[train_idx]), Split(x[val_idx], y[val_idx])
