"""The global model between rounds: the arrays shared (FedBN keeps norm layers at home),
decoding compressed updates, screening updates before any strategy, and the server's own test."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from medimaging.datasets import Split
from medimaging.models import head_keys, norm_keys
from medimaging.training import evaluate
from strategies.config import UpdateValidation

from server.engine.config import RunConfig
from server.engine.names import site_name
from server.engine.plan import Progress, TaskShape


def local_keys(cfg: RunConfig, shape: TaskShape, private: bool = False) -> set[str]:
    """Arrays that stay at the hospitals: the normalisation layers under FedBN, the classifier
    head under FedPer, else none."""
    s = cfg.strategy
    if not (s.fedbn or s.fedper):
        return set()
    model = shape.model(cfg, private)
    return (norm_keys(model) if s.fedbn else set()) | (head_keys(model) if s.fedper else set())


def frozen_arrays(cfg: RunConfig, shape: TaskShape, private: bool = False) -> set[str]:
    """Arrays nobody trains (model.freeze, model.adapters): each hospital gets them once and keeps
    them; rounds send and take back the rest (medimaging/finetune.py)."""
    if not cfg.model.fine_tunes_part:
        return set()
    from medimaging.finetune import frozen_keys

    return frozen_keys(shape.model(cfg, private))


def without(arrays: ArrayRecord, keys: set[str]) -> ArrayRecord:
    return ArrayRecord({k: v for k, v in arrays.items() if k not in keys}) if keys else arrays


def merged(arrays: ArrayRecord, new: ArrayRecord) -> ArrayRecord:
    """The global model with the aggregated arrays in, in the model's dtypes (FedOpt computes in
    float64); under FedBN the norm layers keep their values."""
    out = dict(arrays.items())
    for name, array in new.items():
        out[name] = Array(array.numpy().astype(out[name].numpy().dtype, copy=False))
    return ArrayRecord(out)


def _update_problem(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> tuple[str, str] | None:
    """(code, reason) if a hospital's arrays cannot be a model update of `reference`."""
    if set(arrays) != set(reference):
        odd = sorted(set(arrays) ^ set(reference))[:3]
        return "shape", f"its arrays are not the model's (differs at {', '.join(odd)})"
    for name, array in arrays.items():
        value, ref = array.numpy(), reference[name]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            return "shape", f"{name} is {value.dtype}{list(value.shape)}, the model's is {ref.dtype}{list(ref.shape)}"
        if not np.all(np.isfinite(value)):
            return "non-finite", f"{name} holds NaN or Inf"
    return None


def decoded(replies: list[Message], sent: ArrayRecord, c, progress: Progress, rnd: int,
             row: Callable[[str], dict], names: dict[int, str]) -> list[Message]:
    """Compressed updates (strategy.compression) turned back into the hospitals' trained arrays,
    against the model the server sent; one that does not decode, or decodes to other shapes, is
    left out as rejected:decode with the reason. (Traffic was counted before: compressed bytes.)"""
    if c.codec == "none" and c.topk is None:
        return replies
    from common.compression import CompressionError, apply, decode

    reference = {k: a.numpy() for k, a in sent.items()}
    kept = []
    for reply in replies:
        try:
            update = decode({k: a.numpy() for k, a in reply.content["arrays"].items()}, reference, c.codec, c.block, c.topk)
        except CompressionError as exc:
            row(site_name(reply, names))["status"] = "rejected:decode"
            progress.problem(f"round {rnd} training: update from {site_name(reply, names)} rejected: its compressed "
                             f"update does not decode: {exc}")
            continue
        reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in apply(reference, update).items()})
        kept.append(reply)
    return kept


def l2(arrays) -> float:
    """The L2 norm of several arrays taken as one vector (float64 sums)."""
    return math.sqrt(sum(float(np.sum(np.asarray(a, dtype=np.float64) ** 2)) for a in arrays))


def beyond_median(norms: list[float], factor: float) -> tuple[float, list[bool]]:
    """The median of `norms` and, for each, whether it is above `factor` x that median: the
    outlier rule of update validation (models here, SCAFFOLD's control variates too)."""
    median = statistics.median(norms)
    return median, [norm > factor * median for norm in norms]


def screened(replies: list[Message], sent: ArrayRecord, cfg: UpdateValidation, progress: Progress, rnd: int,
              row: Callable[[str], dict], names: dict[int, str]) -> list[Message]:
    """Server-side update validation, before any strategy: an update with NaN/Inf, the wrong
    arrays, shapes or dtypes, or a norm beyond norm_factor x the round's median is left out,
    its site and the reason reported; the round goes on with the rest."""
    if not cfg.enabled:
        return replies
    reference = {k: a.numpy() for k, a in sent.items()}
    kept, norms = [], []
    for reply in replies:
        problem = _update_problem(reply.content["arrays"], reference)
        if problem is None:
            arrays = reply.content["arrays"]
            norms.append(l2(arrays[k].numpy().astype(np.float64) - ref
                            for k, ref in reference.items() if np.issubdtype(ref.dtype, np.floating)))
            kept.append(reply)
            continue
        row(site_name(reply, names))["status"] = f"rejected:{problem[0]}"
        progress.problem(f"round {rnd} training: update from {site_name(reply, names)} rejected: {problem[1]}")
    if len(kept) < cfg.min_sites_for_norm:
        return kept
    median, above = beyond_median(norms, cfg.norm_factor)
    out = []
    for reply, norm, outlier in zip(kept, norms, above, strict=True):
        if median > 0 and outlier:
            row(site_name(reply, names))["status"] = "rejected:norm"
            progress.problem(f"round {rnd} training: update from {site_name(reply, names)} rejected: its norm {norm:.4g} is "
                             f"{norm / median:.1f}x the round's median {median:.4g} (limit {cfg.norm_factor:g}x)")
        else:
            out.append(reply)
    return out


def score_key(task: str) -> str:
    """The federated validation score: AUC, or Dice for segmentation."""
    return "val_dice" if task == "segmentation" else "val_auc"


def best_key(select_by: str, task: str) -> str:
    """The federated validation figure that picks the best round (server.select_by)."""
    return "val_loss" if select_by == "loss" else score_key(task)


def round_score(glob: dict, key: str) -> float:
    """How good a round's global model is by `key` (best_key), higher is better: the score, or the
    negated validation loss (also when a round's validation gave no score)."""
    loss = glob.get("val_loss")
    loss = loss if loss is not None and not math.isnan(loss) else math.inf
    score = glob.get(key)
    return -loss if key == "val_loss" or score is None or math.isnan(score) else score


def _start(cfg: RunConfig, shape: TaskShape, private: bool):
    """(the start network with model.weights loaded and model.freeze/adapters applied, the file's
    medimaging.weights.Loaded or None): the file fits the network as it is, before adapters."""
    from medimaging.finetune import fine_tune_part
    from medimaging.weights import start_model

    model = shape.model(cfg, private, bare=True)
    head = head_keys(model)
    loaded = start_model(model, cfg.model, head)
    return fine_tune_part(model, cfg.model, head), loaded


def check_start(cfg: RunConfig, shape: TaskShape, private: bool = False):
    """model.weights read and fitted, model.freeze/adapters applied to it, before a run starts
    (`aseanfl simulate`, `aseanfl run` and the ServerApp): the file's medimaging.weights.Loaded
    (None without weights); ConfigError with the one line that says what does not fit."""
    from medimaging.finetune import FineTuneError
    from medimaging.weights import WeightsError
    from medimaging.yamlconfig import ConfigError

    try:
        return _start(cfg, shape, private)[1]
    except (WeightsError, FineTuneError) as exc:
        raise ConfigError(str(exc)) from None


def initial_arrays(cfg: RunConfig, shape: TaskShape, private: bool = False) -> ArrayRecord:
    """The run's start model: seeded random weights, or model.weights (medimaging/weights.py)."""
    torch.manual_seed(cfg.seed)
    return ArrayRecord(_start(cfg, shape, private)[0].state_dict())


def server_evaluate(
    cfg: RunConfig, shape: TaskShape, arrays: ArrayRecord, test: Split, private: bool = False
) -> dict[str, float]:
    model = shape.model(cfg, private)
    model.load_state_dict(arrays.to_torch_state_dict())
    scores = evaluate(model, test, shape.num_classes)
    for key, value in scores.items():  # per class/label lists: one column, "0.91;0.78"
        if isinstance(value, list):
            scores[key] = ";".join(f"{v:.4f}" for v in value)
    return scores
