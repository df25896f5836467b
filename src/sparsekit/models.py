"""Reference networks for the sparsification experiments, built by name.

Every model accepts ``(N, C, 28, 28)`` images and carries ``model.sparsekit_config``, a
JSON-serialisable ``{"name": ..., "kwargs": ...}`` dict from which a checkpoint can
rebuild it with ``create_model(cfg["name"], **cfg["kwargs"])``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import check_int
from sparsekit.registry import Registry

MODELS: Registry = Registry("model")


def _positive_int(name: str, value: int) -> int:
    """``value`` as a plain int after checking it is an int ≥ 1 (a NumPy integer too: the
    config it is recorded in must serialise as JSON)."""
    check_int(name, value, minimum=1)
    return int(value)


def _config(name: str, **kwargs: int) -> dict[str, Any]:
    """Check a model's init args and record them with its registry name for ``create_model``."""
    return {"name": name, "kwargs": {k: _positive_int(k, v) for k, v in kwargs.items()}}


MAX_PARAMS = 2**31
"""The most parameters a reference network may have (8 GiB of float32 weights): larger
sizes used to fail inside PyTorch's allocator with a bare ``RuntimeError`` (or an
``Overflow when unpacking long long`` ``TypeError``), or to exhaust the machine's memory."""

_sizing = False  # building on the meta device to count parameters


def _check_fits(cls: type[nn.Module], config: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the arguments when ``cls(**config["kwargs"])`` would
    have more than :data:`MAX_PARAMS` parameters (counted on the meta device, for free)."""
    global _sizing
    if _sizing:
        return
    kwargs = config["kwargs"]
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    _sizing = True
    try:
        with torch.device("meta"):
            count = sum(p.numel() for p in cls(**kwargs).parameters())
    except (RuntimeError, TypeError, OverflowError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{config['name']}({args}): these sizes cannot be built ({first}); "
                         f"accepted: sizes giving at most {MAX_PARAMS:,} parameters") from None
    finally:
        _sizing = False
    if count > MAX_PARAMS:
        raise ValueError(f"{config['name']}({args}) would have {count:,} parameters; "
                         f"accepted: sizes giving at most {MAX_PARAMS:,} parameters")


class LeNet300100(nn.Module):
    """The fully connected LeNet-300-100 (LeCun et al. 1998), the classic pruning baseline."""

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.sparsekit_config = _config(
            "lenet_300_100", in_features=in_features, num_classes=num_classes
        )
        _check_fits(LeNet300100, self.sparsekit_config)
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 for 28×28 inputs: two 5×5 conv + max-pool stages, then 400→120→84→classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.sparsekit_config = _config("lenet5", in_channels=in_channels, num_classes=num_classes)
        _check_fits(LeNet5, self.sparsekit_config)
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """Two 3×3 conv + BN layers with a residual connection (He et al. 2016).

    The shortcut is a 1×1 conv + BN when the stride or channel count changes, else identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A CIFAR-style ResNet-14 sized for 28×28 inputs.

    3×3 stem, three stages of two ``BasicBlock``s (``width``, ``2·width``, ``4·width``
    channels; strides 1, 2, 2), global average pooling and a linear head.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.sparsekit_config = _config(
            "resnet_small", in_channels=in_channels, num_classes=num_classes, width=width
        )
        _check_fits(ResNetSmall, self.sparsekit_config)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._stage(width, width, stride=1)
        self.layer2 = self._stage(width, 2 * width, stride=2)
        self.layer3 = self._stage(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


@MODELS.register("lenet_300_100")
def lenet_300_100(**kwargs: Any) -> LeNet300100:
    """LeNet-300-100; see :class:`LeNet300100` for the arguments."""
    return LeNet300100(**kwargs)


@MODELS.register("lenet5")
def lenet5(**kwargs: Any) -> LeNet5:
    """LeNet-5; see :class:`LeNet5` for the arguments."""
    return LeNet5(**kwargs)


@MODELS.register("resnet_small")
def resnet_small(**kwargs: Any) -> ResNetSmall:
    """Small ResNet; see :class:`ResNetSmall` for the arguments."""
    return ResNetSmall(**kwargs)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name``; ``kwargs`` go to its constructor."""
    return MODELS.get(name)(**kwargs)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return MODELS.names()
