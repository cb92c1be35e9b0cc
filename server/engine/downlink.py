"""The model the server sends, compressed (strategy.compression.downlink): each hospital gets
the new global model as a delta against the version it already holds, encoded like the
hospitals' updates (common/compression.py), or the full model where it holds none.

The federation's model *is* the broadcast model B: after each aggregation the server moves B
towards the strategy's result N by one encoded delta, B' = B + Q(N - B + e), and keeps what the
encoding lost, e, for the next delta (server-side error feedback), so the loss does not build
up. Every hospital that decodes reconstructs B' bit for bit (checked against its sha256); it
trains from B', and its update is decoded against B'. Deltas are kept while their chain costs
less than the full model, so a hospital that sat out a few rounds (not sampled) gets the chain
from its version; one that holds nothing, or an older version, gets the full model. The server
learns what each hospital holds from its replies: a hospital that failed or did not answer is
sent the full model next time."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from common.compression import DOWNLINK as RECORD, apply, compress, decode, digest


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for v in arrays.values())


class Downlink:
    def __init__(self, codec: str, block: int, shared: ArrayRecord) -> None:
        self.codec, self.block = codec, block
        self.current = {k: a.numpy().copy() for k, a in shared.items()}
        self.version, self.sha = 0, digest(self.current)
        self.residual: dict[str, np.ndarray] | None = None  # what the last encoding lost
        self.chain: dict[int, dict[str, np.ndarray]] = {}  # version -> the encoded delta that made it
        self.holds: dict[int, int] = {}  # node id -> the version the server knows it holds

    def advance(self, new: ArrayRecord) -> ArrayRecord:
        """B' from the strategy's result N (the shared arrays): the broadcast model. The delta is
        encoded as a hospital encodes its update (with what the last encoding lost added), and B'
        is rebuilt from it exactly as the hospitals rebuild it."""
        encoded, self.residual = compress({k: a.numpy() for k, a in new.items()}, self.current, self.residual,
                                          self.codec, self.block)
        self.current = apply(self.current, decode(encoded, self.current, self.codec, self.block))
        self.version += 1
        self.sha = digest(self.current)
        self.chain[self.version] = encoded
        full, total = _nbytes(self.current), 0
        for v in sorted(self.chain, reverse=True):  # keep the newest deltas whose chain is cheaper than full
            total += _nbytes(self.chain[v])
            if total >= full:
                self.chain = {k: c for k, c in self.chain.items() if k > v}
                break
        return ArrayRecord({k: Array(v) for k, v in self.current.items()})

    def outgoing(self, messages: list[Message]) -> list[Message]:
        """Each message's model as what its hospital needs: nothing new, a chain of deltas, or full."""
        for m in messages:
            content, held = m.content, self.holds.get(m.metadata.dst_node_id)
            meta = {"to": self.version, "digest": self.sha, "codec": self.codec, "block": self.block}
            if held == self.version:
                arrays, kind = ArrayRecord(), "same"
            elif held is not None and all(v in self.chain for v in range(held + 1, self.version + 1)):
                arrays = ArrayRecord({f"{v}/{k}": Array(a) for v in range(held + 1, self.version + 1)
                                      for k, a in self.chain[v].items()})
                kind = "chain"
            else:
                arrays, kind, held = content["arrays"], "full", -1
            records = {k: v for k, v in content.items() if k != "arrays"}
            m.content = RecordDict({"arrays": arrays, **records, RECORD: ConfigRecord({**meta, "kind": kind,
                                                                                      "base": held})})
        return messages

    def replied(self, sent: list[Message], replies: list[Message]) -> None:
        """A hospital that answered without an error holds the version it was sent; any other
        is sent the full model next time."""
        ok = {r.metadata.src_node_id for r in replies if not r.has_error()}
        for m in sent:
            nid = m.metadata.dst_node_id
            if nid in ok:
                self.holds[nid] = int(m.content.config_records[RECORD]["to"])
            else:
                self.holds.pop(nid, None)
