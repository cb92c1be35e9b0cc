"""Server side of SecAgg+: one training phase through Flower's `SecAggPlusWorkflow`.

Flower 1.41 offers SecAgg+ only as a legacy workflow (it wants a LegacyContext whose strategy
has configure_fit/aggregate_fit). A small bridge hands it this round's Message-API tasks and
takes back the unmasked, example-weighted mean: no single hospital's model is ever seen here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from client.secure import NAMES_KEY

log = logging.getLogger("aseanfl")


@dataclass
class SecureRound:
    replies: list[Message] = field(default_factory=list)  # hospitals' masked-vector replies: metrics, site
    traffic: dict[int, list[int]] = field(default_factory=dict)  # node id -> [bytes to, bytes from], all stages
    sites: dict[int, str] = field(default_factory=dict)  # node id -> site name
    failed: set[int] = field(default_factory=set)  # nodes that replied with an error in some stage
    arrays: ArrayRecord | None = None  # the new global model; None if the protocol halted
    problem: str | None = None


class _RecordingGrid:
    """The real Grid, keeping every exchange so that traffic and replies can be reported."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.exchanges: list[tuple[list[Message], list[Message]]] = []

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.exchanges.append((messages, replies))
        return replies


@dataclass(frozen=True)
class _NodeProxy:
    node_id: int  # all the workflow asks of a legacy ClientProxy


class _Bridge:
    """The legacy-strategy face of one round."""

    def __init__(self, tasks: list[Message], names: list[str]) -> None:
        self.tasks, self.names = tasks, names
        self.mean: Parameters | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [
            (_NodeProxy(m.metadata.dst_node_id), FitIns(parameters, {**dict(m.content["config"]), NAMES_KEY: self.names}))
            for m in self.tasks
        ]

    def aggregate_fit(self, server_round, results, failures):
        self.mean = results[0][1].parameters if results else None  # each result holds the same unmasked mean
        return self.mean, {}


def secure_train(grid: Grid, workflow: SecAggPlusWorkflow, tasks, arrays: ArrayRecord, rnd: int,
                 payload_bytes) -> SecureRound:
    """Run SecAgg+ for the training tasks `tasks` (from the strategy's configure_train)."""
    tasks = list(tasks)
    out = SecureRound()
    if not tasks:
        out.problem = "no hospitals were sampled"
        return out
    bridge = _Bridge(tasks, list(arrays.keys()))
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: rnd}), MAIN_PARAMS_RECORD: arrays})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}), strategy=bridge)
    recording = _RecordingGrid(grid)
    try:
        workflow(recording, context)
    except Exception as exc:  # noqa: BLE001 - a malformed reply must not end the run
        log.exception("SecAgg+ failed in round %d", rnd)
        out.problem = f"SecAgg+ failed: {type(exc).__name__}: {exc}"
    for messages, replies in recording.exchanges:
        for m in messages:
            out.traffic.setdefault(m.metadata.dst_node_id, [0, 0])[0] += payload_bytes(m.content)
        for r in replies:
            nid = r.metadata.src_node_id
            if r.has_error():
                out.failed.add(nid)
                continue
            out.traffic.setdefault(nid, [0, 0])[1] += payload_bytes(r.content)
            if "site" in r.content.config_records:  # only the masked-vector stage runs the hospital's app
                out.sites[nid] = str(r.content.config_records["site"]["name"])
                out.replies.append(r)
    if bridge.mean is not None and out.problem is None:
        out.arrays = _named(bridge.mean, arrays)
        if out.arrays is None:
            out.problem = "the secure sum holds no training examples (every hospital refused or dropped)"
    elif out.problem is None:
        out.problem = "SecAgg+ halted: too few hospitals stayed to unmask the sum (see the log)"
    return out


def _named(mean: Parameters, like: ArrayRecord) -> ArrayRecord | None:
    """Legacy Parameters back to the model's names and dtypes; None if not finite."""
    values = parameters_to_ndarrays(mean)
    out = {}
    for (name, ref), value in zip(like.items(), values, strict=True):
        ref = ref.numpy()
        if value.shape != ref.shape or not np.all(np.isfinite(value)):
            return None
        out[name] = Array(np.asarray(value, dtype=ref.dtype))
    return ArrayRecord(out)
