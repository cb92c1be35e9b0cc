"""A deployed hospital: its site.yaml (named in the SuperNode's node config) and its own files.

The data are checked before every round, as `aseanfl client check-data` does: a site without
usable images answers with a clear error that names no file, and the federation goes on."""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context

from common.i18n import _
from medimaging.compute import cores, resolve_device, resolve_precision
from medimaging.datasets import SiteData, Split, load_npz, split_train_val, targets, to_tensor
from medimaging.dicomweb import SourceError
from medimaging.files import decode

from client.config import SiteConfig, load_site
from client.training.hospital import Hospital

SITE_CONFIG_KEY = "site-config"  # node config: the path of site.yaml, set by `aseanfl client start`
VAL_FRACTION = 0.2
log = logging.getLogger("aseanfl")


class SiteDataError(ValueError):
    """A problem with the hospital's data whose message names no file and no value from it, so
    it may go to the server as the reason of an error reply."""


@lru_cache(maxsize=2)
def _site_config(path: str, mtime: float) -> SiteConfig:
    del mtime  # part of the cache key: an edited site.yaml is read again
    return load_site(Path(path))


@lru_cache(maxsize=2)
def _site_arrays(path: str, mtime: float) -> tuple[SiteConfig, dict[str, np.ndarray], list[str], list[dict]]:
    site = _site_config(path, mtime)
    try:
        decoded = decode(site.data)
    except SourceError as exc:
        log.error("%s: %s", site.site, exc)  # names the PACS: stays in the local log
        raise SiteDataError("the hospital's PACS could not be read (unreachable or refused the account); nothing was "
                            "trained; see the hospital's log and run `aseanfl client check-data` there") from None
    except ValueError as exc:
        log.error("%s: %s", site.site, exc)  # the full message (with the folder) stays in the local log
        raise SiteDataError("fewer than two classes with usable images (or no usable masks) at this hospital; "
                            "run `aseanfl client check-data` there") from None
    for problem in decoded.inventory.problems:
        log.warning(_("{file} skipped: {reason}", file=problem.file, reason=problem.shown()))
    return site, load_npz(str(decoded.cache)), decoded.inventory.classes, decoded.meta


def federation_classes(local: list[str], mapping: dict[str, str], explicit: bool,
                       segmentation: bool) -> tuple[list[str], list[int]]:
    """(the federation's names in this hospital's label order, `order`: the local index of each).
    site.yaml `classes:` renames; without an explicit data.files.classes order the renamed
    classes are sorted again (a label is then the index of its federation name, as at every
    hospital), except a segmentation's labels, which are the masks' values."""
    unknown = sorted(set(mapping) - set(local))
    if unknown:
        raise SiteDataError(f"site.yaml classes: {', '.join(unknown)} is not one of this hospital's classes "
                            f"({', '.join(local)})")
    names = [mapping.get(n, n) for n in local]
    if len(set(names)) < len(names):
        raise SiteDataError(f"site.yaml classes: two of this hospital's classes map onto one name ({', '.join(names)})")
    order = list(range(len(names)))
    if mapping and not explicit and not segmentation:
        order = sorted(order, key=lambda i: names[i])
    return [names[i] for i in order], order


def _relabel(y: np.ndarray, order: list[int]) -> np.ndarray:
    """Labels in the federation's order: a class index's new position, or the findings' columns reordered."""
    if order == sorted(order) or y.size == 0:
        return y
    if y.ndim == 2 and y.shape[1] == len(order) and y.shape[1] > 1:  # findings (multi-label)
        return y[:, order]
    position = np.argsort(order)  # local index -> federation index
    return position[y]


def _check_data_folder(site: SiteConfig) -> None:
    """The images must still be there for every task: a folder that was unmounted, moved or
    removed mid-run (the hospital withdrew it) is not trained on from the worker's memory."""
    root = site.data.root
    if root is None:  # the PACS: its retrieved instances are in the cache, a PACS down mid-run is no loss
        return
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        log.error(_("{site}: the data folder {folder} is gone or unreadable; this task is refused", site=site.site,
                    folder=root))
        raise SiteDataError("the hospital's data folder is no longer available (unmounted, moved or removed); "
                            "nothing was trained; see the hospital's log and run `aseanfl client check-data` there")


def load_site_hospital(context: Context, image_size: int):
    """The Hospital behind a deployed SuperNode. A warm worker serves a whole run: its images are
    decoded and split once (until site.yaml changes), not once per message; the data folder is
    checked for every message."""
    path = Path(str(context.node_config[SITE_CONFIG_KEY]))
    mtime = path.stat().st_mtime
    _check_data_folder(_site_config(str(path), mtime))
    return _hospital(str(path), mtime, image_size)


@lru_cache(maxsize=2)
def _hospital(path: str, mtime: float, image_size: int):
    site, arrays, local, meta = _site_arrays(path, mtime)
    segmentation = arrays["train_labels"].ndim >= 3
    classes, order = federation_classes(local, site.classes, site.data.classes is not None, segmentation)
    x, y = arrays["train_images"], _relabel(arrays["train_labels"], order)
    if len(y) < 2:
        raise SiteDataError("no usable training images at this hospital")
    train, val = split_train_val(to_tensor(x, image_size), targets(y, image_size), VAL_FRACTION, 0)
    test = None
    if len(arrays["test_labels"]):  # the held-out files: never trained or validated on
        test = Split(to_tensor(arrays["test_images"], image_size), targets(_relabel(arrays["test_labels"], order), image_size))
    device = resolve_device(site.compute.device)
    return Hospital(data=SiteData(name=site.site, train=train, val=val), privacy=site.privacy, test=test,
                    evaluation_split=site.evaluation.split, min_cases=site.evaluation.min_cases,
                    noise_epsilon=site.evaluation.noise_epsilon,
                    ledger_root=site.state_dir, num_classes=len(classes), classes=classes, meta=meta,
                    statistics=site.statistics, device=device,
                    threads=site.compute.threads or cores(),
                    precision=resolve_precision(site.compute.precision, device, site.privacy.enabled),
                    deterministic=site.compute.deterministic)
