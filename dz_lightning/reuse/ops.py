"""Op-level math of the graph engine: which module is which, and the one-channel and difference kernels.

Functions of modules and tensors only (no graph); :mod:`dz_lightning.reuse.rules` applies them to the nodes of a graph.
Shapes: ``k`` queries of a chunk, a batch of ``B`` examples; a one-channel change is ``(k, B, *spatial)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from dz_lightning.query import MASK_DROPOUTS, low_precision_deltas
from dz_lightning.reuse.differences import batch_norm_channel_difference, relu_difference

__all__ = ["NORMS", "batchable_attention", "column", "column_change", "is_channelwise", "is_linear",
           "is_mixing", "is_per_example", "is_random_dropout"]

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus,
               nn.Identity, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.CELU, nn.SELU, nn.Softsign)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_LINEAR = (nn.Flatten, nn.Unflatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
           nn.AdaptiveAvgPool2d, nn.ZeroPad2d, nn.PixelShuffle, nn.PixelUnshuffle)
_PER_EXAMPLE = ELEMENTWISE + POOLS + (nn.LayerNorm, nn.GroupNorm, nn.MaxPool1d, nn.AvgPool1d, nn.Softmax,
                                      nn.LogSoftmax, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)


def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _plain_conv2d(op: nn.Module) -> bool:
    return isinstance(op, nn.Conv2d) and op.padding_mode == "zeros" and not isinstance(op.padding, str)


def is_depthwise(op: nn.Module) -> bool:
    """A Conv2d with one input channel per output channel (``groups == in_channels == out_channels``)."""
    return _plain_conv2d(op) and op.groups == op.in_channels == op.out_channels


def is_mixing(op: nn.Module, x: Tensor) -> bool:
    """A Conv2d (``groups=1``) on ``(B, C, H, W)`` or a Linear on ``(B, C)``: one-input-channel changes apply."""
    if isinstance(op, nn.Linear):
        return x.dim() == 2
    return _plain_conv2d(op) and op.groups == 1 and x.dim() == 4


def _tiling_transpose(op: nn.Module) -> bool:
    """A ConvTranspose2d whose windows tile the output: stride = kernel, no padding, groups 1 (U-Net up-sampling)."""
    return (isinstance(op, nn.ConvTranspose2d) and op.groups == 1 and pair(op.stride) == pair(op.kernel_size)
            and pair(op.padding) == (0, 0) and pair(op.output_padding) == (0, 0) and pair(op.dilation) == (1, 1)
            and op.padding_mode == "zeros")


def column_change(op: nn.Module, x: Tensor) -> bool:
    """A weight/bias coordinate changes one output channel by one input column: Conv2d (any groups), Linear, a
    tiling ConvTranspose2d."""
    if isinstance(op, nn.Linear):
        return x.dim() == 2
    return (_plain_conv2d(op) or _tiling_transpose(op)) and x.dim() == 4


def is_tiling_max_pool(op: nn.Module) -> bool:
    """A MaxPool2d whose windows tile the input: stride = kernel, no padding, no dilation, no ceil mode."""
    return (isinstance(op, nn.MaxPool2d) and not op.ceil_mode and not op.return_indices
            and pair(op.stride or op.kernel_size) == pair(op.kernel_size) and pair(op.padding) == (0, 0)
            and pair(op.dilation) == (1, 1))


def tiling_max(op: nn.MaxPool2d, z: Tensor) -> Tensor:
    """A tiling max pool over the last two dims of ``z`` as an elementwise max of strided views: several times
    faster than ``max_pool2d`` on CPU for small planes."""
    (kh, kw), h, w = pair(op.kernel_size), z.shape[-2], z.shape[-1]
    z = z[..., : h - h % kh, : w - w % kw]
    return functools.reduce(torch.maximum, [z[..., a::kh, c::kw] for a in range(kh) for c in range(kw)])


def is_channelwise(op: nn.Module, x: Tensor) -> bool:
    """Ops whose output channel c depends on input channel c only (on values of this rank)."""
    if isinstance(op, POOLS) or is_depthwise(op):
        return x.dim() == 4 and not getattr(op, "return_indices", False)
    if isinstance(op, nn.Dropout):
        return not op.training and x.dim() >= 2
    return isinstance(op, ELEMENTWISE + NORMS) and x.dim() >= 2


def is_random_dropout(op: nn.Module) -> bool:
    """A dropout that draws a mask (training mode, ``p > 0``): the engine draws it once, in the base forward."""
    return isinstance(op, MASK_DROPOUTS) and op.training and op.p > 0


def is_train_norm(op: nn.Module) -> bool:
    """A BatchNorm that normalizes with the batch's own statistics (per query, in the engine)."""
    return isinstance(op, NORMS) and (op.training or op.running_mean is None)


def is_linear(op: nn.Module) -> bool:
    """Modules whose change is a linear function of their input's change (the bias drops out of a difference)."""
    if isinstance(op, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
        return True
    if isinstance(op, NORMS):
        return not is_train_norm(op)
    if isinstance(op, (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)):
        return op.mode in ("nearest", "bilinear", "linear", "bicubic")
    return isinstance(op, _LINEAR) or (isinstance(op, nn.Dropout) and not op.training)


def is_per_example(op: nn.Module) -> bool:
    """Modules without batch statistics or randomness: ``k`` queries run as one flat ``k * B`` batch."""
    if isinstance(op, nn.Dropout):
        return not op.training
    return isinstance(op, _PER_EXAMPLE)


def is_linear_pad(node: Any) -> bool:
    """``F.pad`` with constant mode and value 0: linear in its input."""
    if node.target is not F.pad:
        return False
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return mode == "constant" and not value


def column(op: nn.Module, x: Tensor, local: str, index: Tensor, out_shape: torch.Size,
           cache: Callable[[Any, Callable[[], Any]], Any], key: int) -> tuple[Tensor, Tensor]:
    """Output channel of each coordinate and the change per unit delta: ``(k,)``, ``(k, B, *spatial)``."""
    k, b = index.numel(), x.shape[0]
    if local == "bias":
        return index, x.new_ones((k, b, *out_shape[2:]))
    if isinstance(op, nn.Linear):
        fan_in = op.in_features
        return index // fan_in, x[:, index % fan_in].transpose(0, 1)
    if isinstance(op, nn.ConvTranspose2d):  # weight (c, o, a, b): input channel c placed at offsets (a, b) of o
        kh, kw = op.kernel_size
        c, o = index // (op.out_channels * kh * kw), index // (kh * kw) % op.out_channels
        a, bw = index % (kh * kw) // kw, index % kw
        h, w = x.shape[2:]
        col = x.new_zeros((k, out_shape[2], out_shape[3], b))
        rows = (a.unsqueeze(1) + kh * torch.arange(h, device=index.device))[:, :, None]  # (k, h, 1)
        cols = (bw.unsqueeze(1) + kw * torch.arange(w, device=index.device))[:, None, :]  # (k, 1, w)
        col[torch.arange(k, device=index.device)[:, None, None], rows, cols] = x[:, c].permute(1, 2, 3, 0)
        return o, col.permute(0, 3, 1, 2)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = op.kernel_size, op.stride, op.padding, op.dilation
    # the column of weight (o, c, a, b) is a strided window of padded input channel c of o's group
    padded = cache(("padded", key), lambda: F.pad(x, (pw, pw, ph, ph)))
    per_group_in, per_group_out = op.in_channels // op.groups, op.out_channels // op.groups
    out_channel = index // (per_group_in * kh * kw)
    rem = index % (per_group_in * kh * kw)
    c = out_channel // per_group_out * per_group_in + rem // (kh * kw)
    a, bw = rem % (kh * kw) // kw, rem % kw
    ho, wo = out_shape[2], out_shape[3]
    rows = (a * dh).unsqueeze(1) + sh * torch.arange(ho, device=index.device)  # (k, ho)
    cols = (bw * dw).unsqueeze(1) + sw * torch.arange(wo, device=index.device)  # (k, wo)
    window = padded[:, c[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, k, ho, wo)
    return out_channel, window.transpose(0, 1).contiguous()


def normalize_channels(op: nn.Module, z: Tensor, channel: Tensor) -> Tensor:
    """A BatchNorm's normalization (no affine part) of one channel per query, ``z`` ``(k, B, *spatial)``; per
    query in train mode."""
    dims = tuple(range(1, z.dim()))
    shape = (-1, *([1] * (z.dim() - 1)))
    if is_train_norm(op):
        # two passes: as exact as var_mean and many times faster on CPU for these small per-query blocks
        centered = z - z.mean(dims, keepdim=True)
        return centered * torch.rsqrt((centered * centered).mean(dims, keepdim=True) + op.eps)
    mean, var = op.running_mean[channel].view(shape), op.running_var[channel].view(shape)
    return (z - mean) * torch.rsqrt(var + op.eps)


def channel_values(op: nn.Module, p: Mapping[str, Tensor], z: Tensor, channel: Tensor) -> Tensor:
    """A channel-wise op on one channel per query (values, not differences), ``z`` ``(k, B, *spatial)``."""
    if is_tiling_max_pool(op) and z.dim() == 4:
        return tiling_max(op, z)
    if isinstance(op, POOLS):
        k, b = z.shape[:2]
        out = op(z.reshape(k * b, 1, *z.shape[2:]))
        return out.reshape(k, b, *out.shape[2:])
    return op(z)


def channel_difference(ctx: Any, op: nn.Module, p: Mapping[str, Tensor], x: int, y: int, d: Tensor,
                       channel: Tensor) -> Tensor:
    """Change of channel-wise ``op``'s output (cached input node ``x``, output node ``y``) in channel ``channel[i]``
    when that channel of its input changes by ``d[i]`` ``(k, B, *spatial)``; from the change itself where the op
    allows it (BatchNorm, ReLU, depthwise convolution, average pooling, eval dropout)."""
    if isinstance(op, NORMS):
        shape = (-1, *([1] * (d.dim() - 1)))
        w = p["weight"][channel].view(shape) if "weight" in p else 1.0
        if not is_train_norm(op):
            return d * (w * torch.rsqrt(op.running_var[channel].view(shape) + op.eps))
        centered, var_eps = _channel_stats(ctx, x, op.eps)
        xc, var_eps = ctx.channels_of(("centered", x), centered, channel), var_eps[channel].view(shape)
        return batch_norm_channel_difference(xc, var_eps, w * torch.rsqrt(var_eps), d)
    if isinstance(op, nn.ReLU):
        return relu_channel_difference(ctx, x, d, channel)
    if isinstance(op, (nn.Identity, nn.Dropout)):
        return d
    if is_depthwise(op):  # each query's channel through its own 3x3 kernel: one grouped convolution
        k, b = d.shape[:2]
        out = F.conv2d(d.transpose(0, 1), p["weight"][channel], None, op.stride, op.padding, op.dilation, groups=k)
        return out.transpose(0, 1)
    if isinstance(op, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return channel_values(op, p, d, channel)
    return channel_values(op, p, ctx.channels(x, channel) + d, channel) - ctx.channels(y, channel)


def _channel_stats(ctx: Any, j: int, eps: float) -> tuple[Tensor, Tensor]:
    """Cached node ``j``'s value centered per channel, and its per-channel variance plus ``eps`` ``(C,)``."""
    def make() -> tuple[Tensor, Tensor]:
        x = ctx.values[j]
        dims = (0, *range(2, x.dim()))
        centered = x - x.mean(dims, keepdim=True)
        return centered, (centered * centered).mean(dims) + eps
    return ctx.cache(("stats", j, eps), make)


def relu_channel_difference(ctx: Any, x: int, d: Tensor, channel: Tensor) -> Tensor:
    """``relu(x_c + d) - relu(x_c)`` in channel ``channel[i]`` of each query, for a change ``d[i]`` ``(k, B, *spatial)``
    of that channel of cached node ``x`` (:func:`~dz_lightning.reuse.differences.relu_difference`)."""
    neg_part, neg_out = ctx.relu_base(x)
    return relu_difference(ctx.channels_of(("neg", x), neg_part, channel),
                           ctx.channels_of(("negout", x), neg_out, channel), d)


def one_channel_mix(op: nn.Module, p: Mapping[str, Tensor], d: Tensor, channel: Tensor,
                    out_shape: torch.Size) -> Tensor:
    """Change of mixing ``op``'s output (``out_shape``, one query) when input channel ``channel[i]`` changes by
    ``d[i]`` (bias excluded)."""
    # always fp32: a one-input-channel mix is cheap, and in bf16 its rounding dominated the error of the estimate
    w = p["weight"]
    k = d.shape[0]
    if isinstance(op, nn.Linear):
        # (k, B, out), row-major: both factors (small) are made row-major first, or the product would inherit a
        # query-fastest layout and the next linear op would run as a batched matmul over expanded weights
        return d.contiguous().unsqueeze(-1) * w[:, channel].transpose(0, 1).contiguous().unsqueeze(1)
    # a one-input-channel convolution as one batched matmul over the kernel taps (shifted views of the padded
    # change), far faster than a grouped conv2d on CPU; the result comes out channels-last
    b, (ho, wo) = d.shape[1], out_shape[2:]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = op.kernel_size, op.stride, op.padding, op.dilation
    dp = F.pad(d, (pw, pw, ph, ph))
    taps = torch.stack([dp[:, :, a * dh : a * dh + sh * (ho - 1) + 1 : sh, c * dw : c * dw + sw * (wo - 1) + 1 : sw]
                        for a in range(kh) for c in range(kw)], dim=-1)  # (k, B, ho, wo, kh * kw)
    kernels = w[:, channel].permute(1, 2, 3, 0).reshape(k, kh * kw, op.out_channels)
    out = torch.bmm(taps.reshape(k, b * ho * wo, kh * kw), kernels)
    return out.reshape(k, b, ho, wo, op.out_channels).permute(0, 1, 4, 2, 3)


def linear_difference(ctx: Any, op: nn.Module, p: Mapping[str, Tensor], d: Tensor) -> Tensor:
    """The change of a linear module's output for input changes ``d`` (the bias cancels), in ``delta_dtype``."""
    if isinstance(op, NORMS):  # eval-mode BatchNorm: a per-channel scale
        scale = torch.rsqrt(op.running_var + op.eps)
        if p.get("weight") is not None:
            scale = scale * p["weight"]
        return d * scale.view(-1, *([1] * (d.dim() - 3)))
    if isinstance(op, (nn.Dropout, nn.Identity)):
        return d
    if not isinstance(op, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose2d)):
        return ctx.flat(op, d)
    weight = p["weight"]
    low = None if ctx.delta_convs_only and isinstance(op, nn.Linear) else ctx.delta_dtype
    if low is not None:
        weight = ctx.cache(("low", id(weight)), lambda: weight.to(low))
        d_in = d.to(low)
    else:
        d_in = d
    with low_precision_deltas(ctx.delta_tf32):
        if isinstance(op, nn.Linear):  # one matmul over all queries' rows: needs rows that fold into one matrix
            out = F.linear(d_in if d_in.is_contiguous() else d_in.contiguous(), weight)
        elif isinstance(op, nn.ConvTranspose2d):
            out = ctx.flat(lambda flat: F.conv_transpose2d(flat, weight, None, op.stride, op.padding,
                                                           op.output_padding, op.groups, op.dilation), d_in)
        else:
            # the module's own convolution (padding mode included) with this weight and no bias
            out = ctx.flat(lambda flat: functional_call(op, {"weight": weight, "bias": None}, (flat,)), d_in)
    return out.to(d.dtype)


@contextlib.contextmanager
def batchable_attention() -> Iterator[None]:
    """Attention kernels that ``vmap`` can batch: the math kernel of scaled dot-product attention and no
    ``nn.MultiheadAttention`` fast path (fused kernels without batching rules run once per query)."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
