"""What a hospital's worker knows about its own site: its data splits, privacy policy, device and
evaluation rules. Loaded by site.py (a deployment) or simulations/ (a simulated hospital); nothing
here is ever sent."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import Context

from medimaging.datasets import SiteData, Split

from client.config import PrivacyConfig, StatisticsSite


@dataclass
class Hospital:
    """What a ClientApp knows about its own site. Nothing here is ever sent."""

    data: SiteData
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    ledger_root: Path = Path("privacy")  # ledgers go to <ledger_root>/<run>/privacy unless policy.ledger_dir
    num_classes: int | None = None  # a deployed site's classes, checked against the run's model
    classes: list[str] | None = None  # their names (the federation's, after site.yaml's classes: mapping)
    meta: list[dict] = field(default_factory=list)  # per image: modality, size, intensity (medimaging/stats.py)
    statistics: StatisticsSite = field(default_factory=StatisticsSite)  # what `aseanfl stats` may learn
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where it trains and evaluates
    threads: int = 1  # CPU threads (a simulated hospital shares the machine: one)
    precision: torch.dtype | None = None  # autocast dtype (None: fp32), from compute.precision
    deterministic: bool = False  # compute.deterministic
    min_cases: int = 20  # federated evaluation: figures on fewer positives or negatives are withheld here
    test: Split | None = None  # the held-out files (a deployed hospital's test split), never trained on
    evaluation_split: str | None = None  # site.yaml evaluation.split: the cases it scores submitted models on
    noise_epsilon: float | None = None  # site.yaml evaluation.noise_epsilon: figures released under DP only


# (node context, image side in px) -> this hospital.
HospitalLoader = Callable[[Context, int], Hospital]
