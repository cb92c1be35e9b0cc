"""A run's plan and its observer: what the ServerApp was asked to do (config, task shape, run
folder, hospitals' names) and where round events go (the live table, or the log)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import Message

from common.i18n import N_, _
from medimaging.datasets import Split
from medimaging.models import build_model
from protocol.messages import Refusal

from server.engine.config import RunConfig
from server.records.digest import MANY, digest
from server.records.outputs import score_of
from server.records.words import refusal_line, status_word

log = logging.getLogger("aseanfl")
PHASES = {"training": N_("training"), "validating": N_("validating"),
          "cross-site evaluation": N_("cross-site evaluation"), "head calibration": N_("head calibration")}


@dataclass(frozen=True)
class TaskShape:
    in_channels: int
    num_classes: int  # classes, findings, or mask labels with the background
    image_size: int
    task: str = "classification"  # or "segmentation"
    spatial_dims: int = 2

    def model(self, cfg: RunConfig, private: bool = False, bare: bool = False) -> torch.nn.Module:
        return build_model(cfg.model, self.in_channels, self.num_classes, self.image_size, private, self.spatial_dims,
                           bare)

    def data(self) -> dict:
        """What the run's data are, as summary.json and config.yaml's first line say it."""
        return {"spatial_dims": self.spatial_dims, "image_size": self.image_size, "channels": self.in_channels,
                "task": self.task}


class Progress:
    """Receives round events; the CLI shows them live, the default logs them (in the reader's
    language: `aseanfl run` passes the coordinator's to the ServerApp)."""

    def round_started(self, rnd: int, total: int, phase: str) -> None:
        log.info(_("round {round}/{total}: {phase}", round=rnd, total=total, phase=_(PHASES.get(phase, phase))))

    def round_finished(self, rnd: int, total: int, rows: list[dict]) -> None:
        if len(rows) - 1 > MANY:  # hundreds of hospitals: a digest, then the sites worth a line
            d = digest(rows)
            log.info("round %d: %d sites: %s; %s", rnd, d.sites, d.counts(), d.spread())
            rows = d.shown() + [r for r in rows if r["site"] == "global"]
        for row in rows:
            key = score_of([row])[0]
            status = row.get("status") or ""
            log.info("round %d %-14s %s val_%s=%s test_%s=%s", rnd, row["site"],
                     status if row["site"] == "global" else status_word(status), key, row.get(f"val_{key}"), key,
                     row.get(f"test_{key}"))

    def problem(self, text: str) -> None:
        log.warning(text)

    def refused(self, rnd: int, site: str, refusal: Refusal) -> None:
        log.warning(refusal_line(rnd, site, refusal))

    def received(self, rnd: int, phase: str, reply: Message) -> None:
        """Every reply as it arrived, before any check (audits and tests look here)."""


@dataclass
class Plan:
    """Everything the ServerApp needs for one run."""

    config: RunConfig
    shape: TaskShape
    run_dir: Path
    test: Split | None = None
    progress: Progress = field(default_factory=Progress)
    private: bool = False  # some hospital trains with DP-SGD: build DP-compatible models
    sites: int | None = None  # hospitals in the federation (central DP scales its noise by the sampled share)
    stop: threading.Event = field(default_factory=threading.Event)  # set when the engine under the run died
    node_names: dict[int, str] = field(default_factory=dict)  # a deployment's registered hospitals by node id
    registry: Path | None = None  # a deployment's server/registered.json, read again each round (revocations)
    site_names: list[str] | None = None  # a simulation's hospitals, in partition-id order
    resume: bool = False  # continue the run in run_dir from its checkpoint
    classes: list[str] | None = None  # a deployment's class names, agreed by the hospitals before round 1
    created: float = field(default_factory=time.time)  # the command's start: wall time counts start-up

    def __getstate__(self) -> dict:  # a copy sent to another process gets its own stop signal
        return {k: v for k, v in self.__dict__.items() if k != "stop"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, stop=threading.Event())


class RunAborted(RuntimeError):
    """The engine that delivers messages is gone; waiting for replies would never end."""
