"""Federated evaluation (the contest): a model file and its model card, checked against the
federation's task before any hospital is contacted.

A model card says what the file is: the architecture (`model`), the task, channels, classes,
the image side and dimensions. A run folder's `config.yaml` is one (its model and task); a
contest submission brings its own YAML."""

from __future__ import annotations

import hashlib

from pathlib import Path

import numpy as np
from pydantic import Field

from common.i18n import _
from medimaging.config import Dims, ModelConfig, Strict, Task
from medimaging.weights import file_sha256 as sha256  # one sha256 of a model file, for cards and start weights
from medimaging.yamlconfig import ConfigError, read_config

from server.engine.plan import TaskShape
from server.engine.scoring import evaluate_federation, pooled_line, site_line


class ModelCard(Strict):
    """What a submitted model is; checked against the federation's task."""

    model: ModelConfig
    task: Task = "classification"
    in_channels: int = Field(ge=1)
    num_classes: int = Field(ge=2)
    image_size: int = Field(ge=8)
    spatial_dims: Dims = 2
    private: bool = Field(False, description="trained with DP-SGD (its DP-compatible layers)")

    def shape(self) -> TaskShape:
        return TaskShape(in_channels=self.in_channels, num_classes=self.num_classes, image_size=self.image_size,
                         task=self.task, spatial_dims=self.spatial_dims)

    def build(self, run_config):
        """The card's model, untrained (its tensors' names, shapes and dtypes)."""
        return self.shape().model(run_config.model_copy(update={"model": self.model}), self.private)


def read_card(path: Path) -> ModelCard:
    """A model card YAML (read as every config is: medimaging/yamlconfig.read_config); ConfigError
    naming the file and field."""
    try:
        return read_config(path, None, ModelCard)
    except ConfigError as exc:
        said = str(exc)
        if str(path) in said:
            raise
        raise ConfigError("\n".join(f"{path}: {line}" for line in said.splitlines())) from None


def check_against_task(card: ModelCard, task: TaskShape, where: str) -> None:
    """ConfigError where the card's model cannot score the federation's task."""
    for field, mine, theirs in (("task", card.task, task.task), ("num_classes", card.num_classes, task.num_classes),
                                ("in_channels", card.in_channels, task.in_channels),
                                ("spatial_dims", card.spatial_dims, task.spatial_dims)):
        if mine != theirs:
            raise ConfigError(f"{where}: {field} is {mine}, the federation's data has {theirs}; this model cannot be "
                              "scored on it")


def check_model_file(path: Path, card: ModelCard, run_config) -> dict[str, np.ndarray]:
    """The file's tensors if it is a safetensors file holding exactly the card's model; else
    ConfigError naming the file and the first tensors that differ."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise ConfigError(f"model file {path}: not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model file {path}: not a readable safetensors file, or cut short ({exc})") from None
    expected = {k: v.numpy() for k, v in card.build(run_config).state_dict().items()}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        said = "; ".join(p for p in (f"missing {', '.join(missing[:3])}" if missing else "",
                                     f"not in the model: {', '.join(extra[:3])}" if extra else "") if p)
        raise ConfigError(f"model file {path}: its tensors are not {card.model.name}'s ({said})")
    for name, ref in expected.items():
        got = tensors[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise ConfigError(f"model file {path}: {name} is {got.dtype}{list(got.shape)}, {card.model.name} with "
                              f"{card.num_classes} classes and {card.in_channels} channel(s) has {ref.dtype}{list(ref.shape)}")
        if np.issubdtype(got.dtype, np.floating) and not np.all(np.isfinite(got)):
            raise ConfigError(f"model file {path}: {name} holds NaN or Inf")
    return tensors


def evaluation_spec(card: ModelCard, model: Path, min_cases: int, seed: int, split: str = "test", name: str | None = None):
    """What every hospital is asked: score the file of this sha256 as the card's model."""
    from protocol.messages import EvaluationSpec

    digest = sha256(model)
    return EvaluationSpec(evaluation=name or f"eval-{digest[:12]}", model_sha256=digest, model=card.model,
                          in_channels=card.in_channels, num_classes=card.num_classes, image_size=card.image_size,
                          task=card.task, spatial_dims=card.spatial_dims, private=card.private, min_cases=min_cases,
                          seed=seed, split=split)


EVALUATIONS = "evaluations"  # beside runs/ on the coordinator's disk: run-<id> folders of evaluations
MODELS = "models"  # beside runs/: submitted model files by sha256, read by the evaluation's ServerApp


def stored_model(server_dir: Path, path: Path, digest: str) -> Path:
    """A copy of the model file where the evaluation's ServerApp reads it (written whole)."""
    import os
    import shutil

    target = server_dir / MODELS / f"{digest}.safetensors"
    if not target.is_file() or sha256(target) != digest:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
    return target


def deployed_evaluation(context, grid) -> None:
    """The ServerApp of `aseanfl evaluate -f`: the model file the coordinator stored, checked
    against its sha256, scored at every connected hospital."""
    import logging
    import os

    from protocol.messages import EvaluationSpec

    from server.operations.control import RUNS_ENV
    from server.engine.deployment import _stream_logs, await_sites, lock_run_dir, run_folder
    from server.engine.names import registered_names

    _stream_logs()
    log = logging.getLogger("aseanfl")
    rc = context.run_config
    spec = EvaluationSpec.model_validate_json(str(rc["evaluation"]))
    runs = Path(os.environ.get(RUNS_ENV) or "runs")
    model = runs.parent / MODELS / f"{spec.model_sha256}.safetensors"
    blob = model.read_bytes() if model.is_file() else b""
    if hashlib.sha256(blob).hexdigest() != spec.model_sha256:
        raise ConfigError(f"{model}: missing or changed since it was submitted (sha256 differs); nothing was sent")
    out_dir = run_folder(runs.parent / EVALUATIONS, context.run_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not lock_run_dir(out_dir):
        raise ConfigError(f"{out_dir}: another server process is running this evaluation")
    wanted, wait = int(rc.get("wait-for-sites", 1)), float(rc.get("wait-timeout-s", 120))
    log.info(_("evaluation {evaluation} of model {model}: waiting for {count} hospital(s) (up to {seconds} s)",
               evaluation=spec.evaluation, model=spec.model_sha256[:12], count=wanted, seconds=f"{wait:g}"))
    connected = await_sites(grid, wanted, wait)
    names = registered_names(runs.parent / "registered.json")
    from server.engine.census import check_classes

    classes = check_classes(grid, dict(names), spec.image_size, spec.classes, f"classes-{spec.evaluation}",
                            float(rc.get("timeout-s", 600)))
    spec = spec.model_copy(update={"classes": classes})
    log.info(_("{count} hospital(s) connected; sending the model ({bytes} bytes)", count=connected, bytes=len(blob)))
    result = evaluate_federation(grid, spec, blob, out_dir, names, None, float(rc.get("timeout-s", 600)))
    for site, s in result["sites"].items():
        log.info("%s: %s", site, site_line(s))
    log.info("pooled: %s", pooled_line(result["pooled"]))


def card_of_deployment(config_yaml: Path) -> ModelCard:
    """The model card of a model in a deployed run's folder: its config.yaml's model and task."""
    from server.engine.deployment import check_run_config

    cfg = check_run_config(config_yaml.read_text(), [])
    t = cfg.task
    return ModelCard(model=cfg.model, task=t.kind, in_channels=t.in_channels, num_classes=t.num_classes,
                     image_size=t.image_size, spatial_dims=t.spatial_dims, private=cfg.dp_models)
