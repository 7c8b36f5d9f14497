"""Models the benchmarks run on."""

from __future__ import annotations

import torch
from torch import nn


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 (11.2M parameters) adapted to 32×32 inputs as usual for
    CIFAR: a 3×3 stride-1 stem and no max-pool."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval()
