"""Built-in MONAI models: shapes, the asked-for normalisation everywhere, no in-place ops."""

import pytest
import torch

from medimaging.config import ModelConfig
from medimaging.models import build_model


@pytest.mark.parametrize("name", ["cnn", "resnet18", "densenet121"])
def test_forward_and_no_inplace(name):
    model = build_model(ModelConfig(name=name), in_channels=3, num_classes=4, image_size=32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert not any(getattr(m, "inplace", False) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
@pytest.mark.parametrize("norm, kind", [("group", torch.nn.GroupNorm), ("instance", torch.nn.InstanceNorm2d)])
def test_norm_applies_to_every_layer(name, norm, kind):
    model = build_model(ModelConfig(name=name, norm=norm), in_channels=1, num_classes=2, image_size=32)
    kinds = {type(m) for m in model.modules()}
    assert kind in kinds and torch.nn.BatchNorm2d not in kinds


def test_densenet_needs_32_px():
    with pytest.raises(ValueError, match="at least 32 px"):
        build_model(ModelConfig(name="densenet121"), in_channels=1, num_classes=2, image_size=28)
