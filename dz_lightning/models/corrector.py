"""A small residual-correction CNN for solver-in-the-loop, staged as an ``nn.Sequential``."""

from __future__ import annotations

from torch import nn

__all__ = ["SOLCorrector"]


class SOLCorrector(nn.Sequential):
    """``depth - 1`` blocks of ``Conv(k x k) -> ReLU``, then ``Conv(k x k)`` to the correction.

    Input ``(B, in_channels, X, Y)`` (velocity u, v and a parameter channel); output ``(B, out_channels, X, Y)``,
    added to the solver's state. The last layer starts at zero, so training starts from the uncorrected solver.

    Args:
        in_channels: input channels.
        out_channels: correction channels.
        width: hidden channels.
        depth: conv layers (>= 2).
        kernel_size: odd kernel size (Solver-in-the-Loop uses 5).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 2, width: int = 8, depth: int = 3,
                 kernel_size: int = 5) -> None:
        if depth < 2 or width < 1 or kernel_size % 2 == 0:
            raise ValueError(f"Expected depth >= 2, width >= 1 and an odd kernel_size, but got depth={depth}, "
                             f"width={width}, kernel_size={kernel_size}.")
        pad = kernel_size // 2
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(depth - 1):
            layers += [nn.Conv2d(c, width, kernel_size, padding=pad), nn.ReLU()]
            c = width
        last = nn.Conv2d(c, out_channels, kernel_size, padding=pad)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        super().__init__(*layers, last)
