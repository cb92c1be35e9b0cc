"""Federated evaluation (the contest): a model file and its model card, checked against the
federation's task before any hospital is contacted.

A model card says what the file is: the architecture (`model`), the task, channels, classes,
the image side and dimensions. A run folder's `config.yaml` is one (its model and task); a
contest submission brings its own YAML."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from pydantic import Field, ValidationError

from medimaging.config import Dims, ModelConfig, Strict, Task
from medimaging.scoring import SiteScores, pool
from medimaging.yamlconfig import ConfigError, read_config

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


def _site_scores(reply, known: dict[int, str]) -> tuple[str, SiteScores | str]:
    """(hospital, its figures) from a reply, or (hospital, why there are none)."""
    from client.contest import SCORES_KEY

    from .loop import _site_name

    site = _site_name(reply, known)
    if reply.has_error():
        return site, f"error: {reply.error.reason}"
    try:
        return site, SiteScores.model_validate_json(str(reply.content.config_records[SCORES_KEY]["json"]))
    except (KeyError, ValidationError) as exc:
        return site, f"error: its figures break the schema ({type(exc).__name__})"


def evaluate_federation(grid, spec, tensors: dict[str, np.ndarray], out_dir: Path, node_names: dict[int, str],
                        site_names: list[str] | None, timeout: float) -> dict:
    """Send the model to every connected hospital, collect their figures, pool them; write
    evaluation.json and evaluation.md into `out_dir`."""
    import threading

    from flwr.app import Array, ArrayRecord, Message, RecordDict

    from aseanfl.packing import PackedGrid

    from .loop import SiteOrder, _exchange, partition_names

    known = {**node_names, **partition_names(grid, site_names)}
    grid = SiteOrder(PackedGrid(grid), known)
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})
    messages = [Message(RecordDict({"arrays": arrays, "config": spec.to_config()}), dst_node_id=nid,
                        message_type="evaluate.contest") for nid in grid.get_node_ids()]
    for m in messages:
        m.metadata.group_id = spec.evaluation
    results: dict[str, SiteScores | str] = {}

    def silent(nid: int, _sent: int, why: str) -> None:
        results[known.get(nid, f"node-{nid}")] = f"no-reply: {why}"

    replies, _ = _exchange(grid, messages, timeout, known, silent, threading.Event())
    for reply in replies:
        site, got = _site_scores(reply, known)
        results[site] = got
    scored = {s: r for s, r in sorted(results.items()) if isinstance(r, SiteScores)}
    pooled = pool(list(scored.values()))
    pooled["left_out"] = [list(scored)[i] for i in pooled.get("left_out", [])]
    out = {"evaluation": spec.evaluation, "model_sha256": spec.model_sha256, "card": spec.model_dump(mode="json"),
           "sites": {s: (r.model_dump(mode="json") if isinstance(r, SiteScores) else {"error": r})
                     for s, r in sorted(results.items())},
           "pooled": pooled}
    write_results(out_dir, out)
    return out


def write_results(out_dir: Path, result: dict) -> None:
    """evaluation.json (everything the hospitals released, and the pooled figures) and a readable
    evaluation.md, each written whole or not at all."""
    import json
    import os

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("evaluation.json", json.dumps(result, indent=1) + "\n"), ("evaluation.md", _markdown(result))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


def _cell(interval: dict | None) -> str:
    if not interval:
        return ""
    if interval.get("withheld"):
        return f"withheld ({interval['withheld']})"
    if interval.get("value") is None:
        return ""
    low, high = interval.get("low"), interval.get("high")
    ci = f" ({low:.3f}-{high:.3f})" if low is not None and high is not None and low == low else ""
    return f"{interval['value']:.3f}{ci}"


def _markdown(result: dict) -> str:
    p = result["pooled"]
    floors = sorted({s["min_cases"] for s in result["sites"].values() if "min_cases" in s}) or [result["card"]["min_cases"]]
    floor = str(floors[0]) if len(floors) == 1 else f"{floors[0]}-{floors[-1]} (each hospital's own floor)"
    lines = [f"# Evaluation `{result['evaluation']}`", "", f"Model sha256 `{result['model_sha256']}` "
             f"({result['card']['model']['name']}, {result['card']['num_classes']} classes, "
             f"{result['card']['image_size']} px); each hospital scored it on its own held-out cases, "
             f"figures on fewer than {floor} positives or negatives are withheld.", ""]
    if result["card"]["task"] == "segmentation":
        lines += ["| hospital | cases | Dice per label (95 % CI) |", "|---|---|---|"]
        for site, s in result["sites"].items():
            if "error" in s:
                lines.append(f"| {site} | | {s['error']} |")
            else:
                lines.append(f"| {site} | {s['cases']} | {'; '.join(_cell(d) for d in s['dice'])} |")
        dice = "; ".join("" if d is None else f"{d:.3f}" for d in p.get("global_dice", []))
        lines += [f"| **pooled** | {p['cases']} | global Dice {dice} (exact, from voxel sums) |"]
        return "\n".join(lines) + "\n"
    lines += ["| hospital | cases | AUC (95 % CI) | accuracy | sensitivity | specificity |", "|---|---|---|---|---|---|"]
    for site, s in result["sites"].items():
        if "error" in s:
            lines.append(f"| {site} | | {s['error']} | | | |")
            continue
        lines.append(f"| {site} | {s['cases']} | {_cell(s['auc'])} | {_cell(s['accuracy'])} | {_cell(s.get('sensitivity'))} | "
                     f"{_cell(s.get('specificity'))} |")
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    lines += [f"| **pooled** | {p['cases']} | {fmt(p.get('auc'))} (on the score grid) | {fmt(p.get('accuracy'))} (exact) | "
              f"{fmt(p.get('sensitivity'))} (exact) | {fmt(p.get('specificity'))} (exact) |", ""]
    if p.get("left_out"):
        lines += [f"Left out of the pooled AUC (a figure withheld): {', '.join(p['left_out'])}.", ""]
    return "\n".join(lines)
