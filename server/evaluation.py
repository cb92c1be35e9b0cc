"""Federated evaluation (the contest): a model file and its model card, checked against the
federation's task before any hospital is contacted.

A model card says what the file is: the architecture (`model`), the task, channels, classes,
the image side and dimensions. A run folder's `config.yaml` is one (its model and task); a
contest submission brings its own YAML."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import yaml
from pydantic import Field, ValidationError

from medimaging.config import Dims, ModelConfig, Strict, Task
from medimaging.yamlconfig import ConfigError

from .loop import TaskShape


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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_card(path: Path) -> ModelCard:
    """A model card YAML; ConfigError naming the file and field."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not a readable YAML model card ({exc})") from None
    try:
        return ModelCard.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {where}: {err['msg']}") from None


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
