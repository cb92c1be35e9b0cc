"""The federated round loop: Flower strategy + Grid, plus per-site recording.

It follows Flower's `Strategy.start` step for step (configure_train -> send_and_receive ->
aggregate_train -> configure_evaluate -> ... -> server-side evaluation) and adds what a
coordinator needs: per-site rows, payload byte counts, replies in a fixed order (so a seed
reproduces a run exactly), schema checks naming the site, checkpoints after every round.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from pydantic import ValidationError

from client.messages import EvalMetrics, TaskSpec, TrainMetrics
from medimaging.datasets import Split
from medimaging.models import build_model
from medimaging.training import evaluate
from strategies.factory import build_strategy

from .config import RunConfig
from .outputs import RunRecorder

log = logging.getLogger("aseanfl")


@dataclass(frozen=True)
class TaskShape:
    in_channels: int
    num_classes: int
    image_size: int


class Progress:
    """Receives round events; the CLI shows them live, the default logs them."""

    def round_started(self, rnd: int, total: int, phase: str) -> None:
        log.info("round %d/%d: %s", rnd, total, phase)

    def round_finished(self, rnd: int, total: int, rows: list[dict]) -> None:
        for row in rows:
            log.info("round %d %-14s val_auc=%s test_auc=%s", rnd, row["site"], row.get("val_auc"), row.get("test_auc"))

    def problem(self, text: str) -> None:
        log.warning(text)

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


def payload_bytes(content: RecordDict) -> int:
    """Bytes of array data plus metric/config values in a message's content."""
    total = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for rec in list(content.metric_records.values()) + list(content.config_records.values()):
        total += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in rec.values())
    return total


def _site_name(reply: Message) -> str:
    if not reply.has_error() and "site" in reply.content.config_records:
        return str(reply.content.config_records["site"]["name"])
    return f"node-{reply.metadata.src_node_id}"


def _exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> tuple[list[Message], dict[str, int]]:
    """Send, wait, return replies sorted by site and the bytes sent to each site."""
    messages = list(messages)
    sent_to = {m.metadata.dst_node_id: payload_bytes(m.content) for m in messages}
    replies = sorted(grid.send_and_receive(messages, timeout=timeout), key=_site_name)
    sent = {_site_name(r): sent_to.get(r.metadata.src_node_id, 0) for r in replies}
    return replies, sent


def _checked(replies: list[Message], schema, progress: Progress, rnd: int, phase: str) -> list[Message]:
    """Drop error replies and replies whose metrics break the schema; say which site and why."""
    kept = []
    for reply in replies:
        progress.received(rnd, phase, reply)
        site = _site_name(reply)
        if reply.has_error():
            progress.problem(f"round {rnd} {phase}: {site} replied with an error: {reply.error.reason}")
            continue
        try:
            schema.model_validate(dict(reply.content.metric_records["metrics"]))
        except (KeyError, ValidationError) as exc:
            progress.problem(f"round {rnd} {phase}: {site} sent metrics that break the schema, ignored: {exc}")
            continue
        kept.append(reply)
    return kept


def _metrics(reply: Message) -> dict:
    return dict(reply.content.metric_records["metrics"])


def initial_arrays(cfg: RunConfig, shape: TaskShape) -> ArrayRecord:
    torch.manual_seed(cfg.seed)
    return ArrayRecord(build_model(cfg.model, shape.in_channels, shape.num_classes, shape.image_size).state_dict())


def server_evaluate(cfg: RunConfig, shape: TaskShape, arrays: ArrayRecord, test: Split) -> dict[str, float]:
    model = build_model(cfg.model, shape.in_channels, shape.num_classes, shape.image_size)
    model.load_state_dict(arrays.to_torch_state_dict())
    return evaluate(model, test, shape.num_classes)


def run_federation(grid: Grid, plan: Plan) -> dict:
    """Run all rounds; write rows and checkpoints into plan.run_dir; return the summary."""
    cfg, shape, progress = plan.config, plan.shape, plan.progress
    random.seed(cfg.seed)  # Flower samples nodes with `random`
    strategy = build_strategy(cfg.strategy)
    recorder = RunRecorder(plan.run_dir)
    arrays = initial_arrays(cfg, shape)
    rounds, timeout = cfg.server.rounds, cfg.server.round_timeout_s
    best = {"round": None, "score": float("-inf")}
    started = time.time()

    if plan.test is not None:
        test = server_evaluate(cfg, shape, arrays, plan.test)
        recorder.write_rows([{"round": 0, "site": "global", **{f"test_{k}": v for k, v in test.items()}}])

    for rnd in range(1, rounds + 1):
        task = TaskSpec(
            server_round=rnd, seed=cfg.seed, model=cfg.model, train=cfg.train,
            in_channels=shape.in_channels, num_classes=shape.num_classes, image_size=shape.image_size,
        )
        rows: dict[str, dict] = {}

        def row(site: str) -> dict:
            return rows.setdefault(site, {"round": rnd, "site": site, "bytes_to_site": 0, "bytes_from_site": 0})

        progress.round_started(rnd, rounds, "training")
        replies, sent = _exchange(grid, strategy.configure_train(rnd, arrays, task.to_config(), grid), timeout)
        replies = _checked(replies, TrainMetrics, progress, rnd, "training")
        for reply in replies:
            m, r = _metrics(reply), row(_site_name(reply))
            r.update(train_loss=m["train-loss"], num_train=m["num-examples"])
            r["bytes_to_site"] += sent[r["site"]]
            r["bytes_from_site"] += payload_bytes(reply.content)
        new_arrays, train_agg = strategy.aggregate_train(rnd, replies) if replies else (None, None)
        if new_arrays is None:
            progress.problem(f"round {rnd}: no usable training replies; the global model is unchanged")
        else:
            arrays = new_arrays

        progress.round_started(rnd, rounds, "validating")
        replies, sent = _exchange(grid, strategy.configure_evaluate(rnd, arrays, task.to_config(), grid), timeout)
        replies = _checked(replies, EvalMetrics, progress, rnd, "validation")
        for reply in replies:
            m, r = _metrics(reply), row(_site_name(reply))
            r.update(val_loss=m["val-loss"], val_accuracy=m["val-accuracy"], val_auc=m["val-auc"], num_val=m["num-examples"])
            r["bytes_to_site"] += sent[r["site"]]
            r["bytes_from_site"] += payload_bytes(reply.content)
        eval_agg = strategy.aggregate_evaluate(rnd, replies) if replies else None

        site_rows = [rows[s] for s in sorted(rows)]
        glob = {
            "round": rnd, "site": "global",
            "train_loss": (train_agg or {}).get("train-loss"),
            "val_loss": (eval_agg or {}).get("val-loss"),
            "val_accuracy": (eval_agg or {}).get("val-accuracy"),
            "val_auc": (eval_agg or {}).get("val-auc"),
            "num_train": sum(r.get("num_train", 0) for r in site_rows),
            "num_val": sum(r.get("num_val", 0) for r in site_rows),
            "bytes_to_site": sum(r["bytes_to_site"] for r in site_rows),
            "bytes_from_site": sum(r["bytes_from_site"] for r in site_rows),
        }
        if plan.test is not None:
            glob.update({f"test_{k}": v for k, v in server_evaluate(cfg, shape, arrays, plan.test).items()})
        recorder.write_rows(site_rows + [glob])
        recorder.save_model(arrays, "model.safetensors", round=rnd)
        score = glob["val_auc"] if glob["val_auc"] is not None else -(glob["val_loss"] or float("inf"))
        if score > best["score"]:
            best = {"round": rnd, "score": score}
            recorder.save_model(arrays, "model_best.safetensors", round=rnd, selected_by="federated val_auc")
        progress.round_finished(rnd, rounds, site_rows + [glob])

    summary = {
        "rounds": rounds,
        "best_round": best["round"],
        "seconds": round(time.time() - started, 2),
        "final": glob if rounds else {},
    }
    recorder.write_summary(summary)
    return summary
