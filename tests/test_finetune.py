"""Training part of a pretrained model (model.freeze, model.adapters; medimaging/finetune.py):
what trains and what stays frozen, the rules next to FedBN, personalization and SCAFFOLD, and
a federation on real pneumoniamnist whose hospitals train LoRA adapters with DP-SGD: the frozen
layers reach each hospital once, every reply carries the trainable tensors only, the frozen
layers end the run as the file gave them, and the model learns from a head that starts at
chance. A hospital that lost its copy gets the layers again."""

from __future__ import annotations

import csv
import math
import subprocess
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict
from safetensors.torch import load_file, save_file

from conftest import medmnist_file
from common.packing import unpack
from inprocess import Collect, InProcessGrid
from medimaging.config import AdapterConfig, ModelConfig
from medimaging.datasets import Split, load_npz, targets, to_tensor
from medimaging.finetune import FineTuneError, frozen_keys, share
from medimaging.models import build_model, head_keys
from medimaging.training import evaluate, train_epochs
from protocol.messages import FROZEN_KEY
from simulations.config import load_config
from simulations.local_deployment import BIN


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(weights="pretrained.safetensors", **kw)


def test_what_trains_and_what_stays_frozen():
    body = build_model(_cfg(name="smallresnet", freeze=["body"]), 1, 2, 28)
    assert {n for n, p in body.named_parameters() if p.requires_grad} == head_keys(body) == {"fc.weight", "fc.bias"}
    layers = build_model(_cfg(name="smallresnet", freeze=["conv1", "layer1"]), 1, 2, 28)
    trained = {n for n, p in layers.named_parameters() if p.requires_grad}
    assert trained and not any(n.startswith(("conv1.", "layer1.")) for n in trained)
    assert any(n.startswith("layer2.") for n in trained) and "bn1.weight" in trained
    assert frozen_keys(layers) == {n for n, p in layers.named_parameters() if not p.requires_grad}
    lora = build_model(_cfg(name="smallresnet", adapters=AdapterConfig(rank=2)), 1, 2, 28)
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trained == {n for n in lora.state_dict() if ".lora_" in n} | {"fc.weight", "fc.bias"}
    assert "layer1.0.conv1.base_layer.weight" in frozen_keys(lora) and "layer1.0.bn1.weight" in frozen_keys(lora)
    assert 0 < share(lora)[0] / share(lora)[1] < 0.03  # rank 2 on this network: under 3 % of its parameters
    # a frozen BatchNorm keeps its statistics: nothing frozen changes at a hospital
    bn = build_model(_cfg(name="smallresnet", norm="batch", freeze=["conv1", "bn1", "layer1"]), 1, 2, 28)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    split = Split(torch.randn(16, 1, 28, 28) * 3 + 1, torch.randint(0, 2, (16,)))
    train_epochs(bn, split, 1, 8, 0.01, "adam", 0)
    changed = {k for k in before if not torch.equal(before[k], bn.state_dict()[k])}
    assert changed and not changed & frozen_keys(bn) and "layer2.0.bn1.running_mean" in changed
    assert {"bn1.running_mean", "bn1.num_batches_tracked"} <= frozen_keys(bn)


def test_fine_tuning_errors_are_one_line_each():
    for kw, said in ((dict(freeze=["layer9"]), "model.freeze: layer9 is no layer of model.name=smallresnet"),
                     (dict(freeze=["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]),
                      "model.freeze: it covers every layer"),
                     (dict(adapters=AdapterConfig(targets=["nolayer"])),
                      "model.adapters.targets: nolayer name no layer of model.name=smallresnet")):
        with pytest.raises(FineTuneError) as err:
            build_model(_cfg(name="smallresnet", **kw), 1, 2, 28)
        assert str(err.value).startswith(said) and len(str(err.value).splitlines()) == 1, str(err.value)
    with pytest.raises(Exception, match="model.freeze: the frozen layers would keep their random start"):
        load_config(None, {"model.freeze": ["body"]})
    weights = {"model.weights": "w.safetensors", "model.adapters": {"rank": 2}}
    for sets, said in (({"strategy.fedbn": True}, "strategy.fedbn"),
                       ({"strategy.personalization.method": "ditto"}, "strategy.personalization.method ditto"),
                       ({"strategy.name": "scaffold", "train.optimizer": "sgd"}, "strategy.name scaffold"),
                       ({"strategy.secure_aggregation": {"num_shares": 3}}, "strategy.secure_aggregation")):
        with pytest.raises(Exception) as err:
            load_config(None, {**weights, **sets})
        assert f"model.adapters does not go with {said}" in str(err.value), str(err.value)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A cnn trained centrally for one epoch on pneumoniamnist's train split, its head then set to
    zero: the file's model scores every image alike (AUC 0.5) until a head is learned."""
    data = load_npz(str(medmnist_file("pneumoniamnist")))
    x, y = to_tensor(data["train_images"], 28), targets(data["train_labels"], 28)
    assert x.std() > 0.1 and 0.2 < y.float().mean() < 0.8, "the data are blank or of one class"
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn"), 1, 2, 28)
    train_epochs(model, Split(x, y), 1, 64, 1e-3, "adam", 0)
    with torch.no_grad():
        for key in head_keys(model):
            model.get_parameter(key).zero_()
    path = tmp_path_factory.mktemp("pretrained") / "cnn-pneumonia.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    test = Split(to_tensor(data["test_images"], 28), targets(data["test_labels"], 28))
    assert evaluate(model, test, 2)["auc"] == pytest.approx(0.5)
    return path


class Recording(InProcessGrid):
    """The in-process grid, keeping which arrays each message and reply carried (as the wire
    carries them: packed into one blob, whose header names them)."""

    def __init__(self, app, nodes, crash=None):
        super().__init__(app, nodes, crash)
        self.sent, self.got = [], []

    def push_messages(self, messages):
        messages = list(messages)
        self.sent += [(m.metadata.dst_node_id, m.metadata.message_type, set(m.content.array_records),
                       set(unpack(m.content["arrays"])) if "arrays" in m.content else set()) for m in messages]
        return super().push_messages(messages)

    def pull_messages(self, ids):
        replies = super().pull_messages(ids)
        self.got += [(r.metadata.src_node_id, r.metadata.message_type, None if r.has_error() else
                      set(unpack(r.content["arrays"])) if "arrays" in r.content else set()) for r in replies]
        return replies


def test_a_dp_federation_trains_only_the_adapters_and_sends_nothing_else(tmp_path, pretrained):
    from client.training.app import build_client_app
    from server.engine.rounds import run_federation
    from server.records.report import write_report
    from simulations.federation import hospital
    from simulations.runner import prepare_run

    cfg = load_config(None, {
        "sites": 3, "server.rounds": 3, "train.local_epochs": 2, "train.lr": 0.01, "seed": 3,
        "data.path": str(medmnist_file("pneumoniamnist")), "data.image_size": 28,
        "model.name": "cnn", "model.weights": str(pretrained), "model.adapters": {"rank": 2},
        "privacy.enabled": True, "privacy.target_epsilon": 8.0, "privacy.ledger_dir": str(tmp_path / "ledgers"),
        "server.output_dir": str(tmp_path / "runs")})
    plan = prepare_run(cfg, Collect())
    lost = []

    def lose_state(message):  # hospital 101's daemon restarted with an empty state before round 2
        if message.metadata.dst_node_id == 101 and message.content.config_records["config"]["server-round"] == 2 \
                and not lost:
            grid.contexts[101].state = RecordDict()
            lost.append(message.metadata.message_type)

    load = lambda ctx, size: hospital(plan.config, int(ctx.node_config["partition-id"]), size, plan.run_dir)  # noqa: E731
    grid = Recording(build_client_app(load), 3, crash=lose_state)
    run_federation(grid, plan)

    said = [line for line in plan.progress.problems if line.startswith("fine-tuning LoRA adapters (rank 2) and the "
                                                                        "classifier head: ")]
    assert len(said) == 1 and "the frozen layers reach each hospital once" in said[0], plan.progress.problems
    start = load_file(str(pretrained))
    model = load_file(str(plan.run_dir / "model.safetensors"))
    lora = build_model(plan.config.model, 1, 2, 28)
    frozen, trainable = frozen_keys(lora), set(lora.state_dict()) - frozen_keys(lora)
    assert set(model) == set(lora.state_dict()) and trainable == {k for k in model if ".lora_" in k} | head_keys(lora)
    # the frozen layers end the run as the file gave them (adapters rename a layer's weight to base_layer)
    assert all(torch.equal(model[k], start[k.replace(".base_layer", "")]) for k in frozen)
    assert all(model[k].abs().sum() > 0 for k in model if ".lora_B." in k)  # the adapters learned (they start at 0)
    # what travelled: the frozen layers once per hospital (again to the one that lost them), then never
    with_frozen = [(nid, kind) for nid, kind, records, _ in grid.sent if FROZEN_KEY in records]
    assert sorted(nid for nid, _ in with_frozen) == [100, 101, 101, 102], with_frozen
    assert all(arrays == trainable for _, _, _, arrays in grid.sent if arrays)
    replies = [arrays for _, kind, arrays in grid.got if kind == "train"]
    assert len(replies) == 9 and all(a is None or a == trainable for a in replies), replies
    assert replies.count(None) == 1  # 101's round-2 training: it held no copy, said so, and got them again
    rows = list(csv.DictReader((plan.run_dir / "metrics.csv").open()))
    site_rows = [r for r in rows if r["site"] != "global" and r["round"] != "0"]
    assert [r["status"] for r in site_rows if r["round"] == "2"].count("ok") == 2
    assert all(0 < float(r["epsilon"]) <= 8.0 for r in site_rows if r["status"] == "ok")
    full = sum(v.nbytes for v in model.values())
    assert all(int(r["bytes_from_site"]) < 0.2 * full for r in site_rows)  # training reply + validation reply
    final = [r for r in rows if r["site"] == "global"][-1]
    assert float(final["val_auc"]) > 0.8 and not math.isnan(float(final["test_auc"])), final
    write_report(plan.run_dir)
    assert "Trained: LoRA adapters (rank 2) and the classifier head. The frozen layers were sent to each hospital " \
           "once; only the trained tensors travelled in the rounds." in (plan.run_dir / "report.md").read_text()


def test_the_command_line_says_a_fine_tuning_misfit_in_one_line(tmp_path):
    res = subprocess.run([str(BIN / "aseanfl"), "simulate", "--sites", "2", "--rounds", "1", "--out", str(tmp_path / "runs"),
                          "--set", "model.adapters.rank=2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and not (tmp_path / "runs").exists()
    line = res.stderr.strip()
    assert line.startswith("config error: model.adapters: the frozen layers would keep their random start; set "
                           "model.weights") and len(line.splitlines()) == 1, res.stderr
    assert line in (Path(__file__).parents[1] / "docs" / "researcher.md").read_text()  # the guide shows it as printed


@pytest.mark.parametrize("clipping, codec", [("client-fixed", "none"), ("server-fixed", "int8")])
def test_clipping_and_compression_both_ways_work_on_the_trainable_tensors(tmp_path, pretrained, clipping, codec):
    """Central DP's clipping (at the hospital, or at the server) and int8 compression, up and
    down, see only the trainable tensors: each round's step of the global model (a mean of
    clipped updates) is within the clipping bound, and the frozen layers end as they started.
    (Compression with clipping at the hospital is refused on its own account.)"""
    from client.training.app import build_client_app
    from server.engine.rounds import run_federation
    from simulations.federation import hospital
    from simulations.runner import prepare_run

    bound = 0.05
    cfg = load_config(None, {
        "sites": 2, "server.rounds": 2, "train.local_epochs": 1, "seed": 5, "data.image_size": 28,
        "data.path": str(medmnist_file("pneumoniamnist")), "model.name": "cnn", "model.weights": str(pretrained),
        "model.adapters": {"rank": 2}, "strategy.central_dp.clipping": clipping,
        "strategy.central_dp.noise_multiplier": 0.0, "strategy.central_dp.clipping_norm": bound,
        "strategy.compression.codec": codec, "strategy.compression.downlink": codec,
        "server.output_dir": str(tmp_path / "runs")})
    plan = prepare_run(cfg, Collect())
    load = lambda ctx, size: hospital(plan.config, int(ctx.node_config["partition-id"]), size, plan.run_dir)  # noqa: E731
    grid = Recording(build_client_app(load), 2)
    run_federation(grid, plan)
    rows = list(csv.DictReader((plan.run_dir / "metrics.csv").open()))
    assert all(r["status"] == "ok" for r in rows if r["site"] not in ("global",) and r["round"] != "0"), rows
    lora = build_model(plan.config.model, 1, 2, 28)
    trainable = set(lora.state_dict()) - frozen_keys(lora)
    named = [{k.split(":", 1)[1] if codec != "none" else k for k in a} for _, kind, a in grid.got if kind == "train"]
    assert len(named) == 4 and all(n == trainable for n in named), named  # compressed: q:/s: per tensor, of these only
    start, model = load_file(str(pretrained)), load_file(str(plan.run_dir / "model.safetensors"))
    assert all(torch.equal(model[k], start[k.replace(".base_layer", "")]) for k in frozen_keys(lora))
    from server.engine.updates import initial_arrays
    from simulations.federation import task_shape

    first = initial_arrays(plan.config, task_shape(plan.config)).to_torch_state_dict()
    moved = torch.cat([(model[k].float() - first[k].float()).flatten() for k in sorted(trainable)])
    assert 0 < moved.norm() <= 2 * bound * 1.1  # two rounds, each a mean of updates clipped to the bound (+ int8)


def test_cross_site_evaluation_and_evaluate_score_models_with_adapters(tmp_path, pretrained):
    """After the last round each hospital's own model is its trained tensors on the run's frozen
    layers; the global and both hospitals' models are scored at every hospital. `aseanfl
    evaluate` scores the run's model file as it scores any other."""
    import json

    from conftest import simulate_here

    run_dir = simulate_here(load_config(None, {
        "sites": 2, "server.rounds": 1, "train.local_epochs": 1, "seed": 9, "data.image_size": 28,
        "data.path": str(medmnist_file("pneumoniamnist")), "model.name": "cnn", "model.weights": str(pretrained),
        "model.adapters": {"rank": 2}, "server.cross_site": True, "server.cross_site_min_cases": 20,
        "server.output_dir": str(tmp_path / "runs")}))
    cross = json.loads((run_dir / "cross_site.json").read_text())
    assert cross["rows"] == ["global", "hanoi", "nanning"] and cross["sites"] == ["hanoi", "nanning"]
    shas = {m: cross["models"][m]["model_sha256"] for m in cross["rows"]}
    assert len(set(shas.values())) == 3, shas  # three models: the global one and each hospital's own
    assert all(0.6 < cross["matrix"][m][s] <= 1 for m in cross["rows"] for s in cross["sites"]), cross["matrix"]
    # `aseanfl evaluate` reads the run's model card (config.yaml: the adapters) and scores the model file
    res = subprocess.run([str(BIN / "aseanfl"), "evaluate", "--data", str(medmnist_file("pneumoniamnist")), "--sites", "2",
                          "--set", "data.image_size=28", "--model", str(run_dir / "model.safetensors"), "--min-cases",
                          "20", "--out", str(tmp_path / "eval")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "pooled over 2 hospitals" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
