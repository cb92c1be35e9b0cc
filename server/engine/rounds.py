"""The federated round loop: Flower strategy + Grid, run as a short loop over named stages.

It follows Flower's `Strategy.start` step for step (configure_train -> send_and_receive ->
aggregate_train -> configure_evaluate -> ... -> server-side evaluation) and adds what a
coordinator needs: per-site rows, payload byte counts, replies in a fixed order (so a seed
reproduces a run exactly), schema checks naming the site, checkpoints after every round.

A round is `ROUND_STAGES` in order, each a function of the run (what lasts across rounds) and
the round (what this round has gathered so far). Optional features are stages or variants of
one: SecAgg+ replaces `train`, downlink compression wraps what `train` and `validate` send,
cross-site evaluation runs once after the last round.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from common.packing import PackedGrid
from protocol.messages import EvalMetrics, Refusal, TaskSpec, TrainMetrics
from strategies.factory import WEIGHT_KEY, build_secure_workflow, build_strategy, client_clipping, cohort, weighted_mean

from server.engine import checkpoint
from server.engine.frozen import FrozenLayers
from server.engine.exchange import await_rejoin, checked, count_traffic, exchange, in_round, reply_metrics
from server.engine.names import SiteOrder, partition_names, registered_names, site_name
from server.engine.plan import Plan, Progress
from server.engine.secure import secure_phase
from server.engine.scaffold import Controls
from server.engine.updates import (best_key, decoded, frozen_arrays, initial_arrays, local_keys, merged, round_score,
                                   screened, server_evaluate, without)
from server.records.outputs import GLOBAL, RunRecorder


@dataclass
class Run:
    """What lasts across rounds: the model, the strategy, the names of the nodes, the best round."""

    plan: Plan
    grid: Grid  # packed, in site order
    raw_grid: Grid  # as Flower gave it (cross-site evaluation packs its own)
    strategy: object
    workflow: object | None  # SecAgg+ (strategy.secure_aggregation), else None
    down: object | None  # downlink compression (server/engine/downlink.py), else None
    recorder: RunRecorder
    arrays: ArrayRecord
    local: set[str]  # arrays that stay at the hospitals (FedBN)
    known: dict[int, str]  # node id -> hospital
    frozen: FrozenLayers  # arrays nobody trains (model.freeze, model.adapters): sent once, never in `shared`
    first: int = 1
    best: dict = field(default_factory=lambda: {"round": None, "score": float("-inf")})
    started: float = field(default_factory=time.time)
    round_seconds: list[float] = field(default_factory=list)
    trained_rounds: int = 0  # rounds whose global model took in updates
    present: set[int] = field(default_factory=set)  # nodes connected as the round before started
    aggregate_seconds: dict[int, float] = field(default_factory=dict)
    local_models: dict[str, ArrayRecord] = field(default_factory=dict)  # the final round's models, by hospital
    resumed: checkpoint.Checkpoint | None = None
    controls: Controls | None = None  # SCAFFOLD's server control variate

    @property
    def progress(self) -> Progress:
        return self.plan.progress

    @property
    def shared(self) -> ArrayRecord:
        return without(self.arrays, self.local | self.frozen.keys)


@dataclass
class Round:
    """One round's working state, filled stage by stage."""

    rnd: int
    task: TaskSpec
    known: dict[int, str]
    progress: Progress
    started: float = field(default_factory=time.time)
    rows: dict[str, dict] = field(default_factory=dict)
    refusals: dict[str, Refusal] = field(default_factory=dict)
    asked: set[int] = field(default_factory=set)  # nodes asked to train
    trained: list[Message] = field(default_factory=list)  # training replies fit to aggregate
    used: list[Message] = field(default_factory=list)  # those the strategy aggregated
    new_arrays: ArrayRecord | None = None
    train_agg: dict | None = None
    eval_agg: dict | None = None
    glob: dict = field(default_factory=dict)  # the round's federation-wide row

    def row(self, site: str) -> dict:
        return self.rows.setdefault(site, {"round": self.rnd, "site": site, "status": "ok", "bytes_to_site": 0,
                                           "bytes_from_site": 0})

    def silent(self, phase: str) -> Callable[[int, int, str], None]:
        """What `exchange` calls for a node that did not reply in time or went away."""
        def report(nid: int, sent_bytes: int, why: str) -> None:
            r = self.row(self.known.get(nid, f"node-{nid}"))
            r["bytes_to_site"] += sent_bytes
            if phase == "validation" and r["status"] == "ok" and "train_loss" in r:
                # its update is in this round's model; only its validation figures are missing
                r["status"] = "validation-lost"
                self.progress.problem(f"round {self.rnd} validation: {r['site']} {why}; it trained this round (its "
                                      "update counts), its validation figures are lost")
                return
            if phase == "validation" and r["status"].startswith(("rejected", "refused")):
                self.progress.problem(f"round {self.rnd} validation: {r['site']} {why}")
                return
            r["status"] = "no-reply"
            self.progress.problem(f"round {self.rnd} {phase}: {r['site']} {why}; left out")
        return report

    def impostor(self, phase: str) -> Callable[[int, int, int, str], None]:
        """What `exchange` calls for a reply that declares another hospital's name."""
        def report(nid: int, sent_bytes: int, got_bytes: int, declared: str) -> None:
            r = self.row(self.known.get(nid, f"node-{nid}"))
            r["status"] = "rejected:identity"
            r["bytes_to_site"], r["bytes_from_site"] = r["bytes_to_site"] + sent_bytes, r["bytes_from_site"] + got_bytes
            self.progress.problem(f"round {self.rnd} {phase}: the reply of {r['site']} (its registered node key) "
                                  f"declares itself as {declared}; left out (rejected:identity)")
        return report


def _send(run: Run, rd: Round, messages: list[Message], phase: str) -> list[Message]:
    """Send one phase's tasks (through downlink compression when on) and take in the replies."""
    messages = run.down.outgoing(messages) if run.down else messages
    timeout = run.plan.config.server.round_timeout_s
    replies, sent = exchange(run.grid, messages, timeout, run.known, rd.silent(phase), run.plan.stop,
                             rd.impostor(phase))
    if run.down:
        run.down.replied(messages, replies)
    run.frozen.replied(messages, replies)
    count_traffic(replies, sent, rd.row, run.known)
    return replies


# -- the stages of a round --------------------------------------------------------------------------

def rejoin(run: Run, rd: Round) -> None:
    """Name hospitals enrolled since the run started; wait for one that was here and is reconnecting."""
    for nid, site in registered_names(run.plan.registry).items():
        run.known.setdefault(nid, site)
    run.present = await_rejoin(run.grid, run.present, run.plan.config.server.rejoin_wait_s, run.plan, run.known, rd.rnd)
    run.progress.round_started(rd.rnd, run.plan.config.server.rounds, "training")


def _training_tasks(run: Run, rd: Round) -> list[Message]:
    random.seed(f"{run.plan.config.seed}-{rd.rnd}-train")  # Flower samples with `random`: the cohort follows seed and round
    tasks = in_round(run.strategy.configure_train(rd.rnd, run.shared, rd.task.to_config(), run.grid), rd.rnd, run.known)
    rd.asked = {m.metadata.dst_node_id for m in tasks}
    if run.controls is not None:
        run.controls.attach(tasks)
    return run.frozen.outgoing(tasks)


def _record_training(run: Run, rd: Round) -> None:
    for site, refusal in rd.refusals.items():
        rd.row(site).update(status=f"refused:{refusal.code}", epsilon=refusal.epsilon_spent)
    for reply in rd.trained:
        m, r = reply_metrics(reply), rd.row(site_name(reply, run.known))
        r.update(train_loss=m["train-loss"], num_train=m["num-examples"], epsilon=m["epsilon"])


def train(run: Run, rd: Round) -> None:
    """Each sampled hospital trains on the shared model; its update comes back in the clear."""
    replies = _send(run, rd, _training_tasks(run, rd), "training")
    if run.controls is not None:  # each hospital's delta c_i out of its reply, before any check of the model
        replies = run.controls.take(replies, run.known, rd.row, lambda text: run.progress.problem(f"round {rd.rnd}: {text}"))
    rd.trained = checked(replies, TrainMetrics, run.progress, rd.rnd, "training", rd.refusals, run.known)
    _record_training(run, rd)


def train_secure(run: Run, rd: Round) -> None:
    """`train` through SecAgg+: the server gets the sum of masked updates, never one hospital's."""
    tasks = _training_tasks(run, rd)
    rd.trained, rd.new_arrays, rd.train_agg = secure_phase(run.grid, run.plan, run.workflow, tasks,
                                                           run.shared, rd.rnd, rd.row, rd.refusals, run.known)
    run.frozen.replied(tasks, rd.trained)
    rd.used = rd.trained
    _record_training(run, rd)


def aggregate(run: Run, rd: Round) -> None:
    """Decode and screen the updates, aggregate them with the strategy, take the result in."""
    cfg, start = run.plan.config, time.perf_counter()
    if run.workflow is None:
        rd.trained = decoded(rd.trained, run.shared, cfg.strategy.compression, run.progress, rd.rnd, rd.row, run.known)
        rd.used = screened(rd.trained, run.shared, cfg.strategy.validation, run.progress, rd.rnd, rd.row, run.known)
        rd.new_arrays, rd.train_agg = run.strategy.aggregate_train(rd.rnd, rd.used) if rd.used else (None, None)
    run.aggregate_seconds[rd.rnd] = round(time.perf_counter() - start, 4)
    if rd.rnd == cfg.server.rounds and cfg.server.cross_site:  # each hospital's own model, as it came back
        run.local_models = {site_name(r, run.known): merged(run.arrays, r.content["arrays"]) if run.frozen.keys
                            else r.content["arrays"] for r in rd.used}
    if len(rd.used) < cfg.strategy.min_sites:
        run.progress.problem(f"round {rd.rnd}: {len(rd.used)} usable updates, fewer than strategy.min_sites="
                             f"{cfg.strategy.min_sites}; the global model is unchanged")
    elif rd.new_arrays is None:
        run.progress.problem(f"round {rd.rnd}: the strategy returned no model; the global model is unchanged")
    else:
        run.arrays = merged(run.arrays, rd.new_arrays)
        if run.controls is not None:
            run.controls.update(rd.used, run.known, cfg.strategy.validation,
                                lambda text: run.progress.problem(f"round {rd.rnd}: {text}"))
        if run.down:  # the federation's model is what the hospitals rebuild from the delta
            run.arrays = merged(run.arrays, run.down.advance(run.shared))
        run.trained_rounds += 1


def validate(run: Run, rd: Round) -> None:
    """Every sampled hospital scores the new model on its validation cases; rows for the rest."""
    run.progress.round_started(rd.rnd, run.plan.config.server.rounds, "validating")
    random.seed(f"{run.plan.config.seed}-{rd.rnd}-evaluate")  # SecAgg+ shuffles with `random` too: it must not move this
    evals = in_round(run.strategy.configure_evaluate(rd.rnd, run.shared, rd.task.to_config(), run.grid), rd.rnd, run.known)
    evals = run.frozen.outgoing(evals)
    replies = checked(_send(run, rd, evals, "validation"), EvalMetrics, run.progress, rd.rnd, "validation", {}, run.known)
    for reply in replies:
        m, r = reply_metrics(reply), rd.row(site_name(reply, run.known))
        r.update(val_loss=m["val-loss"], val_accuracy=m["val-accuracy"], val_auc=m["val-auc"], num_val=m["num-examples"],
                 ft_val_accuracy=m.get("ft-val-accuracy"), ft_val_auc=m.get("ft-val-auc"), val_dice=m.get("val-dice"),
                 ft_val_dice=m.get("ft-val-dice"), pers_val_accuracy=m.get("pers-val-accuracy"),
                 pers_val_auc=m.get("pers-val-auc"), pers_val_dice=m.get("pers-val-dice"))
    # per metric over the hospitals that report it, not the strategy's aggregate_evaluate: Flower's
    # refuses replies whose keys differ, and a Ditto/APFL hospital that has not trained yet (sampled
    # to validate only) has no personal model to report pers-val-* for
    rd.eval_agg = weighted_mean([r.content for r in replies], WEIGHT_KEY) if replies else None
    _sampling(run, rd)


def _sampling(run: Run, rd: Round) -> None:
    """Every connected hospital gets a row: `not-sampled` where the round asked it for nothing,
    `eval-only` where it was asked to validate but not to train (strategy.fraction_*)."""
    trained = {run.known.get(n, f"node-{n}") for n in rd.asked}
    for site, r in rd.rows.items():
        if site not in trained and r["status"] == "ok":
            r["status"] = "eval-only"
    for nid in run.present - rd.asked:
        site = run.known.get(nid, f"node-{nid}")
        if site not in rd.rows:
            rd.row(site)["status"] = "not-sampled"


def record(run: Run, rd: Round) -> None:
    """The round's rows: one per hospital and the federation's, with the server's test if any."""
    site_rows = [rd.rows[s] for s in sorted(rd.rows)]
    idle = sum(1 for r in site_rows if r["status"] == "not-sampled")
    spent = [r["epsilon"] for r in site_rows if r.get("epsilon") is not None and not math.isnan(r["epsilon"])]
    rejected = len(rd.trained) - len(rd.used)
    train_agg, eval_agg = rd.train_agg or {}, rd.eval_agg or {}
    rd.glob = {
        "round": rd.rnd, "site": GLOBAL, "status": f"{len(rd.used)} trained, {len(rd.refusals)} refused"
                                                   + (f", {rejected} rejected" if rejected > 0 else "")
                                                   + (f", {idle} not sampled" if idle else ""),
        "epsilon": max(spent) if spent else None,  # the worst-off hospital
        "train_loss": train_agg.get("train-loss"),
        **{k.replace("-", "_"): eval_agg.get(k) for k in ("val-loss", "val-accuracy", "val-auc", "ft-val-accuracy",
                                                           "ft-val-auc", "val-dice", "ft-val-dice", "pers-val-accuracy",
                                                           "pers-val-auc", "pers-val-dice")},
        "num_train": sum(r.get("num_train", 0) for r in site_rows),
        "num_val": sum(r.get("num_val", 0) for r in site_rows),
        "bytes_to_site": sum(r["bytes_to_site"] for r in site_rows),
        "bytes_from_site": sum(r["bytes_from_site"] for r in site_rows),
    }
    plan = run.plan
    if plan.test is not None:
        test = server_evaluate(plan.config, plan.shape, run.arrays, plan.test, plan.private)
        rd.glob.update({f"test_{k}": v for k, v in test.items()})
    run.recorder.write_rows(site_rows + [rd.glob])


def save(run: Run, rd: Round) -> None:
    """The checkpoint, the model and the best model so far; then the round is shown as finished."""
    glob, key = rd.glob, best_key(run.plan.config.server.select_by, run.plan.shape.task)
    score = round_score(glob, key)
    improved = run.trained_rounds > 0 and score > run.best["score"]  # the best model is a trained one
    if improved:
        run.best = {"round": rd.rnd, "score": score}
    run.round_seconds.append(round(time.time() - rd.started, 2))
    checkpoint.save(run.plan.run_dir, checkpoint.Checkpoint(
        round=rd.rnd, arrays=run.arrays, best=run.best, seconds=time.time() - run.started,
        round_seconds=run.round_seconds, random_state=checkpoint.random_state(), names=run.known,
        trained_rounds=run.trained_rounds), run.strategy, run.plan.config)
    if run.controls is not None:
        run.controls.save()
    if run.trained_rounds:  # the initial model is never presented as a result
        run.recorder.save_model(run.arrays, "model.safetensors", round=rd.rnd)
        if improved:
            run.recorder.save_model(run.arrays, "model_best.safetensors", round=rd.rnd, selected_by=f"federated {key}")
    run.progress.round_finished(rd.rnd, run.plan.config.server.rounds, [rd.rows[s] for s in sorted(rd.rows)] + [glob])


Stage = Callable[[Run, Round], None]
ROUND_STAGES: tuple[Stage, ...] = (rejoin, train, aggregate, validate, record, save)


def round_stages(run: Run) -> list[Stage]:
    """This run's round: SecAgg+ trains through its own protocol."""
    return [train_secure if (stage is train and run.workflow is not None) else stage for stage in ROUND_STAGES]


# -- the run ----------------------------------------------------------------------------------------

def _start(plan: Plan, grid: Grid) -> Run:
    """A new run's state and initial model, or a resumed run's, restored from its checkpoint
    (strategy state included) before anything in the folder changes."""
    cfg = plan.config
    random.seed(cfg.seed)  # Flower samples nodes with `random`
    strategy = build_strategy(cfg.strategy, cohort(cfg.strategy, plan.sites or cfg.strategy.min_sites))
    secagg = cfg.strategy.secure_aggregation
    workflow = build_secure_workflow(secagg, cfg.server.round_timeout_s) if secagg is not None else None
    if workflow is not None and cfg.strategy.validation.enabled:
        plan.progress.problem("update validation is off under SecAgg+: the server never sees one hospital's update")
    ckpt = checkpoint.load(plan.run_dir, cfg, strategy) if plan.resume else None
    arrays = ckpt.arrays if ckpt else initial_arrays(cfg, plan.shape, plan.private)
    local, frozen = local_keys(cfg, plan.shape, plan.private), frozen_arrays(cfg, plan.shape, plan.private)
    known = {**(ckpt.names if ckpt else {}), **plan.node_names, **partition_names(grid, plan.site_names)}
    if frozen:
        plan.progress.problem(FrozenLayers.line(arrays, frozen, cfg.model))
    down = None
    if cfg.strategy.compression.downlink != "none":
        from server.engine.downlink import Downlink

        down = Downlink(cfg.strategy.compression.downlink, cfg.strategy.compression.block, without(arrays, local | frozen))
    run = Run(plan=plan, grid=SiteOrder(PackedGrid(grid), known), raw_grid=grid, strategy=strategy, workflow=workflow,
              down=down, recorder=RunRecorder(plan.run_dir, keep_rounds=ckpt.round if ckpt else None), arrays=arrays,
              local=local, known=known, frozen=FrozenLayers(arrays, frozen))
    if cfg.strategy.name == "scaffold":
        parameters = {name for name, _ in plan.shape.model(cfg, plan.private).named_parameters()}
        run.controls = Controls(run.shared, parameters, plan.run_dir, plan.sites or len(known), resume=ckpt is not None)
    if ckpt is None:
        return run
    run.resumed, run.first, run.best, run.trained_rounds = ckpt, ckpt.round + 1, ckpt.best, ckpt.trained_rounds
    run.started, run.round_seconds = time.time() - ckpt.seconds, ckpt.round_seconds
    random.setstate(ckpt.random_state)
    run.recorder.save_model(ckpt.arrays, "model.safetensors", round=ckpt.round)
    if ckpt.best.get("round") == ckpt.round:  # the crash may have come before the best model was written
        run.recorder.save_model(ckpt.arrays, "model_best.safetensors", round=ckpt.round,
                                selected_by=f"federated {best_key(cfg.server.select_by, plan.shape.task)}")
    plan.progress.problem(f"resuming {plan.run_dir.name} at round {ckpt.round + 1}/{cfg.server.rounds}: rounds "
                          f"1-{ckpt.round} are kept from its checkpoint; an interrupted round runs again")
    return run


def _task(run: Run, rnd: int) -> TaskSpec:
    cfg, shape, s = run.plan.config, run.plan.shape, run.plan.config.strategy
    return TaskSpec(
        run=run.plan.run_dir.name, server_round=rnd, total_rounds=cfg.server.rounds, seed=cfg.seed,
        private=run.plan.private, client_clipping=client_clipping(s), fedbn=s.fedbn, personal=s.personalization,
        scaffold=s.name == "scaffold", finetune_eval=s.finetune_eval,
        codec=s.compression.codec, block=s.compression.block, topk=s.compression.topk,
        error_feedback=s.compression.error_feedback, model=cfg.model, train=cfg.train.at_round(rnd, cfg.server.rounds),
        in_channels=shape.in_channels, num_classes=shape.num_classes, image_size=shape.image_size,
        task=shape.task, spatial_dims=shape.spatial_dims, classes=run.plan.classes,
    )


def run_federation(grid: Grid, plan: Plan) -> dict:
    """Run all rounds; write rows and checkpoints into plan.run_dir; return the summary. With
    plan.resume, continue the run in plan.run_dir after its last checkpointed round."""
    run = _start(plan, grid)
    cfg, rounds = plan.config, plan.config.server.rounds
    run.recorder.track(cfg)
    if plan.test is not None and run.resumed is None:
        test = server_evaluate(cfg, plan.shape, run.arrays, plan.test, plan.private)
        run.recorder.write_rows([{"round": 0, "site": GLOBAL, **{f"test_{k}": v for k, v in test.items()}}])
    stages, rd = round_stages(run), None
    for rnd in range(run.first, rounds + 1):
        rd = Round(rnd=rnd, task=_task(run, rnd), known=run.known, progress=run.progress)
        for stage in stages:
            stage(run, rd)
    summary = {
        "rounds": rounds,
        "best_round": run.best["round"],
        "select_by": cfg.server.select_by,
        # from the command's start (a resumed run: from its first start), so start-up is counted
        "seconds": round(time.time() - min(plan.created, run.started), 2),
        "setup_seconds": None if run.resumed else round(max(run.started - plan.created, 0.0), 2),
        "data": plan.shape.data(),
        "round_seconds": run.round_seconds,
        "aggregate_seconds": run.aggregate_seconds,  # decode, screen and aggregate, per round this process ran
        "trained_rounds": run.trained_rounds,
        "final": rd.glob if rd is not None else {},
    }
    if run.resumed:
        summary["resumed_after_round"] = run.resumed.round
    if cfg.strategy.calibrate_head and run.trained_rounds and run.first <= rounds:
        from server.engine.calibration import calibrate  # after the last round, before cross-site

        calibrate(run, _task(run, rounds), summary)
    if cfg.server.cross_site and run.trained_rounds and run.first <= rounds:
        from server.engine.cross_site import after_run

        after_run(run, summary)
    run.recorder.write_summary(summary)
    run.recorder.close()
    return summary
