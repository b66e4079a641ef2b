"""Three small models that ``torch.fx`` cannot trace, for the full-forward fallback's benchmark and tests.

None of them has ``stages()``, so :class:`dz_lightning.ModuleOracle` answers their coordinate queries with full
forwards (:mod:`dz_lightning.fallback`). Each stops the tracer, and ``vmap``, in its own way:

* :class:`InPlaceResNet`: a CIFAR-style ResNet whose blocks add the shortcut in place (``out += shortcut(x)``) and
  whose ``forward`` branches on a default argument (``return_features``), which the tracer makes symbolic;
* :class:`GatedCNN`: data-dependent control flow (``if h.mean() > 0``) between two convolutions;
* :class:`NumpyGateCNN`: a NumPy call on an intermediate feature map inside ``forward``.

All take ``(N, 3, H, W)`` images and return ``(N, classes)`` logits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


class _Block(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut added in place, then ReLU; a 1x1 conv shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)  # in place: under vmap, `out` may not vary while the shortcut does
        return torch.relu(out)


class InPlaceResNet(nn.Module):
    """A small CIFAR ResNet (widths 16-32-64, ``blocks`` blocks per stage): ``(N, 3, 32, 32) -> (N, classes)``."""

    def __init__(self, blocks: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(blocks):
                layers.append(_Block(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        features = self.layers(self.stem(x)).mean(dim=(2, 3))
        logits = self.fc(features)
        if return_features:  # the tracer makes the default argument a proxy: this `if` stops it
            return logits, features
        return logits


class GatedCNN(nn.Module):
    """conv-BN-ReLU, then one of two convolutions chosen by the sign of the feature mean (data-dependent), then a
    linear head: ``(N, 3, H, W) -> (N, classes)``."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.up = nn.Conv2d(width, width, 3, 1, 1)
        self.down = nn.Conv2d(width, width, 3, 1, 1)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = self.up(h) if h.mean() > 0.2 else self.down(h)  # a tensor in an `if`: neither fx nor vmap can follow it
        return self.head(h)


class NumpyGateCNN(nn.Module):
    """conv-ReLU, a per-channel clip at the 90th percentile computed with NumPy, conv-ReLU and a linear head:
    ``(N, 3, H, W) -> (N, classes)``."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1)
        self.conv2 = nn.Conv2d(width, width, 3, 2, 1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(x))
        # NumPy reads the values: the tracer has none to give it, and vmap has none per point
        cap = np.percentile(h.detach().cpu().numpy(), 90, axis=(0, 2, 3)).astype(np.float32)
        h = torch.minimum(h, torch.from_numpy(cap).to(h.device).view(1, -1, 1, 1))
        h = torch.relu(self.conv2(h))
        return self.fc(h.mean(dim=(2, 3)))


FALLBACK_MODELS = {"inplace_resnet": InPlaceResNet, "gated_cnn": GatedCNN, "numpy_gate_cnn": NumpyGateCNN}
"""name -> constructor (defaults: 10 classes, CIFAR-sized inputs)."""
