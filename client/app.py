"""The hospital ClientApp: local training and validation on data that never leaves the site."""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from medimaging.datasets import SiteData
from medimaging.models import build_model
from medimaging.training import evaluate, train_epochs

from .config import PrivacyConfig
from .messages import REFUSAL_KEY, EvalMetrics, Refusal, TaskSpec, TrainMetrics
from .mods import central_dp_mod, private_errors_mod
from .secure import secure_aggregation_mod
from .privacy import BudgetExceeded, LedgerError, PrivacyLedger, ledger_path, make_plan, train_private

log = logging.getLogger("aseanfl")


@dataclass
class Hospital:
    """What a ClientApp knows about its own site. Nothing here is ever sent."""

    data: SiteData
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    ledger_root: Path = Path("privacy")  # ledgers go to <ledger_root>/<run>/privacy unless policy.ledger_dir


# (node context, image side in px) -> this hospital.
HospitalLoader = Callable[[Context, int], Hospital]


def _default_loader(context: Context, image_size: int) -> Hospital:
    from simulations.federation import hospital_from_context  # simulation nodes carry a partition-id

    return hospital_from_context(context, image_size)


def _site_seed(task: TaskSpec, site: str) -> int:
    return (task.seed * 1_000_003 + task.server_round * 7919 + zlib.crc32(site.encode())) % 2**31


def _model(task: TaskSpec, msg: Message) -> torch.nn.Module:
    model = build_model(task.model, task.in_channels, task.num_classes, task.image_size, private=task.private)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def _reply(site: SiteData, records: dict) -> RecordDict:
    return RecordDict({**records, "site": ConfigRecord({"name": site.name})})


def _train(task: TaskSpec, hospital: Hospital, model: torch.nn.Module) -> dict:
    """Train (privately if the hospital's policy says so); the reply's records."""
    site, cfg, policy, seed = hospital.data, task.train, hospital.privacy, _site_seed(task, hospital.data.name)
    epsilon = math.nan
    if policy.enabled:
        plan = make_plan(policy, len(site.train), cfg, task.total_rounds)
        try:
            ledger = PrivacyLedger(ledger_path(policy, hospital.ledger_root / task.run / "privacy", site.name), site.name, plan)
            epsilon = ledger.charge(task.run, task.server_round, plan, policy.cap)  # before training: a crash still counts
        except LedgerError as exc:
            log.error("%s: %s", site.name, exc)  # the local log names the file; the reply does not
            return {REFUSAL_KEY: Refusal(code="privacy-ledger", reason=exc.reason, epsilon_budget=policy.cap).record()}
        except BudgetExceeded as exc:
            reason = (f"round {task.server_round} would raise epsilon from {exc.spent:.4f} to {exc.after:.4f}, "
                      f"above this hospital's budget {policy.cap}")
            return {REFUSAL_KEY: Refusal(code="privacy-budget", reason=reason, epsilon_spent=exc.spent,
                                         epsilon_budget=policy.cap).record()}
        loss, steps, _ = train_private(model, site.train, cfg, policy, plan, seed)
    else:
        loss, steps = train_epochs(model, site.train, cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.optimizer, seed)
    metrics = TrainMetrics(num_examples=len(site.train), train_loss=loss, steps=steps, epsilon=epsilon)
    return {"arrays": ArrayRecord(model.state_dict()), "metrics": metrics.record()}


def build_client_app(load_hospital: HospitalLoader = _default_loader) -> ClientApp:
    """A ClientApp reading its hospital's data and policy through `load_hospital`."""
    app = ClientApp(mods=[private_errors_mod, secure_aggregation_mod, central_dp_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)  # one core per simulated hospital; the engine runs them side by side
        task = TaskSpec.from_config(msg.content["config"])
        hospital = load_hospital(context, task.image_size)
        torch.manual_seed(_site_seed(task, hospital.data.name))
        records = _train(task, hospital, _model(task, msg))
        return Message(content=_reply(hospital.data, records), reply_to=msg)

    @app.evaluate()
    def validate(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        task = TaskSpec.from_config(msg.content["config"])
        site = load_hospital(context, task.image_size).data
        scores = evaluate(_model(task, msg), site.val, task.num_classes)
        metrics = EvalMetrics(
            num_examples=len(site.val), val_loss=scores["loss"], val_accuracy=scores["accuracy"], val_auc=scores["auc"]
        )
        return Message(content=_reply(site, {"metrics": metrics.record()}), reply_to=msg)

    return app


app = build_client_app()
