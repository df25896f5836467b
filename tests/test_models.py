import json

import pytest
import torch

from sparsekit.models import (
    LeNet5,
    LeNet300100,
    ResNetSmall,
    create_model,
    lenet5,
    lenet_300_100,
    list_models,
    resnet_small,
)

NAMES = ["lenet5", "lenet_300_100", "resnet_small"]


def test_list_models():
    assert list_models() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape(name):
    model = create_model(name, num_classes=7)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_lenet_300_100_accepts_flat_input():
    model = LeNet300100()
    assert [n for n, _ in model.named_children()] == ["fc1", "fc2", "fc3"]
    assert model(torch.randn(2, 784)).shape == (2, 10)


@pytest.mark.parametrize("cls", [LeNet5, ResNetSmall])
def test_conv_models_take_in_channels(cls):
    assert cls(in_channels=3)(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def test_factories_build_their_class():
    assert type(lenet_300_100()) is LeNet300100
    assert type(lenet5()) is LeNet5
    assert type(resnet_small(width=8)) is ResNetSmall


def test_resnet_small_layout():
    model = ResNetSmall(width=8)
    assert isinstance(model.layer1[0].shortcut, torch.nn.Identity)
    assert model.layer2[0].shortcut[0].stride == (2, 2)
    assert model.layer3[1].conv2.out_channels == 32
    assert model.fc.in_features == 32


def test_unknown_name_lists_accepted_names():
    with pytest.raises(ValueError, match="unknown model 'vgg'; accepted: " + ", ".join(NAMES)):
        create_model("vgg")


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="num_classes must be an int ≥ 1, got 0"):
        LeNet5(num_classes=0)
    with pytest.raises(TypeError, match="width must be an int ≥ 1, got 2.5"):
        ResNetSmall(width=2.5)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
    model = create_model(name, num_classes=3)
    config = json.loads(json.dumps(model.sparsekit_config))
    assert config["name"] == name
    assert config["kwargs"]["num_classes"] == 3
    rebuilt = create_model(config["name"], **config["kwargs"])
    assert type(rebuilt) is type(model)
    assert rebuilt.sparsekit_config == model.sparsekit_config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_class_built_model_records_config():
    assert ResNetSmall(width=8).sparsekit_config == {
        "name": "resnet_small",
        "kwargs": {"in_channels": 1, "num_classes": 10, "width": 8},
    }
