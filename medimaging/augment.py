"""Training-time augmentation, applied to whole batches.

Batch versions of MONAI's RandFlip, RandRotate, RandScaleIntensity, RandShiftIntensity and
RandGaussianNoise (each image drawn on its own, probability 0.5 each): MONAI's array transforms
work image by image with metadata, ~1.5 ms per 28 px image here, more than training the cnn on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from medimaging.config import AugmentConfig


def augmenter(cfg: AugmentConfig, seed: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function (N, C, H, W) -> (N, C, H, W) drawing new random changes per image, seeded
    (same seed, same changes); None when `cfg` turns nothing on. Intensity and noise also
    take volumes (N, C, D, H, W)."""
    if not cfg.active:
        return None
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> torch.Tensor:  # which images get a change: half of them
        return torch.rand(n, generator=gen) < 0.5

    def uniform(n: int, bound: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) * 2 - 1) * bound

    def apply(x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if n == 0:  # Poisson sampling (DP-SGD) can draw an empty batch
            return x
        if cfg.flip:  # images: left-right; volumes: each of the three axes on its own draw
            for axis in range(-1, -2 if x.ndim == 4 else -4, -1):
                x = torch.where(draw(n).view((n,) + (1,) * (x.ndim - 1)), x.flip(axis), x)
        if cfg.rotate_deg > 0:
            x = _rotate(x, uniform(n, math.radians(cfg.rotate_deg)) * draw(n))
        per_image = (n,) + (1,) * (x.ndim - 1)  # broadcasts over channels and 2 or 3 spatial axes
        if cfg.intensity > 0:  # x * (1 + factor), then + offset, as MONAI's two transforms
            scale, shift = 1 + uniform(n, cfg.intensity) * draw(n), uniform(n, cfg.intensity) * draw(n)
            x = x * scale.view(per_image).to(x.dtype) + shift.view(per_image).to(x.dtype)
        if cfg.noise_std > 0:
            noise = torch.randn(x.shape, generator=gen).to(x.dtype) * cfg.noise_std
            x = x + noise * draw(n).view(per_image)
        return x

    return apply


def _rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Each image turned by its angle (radians) about its centre; borders repeat the edge."""
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(len(angle))
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
