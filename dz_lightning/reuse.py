"""Feature reuse and batched, structure-aware coordinate queries for staged models.

A staged model is an ordered list of modules whose composition is its forward (an ``nn.Sequential``, or any
model with a ``stages()`` method). Nested ``nn.Sequential`` stages are flattened into a list of *ops*. One base
forward caches every op's input; a perturbation of a parameter of op ``j`` restarts the forward at op ``j``, and
many perturbations run as one batched computation whose number of ops does not grow with the number of queries
``k`` (no per-query Python calls, no host syncs, no patching of the user's modules).

Difference propagation: after the perturbed op, each query carries its change ``d = perturbed - base``
``(k, B, ...)``. Linear ops (Conv2d, Linear, eval-mode BatchNorm, average pooling, flatten, a linear shortcut, the
add) act on ``d`` alone, in ``delta_dtype``; nonlinear ones compute ``f(base + d) - f(base)`` in fp32 from the
cached base, in forms whose rounding is relative to ``d`` where possible (train-mode BatchNorm with per-query
statistics in one batched reduction, ReLU); other modules run once per query through ``vmap``. The loss of all
``k`` queries is one ``vmap``-ed call on the fp32 outputs plus ``d``, taken in float64 (see
:func:`dz_lightning.query.float64_loss`).

Beyond batching, the structure of CGE is exploited:

* A coordinate of a Conv2d/Linear weight (or bias) changes the layer output by ``delta`` times one column of the
  unfolded input (a strided window of one padded input channel), in one output channel only: it is added to the
  cached output, no convolution is recomputed.
* Channel-wise ops that follow (BatchNorm, activations, pooling) keep the change inside that channel, so they
  run on one channel per query.
* The next channel-mixing layer then sees a one-channel change: its output changes by a one-input-channel
  convolution (one batched matmul over the kernel taps for all queries of a chunk).
* A residual block exposing ``residual_branch()``, ``shortcut(x)`` and ``after_add`` (see :func:`residual_parts`)
  gets all of the above inside its branch; a change that stays in one channel through the branch also stays
  there through the add and ``after_add`` (a ReLU), so the next block's first convolution sees a one-channel change.
* A block exposing only ``first_layer`` and ``forward_after_first(x, pre)`` gets the first trick for its first
  convolution.

On CPU the activations are kept channels-last (several times faster convolutions and BatchNorm) and queries are
batched only while one chunk's activation stays small: larger flat batches run slower per example there.

Every shortcut gives the same finite differences as the plain one-query-at-a-time loop, to float tolerance.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from dz_lightning import query
from dz_lightning.differences import (
    NormBase,
    batch_norm_difference,
    per_example_loss,
    relu_difference,
    scatter_channel,
)
from dz_lightning.query import low_precision_deltas, query_mode

__all__ = ["StagedForward", "build_staged", "flatten_ops", "get_stages", "residual_parts"]

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Identity
)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_LINEAR_OPS = (nn.Flatten, nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_DELTA_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "tf32": None}
_CPU_CACHE_BYTES = 2 << 20


def get_stages(model: nn.Module) -> list[nn.Module] | None:
    """The ordered stages of ``model``: an ``nn.Sequential``'s children, ``model.stages()``, else ``None``."""
    if isinstance(model, nn.Sequential):
        return list(model.children())
    stages = getattr(model, "stages", None)
    if callable(stages):
        return list(stages())
    return None


def build_staged(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    params: Mapping[str, Tensor] | None = None,
    *,
    max_batch: int | None = None,
    memory_budget: int | None = None,
    delta_dtype: str | torch.dtype = "float32",
) -> StagedForward | None:
    """The feature-reuse engine for ``model``, or ``None`` (with one warning per model type) when it has none.

    This is the one entry point the oracles use; the arguments are those of :class:`StagedForward`.
    """
    if get_stages(model) is None:
        _warn_not_staged(model)
        return None
    return StagedForward(model, loss_fn, inputs, targets, params, max_batch=max_batch, memory_budget=memory_budget,
                         delta_dtype=delta_dtype)


_WARNED: set[type] = set()


def _warn_not_staged(model: nn.Module) -> None:
    if type(model) not in _WARNED:
        _WARNED.add(type(model))
        warnings.warn(
            f"{type(model).__name__} exposes no stages (it is not an nn.Sequential and has no `stages()` method), "
            "so CGE runs the full forward for every query. Define `stages()` to enable feature reuse.",
            stacklevel=4,
        )


def flatten_ops(stages: list[nn.Module]) -> list[nn.Module]:
    """Stages with nested ``nn.Sequential`` containers expanded into their children, recursively."""
    ops: list[nn.Module] = []
    for stage in stages:
        if isinstance(stage, nn.Sequential):
            ops.extend(flatten_ops(list(stage.children())))
        else:
            ops.append(stage)
    return ops


def _is_mixing(op: nn.Module) -> bool:
    if isinstance(op, nn.Linear):
        return True
    return (isinstance(op, nn.Conv2d) and op.groups == 1 and op.padding_mode == "zeros"
            and not isinstance(op.padding, str))


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _is_tiling_max_pool(op: nn.Module) -> bool:
    """A MaxPool2d whose windows tile the input: stride = kernel, no padding, no dilation, no ceil mode."""
    return (isinstance(op, nn.MaxPool2d) and not op.ceil_mode and not op.return_indices
            and _pair(op.stride or op.kernel_size) == _pair(op.kernel_size) and _pair(op.padding) == (0, 0)
            and _pair(op.dilation) == (1, 1))


def _tiling_max(op: nn.MaxPool2d, z: Tensor) -> Tensor:
    """A tiling max pool over the last two dims of ``z`` as an elementwise max of strided views: several times
    faster than ``max_pool2d`` on CPU for small planes."""
    (kh, kw), h, w = _pair(op.kernel_size), z.shape[-2], z.shape[-1]
    z = z[..., : h - h % kh, : w - w % kw]
    return functools.reduce(torch.maximum, [z[..., a::kh, c::kw] for a in range(kh) for c in range(kw)])


def _is_channelwise(op: nn.Module) -> bool:
    if isinstance(op, _POOLS):
        return not getattr(op, "return_indices", False)
    return isinstance(op, _ELEMENTWISE + _NORMS)


def _is_train_norm(op: nn.Module) -> bool:
    """A BatchNorm that normalizes with the batch's own statistics (per query, in the engine)."""
    return isinstance(op, _NORMS) and (op.training or op.running_mean is None)


def _is_linear(op: nn.Module) -> bool:
    """Ops whose change is a linear function of their input's change (the bias drops out of a difference)."""
    if isinstance(op, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        return True
    if isinstance(op, _NORMS):
        return not _is_train_norm(op)
    return isinstance(op, _LINEAR_OPS) or (isinstance(op, nn.Dropout) and not op.training)


def _materialize(base: Tensor, z: Tensor, channel: Tensor) -> Tensor:
    """``k`` copies of ``base`` ``(B, C, ...)``, channel ``channel[i]`` of copy i replaced by ``z[i]``."""
    k = z.shape[0]
    h = base.unsqueeze(0).repeat(k, *([1] * base.dim()))
    h[torch.arange(k, device=z.device), :, channel] = z
    return h


class _Method(nn.Module):
    """Calls ``getattr(block, method)(*args)`` so that a block's method can go through ``functional_call``."""

    def __init__(self, block: nn.Module, method: str) -> None:
        super().__init__()
        self.block = block
        self.method = method

    def forward(self, *args: Tensor) -> Tensor:
        return getattr(self.block, self.method)(*args)


class _Chain:
    """Ops composed in order with their parameter values; ``acts[t]`` is the cached input of op ``t``."""

    def __init__(self, ops: list[nn.Module], params: list[dict[str, Tensor]], acts: list[Tensor], top: bool) -> None:
        self.ops, self.params, self.acts, self.top = ops, params, acts, top


class _Residual:
    """A residual block seen as ``after_add(branch(x) + shortcut(x))``, with the branch's activations cached."""

    def __init__(self, branch: _Chain, where: dict[str, tuple[int, str]], shortcut: Tensor,
                 after_add: nn.Module | None, after_add_params: dict[str, Tensor]) -> None:
        self.branch, self.where, self.shortcut = branch, where, shortcut
        self.after_add, self.after_add_params = after_add, after_add_params
        self.pre = branch.acts[-1] + shortcut
        self.out: Tensor | None = None
        self.linear_shortcut = self.identity_shortcut = False


def residual_parts(block: nn.Module) -> tuple[list[nn.Module], nn.Module | None] | None:
    """``(branch ops, after_add)`` of a block exposing the residual protocol, else ``None``.

    The protocol: ``block.residual_branch()`` returns the ops whose composition is the residual branch,
    ``block.shortcut(x)`` is the skip path and ``block.after_add`` (optional, e.g. an ``nn.ReLU``) is applied to
    their sum, so that ``block(x) == after_add(branch(x) + shortcut(x))``.
    """
    branch = getattr(block, "residual_branch", None)
    if not callable(branch) or not callable(getattr(block, "shortcut", None)):
        return None
    return list(branch()), getattr(block, "after_add", None)


class StagedForward:
    """Cached base forward of a staged model and batched one-coordinate perturbations of it.

    Args:
        model: a staged model (see :func:`get_stages`).
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``.
        inputs: batch inputs ``(B, ...)``.
        targets: batch targets.
        params: name (as in ``model.named_parameters()``) -> value to use; missing names use the model's own.
        max_batch: most queries per batched call; ``None`` derives it from ``memory_budget``.
        memory_budget: bytes the batched queries may use; ``None``: :func:`~dz_lightning.query.memory_budget`.
        delta_dtype: arithmetic of the linear ops on the differences: ``"float32"`` (default), ``"bfloat16"``
            (faster where the hardware has it; error relative to the differences, about 1e-2 of the gradient's RMS on
            resnet20), or ``"tf32"`` (CUDA only). The base forward and nonlinear ops always run in fp32.

    Attributes:
        chunk_sizes: most queries per batched call for a restart at each op, fixed at construction (from
            ``max_batch``, or the memory budget and the model's activation sizes): the same every step.

    Raises:
        ValueError: the model is not staged, a parameter belongs to no stage, a residual protocol disagrees with
            the block's forward, or ``delta_dtype`` is not valid.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inputs: Tensor,
        targets: Tensor,
        params: Mapping[str, Tensor] | None = None,
        max_batch: int | None = None,
        memory_budget: int | None = None,
        delta_dtype: str | torch.dtype = "float32",
    ) -> None:
        names = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
        delta_name = names.get(delta_dtype, delta_dtype) if isinstance(delta_dtype, torch.dtype) else delta_dtype
        if delta_name not in _DELTA_DTYPES:
            raise ValueError(f"Expected argument `delta_dtype` to be one of {sorted(_DELTA_DTYPES)}, but got "
                             f"{delta_dtype!r}.")
        if delta_name == "tf32" and not inputs.is_cuda:
            raise ValueError("`delta_dtype='tf32'` needs CUDA inputs (TF32 is a CUDA tensor-core format), but the "
                             f"inputs are on {inputs.device}; use 'float32' or 'bfloat16'.")
        stages = get_stages(model)
        if stages is None:
            raise ValueError(f"{type(model).__name__} is not staged: make it an nn.Sequential or define `stages()`.")
        self.model, self.loss_fn, self.inputs, self.targets = model, loss_fn, inputs, targets
        self.ops = flatten_ops(stages)
        self.max_batch = max_batch
        self.memory_budget = memory_budget
        params = dict(params or {})
        owner = {id(p): (j, local) for j, op in enumerate(self.ops) for local, p in op.named_parameters()}
        self.where: dict[str, tuple[int, str]] = {}
        for name, p in model.named_parameters():
            if id(p) not in owner:
                raise ValueError(f"Parameter {name!r} belongs to no stage of {type(model).__name__}: the stages must "
                                 "compose to the whole model.")
            self.where[name] = owner[id(p)]
        self.op_params: list[dict[str, Tensor]] = [dict(op.named_parameters()) for op in self.ops]
        for name, value in params.items():
            j, local = self.where[name]
            self.op_params[j][local] = value
        self._first_pre: dict[int, Tensor] = {}
        self._padded: dict[int, Tensor] = {}
        self._residuals: list[_Residual | None] = []
        self._norm_bases: dict[int, dict[int, Tensor]] = {}
        self._low_weights: dict[int, Tensor] = {}
        self._relu_bases: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._stats: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._delta_dtype, self._delta_tf32 = _DELTA_DTYPES[delta_name], delta_name == "tf32"
        self._channel_major: dict[int, tuple[Tensor, Tensor]] = {}
        # channels-last convolutions and BatchNorm run several times faster than NCHW on CPU
        self._layout = torch.channels_last if not inputs.is_cuda else torch.contiguous_format
        with query_mode(model, inputs.device):
            self.acts = [inputs]
            for j, op in enumerate(self.ops):
                if self.acts[-1].dim() == 4:
                    self.acts[-1] = self.acts[-1].contiguous(memory_format=self._layout)
                self.acts.append(functional_call(op, self.op_params[j], (self.acts[-1],)))
            # the loss in float64 where loss_fn allows it: perturbed losses come from the same outputs plus each
            # query's difference, and f(theta + mu e_i) - f(theta) is not lost to the rounding of fp32 losses
            self._base = query.float64_loss(loss_fn, self.acts[-1], targets).reshape(())
            self._per_example = per_example_loss(loss_fn)
            if self._per_example is not None:  # checked once: e.g. ignored targets make the mean differ
                out = self.acts[-1].to(self._base.dtype)
                mean = self._per_example(out, targets).reshape(out.shape[0], -1).mean(1).mean()
                if not torch.allclose(mean, self._base, rtol=1e-6, atol=1e-9):
                    self._per_example = None
            self._top = _Chain(self.ops, self.op_params, self.acts, top=True)
            self._norm_bases[id(self._top)] = {}
            self._residuals = [self._build_residual(j) for j in range(len(self.ops))]
        sizes = [a.numel() * a.element_size() for a in self.acts]
        # largest activation of one query from op j to the end: what a chunk of queries restarting at j allocates
        self._bytes_from = [max(sizes[j:]) for j in range(len(self.ops))]
        # queries per chunk for a restart at op j, decided here from the budget and the model, not per call
        self.chunk_sizes = tuple(self._chunk(j) for j in range(len(self.ops)))

    # ------------------------------------------------------------------------------------------ public API
    def base_loss(self) -> Tensor:
        """Loss at the unperturbed parameters, a 0-d tensor."""
        return self._base

    def coordinate_losses(self, name: str, index: Tensor, delta: float) -> Tensor:
        """Losses with ``params[name].view(-1)[index[i]] += delta``, each ``i`` separately: shape ``(n,)``."""
        if name not in self.where:
            raise ValueError(f"Unknown parameter {name!r}; valid names: {sorted(self.where)}.")
        index = index.reshape(-1).to(device=self.inputs.device, dtype=torch.long)
        chunk = min(index.numel(), self.chunk_sizes[self._full_restart(*self.where[name])])
        out = []
        with query_mode(self.model, self.inputs.device):
            for start in range(0, index.numel(), chunk):
                out.append(self._chunk_losses(name, index[start : start + chunk], delta))
        return torch.cat(out) if out else self._base.new_zeros(0)

    # ------------------------------------------------------------------------------------------ internals
    def _chunk(self, start: int) -> int:
        """Most queries per batched call for a restart at op ``start``.

        ``max_batch`` if set. On CUDA: as many as the memory budget (:func:`~dz_lightning.query.memory_budget`,
        fixed per process) allows. On CPU a flat batch whose activations outgrow the cache runs slower per example
        than separate small batches, so queries are batched only while one activation of the whole chunk stays
        within ``_CPU_CACHE_BYTES``.
        """
        if self.max_batch is not None:
            return max(1, self.max_batch)
        k = int(query.memory_budget(self.inputs.device, self.memory_budget) // (4 * self._bytes_from[start]))
        if not self.inputs.is_cuda:
            k = min(k, int(_CPU_CACHE_BYTES // self._bytes_from[start]))
        return max(1, k)

    def _full_restart(self, j: int, local: str) -> int:
        """First op that the queries of parameter ``local`` of op ``j`` run on whole activations."""
        op = self.ops[j]
        if not ((_is_mixing(op) or isinstance(op, _NORMS)) and local in ("weight", "bias")):
            return j
        t = j + 1
        while t < len(self.ops) and _is_channelwise(self.ops[t]):
            t += 1
        if t < len(self.ops) and _is_mixing(self.ops[t]):
            t += 1
        return min(t, len(self.ops) - 1)

    def _chunk_losses(self, name: str, index: Tensor, delta: float) -> Tensor:
        j, local = self.where[name]
        h, channel = self._perturb(self._top, j, local, index, delta)
        h, channel = self._advance(self._top, j + 1, h, channel)
        return self._losses(self._to_difference(self.acts[-1], h, channel))

    def _losses(self, d: Tensor) -> Tensor:
        """``loss_fn`` at the cached outputs plus each query's difference ``d`` ``(k, B, ...)``, shape ``(k,)``.

        A mean-reduced cross-entropy, MSE or L1 loss runs once for the whole chunk (``reduction="none"`` on the flat
        ``k * B`` batch, then a mean per query). Any other ``loss_fn`` is called once per query: it may hold a black
        box that must see, and count, every example (``vmap`` would hide the query dimension from it).
        """
        outputs = self.acts[-1].to(self._base.dtype) + d.to(self._base.dtype)
        per_example = self._per_example
        if per_example is None:
            return torch.stack([self.loss_fn(out, self.targets).reshape(()) for out in outputs])
        k, b = outputs.shape[:2]
        targets = self.targets.expand(k, *self.targets.shape).reshape(k * b, *self.targets.shape[1:])
        values = per_example(outputs.reshape(k * b, *outputs.shape[2:]), targets)
        return values.reshape(k, -1).mean(1)

    # A query state at the input of op t of a chain is ``(h, channel)``: with ``channel`` None, ``h`` ``(k, B, ...)``
    # holds each query's *difference* from the cached input ``acts[t]``; otherwise only channel ``channel[i]`` of
    # query i differs from the cache, and ``h`` ``(k, B, *spatial)`` holds that channel's values.

    def _to_difference(self, base: Tensor, h: Tensor, channel: Tensor | None) -> Tensor:
        """A state at ``base`` as a whole difference ``(k, *base.shape)``."""
        return h if channel is None else scatter_channel(base, h, channel)

    def _perturb(self, chain: _Chain, j: int, local: str, index: Tensor, delta: float) -> tuple[Tensor, Tensor | None]:
        """State at the input of op ``j + 1`` when entry ``index[i]`` of op ``j``'s ``local`` moves by ``delta``."""
        op, x = chain.ops[j], chain.acts[j]
        if local in ("weight", "bias"):
            if _is_mixing(op) and (isinstance(op, nn.Conv2d) or x.dim() == 2):
                # a weight coordinate adds delta times one input column to one output channel
                channel, col = self._column(op, x, local, index, chain.acts[j + 1].shape)
                return delta * col, channel
            if isinstance(op, _NORMS) and x.dim() in (2, 4):
                # d(w * xhat + b) = delta * xhat (weight) or delta (bias)
                xhat = self._channelwise(op, chain.params[j], self._channels(x, index), index)
                return (delta * xhat if local == "weight" else torch.full_like(xhat, delta)), index
        if chain.top:
            block = self._residuals[j]
            if block is not None and local in block.where:
                i, branch_local = block.where[local]
                h, channel = self._perturb(block.branch, i, branch_local, index, delta)
                h, channel = self._advance(block.branch, i + 1, h, channel)
                return self._after_add(block, h, channel)
            first = getattr(op, "first_layer", None)
            if isinstance(first, nn.Conv2d) and _is_mixing(first) and hasattr(op, "forward_after_first"):
                prefix = next(n for n, m in op.named_modules() if m is first)
                if local in (f"{prefix}.weight", f"{prefix}.bias"):
                    return self._first_layer_path(j, prefix, local, index, delta) - chain.acts[j + 1], None
        # any other parameter: the op runs once per query (batched by vmap), with its own value of the parameter
        base = chain.params[j][local]
        k = index.numel()
        stacked = base.detach().reshape(1, -1).repeat(k, 1)
        stacked[torch.arange(k, device=stacked.device), index] += delta
        stacked = stacked.reshape(k, *base.shape)
        params = chain.params[j]
        out = vmap(lambda w: functional_call(op, {**params, local: w}, (x,)), randomness="same")(stacked)
        return out - chain.acts[j + 1], None

    def _advance(self, chain: _Chain, t: int, h: Tensor, channel: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Run a state from the input of op ``t`` to the end of ``chain``, keeping a one-channel change local."""
        n = len(chain.ops)
        while t < n and channel is not None:
            op, x = chain.ops[t], chain.acts[t]
            if _is_channelwise(op) and x.dim() in (2, 4):
                h = self._channel_difference(op, chain.params[t], x, chain.acts[t + 1], h, channel)
            elif _is_mixing(op) and x.dim() == (2 if isinstance(op, nn.Linear) else 4):
                # the next mixing layer sees a one-channel change: its output changes by a one-input-channel conv
                h = self._one_channel_mix(op, chain.params[t], h, channel,
                                          chain.acts[t + 1].shape)
                channel = None
            elif chain.top and x.dim() == 4 and self._residuals[t] is not None:
                h, channel = self._residual_input_change(t, h, channel)
            else:
                h, channel = self._to_difference(x, h, channel), None
                break
            t += 1
        if channel is None and t < n:
            h = self._run_differences(chain, t, h)
        return h, channel

    def _run_differences(self, chain: _Chain, t: int, d: Tensor) -> Tensor:
        """Carry per-query differences ``d`` ``(k, *acts[t].shape)`` through ops ``t`` to the end of ``chain``.

        Linear ops act on ``d`` alone (in ``delta_dtype``); nonlinear ones compute ``f(base + d) - f(base)`` in fp32
        from the cached base. Every op runs once for the whole chunk.
        """
        for s in range(t, len(chain.ops)):
            op, p, x, y = chain.ops[s], chain.params[s], chain.acts[s], chain.acts[s + 1]
            if chain.top and self._residuals[s] is not None:
                d = self._residual_difference(s, d)
            elif _is_linear(op):
                d = self._linear(op, p, d)
            elif _is_train_norm(op) and x.dim() in (2, 4):
                bases = self._norm_bases[id(chain)]
                if s not in bases:
                    bases[s] = NormBase(x, p.get("weight"), op.eps)
                d = batch_norm_difference(bases[s], d)
            elif isinstance(op, nn.ReLU):
                d = relu_difference(*self._relu_base(x), d)
            elif _is_tiling_max_pool(op) and x.dim() == 4:
                d = _tiling_max(op, x + d) - y
            elif isinstance(op, _ELEMENTWISE + _POOLS):
                d = self._flat(op, x + d) - y
            else:  # anything else runs once per query, batched by vmap
                d = vmap(lambda h, op=op, p=p: functional_call(op, p, (h,)), randomness="same")(x + d) - y
        return d

    def _flat(self, op: Callable[[Tensor], Tensor], h: Tensor) -> Tensor:
        """``op`` on ``(k, B, ...)`` as one flat batch of ``k * B`` examples (ops without batch statistics)."""
        flat = h.reshape(-1, *h.shape[2:])
        if flat.dim() == 4:
            flat = flat.contiguous(memory_format=self._layout)
        out = op(flat)
        return out.reshape(h.shape[0], h.shape[1], *out.shape[1:])

    def _linear(self, op: nn.Module, p: Mapping[str, Tensor], d: Tensor) -> Tensor:
        """The change of a linear op's output for input changes ``d`` (the bias cancels), in ``delta_dtype``."""
        if isinstance(op, _NORMS):  # eval-mode BatchNorm: a per-channel scale
            scale = torch.rsqrt(op.running_var + op.eps)
            if p.get("weight") is not None:
                scale = scale * p["weight"]
            return d * scale.view(-1, *([1] * (d.dim() - 3)))
        if not isinstance(op, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            return self._flat(op, d)
        weight = p["weight"]
        if self._delta_dtype is not None:
            key = id(weight)
            if key not in self._low_weights:
                self._low_weights[key] = weight.to(self._delta_dtype)
            weight, d_in = self._low_weights[key], d.to(self._delta_dtype)
        else:
            d_in = d
        with low_precision_deltas(self._delta_tf32):
            if isinstance(op, nn.Linear):
                out = F.linear(d_in, weight)
            else:
                out = self._flat(lambda flat: op._conv_forward(flat, weight, None), d_in)
        return out.to(d.dtype)

    def _channels(self, x: Tensor, channel: Tensor) -> Tensor:
        """``x[:, channel[i]]`` for each i, ``(k, B, ...)``, gathered from a cached contiguous channel-major copy."""
        cached = self._channel_major.get(id(x))
        if cached is None or cached[0] is not x:
            cached = self._channel_major[id(x)] = (x, x.transpose(0, 1).contiguous())
        return cached[1][channel]

    def _build_residual(self, j: int) -> _Residual | None:
        """The residual structure of op ``j``, ``None`` when it does not expose the protocol (checked here, once)."""
        block, parts = self.ops[j], residual_parts(self.ops[j])
        if parts is None:
            return None
        ops, after_add = parts
        names = {id(m): n for n, m in block.named_modules()}

        def own_params(m: nn.Module) -> dict[str, Tensor]:
            if not any(True for _ in m.parameters()):
                return {}
            if id(m) not in names:
                raise ValueError(f"{type(block).__name__}.residual_branch() returns a {type(m).__name__} with "
                                 "parameters that is not a submodule of the block.")
            prefix = names[id(m)] + "."
            return {local: self.op_params[j][prefix + local] for local, _ in m.named_parameters()}

        params = [own_params(m) for m in ops]
        where = {names[id(m)] + "." + local: (i, local) for i, m in enumerate(ops) for local in params[i]}
        acts = [self.acts[j]]
        for m, p in zip(ops, params, strict=True):
            acts.append(functional_call(m, p, (acts[-1],)))
        shortcut = functional_call(_Method(block, "shortcut"), self._block_params(j), (self.acts[j],))
        after_params = own_params(after_add) if after_add is not None else {}
        out = acts[-1] + shortcut
        if after_add is not None:
            out = functional_call(after_add, after_params, (out,))
        if not torch.allclose(out, self.acts[j + 1], rtol=1e-4, atol=1e-5):
            raise ValueError(f"{type(block).__name__}: after_add(residual_branch(x) + shortcut(x)) differs from its "
                             "forward(x); fix the residual protocol or remove it.")
        residual = _Residual(_Chain(ops, params, acts, top=False), where, shortcut, after_add, after_params)
        residual.identity_shortcut = shortcut is self.acts[j]
        residual.linear_shortcut = residual.identity_shortcut or self._is_linear_shortcut(j)
        self._norm_bases[id(residual.branch)] = {}
        return residual

    def _is_linear_shortcut(self, j: int) -> bool:
        """Whether block ``j``'s shortcut is linear (identity, subsampling, zero padding, a bias-free projection):
        then it acts on a difference alone. Checked once, on random inputs."""
        shortcut = _Method(self.ops[j], "shortcut")
        params = self._block_params(j)
        gen = torch.Generator(device=self.inputs.device).manual_seed(0)
        a, b = (torch.randn(self.acts[j].shape, generator=gen, device=self.inputs.device) for _ in range(2))
        a, b = a.contiguous(memory_format=self._layout), b.contiguous(memory_format=self._layout)

        def run(h: Tensor) -> Tensor:
            return functional_call(shortcut, params, (h,))

        sa, sb = run(a), run(b)
        return (torch.allclose(run(a + b), sa + sb, rtol=1e-5, atol=1e-5)
                and torch.allclose(run(2.5 * a), 2.5 * sa, rtol=1e-5, atol=1e-5))

    def _block_params(self, j: int) -> dict[str, Tensor]:
        return {f"block.{n}": v for n, v in self.op_params[j].items()}

    def _after_add(self, block: _Residual, h: Tensor, channel: Tensor | None,
                   shortcut_change: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """State after the add and ``after_add``, given the branch output's state and the shortcut's difference
        (``None``: the shortcut is unchanged)."""
        pre = block.pre
        if channel is not None and shortcut_change is None:  # the add keeps a one-channel change in its channel
            if block.after_add is None:
                return h, channel
            if _is_channelwise(block.after_add):
                out = self._after_add_base(block, pre)
                return self._channel_difference(block.after_add, block.after_add_params, pre, out, h, channel), channel
        d = self._to_difference(block.branch.acts[-1], h, channel)
        if shortcut_change is not None:
            d = d + shortcut_change
        if block.after_add is None:
            return d, None
        out = self._after_add_base(block, pre)
        if isinstance(block.after_add, nn.ReLU):
            return relu_difference(*self._relu_base(pre), d), None
        if isinstance(block.after_add, _ELEMENTWISE):
            return self._flat(lambda flat: functional_call(block.after_add, block.after_add_params, (flat,)),
                              pre + d) - out, None
        after_add, params = block.after_add, block.after_add_params
        return vmap(lambda v: functional_call(after_add, params, (v,)), randomness="same")(pre + d) - out, None

    def _residual_difference(self, t: int, d: Tensor) -> Tensor:
        """Difference of residual op ``t``'s output for input differences ``d``: the branch carries ``d``, the
        shortcut runs on the changed input (batched by vmap)."""
        block = self._residuals[t]
        h = self._run_differences(block.branch, 0, d)
        h, _ = self._after_add(block, h, None, self._shortcut_difference(t, d))
        return h

    def _shortcut_difference(self, t: int, d: Tensor) -> Tensor:
        """Change of residual op ``t``'s shortcut for input changes ``d``, batched by vmap: on ``d`` alone when the
        shortcut is linear, else ``shortcut(x + d) - shortcut(x)``."""
        block = self._residuals[t]
        shortcut, params = _Method(self.ops[t], "shortcut"), self._block_params(t)
        run = vmap(lambda v: functional_call(shortcut, params, (v,)), randomness="same")
        if block.identity_shortcut:
            return d
        return run(d) if block.linear_shortcut else run(self.acts[t] + d) - block.shortcut

    def _residual_input_change(self, t: int, z: Tensor, channel: Tensor) -> tuple[Tensor, None]:
        """Output state of residual op ``t`` when channel ``channel[i]`` of its input is ``z[i]``: the branch starts
        with a one-channel change, the shortcut runs on the whole changed input."""
        block = self._residuals[t]
        h, c = self._advance(block.branch, 0, z, channel)
        return self._after_add(block, h, c, self._shortcut_difference(t, self._to_difference(self.acts[t], z, channel)))

    def _column(self, op: nn.Module, x: Tensor, local: str, index: Tensor,
                out_shape: torch.Size) -> tuple[Tensor, Tensor]:
        """Output channel of each coordinate and the change per unit delta: ``(k,)``, ``(k, B, *spatial)``."""
        k, b = index.numel(), x.shape[0]
        if local == "bias":
            return index, x.new_ones((k, b, *out_shape[2:]))
        if isinstance(op, nn.Linear):
            fan_in = op.in_features
            return index // fan_in, x[:, index % fan_in].transpose(0, 1)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = op.kernel_size, op.stride, op.padding, op.dilation
        if id(op) not in self._padded:  # the column of weight (o, c, a, b) is a strided window of padded channel c
            self._padded[id(op)] = F.pad(x, (pw, pw, ph, ph))
        rem = index % (op.in_channels * kh * kw)
        c, a, bw = rem // (kh * kw), rem % (kh * kw) // kw, rem % kw
        ho, wo = out_shape[2], out_shape[3]
        rows = (a * dh).unsqueeze(1) + sh * torch.arange(ho, device=index.device)  # (k, ho)
        cols = (bw * dw).unsqueeze(1) + sw * torch.arange(wo, device=index.device)  # (k, wo)
        window = self._padded[id(op)][:, c[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, k, ho, wo)
        return index // (op.in_channels * kh * kw), window.transpose(0, 1).contiguous()

    def _channelwise(self, op: nn.Module, p: Mapping[str, Tensor], z: Tensor, channel: Tensor) -> Tensor:
        """Apply channel-wise ``op`` to one channel per query: ``z`` is ``(k, B, *spatial)``, channel ``channel[i]``.

        A BatchNorm is only normalized (per query in train mode), without its affine part.
        """
        if isinstance(op, _NORMS):
            dims = tuple(range(1, z.dim()))
            shape = (-1, *([1] * (z.dim() - 1)))
            if op.training or op.running_mean is None:
                # two passes: as exact as var_mean and many times faster on CPU for these small per-query blocks
                centered = z - z.mean(dims, keepdim=True)
                return centered * torch.rsqrt((centered * centered).mean(dims, keepdim=True) + op.eps)
            mean, var = op.running_mean[channel].view(shape), op.running_var[channel].view(shape)
            return (z - mean) * torch.rsqrt(var + op.eps)
        if _is_tiling_max_pool(op) and z.dim() == 4:
            return _tiling_max(op, z)
        if isinstance(op, _POOLS):
            k, b = z.shape[:2]
            out = op(z.reshape(k * b, 1, *z.shape[2:]))
            return out.reshape(k, b, *out.shape[2:])
        return op(z)

    def _channel_difference(self, op: nn.Module, p: Mapping[str, Tensor], x: Tensor, y: Tensor, d: Tensor,
                            channel: Tensor) -> Tensor:
        """Change of channel-wise ``op``'s output (cached input ``x``, output ``y``) in channel ``channel[i]`` when
        that channel of its input changes by ``d[i]`` ``(k, B, *spatial)``; as :func:`batch_norm_difference` and
        :func:`relu_difference`, from the change itself where the op allows it."""
        if isinstance(op, _NORMS):
            shape = (-1, *([1] * (d.dim() - 1)))
            w = p["weight"][channel].view(shape) if "weight" in p else 1.0
            if not _is_train_norm(op):
                return d * (w * torch.rsqrt(op.running_var[channel].view(shape) + op.eps))
            dims = tuple(range(1, d.dim()))
            centered, var_eps = self._channel_stats(x, op.eps)
            xc, var_eps = self._channels(centered, channel), var_eps[channel].view(shape)
            scale = w * torch.rsqrt(var_eps)
            dc = d - d.mean(dims, keepdim=True)
            dv = 2 * (xc * dc).mean(dims, keepdim=True) + (dc * dc).mean(dims, keepdim=True)
            ds = scale * torch.expm1(-0.5 * torch.log1p(dv / var_eps))
            return torch.addcmul(xc * ds, dc, scale + ds)
        if isinstance(op, nn.ReLU):
            neg_part, neg_out = self._relu_base(x)
            return relu_difference(self._channels(neg_part, channel), self._channels(neg_out, channel), d)
        return self._channelwise(op, p, self._channels(x, channel) + d, channel) - self._channels(y, channel)

    def _channel_stats(self, x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """``x`` centered per channel and its per-channel variance plus ``eps`` ``(C,)``, for a cached ``x``."""
        cached = self._stats.get(id(x))
        if cached is None or cached[0] is not x:
            dims = (0, *range(2, x.dim()))
            centered = x - x.mean(dims, keepdim=True)
            cached = self._stats[id(x)] = (x, centered, (centered * centered).mean(dims) + eps)
        return cached[1], cached[2]

    def _relu_base(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(min(x, 0), -relu(x))`` for a cached activation ``x`` (computed once)."""
        cached = self._relu_bases.get(id(x))
        if cached is None or cached[0] is not x:
            cached = self._relu_bases[id(x)] = (x, x.clamp(max=0), -x.clamp(min=0))
        return cached[1], cached[2]

    def _after_add_base(self, block: _Residual, pre: Tensor) -> Tensor:
        if block.out is None:
            block.out = functional_call(block.after_add, block.after_add_params, (pre,))
        return block.out

    def _one_channel_mix(self, op: nn.Module, p: Mapping[str, Tensor], d: Tensor, channel: Tensor,
                         out_shape: torch.Size) -> Tensor:
        """Change of mixing ``op``'s output (``out_shape``, one query) when input channel ``channel[i]`` changes by
        ``d[i]`` (bias excluded)."""
        # always fp32: a one-input-channel mix is cheap, and in bf16 its rounding dominated the error of the estimate
        w = p["weight"]
        k = d.shape[0]
        if isinstance(op, nn.Linear):
            return d.unsqueeze(-1) * w[:, channel].transpose(0, 1).unsqueeze(1)  # (k, B, out)
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

    def _first_layer_path(self, j: int, prefix: str, local: str, index: Tensor, delta: float) -> Tensor:
        """Output ``(k, B, ...)`` of a block exposing ``first_layer``/``forward_after_first`` when a coordinate of
        its first layer moves: the change is added to the cached first-layer output."""
        op = self.ops[j]
        first = op.get_submodule(prefix)
        first_params = {n[len(prefix) + 1 :]: v for n, v in self.op_params[j].items() if n.startswith(prefix + ".")}
        if j not in self._first_pre:
            self._first_pre[j] = functional_call(first, first_params, (self.acts[j],))
        pre_base = self._first_pre[j]
        channel, col = self._column(first, self.acts[j], local[len(prefix) + 1 :], index, pre_base.shape)
        pre = _materialize(pre_base, self._channels(pre_base, channel) + delta * col, channel)
        after_first, params = _Method(op, "forward_after_first"), self._block_params(j)
        return vmap(lambda one: functional_call(after_first, params, (self.acts[j], one)), randomness="same")(pre)
