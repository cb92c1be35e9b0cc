"""DP-SGD at a hospital: noise calibration, the on-disk privacy ledger, private training.

The ledger is the hospital's memory of what it has spent: a JSON file holding every
(noise multiplier, sample rate, steps) it trained with, across rounds, runs and restarts.
Epsilon is always recomputed from that history with the policy's accountant (accounting.py;
'auto': the tightest of RDP, PRV and PLD), and each entry records which one gave its figure.
A round is written to the ledger *before* it trains, so a crash mid-round still counts against
the budget.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from opacus import PrivacyEngine
from pydantic import BaseModel, Field, ValidationError

from medimaging.compute import device_of
from medimaging.datasets import Split
from medimaging.augment import augmenter
from medimaging.training import loader, loss_for, make_optimizer, proximal_step, run_epochs

from client.config import PrivacyConfig, TrainConfig
from client.training.accounting import accounted, epsilon_of, noise_for

log = logging.getLogger("aseanfl")


@dataclass(frozen=True)
class DPPlan:
    """How one hospital trains privately in this run."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    delta: float
    accountant: str


def default_delta(n_train: int) -> float:
    return 1.0 / (10 * n_train)


def make_plan(policy: PrivacyConfig, n_train: int, train: TrainConfig, total_rounds: int) -> DPPlan:
    """Noise calibrated so that `total_rounds` rounds land at policy.target_epsilon."""
    batches = math.ceil(n_train / train.batch_size)  # Opacus' Poisson loader: sample rate 1 / len(loader)
    steps = train.local_epochs * batches
    delta = policy.delta if policy.delta is not None else default_delta(n_train)
    noise = noise_for(policy.target_epsilon, delta, 1.0 / batches, steps * total_rounds, policy.accountant)
    return DPPlan(noise, 1.0 / batches, steps, delta, policy.accountant)


class LedgerEntry(BaseModel):
    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    accountant: str | None = Field(
        None, description="which accountant gave epsilon_after (ledgers before 2026-12: the file's)")
    time: float


class LedgerFile(BaseModel):
    site: str
    accountant: str
    delta: float
    entries: list[LedgerEntry] = []


class LedgerError(Exception):
    """The ledger cannot be trusted or does not fit the policy; the hospital must not train.
    `reason` is safe to send (no local paths); str(exc) adds the file for the local log."""

    def __init__(self, reason: str, path: Path) -> None:
        super().__init__(f"{reason} ({path})")
        self.reason = reason


class BudgetExceeded(Exception):
    def __init__(self, spent: float, after: float) -> None:
        super().__init__(f"epsilon would go from {spent:.4f} to {after:.4f}")
        self.spent, self.after = spent, after


class PrivacyLedger:
    def __init__(self, path: Path, site: str, plan: DPPlan) -> None:
        self.path = path
        if path.exists():
            try:
                self.data = LedgerFile.model_validate_json(path.read_text())
            except (ValidationError, ValueError, OSError) as exc:
                raise LedgerError(f"the privacy ledger is unreadable ({exc.__class__.__name__}); "
                                  "refusing to train rather than forget past spending", path) from None
            if plan.accountant == "auto" and self.data.delta == plan.delta:
                self.data.accountant = "auto"  # the history bounds the same under any accountant; auto takes the tightest
            if (self.data.accountant, self.data.delta) != (plan.accountant, plan.delta):
                raise LedgerError(
                    f"the privacy ledger was kept with accountant={self.data.accountant} delta={self.data.delta}; "
                    f"the policy now says accountant={plan.accountant} delta={plan.delta}", path,
                )
        else:
            self.data = LedgerFile(site=site, accountant=plan.accountant, delta=plan.delta)

    def history(self) -> list[tuple[float, float, int]]:
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.data.entries]

    def spent(self) -> float:
        return epsilon_of(self.history(), self.data.delta, self.data.accountant)

    def spent_after(self, plan: DPPlan) -> float:
        return self._after(plan)[0]

    def _after(self, plan: DPPlan) -> tuple[float, str]:
        step = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        return accounted(self.history() + [step], self.data.delta, self.data.accountant)

    def charge(self, run: str, rnd: int, plan: DPPlan, cap: float) -> float:
        """Record one round of `plan` if the total stays within `cap` (BudgetExceeded if not);
        returns the new total."""
        after, by = self._after(plan)
        if after > cap:
            raise BudgetExceeded(self.spent(), after)
        return self.record(run, rnd, plan, (after, by))

    def record(self, run: str, rnd: int, plan: DPPlan, figure: tuple[float, str] | None = None) -> float:
        """Append this round's spending and write the file atomically; returns the new total
        (`figure`: that total and its accountant, when the caller has just computed them)."""
        epsilon, by = self._after(plan) if figure is None else figure
        self.data.entries.append(LedgerEntry(
            run=run, round=rnd, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
            steps=plan.steps_per_round, epsilon_after=epsilon, accountant=by, time=time.time(),
        ))
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            with os.fdopen(fd, "w") as f:
                f.write(self.data.model_dump_json(indent=1))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:  # e.g. a full disk: the ledger on disk stays as it was, and nothing trains
            self.data.entries.pop()
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            raise LedgerError(f"the privacy ledger cannot be written ({exc.strerror or exc.__class__.__name__}); "
                              "refusing to train rather than train unaccounted", self.path) from None
        return epsilon


def train_private(
    model: torch.nn.Module, split: Split, train: TrainConfig, policy: PrivacyConfig, plan: DPPlan, seed: int,
    proximal_mu: float = 0.0, precision: torch.dtype | None = None,
) -> tuple[float, int, list]:
    """DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise) in place; under bf16
    autocast where `precision` says so (Opacus' hooks and ghost clipping both take it; the
    per-sample gradients, their clipping and the noise stay in fp32 parameters' dtype).
    Returns (last-epoch loss, steps, the accountant's history of this round)."""
    with warnings.catch_warnings():
        # Known and documented: noise comes from torch's seeded RNG (reproducible runs), not a CSPRNG.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")  # only its history is read: (noise, rate, steps) under any accountant
    prox = proximal_step(model, proximal_mu, train.lr)
    opt = make_optimizer(model, train.optimizer, train.lr)
    data = loader(split, train.batch_size, shuffle=True, seed=seed, device=device_of(model))  # its generator drives Poisson sampling
    common = dict(
        module=model, optimizer=opt, data_loader=data, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=policy.max_grad_norm, poisson_sampling=True,
        noise_generator=torch.Generator(device_of(model)).manual_seed(seed + 1), grad_sample_mode=policy.grad_sample_mode,
    )
    if policy.grad_sample_mode == "ghost":
        private, opt, loss_fn, data = engine.make_private(criterion=loss_for(split), **common)
    else:
        private, opt, data = engine.make_private(**common)
        loss_fn = loss_for(split)
    try:
        with warnings.catch_warnings():  # Opacus' hooks on the first layer, whose input needs no grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss, steps = run_epochs(private, opt, lambda _epoch: data, train.local_epochs, loss_fn, prox,
                                     augmenter(train.augment, seed + 2), precision)
    finally:
        private.remove_hooks()  # leave `model` a plain module again
    return loss, steps, list(engine.accountant.history)


def ledger_path(policy: PrivacyConfig, default_dir: Path, site: str) -> Path:
    return (policy.ledger_dir or default_dir) / f"{site}.json"
