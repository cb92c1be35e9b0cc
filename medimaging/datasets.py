"""Image arrays -> model-ready tensors, MedMNIST npz loading and train/val splits."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import medimaging.monai_loader  # noqa: F401  (MONAI without BERT: before any monai import)
from monai.transforms import Compose, Resize, ScaleIntensityRange
from monai.utils import convert_to_tensor


@dataclass
class Split:
    """Images (N, C, S, S) or volumes (N, C, S, S, S) float32, and labels: integer class (N,),
    0/1 float per finding (N, K) for a multi-label task (several findings on one image), or
    integer masks (N, S, S[, S]) for segmentation."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    @property
    def multilabel(self) -> bool:
        return self.y.ndim == 2

    @property
    def segmentation(self) -> bool:
        return self.y.ndim >= 3

    def class_counts(self, num_classes: int) -> list[int]:
        """Images per class; for multi-label, images with each finding; for segmentation,
        images where each label (0 = background) appears."""
        if self.multilabel:
            return self.y.sum(0).long().tolist()
        if self.segmentation:
            present = torch.nn.functional.one_hot(self.y.flatten(1), num_classes).amax(1)
            return present.sum(0).long().tolist()
        return torch.bincount(self.y, minlength=num_classes).tolist()


@dataclass
class SiteData:
    """What one hospital trains and validates on. Stays on the hospital."""

    name: str
    train: Split
    val: Split


def spatial_dims_of(images: np.ndarray) -> int:
    """2 for uint8 (N,H,W) / (N,H,W,C) images, 3 for (N,D,H,W) volumes (MedMNIST3D layout)."""
    return 3 if images.ndim == 4 and images.shape[-1] not in (1, 3) else 2


def to_tensor(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 (N,H,W[,C]) or (N,D,H,W), or float [0,1] (N,C,*spatial) -> float32 (N,C,S,S[,S])
    scaled to [-1, 1]."""
    if images.dtype == np.uint8:
        if spatial_dims_of(images) == 3 or images.ndim == 3:
            arr = images[:, None].astype(np.float32)
        else:
            arr = np.moveaxis(images, -1, 1).astype(np.float32)
        top = 255.0
    else:
        arr, top = images.astype(np.float32), 1.0
    n, c, spatial = arr.shape[0], arr.shape[1], arr.shape[2:]
    target = (image_size,) * len(spatial)
    steps = [ScaleIntensityRange(a_min=0.0, a_max=top, b_min=-1.0, b_max=1.0)]
    if spatial != target:
        # Resize treats the first axis as channels, so (N*C, *spatial) resizes all images at once.
        mode = "trilinear" if len(spatial) == 3 else "bilinear"
        steps.insert(0, Resize(spatial_size=target, mode=mode, anti_aliasing=False))
    out = Compose(steps)(torch.from_numpy(arr.reshape(n * c, *spatial)))
    return convert_to_tensor(out, track_meta=False).reshape(n, c, *target).float()


def mask_tensor(masks: np.ndarray, image_size: int) -> torch.Tensor:
    """Integer masks (N, *spatial) -> int64 (N, S, S[, S]), resized by nearest neighbour."""
    target = (image_size,) * (masks.ndim - 1)
    arr = torch.from_numpy(np.asarray(masks, dtype=np.float32))
    if tuple(masks.shape[1:]) != target:
        arr = convert_to_tensor(Resize(spatial_size=target, mode="nearest")(arr), track_meta=False)
    return arr.round().long()


def labels_1d(labels: np.ndarray) -> np.ndarray:
    return np.asarray(labels).reshape(len(labels)).astype(np.int64)


def is_multilabel(labels: np.ndarray) -> bool:
    return labels.ndim == 2 and labels.shape[1] > 1


def is_segmentation(labels: np.ndarray) -> bool:
    return labels.ndim >= 3


def labels_array(labels: np.ndarray) -> np.ndarray:
    """MedMNIST labels as training targets: int64 classes (N,), float32 0/1 (N, K) multi-label,
    or int64 masks (N, *spatial)."""
    if is_segmentation(labels):
        return np.asarray(labels, dtype=np.int64)
    return np.asarray(labels, dtype=np.float32) if is_multilabel(labels) else labels_1d(labels)


def targets(labels: np.ndarray, image_size: int) -> torch.Tensor:
    """Training targets as a tensor; masks resized to the images' side."""
    if is_segmentation(labels):
        return mask_tensor(labels, image_size)
    return torch.from_numpy(labels_array(labels))


def partition_labels(labels: np.ndarray) -> np.ndarray:
    """The label a partitioner splits by: the class, the first finding (multi-label), or the
    highest label in the mask (segmentation)."""
    if is_segmentation(labels):
        return labels.reshape(len(labels), -1).max(1).astype(np.int64)
    return labels_1d(labels[:, 0]) if is_multilabel(labels) else labels_1d(labels)


@lru_cache(maxsize=2)
def load_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of a MedMNIST file, read once per process."""
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


@dataclass(frozen=True)
class NpzInfo:
    channels: int
    native: int  # side of the stored images
    classes: int  # classes, findings (multi-label) or mask labels including background
    task: str  # "classification" or "segmentation"
    spatial_dims: int


def npz_info(path: Path) -> NpzInfo:
    """What a MedMNIST-layout file holds."""
    arrays = load_npz(str(path))
    images, labels = arrays["train_images"], arrays["train_labels"]
    dims = spatial_dims_of(images)
    channels = 1 if images.ndim == 3 or dims == 3 else images.shape[-1]
    if is_segmentation(labels):
        top = max(int(arrays[k].max(initial=0)) for k in ("train_labels", "test_labels"))
        return NpzInfo(channels, images.shape[1], max(top + 1, 2), "segmentation", dims)
    if is_multilabel(labels):
        return NpzInfo(channels, images.shape[1], labels.shape[1], "classification", dims)
    labels = np.concatenate([labels_1d(arrays[k]) for k in ("train_labels", "test_labels")])
    return NpzInfo(channels, images.shape[1], int(labels.max()) + 1, "classification", dims)


def split_train_val(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Stratified-by-shuffle local split; at least one validation image."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(y) * val_fraction)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return Split(x[train_idx], y[train_idx]), Split(x[val_idx], y[val_idx])
