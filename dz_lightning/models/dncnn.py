"""DnCNN (Zhang et al. 2017): a residual denoiser ``D(x) = x - body(x)``."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DnCNN"]


class DnCNN(nn.Module):
    """``Conv -> ReLU``, ``depth - 2`` times ``Conv -> BatchNorm -> ReLU``, ``Conv``; the body predicts the noise.

    Input and output ``(B, channels, H, W)``. Defaults are small enough to train by ZO on a CPU. ``body`` is an
    ``nn.Sequential`` and ``residual`` is ``True``: ZO tasks perturb the body with feature reuse and subtract
    its output themselves.

    Args:
        channels: image channels.
        width: feature channels.
        depth: number of conv layers (>= 2).
    """

    residual = True

    def __init__(self, channels: int = 1, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        if channels < 1 or width < 1 or depth < 2:
            raise ValueError(f"Expected channels >= 1, width >= 1 and depth >= 2, but got channels={channels}, "
                             f"width={width}, depth={depth}.")
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)
        nn.init.zeros_(layers[-1].weight)  # start as the identity denoiser
        nn.init.zeros_(layers[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x - self.body(x)
