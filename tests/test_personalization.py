"""Hospitals that differ, on real simulated federations of pneumoniamnist with label skew:
personalization beyond FedPer (client/training/personal.py): FedRep keeps the head at each
hospital; Ditto's and APFL's personal models stay in each hospital's state, so the global model
the server gets is bitwise FedAvg's. And logit adjustment for label skew (train.logit_adjustment)."""

import csv

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from safetensors.torch import load_file
from typer.testing import CliRunner

from aseanfl.cli import app
from conftest import medmnist_file
from client.training.app import _personal
from client.training.site import SiteDataError
from medimaging.models import head_keys
from protocol.messages import Personalization, TaskSpec
from server.engine.updates import initial_arrays
from simulations.config import ConfigError, load_config
from simulations.federation import task_shape
from conftest import assert_own_models_kept, simulate_here as simulate  # simulate: the round loop without Ray's start


def _cfg(tmp_path, **sets):
    return load_config(None, {"sites": 3, "server.rounds": 2, "train.local_epochs": 1, "seed": 7,
                              "data.path": str(medmnist_file("pneumoniamnist")), "partition.scheme": "dirichlet",
                              "partition.alpha": 0.3, "server.output_dir": str(tmp_path), **sets})


def _rows(run_dir):
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


ONE_ROUND = {"server.rounds": 1}  # the personal model is trained and scored in round 1 already


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory):
    run_dir = simulate(_cfg(tmp_path_factory.mktemp("fedavg"), **ONE_ROUND))
    return run_dir, load_file(str(run_dir / "model.safetensors"))


@pytest.mark.parametrize("method", ["ditto", "apfl"])
def test_personal_models_stay_home_and_are_scored_beside_the_global_one(tmp_path, fedavg, method):
    """What leaves a hospital under Ditto/APFL is exactly FedAvg's update (the global model is
    bitwise the FedAvg run's, the upload is FedAvg's but for two validation numbers); each
    hospital also scores its personal model, and that model learned (it is not the global one:
    its scores differ)."""
    base_dir, base_model = fedavg
    run_dir = simulate(_cfg(tmp_path, **ONE_ROUND, **{"strategy.personalization.method": method}))
    model = load_file(str(run_dir / "model.safetensors"))
    assert model.keys() == base_model.keys()
    assert all(torch.equal(model[k], base_model[k]) for k in model), "the personal pass changed what was sent"
    rows, base = _rows(run_dir), _rows(base_dir)
    sites = [r for r in rows if r["site"] != "global" and r["round"] != "0"]
    assert len(sites) == 3 and all(r["status"] == "ok" for r in sites), sites
    base_sites = [r for r in base if r["site"] != "global" and r["round"] != "0"]
    # the same update; the validation reply carries two more numbers (pers-val-auc/-accuracy, 8 bytes each)
    assert [int(r["bytes_from_site"]) for r in sites] == [int(r["bytes_from_site"]) + 16 for r in base_sites]
    assert all(r["pers_val_accuracy"] for r in sites), "each hospital scored its own model"
    assert all(bool(r["pers_val_auc"]) == bool(r["val_auc"]) for r in sites), "AUC where its validation has both classes"
    assert not any(r["pers_val_auc"] for r in base), "FedAvg reports no personal scores"
    assert not (base_dir / "personal").exists(), "a plain global model is no hospital's own"
    final = [r for r in rows if r["site"] == "global"][-1]
    assert float(final["pers_val_auc"]) > 0.9, final  # well above chance (0.5) after one round
    assert any(r["pers_val_accuracy"] != r["val_accuracy"] for r in sites), "the personal model is its own"
    assert float(final["test_auc"]) > 0.85, final  # the global model is tested as under FedAvg
    assert "pers_val_auc" in (run_dir / "report.md").read_text()
    assert_own_models_kept(run_dir, {r["site"]: r for r in sites}, method)
    # a hospital makes its own model a MONAI bundle with its card, as the docs show
    mine = run_dir / "personal" / sites[0]["site"]
    result = CliRunner().invoke(app, ["export", str(mine / "model.safetensors"), "--card", str(mine / "card.yaml"),
                                      "--bundle", str(tmp_path / "mine")])
    assert result.exit_code == 0, result.output
    kept, bundled = load_file(str(mine / "model.safetensors")), load_file(str(tmp_path / "mine/models/model.safetensors"))
    assert kept.keys() == bundled.keys() and all(torch.equal(kept[k], bundled[k]) for k in kept)



def test_a_round_with_hospitals_that_have_no_personal_model_yet(tmp_path):
    """Ditto with one hospital of three sampled to train: all three validate, and only the one that
    trained has a personal model to score. The round goes on (it stopped with Flower's
    "All MetricRecords must have the same keys"): the federation's pers_val_* are the trained
    hospital's own, the others report none."""
    run_dir = simulate(_cfg(tmp_path, **ONE_ROUND, **{"strategy.personalization.method": "ditto",
                                                       "strategy.fraction_train": 0.34, "strategy.min_sites": 1}))
    rows = [r for r in _rows(run_dir) if r["round"] == "1"]
    sites = {r["site"]: r for r in rows if r["site"] != "global"}
    trained = [s for s, r in sites.items() if r["status"] == "ok"]
    assert len(sites) == 3 and len(trained) == 1, rows
    assert sorted(r["status"] for r in sites.values()) == ["eval-only", "eval-only", "ok"], rows
    assert all(r["val_accuracy"] for r in sites.values()), "every hospital validated the global model"
    assert [bool(r["pers_val_accuracy"]) for r in sites.values()] == [s in trained for s in sites], rows
    assert_own_models_kept(run_dir, {trained[0]: sites[trained[0]]}, "ditto")  # and no global model as another's own
    final = [r for r in rows if r["site"] == "global"][0]
    assert float(final["pers_val_accuracy"]) == pytest.approx(float(sites[trained[0]]["pers_val_accuracy"]))
    accuracies = [float(r["val_accuracy"]) for r in sites.values()]
    assert min(accuracies) <= float(final["val_accuracy"]) <= max(accuracies), "the global model: all three"


def test_fedrep_keeps_the_head_at_each_hospital(tmp_path):
    """FedRep: the head never leaves (the server's head never moves; replies are the body only)
    and the hospitals' heads on the shared body validate well."""
    cfg = _cfg(tmp_path, **{"strategy.personalization.method": "fedrep", "strategy.personalization.head_epochs": 2})
    run_dir = simulate(cfg)
    before, after = initial_arrays(cfg, task_shape(cfg)), load_file(str(run_dir / "model.safetensors"))
    head = head_keys(task_shape(cfg).model(cfg))
    assert head and all(np.array_equal(after[k].numpy(), before[k].numpy()) for k in head), "the head never came back"
    assert any(not np.array_equal(after[k].numpy(), before[k].numpy()) for k in after if k not in head), "the body trained"
    rows = _rows(run_dir)
    final = [r for r in rows if r["site"] == "global"][-1]
    assert float(final["val_auc"]) > 0.9, final
    assert not any(r["test_auc"] for r in rows), "no server-side test of a model without a trained head"
    last = {r["site"]: r for r in rows if r["round"] == final["round"] and r["site"] != "global"}
    assert_own_models_kept(run_dir, last, "fedrep", "val_accuracy")  # the shared body with its own head


def test_fedrep_trains_the_head_alone_first_then_the_body_alone(monkeypatch):
    """Each of FedRep's passes trains only its part (what requires a gradient during the pass), for
    its own number of epochs, and every parameter is trainable again afterwards."""
    import client.training.personal as personal
    from medimaging.datasets import Split
    from protocol.messages import TrainConfig

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    head = {"3.weight", "3.bias"}
    passes, real = [], personal.train_epochs

    def recording(model, split, epochs, *args, **kwargs):
        passes.append(({n for n, p in model.named_parameters() if p.requires_grad}, epochs))
        return real(model, split, epochs, *args, **kwargs)

    monkeypatch.setattr(personal, "train_epochs", recording)
    split = Split(torch.randn(20, 1, 4, 4), torch.tensor([0, 1] * 10))
    _, steps = personal.train_fedrep(model, head, split, TrainConfig(local_epochs=2, batch_size=10), 3, seed=0)
    assert passes == [(head, 3), ({"1.weight", "1.bias"}, 2)], passes
    assert steps == (3 + 2) * 2 and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("ditto_epochs, expected", [(None, 2), (3, 3)])
def test_dittos_personal_model_trains_its_own_epochs(monkeypatch, ditto_epochs, expected):
    """personalization.ditto_epochs sets the personal model's epochs a round (default: the global
    model's)."""
    import client.training.personal as personal
    from medimaging.datasets import Split
    from protocol.messages import TrainConfig

    torch.manual_seed(0)
    received = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    epochs, real = [], personal.train_epochs

    def recording(model, split, n, *args, **kwargs):
        epochs.append(n)
        return real(model, split, n, *args, **kwargs)

    monkeypatch.setattr(personal, "train_epochs", recording)
    split = Split(torch.randn(20, 1, 4, 4), torch.tensor([0, 1] * 10))
    spec = Personalization(method="ditto", ditto_lambda=1.0, ditto_epochs=ditto_epochs)
    own = personal.PersonalModel(spec, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
                                 received)
    own.train(split, TrainConfig(local_epochs=2, batch_size=10, optimizer="sgd", lr=0.1), seed=0)
    assert epochs == [expected]
    moved = sum((p - q).abs().sum() for p, q in zip(own.model.parameters(), received.parameters()))
    assert moved > 0  # it trained


def test_apfl_mix_is_the_personal_model_at_one_and_the_global_at_zero():
    from client.training.personal import Mixed

    torch.manual_seed(0)
    personal, global_model = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    assert torch.allclose(Mixed(personal, global_model, 1.0)(x), personal(x))
    assert torch.allclose(Mixed(personal, global_model, 0.0)(x), global_model(x))
    half = Mixed(personal, global_model, 0.5)
    half(x).sum().backward()
    assert half.alpha.grad is not None and personal.weight.grad is not None and global_model.weight.grad is None


class _DPHospital:
    class privacy:
        enabled = True


@pytest.mark.parametrize("method", ["fedrep", "ditto", "apfl"])
def test_a_dp_sgd_hospital_refuses_personal_passes_outside_its_ledger(method):
    """Deployed, the server does not know a hospital's privacy policy: the hospital itself refuses."""
    task = TaskSpec.model_validate({"run": "r", "server_round": 1, "total_rounds": 2, "seed": 0, "model": {},
                                    "train": {}, "in_channels": 1, "num_classes": 2, "image_size": 28,
                                    "personal": Personalization(method=method)})
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(SiteDataError, match=f"personalization {method} is not available at a hospital that trains "
                                            "with DP-SGD"):
        _personal(task, _DPHospital, context, torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "sets, expected",
    [({"strategy.personalization.method": "ditto", "privacy.enabled": True},
      "personalization.method ditto: not available with DP-SGD"),
     ({"strategy.personalization.method": "apfl", "strategy.name": "scaffold", "train.optimizer": "sgd"},
      "scaffold with personalization.method apfl"),
     ({"strategy.personalization.method": "fedrep", "server.cross_site": True},
      "server.cross_site does not go with strategy.personalization.method fedrep"),
     ({"strategy.fedper": True, "strategy.personalization.method": "ditto"}, "fedper: true and personalization.method"),
     ({"train.logit_adjustment": 1.0, "privacy.enabled": True}, "train.logit_adjustment: for classification without DP"),
     ({"train.logit_adjustment": 1.0, "data.synthetic.task": "segmentation", "model.name": "unet"},
      "train.logit_adjustment: for classification")],
)
def test_personalization_config_errors(tmp_path, sets, expected):
    with pytest.raises(ConfigError, match=expected):
        simulate(load_config(None, {"server.output_dir": str(tmp_path), **sets}))
    assert not any(tmp_path.iterdir())


def test_logit_adjustment_offsets_by_the_local_prior_and_spares_an_absent_class():
    """A hospital with 90 images of class 0, 10 of class 1 and none of class 2: the loss is
    cross-entropy on logits + log(add-one prior); at a single-class hospital the absent class's
    logit is pushed down far less than under plain cross-entropy."""
    from medimaging.datasets import Split
    from medimaging.training import LogitAdjustedLoss, loss_for

    split = Split(torch.zeros(100, 1, 4, 4), torch.tensor([0] * 90 + [1] * 10))
    loss = loss_for(split, 1.0)
    assert isinstance(loss, LogitAdjustedLoss)
    logits, target = torch.randn(8, 3), torch.tensor([0, 1, 0, 0, 1, 0, 0, 1])
    prior = torch.tensor([91.0, 11.0, 1.0]) / 103  # class 2 is beyond the largest label here: counted as absent
    expected = torch.nn.functional.cross_entropy(logits + torch.log(prior), target)
    assert torch.allclose(loss(logits, target), expected), (loss(logits, target), expected)
    one_class = Split(torch.zeros(50, 1, 4, 4), torch.zeros(50, dtype=torch.long))
    logits = torch.zeros(50, 2, requires_grad=True)
    torch.nn.functional.cross_entropy(logits, one_class.y).backward()
    plain = logits.grad[:, 1].mean().item()
    logits.grad = None
    loss_for(one_class, 1.0)(logits, one_class.y).backward()
    adjusted = logits.grad[:, 1].mean().item()
    assert 0 < adjusted < plain / 10, (adjusted, plain)  # measured 0.019 against 0.5
    with pytest.raises(ValueError, match="single-label"):
        loss_for(Split(torch.zeros(4, 1, 4, 4), torch.zeros(4, 2)), 1.0)


def test_fedper_true_is_shorthand_for_the_method_as_a_bool_field_reads_it():
    from strategies.config import StrategyConfig

    assert StrategyConfig.model_validate({"fedper": "yes"}).personalization.method == "fedper"
    assert StrategyConfig.model_validate({"fedper": False}).personalization.method == "none"
    assert StrategyConfig.model_validate({"fedper": True}).fedper
    assert not StrategyConfig.model_validate({"personalization": {"method": "ditto"}}).fedper
    with pytest.raises(ValueError, match="valid boolean"):
        StrategyConfig.model_validate({"fedper": "maybe"})


def test_the_server_sends_each_rounds_scheduled_learning_rate(tmp_path, monkeypatch):
    """train.lr_schedule: step is MedMNIST v2's (x0.1 from half the rounds, x0.01 from three
    quarters); the server sends each round's lr and the hospitals train with it; cosine's values,
    and constant (or round 0, a validation task) leaves the lr as it is."""
    import client.training.app as app
    from protocol.messages import TrainConfig

    seen, real = [], app.train_epochs

    def recording(model, split, epochs, batch_size, lr, *args, **kwargs):
        seen.append(lr)
        return real(model, split, epochs, batch_size, lr, *args, **kwargs)

    monkeypatch.setattr(app, "train_epochs", recording)
    run_dir = simulate(_cfg(tmp_path, **{"server.rounds": 4, "sites": 2, "train.lr": 0.002,
                                         "train.lr_schedule": "step"}))
    assert seen == pytest.approx([0.002] * 4 + [0.0002] * 2 + [0.00002] * 2), seen  # 2 hospitals a round
    assert "lr_schedule: step" in (run_dir / "config.yaml").read_text()
    cosine = TrainConfig(lr=0.01, lr_schedule="cosine")
    assert [cosine.at_round(r, 4).lr for r in (1, 3, 4)] == pytest.approx([0.01, 0.005, 0.01 * (1 - 2 ** -0.5) / 2])
    assert cosine.at_round(0, 4) is cosine and TrainConfig(lr=0.01).at_round(3, 4).lr == 0.01


def test_fine_tuning_evaluation_does_not_depend_on_what_the_worker_ran_before():
    """strategy.finetune_eval: the tuned copy's dropout is seeded by the task and site, so a
    simulated hospital's figure does not depend on which task its Ray worker ran before."""
    from types import SimpleNamespace

    from client.training.app import _finetuned
    from medimaging.datasets import Split
    from medimaging.training import evaluate
    from protocol.messages import TrainConfig

    torch.manual_seed(0)
    data = SimpleNamespace(name="hanoi", train=Split(torch.randn(40, 1, 4, 4), torch.tensor([0, 1] * 20)),
                           val=Split(torch.randn(20, 1, 4, 4), torch.tensor([0, 1] * 10)))
    hospital = SimpleNamespace(data=data, privacy=SimpleNamespace(enabled=False), precision=None)
    task = SimpleNamespace(train=TrainConfig(local_epochs=1, batch_size=8, lr=0.05), seed=1, server_round=3, num_classes=2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2))
    scores = []
    for state in (1, 2):  # two different histories of the worker's random generator
        torch.manual_seed(state)
        scores.append(_finetuned(task, hospital, model))
    assert scores[0]["loss"] == scores[1]["loss"] and scores[0]["auc"] == scores[1]["auc"]
    plain = evaluate(model, data.val, 2)
    assert plain["loss"] != scores[0]["loss"], "the copy did not train: the test proves nothing"


@pytest.mark.parametrize("run", ["..", ".", ".hidden"])
def test_a_run_name_from_the_server_cannot_leave_the_hospitals_state_folder(run):
    """The hospital writes its own model under state/<run>/: a task naming its run ".." (or any
    name starting with a dot) is refused as malformed before anything is written."""
    from pydantic import ValidationError
    from protocol.messages import TrainConfig
    from medimaging.config import ModelConfig

    fields = dict(server_round=1, total_rounds=1, seed=0, model=ModelConfig(name="cnn"), train=TrainConfig(),
                  in_channels=1, num_classes=2, image_size=28)
    assert TaskSpec(run="run-12", **fields).run == "run-12"
    with pytest.raises(ValidationError, match="run"):
        TaskSpec(run=run, **fields)

