"""`aseanfl export MODEL --bundle OUT`: a model as a MONAI bundle that the next federation starts
from; LoRA adapters merged into their layers, the network plain MONAI again; refusals in one
line, nothing half-written."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from aseanfl.cli import app
from medimaging.bundles import build_network, read_bundle
from medimaging.config import AdapterConfig, ModelConfig
from medimaging.models import build_model
from medimaging.weights import file_sha256
from server.engine.updates import initial_arrays
from simulations.config import load_config
from simulations.federation import task_shape

from conftest import medmnist_file


def _card(folder, model: ModelConfig, private: bool = False):
    card = {"model": model.model_dump(mode="json"), "task": "classification", "in_channels": 1, "num_classes": 2,
            "image_size": 28, "spatial_dims": 2, "private": private}
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    return folder / "card.yaml"


def _export(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def test_a_lora_model_exports_merged_and_the_next_federation_starts_from_it(tmp_path):
    cfg = ModelConfig(weights="start.safetensors", adapters=AdapterConfig(rank=2))
    torch.manual_seed(5)
    tuned = build_model(cfg, 1, 2, 28)
    with torch.no_grad():  # adapters that changed something (PEFT starts lora_B at zero)
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(tmp_path / "model.safetensors"))
    result = _export(tmp_path / "model.safetensors", "--bundle", tmp_path / "cxr", "--card", _card(tmp_path, cfg))
    assert result.exit_code == 0, result.output
    bundle = read_bundle(tmp_path / "cxr")
    assert (bundle.network.target, bundle.kind, bundle.side, bundle.in_channels) == ("Classifier", "classification",
                                                                                     28, 1)
    weights = load_file(str(tmp_path / "cxr" / "models" / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in weights)  # plain MONAI names
    plain = build_network(bundle.network).eval()
    plain.load_state_dict(weights)
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(plain(x), tuned.eval()(x), atol=1e-5)  # the merged network computes what LoRA did
    meta = json.loads((tmp_path / "cxr" / "configs" / "metadata.json").read_text())
    assert file_sha256(tmp_path / "model.safetensors") in meta["description"]
    nxt = load_config(None, {"bundle": str(tmp_path / "cxr"), "data.path": str(medmnist_file("pneumoniamnist"))})
    start = initial_arrays(nxt, task_shape(nxt)).to_torch_state_dict()
    assert all(torch.equal(start[k], v) for k, v in weights.items())


def test_what_cannot_be_exported_is_one_line_and_leaves_nothing(tmp_path):
    resnet = ModelConfig(name="resnet18")
    torch.manual_seed(0)
    save_file(build_model(resnet, 1, 2, 28).state_dict(), str(tmp_path / "model.safetensors"))
    result = _export(tmp_path / "model.safetensors", "--bundle", tmp_path / "out", "--card", _card(tmp_path, resnet))
    assert result.exit_code == 2 and "model.name=resnet18: aseanfl changes its residual layers" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not list(tmp_path.glob("*out*"))
    cnn = ModelConfig(name="cnn")
    result = _export(tmp_path / "model.safetensors", "--bundle", tmp_path / "out", "--card", _card(tmp_path, cnn))
    assert result.exit_code == 2 and "its tensors are not the card's model" in result.output  # a resnet file
    (tmp_path / "model.safetensors").write_text("not a model")
    result = _export(tmp_path / "model.safetensors", "--bundle", tmp_path / "out", "--card", _card(tmp_path, cnn))
    assert result.exit_code == 1 and "not a readable model file" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    save_file(build_model(cnn, 1, 2, 28).state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "taken").mkdir()
    result = _export(tmp_path / "model.safetensors", "--bundle", tmp_path / "taken", "--card", _card(tmp_path, cnn))
    assert result.exit_code == 2 and "already exists" in result.output and not list((tmp_path / "taken").iterdir())
