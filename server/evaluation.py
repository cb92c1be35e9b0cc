"""Federated evaluation (the contest): a model file and its model card, checked against the
federation's task before any hospital is contacted.

A model card says what the file is: the architecture (`model`), the task, channels, classes,
the image side and dimensions. A run folder's `config.yaml` is one (its model and task); a
contest submission brings its own YAML."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
from pydantic import Field, ValidationError

from aseanfl.i18n import _
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


def evaluation_spec(card: ModelCard, model: Path, min_cases: int, seed: int, split: str = "test", name: str | None = None):
    """What every hospital is asked: score the file of this sha256 as the card's model."""
    from client.messages import EvaluationSpec

    digest = sha256(model)
    return EvaluationSpec(evaluation=name or f"eval-{digest[:12]}", model_sha256=digest, model=card.model,
                          in_channels=card.in_channels, num_classes=card.num_classes, image_size=card.image_size,
                          task=card.task, spatial_dims=card.spatial_dims, private=card.private, min_cases=min_cases,
                          seed=seed, split=split)


def _site_scores(reply, known: dict[int, str], spec) -> tuple[str, SiteScores | str]:
    """(hospital, its figures) from a reply, or (hospital, why there are none)."""
    from client.messages import SCORES_KEY

    from .loop import _site_name

    site = _site_name(reply, known)
    if reply.has_error():  # Flower's "<class 'X'>:<'why'>" -> why
        return site, "error: " + re.sub(r"^<class '[^']*'>:<'(.*)'>$", r"\1", str(reply.error.reason), flags=re.S)
    try:
        record = reply.content.config_records[SCORES_KEY]
        scores = SiteScores.model_validate_json(str(record["json"]))
    except (KeyError, ValidationError) as exc:
        return site, f"error: its figures break the schema ({type(exc).__name__})"
    if record.get("model-sha256") != spec.model_sha256:
        return site, "error: it scored another model than the one sent"
    return site, scores


def evaluate_federation(grid, spec, blob: bytes, out_dir: Path, node_names: dict[int, str],
                        site_names: list[str] | None, timeout: float) -> dict:
    """Send the model file (`blob`, checked: check_model_file) to every connected hospital,
    collect their figures, pool them; write evaluation.json and evaluation.md into `out_dir`."""
    import threading

    from flwr.app import Message, RecordDict

    from aseanfl.packing import PackedGrid
    from client.contest import MODEL_KEY, model_record

    from .loop import SiteOrder, _exchange, partition_names

    known = {**node_names, **partition_names(grid, site_names)}
    grid = SiteOrder(PackedGrid(grid), known)
    model = model_record(blob)
    messages = [Message(RecordDict({MODEL_KEY: model, "config": spec.to_config()}), dst_node_id=nid,
                        message_type="evaluate.contest") for nid in grid.get_node_ids()]
    for m in messages:
        m.metadata.group_id = spec.evaluation
    results: dict[str, SiteScores | str] = {}

    def silent(nid: int, _sent: int, why: str) -> None:
        results[known.get(nid, f"node-{nid}")] = f"no-reply: {why}"

    def impostor(nid: int, _sent: int, _got: int, declared: str) -> None:
        results[known.get(nid, f"node-{nid}")] = f"rejected: identity: its reply declares itself as {declared}"

    replies, _missing = _exchange(grid, messages, timeout, known, silent, threading.Event(), impostor)
    for reply in replies:
        site, got = _site_scores(reply, known, spec)
        results[site] = got
    out = pooled_result(spec, results)
    write_results(out_dir, out)
    return out


def pooled_result(spec, results: dict[str, SiteScores | str]) -> dict:
    """evaluation.json's content: what each hospital released (or why nothing), and the pooled figures."""
    scored = {s: r for s, r in sorted(results.items()) if isinstance(r, SiteScores)}
    pooled = pool(list(scored.values()), spec.seed)
    pooled["left_out"] = [list(scored)[i] for i in pooled.get("left_out", [])]
    return {"evaluation": spec.evaluation, "model_sha256": spec.model_sha256, "card": spec.model_dump(mode="json"),
            "sites": {s: (r.model_dump(mode="json") if isinstance(r, SiteScores) else {"error": r})
                      for s, r in sorted(results.items())},
            "pooled": pooled}


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
             f"{result['card']['image_size']} px); each hospital scored it on its own held-out cases (test: files never "
             "trained on; validation: cases validated on in training), "
             f"figures on fewer than {floor} positives or negatives are withheld.", ""]
    if result["card"]["task"] == "segmentation":
        lines += ["| hospital | cases | Dice per label (95 % CI) |", "|---|---|---|"]
        for site, s in result["sites"].items():
            if "error" in s:
                lines.append(f"| {site} | | {s['error']} |")
            else:
                lines.append(f"| {site} | {s['cases']} {s.get('split') or ''} | {'; '.join(_cell(d) for d in s['dice'])} |")
        dice = "; ".join("" if d is None else f"{d:.3f}" for d in p.get("global_dice", []))
        lines += [f"| **pooled** | {p['cases']} | global Dice {dice} (exact, from voxel sums) |"]
        return "\n".join(lines) + "\n"
    lines += ["| hospital | cases | AUC (95 % CI) | accuracy | sensitivity | specificity |", "|---|---|---|---|---|---|"]
    for site, s in result["sites"].items():
        if "error" in s:
            lines.append(f"| {site} | | {s['error']} | | | |")
            continue
        lines.append(f"| {site} | {s['cases']} {s.get('split') or ''} | {_cell(s['auc'])} | {_cell(s['accuracy'])} | {_cell(s.get('sensitivity'))} | "
                     f"{_cell(s.get('specificity'))} |")
    def fmt(key: str) -> str:
        value, ci = p.get(key), p.get("intervals", {}).get(key) or {}
        if value is None:
            return ""
        return f"{value:.3f}" + (f" ({ci['low']:.3f}-{ci['high']:.3f})" if ci.get("low") is not None else "")

    lines += [f"| **pooled** | {p['cases']} | {fmt('auc')} (on the score grid) | {fmt('accuracy')} (exact) | "
              f"{fmt('sensitivity')} (exact) | {fmt('specificity')} (exact) |", "",
              "Intervals: at each hospital a percentile bootstrap of its cases (1000 resamples, seeded); pooled, "
              "Wilson intervals for the exact proportions and a bootstrap within each hospital and class of the "
              "released score-grid counts for the AUC.", ""]
    if p.get("left_out"):
        lines += [f"Left out of the pooled AUC (a figure withheld): {', '.join(p['left_out'])}.", ""]
    return "\n".join(lines)


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

    from client.messages import EvaluationSpec

    from .control import RUNS_ENV
    from .deployment import _stream_logs, await_sites, lock_run_dir, run_folder
    from .loop import registered_names

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
    log.info(_("{count} hospital(s) connected; sending the model ({bytes} bytes)", count=connected, bytes=len(blob)))
    result = evaluate_federation(grid, spec, blob, out_dir, registered_names(runs.parent / "registered.json"), None,
                                 float(rc.get("timeout-s", 600)))
    for site, s in result["sites"].items():
        log.info("%s: %s", site, site_line(s))
    log.info("pooled: %s", pooled_line(result["pooled"]))


def site_line(s: dict) -> str:
    """One hospital's figures in a line (or why there are none)."""
    if "error" in s:
        return s["error"]
    if s["task"] == "segmentation":
        return f"Dice {'; '.join(_cell(d) for d in s['dice'])} on {s['cases']} {s.get('split') or ''} cases"
    return f"AUC {_cell(s['auc'])}, accuracy {_cell(s['accuracy'])} on {s['cases']} {s.get('split') or ''} cases"


def pooled_line(p: dict) -> str:
    if "global_dice" in p:
        dice = ", ".join("withheld" if d is None else f"{d:.3f}" for d in p["global_dice"])
        return f"{p['hospitals']} hospitals, {p['cases']} cases: global Dice {dice}"
    said = []
    for k in ("auc", "accuracy", "sensitivity", "specificity"):
        if isinstance(p.get(k), float):
            ci = p.get("intervals", {}).get(k) or {}
            band = f" ({ci['low']:.3f}-{ci['high']:.3f})" if ci.get("low") is not None else ""
            said.append(f"{k} {p[k]:.3f}{band}")
    return f"{p['hospitals']} hospitals, {p['cases']} cases: {', '.join(said) or 'no figure released'}"


def card_of_deployment(config_yaml: Path) -> ModelCard:
    """The model card of a model in a deployed run's folder: its config.yaml's model and task."""
    from .deployment import check_run_config

    cfg = check_run_config(config_yaml.read_text(), [])
    t = cfg.task
    return ModelCard(model=cfg.model, task=t.kind, in_channels=t.in_channels, num_classes=t.num_classes,
                     image_size=t.image_size, spatial_dims=t.spatial_dims, private=cfg.dp_models)
