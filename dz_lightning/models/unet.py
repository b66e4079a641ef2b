"""A small U-Net (Ronneberger et al. 2015) with concatenation skips, e.g. a denoiser or a segmenter."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["UNetSmall", "unet_small"]


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class UNetSmall(nn.Module):
    """Two down steps (max pooling), a bottleneck and two up steps (transposed convolutions), each up step
    concatenating the encoder's features of the same scale; a 1x1 convolution maps to ``out_channels``.

    Input ``(B, in_channels, H, W)`` with ``H`` and ``W`` divisible by 4, output ``(B, out_channels, H, W)``. It
    defines no ``stages()``: feature reuse comes from its traced graph (the skips are concatenations).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        width: channels of the first scale (doubled at each down step).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: int = 8) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or width < 1:
            raise ValueError(f"Expected positive sizes, but got in_channels={in_channels}, "
                             f"out_channels={out_channels}, width={width}.")
        w = width
        self.enc1, self.enc2 = _double_conv(in_channels, w), _double_conv(w, 2 * w)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(2 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), _double_conv(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), _double_conv(2 * w, w)
        self.head = nn.Conv2d(w, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


def unet_small(in_channels: int = 3, out_channels: int = 3, width: int = 8) -> UNetSmall:
    """Build :class:`UNetSmall` (see there for the arguments)."""
    return UNetSmall(in_channels=in_channels, out_channels=out_channels, width=width)
