"""Sending tasks and taking in replies: the bytes both ways, who went silent, replies that break
the schema or speak for another hospital, each reported with the site's name."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from pydantic import ValidationError

from protocol.messages import REFUSAL_KEY, Refusal, TrainMetrics

from server.engine.names import impostor, learn_names, site_name, unregistered
from server.engine.plan import Plan, Progress, RunAborted

log = logging.getLogger("aseanfl")


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


# Flower's own replies for a hospital that went away (no heartbeat): not an answer from the site.
GONE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def _gone(reply: Message) -> bool:
    return reply.has_error() and reply.error.code in GONE


def send_and_receive(grid: Grid, messages: list[Message], timeout: float, stop: threading.Event,
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


def exchange(grid: Grid, messages: Iterable[Message], timeout: float, known: dict[int, str],
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
    got = send_and_receive(grid, messages, timeout, stop, arrived)
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
    replies.sort(key=lambda r: site_name(r, known))
    sent = {site_name(r, known): sent_to.get(r.metadata.src_node_id, 0) for r in replies}
    for r in filter(_gone, got):
        nid = r.metadata.src_node_id
        silent(nid, sent_to.get(nid, 0), f"went offline {arrived.get(nid, 0):.0f} s after the task was sent "
                                         f"(its SuperNode stopped sending heartbeats; Flower: {r.error.reason})")
    for nid in sorted(set(sent_to) - {r.metadata.src_node_id for r in got}):
        silent(nid, sent_to[nid], f"did not reply within {timeout:g} s")
    return replies, sent


def ask_every_site(grid: Grid, known: dict[int, str], content: Callable[[], RecordDict], message_type: str,
                   group_id: str, timeout: float) -> tuple[list[Message], dict[str, str]]:
    """One request to every connected hospital, outside the rounds (an evaluation, a question
    about its data): (the replies, in site order; site -> why it has none: silent, or its reply
    declared another hospital's name)."""
    from common.packing import PackedGrid

    from server.engine.names import SiteOrder

    grid = SiteOrder(PackedGrid(grid), known)
    messages = [Message(content(), dst_node_id=nid, message_type=message_type) for nid in grid.get_node_ids()]
    for m in messages:
        m.metadata.group_id = group_id
    missing: dict[str, str] = {}
    silent, rejected = noted_in(missing, known)
    replies, _sent = exchange(grid, messages, timeout, known, silent, threading.Event(), rejected)
    return replies, missing


def noted_in(missing: dict[str, str], known: dict[int, str]) -> tuple[Callable, Callable]:
    """`exchange`'s (silent, rejected) callbacks for a request outside the rounds: each writes
    why a hospital has no reply into `missing`, by the name the server knows its node by."""
    def silent(nid: int, _sent: int, why: str) -> None:
        missing[known.get(nid, f"node-{nid}")] = f"no-reply: {why}"

    def rejected(nid: int, _sent: int, _got: int, declared: str) -> None:
        missing[known.get(nid, f"node-{nid}")] = f"rejected: identity: its reply declares itself as {declared}"

    return silent, rejected


def await_rejoin(grid: Grid, before: set[int], wait: float, plan: "Plan", names: dict[int, str], rnd: int) -> set[int]:
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


def in_round(messages: Iterable[Message], rnd: int, names: dict[int, str] | None = None) -> list[Message]:
    """Flower's group_id = the round; replies inherit it (hospitals' audit logs record it). With
    `names`, in site order (Flower's sample is a shuffled cohort): sent the same way every run."""
    messages = list(messages)
    if names is not None:
        messages.sort(key=lambda m: (m.metadata.dst_node_id not in names, names.get(m.metadata.dst_node_id, ""),
                                     m.metadata.dst_node_id))
    for m in messages:
        m.metadata.group_id = str(rnd)
    return messages


def checked(
    replies: list[Message], schema, progress: Progress, rnd: int, phase: str, refusals: dict[str, Refusal],
    names: dict[int, str], arrays: bool = True,
) -> list[Message]:
    """Keep replies fit to aggregate. Error replies, refusals and metrics that break the schema
    are left out, each reported with the site's name and the reason. `arrays`: a training
    reply must carry the model (under SecAgg+ it carries none in the clear)."""
    kept = []
    for reply in replies:
        progress.received(rnd, phase, reply)
        site = site_name(reply, names)
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


def count_traffic(replies: list[Message], sent: dict[str, int], row: Callable[[str], dict],
                   names: dict[int, str]) -> None:
    """Bytes both ways for every reply, used or not; a failed reply marks its site's row."""
    for reply in replies:
        r = row(site_name(reply, names))
        r["bytes_to_site"] += sent[r["site"]]
        if reply.has_error():
            r["status"] = "error"
        else:
            r["bytes_from_site"] += payload_bytes(reply.content)


def reply_metrics(reply: Message) -> dict:
    return dict(reply.content.metric_records["metrics"])
