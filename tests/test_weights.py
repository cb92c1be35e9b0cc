"""Starting the global model from pretrained weights (`model.weights`, medimaging/weights.py):
a safetensors file and a PyTorch state dict load tensor for tensor; a torchvision-layout ResNet
file written here (RGB, BatchNorm, 1000 classes) lands on the run's grey-scale GroupNorm
resnet18 with the filters summed and, asked for, a new head; a MONAI bundle made here with
monai.bundle has its network definition checked and its weights read; every misfit is one
line naming the tensors; a simulated run starts from the file and names it (sha256) in
config.yaml and report.md; nothing is written for a bad file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from medimaging.config import ModelConfig
from medimaging.models import build_model, head_keys
from medimaging.weights import WeightsError, file_sha256, load_weights
from simulations.local_deployment import BIN


def _model(name: str = "cnn", classes: int = 2, channels: int = 1, norm: str = "group") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, norm=norm), channels, classes, 32)


def _differ(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_safetensors_and_a_state_dict_load_tensor_for_tensor(tmp_path):
    source = _model()
    for p in source.parameters():  # not the seeded start: a "trained" model
        p.data.add_(torch.randn_like(p))
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "m.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "m.pt")  # a wrapped DDP checkpoint
    for name, kind in (("m.safetensors", "safetensors"), ("m.pt", "PyTorch state dict")):
        target = _model()
        assert _differ(target.state_dict(), state)  # really another start
        loaded = load_weights(target, tmp_path / name, False, head_keys(target))
        assert loaded.format == kind and loaded.sha256 == file_sha256(tmp_path / name) and not loaded.new_head
        assert not _differ(target.state_dict(), state)


def test_a_torchvision_layout_resnet_lands_on_the_grey_groupnorm_model_with_a_new_head(tmp_path):
    """torchvision's resnet18 names (conv1, bn1, layer1.0..., fc), RGB input, BatchNorm with
    running statistics, 1000 ImageNet classes: MONAI's resnet18 uses the same names, so the file
    is written from a torchvision-shaped network and saved as torchvision saves it."""
    rgb = _model("resnet18", classes=1000, channels=3, norm="batch")
    state = {k: v for k, v in rgb.state_dict().items()}
    assert "bn1.running_mean" in state and state["conv1.weight"].shape[1] == 3 and state["fc.weight"].shape[0] == 1000
    torch.save(state, tmp_path / "resnet18-imagenet.pth")
    target = _model("resnet18")
    with pytest.raises(WeightsError) as err:
        load_weights(target, tmp_path / "resnet18-imagenet.pth", False, head_keys(target))
    said = str(err.value)
    assert "fc.weight is [1000, 512], the run's model has [2, 512]" in said and "model.new_head: true" in said
    assert len(said.splitlines()) == 1
    loaded = load_weights(target, tmp_path / "resnet18-imagenet.pth", True, head_keys(target))
    got = target.state_dict()
    assert loaded.new_head == ["fc.weight", "fc.bias"] and "re-initialised" in loaded.line()
    assert torch.allclose(got["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))  # RGB filters summed
    assert torch.equal(got["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    assert torch.equal(got["bn1.weight"], state["bn1.weight"])  # BatchNorm's affine weights onto GroupNorm's
    assert any("running statistics dropped" in n for n in loaded.notes)


def test_a_monai_bundle_is_checked_against_the_model_and_its_weights_read(tmp_path):
    from monai.bundle import ConfigParser

    bundle = tmp_path / "cxr_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    net = {"_target_": "monai.networks.nets.Classifier", "in_shape": [1, 32, 32], "classes": 2,
           "channels": [16, 32, 64], "strides": [2, 2, 2], "num_res_units": 0, "dropout": 0.1}
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": net}))
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0", "task": "chest x-ray"}))
    parser = ConfigParser({"network_def": net})
    torch.manual_seed(7)
    trained = parser.get_parsed_content("network_def")
    torch.save(trained.state_dict(), bundle / "models" / "model.pt")
    target = _model("cnn")
    loaded = load_weights(target, bundle, False, head_keys(target))
    assert loaded.format == "MONAI bundle" and loaded.sha256 == file_sha256(bundle / "models" / "model.pt")
    assert not _differ(target.state_dict(), trained.state_dict())
    other = _model("smallresnet")
    with pytest.raises(WeightsError, match="the bundle's network \\(Classifier\\) is not the run's model.name"):
        load_weights(other, bundle, False, head_keys(other))


def test_every_misfit_is_one_line_naming_the_tensors(tmp_path):
    good = _model().state_dict()
    cases = {
        "missing.safetensors": {k: v for k, v in good.items() if not k.startswith("net.layer_1")},
        "extra.safetensors": {**good, "decoder.weight": torch.zeros(3)},
        "shape.safetensors": {**good, "net.layer_0.conv.weight": torch.zeros(8, 1, 3, 3)},
    }
    expected = {"missing.safetensors": "missing net.layer_1", "extra.safetensors": "not in the model: decoder.weight",
                "shape.safetensors": "other shapes: net.layer_0.conv.weight [8, 1, 3, 3]"}
    for name, tensors in cases.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / name)
        with pytest.raises(WeightsError) as err:
            load_weights(_model(), tmp_path / name, False, set())
        assert expected[name] in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for path, said in ((tmp_path / "junk.pt", "not a safetensors file or a PyTorch state dict"),
                       (tmp_path / "absent.safetensors", "not found (nothing is downloaded")):
        with pytest.raises(WeightsError, match=said.replace("(", "\\(")):
            load_weights(_model(), path, False, set())


def _simulate(tmp_path: Path, *sets: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "aseanfl"), "simulate", "--sites", "2", "--rounds", "1", "--out", str(tmp_path / "runs"),
                           "--set", "train.local_epochs=1", *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})


def test_a_simulated_run_starts_from_the_file_and_names_it(tmp_path):
    """The run's first global model is the file's, tensor for tensor; config.yaml and report.md
    name the file and its sha256; a file for another class count is refused in one line and no
    run folder is written."""
    from simulations.config import load_config
    from simulations.federation import task_shape
    from server.engine.updates import initial_arrays

    cfg = load_config(None, {"sites": 2})
    source = _model("cnn")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "start.safetensors")
    started = initial_arrays(cfg.model_copy(update={"model": ModelConfig(weights=tmp_path / "start.safetensors")}),
                             task_shape(cfg)).to_torch_state_dict()
    assert not _differ(started, source.state_dict())
    # the run itself, in process (the same round loop and ClientApp as `aseanfl simulate`, without Ray's start)
    from client.training.app import build_client_app
    from inprocess import Collect, InProcessGrid
    from server.engine.rounds import run_federation
    from server.records.report import write_report
    from simulations.federation import hospital
    from simulations.runner import prepare_run

    run_cfg = load_config(None, {"sites": 2, "server.rounds": 1, "train.local_epochs": 1,
                                 "server.output_dir": str(tmp_path / "runs"), "model.weights": tmp_path / "start.safetensors"})
    plan = prepare_run(run_cfg, Collect())
    assert any(line.startswith(f"started from {tmp_path / 'start.safetensors'}") for line in plan.progress.problems)
    load = lambda ctx, size: hospital(plan.config, int(ctx.node_config["partition-id"]), size, plan.run_dir)  # noqa: E731
    run_federation(InProcessGrid(build_client_app(load), 2), plan)
    write_report(plan.run_dir)
    run = plan.run_dir
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert model["weights_sha256"] == file_sha256(tmp_path / "start.safetensors")
    assert f"Started from pretrained weights {tmp_path / 'start.safetensors'} (sha256 {model['weights_sha256']})" in \
        (run / "report.md").read_text()
    three = _model("cnn", classes=3)
    save_file({k: v.contiguous() for k, v in three.state_dict().items()}, tmp_path / "three.safetensors")
    bad = _simulate(tmp_path / "bad", f"model.weights={tmp_path / 'three.safetensors'}")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and not (tmp_path / "bad" / "runs").exists()
    assert "final.1.weight is [3, 1024], the run's model has [2, 1024]" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_deployments_config_check_reads_the_weights_before_anything_is_sent(tmp_path):
    """`aseanfl run` and the console's Start page validate federation.yaml with check_run_config,
    as the ServerApp does: the file is read and fitted to task: and model: there, its sha256
    pinned; a misfit is a config error naming the tensors."""
    from server.engine.deployment import check_run_config

    source = _model("cnn")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "start.safetensors")
    text = f"task:\n  image_size: 32\nmodel:\n  name: cnn\n  weights: {tmp_path / 'start.safetensors'}\n"
    cfg = check_run_config(text, [])
    assert cfg.model.weights_sha256 == file_sha256(tmp_path / "start.safetensors")
    from medimaging.yamlconfig import ConfigError

    with pytest.raises(ConfigError, match=r"final.1.weight is \[2, 1024\], the run's model has \[3, 1024\]"):
        check_run_config(text + "  new_head: false\n", ["task.num_classes=3"])
    assert check_run_config(text + "  new_head: true\n", ["task.num_classes=3"]).model.new_head
