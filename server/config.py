"""Pydantic schema of a federated run as the coordinator configures it."""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import Field, field_validator

from client.config import TrainConfig
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
        "none", description="also write metrics.csv's values to TensorBoard (run folder) or MLflow (server/tracking.py)")
    tracking_uri: str | None = Field(None, description="MLflow's tracking URI; default a SQLite file beside the run folders")

    @field_validator("tracking")
    @classmethod
    def _installed(cls, kind: str) -> str:
        from .tracking import missing

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
