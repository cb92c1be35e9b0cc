"""Federated evaluation's input checks (server/evaluation.py): a model file that is not
safetensors, cut short, or holds another model's tensors, and a model card that does not fit the
federation's task, are each one clear error before any hospital is contacted."""

import pytest
import torch
from safetensors.torch import save_file

from medimaging.config import ModelConfig
from medimaging.yamlconfig import ConfigError
from server.config import RunConfig
from server.evaluation import ModelCard, check_against_task, check_model_file, read_card, sha256
from server.loop import TaskShape

CARD = ModelCard(model=ModelConfig(name="cnn"), in_channels=1, num_classes=2, image_size=28)


def _model_file(tmp_path, card=CARD, name="m.safetensors"):
    torch.manual_seed(0)
    model = card.build(RunConfig())
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_good_model_file_passes_and_bad_ones_are_named(tmp_path):
    good = _model_file(tmp_path)
    tensors = check_model_file(good, CARD, RunConfig())
    assert tensors and len(sha256(good)) == 64
    text = tmp_path / "notes.safetensors"
    text.write_text("this is a PDF of our method, not weights")
    with pytest.raises(ConfigError, match=r"notes.safetensors: not a readable safetensors file"):
        check_model_file(text, CARD, RunConfig())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"cut.safetensors: not a readable safetensors file, or cut short"):
        check_model_file(cut, CARD, RunConfig())
    three = _model_file(tmp_path, CARD.model_copy(update={"num_classes": 3}), "three.safetensors")
    with pytest.raises(ConfigError, match=r"three.safetensors: .* is float32\[3.*cnn with 2 classes .* has float32\[2"):
        check_model_file(three, CARD, RunConfig())
    other = _model_file(tmp_path, CARD.model_copy(update={"model": ModelConfig(name="resnet18")}), "resnet.safetensors")
    with pytest.raises(ConfigError, match=r"resnet.safetensors: its tensors are not cnn's \(missing .*not in the model"):
        check_model_file(other, CARD, RunConfig())
    with pytest.raises(ConfigError, match="not found"):
        check_model_file(tmp_path / "none.safetensors", CARD, RunConfig())


def test_a_model_card_must_fit_the_federations_task(tmp_path):
    check_against_task(CARD, TaskShape(1, 2, 28), "card.yaml")
    with pytest.raises(ConfigError, match=r"card.yaml: num_classes is 2, the federation's data has 3"):
        check_against_task(CARD, TaskShape(1, 3, 28), "card.yaml")
    with pytest.raises(ConfigError, match=r"card.yaml: task is classification, the federation's data has segmentation"):
        check_against_task(CARD, TaskShape(1, 2, 32, task="segmentation"), "card.yaml")
    bad = tmp_path / "card.yaml"
    bad.write_text("model: {name: vgg}\nin_channels: 1\nnum_classes: 2\nimage_size: 28\n")
    with pytest.raises(ConfigError, match=r"card.yaml: model.name: "):
        read_card(bad)
    bad.write_text("model: {name: cnn}\nin_channels: 1\nnum_classes: 2\n")
    with pytest.raises(ConfigError, match=r"card.yaml: image_size: Field required"):
        read_card(bad)
