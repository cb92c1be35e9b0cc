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
    central_dp: "CentralDPConfig | None" = Field(None, description="hospital-level DP wrapper (Flower)")


class CentralDPConfig(Strict):
    """Hospital-level (user-level) DP with Flower's wrappers: each hospital's model update is
    clipped (by the server, or by the hospital before it leaves) and the server adds Gaussian
    noise to the aggregate."""

    clipping: Literal["server-fixed", "server-adaptive", "client-fixed", "client-adaptive"]
    noise_multiplier: float = Field(1.0, ge=0)
    clipping_norm: float = Field(1.0, gt=0, description="fixed: the bound; adaptive: its starting value")
    target_clipped_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive only")
    clip_norm_lr: float = Field(0.2, gt=0, description="adaptive only")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="adaptive only: noise on the clipped count; Flower's default is sites/20"
    )


StrategyConfig.model_rebuild()
