"""Personalization at the hospital: FedRep's alternating passes, and Ditto's and APFL's personal
model, which lives in the node's own state and is never sent (strategy.personalization).

- FedRep (Collins et al. 2021): the hospital's own head is trained first with the received body
  frozen, then the body with the head frozen; only the body leaves.
- Ditto (Li et al. 2021): the global model is trained as under FedAvg and sent; beside it the
  hospital trains its personal model on its loss plus lambda/2 ||v - w_global||^2.
- APFL (Deng et al. 2020): the personal model v is trained for the mix alpha v + (1 - alpha) w
  with the received global w, alpha learned by the hospital; the mix is its personalized model.

Both personal passes train on the hospital's data outside DP-SGD's accounting, so they are
refused where the hospital trains with DP-SGD (app.py), as fine-tuning evaluation is.

- Personal heads (strategy.personal_heads): after the last round the server fits each
  hospital a head from the federation's feature sums (medimaging/calibration.py) and sends it
  with the calibrated model's validation; the hospital checks it, scores it and keeps it."""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from torch.func import functional_call

from medimaging.training import loader, loss_for, make_optimizer, run_epochs, train_epochs
from medimaging.augment import augmenter
from medimaging.compute import device_of
from medimaging.datasets import Split
from medimaging.models import head_keys
from protocol.messages import Personalization, TrainConfig

PERSONAL_MODEL = "personal-model"  # the node's state: Ditto's / APFL's own model, never in a message
PERSONAL_MIX = "personal-mix"  # APFL's learned alpha


def train_fedrep(model: torch.nn.Module, head: set[str], split: Split, cfg: TrainConfig, head_epochs: int, seed: int,
                 precision=None, correct=None) -> tuple[float, int]:
    """FedRep's round: the head alone for `head_epochs`, then the body alone for the task's epochs."""
    params = dict(model.named_parameters())

    def trainable(names: set[str]) -> None:
        for name, p in params.items():
            p.requires_grad_(name in names)

    try:
        trainable(head)
        _, head_steps = train_epochs(model, split, head_epochs, cfg.batch_size, cfg.lr, cfg.optimizer, seed,
                                     augment=cfg.augment, precision=precision, logit_adjustment=cfg.logit_adjustment)
        trainable(set(params) - head)
        loss, steps = train_epochs(model, split, cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.optimizer, seed + 10_007,
                                   augment=cfg.augment, precision=precision, correct=correct,
                                   logit_adjustment=cfg.logit_adjustment)
    finally:
        trainable(set(params))
    return loss, head_steps + steps


class Mixed(torch.nn.Module):
    """APFL's personalized model: the personal model's architecture with the parameters
    alpha v + (1 - alpha) w, w fixed (the global model's), v and alpha trainable. Buffers (e.g.
    BatchNorm's running statistics) are the personal model's own."""

    def __init__(self, personal: torch.nn.Module, global_model: torch.nn.Module, alpha: float) -> None:
        super().__init__()
        self.personal = personal
        self.alpha = torch.nn.Parameter(torch.tensor(float(alpha), device=device_of(personal)))
        self.fixed = {n: p.detach() for n, p in global_model.named_parameters()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        mixed = {n: a * p + (1 - a) * self.fixed[n] for n, p in self.personal.named_parameters()}
        return functional_call(self.personal, mixed, (x,))


class PersonalModel:
    """Ditto's or APFL's personal model at one hospital: read from the node's state (or started as a
    copy of the received global model), trained each round, scored at validation, written back."""

    def __init__(self, spec: Personalization, context: Context, received: torch.nn.Module) -> None:
        self.spec, self.received = spec, copy.deepcopy(received)  # the round's global model, before local training
        self.model = copy.deepcopy(received)
        if PERSONAL_MODEL in context.state.array_records:
            self.model.load_state_dict(context.state.array_records[PERSONAL_MODEL].to_torch_state_dict())
        self.alpha = spec.apfl_alpha
        if PERSONAL_MIX in context.state.config_records:
            self.alpha = float(context.state.config_records[PERSONAL_MIX]["alpha"])

    def train(self, split: Split, cfg: TrainConfig, seed: int, precision=None) -> None:
        """One round of the personal model's training: as many epochs as the global model's (Ditto:
        personalization.ditto_epochs where set)."""
        seed += 20_011  # its own batch order and augmentation, apart from the global model's
        # no logit adjustment here: the personal model is meant to fit this hospital's own class mix
        if self.spec.method == "ditto":
            anchors = [(p, a.detach()) for p, a in zip(self.model.parameters(), self.received.parameters(), strict=True)]

            @torch.no_grad()
            def pull() -> None:  # the gradient of lambda/2 ||v - w||^2, added to the loss's
                for p, a in anchors:
                    if p.grad is not None:
                        p.grad.add_(p - a, alpha=self.spec.ditto_lambda)

            epochs = self.spec.ditto_epochs or cfg.local_epochs
            train_epochs(self.model, split, epochs, cfg.batch_size, cfg.lr, cfg.optimizer, seed,
                         augment=cfg.augment, precision=precision, correct=pull)
            return
        mixed = Mixed(self.model, self.received, self.alpha)
        opt = make_optimizer(mixed, cfg.optimizer, cfg.lr)
        batches = lambda epoch: loader(split, cfg.batch_size, shuffle=True, seed=seed + epoch,  # noqa: E731
                                       device=device_of(self.model))

        @torch.no_grad()
        def clamp() -> None:
            mixed.alpha.clamp_(0.0, 1.0)

        run_epochs(mixed, opt, batches, cfg.local_epochs, loss_for(split), after_step=clamp,
                   augment=augmenter(cfg.augment, seed) if cfg.augment else None, precision=precision)
        self.alpha = float(mixed.alpha)

    def personalized(self, global_model: torch.nn.Module) -> torch.nn.Module:
        """What the hospital uses: Ditto's personal model, or APFL's mix with `global_model` written
        into a plain network (alpha v + (1 - alpha) w, the personal model's buffers)."""
        if self.spec.method == "ditto":
            return self.model
        mixed, fixed = copy.deepcopy(self.model), dict(global_model.named_parameters())
        with torch.no_grad():
            for name, p in mixed.named_parameters():
                p.copy_(self.alpha * p + (1 - self.alpha) * fixed[name])
        return mixed

    def keep(self, context: Context) -> None:
        state = OrderedDict((k, v.detach().cpu()) for k, v in self.model.state_dict().items())
        context.state[PERSONAL_MODEL] = ArrayRecord(state)
        context.state[PERSONAL_MIX] = ConfigRecord({"alpha": self.alpha})


PERSONAL_HEAD = "personal-head"  # the node's state: the head strategy.personal_heads fit for this hospital


def with_own_head(model: torch.nn.Module, record: ArrayRecord, context: Context) -> torch.nn.Module:
    """The received global model with the head the server fit for this hospital from the
    federation's feature sums (strategy.personal_heads, medimaging/calibration.py), kept in the
    node's state as its personalized model. Anything but the head's own arrays, in its shapes and
    finite, is refused: the server may replace the head, nothing else."""
    arrays = record.to_torch_state_dict()
    expected = {k: v.shape for k, v in model.state_dict().items() if k in head_keys(model)}
    got = {k: v.shape for k, v in arrays.items()}
    if not expected or got != expected or not all(torch.isfinite(v).all() for v in arrays.values()):
        raise ValueError(f"the server's personal head does not fit this model's classifier head {sorted(expected)}")
    own = copy.deepcopy(model)
    own.load_state_dict(arrays, strict=False)
    context.state[PERSONAL_HEAD] = ArrayRecord(OrderedDict((k, v.detach().cpu()) for k, v in arrays.items()))
    return own
