"""CIFAR ResNet-s (He et al. 2016, section 4.2) with option-A (parameter-free) shortcuts.

``resnet20`` has about 0.27M parameters. Feature reuse works on its traced graph; it also lists its stages (stem,
every residual block, head) for the hand-written protocol, which gives the same computation.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNetS", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; option A shortcut: subsample + zero-pad channels.

    Feature reuse needs nothing from it: the traced graph keeps a ``conv1``/``conv2`` coordinate's change in one
    channel through BatchNorm, ReLU, the add and the final ReLU, and the next convolution sees a one-input-channel
    change. It also exposes the residual protocol (``residual_branch()``, ``shortcut(x)``, ``after_add``), the
    fallback for models that cannot be traced, which gives the same computation (the tests compare the two).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def residual_branch(self) -> list[nn.Module]:
        """The ops of the residual branch, in order: ``conv1, bn1, relu, conv2, bn2``."""
        return [self.conv1, self.bn1, self.relu, self.conv2, self.bn2]

    @property
    def after_add(self) -> nn.Module:
        """Applied to ``branch(x) + shortcut(x)``."""
        return self.relu

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetS(nn.Module):
    """CIFAR ResNet with ``6n + 2`` layers: a 16-channel stem, three groups of ``n`` blocks (16, 32, 64
    channels), global average pooling and a linear head. Input ``(B, C, H, W)``, output ``(B, num_classes)``.

    Args:
        num_blocks: blocks per group (3 for ResNet-20).
        num_classes: output width.
        in_channels: input channels.
    """

    def __init__(self, num_blocks: int = 3, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if num_blocks < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"Expected positive sizes, but got num_blocks={num_blocks}, num_classes={num_classes}, "
                f"in_channels={in_channels}."
            )
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(num_blocks):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def stages(self) -> list[nn.Module]:
        """Stem, every residual block, head: their composition is :meth:`forward`."""
        return [self.stem, *self.blocks, self.head]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


def _resnet(depth: int, num_classes: int, in_channels: int) -> ResNetS:
    return ResNetS((depth - 2) // 6, num_classes=num_classes, in_channels=in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNetS:
    """ResNet-20 (about 0.27M parameters), the paper's model."""
    return _resnet(20, num_classes, in_channels)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> ResNetS:
    """ResNet-32."""
    return _resnet(32, num_classes, in_channels)


def resnet44(num_classes: int = 10, in_channels: int = 3) -> ResNetS:
    """ResNet-44."""
    return _resnet(44, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNetS:
    """ResNet-56."""
    return _resnet(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> ResNetS:
    """ResNet-110."""
    return _resnet(110, num_classes, in_channels)
