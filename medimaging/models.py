"""MONAI networks for 2D/3D classification and segmentation (UNet), built from a ModelConfig."""

from __future__ import annotations

import logging

import torch
import medimaging.monai_loader  # noqa: F401  (MONAI without BERT: before any monai import)
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import ResNet, resnet18
from monai.networks.nets.resnet import ResNetBlock
from opacus.validators import ModuleValidator

from medimaging.config import MODEL_MIN_SIZE, ModelConfig, NetworkSpec

log = logging.getLogger("aseanfl")


def _norm(name: str) -> str | list:
    """MONAI's norm argument for model.norm (a list, not a tuple: it is also a bundle's JSON value)."""
    return {"group": ["group", {"num_groups": 8}], "instance": ["instance", {"affine": True}]}.get(name, name)


class _OutOfPlaceResNetBlock(ResNetBlock):
    """MONAI's block, with `out + residual` instead of `out += residual` (Opacus' backward
    hooks forbid modifying that view in place)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        residual = self.downsample(x) if self.downsample is not None else x
        return self.act(out + residual)


def _enforce(module: torch.nn.Module, norm: str, dims: int = 2) -> torch.nn.Module:
    """MONAI 1.6's ResNet does not pass `norm` to its residual layers (they stay BatchNorm),
    their ReLUs are in-place and the residual sum is in-place: make every BatchNorm the
    asked-for norm and every operation out-of-place (needed by Opacus, harmless otherwise)."""
    if type(module) is ResNetBlock:
        module.__class__ = _OutOfPlaceResNetBlock  # same parameters, out-of-place forward
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and norm != "batch":
            setattr(module, name, get_norm_layer(name=_norm(norm), spatial_dims=dims, channels=child.num_features))
        else:
            _enforce(child, norm, dims)
        if hasattr(child, "inplace"):
            child.inplace = False
    return module


_FIXED_LOGGED: set[str] = set()


def build_model(
    cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int, private: bool = False, spatial_dims: int = 2,
    bare: bool = False,
) -> torch.nn.Module:
    """A fresh network for images (spatial_dims=2) or volumes (3); `image_size` must be at least
    MODEL_MIN_SIZE[cfg.name]. With `private`, layers Opacus cannot train (BatchNorm) are
    replaced by ModuleValidator.fix. unet outputs one channel per mask label. Unless `bare`,
    model.freeze and model.adapters are applied (medimaging/finetune.py): a pretrained file is
    loaded into the bare network, before adapters change its layers' names."""
    model = _build(cfg, in_channels, num_classes, image_size, spatial_dims)
    if private and not ModuleValidator.is_valid(model):
        model = ModuleValidator.fix(model)
        key = f"{cfg.name}/{cfg.norm}"
        if key not in _FIXED_LOGGED:
            _FIXED_LOGGED.add(key)
            log.info("model %s (norm=%s) made DP-compatible: BatchNorm -> GroupNorm (Opacus ModuleValidator.fix)",
                     cfg.name, cfg.norm)
    if not bare and cfg.fine_tunes_part:
        from medimaging.finetune import fine_tune_part

        model = fine_tune_part(model, cfg, head_keys(model))
    return model


def network_spec(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int, dims: int) -> NetworkSpec | None:
    """The MONAI class and arguments of model.name, where MONAI's own constructor builds it whole
    (cnn, unet, densenet121, a bundle's network): what a MONAI bundle's network_def says
    (medimaging/export.py). None for smallresnet/resnet18, whose layers _enforce changes after."""
    relu = ["relu", {"inplace": False}]
    if cfg.name == "monai":
        return cfg.network
    if cfg.name == "unet":
        # Three down/up levels with one residual unit each; ReLU (out-of-place) as Opacus needs.
        # Its last layers have as few channels as labels, too few for 8 groups: instance norm.
        return NetworkSpec(target="UNet", args=dict(
            spatial_dims=dims, in_channels=in_channels, out_channels=num_classes, channels=[16, 32, 64, 128],
            strides=[2, 2, 2], num_res_units=1, act=relu,
            norm=_norm("batch" if cfg.norm == "batch" else "instance")))
    if cfg.name == "cnn":
        # Small and fast: three strided conv blocks with instance norm, then a linear head.
        return NetworkSpec(target="Classifier", args=dict(
            in_shape=[in_channels, *(image_size,) * dims], classes=num_classes, channels=[16, 32, 64],
            strides=[2, 2, 2], num_res_units=0, dropout=0.1))
    if cfg.name == "densenet121":
        return NetworkSpec(target="DenseNet121", args=dict(
            spatial_dims=dims, in_channels=in_channels, out_channels=num_classes, norm=_norm(cfg.norm), act=relu))
    return None


def _build(cfg: ModelConfig, in_channels: int, num_classes: int, image_size: int, dims: int) -> torch.nn.Module:
    if image_size < MODEL_MIN_SIZE[cfg.name]:
        raise ValueError(f"model.name={cfg.name} needs images of at least {MODEL_MIN_SIZE[cfg.name]} px")
    spec = network_spec(cfg, in_channels, num_classes, image_size, dims)
    if spec is not None:
        from medimaging.bundles import build_network

        built = build_network(spec)  # a bundle's own norms are kept; every operation made out-of-place (Opacus)
        return _enforce(built, "batch", dims) if cfg.name == "monai" else built
    if cfg.name == "smallresnet":
        # MONAI's ResNet, one basic block per stage and widths 16-128 (resnet18: two blocks, 64-512):
        # 0.9 M parameters in 3D against resnet18's 33 M. The first convolution keeps full
        # resolution (3^d kernel, stride 1, no max pool): at 28 px a 7^d stride-2 stem and a pool
        # leave 7 voxels a side before the first block.
        return _enforce(ResNet(
            block="basic", layers=[1, 1, 1, 1], block_inplanes=[16, 32, 64, 128], spatial_dims=dims,
            n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=1, no_max_pool=True, num_classes=num_classes,
            norm=_norm(cfg.norm), act=("relu", {"inplace": False}),
        ), cfg.norm, dims)
    return _enforce(resnet18(
        spatial_dims=dims, n_input_channels=in_channels, num_classes=num_classes,
        norm=_norm(cfg.norm), act=("relu", {"inplace": False}),
    ), cfg.norm, dims)


def last_linear(model: torch.nn.Module) -> tuple[str, torch.nn.Linear] | None:
    """The classifier's head: the last linear layer and its name, or None (unet)."""
    linear = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    return linear[-1] if linear else None


def head_keys(model: torch.nn.Module) -> set[str]:
    """state_dict names of the classifier's last linear layer (FedPer keeps it at each hospital);
    empty for a network without one (unet)."""
    head = last_linear(model)
    return set() if head is None else {f"{head[0]}.{key}" for key in head[1].state_dict()}


_NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def norm_keys(model: torch.nn.Module) -> set[str]:
    """state_dict names of the normalisation layers' weights and statistics (FedBN keeps them local)."""
    return {
        f"{name}.{key}" if name else key
        for name, module in model.named_modules() if isinstance(module, _NORM_TYPES)
        for key in module.state_dict()
    }
