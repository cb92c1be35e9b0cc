"""Head calibration after the last round (`strategy.calibrate_head`; the method, and what leaves a
hospital: medimaging/calibration.py). The server sends the final global model to every connected
hospital as `query.features`, checks each release (shapes, finite values, counts), adds them up,
refits the classifier head, and writes model_calibrated.safetensors beside model.safetensors,
which stays as it was. The calibrated model is then validated at the hospitals as a round's
model is, and on the server's test split where there is one; summary.json's `calibration` says
what each hospital released (its image count, or why not) and both models' figures.

A hospital that replies with an error, or with sums that fail the checks, is left out of the
refit and named. A hostile hospital can still skew the head with well-formed sums, as it can
skew a round with a well-formed update: the refit is reported beside the uncalibrated model,
never put in its place."""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

from medimaging.calibration import CalibrationError, check_sums, head_layer, personal_heads, pooled, refit_head
from protocol.messages import FEATURES_KEY, PERSONAL_HEAD_KEY, EvalMetrics, TaskSpec

from server.engine.exchange import checked, exchange, in_round, noted_in, payload_bytes, reply_metrics
from server.engine.names import site_name
from server.engine.updates import merged, server_evaluate, without
from strategies.factory import WEIGHT_KEY, weighted_mean

log = logging.getLogger("aseanfl")
FILE = "model_calibrated.safetensors"


def _ask(run, task: TaskSpec, features: int, out: dict) -> dict[int, dict[str, np.ndarray]]:
    """Every connected hospital's feature sums that pass the checks, by the node they came from
    (`features`: the head's width); out["sites"] says why not."""
    messages = [Message(RecordDict({"arrays": run.shared, "config": task.to_config()}), dst_node_id=nid,
                        message_type="query.features") for nid in run.grid.get_node_ids()]
    messages = run.frozen.outgoing(in_round(messages, task.server_round, run.known))
    sites: dict[str, str] = out["sites"]
    silent, impostor = noted_in(sites, run.known)
    replies, sent = exchange(run.grid, messages, run.plan.config.server.round_timeout_s, run.known, silent,
                             run.plan.stop, impostor)
    out["bytes_to_sites"] = sum(sent.values())
    out["bytes_from_sites"] = sum(payload_bytes(r.content) for r in replies if r.has_content())
    releases = {}
    for reply in replies:
        site = site_name(reply, run.known)
        record = None if reply.has_error() else reply.content.array_records.get(FEATURES_KEY)
        if record is None:
            sites[site] = f"error: {reply.error.reason}" if reply.has_error() else "error: no feature sums in its reply"
            continue
        got = {k: a.numpy() for k, a in record.items()}
        why = check_sums(got, run.plan.shape.num_classes, features)
        if why:
            sites[site] = f"rejected: {why}"
            continue
        sites[site] = f"released: {int(got['count'].sum())} images"
        releases[reply.metadata.src_node_id] = got
    return releases


def _validate(run, task: TaskSpec, arrays: ArrayRecord, personal: dict[int, ArrayRecord]) -> dict:
    """The calibrated model scored at the hospitals on their validation cases, as a round's is;
    each hospital in `personal` also gets its own head (and scores it: pers-val-*)."""
    shared, config = without(arrays, run.local | run.frozen.keys), task.to_config()
    evals = list(run.strategy.configure_evaluate(task.server_round, shared, config, run.grid))
    # a hospital's own head reaches it in this message only: it is asked whether or not
    # strategy.fraction_evaluate sampled it
    asked, config["server-round"] = {m.metadata.dst_node_id for m in evals}, task.server_round
    evals += [Message(RecordDict({"arrays": shared, "config": config}), dst_node_id=nid, message_type=MessageType.EVALUATE)
              for nid in personal if nid not in asked]
    evals = in_round(evals, task.server_round, run.known)
    for message in evals:  # its own head only: no hospital learns another's class means
        if message.metadata.dst_node_id in personal:  # a RecordDict of its own (the strategy's messages share one)
            message.content = RecordDict({**message.content, PERSONAL_HEAD_KEY: personal[message.metadata.dst_node_id]})
    replies, _ = exchange(run.grid, run.frozen.outgoing(evals), run.plan.config.server.round_timeout_s, run.known,
                          lambda *_: None, run.plan.stop)
    replies = checked(replies, EvalMetrics, run.progress, task.server_round, "calibration", {}, run.known)
    # per metric over the hospitals that report it: one under DP-SGD released no sums, got no head of
    # its own and reports no pers-val-* (Flower's aggregate_evaluate wants the same keys from all)
    agg = weighted_mean([r.content for r in replies], WEIGHT_KEY) if replies else None
    keys = ("val-auc", "val-accuracy") + ("pers-val-auc", "pers-val-accuracy") * bool(personal)
    sites = {site_name(r, run.known): {k.replace("-", "_"): reply_metrics(r).get(k) for k in keys} for r in replies}
    return {k.replace("-", "_"): (agg or {}).get(k) for k in keys} | {"sites": sites}


def _personal(name: str, releases: dict[int, dict[str, np.ndarray]], total) -> dict[int, ArrayRecord]:
    """strategy.personal_heads: each releasing hospital's own head, by its node."""
    heads = personal_heads(*total, list(releases.values()))
    return {nid: ArrayRecord({f"{name}.weight": Array(np.ascontiguousarray(w)), f"{name}.bias": Array(np.ascontiguousarray(b))})
            for nid, (w, b) in zip(releases, heads, strict=True)}


def calibrate(run, task: TaskSpec, summary: dict) -> None:
    """Refit the final global model's head from the hospitals' feature sums; summary["calibration"]."""
    plan, rounds, started = run.plan, task.server_round, time.time()
    out: dict = {"sites": {}}
    summary["calibration"] = out
    # Every hospital is asked, under DP-SGD or not: the server cannot know which train privately (a
    # deployed hospital's site.yaml decides; DP-compatible models only say that any may). A hospital
    # under DP-SGD refuses (client/training/app.py), is named in out["sites"], and the head is refit
    # from the others' sums; when none releases, nothing is calibrated.
    run.progress.round_started(rounds, rounds, "head calibration")
    try:
        name, head = head_layer(plan.shape.model(plan.config, plan.private))
        releases = _ask(run, task, head.in_features, out)
        if not releases:
            raise CalibrationError("no hospital released feature sums")
        total = pooled(list(releases.values()))
        weight, bias, shrinkage = refit_head(*total)
        personal = _personal(name, releases, total) if plan.config.strategy.personal_heads else {}
    except CalibrationError as exc:
        out["status"] = f"skipped: {exc}"
        plan.progress.problem(f"head calibration {out['status']} ({'; '.join(f'{k}: {v}' for k, v in out['sites'].items())})")
        return
    arrays = merged(run.arrays, ArrayRecord({f"{name}.weight": Array(np.ascontiguousarray(weight)),
                                             f"{name}.bias": Array(np.ascontiguousarray(bias))}))
    run.recorder.save_model(arrays, FILE, round=rounds, calibrated="head refit from the hospitals' feature sums")
    out.update(status="calibrated", file=FILE, shrinkage=round(shrinkage, 6), images=int(total[0].sum()),
               hospitals=len(releases), uncalibrated=summary.get("final", {}).get("val_auc"),
               calibrated=_validate(run, task, arrays, personal))
    if plan.test is not None:
        out["test"] = {"uncalibrated": summary.get("final", {}).get("test_auc"),
                       "calibrated": server_evaluate(plan.config, plan.shape, arrays, plan.test, plan.private)["auc"]}
    out["seconds"] = round(time.time() - started, 2)  # the exchange, the refit and the validation
    log.info("head calibration: %d hospitals, %d images; federated validation AUC %s (uncalibrated: %s); %s",
             len(releases), out["images"], out["calibrated"]["val_auc"], out["uncalibrated"], FILE)
