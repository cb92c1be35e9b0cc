"""Model arrays on the wire as one packed array per record.

Flower sends every array of a message as separate objects (an Array and its chunks, each one
request per hop: server -> SuperLink -> front -> SuperNode -> the hospital's worker, and back),
so a cnn's 8 tensors cost ~25 requests per message and a resnet18's 65 ~75. Packing each
ArrayRecord into a single safetensors blob (one Array, chunked by Flower only past 5 MiB) cuts
that to ~6 (plus one per 5 MiB), whatever the model. Both ends are the same approved app bundle: the server packs
what it sends and unpacks replies before anything checks them (server.engine.rounds wraps its Grid), the
hospital unpacks before its app and packs its reply (client.training.mods.packing_mod), so strategies,
SecAgg+, clipping and update validation see ordinary ArrayRecords in simulation and deployment.

safetensors (already our checkpoint format) parses the blob without pickle and checks its
offsets; its `__metadata__` holds exactly one entry, the arrays' order (safetensors sorts them;
Flower's FedOpt strategies pair arrays by position). A blob with anything else in it is refused.
"""

from __future__ import annotations

import json
import struct

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

KEY = "aseanfl.packed"  # the one array of a packed ArrayRecord
STYPE = "safetensors"  # Array.stype: how its bytes are serialised
_ORDER = "order"


class PackingError(ValueError):
    """A packed record that does not decode to model arrays."""


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [KEY] and record[KEY].stype == STYPE


def pack(record: ArrayRecord) -> ArrayRecord:
    """One Array holding all of `record`'s arrays (an empty or packed record as it is)."""
    if not record or is_packed(record):
        return record
    arrays = {name: np.require(array.numpy(), requirements="C") for name, array in record.items()}  # 0-d stays 0-d
    blob = st_save(arrays, metadata={_ORDER: json.dumps(list(arrays))})
    return ArrayRecord({KEY: Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)})


def header(blob: bytes) -> tuple[list[str], dict]:
    """The blob's array order and its safetensors header (name -> dtype, shape, offsets),
    checked: the order names each array once and the metadata holds nothing else."""
    if len(blob) < 8:
        raise PackingError(f"it is too short ({len(blob)} bytes)")
    (size,) = struct.unpack("<Q", blob[:8])
    if size > len(blob) - 8:
        raise PackingError(f"its header claims {size} bytes, the record holds {len(blob) - 8}")
    try:
        head = json.loads(blob[8:8 + size])
        meta = head.pop("__metadata__", None) or {}
        order = json.loads(meta.get(_ORDER, "null"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise PackingError(f"its header is not readable ({exc})") from None
    names = order if isinstance(order, list) and all(isinstance(n, str) for n in order) else None
    if set(meta) != {_ORDER} or names is None or sorted(names) != sorted(head) or len(set(names)) != len(names):
        raise PackingError("its header does not list its arrays exactly once (or carries other metadata)")
    return order, head


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The arrays a packed record holds, in their original order (others as they are);
    PackingError when the bytes do not decode."""
    if not is_packed(record):
        return record
    blob = record[KEY].data
    order, _ = header(blob)
    try:
        arrays = st_load(blob)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise PackingError(f"its arrays do not decode ({exc})") from None
    return ArrayRecord({name: Array(arrays[name]) for name in order})


def pack_content(content: RecordDict, memo: dict[int, ArrayRecord]) -> RecordDict:
    """A copy of `content` with each ArrayRecord packed; the records themselves are not changed
    (a strategy sends one to every hospital: `memo`, by record id, packs it once)."""
    out = {}
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            if id(rec) not in memo:
                memo[id(rec)] = pack(rec)
            rec = memo[id(rec)]
        out[name] = rec
    return RecordDict(out)


def unpack_content(content: RecordDict) -> RecordDict:
    return RecordDict({name: unpack(rec) if isinstance(rec, ArrayRecord) else rec for name, rec in content.items()})


def packed(messages) -> list[Message]:
    """The messages, each with its content packed (in place: a message is sent once); a record
    several of them share is packed once."""
    memo: dict[int, ArrayRecord] = {}
    messages = list(messages)
    for msg in messages:
        if msg.has_content():
            msg.content = pack_content(msg.content, memo)
    return messages


def unpacked(msg: Message) -> Message:
    """`msg` with its content unpacked, in place; PackingError when it does not decode."""
    if msg.has_content():
        msg.content = unpack_content(msg.content)
    return msg


class PackedGrid:
    """The server's Grid with packing at its edge: what the round loop (and SecAgg+'s workflow)
    sends is packed, what comes back is unpacked before anyone reads it. A reply that does not
    decode becomes an error reply saying so, so the round goes on without it."""

    def __init__(self, grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    @staticmethod
    def _opened(replies) -> list[Message]:
        out = []
        for reply in replies:
            try:
                out.append(unpacked(reply))
            except PackingError as exc:
                reply.__dict__["_content"] = None  # Message has no public way to turn content into an error
                reply.error = Error(code=ErrorCode.UNKNOWN, reason=f"the model arrays in its reply do not decode: {exc}")
                out.append(reply)
        return out

    def push_messages(self, messages):
        return self._grid.push_messages(packed(messages))

    def pull_messages(self, message_ids):
        return self._opened(self._grid.pull_messages(message_ids))

    def send_and_receive(self, messages, *, timeout: float | None = None):
        return self._opened(self._grid.send_and_receive(packed(messages), timeout=timeout))
