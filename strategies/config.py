"""Pydantic schema of the aggregation strategy section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medimaging.config import Strict


class StrategyConfig(Strict):
    name: Literal["fedavg"] = "fedavg"
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of hospitals sampled to train each round")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="share sampled for federated validation")
    min_sites: int = Field(2, ge=1, description="a round waits until this many hospitals are connected")
    central_dp: "CentralDPConfig | None" = Field(None, description="hospital-level DP wrapper (Flower)")
    secure_aggregation: "SecAggConfig | None" = Field(None, description="Flower's SecAgg+: the server sees only the sum")

    @model_validator(mode="after")
    def _secure_composes(self) -> "StrategyConfig":
        dp = self.central_dp
        if self.secure_aggregation is not None and dp is not None and dp.clipping != "client-fixed":
            raise ValueError(
                f"secure_aggregation works with central_dp.clipping 'client-fixed' only, not '{dp.clipping}': "
                "under SecAgg+ the server sees just the sum, so it cannot clip each hospital, and adaptive "
                "clipping needs each hospital's clipped bit in the clear"
            )
        return self


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


class SecAggConfig(Strict):
    """Flower's SecAgg+ (masked, quantised sums). Shares and threshold: an int is a count of
    hospitals, a float a share of those sampled in the round."""

    num_shares: int | float = Field(1.0, gt=0, description="neighbours each hospital's key shares go to")
    reconstruction_threshold: int | float = Field(0.67, gt=0, description="shares needed to unmask a dropped hospital")
    max_weight: float = Field(10_000, gt=0, description="largest training-set size a hospital may weigh in with")
    clipping_range: float = Field(8.0, gt=0, description="model values are clipped to +-this before quantising")
    quantization_range: int = Field(2**22, gt=0)
    modulus_range: int = Field(2**32, gt=0)


StrategyConfig.model_rebuild()
