"""Synthetic hospitals are deterministic and heterogeneous; npz partitions are sound."""

import numpy as np
import pytest

from medimaging.synthetic import site_images, site_profile
from simulations.config import load_config
from simulations.federation import global_test, site_data, task_shape


def test_synthetic_is_deterministic_and_seeded():
    (a, ya), _ = site_images(2, seed=5, samples_per_site=100, test_per_site=20)
    (b, yb), _ = site_images(2, seed=5, samples_per_site=100, test_per_site=20)
    (c, _), _ = site_images(2, seed=6, samples_per_site=100, test_per_site=20)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert not np.array_equal(a, c)


def test_synthetic_hospitals_differ_like_real_ones():
    sites = [site_images(i, seed=0, samples_per_site=400, test_per_site=50)[0] for i in range(6)]
    sizes = {len(y) for _, y in sites}
    prevalences = [y.mean() for _, y in sites]
    resolutions = {x.shape[-1] for x, _ in sites}
    assert len(sizes) == 6, "each hospital holds a different number of images"
    assert max(prevalences) - min(prevalences) > 0.2, "class prevalence differs across hospitals"
    assert len(resolutions) >= 4, "scanners differ in resolution"
    profiles = [site_profile(i) for i in range(6)]
    assert len({round(p.gain, 3) for p in profiles}) == 6 and len({round(p.noise, 4) for p in profiles}) == 6


def test_site_data_is_resized_and_split():
    cfg = load_config(None, {"sites": 3})
    shape = task_shape(cfg)
    site = site_data(cfg, 1, shape.image_size)
    assert site.name == "hanoi"
    assert site.train.x.shape[1:] == (1, 32, 32) and site.val.x.shape[1:] == (1, 32, 32)
    assert abs(len(site.val) / (len(site.train) + len(site.val)) - cfg.data.val_fraction) < 0.02
    assert len(global_test(cfg)) == 3 * cfg.data.synthetic.test_per_site


@pytest.fixture
def small_npz(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 200)[:, None]
    images = rng.integers(0, 255, (600, 28, 28), dtype=np.uint8)
    path = tmp_path / "toy.npz"
    np.savez(path, train_images=images, train_labels=labels, test_images=images[:60], test_labels=labels[:60])
    return path


def _sites(path, **partition):
    cfg = load_config(None, {"data.path": str(path), "sites": 4, **{f"partition.{k}": v for k, v in partition.items()}})
    shape = task_shape(cfg)
    assert (shape.num_classes, shape.in_channels, shape.image_size) == (3, 1, 28)
    return [site_data(cfg, i, shape.image_size) for i in range(4)]


def _counts(site):
    return np.array(site.train.class_counts(3)) + np.array(site.val.class_counts(3))


def test_partitions_cover_the_training_set(small_npz):
    for scheme in ("iid", "dirichlet", "quantity"):
        sites = _sites(small_npz, scheme=scheme, alpha=0.3)
        assert sum(int(_counts(s).sum()) for s in sites) == 600, scheme


def test_dirichlet_skews_labels_and_quantity_skews_sizes(small_npz):
    def skew(sites):  # mean share of each site's majority class
        return np.mean([_counts(s).max() / _counts(s).sum() for s in sites])

    iid, dirichlet = _sites(small_npz, scheme="iid"), _sites(small_npz, scheme="dirichlet", alpha=0.1)
    assert skew(iid) < 0.45 < skew(dirichlet)
    sizes = [int(_counts(s).sum()) for s in _sites(small_npz, scheme="quantity")]
    assert sizes == sorted(sizes) and sizes[-1] >= 3 * sizes[0]
