"""Pydantic schema of the aggregation strategy section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medimaging.config import Strict


class StrategyConfig(Strict):
    name: Literal["fedavg"] = "fedavg"
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of hospitals sampled to train each round")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="share sampled for federated validation")
    min_sites: int = Field(2, ge=1, description="a round waits until this many hospitals are connected")
