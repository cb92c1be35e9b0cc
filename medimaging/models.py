"""MONAI networks for 2D classification, built from a ModelConfig."""

from __future__ import annotations

import torch
from monai.networks.nets import Classifier, DenseNet121, resnet18

from .config import MODEL_MIN_SIZE, ModelConfig


def _norm(name: str) -> str | tuple:
    return ("group", {"num_groups": 8}) if name == "group" else name


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int) -> torch.nn.Module:
    """A fresh network; `image_size` must be at least MODEL_MIN_SIZE[cfg.name]."""
    if image_size < MODEL_MIN_SIZE[cfg.name]:
        raise ValueError(f"model.name={cfg.name} needs images of at least {MODEL_MIN_SIZE[cfg.name]} px")
    if cfg.name == "cnn":
        # Small and fast: three strided conv blocks with instance norm, then a linear head.
        return Classifier(
            in_shape=(in_channels, image_size, image_size),
            classes=num_classes,
            channels=(16, 32, 64),
            strides=(2, 2, 2),
            num_res_units=0,
            dropout=0.1,
        )
    if cfg.name == "resnet18":
        return resnet18(
            spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes,
            norm=_norm(cfg.norm), act=("relu", {"inplace": False}),
        )
    return DenseNet121(
        spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
        norm=_norm(cfg.norm), act=("relu", {"inplace": False}),
    )
