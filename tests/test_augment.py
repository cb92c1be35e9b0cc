"""Training-time augmentation: what each change does to an image, and seeding. (Under DP-SGD:
test_privacy; in a federated run: test_simulate's multi-class test.)"""

import math

import torch

from medimaging.augment import _rotate, augmenter
from medimaging.config import AugmentConfig


def _batch(n=64):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_nothing_on_means_no_augmenter():
    assert augmenter(AugmentConfig(), seed=0) is None


def test_flip_mirrors_about_half_the_images_and_is_seeded():
    x = _batch()
    y = augmenter(AugmentConfig(flip=True), seed=3)(x)
    mirrored = [torch.equal(y[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(m or k for m, k in zip(mirrored, kept)) and 16 < sum(mirrored) < 48
    assert torch.equal(y, augmenter(AugmentConfig(flip=True), seed=3)(x)), "same seed, same changes"
    assert not torch.equal(y, augmenter(AugmentConfig(flip=True), seed=4)(x))


def test_rotation_turns_about_the_centre():
    x = _batch(2)
    turned = _rotate(x, torch.tensor([math.pi / 2, 0.0]))
    assert torch.allclose(turned[0], torch.rot90(x[0], 1, (1, 2)), atol=1e-4)
    assert torch.allclose(turned[1], x[1], atol=1e-5)


def test_all_changes_keep_shape_and_dtype_and_stay_bounded():
    x = _batch()
    cfg = AugmentConfig(flip=True, rotate_deg=20, intensity=0.1, noise_std=0.05)
    y = augmenter(cfg, seed=0)(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert (y - x).abs().mean() > 0.01 and y.abs().max() < 1.1 * 1.1 + 0.1 + 0.05 * 6
    assert augmenter(cfg, seed=0)(x[:0]).shape == (0, 1, 28, 28), "an empty Poisson batch passes through"
