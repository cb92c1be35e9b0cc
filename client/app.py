"""The hospital ClientApp: local training and validation on data that never leaves the site."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from medimaging.datasets import SiteData
from medimaging.models import build_model
from medimaging.training import evaluate, train_epochs

from .messages import EvalMetrics, TaskSpec, TrainMetrics

# (node context, image side in px) -> this hospital's data.
SiteLoader = Callable[[Context, int], SiteData]


def _default_loader(context: Context, image_size: int) -> SiteData:
    from simulations.federation import site_from_context  # simulation nodes carry a partition-id

    return site_from_context(context, image_size)


def _site_seed(task: TaskSpec, site: str) -> int:
    return (task.seed * 1_000_003 + task.server_round * 7919 + zlib.crc32(site.encode())) % 2**31


def _model(task: TaskSpec, msg: Message) -> torch.nn.Module:
    model = build_model(task.model, task.in_channels, task.num_classes, task.image_size)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def build_client_app(load_site: SiteLoader = _default_loader) -> ClientApp:
    """A ClientApp reading its hospital's data through `load_site`."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)  # one core per simulated hospital; the engine runs them side by side
        task = TaskSpec.from_config(msg.content["config"])
        site = load_site(context, task.image_size)
        torch.manual_seed(_site_seed(task, site.name))
        model = _model(task, msg)
        cfg = task.train
        loss, steps = train_epochs(
            model, site.train, cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.optimizer, _site_seed(task, site.name)
        )
        metrics = TrainMetrics(num_examples=len(site.train), train_loss=loss, steps=steps)
        return Message(content=_reply(site, metrics.record(), ArrayRecord(model.state_dict())), reply_to=msg)

    @app.evaluate()
    def validate(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        task = TaskSpec.from_config(msg.content["config"])
        site = load_site(context, task.image_size)
        scores = evaluate(_model(task, msg), site.val, task.num_classes)
        metrics = EvalMetrics(
            num_examples=len(site.val), val_loss=scores["loss"], val_accuracy=scores["accuracy"], val_auc=scores["auc"]
        )
        return Message(content=_reply(site, metrics.record()), reply_to=msg)

    return app


def _reply(site: SiteData, metrics, arrays: ArrayRecord | None = None) -> RecordDict:
    content = {"metrics": metrics, "site": ConfigRecord({"name": site.name})}
    if arrays is not None:
        content["arrays"] = arrays
    return RecordDict(content)


app = build_client_app()
