"""Pydantic schema of a hospital's local training settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medimaging.config import Strict


class TrainConfig(Strict):
    local_epochs: int = Field(2, ge=1, le=100)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=10)
    optimizer: Literal["adam", "sgd"] = "adam"
