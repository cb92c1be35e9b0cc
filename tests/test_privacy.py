"""DP-SGD accounting: the ledger's epsilon is its accountant's epsilon, each accountant agrees with
an independent implementation, auto takes the tightest; the ledger survives restarts; it refuses
to forget; real private training spends exactly what the ledger recorded."""

import json
import subprocess
import sys

import math
import warnings

import dp_accounting
import pytest
import torch
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from client.config import PrivacyConfig, TrainConfig
from client.training.accounting import RDP_ORDERS, accounted, epsilon_of
from client.training.privacy import BudgetExceeded, LedgerError, PrivacyLedger, make_plan, train_private
from medimaging.config import AugmentConfig, ModelConfig
from medimaging.datasets import Split
from medimaging.models import build_model

TRAIN = TrainConfig(local_epochs=2, batch_size=32)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_epsilon_equals_opacus_accountant(tmp_path, accountant):
    policy = PrivacyConfig(enabled=True, target_epsilon=5.0, accountant=accountant)
    plan = make_plan(policy, n_train=500, train=TRAIN, total_rounds=4)
    ledger = PrivacyLedger(tmp_path / "site.json", "site", plan)
    reference = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for k in range(1, 4):
        recorded = ledger.record("run", k, plan)
        for _ in range(plan.steps_per_round):  # what Opacus' optimizer hook does once per step
            reference.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        alphas = {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}
        assert recorded == pytest.approx(reference.get_epsilon(plan.delta, **alphas), abs=1e-6)
        assert ledger.spent() == pytest.approx(recorded, abs=1e-12)
    assert {e.accountant for e in ledger.data.entries} == {accountant}


def _exact_gaussian(noise: float, steps: int, delta: float) -> float:
    """Independent of both libraries: without subsampling, `steps` Gaussian steps compose to one
    Gaussian mechanism with mu = sqrt(steps) / noise, whose exact epsilon solves Balle & Wang's
    (2018, Thm 8) delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)."""
    mu = math.sqrt(steps) / noise
    return brentq(lambda e: norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu) - delta, 0, 100)


@pytest.mark.parametrize("noise,steps", [(2.0, 1), (4.0, 10), (8.0, 50)])
def test_accountants_agree_with_independent_implementations(noise, steps):
    delta = 1e-5
    exact = _exact_gaussian(noise, steps, delta)
    figures = {name: epsilon_of([(noise, 1.0, steps)], delta, name) for name in ("rdp", "prv", "pld")}
    assert all(f >= exact - 1e-6 for f in figures.values()), (exact, figures)  # upper bounds, never optimistic
    assert figures["prv"] == pytest.approx(exact, rel=0.02) and figures["pld"] == pytest.approx(exact, rel=0.02)
    assert figures["rdp"] < exact * 1.5  # RDP's conversion is looser, but not wildly
    # subsampled, as DP-SGD trains: Opacus' RDP equals Google's, and the two tight methods agree
    history = [(0.8, 1 / 30, 300)]
    google = RdpAccountant(orders=list(RDP_ORDERS))
    google.compose(dp_accounting.PoissonSampledDpEvent(1 / 30, dp_accounting.GaussianDpEvent(0.8)), 300)
    assert epsilon_of(history, delta, "rdp") == pytest.approx(google.get_epsilon(delta), rel=0.01)
    assert epsilon_of(history, delta, "pld") == pytest.approx(epsilon_of(history, delta, "prv"), rel=0.03)


def test_auto_takes_the_tightest_and_spends_less_noise():
    policy = PrivacyConfig(enabled=True, target_epsilon=8.0)
    assert policy.accountant == "auto"
    with warnings.catch_warnings():  # the orders reach far enough: Opacus' "largest alpha" warning never fires
        warnings.simplefilter("error")
        auto = make_plan(policy, n_train=940, train=TrainConfig(local_epochs=1, batch_size=32), total_rounds=10)
        rdp = make_plan(PrivacyConfig(enabled=True, target_epsilon=8.0, accountant="rdp"), n_train=940,
                        train=TrainConfig(local_epochs=1, batch_size=32), total_rounds=10)
        history = [(auto.noise_multiplier, auto.sample_rate, auto.steps_per_round)] * 10
        figures = {name: epsilon_of(history, auto.delta, name) for name in ("rdp", "prv", "pld")}
        epsilon, by = accounted(history, auto.delta, "auto")
    assert epsilon == min(figures.values()) and by == min(figures, key=figures.get)
    assert 7.9 <= epsilon <= 8.0 and figures["rdp"] > 8.0, figures
    assert auto.noise_multiplier < 0.97 * rdp.noise_multiplier, (auto, rdp)


def test_noise_is_calibrated_for_the_whole_planned_run():
    policy = PrivacyConfig(enabled=True, target_epsilon=3.0)
    plan = make_plan(policy, n_train=400, train=TRAIN, total_rounds=6)
    assert plan.delta == pytest.approx(1 / 4000)
    history = [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)] * 6
    assert 2.95 <= epsilon_of(history, plan.delta, "auto") <= 3.0
    assert epsilon_of(history + history[:1], plan.delta, "auto") > 3.0


def test_ledger_survives_restart_and_refuses_to_forget(tmp_path):
    plan = make_plan(PrivacyConfig(enabled=True), n_train=300, train=TRAIN, total_rounds=3)
    path = tmp_path / "ledgers" / "hanoi.json"
    first = PrivacyLedger(path, "hanoi", plan)
    spent = first.record("run-a", 1, plan)
    assert [p.name for p in path.parent.iterdir()] == ["hanoi.json"], "atomic write leaves no temp file"
    again = PrivacyLedger(path, "hanoi", plan)  # a new process reads the same file
    assert again.spent() == pytest.approx(spent) and again.spent_after(plan) > spent
    assert json.loads(path.read_text())["entries"][0]["run"] == "run-a"

    other = make_plan(PrivacyConfig(enabled=True, delta=1e-6), n_train=300, train=TRAIN, total_rounds=3)
    with pytest.raises(LedgerError, match="delta="):
        PrivacyLedger(path, "hanoi", other)
    kept_by_rdp = json.loads(path.read_text()) | {"accountant": "rdp"}  # a ledger from before auto
    path.write_text(json.dumps(kept_by_rdp))
    assert PrivacyLedger(path, "hanoi", plan).spent() == pytest.approx(spent), "auto adopts it: same history"
    with pytest.raises(LedgerError, match="accountant=rdp"):
        PrivacyLedger(path, "hanoi", make_plan(PrivacyConfig(enabled=True, accountant="prv"), n_train=300,
                                               train=TRAIN, total_rounds=3))
    path.write_text(path.read_text()[:40])  # truncated by a crash or an editor
    with pytest.raises(LedgerError, match="unreadable.*refusing to train") as err:
        PrivacyLedger(path, "hanoi", plan)
    assert str(path) not in err.value.reason and "hanoi.json" not in err.value.reason, "the wire reason names no file"


def test_charge_refuses_past_the_cap_and_records_nothing(tmp_path):
    plan = make_plan(PrivacyConfig(enabled=True, target_epsilon=2.0), n_train=300, train=TRAIN, total_rounds=2)
    ledger = PrivacyLedger(tmp_path / "s.json", "s", plan)
    first = ledger.charge("r", 1, plan, cap=2.0)
    second = ledger.charge("r", 2, plan, cap=2.0)
    assert first < second <= 2.0
    with pytest.raises(BudgetExceeded):
        ledger.charge("r", 3, plan, cap=2.0)
    assert len(PrivacyLedger(tmp_path / "s.json", "s", plan).data.entries) == 2


AUGMENTED = AugmentConfig(flip=True, rotate_deg=15, intensity=0.1, noise_std=0.05)


def _targets(kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images, targets, spatial dims): classes, 0/1 findings (BCE), or 2D/3D masks (Dice + CE)."""
    if kind.startswith("mask"):
        dims, side = (3, 16) if kind == "mask3d" else (2, 32)
        return torch.randn(n, 1, *(side,) * dims), torch.randint(0, 2, (n, *(side,) * dims)), dims
    labels = torch.randint(0, 2, (n, 2)).float() if kind == "multilabel" else torch.randint(0, 2, (n,))
    return torch.randn(n, 1, 32, 32), labels, 2


@pytest.mark.parametrize("name, mode, kind, augment", [
    ("cnn", "hooks", "class", None), ("cnn", "ghost", "class", None), ("resnet18", "hooks", "class", None),
    ("densenet121", "ghost", "class", None), ("cnn", "hooks", "multilabel", None), ("cnn", "ghost", "multilabel", None),
    ("cnn", "ghost", "class", AUGMENTED),  # per-image augmentation happens before per-sample clipping
    ("unet", "ghost", "mask2d", None), ("unet", "hooks", "mask3d", None),  # segmentation: per-image Dice + CE
])
def test_private_training_spends_what_was_planned(name, mode, kind, augment):
    torch.manual_seed(0)
    images, labels, dims = _targets(kind, 64)
    data = Split(images, labels)
    policy = PrivacyConfig(enabled=True, grad_sample_mode=mode)
    train = TrainConfig(local_epochs=1, batch_size=16, augment=augment or AugmentConfig())
    plan = make_plan(policy, len(data), train, total_rounds=2)
    model = build_model(ModelConfig(name=name), 1, 2, images.shape[-1], private=True, spatial_dims=dims)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, steps, history = train_private(model, data, train, policy, plan, seed=1)
    assert math.isfinite(loss)
    assert steps == plan.steps_per_round
    assert history == [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(model.state_dict()) == list(before), "plain state dict keys, no Opacus wrapper prefix"


def test_batchnorm_model_is_made_dp_compatible():
    model = build_model(ModelConfig(name="resnet18", norm="batch"), 1, 2, 32, private=True)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.BatchNorm2d not in kinds and torch.nn.GroupNorm in kinds


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "aseanfl", "simulate", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--epsilon", "0"], "privacy.target_epsilon: Input should be greater than 0"),
        (["--epsilon", "8", "--set", "privacy.delta=1"], "privacy.delta: Input should be less than 1"),
        (["--set", "site_privacy.hanoi.target_epsilon=-2"], "site_privacy.hanoi.target_epsilon: Input should be greater than 0"),
        (["--set", "site_privacy.paris.enabled=true"], "site_privacy.paris: not one of the sites"),
        (["--epsilon", "8", "--set", "privacy.budget_epsilon=0.01"], "privacy.budget_epsilon: 0.01 is below the cost of one round at nanning"),
    ],
)
def test_privacy_config_errors(args, expected, tmp_path):
    result = _cli(*args, "--out", str(tmp_path))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "nothing is created for a run that cannot start"
