"""Training on a GPU, where the machine has one (skipped, saying so, where it has none; CI has
none). Models, batches and loss on the device, DP-SGD with Opacus there too, the model's arrays
back on the CPU for the wire, and a simulation whose hospitals share one GPU."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord

from client.config import PrivacyConfig, TrainConfig
from client.training.privacy import make_plan, train_private
from medimaging.config import ModelConfig
from medimaging.models import build_model
from medimaging.synthetic import site_images
from medimaging.datasets import split_train_val, targets, to_tensor
from medimaging.training import evaluate, train_epochs
from simulations.config import load_config
from simulations.runner import simulate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def _split():
    (x, y), _ = site_images(0, 3, 200, 10)
    return split_train_val(to_tensor(x, 32), targets(y, 32), 0.2, 0)


@pytest.mark.parametrize("private", [False, True])
def test_training_and_evaluation_run_on_the_gpu_and_the_arrays_come_back_to_the_cpu(private):
    train, val = _split()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn"), 1, 2, 32, private, 2).cuda()
    if private:
        cfg = TrainConfig(local_epochs=2)
        policy = PrivacyConfig(enabled=True, target_epsilon=8.0)
        loss, steps, _ = train_private(model, train, cfg, policy, make_plan(policy, len(train), cfg, 1), seed=1)
    else:
        loss, steps = train_epochs(model, train, 2, 32, 1e-3, "adam", seed=1)
    assert steps > 0 and loss == loss and all(p.is_cuda for p in model.parameters())
    scores = evaluate(model, val, 2)
    assert 0.0 <= scores["auc"] <= 1.0
    arrays = ArrayRecord(model.state_dict())
    assert all(a.numpy().dtype.kind == "f" or a.numpy().dtype.kind == "i" for a in arrays.values())


def test_four_simulated_hospitals_share_one_gpu_and_learn(tmp_path):
    run = simulate(load_config(None, {"sites": 4, "server.rounds": 3, "engine.gpus_per_site": 0.25,
                                      "server.output_dir": str(tmp_path)}))
    final = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["site"] == "global"][-1]
    assert final["status"].startswith("4 trained") and final["test_auc"] > 0.6, final


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_bf16_mixed_precision_on_the_gpu_keeps_the_auc_plain_and_with_dp_sgd(mode):
    from medimaging.compute import resolve_precision

    device = torch.device("cuda")
    assert resolve_precision("auto", device, False) in (torch.bfloat16, torch.float16)
    train, val = _split()
    aucs = {}
    for precision in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="resnet18"), 1, 2, 32).cuda()
        train_epochs(model, train, 4, 32, 1e-3, "adam", seed=1, precision=precision)
        aucs[precision] = evaluate(model, val, 2, precision=precision)["auc"]
    assert abs(aucs[torch.bfloat16] - aucs[None]) < 0.03, aucs
    policy, cfg = PrivacyConfig(enabled=True, target_epsilon=8.0, grad_sample_mode=mode), TrainConfig(local_epochs=2)
    model = build_model(ModelConfig(name="resnet18"), 1, 2, 32, private=True).cuda()
    loss, steps, _ = train_private(model, train, cfg, policy, make_plan(policy, len(train), cfg, 1), seed=1,
                                   precision=torch.bfloat16)
    assert steps > 0 and loss == loss and all(p.dtype == torch.float32 for p in model.parameters())


def test_deterministic_mode_gives_identical_numbers_on_the_gpu():
    from medimaging.compute import set_deterministic

    train, val = _split()
    results = []
    try:
        set_deterministic(True)
        for _ in range(2):
            torch.manual_seed(0)
            model = build_model(ModelConfig(name="resnet18"), 1, 2, 32).cuda()
            train_epochs(model, train, 2, 32, 1e-3, "adam", seed=1)
            results.append(evaluate(model, val, 2))
    finally:
        set_deterministic(False)
    assert results[0] == results[1]


def test_out_of_gpu_memory_at_a_hospital_is_a_named_error(tmp_path):
    from inprocess import Collect, InProcessGrid

    from client.training.app import build_client_app
    from server.engine.rounds import run_federation
    from server.records.outputs import read_rows
    from simulations.federation import hospital
    from simulations.runner import prepare_run

    # densenet121, a batch of 512 images of 512 px in fp32: some 400 GB of activations, more than any one GPU
    cfg = load_config(None, {"sites": 1, "server.rounds": 1, "strategy.min_sites": 1, "model.name": "densenet121",
                             "data.image_size": 512, "train.batch_size": 512, "train.local_epochs": 1,
                             "engine.gpus_per_site": 1, "engine.precision": "fp32", "server.output_dir": str(tmp_path),
                             "data.synthetic.samples_per_site": 600, "data.synthetic.test_per_site": 10})
    plan = prepare_run(cfg, Collect())
    plan.node_names = {100: "nanning"}
    run_federation(InProcessGrid(build_client_app(lambda ctx, size: hospital(plan.config, 0, size, tmp_path)), 1), plan)
    assert [r["status"] for r in read_rows(plan.run_dir) if r["site"] == "nanning"] == ["error"]
    assert any("out of memory on the hospital's CUDA" in p for p in plan.progress.problems), plan.progress.problems
