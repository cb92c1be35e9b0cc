"""Pydantic schema of the aggregation strategy section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, TypeAdapter, model_validator

from medimaging.config import Strict
from protocol.messages import Personalization


STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg",
              "krum", "multikrum", "bulyan", "scaffold")


class UpdateValidation(Strict):
    """Server-side checks on every hospital's update before any strategy sees it."""

    enabled: bool = True
    norm_factor: float = Field(10.0, gt=1, description="reject an update whose norm exceeds this x the round's median")
    min_sites_for_norm: int = Field(3, ge=3, description="the norm check needs this many updates to have a median")


class CompressionConfig(Strict):
    """How hospitals encode their model updates (common/compression.py)."""

    codec: Literal["none", "fp16", "int8", "int4"] = Field("none", description="none sends the trained weights as fp32")
    block: int = Field(256, ge=8, le=65536, description="int8/int4: values per scale")
    topk: float | None = Field(None, gt=0, le=1, description="send only this share of the update's largest values")
    error_feedback: bool = Field(True, description="the hospital adds what the last encoding lost to the next update")
    downlink: Literal["none", "fp16", "int8", "int4"] = Field(
        "none", description="the server sends the global model as a delta in this codec (server/engine/downlink.py)")


class StrategyConfig(Strict):
    name: Literal[STRATEGIES] = "fedavg"  # type: ignore[valid-type]
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of hospitals sampled to train each round")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="share sampled for federated validation")
    min_sites: int = Field(2, ge=1, description="a round waits until this many hospitals are connected")
    proximal_mu: float = Field(0.01, ge=0, description="fedprox: weight of the proximal term")
    server_lr: float | None = Field(
        None, gt=0, description="server learning rate: fedadam/fedyogi/fedadagrad (eta, default 0.01), fedavgm (default 1.0)"
    )
    server_momentum: float = Field(0.9, ge=0, lt=1, description="fedavgm")
    beta_1: float = Field(0.9, ge=0, lt=1, description="fedadam/fedyogi")
    beta_2: float = Field(0.99, ge=0, lt=1, description="fedadam/fedyogi")
    tau: float = Field(1e-3, gt=0, description="fedadam/fedyogi/fedadagrad: adaptivity")
    trim_beta: float = Field(0.2, gt=0, lt=0.5, description="fedtrimmedavg: share cut from each end")
    num_malicious: int = Field(1, ge=0, description="krum/multikrum/bulyan: hospitals assumed hostile")
    num_selected: int = Field(0, ge=0, description="multikrum: updates averaged (0: all but num_malicious)")
    fedbn: bool = Field(False, description="normalisation layers stay at each hospital, never sent")
    personalization: Personalization = Field(
        default_factory=Personalization, description="each hospital's own model: fedper/fedrep (its own classifier "
        "head, never sent; the body is federated), ditto/apfl (its own whole model beside the global one)")
    finetune_eval: bool = Field(False, description="also validate the global model after 1 local epoch")
    calibrate_head: bool = Field(False, description=(
        "after the last round, refit the classifier head from the hospitals' feature sums (label skew: the body is "
        "better than the head; CCVR's idea in closed form, medimaging/calibration.py): model_calibrated.safetensors"))
    personal_heads: bool = Field(False, description=(
        "with calibrate_head: also fit each hospital its own head from the same sums (the federation's covariance, its "
        "own class means and shares shrunk towards the federation's) and send it only to that hospital, which keeps it "
        "as its personalized model; nothing more leaves a hospital"))
    validation: UpdateValidation = Field(default_factory=UpdateValidation)
    central_dp: "CentralDPConfig | None" = Field(None, description="hospital-level DP wrapper (Flower)")
    secure_aggregation: "SecAggConfig | None" = Field(None, description="Flower's SecAgg+: the server sees only the sum")
    compression: CompressionConfig = Field(default_factory=CompressionConfig, description="hospitals' updates encoded")

    @model_validator(mode="before")
    @classmethod
    def _fedper_shorthand(cls, data):
        """`fedper: true` (the earlier spelling) is `personalization: {method: fedper}`."""
        if not isinstance(data, dict) or "fedper" not in data:
            return data
        data = dict(data)
        if TypeAdapter(bool).validate_python(data.pop("fedper")):  # as a bool field reads it: true, "yes", 1
            personal = data.get("personalization") or {}
            method = personal.get("method", "fedper") if isinstance(personal, dict) else personal.method
            if method != "fedper":
                raise ValueError(f"fedper: true and personalization.method {method}: choose one")
            data["personalization"] = {**(personal if isinstance(personal, dict) else personal.model_dump()),
                                       "method": "fedper"}
        return data

    @property
    def fedper(self) -> bool:
        """The classifier head stays at each hospital (FedPer or FedRep)."""
        return self.personalization.keeps_head

    @model_validator(mode="after")
    def _personalization_composes(self) -> "StrategyConfig":
        method = self.personalization.method
        if self.name == "scaffold" and self.personalization.extra_passes:
            raise ValueError(f"scaffold with personalization.method {method}: not supported (its extra local passes "
                             "would need their own control variates); use fedper or none with scaffold")
        return self

    @model_validator(mode="after")
    def _calibration_composes(self) -> "StrategyConfig":
        if self.personal_heads and not self.calibrate_head:
            raise ValueError("personal_heads needs calibrate_head: true (the heads are fit from its feature sums)")
        if self.personal_heads and self.personalization.method != "none":
            raise ValueError(f"personal_heads with personalization.method {self.personalization.method}: choose one "
                             "personalized model per hospital")
        if not self.calibrate_head:
            return self
        why = ("secure_aggregation: each hospital's feature sums would reach the server on their own"
               if self.secure_aggregation is not None
               else "central_dp: the feature sums would leave without clipping or noise" if self.central_dp is not None
               else f"personalization.method {self.personalization.method}: the head stays at each hospital"
               if self.fedper else None)
        if why:
            raise ValueError(f"calibrate_head does not go with {why}")
        return self

    @model_validator(mode="after")
    def _compression_composes(self) -> "StrategyConfig":
        c, dp = self.compression, self.central_dp
        if c.downlink != "none" and self.secure_aggregation is not None:
            raise ValueError("compression.downlink: SecAgg+'s workflow sends the model to the hospitals itself; "
                             "set compression.downlink: none with it")
        if c.codec == "none" and c.topk is None:
            return self
        if self.secure_aggregation is not None:
            raise ValueError("compression: SecAgg+ sums masked integer vectors and quantises them itself "
                             "(secure_aggregation.quantization_range); set compression.codec: none with it")
        if dp is not None and dp.clipping.startswith("client"):
            raise ValueError(f"compression with central_dp.clipping '{dp.clipping}': the decoded update can exceed the "
                             "norm the hospital clipped to, and the noise is calibrated to it; use server-fixed or "
                             "server-adaptive clipping (the server clips the decoded update)")
        return self

    @model_validator(mode="after")
    def _scaffold_composes(self) -> "StrategyConfig":
        if self.name != "scaffold":
            return self
        if self.central_dp is not None:
            raise ValueError("scaffold with central_dp: each hospital's control variate would leave unclipped and "
                             "un-noised beside its protected update; use DP at the hospitals or another strategy")
        c = self.compression
        if c.codec != "none" or c.topk is not None or c.downlink != "none":
            raise ValueError("scaffold with compression: the control variates are sent as they are; set "
                             "compression.codec: none and compression.downlink: none")
        return self

    @model_validator(mode="after")
    def _secure_composes(self) -> "StrategyConfig":
        dp = self.central_dp
        if self.secure_aggregation is None:
            return self
        if dp is not None and dp.clipping != "client-fixed":
            raise ValueError(
                f"secure_aggregation works with central_dp.clipping 'client-fixed' only, not '{dp.clipping}': "
                "under SecAgg+ the server sees just the sum, so it cannot clip each hospital, and adaptive "
                "clipping needs each hospital's clipped bit in the clear"
            )
        if self.name not in ("fedavg", "fedprox"):
            raise ValueError(f"secure_aggregation gives the server a weighted mean only: '{self.name}' needs each "
                             "hospital's update (robust strategies) or is not wired to the secure sum (server "
                             "optimisers); use fedavg or fedprox")
        if self.fedbn or self.fedper:
            raise ValueError(f"secure_aggregation with {'fedbn' if self.fedbn else self.personalization.method} is not "
                             "supported yet")
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
