"""Server side of SecAgg+: one training phase through Flower's `SecAggPlusWorkflow`.

Flower 1.41 and 1.42 offer SecAgg+ only as a legacy workflow (it wants a LegacyContext whose strategy
has configure_fit/aggregate_fit). A small bridge hands it this round's Message-API tasks and
takes back the unmasked, example-weighted mean: no single hospital's model is ever seen here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from protocol.messages import NAMES_KEY, Refusal, TrainMetrics
from strategies.factory import cohort, weighted_mean

from server.engine.exchange import checked, payload_bytes
from server.engine.names import learn_names, site_name
from server.engine.plan import Plan

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


def secure_phase(grid: Grid, plan: Plan, workflow, tasks, arrays: ArrayRecord, rnd: int,
                 row: Callable[[str], dict], refusals: dict[str, Refusal], known: dict[int, str]):
    """Training through SecAgg+: only the hospitals' masked vectors and metrics reach the server.
    A reply that breaks the schema is reported but stays in the sum (it cannot be taken out of it)."""
    result = secure_train(grid, workflow, tasks, arrays, rnd, payload_bytes)
    for nid, declared in result.sites.items():  # named by its node key; its masked vector cannot leave the sum
        if known.get(nid, declared) != declared:
            plan.progress.problem(f"round {rnd} training: the reply of {known[nid]} (its registered node key) declares "
                                  f"itself as {declared}; under SecAgg+ it cannot be taken out of the sum")
            row(known[nid])["status"] = "rejected:identity"
    learn_names(result.replies, known)
    result.sites = {**result.sites, **known}  # the server's names win; one that dropped out before naming itself too
    for nid, (to_site, from_site) in result.traffic.items():
        r = row(result.sites.get(nid, f"node-{nid}"))
        r["bytes_to_site"] += to_site
        r["bytes_from_site"] += from_site
        if nid in result.failed:
            r["status"] = "error"
    replies = sorted(result.replies, key=lambda r: site_name(r, result.sites))
    trained = checked(replies, TrainMetrics, plan.progress, rnd, "training", refusals, result.sites, arrays=False)
    for nid in sorted(result.failed):
        plan.progress.problem(f"round {rnd} training: {result.sites.get(nid, f'node-{nid}')} dropped out of SecAgg+")
    if result.problem:
        plan.progress.problem(f"round {rnd} training: {result.problem}")
    new_arrays = result.arrays
    dp = plan.config.strategy.central_dp
    if new_arrays is not None and dp is not None:  # client-side fixed clipping: the server adds the noise
        values = new_arrays.to_numpy_ndarrays()
        add_gaussian_noise_inplace(values, compute_stdv(dp.noise_multiplier, dp.clipping_norm,
                                                  cohort(plan.config.strategy, plan.sites) if plan.sites else len(trained)))
        new_arrays = ArrayRecord({k: Array(v) for k, v in zip(new_arrays.keys(), values, strict=True)})
    metrics = [RecordDict({"metrics": r.content.metric_records["metrics"]}) for r in trained]
    return trained, new_arrays, weighted_mean(metrics, "num-examples") if trained else None
