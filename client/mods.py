"""Client mods: error replies that carry no local detail, model arrays packed on the wire, and
hospital-side clipping for Flower's client-side central-DP wrappers."""

from __future__ import annotations

import errno
import logging

from flwr.app import Context, Error, Message, MessageType
from flwr.common.constant import ErrorCode
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from aseanfl.packing import packed, unpacked

from .messages import REFUSAL_KEY, TaskSpec
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
        if isinstance(exc, SiteDataError):  # phrased to name no file and no value
            reason = f"{reason}: {exc}"
        elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            reason = f"{reason}: no space left on the hospital's disk"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def packing_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Just inside the error guard: the server's arrays unpacked before anything reads them, the
    reply's arrays packed as the last step before it leaves (aseanfl/packing.py)."""
    reply = call_next(unpacked(msg), ctxt)
    return packed([reply])[0]


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
