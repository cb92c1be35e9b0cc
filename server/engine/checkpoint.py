"""The run's checkpoint: everything the server needs to continue a run after it died.

One file, `checkpoint.safetensors` in the run folder, replaced atomically at the end of every
round (after that round's rows are on disk): the global model, the strategy's own state (FedAvgM
momentum, FedAdam/Yogi/Adagrad moments, the adaptive clipping norm), the round number, the best
round so far, Python's `random` state (Flower samples hospitals with it), the elapsed seconds,
and a digest of the settings that shape the run. A resumed run refuses a checkpoint it cannot
read or one written under other settings, before anything is changed in the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

NAME = "checkpoint.safetensors"
KEY = "aseanfl-checkpoint"
# Strategy attributes that change from round to round (Flower 1.41-1.42's FedAvgM, FedOpt family and
# DP wrappers); the rest is built again from the config.
STATE = ("current_arrays", "momentum_vector", "m_t", "v_t", "clipping_norm")
# Settings that may differ on resume: they do not change what a round computes.
FREE = {("server", "round_timeout_s"), ("server", "rejoin_wait_s"), ("server", "output_dir"), ("wait_for_sites",),
        ("wait_timeout_s",), ("server", "tracking"), ("server", "tracking_uri")}
# settings added later, left out of the digest while at their default (checkpoints from before still resume)
LATER = {("strategy", "compression"): {"codec": "none", "block": 256, "topk": None, "error_feedback": True},
         ("server", "select_by"): "score"}


class CheckpointError(ValueError):
    """The run folder cannot be resumed (the message says why and what to do)."""


@dataclass
class Checkpoint:
    round: int
    arrays: ArrayRecord
    best: dict
    seconds: float
    round_seconds: list[float]
    random_state: tuple
    names: dict[int, str] = field(default_factory=dict)
    trained_rounds: int = 0  # rounds whose global model took in hospitals' updates


def settings_digest(config) -> str:
    """sha256 of the run's settings, leaving out those in FREE."""
    tree = config.model_dump(mode="json")
    for path in FREE:
        node = tree
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    for (section, key), default in LATER.items():
        if tree.get(section, {}).get(key) == default:
            tree[section].pop(key)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def _layers(strategy) -> list:
    """The strategy and those it wraps (Flower's DP wrappers keep theirs in `.strategy`)."""
    out = [strategy]
    while hasattr(out[-1], "strategy"):
        out.append(out[-1].strategy)
    return out


def _flatten(value) -> tuple[str, list[str], list[np.ndarray]] | None:
    if isinstance(value, ArrayRecord):
        return "record", list(value.keys()), [a.numpy() for a in value.values()]
    if isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
        return "dict", list(value.keys()), list(value.values())
    if isinstance(value, list) and all(isinstance(v, np.ndarray) for v in value):
        return "list", [str(i) for i in range(len(value))], value
    return None


def _unflatten(kind: str, keys: list[str], arrays: list[np.ndarray]):
    if kind == "record":
        return ArrayRecord({k: Array(a) for k, a in zip(keys, arrays, strict=True)})
    if kind == "dict":
        return dict(zip(keys, arrays, strict=True))
    return list(arrays)


def save(run_dir: Path, ckpt: Checkpoint, strategy, config) -> Path:
    """Write the checkpoint next to the run's rows: a temporary file, flushed, then renamed."""
    tensors: dict[str, np.ndarray] = {}
    model_keys = list(ckpt.arrays.keys())
    for i, (name, array) in enumerate(ckpt.arrays.items()):
        tensors[f"model/{i}"] = np.ascontiguousarray(array.numpy())
    layout: dict[str, dict] = {}
    for depth, layer in enumerate(_layers(strategy)):
        for attr in STATE:
            if not hasattr(layer, attr):
                continue
            value, slot = getattr(layer, attr), f"{depth}.{attr}"
            if value is None or isinstance(value, (int, float)):
                layout[slot] = {"kind": "value", "value": value}
                continue
            flat = _flatten(value)
            if flat is None:
                raise TypeError(f"checkpoint: cannot save {type(layer).__name__}.{attr} ({type(value).__name__})")
            kind, keys, arrays = flat
            layout[slot] = {"kind": kind, "keys": keys}
            for j, a in enumerate(arrays):
                tensors[f"strategy/{slot}/{j}"] = np.ascontiguousarray(a)
    meta = {
        "round": ckpt.round, "settings": settings_digest(config), "model_keys": model_keys, "strategy": layout,
        "strategy_types": [type(s).__name__ for s in _layers(strategy)], "best": ckpt.best, "seconds": ckpt.seconds,
        "round_seconds": ckpt.round_seconds, "random_state": ckpt.random_state, "names": ckpt.names,
        "trained_rounds": ckpt.trained_rounds,
    }
    path, tmp = run_dir / NAME, run_dir / f".{NAME}.tmp"
    save_file(tensors, str(tmp), metadata={KEY: json.dumps(meta)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def inspect(run_dir: Path, config) -> int:
    """The round a run folder's checkpoint was written after, if `config` may resume from it
    (CheckpointError if not: missing, unreadable, other settings, or all rounds done)."""
    path = run_dir / NAME
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {NAME} (the run finished no round, or is not an aseanfl run folder); "
                              "start it again instead")
    try:
        meta = json.loads(_metadata(path)[KEY])
        done = int(meta["round"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc}); the run cannot be resumed from it, "
                              "nothing in the folder was changed") from None
    if meta.get("settings") != settings_digest(config):
        raise CheckpointError(f"{path}: written under other settings than this run's (its config.yaml has them); "
                              "resume with the same federation.yaml and --set options, or start a new run")
    if done >= config.server.rounds:
        raise CheckpointError(f"{run_dir}: the run finished all its {config.server.rounds} rounds; nothing to resume")
    return done


def load(run_dir: Path, config, strategy) -> Checkpoint:
    """Read the run folder's checkpoint for `config`, and put its state into `strategy` (built
    from the same config). CheckpointError names the folder and the reason."""
    inspect(run_dir, config)
    path = run_dir / NAME
    try:
        tensors = load_file(str(path))
        meta = json.loads(_metadata(path)[KEY])
        names = [type(s).__name__ for s in _layers(strategy)]
        if meta["strategy_types"] != names:
            raise CheckpointError(f"{path}: written by strategy {meta['strategy_types']}, this run's is {names}")
        arrays = ArrayRecord({k: Array(tensors[f"model/{i}"]) for i, k in enumerate(meta["model_keys"])})
        for depth, layer in enumerate(_layers(strategy)):
            for attr in STATE:
                slot = meta["strategy"].get(f"{depth}.{attr}")
                if slot is None:
                    continue
                if slot["kind"] == "value":
                    setattr(layer, attr, slot["value"])
                else:
                    parts = [tensors[f"strategy/{depth}.{attr}/{j}"] for j in range(len(slot["keys"]))]
                    setattr(layer, attr, _unflatten(slot["kind"], slot["keys"], parts))
        state = meta["random_state"]
        return Checkpoint(round=int(meta["round"]), arrays=arrays, best=meta["best"], seconds=float(meta["seconds"]),
                          round_seconds=list(meta["round_seconds"]), random_state=(state[0], tuple(state[1]), state[2]),
                          names={int(k): v for k, v in meta["names"].items()},
                          # a checkpoint from before trained_rounds was kept: every round wrote a model then
                          trained_rounds=int(meta.get("trained_rounds", meta["round"])))
    except CheckpointError:
        raise
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc}); the run cannot be resumed from it, "
                              "nothing in the folder was changed") from None


def _metadata(path: Path) -> dict[str, str]:
    """The safetensors header's __metadata__ (the file's first 8 bytes give the header's length)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))["__metadata__"]


def round_of(run_dir: Path) -> int | None:
    """The last round a run folder's checkpoint holds, or None."""
    try:
        return int(json.loads(_metadata(run_dir / NAME)[KEY])["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def random_state() -> list:
    return list(random.getstate())
