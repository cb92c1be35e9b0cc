"""The federated round loop: Flower strategy + Grid, plus per-site recording.

It follows Flower's `Strategy.start` step for step (configure_train -> send_and_receive ->
aggregate_train -> configure_evaluate -> ... -> server-side evaluation) and adds what a
coordinator needs: per-site rows, payload byte counts, replies in a fixed order (so a seed
reproduces a run exactly), schema checks naming the site, checkpoints after every round.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv
from pydantic import ValidationError

from aseanfl.i18n import N_, _
from aseanfl.packing import PackedGrid
from client.messages import REFUSAL_KEY, EvalMetrics, Refusal, TaskSpec, TrainMetrics
from medimaging.datasets import Split
from medimaging.models import build_model, norm_keys
from medimaging.training import evaluate
from strategies.config import UpdateValidation
from strategies.factory import build_secure_workflow, build_strategy, client_clipping, cohort, weighted_mean

from . import checkpoint
from .config import RunConfig
from .digest import MANY, digest
from .outputs import RunRecorder, score_of
from .secure import secure_train
from .words import refusal_line, status_word

log = logging.getLogger("aseanfl")
PHASES = {"training": N_("training"), "validating": N_("validating"),
          "cross-site evaluation": N_("cross-site evaluation")}


@dataclass(frozen=True)
class TaskShape:
    in_channels: int
    num_classes: int  # classes, findings, or mask labels with the background
    image_size: int
    task: str = "classification"  # or "segmentation"
    spatial_dims: int = 2

    def model(self, cfg: RunConfig, private: bool = False) -> torch.nn.Module:
        return build_model(cfg.model, self.in_channels, self.num_classes, self.image_size, private, self.spatial_dims)


class Progress:
    """Receives round events; the CLI shows them live, the default logs them (in the reader's
    language: `aseanfl run` passes the coordinator's to the ServerApp)."""

    def round_started(self, rnd: int, total: int, phase: str) -> None:
        log.info(_("round {round}/{total}: {phase}", round=rnd, total=total, phase=_(PHASES.get(phase, phase))))

    def round_finished(self, rnd: int, total: int, rows: list[dict]) -> None:
        if len(rows) - 1 > MANY:  # hundreds of hospitals: a digest, then the sites worth a line
            d = digest(rows)
            log.info("round %d: %d sites: %s; %s", rnd, d.sites, d.counts(), d.spread())
            rows = d.shown() + [r for r in rows if r["site"] == "global"]
        for row in rows:
            key = score_of([row])[0]
            status = row.get("status") or ""
            log.info("round %d %-14s %s val_%s=%s test_%s=%s", rnd, row["site"],
                     status if row["site"] == "global" else status_word(status), key, row.get(f"val_{key}"), key,
                     row.get(f"test_{key}"))

    def problem(self, text: str) -> None:
        log.warning(text)

    def refused(self, rnd: int, site: str, refusal: Refusal) -> None:
        log.warning(refusal_line(rnd, site, refusal))

    def received(self, rnd: int, phase: str, reply: Message) -> None:
        """Every reply as it arrived, before any check (audits and tests look here)."""


@dataclass
class Plan:
    """Everything the ServerApp needs for one run."""

    config: RunConfig
    shape: TaskShape
    run_dir: Path
    test: Split | None = None
    progress: Progress = field(default_factory=Progress)
    private: bool = False  # some hospital trains with DP-SGD: build DP-compatible models
    sites: int | None = None  # hospitals in the federation (central DP scales its noise by the sampled share)
    stop: threading.Event = field(default_factory=threading.Event)  # set when the engine under the run died
    node_names: dict[int, str] = field(default_factory=dict)  # a deployment's registered hospitals by node id
    registry: Path | None = None  # a deployment's server/registered.json, read again each round (revocations)
    site_names: list[str] | None = None  # a simulation's hospitals, in partition-id order
    resume: bool = False  # continue the run in run_dir from its checkpoint

    def __getstate__(self) -> dict:  # a copy sent to another process gets its own stop signal
        return {k: v for k, v in self.__dict__.items() if k != "stop"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, stop=threading.Event())


class RunAborted(RuntimeError):
    """The engine that delivers messages is gone; waiting for replies would never end."""


def _value_bytes(value) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return len(value) if isinstance(value, (str, bytes)) else 8


def payload_bytes(content: RecordDict) -> int:
    """Bytes of array data plus metric/config values in a message's content."""
    total = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for rec in list(content.metric_records.values()) + list(content.config_records.values()):
        total += sum(_value_bytes(v) for v in rec.values())
    return total


def _site_name(reply: Message, names: dict[int, str]) -> str:
    """The hospital a reply is from: the name the server knows its node by (registered hospital
    keys in a deployment, partition ids in a simulation), never what the reply says of itself;
    a node the server does not know is named by its id until it has declared a name no other
    node holds (`_exchange`)."""
    return names.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")


def declared_name(reply: Message) -> str | None:
    """The hospital name a reply carries in its own 'site' record (its site.yaml), if any."""
    if reply.has_error() or "site" not in reply.content.config_records:
        return None
    return str(reply.content.config_records["site"].get("name", ""))


def impostor(reply: Message, names: dict[int, str]) -> str | None:
    """The name a reply declares when it is not the name of the node it came from (a hospital
    speaking as another); None when they agree or the reply declares nothing."""
    declared = declared_name(reply)
    known = names.get(reply.metadata.src_node_id)
    if declared is None or known is None or declared == known:
        return None
    return declared


def learn_names(replies: Iterable[Message], names: dict[int, str]) -> None:
    """Name a node the server did not know by the name it declared, unless another node holds
    that name (a node cannot take a known hospital's name)."""
    taken = set(names.values())
    for reply in replies:
        nid, declared = reply.metadata.src_node_id, declared_name(reply)
        if declared and nid not in names and declared not in taken:
            names[nid] = declared
            taken.add(declared)


# Flower's own replies for a hospital that went away (no heartbeat): not an answer from the site.
GONE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def _gone(reply: Message) -> bool:
    return reply.has_error() and reply.error.code in GONE


def _send_and_receive(grid: Grid, messages: list[Message], timeout: float, stop: threading.Event,
                      arrived: dict[int, float] | None = None) -> list[Message]:
    """Grid.send_and_receive, but it gives up as soon as `stop` is set, and a deployed grid is
    polled every 0.2 s (Flower's polls every 3 s, which adds seconds to each round). Each reply
    is attributed to the node it was asked of (Flower's 'node unavailable' reply comes from the
    SuperLink's own id); `arrived`: node id -> seconds after sending."""
    ids = list(grid.push_messages(messages))
    asked = dict(zip(ids, (m.metadata.dst_node_id for m in messages), strict=True))
    pending, start = set(ids), time.monotonic()
    interval = getattr(grid, "pull_interval", 0.2)  # a local call to the SuperLink, a few ms
    deadline, replies = start + timeout, []
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        for m in got:
            node = asked.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
            m.metadata.__dict__["_src_node_id"] = node
            if arrived is not None:
                arrived[node] = time.monotonic() - start
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending and stop.wait(interval):
            raise RunAborted("the federation engine stopped while the server waited for replies")
    return replies


def _exchange(grid: Grid, messages: Iterable[Message], timeout: float, known: dict[int, str],
              silent: Callable[[int, int, str], None], stop: threading.Event,
              rejected: Callable[[int, int, int, str], None] | None = None) -> tuple[list[Message], dict[str, int]]:
    """Send, wait up to `timeout`, return replies sorted by site and the bytes sent to each site.
    Each reply is named by the node it came from (`known`: node id -> site, learnt for unknown
    nodes). `silent(node id, bytes sent, why)` for each node that did not reply in time or went
    away (Flower answered for it); `rejected(node id, bytes sent, bytes received, declared name)`
    for each reply that declares another hospital's name: neither kind is among the replies."""
    messages = list(messages)
    sent_to = {m.metadata.dst_node_id: payload_bytes(m.content) for m in messages}
    arrived: dict[int, float] = {}
    got = _send_and_receive(grid, messages, timeout, stop, arrived)
    learn_names((r for r in got if not _gone(r)), known)
    replies = []
    for r in got:
        if _gone(r):
            continue
        declared = impostor(r, known)
        if declared is None:
            replies.append(r)
            continue
        nid = r.metadata.src_node_id
        log.warning("node %d, registered as %s, answered as %s: its reply is left out (rejected:identity)", nid,
                    known[nid], declared)
        if rejected is not None:
            rejected(nid, sent_to.get(nid, 0), payload_bytes(r.content), declared)
    replies.sort(key=lambda r: _site_name(r, known))
    sent = {_site_name(r, known): sent_to.get(r.metadata.src_node_id, 0) for r in replies}
    for r in filter(_gone, got):
        nid = r.metadata.src_node_id
        silent(nid, sent_to.get(nid, 0), f"went offline {arrived.get(nid, 0):.0f} s after the task was sent "
                                         f"(its SuperNode stopped sending heartbeats; Flower: {r.error.reason})")
    for nid in sorted(set(sent_to) - {r.metadata.src_node_id for r in got}):
        silent(nid, sent_to[nid], f"did not reply within {timeout:g} s")
    return replies, sent


def registered_names(registry: Path | None) -> dict[int, str]:
    """Node id -> hospital, as `aseanfl server start` registered them in server/registered.json
    (a revoked hospital's or an old key's entry is named so: 'site (revoked)')."""
    if registry is None:
        return {}
    try:
        return {int(node): site for site, node in json.loads(registry.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def unregistered(registry: Path | None, nodes: set[int]) -> set[int]:
    """Those of `nodes` that the coordinator no longer registers (revoked, or a re-enrolled
    hospital's old key), from server/registered.json (site -> node id; such entries are renamed
    'site (revoked)' or 'site (old key N)'); none when the run has no registry (a simulation)."""
    if registry is None:
        return set()
    current = {node for node, site in registered_names(registry).items() if "(" not in site}
    return {n for n in nodes if n not in current} if current else set()


def _await_rejoin(grid: Grid, before: set[int], wait: float, plan: "Plan", names: dict[int, str], rnd: int) -> set[int]:
    """The connected nodes; if one connected at the round before is gone (a daemon restarting),
    first wait up to `wait` s for it to come back, so it trains in this round."""
    now = set(grid.get_node_ids())
    missing = before - now - unregistered(plan.registry, before)  # a revoked hospital is not waited for
    if not missing or wait <= 0:
        return now
    who = ", ".join(sorted(names.get(n, f"node-{n}") for n in missing))
    plan.progress.problem(f"round {rnd}: {who} disconnected since the round before; waiting up to {wait:g} s for it to "
                          "reconnect")
    deadline = time.monotonic() + wait
    while missing and time.monotonic() < deadline:
        if plan.stop.wait(1.0):
            raise RunAborted("the federation engine stopped while the server waited for hospitals")
        now = set(grid.get_node_ids())
        missing = before - now - unregistered(plan.registry, before)
    plan.progress.problem(f"round {rnd}: {who} " + ("still away; the round goes on without it" if missing else "is back"))
    return now


class SiteOrder:
    """The grid with its node ids in a fixed order: by site name, then id. Flower samples the
    round's cohort with `random.sample(list(grid.get_node_ids()), k)`, and the ids come from a
    set of random 64-bit ids, so the same seed would ask other hospitals each run; in this order,
    the seeded `random` asks the same ones."""

    def __init__(self, grid, names: dict[int, str]) -> None:
        self._grid, self._names = grid, names

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        names = self._names
        return sorted(self._grid.get_node_ids(), key=lambda n: (n not in names, names.get(n, ""), n))


def partition_names(grid, sites: list[str] | None) -> dict[int, str]:
    """A simulation's node id -> hospital: Flower's Simulation Engine registers node i as
    partition-id i, one after the other, in its in-memory LinkState (whose node table keeps that
    order). Checked against every reply's own site name as the run goes (_exchange)."""
    state = getattr(grid, "state", None)
    if not sites or state is None:
        return {}
    deadline = time.monotonic() + 60  # the engine registers its nodes while the ServerApp starts
    while len(ids := [n.node_id for n in state.get_node_info()]) < len(sites) and time.monotonic() < deadline:
        time.sleep(0.05)
    if len(ids) != len(sites):
        log.warning("the simulation registered %d nodes for %d sites; sampling is not reproducible", len(ids), len(sites))
        return {}
    return dict(zip(ids, sites, strict=True))


def _in_round(messages: Iterable[Message], rnd: int, names: dict[int, str] | None = None) -> list[Message]:
    """Flower's group_id = the round; replies inherit it (hospitals' audit logs record it). With
    `names`, in site order (Flower's sample is a shuffled cohort): sent the same way every run."""
    messages = list(messages)
    if names is not None:
        messages.sort(key=lambda m: (m.metadata.dst_node_id not in names, names.get(m.metadata.dst_node_id, ""),
                                     m.metadata.dst_node_id))
    for m in messages:
        m.metadata.group_id = str(rnd)
    return messages


def _checked(
    replies: list[Message], schema, progress: Progress, rnd: int, phase: str, refusals: dict[str, Refusal],
    names: dict[int, str], arrays: bool = True,
) -> list[Message]:
    """Keep replies fit to aggregate. Error replies, refusals and metrics that break the schema
    are left out, each reported with the site's name and the reason. `arrays`: a training
    reply must carry the model (under SecAgg+ it carries none in the clear)."""
    kept = []
    for reply in replies:
        progress.received(rnd, phase, reply)
        site = _site_name(reply, names)
        if reply.has_error():
            progress.problem(f"round {rnd} {phase}: {site} replied with an error: {reply.error.reason}")
            continue
        if REFUSAL_KEY in reply.content.config_records:
            try:
                refusal = Refusal.model_validate(dict(reply.content.config_records[REFUSAL_KEY]))
            except ValidationError as exc:
                progress.problem(f"round {rnd} {phase}: {site} sent a malformed refusal: {exc}")
                continue
            refusals[site] = refusal
            progress.refused(rnd, site, refusal)
            continue
        try:
            schema.model_validate(dict(reply.content.metric_records["metrics"]))
        except (KeyError, ValidationError) as exc:
            progress.problem(f"round {rnd} {phase}: {site} sent metrics that break the schema, ignored: {exc}")
            continue
        if schema is TrainMetrics and arrays and list(reply.content.array_records) != ["arrays"]:
            progress.problem(f"round {rnd} {phase}: {site} sent no model arrays (or extra ones), ignored")
            continue
        kept.append(reply)
    return kept


def _count_traffic(replies: list[Message], sent: dict[str, int], row: Callable[[str], dict],
                   names: dict[int, str]) -> None:
    """Bytes both ways for every reply, used or not; a failed reply marks its site's row."""
    for reply in replies:
        r = row(_site_name(reply, names))
        r["bytes_to_site"] += sent[r["site"]]
        if reply.has_error():
            r["status"] = "error"
        else:
            r["bytes_from_site"] += payload_bytes(reply.content)


def _metrics(reply: Message) -> dict:
    return dict(reply.content.metric_records["metrics"])


def local_keys(cfg: RunConfig, shape: TaskShape, private: bool = False) -> set[str]:
    """Arrays that stay at the hospitals: the normalisation layers under FedBN, else none."""
    if not cfg.strategy.fedbn:
        return set()
    return norm_keys(shape.model(cfg, private))


def _without(arrays: ArrayRecord, keys: set[str]) -> ArrayRecord:
    return ArrayRecord({k: v for k, v in arrays.items() if k not in keys}) if keys else arrays


def _merged(arrays: ArrayRecord, new: ArrayRecord) -> ArrayRecord:
    """The global model with the aggregated arrays in, in the model's dtypes (FedOpt computes in
    float64); under FedBN the norm layers keep their values."""
    out = dict(arrays.items())
    for name, array in new.items():
        out[name] = Array(array.numpy().astype(out[name].numpy().dtype, copy=False))
    return ArrayRecord(out)


def _update_problem(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> tuple[str, str] | None:
    """(code, reason) if a hospital's arrays cannot be a model update of `reference`."""
    if set(arrays) != set(reference):
        odd = sorted(set(arrays) ^ set(reference))[:3]
        return "shape", f"its arrays are not the model's (differs at {', '.join(odd)})"
    for name, array in arrays.items():
        value, ref = array.numpy(), reference[name]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            return "shape", f"{name} is {value.dtype}{list(value.shape)}, the model's is {ref.dtype}{list(ref.shape)}"
        if not np.all(np.isfinite(value)):
            return "non-finite", f"{name} holds NaN or Inf"
    return None


def _decoded(replies: list[Message], sent: ArrayRecord, c, progress: Progress, rnd: int,
             row: Callable[[str], dict], names: dict[int, str]) -> list[Message]:
    """Compressed updates (strategy.compression) turned back into the hospitals' trained arrays,
    against the model the server sent; one that does not decode, or decodes to other shapes, is
    left out as rejected:decode with the reason. (Traffic was counted before: compressed bytes.)"""
    if c.codec == "none" and c.topk is None:
        return replies
    from aseanfl.compression import CompressionError, apply, decode

    reference = {k: a.numpy() for k, a in sent.items()}
    kept = []
    for reply in replies:
        try:
            update = decode({k: a.numpy() for k, a in reply.content["arrays"].items()}, reference, c.codec, c.block, c.topk)
        except CompressionError as exc:
            row(_site_name(reply, names))["status"] = "rejected:decode"
            progress.problem(f"round {rnd} training: update from {_site_name(reply, names)} rejected: its compressed "
                             f"update does not decode: {exc}")
            continue
        reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in apply(reference, update).items()})
        kept.append(reply)
    return kept


def _screened(replies: list[Message], sent: ArrayRecord, cfg: UpdateValidation, progress: Progress, rnd: int,
              row: Callable[[str], dict], names: dict[int, str]) -> list[Message]:
    """Server-side update validation, before any strategy: an update with NaN/Inf, the wrong
    arrays, shapes or dtypes, or a norm beyond norm_factor x the round's median is left out,
    its site and the reason reported; the round goes on with the rest."""
    if not cfg.enabled:
        return replies
    reference = {k: a.numpy() for k, a in sent.items()}
    kept, norms = [], []
    for reply in replies:
        problem = _update_problem(reply.content["arrays"], reference)
        if problem is None:
            arrays = reply.content["arrays"]
            norms.append(math.sqrt(sum(float(np.sum((arrays[k].numpy().astype(np.float64) - ref) ** 2))
                                       for k, ref in reference.items() if np.issubdtype(ref.dtype, np.floating))))
            kept.append(reply)
            continue
        row(_site_name(reply, names))["status"] = f"rejected:{problem[0]}"
        progress.problem(f"round {rnd} training: update from {_site_name(reply, names)} rejected: {problem[1]}")
    if len(kept) < cfg.min_sites_for_norm:
        return kept
    median = statistics.median(norms)
    out = []
    for reply, norm in zip(kept, norms, strict=True):
        if median > 0 and norm > cfg.norm_factor * median:
            row(_site_name(reply, names))["status"] = "rejected:norm"
            progress.problem(f"round {rnd} training: update from {_site_name(reply, names)} rejected: its norm {norm:.4g} is "
                             f"{norm / median:.1f}x the round's median {median:.4g} (limit {cfg.norm_factor:g}x)")
        else:
            out.append(reply)
    return out


def _sampling(rows: dict[str, dict], row: Callable[[str], dict], asked: set[int], present: set[int],
              known: dict[int, str]) -> None:
    """Every connected hospital gets a row: `not-sampled` where the round asked it for nothing,
    `eval-only` where it was asked to validate but not to train (strategy.fraction_*)."""
    trained = {known.get(n, f"node-{n}") for n in asked}
    for site, r in rows.items():
        if site not in trained and r["status"] == "ok":
            r["status"] = "eval-only"
    for nid in present - asked:
        site = known.get(nid, f"node-{nid}")
        if site not in rows:
            row(site)["status"] = "not-sampled"


def score_key(task: str) -> str:
    """The federated validation score that picks the best round: AUC, or Dice for segmentation."""
    return "val_dice" if task == "segmentation" else "val_auc"


def initial_arrays(cfg: RunConfig, shape: TaskShape, private: bool = False) -> ArrayRecord:
    torch.manual_seed(cfg.seed)
    return ArrayRecord(shape.model(cfg, private).state_dict())


def server_evaluate(
    cfg: RunConfig, shape: TaskShape, arrays: ArrayRecord, test: Split, private: bool = False
) -> dict[str, float]:
    model = shape.model(cfg, private)
    model.load_state_dict(arrays.to_torch_state_dict())
    scores = evaluate(model, test, shape.num_classes)
    for key, value in scores.items():  # per class/label lists: one column, "0.91;0.78"
        if isinstance(value, list):
            scores[key] = ";".join(f"{v:.4f}" for v in value)
    return scores


def _secure_phase(grid: Grid, plan: Plan, workflow, tasks, arrays: ArrayRecord, rnd: int,
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
    replies = sorted(result.replies, key=lambda r: _site_name(r, result.sites))
    trained = _checked(replies, TrainMetrics, plan.progress, rnd, "training", refusals, result.sites, arrays=False)
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


def _start(plan: Plan, strategy) -> tuple[RunRecorder, ArrayRecord, checkpoint.Checkpoint | None]:
    """A new run's recorder and initial model, or a resumed run's, restored from its checkpoint
    (strategy state included) before anything in the folder changes."""
    cfg, rounds = plan.config, plan.config.server.rounds
    if not plan.resume:
        return RunRecorder(plan.run_dir), initial_arrays(cfg, plan.shape, plan.private), None
    ckpt = checkpoint.load(plan.run_dir, cfg, strategy)
    recorder = RunRecorder(plan.run_dir, keep_rounds=ckpt.round)
    random.setstate(ckpt.random_state)
    recorder.save_model(ckpt.arrays, "model.safetensors", round=ckpt.round)
    if ckpt.best.get("round") == ckpt.round:  # the crash may have come before the best model was written
        recorder.save_model(ckpt.arrays, "model_best.safetensors", round=ckpt.round, selected_by=f"federated "
                            f"{score_key(plan.shape.task)}")
    plan.progress.problem(f"resuming {plan.run_dir.name} at round {ckpt.round + 1}/{rounds}: rounds 1-{ckpt.round} are "
                          "kept from its checkpoint; an interrupted round runs again")
    return recorder, ckpt.arrays, ckpt


def run_federation(grid: Grid, plan: Plan) -> dict:
    """Run all rounds; write rows and checkpoints into plan.run_dir; return the summary. With
    plan.resume, continue the run in plan.run_dir after its last checkpointed round."""
    cfg, shape, progress = plan.config, plan.shape, plan.progress
    raw_grid, grid = grid, PackedGrid(grid)  # model arrays travel packed, one object per record (aseanfl/packing.py)
    random.seed(cfg.seed)  # Flower samples nodes with `random`
    strategy = build_strategy(cfg.strategy, cohort(cfg.strategy, plan.sites or cfg.strategy.min_sites))
    secagg = cfg.strategy.secure_aggregation
    workflow = build_secure_workflow(secagg, cfg.server.round_timeout_s) if secagg is not None else None
    recorder, arrays, resumed = _start(plan, strategy)
    down = None
    if cfg.strategy.compression.downlink != "none":
        from .downlink import Downlink

        down = Downlink(cfg.strategy.compression.downlink, cfg.strategy.compression.block,
                        _without(arrays, local_keys(cfg, shape, plan.private)))
    recorder.track(cfg)
    local = local_keys(cfg, shape, plan.private)
    if workflow is not None and cfg.strategy.validation.enabled:
        progress.problem("update validation is off under SecAgg+: the server never sees one hospital's update")
    rounds, timeout = cfg.server.rounds, cfg.server.round_timeout_s
    best = resumed.best if resumed else {"round": None, "score": float("-inf")}
    started = time.time() - (resumed.seconds if resumed else 0.0)
    round_seconds: list[float] = resumed.round_seconds if resumed else []
    known: dict[int, str] = {**(resumed.names if resumed else {}), **plan.node_names,
                             **partition_names(raw_grid, plan.site_names)}  # node id -> site name
    grid = SiteOrder(grid, known)
    first = resumed.round + 1 if resumed else 1
    present: set[int] = set()  # nodes connected as the round before started
    trained_rounds = resumed.trained_rounds if resumed else 0  # rounds whose global model took in updates
    aggregate_seconds: dict[int, float] = {}
    local_models: dict[str, ArrayRecord] = {}  # server.cross_site: the final round's models, by hospital

    if plan.test is not None and not resumed:
        test = server_evaluate(cfg, shape, arrays, plan.test, plan.private)
        recorder.write_rows([{"round": 0, "site": "global", **{f"test_{k}": v for k, v in test.items()}}])

    for rnd in range(first, rounds + 1):
        round_start = time.time()
        task = TaskSpec(
            run=plan.run_dir.name, server_round=rnd, total_rounds=rounds, seed=cfg.seed, private=plan.private,
            client_clipping=client_clipping(cfg.strategy),
            fedbn=cfg.strategy.fedbn, finetune_eval=cfg.strategy.finetune_eval,
            codec=cfg.strategy.compression.codec, block=cfg.strategy.compression.block,
            topk=cfg.strategy.compression.topk, error_feedback=cfg.strategy.compression.error_feedback,
            model=cfg.model, train=cfg.train,
            in_channels=shape.in_channels, num_classes=shape.num_classes, image_size=shape.image_size,
            task=shape.task, spatial_dims=shape.spatial_dims,
        )
        rows: dict[str, dict] = {}
        refusals: dict[str, Refusal] = {}

        def row(site: str) -> dict:
            return rows.setdefault(site, {"round": rnd, "site": site, "status": "ok", "bytes_to_site": 0, "bytes_from_site": 0})

        def silent(phase: str) -> Callable[[int, int, str], None]:
            def report(nid: int, sent_bytes: int, why: str) -> None:
                r = row(known.get(nid, f"node-{nid}"))
                r["bytes_to_site"] += sent_bytes
                if phase == "validation" and r["status"] == "ok" and "train_loss" in r:
                    # its update is in this round's model; only its validation figures are missing
                    r["status"] = "validation-lost"
                    progress.problem(f"round {rnd} validation: {r['site']} {why}; it trained this round (its update "
                                     "counts), its validation figures are lost")
                    return
                if phase == "validation" and r["status"].startswith(("rejected", "refused")):
                    progress.problem(f"round {rnd} validation: {r['site']} {why}")
                    return
                r["status"] = "no-reply"
                progress.problem(f"round {rnd} {phase}: {r['site']} {why}; left out")
            return report

        def impostor(phase: str) -> Callable[[int, int, int, str], None]:
            def report(nid: int, sent_bytes: int, got_bytes: int, declared: str) -> None:
                r = row(known.get(nid, f"node-{nid}"))
                r["status"] = "rejected:identity"
                r["bytes_to_site"], r["bytes_from_site"] = r["bytes_to_site"] + sent_bytes, r["bytes_from_site"] + got_bytes
                progress.problem(f"round {rnd} {phase}: the reply of {r['site']} (its registered node key) declares "
                                 f"itself as {declared}; left out (rejected:identity)")
            return report

        for nid, site in registered_names(plan.registry).items():  # a hospital enrolled since the run started
            known.setdefault(nid, site)
        present = _await_rejoin(grid, present, cfg.server.rejoin_wait_s, plan, known, rnd)
        progress.round_started(rnd, rounds, "training")
        shared = _without(arrays, local)
        random.seed(f"{cfg.seed}-{rnd}-train")  # Flower samples with `random`: the cohort follows the seed and round
        tasks = _in_round(strategy.configure_train(rnd, shared, task.to_config(), grid), rnd, known)
        asked = {m.metadata.dst_node_id for m in tasks}
        if workflow is None:
            tasks = down.outgoing(tasks) if down else tasks
            replies, sent = _exchange(grid, tasks, timeout, known, silent("training"), plan.stop, impostor("training"))
            if down:
                down.replied(tasks, replies)
            _count_traffic(replies, sent, row, known)
            trained = _checked(replies, TrainMetrics, progress, rnd, "training", refusals, known)
        else:
            trained, new_arrays, train_agg = _secure_phase(grid, plan, workflow, tasks, shared, rnd, row, refusals, known)
        for site, refusal in refusals.items():
            row(site).update(status=f"refused:{refusal.code}", epsilon=refusal.epsilon_spent)
        for reply in trained:
            m, r = _metrics(reply), row(_site_name(reply, known))
            r.update(train_loss=m["train-loss"], num_train=m["num-examples"], epsilon=m["epsilon"])
        aggregate_start = time.perf_counter()
        if workflow is None:
            trained = _decoded(trained, shared, cfg.strategy.compression, progress, rnd, row, known)
            used = _screened(trained, shared, cfg.strategy.validation, progress, rnd, row, known)
            new_arrays, train_agg = strategy.aggregate_train(rnd, used) if used else (None, None)
        else:
            used = trained
        aggregate_seconds[rnd] = round(time.perf_counter() - aggregate_start, 4)
        if rnd == rounds and cfg.server.cross_site:  # each hospital's own model, as it came back
            local_models = {_site_name(r, known): r.content["arrays"] for r in used}
        if len(used) < cfg.strategy.min_sites:
            progress.problem(f"round {rnd}: {len(used)} usable updates, fewer than strategy.min_sites="
                             f"{cfg.strategy.min_sites}; the global model is unchanged")
            new_arrays = None
        elif new_arrays is None:
            progress.problem(f"round {rnd}: the strategy returned no model; the global model is unchanged")
        else:
            arrays = _merged(arrays, new_arrays)
            if down:  # the federation's model is what the hospitals rebuild from the delta
                arrays = _merged(arrays, down.advance(_without(arrays, local)))
            trained_rounds += 1
        shared = _without(arrays, local)

        progress.round_started(rnd, rounds, "validating")
        random.seed(f"{cfg.seed}-{rnd}-evaluate")  # SecAgg+ shuffles with `random` too: it must not move this
        evals = _in_round(strategy.configure_evaluate(rnd, shared, task.to_config(), grid), rnd, known)
        evals = down.outgoing(evals) if down else evals
        replies, sent = _exchange(grid, evals, timeout, known, silent("validation"), plan.stop, impostor("validation"))
        if down:
            down.replied(evals, replies)
        _count_traffic(replies, sent, row, known)
        replies = _checked(replies, EvalMetrics, progress, rnd, "validation", {}, known)
        for reply in replies:
            m, r = _metrics(reply), row(_site_name(reply, known))
            r.update(val_loss=m["val-loss"], val_accuracy=m["val-accuracy"], val_auc=m["val-auc"], num_val=m["num-examples"],
                     ft_val_accuracy=m.get("ft-val-accuracy"), ft_val_auc=m.get("ft-val-auc"), val_dice=m.get("val-dice"),
                     ft_val_dice=m.get("ft-val-dice"))
        eval_agg = strategy.aggregate_evaluate(rnd, replies) if replies else None
        _sampling(rows, row, asked, present, known)

        site_rows = [rows[s] for s in sorted(rows)]
        idle = sum(1 for r in site_rows if r["status"] == "not-sampled")
        spent = [r["epsilon"] for r in site_rows if r.get("epsilon") is not None and not math.isnan(r["epsilon"])]
        glob = {
            "round": rnd, "site": "global", "status": f"{len(used)} trained, {len(refusals)} refused"
                                          + (f", {len(trained) - len(used)} rejected" if len(used) < len(trained) else "")
                                          + (f", {idle} not sampled" if idle else ""),
            "epsilon": max(spent) if spent else None,  # the worst-off hospital
            "train_loss": (train_agg or {}).get("train-loss"),
            "val_loss": (eval_agg or {}).get("val-loss"),
            "val_accuracy": (eval_agg or {}).get("val-accuracy"),
            "val_auc": (eval_agg or {}).get("val-auc"),
            "ft_val_accuracy": (eval_agg or {}).get("ft-val-accuracy"),
            "ft_val_auc": (eval_agg or {}).get("ft-val-auc"),
            "val_dice": (eval_agg or {}).get("val-dice"),
            "ft_val_dice": (eval_agg or {}).get("ft-val-dice"),
            "num_train": sum(r.get("num_train", 0) for r in site_rows),
            "num_val": sum(r.get("num_val", 0) for r in site_rows),
            "bytes_to_site": sum(r["bytes_to_site"] for r in site_rows),
            "bytes_from_site": sum(r["bytes_from_site"] for r in site_rows),
        }
        if plan.test is not None:
            glob.update({f"test_{k}": v for k, v in server_evaluate(cfg, shape, arrays, plan.test, plan.private).items()})
        recorder.write_rows(site_rows + [glob])
        key = score_key(shape.task)
        score = glob[key] if glob[key] is not None and not math.isnan(glob[key]) else -(glob["val_loss"] or float("inf"))
        improved = trained_rounds > 0 and score > best["score"]  # the best model is a trained one
        if improved:
            best = {"round": rnd, "score": score}
        round_seconds.append(round(time.time() - round_start, 2))
        checkpoint.save(plan.run_dir, checkpoint.Checkpoint(
            round=rnd, arrays=arrays, best=best, seconds=time.time() - started, round_seconds=round_seconds,
            random_state=checkpoint.random_state(), names=known, trained_rounds=trained_rounds), strategy, cfg)
        if trained_rounds:  # the initial model is never presented as a result
            recorder.save_model(arrays, "model.safetensors", round=rnd)
            if improved:
                recorder.save_model(arrays, "model_best.safetensors", round=rnd, selected_by=f"federated {key}")
        progress.round_finished(rnd, rounds, site_rows + [glob])

    summary = {
        "rounds": rounds,
        "best_round": best["round"],
        "seconds": round(time.time() - started, 2),
        "round_seconds": round_seconds,
        "aggregate_seconds": aggregate_seconds,  # decode, screen and aggregate, per round this process ran
        "trained_rounds": trained_rounds,
        "final": glob if rounds else {},
    }
    if resumed:
        summary["resumed_after_round"] = resumed.round
    if cfg.server.cross_site and trained_rounds and first <= rounds:
        from .cross_site import cross_site

        progress.round_started(rounds, rounds, "cross-site evaluation")
        summary["cross_site_seconds"] = time.time()
        cross_site(raw_grid, plan, arrays, local_models, known)
        summary["cross_site_seconds"] = round(time.time() - summary["cross_site_seconds"], 2)
    recorder.write_summary(summary)
    recorder.close()
    return summary
