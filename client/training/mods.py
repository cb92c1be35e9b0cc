"""Client mods: error replies that carry no local detail, model arrays packed on the wire, and
hospital-side clipping for Flower's client-side central-DP wrappers."""

from __future__ import annotations

import errno
import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from common.packing import packed, unpacked

from protocol.messages import FROZEN_DIGEST_KEY, FROZEN_KEY, REFUSAL_KEY, TASK_KEY, TaskSpec
from client.training.site import SiteDataError

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
    reply's arrays packed as the last step before it leaves (common/packing.py)."""
    reply = call_next(unpacked(msg), ctxt)
    return packed([reply])[0]


RESIDUAL_KEY = "aseanfl.residual"  # Context.state: what the last encoding lost (never sent)


def _residual_file(ctxt: Context, run: str):
    """Where a deployed hospital keeps its residual across daemon restarts (beside its privacy
    ledgers, in state_dir); None in a simulation (the Context's state keeps it between rounds)."""
    from pathlib import Path

    from client.config import load_site
    from client.training.site import SITE_CONFIG_KEY

    if SITE_CONFIG_KEY not in ctxt.node_config:
        return None
    return load_site(Path(str(ctxt.node_config[SITE_CONFIG_KEY]))).state_dir / "compression" / f"{run}.safetensors"


def _stored(ctxt: Context, path, key: str) -> tuple[dict | None, dict]:
    """(arrays, metadata) a hospital keeps between rounds: in the file `path` (a deployed hospital,
    beside its ledgers, so a restarted daemon goes on from it), or under `key` in the Context's
    state (a simulation: Flower keeps it per node). (None, {}) where there is none, or the file
    is unreadable (said in the log: it costs accuracy or bytes, never privacy)."""
    if path is None:
        record = ctxt.state.array_records.get(key)
        meta = ctxt.state.config_records.get(f"{key}-meta")
        return ({k: a.numpy() for k, a in record.items()} if record is not None else None), dict(meta or {})
    if not path.is_file():
        return None, {}
    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), "np") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except Exception:  # noqa: BLE001 - a damaged file: start again from none
        log.warning("%s is unreadable; starting again without it", path)
        return None, {}


def _store(ctxt: Context, path, key: str, arrays: dict, meta: dict | None = None) -> None:
    """Keep `arrays` (and string metadata) where _stored reads them; a file is replaced whole."""
    if path is None:
        ctxt.state[key] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        if meta is not None:
            ctxt.state[f"{key}-meta"] = ConfigRecord(meta)
        return
    import os

    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # never half a file


def compression_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Just inside packing: a train reply's arrays become the compressed update (trained minus
    received, plus the residual the last encoding left; common/compression.py). Refusals and
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
    from common.compression import compress

    path = _residual_file(ctxt, task.run) if task.error_feedback else None
    residual = _stored(ctxt, path, RESIDUAL_KEY)[0] if task.error_feedback else None
    trained = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    sent, left = compress(trained, received, residual, task.codec, task.block, task.topk)
    if task.error_feedback:
        _store(ctxt, path, RESIDUAL_KEY, left)
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in sent.items()})
    return reply


MODEL_KEY = "aseanfl.downlink"  # Context.state: the last global model received (and its run and version)


def _model_file(ctxt: Context, run: str):
    residual = _residual_file(ctxt, run)
    return residual.with_name(f"{run}.model.safetensors") if residual is not None else None


def downlink_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Just inside packing: a model the server sent as a delta against the version this
    hospital holds (strategy.compression.downlink) is rebuilt before anything reads it, checked
    against the server's sha256, and kept (beside the ledgers) for the next delta."""
    from common.compression import DOWNLINK, CompressionError, reconstruct

    if DOWNLINK not in msg.content.config_records or "arrays" not in msg.content.array_records:
        return call_next(msg, ctxt)
    meta = dict(msg.content.config_records[DOWNLINK])
    run = TaskSpec.from_config(msg.content["config"]).run
    held, version = None, None
    if meta["kind"] != "full":
        held, kept = _stored(ctxt, _model_file(ctxt, run), MODEL_KEY)
        if held is None or kept.get("run", run) != run or "version" not in kept:
            held = None
        else:
            version = int(kept["version"])
    try:
        model = reconstruct({k: a.numpy() for k, a in msg.content["arrays"].items()}, meta, held, version)
    except CompressionError as exc:
        raise DownlinkError(str(exc)) from None
    if meta["kind"] != "same":
        _store(ctxt, _model_file(ctxt, run), MODEL_KEY, model, {"run": run, "version": str(meta["to"])})
    msg.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in model.items()})
    return call_next(msg, ctxt)


FROZEN_STATE = "aseanfl.frozen"  # Context.state: the run's frozen layers (model.freeze, model.adapters)


def _frozen_file(ctxt: Context, run: str):
    path = _model_file(ctxt, run)
    return path.with_name(f"{run}.frozen.safetensors") if path is not None else None


def frozen_layers(ctxt: Context, run: str) -> dict[str, np.ndarray] | None:
    """The run's frozen layers as this hospital keeps them (frozen_mod checked them); None if none."""
    return _stored(ctxt, _frozen_file(ctxt, run), FROZEN_STATE)[0]


def frozen_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Just inside downlink: in a run that fine-tunes part of the model, the server sends the
    frozen layers until this hospital holds them. They are kept (in a deployed hospital beside
    its ledgers, so a restarted daemon still has them) and checked against the digest every task
    carries; the task then goes on without both records, as any other task looks (central DP's
    clipping wants one array record), and the model is put together where it is built
    (app.py: _model). The reply's arrays leave without the frozen layers."""
    from common.compression import digest

    meta = msg.content.config_records.get(FROZEN_DIGEST_KEY)
    if meta is None:
        return call_next(msg, ctxt)
    run = TaskSpec.from_config(msg.content["config"]).run
    if FROZEN_KEY in msg.content.array_records:
        base = {k: a.numpy() for k, a in msg.content[FROZEN_KEY].items()}
        if digest(base) != str(meta["sha256"]):
            raise DownlinkError("the frozen layers the server sent do not match their digest")
        _store(ctxt, _frozen_file(ctxt, run), FROZEN_STATE, base, {"run": run})
    else:
        base = frozen_layers(ctxt, run)
        if base is None or digest(base) != str(meta["sha256"]):
            raise DownlinkError("this hospital holds no copy of the run's frozen layers (its state was reset); the "
                                "server sends them with its next task")
    sent = msg.content
    msg.content = RecordDict({k: v for k, v in sent.items() if k not in (FROZEN_KEY, FROZEN_DIGEST_KEY)})
    try:
        return call_next(msg, ctxt)
    finally:  # the mods around it see the message as the server sent it
        msg.content = sent


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
