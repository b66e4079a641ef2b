"""The paper's simple CNN for the CGE-vs-RGE study: conv3x3 + BN + ReLU + maxpool blocks."""

from __future__ import annotations

from torch import nn

__all__ = ["SimpleCNN", "simple_cnn"]


class SimpleCNN(nn.Sequential):
    """``depth`` blocks of ``Conv2d(3x3, bias) -> BatchNorm2d -> ReLU -> MaxPool2d(2)``, then global average
    pooling and a linear classifier. Each block is a stage; on ``(B, 3, 32, 32)`` inputs the parameter counts
    are 730 / 3,700 / 6,670 / 9,640 / 12,610 for depth 1..5 (18 channels, 10 classes).

    Args:
        depth: number of conv blocks, >= 1.
        channels: width of every block.
        num_classes: output width.
        in_channels: input channels.
    """

    def __init__(self, depth: int = 3, channels: int = 18, num_classes: int = 10, in_channels: int = 3) -> None:
        if depth < 1 or channels < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"Expected positive sizes, but got depth={depth}, channels={channels}, num_classes={num_classes}, "
                f"in_channels={in_channels}."
            )
        blocks: list[nn.Module] = []
        width = in_channels
        for _ in range(depth):
            blocks.append(nn.Sequential(
                nn.Conv2d(width, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2)
            ))
            width = channels
        blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)))
        super().__init__(*blocks)


def simple_cnn(depth: int = 3, channels: int = 18, num_classes: int = 10, in_channels: int = 3) -> SimpleCNN:
    """Build :class:`SimpleCNN` (see there for the arguments)."""
    return SimpleCNN(depth=depth, channels=channels, num_classes=num_classes, in_channels=in_channels)
