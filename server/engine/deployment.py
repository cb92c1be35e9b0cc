"""A run on real hospitals (Flower's Deployment Engine): the coordinator's config and the plan the
ServerApp follows. The server holds no images: the task's shape comes from the config, the
hospitals are whichever registered SuperNodes are connected."""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import time
from pathlib import Path

import yaml
from flwr.app import Context
from flwr.serverapp import Grid
from pydantic import Field, model_validator

from common.i18n import _
from medimaging.config import MODEL_MIN_SIZE, Dims, Strict, Task, check_augment, check_model_task
from medimaging.yamlconfig import ConfigError, flat_overrides, parse_sets, read_config

from server.engine import checkpoint
from server.engine.config import RunConfig
from server.operations.control import RUNS_ENV
from server.engine.names import registered_names
from server.engine.plan import Plan, TaskShape

log = logging.getLogger("aseanfl")


class TaskConfig(Strict):
    """What every hospital's images are decoded to (their site.yaml must agree)."""

    in_channels: int = Field(1, ge=1, le=4)
    num_classes: int = Field(2, ge=2, description="classes, findings (multi-label), or mask labels with the background")
    image_size: int = Field(64, ge=8, le=512)
    kind: Task = Field("classification", description="classification (incl. multi-label) or segmentation")
    spatial_dims: Dims = Field(2, description="2 = images, 3 = volumes (site.yaml data.files.spatial_dims)")
    classes: list[str] | None = Field(None, description="the federation's class names in label order; every hospital "
                                                        "must give these (site.yaml classes: maps its own); default: "
                                                        "the hospitals must agree among themselves")
    bundle: Path | None = Field(None, description="a MONAI bundle folder on the coordinator as the task: it sets the "
                                                  "fields above and model.* (medimaging/bundles.py); only its network's "
                                                  "arguments and weights reach hospitals")

    @model_validator(mode="after")
    def _names(self) -> "TaskConfig":
        if self.classes is not None and (len(self.classes) != self.num_classes or len(set(self.classes)) < len(self.classes)):
            raise ValueError(f"classes: {len(self.classes)} names for num_classes={self.num_classes}, or a name twice")
        return self


class DeploymentConfig(RunConfig):
    task: TaskConfig = TaskConfig()
    wait_for_sites: int | None = Field(None, ge=1, description="hospitals to wait for before round 1; default strategy.min_sites")
    wait_timeout_s: float = Field(300.0, gt=0, description="how long to wait for them; then start with those connected")
    dp_models: bool = Field(True, description="DP-SGD-compatible layers, so any hospital may train privately")

    @model_validator(mode="before")
    @classmethod
    def _from_bundle(cls, data):  # not again for a run's config.yaml, whose model holds the network
        task = data.get("task") if isinstance(data, dict) else None
        if not (isinstance(task, dict) and task.get("bundle")):
            return data
        from medimaging.bundles import holds_network

        return data if holds_network(data.get("model")) else {**data, **bundle_task(task, data.get("model"))}

    @model_validator(mode="after")
    def _fits_task(self) -> "DeploymentConfig":
        try:
            check_model_task(self.model, self.task.kind, self.task.image_size)
            check_augment(self.train.augment, self.task.kind, self.task.spatial_dims)
        except ValueError as exc:
            raise ValueError(f"task.kind={self.task.kind}: {exc}") from None
        return self


def bundle_task(task: dict, model) -> dict:
    """task: and model: as the bundle sets them; a field given in federation.yaml must agree."""
    from medimaging.bundles import BundleError, bundle_model, check_network, read_bundle

    bundle = read_bundle(Path(task["bundle"]))
    wanted = {"in_channels": bundle.in_channels, "num_classes": bundle.num_classes, "kind": bundle.kind,
              "spatial_dims": bundle.spatial_dims}
    for key, value in wanted.items():
        if task.get(key) is not None and str(task[key]) != str(value):
            raise BundleError(f"task.{key}: {task[key]}, but bundle {bundle.path} says {value} (metadata.json "
                              "network_data_format); leave it out")
    size = task.get("image_size") or bundle.side
    if size is None:
        raise BundleError(f"task.image_size: bundle {bundle.path} takes any multiple of {bundle.multiple}; set one")
    bundle.check_size(int(size), "task.image_size")
    check_network(bundle, int(size))
    return {"task": {**task, **wanted, "image_size": int(size)}, "model": bundle_model(model, bundle, "task.bundle")}


def config_from_run_config(run_config: dict) -> DeploymentConfig:
    """run config: config-yaml (the coordinator's federation.yaml, as text) and set (overrides)."""
    return check_run_config(str(run_config.get("config-yaml", "") or ""), str(run_config.get("set", "") or "").split())


def check_run_config(text: str, sets: list[str]) -> DeploymentConfig:
    """federation.yaml's text plus dotted overrides -> the run's config, validated as the ServerApp
    validates it (`aseanfl run` and the console call it before anything is sent); ConfigError
    with one line per problem, each starting with the field's dotted name."""
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("config: not valid YAML: " + " ".join(str(exc).split())) from None
    if not isinstance(tree, dict):
        raise ConfigError("config: expected a mapping of sections (task:, model:, strategy:, ...)")
    cfg = read_config(None, {**flat_overrides(tree), **parse_sets(sets)}, DeploymentConfig)
    if cfg.task.image_size < MODEL_MIN_SIZE[cfg.model.name]:
        raise ConfigError(f"task.image_size: {cfg.task.image_size} is too small for model.name={cfg.model.name}")
    if cfg.model.weights is not None:  # the file is read and fitted to the model now, not at round 1
        from server.engine.updates import check_start

        t = cfg.task
        shape = TaskShape(t.in_channels, t.num_classes, t.image_size, t.kind, t.spatial_dims)
        cfg.model.weights_sha256 = check_start(cfg, shape, cfg.dp_models).sha256
    return cfg


def _stream_logs() -> None:
    """The ServerApp's progress lines reach `flwr log` / `aseanfl run` through stdout."""
    logger = logging.getLogger("aseanfl")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("aseanfl: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def await_sites(grid: Grid, wanted: int, timeout: float) -> int:
    """Wait until `wanted` hospitals are connected (or the timeout); return how many are."""
    deadline = time.monotonic() + timeout
    while True:
        count = len(list(grid.get_node_ids()))
        if count >= wanted or time.monotonic() > deadline:
            return count
        time.sleep(1.0)


_HELD: list = []  # run folder locks, held as long as this ServerApp process lives


def lock_run_dir(run_dir: Path) -> bool:
    """Take the run folder for this process (the kernel lets go when it dies, kill -9 included);
    False if a live process holds it."""
    handle = open(run_dir / ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return False
    _HELD.append(handle)
    return True


def run_busy(run_dir: Path) -> bool:
    """A live ServerApp holds the run folder (`lock_run_dir`)."""
    if not (run_dir / ".lock").exists():
        return False
    with open(run_dir / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def run_folder(runs: Path, run_id: int | str) -> Path:
    return (runs / f"run-{run_id}").resolve()


def deployment_plan(context: Context, grid: Grid) -> Plan:
    _stream_logs()
    cfg = config_from_run_config(context.run_config)
    runs = Path(os.environ.get(RUNS_ENV) or cfg.server.output_dir)
    resume = str(context.run_config.get("resume", "") or "")
    run_dir = run_folder(runs, resume or context.run_id)
    if resume:  # `aseanfl run --resume`: the old folder, checked before anything in it changes
        if not run_dir.is_dir():
            raise ConfigError(f"resume: no run folder {run_dir}")
        checkpoint.inspect(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not lock_run_dir(run_dir):
        raise ConfigError(f"{run_dir}: another server process is running this run")
    t = cfg.task
    shape = TaskShape(t.in_channels, t.num_classes, t.image_size, t.kind, t.spatial_dims)
    if cfg.model.weights is not None:  # checked by check_run_config; its sha256 goes into config.yaml
        log.info("start model: %s (sha256 %s)", cfg.model.weights, cfg.model.weights_sha256)
    if resume:
        log.info(_("run {run} continues run {resumed} in {folder}", run=context.run_id, resumed=resume, folder=run_dir))
    else:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    wanted = cfg.wait_for_sites or cfg.strategy.min_sites
    log.info(_("waiting for {count} hospital(s) (up to {seconds} s)", count=wanted, seconds=f"{cfg.wait_timeout_s:g}"))
    connected = await_sites(grid, wanted, cfg.wait_timeout_s)
    if connected < cfg.strategy.min_sites:
        raise ConfigError(_("{count} hospital(s) connected after {seconds} s, fewer than strategy.min_sites={wanted}",
                            count=connected, seconds=f"{cfg.wait_timeout_s:g}", wanted=cfg.strategy.min_sites))
    log.info(_("{count} hospital(s) connected; run folder {folder}", count=connected, folder=run_dir))
    from server.engine.census import check_classes

    names = registered_names(runs.parent / "registered.json")
    classes = check_classes(grid, dict(names), t.image_size, t.classes, f"classes-{context.run_id}",
                            cfg.server.round_timeout_s)
    return Plan(classes=classes, config=cfg, shape=shape, run_dir=run_dir,
                private=cfg.dp_models, sites=connected, node_names=registered_names(runs.parent / "registered.json"),
                registry=runs.parent / "registered.json",
                resume=bool(resume))
