"""Client mods: error replies that carry no local detail, model arrays packed on the wire, and
hospital-side clipping for Flower's client-side central-DP wrappers."""

from __future__ import annotations

import errno
import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType
from flwr.common.constant import ErrorCode
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from aseanfl.packing import packed, unpacked

from .messages import REFUSAL_KEY, TASK_KEY, TaskSpec
from .site import SiteDataError

_MODS = {"fixed": fixedclipping_mod, "adaptive": adaptiveclipping_mod}
log = logging.getLogger("aseanfl")


def private_errors_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod. Flower would send str(exception) to the server, and an exception at a
    hospital can name a local file or a value from the data; log it here in full and send only
    its type."""
    try:
        return call_next(msg, ctxt)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reply, none leaks detail
        log.exception("%s task failed at this hospital", msg.metadata.message_type)
        reason = f"{type(exc).__name__} at the hospital (details in its local log)"
        if isinstance(exc, (SiteDataError, DownlinkError)):  # phrased to name no file and no value
            reason = f"{reason}: {exc}"
        elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            reason = f"{reason}: no space left on the hospital's disk"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def packing_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Just inside the error guard: the server's arrays unpacked before anything reads them, the
    reply's arrays packed as the last step before it leaves (aseanfl/packing.py)."""
    reply = call_next(unpacked(msg), ctxt)
    return packed([reply])[0]


RESIDUAL_KEY = "aseanfl.residual"  # Context.state: what the last encoding lost (never sent)


def _residual_file(ctxt: Context, run: str):
    """Where a deployed hospital keeps its residual across daemon restarts (beside its privacy
    ledgers, in state_dir); None in a simulation (the Context's state keeps it between rounds)."""
    from pathlib import Path

    from .config import load_site
    from .site import SITE_CONFIG_KEY

    if SITE_CONFIG_KEY not in ctxt.node_config:
        return None
    return load_site(Path(str(ctxt.node_config[SITE_CONFIG_KEY]))).state_dir / "compression" / f"{run}.safetensors"


def _load_residual(ctxt: Context, path) -> dict | None:
    if path is not None:
        from safetensors.numpy import load_file

        try:
            return load_file(str(path)) if path.is_file() else None
        except Exception:  # noqa: BLE001 - a damaged residual: start again from none (costs accuracy, not privacy)
            log.warning("the compression residual %s is unreadable; starting from none", path)
            return None
    record = ctxt.state.array_records.get(RESIDUAL_KEY)
    return {k: a.numpy() for k, a in record.items()} if record is not None else None


def _save_residual(ctxt: Context, path, residual: dict) -> None:
    if path is None:
        ctxt.state[RESIDUAL_KEY] = ArrayRecord({k: Array(v) for k, v in residual.items()})
        return
    import os

    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(residual, str(tmp))
    os.replace(tmp, path)  # never half a residual


def compression_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Just inside packing: a train reply's arrays become the compressed update (trained minus
    received, plus the residual the last encoding left; aseanfl/compression.py). Refusals and
    errors pass through."""
    config = msg.content.config_records.get("config") if msg.metadata.message_type == MessageType.TRAIN else None
    if config is None or TASK_KEY not in config or "arrays" not in msg.content.array_records:
        return call_next(msg, ctxt)  # not a training task (SecAgg+'s stages carry no task: it is never compressed)
    task = TaskSpec.from_config(config)
    if not task.compressed:
        return call_next(msg, ctxt)
    received = {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}
    reply = call_next(msg, ctxt)
    if reply.has_error() or list(reply.content.array_records) != ["arrays"]:
        return reply
    from aseanfl.compression import compress

    path = _residual_file(ctxt, task.run) if task.error_feedback else None
    residual = _load_residual(ctxt, path) if task.error_feedback else None
    trained = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    sent, left = compress(trained, received, residual, task.codec, task.block, task.topk)
    if task.error_feedback:
        _save_residual(ctxt, path, left)
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in sent.items()})
    return reply


MODEL_KEY, MODEL_META = "aseanfl.downlink", "aseanfl.downlink-meta"  # Context.state: the last model received


def _model_file(ctxt: Context, run: str):
    residual = _residual_file(ctxt, run)
    return residual.with_name(f"{run}.model.safetensors") if residual is not None else None


def _held_model(ctxt: Context, run: str) -> tuple[dict | None, int | None]:
    path = _model_file(ctxt, run)
    if path is None:
        meta = ctxt.state.config_records.get(MODEL_META)
        if meta is None or str(meta["run"]) != run:
            return None, None
        return {k: a.numpy() for k, a in ctxt.state.array_records[MODEL_KEY].items()}, int(meta["version"])
    if not path.is_file():
        return None, None
    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), "np") as f:
            version = int((f.metadata() or {})["version"])
        return load_file(str(path)), version
    except Exception:  # noqa: BLE001 - a damaged copy: the server sends the full model next time
        log.warning("the stored global model %s is unreadable; asking for the full model", path)
        return None, None


def _keep_model(ctxt: Context, run: str, model: dict, version: int) -> None:
    path = _model_file(ctxt, run)
    if path is None:
        ctxt.state[MODEL_KEY] = ArrayRecord({k: Array(v) for k, v in model.items()})
        ctxt.state[MODEL_META] = ConfigRecord({"run": run, "version": version})
        return
    import os

    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in model.items()}, str(tmp), metadata={"version": str(version)})
    os.replace(tmp, path)


def downlink_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Just inside packing: a model the server sent as a delta against the version this
    hospital holds (strategy.compression.downlink) is rebuilt before anything reads it, checked
    against the server's sha256, and kept (beside the ledgers) for the next delta."""
    from aseanfl.compression import DOWNLINK, CompressionError, reconstruct

    if DOWNLINK not in msg.content.config_records or "arrays" not in msg.content.array_records:
        return call_next(msg, ctxt)
    meta = dict(msg.content.config_records[DOWNLINK])
    run = TaskSpec.from_config(msg.content["config"]).run
    held, version = _held_model(ctxt, run) if meta["kind"] != "full" else (None, None)
    try:
        model = reconstruct({k: a.numpy() for k, a in msg.content["arrays"].items()}, meta, held, version)
    except CompressionError as exc:
        raise DownlinkError(str(exc)) from None
    if meta["kind"] != "same":
        _keep_model(ctxt, run, model, int(meta["to"]))
    msg.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in model.items()})
    return call_next(msg, ctxt)


class DownlinkError(ValueError):
    """The server's delta does not fit the model this hospital holds (says nothing local)."""


def central_dp_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Clip this hospital's update before it leaves, when the server's task asks for it
    (Flower's fixed/adaptive clipping mods); a refusal passes through untouched."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    mod = _MODS.get(TaskSpec.from_config(msg.content["config"]).client_clipping)
    if mod is None:
        return call_next(msg, ctxt)
    inner_replies: list[Message] = []

    def inner(m: Message, c: Context) -> Message:
        inner_replies.append(call_next(m, c))
        return inner_replies[-1]

    out = mod(msg, ctxt, inner)
    first = inner_replies[0] if inner_replies else None
    if first is not None and not first.has_error() and REFUSAL_KEY in first.content.config_records:
        return first
    return out
