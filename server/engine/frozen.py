"""The frozen layers of a run that fine-tunes part of its model (model.freeze, model.adapters):
they keep model.weights' values for the whole run, so each hospital gets them once, with the
first task it is sent, and keeps them (client/training/mods.py: frozen_mod); every later task
carries only their digest, which the hospital checks its copy against. A hospital that answered
with an error (its state may be gone) gets them again with its next task."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from common.compression import digest
from protocol.messages import FROZEN_DIGEST_KEY, FROZEN_KEY


class FrozenLayers:
    """`keys` empty (the whole model trains): nothing is added to any message."""

    def __init__(self, arrays: ArrayRecord, keys: set[str]) -> None:
        self.keys = keys
        self.base = ArrayRecord({k: arrays[k] for k in sorted(keys)})
        self.meta = {"sha256": digest({k: a.numpy() for k, a in self.base.items()})}
        self.holders: set[int] = set()  # node ids

    @staticmethod
    def line(arrays: ArrayRecord, keys: set[str], model) -> str:
        """What the run says it fine-tunes (`model`: the run's ModelConfig)."""
        total = sum(a.numpy().size for a in arrays.values())
        moving = total - sum(arrays[k].numpy().size for k in keys)
        how = f"LoRA adapters (rank {model.adapters.rank}) and the classifier head" if model.adapters else \
            f"all but the frozen layers ({', '.join(model.freeze)})"
        return (f"fine-tuning {how}: {moving:,} of {total:,} values ({100 * moving / total:.1f} %) are trained and "
                "travel; the frozen layers reach each hospital once")

    def outgoing(self, messages: list[Message]) -> list[Message]:
        if not self.keys:
            return messages
        for m in messages:  # a strategy gives all its messages one RecordDict: each gets its own
            extra = {} if m.metadata.dst_node_id in self.holders else {FROZEN_KEY: self.base}
            m.content = RecordDict({**dict(m.content.items()), FROZEN_DIGEST_KEY: ConfigRecord(dict(self.meta)), **extra})
        return messages

    def replied(self, sent: list[Message], replies: list[Message]) -> None:
        ok = {r.metadata.src_node_id for r in replies if not r.has_error()}
        asked = {m.metadata.dst_node_id for m in sent}
        self.holders = (self.holders | (ok & asked)) - (asked - ok)
