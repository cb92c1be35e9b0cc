"""What a hospital tells the server about its data, never a per-image value: its class names
(asked before every run, so hospitals that name or order the classes differently are found
before they train against each other) and its statistics (`aseanfl stats -f`), under its own
floor, release list and noise from site.yaml (medimaging/stats.py)."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord

from medimaging.stats import SiteStats, site_stats

from client.training.contest import secret_seed
from client.training.hospital import Hospital
from protocol.messages import DescribeSpec


def task_kind(hospital: Hospital) -> str:
    y = hospital.data.train.y
    return "segmentation" if y.ndim >= 3 else "multilabel" if y.ndim == 2 else "classification"


def class_names(hospital: Hospital) -> ConfigRecord:
    names = hospital.classes or [str(i) for i in range(hospital.num_classes or 0)]
    return ConfigRecord({"names": list(names), "task": task_kind(hospital)})


def statistics(hospital: Hospital, spec: DescribeSpec) -> SiteStats:
    """This hospital's statistics at the larger of its own floor and the server's."""
    policy, kind = hospital.statistics, task_kind(hospital)
    labels = {"train": hospital.data.train.y.numpy(), "validation": hospital.data.val.y.numpy()}
    if hospital.test is not None and len(hospital.test):
        labels["test"] = hospital.test.y.numpy()
    k = hospital.num_classes or (labels["train"].shape[1] if kind == "multilabel" else int(labels["train"].max()) + 1)
    names = hospital.classes or [str(i) for i in range(k)]
    floor = max(policy.min_count, spec.min_count)
    rng = None
    if policy.noise_epsilon is not None:
        # keyed by what is asked, not by the request: asking again gets the same noise, not a fresh draw to average
        asked = f"statistics|{floor}|{','.join(policy.release)}|{policy.noise_epsilon}".encode()
        rng = np.random.default_rng(secret_seed(hospital, asked))
    return site_stats(kind, names, labels, hospital.meta, min_count=floor, release=list(policy.release),
                      noise_epsilon=policy.noise_epsilon, rng=rng)
