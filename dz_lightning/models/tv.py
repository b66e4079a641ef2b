"""torchvision networks adapted to 32x32 inputs, unmodified otherwise: users' models, as users bring them.

They define no ``stages()``; feature reuse comes from their traced graphs.
"""

from __future__ import annotations

from torch import nn

__all__ = ["tv_mobilenet_v3_small", "tv_resnet18"]


def tv_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision ``resnet18(num_classes=...)`` with a 3x3 stride-1 stem and no max pooling (the usual CIFAR
    adaptation: 32x32 inputs keep their resolution in the first stage)."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def tv_mobilenet_v3_small(num_classes: int = 10) -> nn.Module:
    """torchvision ``mobilenet_v3_small(num_classes=...)`` as it is (depthwise convolutions, squeeze-excitation,
    Hardswish; dropout in its classifier)."""
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small(num_classes=num_classes)
