"""Hospital side of SecAgg+: Flower's `secaggplus_mod` around this ClientApp's train handler.

Flower's SecAgg+ speaks the legacy FitIns/FitRes record layout; this mod translates it to and
from the layout the handler uses ("arrays" + "config" in, "arrays" + "metrics" out). The model
leaves the hospital only masked and quantised; a refusing hospital joins the masking with
weight 0, so the protocol still completes for the others.
"""

from __future__ import annotations

import logging

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from protocol.messages import NAMES_KEY, REFUSAL_KEY

log = logging.getLogger("aseanfl")


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run SecAgg+ when the server's message is a SecAgg+ stage; anything else passes through."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)

    def train(m: Message, c: Context) -> Message:
        received = _plain_task(m)
        max_weight = float(c.state.config_records[RECORD_KEY_STATE]["max_weight"])
        return _legacy_reply(call_next(m, c), received, max_weight)

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(max(level, logging.INFO))  # the protocol logs every stage at DEBUG
    try:
        return secaggplus_mod(msg, ctxt, train)
    finally:
        flwr_log.setLevel(level)


def _plain_task(msg: Message) -> ArrayRecord:
    """FitIns records -> {"arrays", "config"} in place; returns the global arrays received."""
    fitins = msg.content.config_records["fitins.config"]
    names = list(fitins[NAMES_KEY])
    tensors = [bytes_to_ndarray(a.data) for a in msg.content.array_records["fitins.parameters"].values()]
    if len(names) != len(tensors):
        raise ValueError(f"SecAgg+ task names {len(names)} arrays but carries {len(tensors)}")
    arrays = ArrayRecord({n: Array(t) for n, t in zip(names, tensors, strict=True)})
    config = ConfigRecord({k: v for k, v in fitins.items() if k != NAMES_KEY})
    msg.content = RecordDict({"arrays": arrays, "config": config})
    return arrays


def _legacy_reply(reply: Message, received: ArrayRecord, max_weight: float) -> Message:
    """The handler's reply in FitRes layout for secaggplus_mod, which masks "fitres.parameters"
    and empties every array record before the reply leaves."""
    content = reply.content
    if REFUSAL_KEY in content.config_records:
        arrays, weight = received, 0  # masks must still cancel; weight 0 adds nothing to the sum
    else:
        arrays = content["arrays"]
        weight = int(content.metric_records["metrics"]["num-examples"])
        if weight > max_weight:
            log.warning("SecAgg+: %d training examples weigh in as the protocol's max_weight %g", weight, max_weight)
            weight = int(max_weight)
    fitres = FitRes(Status(Code.OK, ""), compat.arrayrecord_to_parameters(arrays, keep_input=True), weight, {})
    legacy = compat.fitres_to_recorddict(fitres, keep_input=False)
    for name, record in content.items():
        if name != "arrays":
            legacy[name] = record
    reply.content = legacy
    return reply
