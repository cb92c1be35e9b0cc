"""The hospital ClientApp: local training and validation on data that never leaves the site."""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from common.i18n import _
from medimaging.compute import precision_name, set_deterministic
from medimaging.datasets import SiteData
from medimaging.models import build_model, head_keys, norm_keys
from medimaging.training import evaluate, train_epochs

from client.training.hospital import Hospital, HospitalLoader
from protocol.messages import (CLASSES_KEY, CONTROL_KEY, FEATURES_KEY, PERSONAL_HEAD_KEY, REFUSAL_KEY, STATISTICS_KEY,
                               DescribeSpec, EvalMetrics, EvaluationSpec, Refusal, TaskSpec, TrainMetrics)
from client.training.mods import (DownlinkError, central_dp_mod, compression_mod, downlink_mod, frozen_layers,
                                  frozen_mod, packing_mod, private_errors_mod)
from client.training.secure import secure_aggregation_mod
from client.training.site import SiteDataError, load_site_hospital
from client.training.privacy import BudgetExceeded, LedgerError, PrivacyLedger, ledger_path, make_plan, train_private

log = logging.getLogger("aseanfl")
LOCAL_ARRAYS = "local-arrays"  # FedBN norms, FedPer head: a record in the node's own state, never in a message
PROXIMAL_KEY = "proximal-mu"


def _load(load_hospital: HospitalLoader, context: Context, task: TaskSpec) -> Hospital:
    hospital = load_hospital(context, task.image_size)
    data = hospital.data.train
    kind = "segmentation" if data.segmentation else "classification"
    dims = data.x.ndim - 2
    if (kind, dims) != (task.task, task.spatial_dims):
        raise SiteDataError(f"this hospital's data are for {dims}D {kind}, the run is {task.spatial_dims}D {task.task}")
    if hospital.num_classes is not None and hospital.num_classes != task.num_classes:
        raise SiteDataError(f"this hospital's data has {hospital.num_classes} classes, the run's model "
                            f"{task.num_classes}")
    if task.classes is not None and hospital.classes is not None and hospital.classes != task.classes:
        raise SiteDataError(f"this hospital's classes are {', '.join(hospital.classes)} (in label order), the "
                            f"federation's {', '.join(task.classes)}; map its names in site.yaml `classes:` "
                            "(its name: the federation's)")
    return hospital


def _site_seed(task: TaskSpec, site: str) -> int:
    return (task.seed * 1_000_003 + task.server_round * 7919 + zlib.crc32(site.encode())) % 2**31


def _local(task: TaskSpec, model: torch.nn.Module) -> set[str]:
    """The arrays this hospital keeps: normalisation layers (FedBN), the classifier head (FedPer)."""
    return (norm_keys(model) if task.fedbn else set()) | (head_keys(model) if task.personal.keeps_head else set())


def _model(task: TaskSpec, msg: Message, context: Context) -> torch.nn.Module:
    """The server's model; under FedBN/FedPer with this hospital's own normalisation layers/head
    (kept in the node's state between rounds; freshly initialised in its first round)."""
    model = build_model(task.model, task.in_channels, task.num_classes, task.image_size, task.private, task.spatial_dims)
    arrays = msg.content["arrays"].to_torch_state_dict()
    if task.model.fine_tunes_part:  # the frozen layers, as frozen_mod checked and kept them
        base = frozen_layers(context, task.run)
        if base is None:
            raise DownlinkError("this hospital holds no copy of the run's frozen layers; the server sends them with "
                                "its next task")
        arrays = {**{k: torch.from_numpy(v.copy()) for k, v in base.items()}, **arrays}
    local = _local(task, model)
    if not local:
        model.load_state_dict(arrays)
        return model
    if LOCAL_ARRAYS in context.state.array_records:
        arrays.update(context.state.array_records[LOCAL_ARRAYS].to_torch_state_dict())
    missing, extra = set(model.state_dict()) - set(arrays), set(arrays) - set(model.state_dict())
    if extra or missing - local:
        raise ValueError(f"{'FedBN' if task.fedbn else task.personal.method}: the server's arrays do not fit this "
                         f"model (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
    model.load_state_dict(arrays, strict=False)
    return model


def _outgoing(task: TaskSpec, model: torch.nn.Module, context: Context) -> ArrayRecord:
    """What leaves: the whole model, or under FedBN/FedPer all but the arrays that stay; never
    the frozen layers (model.freeze, model.adapters: every hospital holds them unchanged)."""
    state = model.state_dict()
    if task.model.fine_tunes_part:
        from medimaging.finetune import frozen_keys

        frozen = frozen_keys(model)
        state = OrderedDict((k, v) for k, v in state.items() if k not in frozen)
    local = _local(task, model)
    if not local:
        return ArrayRecord(state)
    context.state[LOCAL_ARRAYS] = ArrayRecord(OrderedDict((k, v) for k, v in state.items() if k in local))
    return ArrayRecord(OrderedDict((k, v) for k, v in state.items() if k not in local))


def _reply(site: SiteData, records: dict) -> RecordDict:
    return RecordDict({**records, "site": ConfigRecord({"name": site.name})})


def _train(task: TaskSpec, hospital: Hospital, model: torch.nn.Module, mu: float, correct=None) -> dict:
    """Train (privately if the hospital's policy says so); the reply's records."""
    site, cfg, policy, seed = hospital.data, task.train, hospital.privacy, _site_seed(task, hospital.data.name)
    epsilon = math.nan
    if cfg.logit_adjustment > 0 and (site.train.multilabel or site.train.segmentation):
        raise SiteDataError("train.logit_adjustment is for single-label classification; this hospital's labels are "
                            + ("masks" if site.train.segmentation else "findings (multi-label)"))
    if policy.enabled and cfg.logit_adjustment > 0:  # the prior is a count of the private labels
        raise SiteDataError("train.logit_adjustment is not available at a hospital that trains with DP-SGD: its class "
                            "prior would be computed from the private labels outside the privacy ledger")
    if policy.enabled:
        plan = make_plan(policy, len(site.train), cfg, task.total_rounds)
        try:
            ledger = PrivacyLedger(ledger_path(policy, hospital.ledger_root / task.run / "privacy", site.name), site.name, plan)
            epsilon = ledger.charge(task.run, task.server_round, plan, policy.cap)  # before training: a crash still counts
        except LedgerError as exc:
            log.error("%s: %s", site.name, exc)  # the local log names the file; the reply does not
            return {REFUSAL_KEY: Refusal(code="privacy-ledger", reason=exc.reason, epsilon_budget=policy.cap).record()}
        except BudgetExceeded as exc:
            log.warning(_("{site}: refused round {round} of run {run}: it would raise epsilon from {spent} to {after}, "
                          "above this hospital's privacy budget {budget}", site=site.name, round=task.server_round,
                          run=task.run, spent=f"{exc.spent:.4f}", after=f"{exc.after:.4f}", budget=policy.cap))
            reason = (f"round {task.server_round} would raise epsilon from {exc.spent:.4f} to {exc.after:.4f}, "
                      f"above this hospital's budget {policy.cap}")
            return {REFUSAL_KEY: Refusal(code="privacy-budget", reason=reason, epsilon_spent=exc.spent,
                                         epsilon_budget=policy.cap).record()}
        loss, steps, _spent = train_private(model, site.train, cfg, policy, plan, seed, proximal_mu=mu,
                                       precision=hospital.precision)
    elif task.personal.method == "fedrep":
        from client.training.personal import train_fedrep

        loss, steps = train_fedrep(model, head_keys(model), site.train, cfg, task.personal.head_epochs, seed,
                                   hospital.precision, correct)
    else:
        loss, steps = train_epochs(model, site.train, cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.optimizer, seed, mu,
                                   cfg.augment, hospital.precision, correct, cfg.logit_adjustment)
    metrics = TrainMetrics(num_examples=len(site.train), train_loss=loss, steps=steps, epsilon=epsilon)
    return {"metrics": metrics.record()}


class OutOfDeviceMemory(SiteDataError):
    """The task did not fit the hospital's GPU memory; said to the server (names no file or value)."""


def _hardware(hospital: Hospital) -> None:
    torch.set_num_threads(hospital.threads)
    set_deterministic(hospital.deterministic)


@contextmanager
def _device_memory(task: TaskSpec, hospital: Hospital):
    """An out-of-memory on the hospital's GPU becomes a named error for this site (the round goes
    on with the others), and the memory is given back for the next task."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise  # the CPU allocator's out-of-memory is a RuntimeError; other RuntimeErrors are not this
        log.error("%s: %s", hospital.data.name, " ".join(str(exc).split())[:300])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        local = ("set compute.precision: bf16 or share the GPU with fewer tasks" if hospital.device.type == "cuda"
                 else "give the daemon more memory")
        raise OutOfDeviceMemory(
            f"out of memory on the hospital's {hospital.device.type.upper()} ({task.model.name}, {task.image_size} px, "
            f"train.batch_size {task.train.batch_size if hasattr(task, 'train') else 64}, {precision_name(hospital.precision)}); the coordinator can lower train.batch_size, "
            f"the hospital can {local}") from None


def _finetuned(task: TaskSpec, hospital: Hospital, model: torch.nn.Module) -> dict[str, float]:
    """Validation scores of the global model after one local epoch (the copy is discarded)."""
    if hospital.privacy.enabled:  # it would train on private data outside the ledger
        raise ValueError("finetune_eval is not available for a hospital that trains with DP-SGD")
    tuned, cfg, seed = copy.deepcopy(model), task.train, _site_seed(task, hospital.data.name)
    torch.manual_seed(seed)  # dropout: not whatever task this worker ran before
    train_epochs(tuned, hospital.data.train, 1, cfg.batch_size, cfg.lr, cfg.optimizer, seed,
                 augment=cfg.augment, precision=hospital.precision)
    return evaluate(tuned, hospital.data.val, task.num_classes, precision=hospital.precision)


def _control(task: TaskSpec, hospital: Hospital, msg: Message, context: Context, model: torch.nn.Module):
    """SCAFFOLD's local control (client/training/scaffold.py), or None."""
    if not task.scaffold:
        return None
    if hospital.privacy.enabled:  # Opacus writes the noised gradient at its step: a correction would not survive it
        raise SiteDataError("SCAFFOLD is not available at a hospital that trains with DP-SGD")
    from client.training.scaffold import LocalControl

    return LocalControl(msg, context, model)


def _personal(task: TaskSpec, hospital: Hospital, context: Context, model: torch.nn.Module, trained: bool = False):
    """Ditto's / APFL's personal model (client/training/personal.py), or None. In validation
    (`trained`) only once the hospital has trained it."""
    from client.training.personal import PERSONAL_MODEL, PersonalModel

    method = task.personal.method
    if task.personal.extra_passes and hospital.privacy.enabled:  # passes outside the privacy plan
        raise SiteDataError(f"personalization {method} is not available at a hospital that trains with DP-SGD: its "
                            "extra local passes would train on private data outside the privacy ledger")
    if not task.personal.keeps_model or (trained and PERSONAL_MODEL not in context.state.array_records):
        return None
    return PersonalModel(task.personal, context, model)


def _own_head(msg: Message, context: Context, model: torch.nn.Module) -> torch.nn.Module | None:
    """The global model with this hospital's own head, where the server sent one (strategy.personal_heads)."""
    from client.training.personal import with_own_head

    record = msg.content.array_records.get(PERSONAL_HEAD_KEY)
    if record is None:
        return None
    try:
        return with_own_head(model, record, context)
    except ValueError as exc:
        raise SiteDataError(str(exc)) from None


def _own_layers(task: TaskSpec) -> str | None:
    """What makes the validated model this hospital's own: its head (FedPer, FedRep), its
    normalisation layers (FedBN), or nothing (a plain global model)."""
    return task.personal.method if task.personal.keeps_head else "fedbn" if task.fedbn else None


def _keep_own(task: TaskSpec, hospital: Hospital, model: torch.nn.Module, scores: dict, kind: str | None) -> None:
    """This hospital's own model, where it has one, on its own disk (client/training/own_model.py)."""
    from client.training.own_model import keep_own_model

    if kind is None:
        return
    try:
        folder = keep_own_model(hospital.ledger_root, task, hospital.data.name, model, kind, scores)
        log.info("%s: its own model (%s) of round %d kept in %s", hospital.data.name, kind, task.server_round, folder)
    except OSError as exc:  # the federation's validation goes on; the hospital's own copy is what failed
        log.warning("%s: its own model could not be written (%s); the last one written stays", hospital.data.name, exc)


def build_client_app(load_hospital: HospitalLoader, extra_mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp reading its hospital's data and policy through `load_hospital` (a deployed
    hospital: its site.yaml; a simulation hands its own). `extra_mods` run just inside the error
    guard and the wire packing, before SecAgg+ and clipping (e.g. a site's own audit)."""
    app = ClientApp(mods=[private_errors_mod, packing_mod, downlink_mod, frozen_mod, compression_mod, *extra_mods,
                          secure_aggregation_mod, central_dp_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        task = TaskSpec.from_config(msg.content["config"])
        hospital = _load(load_hospital, context, task)
        _hardware(hospital)
        torch.manual_seed(_site_seed(task, hospital.data.name))
        model = _model(task, msg, context).to(hospital.device)  # the reply's arrays go back to the CPU (Flower's Array)
        mu = float(msg.content["config"].get(PROXIMAL_KEY, 0.0))  # Flower's FedProx sends it
        control = _control(task, hospital, msg, context, model)
        personal = _personal(task, hospital, context, model)
        with _device_memory(task, hospital):
            records = _train(task, hospital, model, mu, control.correct if control else None)
            if personal is not None and REFUSAL_KEY not in records:
                personal.train(hospital.data.train, task.train, _site_seed(task, hospital.data.name), hospital.precision)
                personal.keep(context)
        if REFUSAL_KEY not in records:
            records = {"arrays": _outgoing(task, model, context), **records}
            if control is not None:
                records[CONTROL_KEY] = control.finish(context, int(records["metrics"]["steps"]), task.train.lr)
        return Message(content=_reply(hospital.data, records), reply_to=msg)

    @app.evaluate()
    def validate(msg: Message, context: Context) -> Message:
        task = TaskSpec.from_config(msg.content["config"])
        hospital = _load(load_hospital, context, task)
        _hardware(hospital)
        site, model = hospital.data, _model(task, msg, context).to(hospital.device)
        personal, own_head = _personal(task, hospital, context, model, trained=True), _own_head(msg, context, model)
        mine = personal.personalized(model) if personal else own_head  # its personalized model, if any
        with _device_memory(task, hospital):
            scores = evaluate(model, site.val, task.num_classes, precision=hospital.precision)
            tuned = _finetuned(task, hospital, model) if task.finetune_eval else {}
            own = evaluate(mine, site.val, task.num_classes, precision=hospital.precision) if mine is not None else {}
        if mine is not None:
            _keep_own(task, hospital, mine, own, task.personal.method if personal else "personal-head")
        else:  # FedPer's, FedRep's or FedBN's model is the hospital's own; a plain global one is not
            _keep_own(task, hospital, model, scores, _own_layers(task))
        metrics = EvalMetrics(
            num_examples=len(site.val), val_loss=scores["loss"], val_accuracy=scores["accuracy"], val_auc=scores["auc"],
            ft_val_accuracy=tuned.get("accuracy"), ft_val_auc=tuned.get("auc"),
            val_dice=scores.get("dice"), ft_val_dice=tuned.get("dice"), pers_val_accuracy=own.get("accuracy"),
            pers_val_auc=own.get("auc"), pers_val_dice=own.get("dice"),
        )
        return Message(content=_reply(site, {"metrics": metrics.record()}), reply_to=msg)

    @app.evaluate("contest")
    def contest(msg: Message, context: Context) -> Message:
        """Score a submitted model on this hospital's held-out cases; only aggregate figures leave."""
        from client.training.contest import SCORES_KEY, score_model, scores_record

        spec = EvaluationSpec.from_config(msg.content["config"])
        hospital = _load(load_hospital, context, spec)  # the same checks: task, dimensions, classes
        _hardware(hospital)
        with _device_memory(spec, hospital):
            scores = score_model(spec, msg.content, hospital)
        log.info("%s: scored model %s for evaluation %s on %d %s cases", hospital.data.name, spec.model_sha256[:12],
                 spec.evaluation, scores.cases, scores.split)
        return Message(content=_reply(hospital.data, {SCORES_KEY: scores_record(scores, spec)}), reply_to=msg)

    @app.query("classes")
    def classes(msg: Message, context: Context) -> Message:
        """This hospital's class names in label order (before a run: hospitals must agree)."""
        from client.training.describe import class_names

        spec = DescribeSpec.from_config(msg.content["config"])
        hospital = load_hospital(context, spec.image_size)
        _hardware(hospital)  # its compute.threads, as for training (the first task decodes its images)
        return Message(content=_reply(hospital.data, {CLASSES_KEY: class_names(hospital)}), reply_to=msg)

    @app.query("features")
    def features(msg: Message, context: Context) -> Message:
        """Head calibration (strategy.calibrate_head; medimaging/calibration.py): with the final
        global model, sums of this hospital's training features over classes it holds at least
        its `min_cases` images of. Never a per-image value; not where DP-SGD guards the data."""
        from medimaging.calibration import CalibrationError, feature_sums

        task = TaskSpec.from_config(msg.content["config"])
        hospital = _load(load_hospital, context, task)
        if hospital.privacy.enabled:  # the sums would leave outside the privacy ledger
            raise SiteDataError("head calibration is not available at a hospital that trains with DP-SGD: its feature "
                                "sums would leave outside the privacy ledger")
        _hardware(hospital)
        model = _model(task, msg, context).to(hospital.device)
        with _device_memory(task, hospital):
            try:
                sums = feature_sums(model, hospital.data.train, task.num_classes, hospital.min_cases)
            except CalibrationError as exc:
                raise SiteDataError(str(exc)) from None
        log.info("%s: released feature sums for head calibration of run %s (%d images, floor %d per class)",
                 hospital.data.name, task.run, int(sums["count"].sum()), hospital.min_cases)
        return Message(content=_reply(hospital.data, {FEATURES_KEY: ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in sums.items()})}), reply_to=msg)

    @app.query("stats")
    def stats(msg: Message, context: Context) -> Message:
        """This hospital's statistics (`aseanfl stats -f`): counts of a fixed schema only."""
        from client.training.describe import statistics

        spec = DescribeSpec.from_config(msg.content["config"])
        hospital = load_hospital(context, spec.image_size)
        _hardware(hospital)
        released = statistics(hospital, spec)
        log.info("%s: released statistics for request %s (floor %d%s)", hospital.data.name, spec.request,
                 released.min_count, "" if released.noise_scale is None else f", Laplace scale {released.noise_scale:g}")
        record = ConfigRecord({"json": released.model_dump_json()})
        return Message(content=_reply(hospital.data, {STATISTICS_KEY: record}), reply_to=msg)

    return app


app = build_client_app(load_site_hospital)  # a deployed hospital (its SuperNode names its site.yaml)
