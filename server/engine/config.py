"""Pydantic schema of a federated run as the coordinator configures it."""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import Field, field_validator, model_validator

from protocol.messages import TrainConfig
from medimaging.config import DataConfig, ModelConfig, Strict
from strategies.config import StrategyConfig


class ServerConfig(Strict):
    rounds: int = Field(8, ge=1, le=10_000)
    round_timeout_s: float = Field(600.0, gt=0, description="how long a round waits for hospitals' replies")
    rejoin_wait_s: float = Field(90.0, ge=0, description="a round waits this long for a hospital that was connected at "
                                                         "the round before and is reconnecting (a daemon restarted "
                                                         "after a crash needs up to ~60 s); once per absence")
    output_dir: Path = Field(Path("runs"), description="run folders are created inside it")
    tracking: Literal["none", "tensorboard", "mlflow"] = Field(
        "none", description="also write metrics.csv's values to TensorBoard (run folder) or MLflow (server/records/tracking.py)")
    tracking_uri: str | None = Field(None, description="MLflow's tracking URI; default a SQLite file beside the run folders")
    select_by: Literal["score", "loss"] = Field("score", description=(
        "the federated validation figure that picks model_best.safetensors: score = AUC (Dice for segmentation), "
        "loss = the validation loss, which pools exactly over hospitals where their AUCs are averaged; with few "
        "validation cases a hospital (AdrenalMNIST3D: ~20) the averaged AUC picks noisy rounds (docs/benchmarks.md)"))
    cross_site: bool = Field(False, description="after the last round, score the global model and each hospital's "
                                                "final-round model at every hospital (server/engine/cross_site.py)")
    cross_site_min_cases: int = Field(20, ge=1, description="cross-site figures on fewer positives or negatives are withheld")

    @field_validator("tracking")
    @classmethod
    def _installed(cls, kind: str) -> str:
        from server.records.tracking import missing

        why = missing(kind)
        if why:
            raise ValueError(why)
        return kind


class RunConfig(Strict):
    name: str = Field("aseanfl", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(42, ge=0)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
    server: ServerConfig = ServerConfig()

    @model_validator(mode="after")
    def _scaffold_trains_with_sgd(self) -> "RunConfig":
        if self.strategy.name == "scaffold" and self.train.optimizer != "sgd":
            raise ValueError("strategy.name scaffold corrects plain SGD steps; set train.optimizer: sgd (and a larger "
                             "train.lr, e.g. 0.01)")
        return self

    @model_validator(mode="after")
    def _cross_site_composes(self) -> "RunConfig":
        s = self.strategy
        if not self.server.cross_site:
            return self
        why = ("secure_aggregation: the server never sees one hospital's model" if s.secure_aggregation is not None
               else "central_dp: one hospital's model is protected only inside the noised aggregate"
               if s.central_dp is not None
               else "fedbn: the hospitals' models come back without their normalisation layers" if s.fedbn
               else f"personalization.method {s.personalization.method}: the hospitals' models come back without their "
               "heads" if s.fedper else None)
        if why:
            raise ValueError(f"server.cross_site does not go with strategy.{why}")
        return self

    @model_validator(mode="after")
    def _fine_tuning_composes(self) -> "RunConfig":
        """model.freeze / model.adapters decide which arrays travel; so do these, each on its own terms."""
        s, m = self.strategy, self.model
        if not m.fine_tunes_part:
            return self
        field = "model.adapters" if m.adapters else "model.freeze"
        if m.weights is None:
            raise ValueError(f"{field}: the frozen layers would keep their random start; set model.weights (a "
                             "pretrained file) to fine-tune from")
        why = ("fedbn: both decide which arrays stay at the hospitals" if s.fedbn
               else f"personalization.method {s.personalization.method}: its head and personal models are built for a "
               "whole trainable model" if s.personalization.method != "none"
               else "name scaffold: its control variates are kept for every parameter" if s.name == "scaffold"
               else "secure_aggregation: SecAgg+ carries the model as Flower's legacy parameters, without the record "
               "that brings the frozen layers" if s.secure_aggregation is not None else None)
        if why:
            raise ValueError(f"{field} does not go with strategy.{why}; train "
                             "the whole model (no model.freeze, no model.adapters) with it")
        return self
