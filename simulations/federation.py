"""Each simulated hospital's data: synthetic per-site generation, or an npz split across sites
with flwr-datasets partitioners. Also the global test split for server-side evaluation."""

from __future__ import annotations

import logging

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from flwr.app import Context
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, LinearPartitioner

from client.training.hospital import Hospital
from client.training.accounting import epsilon_of
from client.training.privacy import make_plan
from medimaging.compute import ComputeUnavailable, resolve_precision
from medimaging.config import MODEL_MIN_SIZE, check_augment, check_model_task
from medimaging.files import decode
from medimaging.datasets import SiteData, Split, load_npz, npz_info, partition_labels, split_train_val, targets, to_tensor
from medimaging.synthetic import site_images, site_profile, volume_side
from server.engine.plan import TaskShape

from simulations.config import ConfigError, SimulationConfig, load_config, parse_sets

log = logging.getLogger("aseanfl")


def task_shape(cfg: SimulationConfig) -> TaskShape:
    """Channels, classes, the image side every site resizes to, the task and its dimensions.
    ConfigError if the model cannot do the data's task."""
    if cfg.data.path is None:
        synth = cfg.data.synthetic
        native = 32 if synth.spatial_dims == 2 else volume_side(site_profile(0))
        channels, classes, task, dims = 1, 2, synth.task, synth.spatial_dims
    else:
        info = npz_info(cfg.data.path)
        channels, native, classes, task, dims = info.channels, info.native, info.classes, info.task, info.spatial_dims
    size = cfg.data.image_size or max(native, MODEL_MIN_SIZE[cfg.model.name])
    if cfg.model.name == "unet" and cfg.data.image_size is None:
        size = -(-size // 8) * 8  # the next multiple of 8
    try:
        if cfg.bundle is not None and cfg.bundle.is_dir():  # (a run's config.yaml is read without its bundle too)
            size = _bundle_fits(cfg, (channels, classes, task, dims), native)
        check_model_task(cfg.model, task, size)
        check_augment(cfg.train.augment, task, dims)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return TaskShape(in_channels=channels, num_classes=classes, image_size=size, task=task, spatial_dims=dims)


def _bundle_fits(cfg: SimulationConfig, data: tuple, native: int) -> int:
    """The side images are resized to for the bundle; BundleError where the data is not its task."""
    from medimaging.bundles import BundleError, check_network, read_bundle

    bundle = read_bundle(cfg.bundle)
    what = "the synthetic data" if cfg.data.path is None else cfg.data.path.name
    wanted = (bundle.in_channels, bundle.num_classes, bundle.kind, bundle.spatial_dims)
    for name, theirs, ours in zip(("input channels", "output channels (classes)", "task", "spatial dims"), wanted, data):
        if theirs != ours:
            raise BundleError(f"bundle {bundle.path}: its {name} is {theirs}, {what} has {ours} (metadata.json "
                              "network_data_format)")
    size = cfg.data.image_size or bundle.size_for(native)
    bundle.check_size(size, "data.image_size")
    check_network(bundle, size)
    return size


def resolved(cfg: SimulationConfig) -> SimulationConfig:
    """The config with every default that depends on the data filled in (for config.yaml);
    `data.files` are decoded (or found in their cache) and `data.path` points at the cache."""
    out = cfg.model_copy(deep=True)
    if out.data.files is not None:
        try:
            decoded = decode(out.data.files, seed=cfg.seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for problem in decoded.inventory.problems:
            log.warning("data.files: %s skipped: %s", problem.file, problem.reason)
        out.data.path = decoded.cache.resolve()
    out.data.image_size = task_shape(out).image_size
    return out


def _own_validation(arrays: dict[str, np.ndarray]) -> bool:
    """The npz carries its own validation split (MedMNIST's val_images/val_labels): hospitals
    validate on their share of it, so validation and the union of training shares are the
    published splits."""
    return "val_images" in arrays and "val_labels" in arrays and len(arrays["val_labels"]) > 0


def _pool_labels(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """What is partitioned among hospitals: the training labels, then the npz's own validation labels."""
    keys = ("train_labels", "val_labels") if _own_validation(arrays) else ("train_labels",)
    return np.concatenate([partition_labels(arrays[k]) for k in keys])


@lru_cache(maxsize=4)
def _partitions(path: str, num_sites: int, scheme: str, alpha: float, min_size: int, seed: int) -> list[np.ndarray]:
    """Each site's indices into the pool (_pool_labels), train and validation split alike: a
    hospital's validation images follow its own label mix."""
    labels = _pool_labels(load_npz(path))
    if scheme == "dirichlet" and num_sites * min_size > len(labels):
        raise ConfigError(f"partition.min_partition_size: {min_size} images for each of {num_sites} sites needs "
                          f"{num_sites * min_size}, the data has {len(labels)} images to share (training and "
                          "validation); lower it, simulate "
                          "fewer sites or use partition.scheme iid")
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_sites)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_sites, partition_by="label", alpha=alpha,
            min_partition_size=min_size, self_balancing=True, seed=seed,
        )
    else:  # quantity skew: site i holds a share proportional to i + 1
        partitioner = LinearPartitioner(num_partitions=num_sites)
    # IidPartitioner and LinearPartitioner shard contiguously: shuffle first so file order
    # (e.g. sorted by class or by source hospital) cannot leak into the split.
    order = np.random.default_rng(seed).permutation(len(labels))
    partitioner.dataset = Dataset.from_dict({"label": labels[order], "index": order})
    try:
        return [np.asarray(partitioner.load_partition(i)["index"]) for i in range(num_sites)]
    except ValueError as exc:  # Dirichlet: no draw gave every site min_partition_size images
        raise ConfigError(f"partition: {num_sites} sites with alpha={alpha} and min_partition_size={min_size}: "
                          f"flwr-datasets found no split ({exc}); raise alpha, lower min_partition_size or simulate "
                          "fewer sites") from None


def _synthetic(cfg: SimulationConfig, index: int):
    s = cfg.data.synthetic
    return site_images(index, cfg.seed, s.samples_per_site, s.test_per_site, s.task, s.spatial_dims)


Arrays = tuple[np.ndarray, np.ndarray]


def _local_arrays(cfg: SimulationConfig, index: int) -> tuple[Arrays, Arrays | None]:
    """A site's (images, labels) to train on, and its share of the npz's own validation split
    (None: the site holds back data.val_fraction of its training share)."""
    if cfg.data.path is None:
        return _synthetic(cfg, index)[0], None
    p = cfg.partition
    idx = _partitions(str(cfg.data.path), len(cfg.sites), p.scheme, p.alpha, p.min_partition_size, cfg.seed)[index]
    arrays = load_npz(str(cfg.data.path))
    n = len(arrays["train_labels"])
    mine = np.sort(idx[idx < n])
    train = arrays["train_images"][mine], arrays["train_labels"][mine]
    if not _own_validation(arrays):
        return train, None
    val = np.sort(idx[idx >= n]) - n
    return train, (arrays["val_images"][val], arrays["val_labels"][val])


def _splits(cfg: SimulationConfig, index: int, image_size: int, images: bool = True) -> tuple[Split, Split]:
    (x, y), own = _local_arrays(cfg, index)
    tensor = (lambda a: to_tensor(a, image_size)) if images else (lambda a: torch.empty(len(a), 0))
    if own is None:
        return split_train_val(tensor(x), targets(y, image_size), cfg.data.val_fraction, cfg.seed + index)
    return Split(tensor(x), targets(y, image_size)), Split(tensor(own[0]), targets(own[1], image_size))


def site_data(cfg: SimulationConfig, index: int, image_size: int) -> SiteData:
    train, val = _splits(cfg, index, image_size)
    return SiteData(name=cfg.sites[index], train=train, val=val)


def global_test(cfg: SimulationConfig) -> Split:
    size = task_shape(cfg).image_size
    if cfg.data.path is None:
        parts = [_synthetic(cfg, i)[1] for i in range(len(cfg.sites))]
        return Split(torch.cat([to_tensor(x, size) for x, _ in parts]), torch.cat([targets(y, size) for _, y in parts]))
    arrays = load_npz(str(cfg.data.path))
    return Split(to_tensor(arrays["test_images"], size), targets(arrays["test_labels"], size))


@dataclass(frozen=True)
class SiteCounts:
    """What the driver keeps of a simulated hospital: counts, never its images."""

    train: list[int]  # per class (finding, mask label)
    val: list[int]
    n_train: int
    n_val: int
    segmentation: bool


_COUNTS: dict[str, list[SiteCounts]] = {}


def site_counts(cfg: SimulationConfig) -> list[SiteCounts]:
    """Every simulated hospital's counts, in one pass that holds one site at a time (from the
    labels alone for an npz of class labels), so the driver's memory does not grow with the
    number of sites; the images are built in the Ray actors, for the sites each round asks."""
    key = cfg.model_dump_json()
    if key in _COUNTS:
        return _COUNTS[key]
    shape, out = task_shape(cfg), []
    for i, name in enumerate(cfg.sites):
        if cfg.data.path is not None and shape.task == "classification":
            train, val = _splits(cfg, i, shape.image_size, images=False)
        else:
            site = site_data(cfg, i, shape.image_size)
            train, val = site.train, site.val
        out.append(SiteCounts(train.class_counts(shape.num_classes), val.class_counts(shape.num_classes), len(train),
                              len(val), train.segmentation))
    _COUNTS.clear()
    _COUNTS[key] = out
    return out


def distribution(cfg: SimulationConfig) -> dict[str, dict[str, list[int]]]:
    """Class counts per site and split (computed locally by the researcher, never sent)."""
    return {name: {"train": c.train, "val": c.val} for name, c in zip(cfg.sites, site_counts(cfg), strict=True)}


SMALL_SITE = 20  # training images below which a simulated hospital is warned about


def small_sites(cfg: SimulationConfig) -> list[str]:
    """One warning per simulated hospital whose share of the data is too small to learn from (a
    handful of images, or one class); ConfigError where a hospital gets no training image."""
    out = []
    for name, site in zip(cfg.sites, site_counts(cfg), strict=True):
        n = site.n_train
        if n == 0:
            raise ConfigError(f"partition: {name} gets no training image ({site.n_val} in all) from "
                              f"{len(cfg.sites)} sites; simulate fewer sites or use more data")
        classes = sum(1 for c in site.train if c) if not site.segmentation else 2
        if n < SMALL_SITE or classes < 2:
            what = f"{n} training images" + (" of a single class" if classes < 2 else "")
            out.append(f"{name} gets {what}: too little to learn from; simulate fewer sites (--sites), "
                       f"use partition.scheme iid, or more data")
    return out


_SITE_CACHE: dict[tuple, SiteData] = {}


def cached_site(cfg: SimulationConfig, index: int, image_size: int) -> SiteData:
    """site_data, built once per process (a simulated node is asked every round)."""
    key = (cfg.model_dump_json(), index, image_size)
    if key not in _SITE_CACHE:
        if len(_SITE_CACHE) >= 8:
            _SITE_CACHE.clear()
        _SITE_CACHE[key] = site_data(cfg, index, image_size)
    return _SITE_CACHE[key]


def hospital(cfg: SimulationConfig, index: int, image_size: int, ledger_root: Path) -> Hospital:
    """Simulated hospital `index`, on the resources the engine gives each one: its share of a
    GPU (Ray makes it the actor's visible CUDA device) or the CPU, and cpus_per_site threads."""
    site = cached_site(cfg, index, image_size)
    return Hospital(data=site, privacy=cfg.site_policy(site.name), ledger_root=ledger_root, device=site_device(cfg),
                    threads=max(1, int(cfg.engine.cpus_per_site)), precision=site_precision(cfg, site.name),
                    deterministic=cfg.engine.deterministic)


def site_device(cfg: SimulationConfig) -> torch.device:
    """A simulated hospital's device: its GPU share (Ray makes it the actor's visible CUDA device) or the CPU."""
    return torch.device("cuda" if cfg.engine.gpus_per_site > 0 else "cpu")


def site_precision(cfg: SimulationConfig, site: str) -> torch.dtype | None:
    """engine.precision for this simulated hospital's device and privacy policy; ConfigError naming it."""
    try:
        return resolve_precision(cfg.engine.precision, site_device(cfg), cfg.site_policy(site).enabled, "engine.precision")
    except ComputeUnavailable as exc:
        raise ConfigError(str(exc)) from None


def config_from_run_config(run_config: dict) -> SimulationConfig:
    """`flwr run . --run-config "config-file='x.yaml' set='server.rounds=3 model.name=cnn'"`."""
    path = str(run_config.get("config-file", "") or "")
    overrides = parse_sets(str(run_config.get("set", "") or "").split())
    return resolved(load_config(Path(path) if path else None, overrides))


def hospital_from_context(context: Context, image_size: int) -> Hospital:
    """The simulated hospital behind this node (its partition-id), for `flwr run`."""
    cfg, index = config_from_run_config(context.run_config), int(context.node_config["partition-id"])
    if index >= len(cfg.sites):
        raise ValueError(
            f"simulated node partition-id={index} but the config has {len(cfg.sites)} sites; "
            f"set num-supernodes = {len(cfg.sites)} for this connection in $FLWR_HOME/config.toml"
        )
    return hospital(cfg, index, image_size, cfg.server.output_dir.resolve())


def check_budgets(cfg: SimulationConfig) -> None:
    """ConfigError if a hospital's budget cannot pay for even one round of the planned run."""
    for name, counts in zip(cfg.sites, site_counts(cfg), strict=True):
        policy = cfg.site_policy(name)
        if not policy.enabled:
            continue
        plan = make_plan(policy, counts.n_train, cfg.train, cfg.server.rounds)
        one = epsilon_of([(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)], plan.delta, plan.accountant)
        if policy.cap < one:
            field = f"site_privacy.{name}" if "budget_epsilon" in cfg.site_privacy.get(name, {}) else "privacy"
            raise ConfigError(
                f"{field}.budget_epsilon: {policy.cap} is below the cost of one round at {name} "
                f"(epsilon {one:.3f} at noise {plan.noise_multiplier:.3f}); raise the budget or lower target_epsilon"
            )
