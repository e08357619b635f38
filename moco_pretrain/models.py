"""ResNet encoders from torchvision, with the small-image stem CIFAR-size users expect."""

from __future__ import annotations

import torchvision
from torch import nn


def build_resnet(arch: str, *, num_classes: int = 1000, small_stem: bool = False) -> nn.Module:
    """A torchvision ResNet (``resnet18`` ... ``resnet152``) with ``num_classes`` outputs.

    Args:
        arch: torchvision model name.
        num_classes: output dimension of ``fc`` (MoCo's ``dim``).
        small_stem: for 28-64 px images: a 3x3 stride-1 ``conv1`` and no max-pool, as in the
            CIFAR variants of SimCLR/MoCo. Parameter names are unchanged; only ``conv1``'s shape.
    """
    builder = getattr(torchvision.models, arch, None)
    if not arch.startswith("resnet") or builder is None:
        raise ValueError(f"unknown ResNet architecture {arch!r} (expected e.g. 'resnet50')")
    model = builder(num_classes=num_classes)
    if small_stem:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


def build_backbone(arch: str, *, small_stem: bool = False) -> nn.Module:
    """A ResNet returning pooled features (``fc`` is ``nn.Identity``); ``.feature_dim`` gives D."""
    model = build_resnet(arch, small_stem=small_stem)
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model
