"""Correction CNNs for solver-in-the-loop: a small staged ``nn.Sequential`` and Solver-in-the-Loop's residual net."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SOLCorrector", "SOLResNet"]


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


class _ResidualBlock(nn.Module):
    """``LeakyReLU(x + Conv(LeakyReLU(Conv(x))))`` with ``k x k`` convolutions at constant width."""

    def __init__(self, width: int, kernel_size: int, negative_slope: float) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(width, width, kernel_size, padding=pad)
        self.conv2 = nn.Conv2d(width, width, kernel_size, padding=pad)
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.conv2(self.act(self.conv1(x))))


class SOLResNet(nn.Module):
    """Solver-in-the-Loop's karman-2d corrector: a residual CNN of ``k x k`` convolutions at ``width`` channels.

    ``Conv -> LeakyReLU``, then ``blocks`` residual blocks (two convolutions and a skip connection each), then a
    ``Conv`` to the correction: 12 convolutions of 5 x 5 at 32 channels by default, as in Um et al. (2020), whose
    Keras ``LeakyReLU`` has slope 0.3. Input ``(B, in_channels, X, Y)``, output ``(B, out_channels, X, Y)``.

    Args:
        in_channels: input channels (u, v and the Reynolds-number channel).
        out_channels: correction channels.
        width: hidden channels.
        blocks: residual blocks.
        kernel_size: odd kernel size.
        negative_slope: LeakyReLU slope.
        zero_output: start the output layer at zero, so training starts from the uncorrected solver (as
            :class:`SOLCorrector`); ``False`` keeps PyTorch's default initialization.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 2, width: int = 32, blocks: int = 5,
                 kernel_size: int = 5, negative_slope: float = 0.3, zero_output: bool = True) -> None:
        super().__init__()
        if blocks < 0 or width < 1 or kernel_size % 2 == 0:
            raise ValueError(f"Expected blocks >= 0, width >= 1 and an odd kernel_size, but got blocks={blocks}, "
                             f"width={width}, kernel_size={kernel_size}.")
        pad = kernel_size // 2
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, kernel_size, padding=pad),
                                  nn.LeakyReLU(negative_slope))
        self.blocks = nn.Sequential(*(_ResidualBlock(width, kernel_size, negative_slope) for _ in range(blocks)))
        self.head = nn.Conv2d(width, out_channels, kernel_size, padding=pad)
        if zero_output:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def stages(self) -> list[nn.Module]:
        """Stem, every residual block, head: their composition is :meth:`forward`."""
        return [self.stem, *self.blocks, self.head]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))
