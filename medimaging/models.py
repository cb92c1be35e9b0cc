"""MONAI networks for 2D classification, built from a ModelConfig."""

from __future__ import annotations

import torch
from monai.networks.nets import Classifier, DenseNet121, resnet18

from .config import MODEL_MIN_SIZE, ModelConfig


def _norm(name: str) -> str | tuple:
    return {"group": ("group", {"num_groups": 8}), "instance": ("instance", {"affine": True})}.get(name, name)


def _norm_layer(name: str, channels: int) -> torch.nn.Module:
    if name == "group":
        return torch.nn.GroupNorm(8, channels)
    if name == "instance":
        return torch.nn.InstanceNorm2d(channels, affine=True)
    return torch.nn.BatchNorm2d(channels)


def _enforce(module: torch.nn.Module, norm: str) -> torch.nn.Module:
    """MONAI 1.6's ResNet does not pass `norm` to its residual layers (they stay BatchNorm) and
    their ReLUs are in-place; make every BatchNorm the asked-for norm and every activation
    out-of-place (needed by Opacus, harmless otherwise)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d) and norm != "batch":
            setattr(module, name, _norm_layer(norm, child.num_features))
        else:
            _enforce(child, norm)
        if hasattr(child, "inplace"):
            child.inplace = False
    return module


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
        return _enforce(resnet18(
            spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes,
            norm=_norm(cfg.norm), act=("relu", {"inplace": False}),
        ), cfg.norm)
    return DenseNet121(
        spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
        norm=_norm(cfg.norm), act=("relu", {"inplace": False}),
    )
