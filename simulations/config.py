"""Pydantic schema of a simulation: a federated run plus the simulated hospitals and engine."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from client.config import PrivacyConfig
from medimaging.compute import Precision
from medimaging.config import MODEL_MIN_SIZE, Strict
from medimaging.yamlconfig import ConfigError, describe, parse_sets, read_config, set_dotted  # noqa: F401
from server.engine.config import RunConfig

DEFAULT_SITES = ["nanning", "hanoi", "bangkok", "kuala-lumpur", "jakarta", "manila"]


class PartitionConfig(Strict):
    """How an npz's training images are split across hospitals (the synthetic default is
    generated per hospital, already non-IID)."""

    scheme: Literal["iid", "dirichlet", "quantity"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; smaller = more label skew")
    min_partition_size: int = Field(10, ge=1)


class EngineConfig(Strict):
    """Flower Simulation Engine (Ray) settings."""

    cpus_per_site: float = Field(1.0, gt=0)
    gpus_per_site: float = Field(0.0, ge=0)
    ray_address: str | None = Field(None, description="'auto' or host:port to join a running Ray cluster")
    verbose: bool = False
    precision: Precision = Field(
        "auto", description="each simulated hospital's autocast: as site.yaml's compute.precision (auto: bf16 on a GPU)")
    deterministic: bool = Field(False, description="deterministic algorithms only (as compute.deterministic)")


class SimulationConfig(RunConfig):
    sites: list[str] = Field(default_factory=lambda: list(DEFAULT_SITES), min_length=1)
    partition: PartitionConfig = PartitionConfig()
    engine: EngineConfig = EngineConfig()
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="every hospital's DP policy")
    site_privacy: dict[str, dict] = Field(default_factory=dict, description="per-hospital overrides of `privacy`")
    bundle: Path | None = Field(None, description="a MONAI bundle folder as the task: its network and weights become "
                                                  "model.*, its inputs and outputs are checked against the data "
                                                  "(medimaging/bundles.py)")

    @model_validator(mode="before")
    @classmethod
    def _from_bundle(cls, data):  # not again for a run's config.yaml, whose model holds the network
        if not (isinstance(data, dict) and data.get("bundle")):
            return data
        from medimaging.bundles import bundle_model, holds_network, read_bundle

        if holds_network(data.get("model")):
            return data
        return {**data, "model": bundle_model(data.get("model"), read_bundle(Path(data["bundle"])), "bundle")}

    def site_policy(self, site: str) -> PrivacyConfig:
        return PrivacyConfig.model_validate({**self.privacy.model_dump(), **self.site_privacy.get(site, {})})

    @property
    def private(self) -> bool:
        return any(self.site_policy(s).enabled for s in self.sites)

    @field_validator("sites", mode="before")
    @classmethod
    def _sites_from_count(cls, value):
        if isinstance(value, int):  # `sites: 3` = the first three default hospitals (then site-7, ...)
            if value < 1:
                raise ValueError("must be at least 1")
            return [DEFAULT_SITES[i] if i < len(DEFAULT_SITES) else f"site-{i + 1}" for i in range(value)]
        return value

    @field_validator("sites")
    @classmethod
    def _unique(cls, sites: list[str]) -> list[str]:
        if len(set(sites)) != len(sites):
            raise ValueError("site names must be unique")
        return sites

    @model_validator(mode="after")
    def _consistent(self) -> "SimulationConfig":
        if self.strategy.min_sites > len(self.sites):
            raise ValueError(
                f"strategy.min_sites={self.strategy.min_sites} exceeds the {len(self.sites)} simulated sites: "
                f"simulate more hospitals (--sites {self.strategy.min_sites}) or let rounds start with fewer "
                f"(--set strategy.min_sites={len(self.sites)})"
            )
        for site, override in self.site_privacy.items():
            if site not in self.sites:
                raise ValueError(f"site_privacy.{site}: not one of the sites {self.sites}")
            try:
                self.site_policy(site)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise ValueError(f"site_privacy.{site}.{where}: {err['msg']} (got {str(err.get('input'))!r})") from None
        size = self.data.image_size
        if size is not None and size < MODEL_MIN_SIZE[self.model.name]:
            raise ValueError(
                f"data.image_size={size} is too small for model.name={self.model.name} "
                f"(needs >= {MODEL_MIN_SIZE[self.model.name]})"
            )
        return self


def load_config(path: Path | None = None, overrides: dict | None = None, schema: type[BaseModel] | None = None):
    """YAML file (optional) + dotted overrides -> validated `schema` (default SimulationConfig)."""
    return read_config(path, overrides, schema or SimulationConfig)


def dump_config(cfg: SimulationConfig, data_note: str | None = None) -> str:
    """The config as YAML; with real data (path or files) its unused synthetic section is left out
    (a 2D default beside a 3D npz misleads); `data_note` goes first as a comment."""
    dumped = cfg.model_dump(mode="json")
    if cfg.data.path is not None or cfg.data.files is not None:
        dumped["data"].pop("synthetic", None)
    head = f"# {data_note}\n" if data_note else ""
    return head + yaml.safe_dump(dumped, sort_keys=False)
