"""Differences through nonlinear ops, computed from the change itself.

The graph engine (:mod:`dz_lightning.reuse.engine`, rules in :mod:`dz_lightning.reuse.rules`) carries each
query's change ``d = perturbed - base`` through the network. These helpers give an op's output change for an input
change ``d`` in forms whose rounding error is relative to ``d`` rather than to the activations (``f(x + d) - f(x)``
in fp32 loses ``eps * |x|``), batched over the ``k`` queries of a chunk in one call each.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dz_lightning.reuse.fused import compiled

__all__ = ["NormBase", "batch_norm_channel_difference", "batch_norm_difference", "cross_entropy_rows",
           "per_example_loss", "relu_difference", "scale_change", "scatter_channel"]

def cross_entropy_rows(input: Tensor, target: Tensor, reduction: str = "none", ignore_index: int = -100,
                       label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy(..., reduction="none")``; for logits ``(N, C)`` at class indices ``(N,)`` without label
    smoothing, as ``logsumexp(x) - x[target]`` (0 where ignored): the same values to rounding, about 3.5x faster on
    CPU for few classes, where ``log_softmax`` pays a per-row overhead."""
    if reduction != "none" or label_smoothing != 0 or input.dim() != 2 or target.dim() != 1 \
            or target.is_floating_point():
        return F.cross_entropy(input, target, reduction=reduction, ignore_index=ignore_index,
                               label_smoothing=label_smoothing)
    ignored = target == ignore_index
    picked = input.gather(1, torch.where(ignored, 0, target).unsqueeze(1)).squeeze(1)
    return torch.where(ignored, 0.0, torch.logsumexp(input, 1) - picked)


_LOSSES: dict[Callable[..., Tensor], Callable[..., Tensor]] = {
    F.cross_entropy: cross_entropy_rows, F.mse_loss: F.mse_loss, F.l1_loss: F.l1_loss}


def per_example_loss(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor] | None:
    """``loss_fn`` with ``reduction="none"`` when it is a known mean-reduced loss (so that the mean of its values
    over a query's examples is ``loss_fn``'s value), else ``None``."""
    if loss_fn in _LOSSES:
        return functools.partial(_LOSSES[loss_fn], reduction="none")
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None and loss_fn.reduction == "mean":
        return functools.partial(cross_entropy_rows, ignore_index=loss_fn.ignore_index, reduction="none",
                                 label_smoothing=loss_fn.label_smoothing)
    if isinstance(loss_fn, (nn.MSELoss, nn.L1Loss)) and loss_fn.reduction == "mean":
        return functools.partial(F.mse_loss if isinstance(loss_fn, nn.MSELoss) else F.l1_loss, reduction="none")
    return None


class NormBase:
    """What a train-mode BatchNorm's difference needs of its cached input ``x``: the centered input, the variance
    and the scale, in the layout that the per-query reductions use."""

    def __init__(self, x: Tensor, weight: Tensor | None, eps: float) -> None:
        c = x.shape[1]
        self.channels_last = x.dim() == 4 and x.stride(1) == 1
        view = self.view(x.unsqueeze(0))
        self.dims = (1,) if self.channels_last or x.dim() == 2 else (1, 3)
        self.centered = view - view.mean(self.dims, keepdim=True)
        self.mean = self.centered.mean(self.dims, keepdim=True)  # ~0, its rounding kept for exactness
        self.var_eps = (self.centered * self.centered).mean(self.dims, keepdim=True) + eps
        w = x.new_ones(c) if weight is None else weight
        self.scale = w.view(1, 1, c) if self.channels_last or x.dim() == 2 else w.view(1, 1, c, 1)
        self.scale = self.scale * torch.rsqrt(self.var_eps)
        self.inv_var = 1 / self.var_eps
        self.inv_n_var = self.inv_var / (view.shape[1] * (view.shape[3] if view.dim() == 4 else 1))

    def view(self, h: Tensor) -> Tensor:
        """``(k, B, C, *spatial)`` as ``(k, B * H * W, C)`` (channels-last), ``(k, B, C, H * W)`` or ``(k, B, C)``."""
        if h.dim() == 5 and self.channels_last:
            return h.permute(0, 1, 3, 4, 2).reshape(h.shape[0], -1, h.shape[2])
        return h.reshape(h.shape[0], h.shape[1], h.shape[2], -1) if h.dim() == 5 else h

    def unview(self, h: Tensor, like: Tensor) -> Tensor:
        if like.dim() == 5 and self.channels_last:
            k, b, c, hh, ww = like.shape
            return h.reshape(k, b, hh, ww, c).permute(0, 1, 4, 2, 3)
        return h.reshape(like.shape)


def batch_norm_difference(base: NormBase, d: Tensor) -> Tensor:
    """Change of a train-mode BatchNorm's output when its input changes by ``d`` ``(k, B, C, *spatial)``, each query
    with its own statistics, from the cached base and in one batched reduction.

    With ``xc`` the centered base input, ``m = mean(d)``, ``s0`` the base scale and
    ``s = s0 (1 + dv / (var + eps))^(-1/2)`` where ``dv = 2 mean(xc d) - 2 m mean(xc) + mean(d^2) - m^2`` (the
    change of the variance), the change is ``xc (s - s0) + (d - m) s``: every term is computed from the change
    itself, so its rounding error is relative to the change, not to the activations (as in ``f(x + d) - f(x)``).
    """
    out = _norm_change(base.view(d), base.centered, base.mean, base.scale, base.inv_var, base.inv_n_var, base.dims)
    return base.unview(out, d)


@compiled
def _norm_change(v: Tensor, centered: Tensor, mean: Tensor, scale: Tensor, inv_var: Tensor, inv_n_var: Tensor,
                 dims: tuple[int, ...]) -> Tensor:
    """:func:`batch_norm_difference` on the views of :class:`NormBase` (compiled where possible)."""
    if dims == (1,):  # fused products and sums: no temporaries the size of v
        m = v.mean(1, keepdim=True)
        cross = torch.linalg.vecdot(centered, v, dim=1).unsqueeze(1)
        square = torch.linalg.vecdot(v, v, dim=1).unsqueeze(1)
    else:
        m = v.mean(dims, keepdim=True)
        cross = (centered * v).sum(dims, keepdim=True)
        square = (v * v).sum(dims, keepdim=True)
    # relative change of var + eps: (2 cross + square) / n - m (2 mean(xc) + m), over var + eps
    rel = torch.addcmul((2 * cross + square) * inv_n_var, m, (2 * mean + m) * inv_var, value=-1)
    ds = scale_change(scale, rel)
    s = scale + ds
    return torch.addcmul(torch.addcmul(-m * s, centered, ds), v, s)


@compiled
def batch_norm_channel_difference(xc: Tensor, var_eps: Tensor, scale: Tensor, d: Tensor) -> Tensor:
    """:func:`batch_norm_difference` for a change of one channel per query: ``xc`` ``(k, B, *spatial)`` that channel
    of the centered base input, ``var_eps`` and ``scale`` its variance plus eps and base scale (broadcast per query),
    ``d`` its change. With ``dc = d - mean(d)`` the variance changes by ``dv = 2 mean(xc dc) + mean(dc^2)``, and the
    output by ``xc (s - s0) + dc s``."""
    dims = tuple(range(1, d.dim()))
    dc = d - d.mean(dims, keepdim=True)
    dv = 2 * (xc * dc).mean(dims, keepdim=True) + (dc * dc).mean(dims, keepdim=True)
    ds = scale_change(scale, dv / var_eps)
    return torch.addcmul(xc * ds, dc, scale + ds)


def scale_change(scale: Tensor, rel: Tensor) -> Tensor:
    """``s - s0`` for ``s = s0 (1 + rel)^(-1/2)``: a BatchNorm scale's change when ``var + eps`` changes by the
    relative amount ``rel``, from ``rel`` itself (``expm1`` / ``log1p``: no rounding of ``1 + rel``)."""
    return scale * torch.expm1(torch.log1p(rel) * -0.5)


def relu_difference(neg_part: Tensor, neg_out: Tensor, d: Tensor, out: Tensor | None = None) -> Tensor:
    """``relu(x + d) - relu(x)`` as ``max(d + min(x, 0), -relu(x))``, from ``neg_part = min(x, 0)`` and
    ``neg_out = -relu(x)``: exact where ``x > 0`` (no rounding of ``x + d``), two passes over ``d``.

    ``out``: a buffer of the result's shape to write into (both passes in place, the same values): a fresh result
    per chunk is page-faulted in anew by the allocator, which made this 8x slower on CPU at 2 MB per chunk.
    """
    if out is None:
        return torch.maximum(d + neg_part, neg_out)
    return torch.maximum(torch.add(d, neg_part, out=out), neg_out, out=out)


def scatter_channel(base: Tensor, z: Tensor, channel: Tensor) -> Tensor:
    """``(k, *base.shape)`` zeros with channel ``channel[i]`` of query i set to ``z[i]``."""
    k = z.shape[0]
    d = z.new_zeros((k, *base.shape))
    d[torch.arange(k, device=z.device), :, channel] = z
    return d
