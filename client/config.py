"""Pydantic schema of a hospital's local training settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from medimaging.config import FilesConfig, Strict


class TrainConfig(Strict):
    local_epochs: int = Field(2, ge=1, le=100)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=10)
    optimizer: Literal["adam", "sgd"] = "adam"


class PrivacyConfig(Strict):
    """A hospital's sample-level differential privacy policy (DP-SGD with Opacus)."""

    enabled: bool = False
    target_epsilon: float = Field(8.0, gt=0, description="epsilon one planned run is calibrated to reach")
    budget_epsilon: float | None = Field(
        None, gt=0, description="hard cap on the ledger's total epsilon across rounds and runs; default target_epsilon"
    )
    delta: float | None = Field(None, gt=0, lt=1, description="default 1/(10 n) for n local training images")
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping bound")
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["hooks", "ghost"] = Field("hooks", description="ghost clipping saves memory")
    ledger_dir: Path | None = Field(None, description="where the privacy ledger lives; default <run folder>/privacy")

    @property
    def cap(self) -> float:
        return self.budget_epsilon if self.budget_epsilon is not None else self.target_epsilon


class SiteConfig(Strict):
    """site.yaml: what a hospital's daemon knows about itself. None of it is ever sent."""

    site: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="the hospital's id in the federation")
    data: FilesConfig
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
