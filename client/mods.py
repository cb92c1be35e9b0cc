"""Client mods: hospital-side clipping for Flower's client-side central-DP wrappers."""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from .messages import REFUSAL_KEY, TaskSpec

_MODS = {"fixed": fixedclipping_mod, "adaptive": adaptiveclipping_mod}


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
