"""Feature reuse and batched, structure-aware coordinate queries for staged models.

A staged model is an ordered list of modules whose composition is its forward (an ``nn.Sequential``, or any
model with a ``stages()`` method). Nested ``nn.Sequential`` stages are flattened into a list of *ops*. One base
forward caches every op's input; a perturbation of a parameter of op ``j`` restarts the forward at op ``j``, and
many perturbations run as one batched computation: ``k`` queries form one flat batch of ``k * B`` examples, and
train-mode BatchNorm layers are temporarily given a forward that normalizes each query with its own statistics.

Beyond batching, the structure of CGE is exploited:

* A coordinate of a Conv2d/Linear weight (or bias) changes the layer output by ``delta`` times one column of the
  unfolded input (a strided window of one padded input channel), in one output channel only: it is added to the
  cached output, no convolution is recomputed.
* Channel-wise ops that follow (BatchNorm, activations, pooling) keep the change inside that channel, so they
  run on one channel per query.
* The next channel-mixing layer then sees a one-channel change: its output is the cached output plus a
  one-input-channel convolution (one batched matmul over the kernel taps for all queries of a chunk).
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

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dz_lightning import query
from dz_lightning.query import query_mode

__all__ = ["StagedForward", "flatten_ops", "get_stages", "residual_parts"]

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Identity
)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_CPU_CACHE_BYTES = 2 << 20


def get_stages(model: nn.Module) -> list[nn.Module] | None:
    """The ordered stages of ``model``: an ``nn.Sequential``'s children, ``model.stages()``, else ``None``."""
    if isinstance(model, nn.Sequential):
        return list(model.children())
    stages = getattr(model, "stages", None)
    if callable(stages):
        return list(stages())
    return None


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


def _group_batch_norm(bn: nn.modules.batchnorm._BatchNorm, groups: int) -> Callable[[Tensor], Tensor]:
    """A forward for ``bn`` on a batch of ``groups`` stacked queries: statistics per query, as each alone.

    One native batch-norm call per query: many times faster on CPU than one reduction over a reshaped batch.
    """

    def forward(x: Tensor) -> Tensor:
        return torch.cat([F.batch_norm(part, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
                          for part in x.chunk(groups)])

    return forward


@contextlib.contextmanager
def _grouped_batch_norm(model: nn.Module, groups: int) -> Iterator[None]:
    """Within the context, train-mode BatchNorm layers normalize each of ``groups`` stacked queries separately."""
    patched = []
    if groups > 1:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
                m.forward = _group_batch_norm(m, groups)  # instance attribute shadows the class method
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _delta_if(perturb: tuple[str, float], name: str) -> float:
    """The perturbation ``perturb = (param_name, delta)`` applied to ``name``: ``delta`` or 0."""
    return perturb[1] if perturb[0] == name else 0.0


def _on_queries(model: nn.Module, fn: Callable[..., Tensor], *hs: Tensor) -> Tensor:
    """``fn`` applied to per-query tensors ``(k, B, ...)`` as one flat batch of ``k * B`` examples, reshaped back.

    Train-mode BatchNorm inside keeps per-query statistics.
    """
    k = hs[0].shape[0]
    with _grouped_batch_norm(model, k):
        out = fn(*(h.reshape(k * h.shape[1], *h.shape[2:]) for h in hs))
    return out.reshape(k, -1, *out.shape[1:])


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

    Attributes:
        chunk_sizes: most queries per batched call for a restart at each op, fixed at construction (from
            ``max_batch``, or the memory budget and the model's activation sizes): the same every step.

    Raises:
        ValueError: the model is not staged, or a parameter belongs to no stage.
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
    ) -> None:
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
        self._residuals: dict[int, _Residual | None] = {}
        self._channel_major: dict[int, tuple[Tensor, Tensor]] = {}
        # channels-last convolutions and BatchNorm run several times faster than NCHW on CPU
        self._layout = torch.channels_last if not inputs.is_cuda else torch.contiguous_format
        with query_mode(model, inputs.device):
            self.acts = [inputs]
            for j, op in enumerate(self.ops):
                if self.acts[-1].dim() == 4:
                    self.acts[-1] = self.acts[-1].contiguous(memory_format=self._layout)
                self.acts.append(functional_call(op, self.op_params[j], (self.acts[-1],)))
            self._base = loss_fn(self.acts[-1], targets).reshape(())
        self._top = _Chain(self.ops, self.op_params, self.acts, top=True)
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
        if channel is not None:
            h = _materialize(self.acts[-1], h, channel)
        return torch.stack([self.loss_fn(h[i], self.targets).reshape(()) for i in range(h.shape[0])])

    # A query state at the input of op t of a chain is ``(h, channel)``: with ``channel`` None, ``h`` holds whole
    # activations ``(k, B, ...)``; otherwise only channel ``channel[i]`` of query i differs from the cache, and
    # ``h`` ``(k, B, *spatial)`` holds that channel.

    def _perturb(self, chain: _Chain, j: int, local: str, index: Tensor, delta: float) -> tuple[Tensor, Tensor | None]:
        """State at the input of op ``j + 1`` when entry ``index[i]`` of op ``j``'s ``local`` moves by ``delta``."""
        op, x = chain.ops[j], chain.acts[j]
        if local in ("weight", "bias"):
            if _is_mixing(op) and (isinstance(op, nn.Conv2d) or x.dim() == 2):
                # a weight coordinate adds delta times one input column to one output channel
                channel, col = self._column(op, x, local, index, chain.acts[j + 1].shape)
                return self._channels(chain.acts[j + 1], channel) + delta * col, channel
            if isinstance(op, _NORMS) and x.dim() in (2, 4):
                z = self._channelwise(op, chain.params[j], self._channels(x, index), index, perturb=(local, delta))
                return z, index
        if chain.top:
            block = self._residual(j)
            if block is not None and local in block.where:
                i, branch_local = block.where[local]
                h, channel = self._perturb(block.branch, i, branch_local, index, delta)
                h, channel = self._advance(block.branch, i + 1, h, channel)
                return self._after_add(block, h, channel, block.shortcut)
            first = getattr(op, "first_layer", None)
            if isinstance(first, nn.Conv2d) and _is_mixing(first) and hasattr(op, "forward_after_first"):
                prefix = next(n for n, m in op.named_modules() if m is first)
                if local in (f"{prefix}.weight", f"{prefix}.bias"):
                    return self._first_layer_path(j, prefix, local, index, delta), None
        base = chain.params[j][local]
        k = index.numel()
        stacked = base.detach().reshape(1, -1).repeat(k, 1)
        stacked[torch.arange(k, device=stacked.device), index] += delta
        stacked = stacked.reshape(k, *base.shape)
        return torch.stack([functional_call(op, {**chain.params[j], local: w}, (x,)) for w in stacked]), None

    def _advance(self, chain: _Chain, t: int, h: Tensor, channel: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Run a state from the input of op ``t`` to the end of ``chain``, keeping a one-channel change local."""
        n = len(chain.ops)
        while t < n and channel is not None:
            op, x = chain.ops[t], chain.acts[t]
            if _is_channelwise(op) and x.dim() in (2, 4):
                h = self._channelwise(op, chain.params[t], h, channel)
            elif _is_mixing(op) and x.dim() == (2 if isinstance(op, nn.Linear) else 4):
                # the next mixing layer sees a one-channel change: cached output plus a one-input-channel conv
                d = h - self._channels(x, channel)
                out = chain.acts[t + 1]
                h = out.unsqueeze(0) + self._one_channel_mix(op, chain.params[t], d, channel, out.shape)
                channel = None
            elif chain.top and x.dim() == 4 and self._residual(t) is not None:
                h, channel = self._residual_input_change(t, h, channel)
            else:
                h, channel = _materialize(x, h, channel), None
                break
            t += 1
        if channel is None and t < n:
            h = _on_queries(self.model, lambda flat: self._run_ops(chain, t, flat), h)
        return h, channel

    def _run_ops(self, chain: _Chain, t: int, flat: Tensor) -> Tensor:
        """Ops ``t`` to the end of ``chain`` on a flat batch of queries."""
        for s in range(t, len(chain.ops)):
            if flat.dim() == 4:
                flat = flat.contiguous(memory_format=self._layout)
            if _is_tiling_max_pool(chain.ops[s]) and flat.dim() == 4:
                flat = _tiling_max(chain.ops[s], flat)
            else:
                flat = functional_call(chain.ops[s], chain.params[s], (flat,))
        return flat

    def _channels(self, x: Tensor, channel: Tensor) -> Tensor:
        """``x[:, channel[i]]`` for each i, ``(k, B, ...)``, gathered from a cached contiguous channel-major copy."""
        cached = self._channel_major.get(id(x))
        if cached is None or cached[0] is not x:
            cached = self._channel_major[id(x)] = (x, x.transpose(0, 1).contiguous())
        return cached[1][channel]

    def _residual(self, j: int) -> _Residual | None:
        """The residual structure of op ``j`` (cached), ``None`` when it does not expose the protocol."""
        if j in self._residuals:
            return self._residuals[j]
        block, parts = self.ops[j], residual_parts(self.ops[j])
        if parts is None:
            self._residuals[j] = None
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
        self._residuals[j] = _Residual(_Chain(ops, params, acts, top=False), where, shortcut, after_add, after_params)
        return self._residuals[j]

    def _block_params(self, j: int) -> dict[str, Tensor]:
        return {f"block.{n}": v for n, v in self.op_params[j].items()}

    def _after_add(self, block: _Residual, h: Tensor, channel: Tensor | None,
                   shortcut: Tensor) -> tuple[Tensor, Tensor | None]:
        """Add the shortcut (cached ``(B, ...)`` or per query ``(k, B, ...)``) to a branch output and apply
        ``after_add``."""
        if channel is not None:
            z = h + self._channels(shortcut, channel)
            if block.after_add is None:
                return z, channel
            if _is_channelwise(block.after_add):
                return self._channelwise(block.after_add, block.after_add_params, z, channel), channel
            h, channel = _materialize(block.branch.acts[-1] + shortcut, z, channel), None
        else:
            h = h + shortcut
        if block.after_add is not None:
            after_add, params = block.after_add, block.after_add_params
            h = _on_queries(self.model, lambda flat: functional_call(after_add, params, (flat,)), h)
        return h, None

    def _residual_input_change(self, t: int, z: Tensor, channel: Tensor) -> tuple[Tensor, None]:
        """Output of residual op ``t`` when channel ``channel[i]`` of its input is ``z[i]``: the branch starts with
        a one-channel change, the shortcut runs on the whole changed input."""
        block = self._residuals[t]
        h, c = self._advance(block.branch, 0, z, channel)
        if c is not None:
            h = _materialize(block.branch.acts[-1], h, c)
        shortcut = _Method(self.ops[t], "shortcut")
        params = self._block_params(t)
        sc = _on_queries(self.model, lambda flat: functional_call(shortcut, params, (flat,)),
                         _materialize(self.acts[t], z, channel))
        h, _ = self._after_add(block, h, None, sc)
        return h, None

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

    def _channelwise(self, op: nn.Module, p: Mapping[str, Tensor], z: Tensor, channel: Tensor,
                     perturb: tuple[str, float] | None = None) -> Tensor:
        """Apply channel-wise ``op`` to one channel per query: ``z`` is ``(k, B, *spatial)``, channel ``channel[i]``.

        ``perturb=(name, delta)`` adds ``delta`` to entry ``channel[i]`` of op's parameter ``name`` for query i.
        """
        if isinstance(op, _NORMS):
            dims = tuple(range(1, z.dim()))
            shape = (-1, *([1] * (z.dim() - 1)))
            if op.training or op.running_mean is None:
                # two passes: as exact as var_mean and many times faster on CPU for these small per-query blocks
                centered = z - z.mean(dims, keepdim=True)
                z = centered * torch.rsqrt((centered * centered).mean(dims, keepdim=True) + op.eps)
            else:
                mean, var = op.running_mean[channel].view(shape), op.running_var[channel].view(shape)
                z = (z - mean) * torch.rsqrt(var + op.eps)
            if op.affine:
                weight, bias = p["weight"][channel], p["bias"][channel]
                if perturb is not None:
                    weight = weight + _delta_if(perturb, "weight")
                    bias = bias + _delta_if(perturb, "bias")
                z = z * weight.view(shape) + bias.view(shape)
            return z
        if _is_tiling_max_pool(op) and z.dim() == 4:
            return _tiling_max(op, z)
        if isinstance(op, _POOLS):
            k, b = z.shape[:2]
            out = op(z.reshape(k * b, 1, *z.shape[2:]))
            return out.reshape(k, b, *out.shape[2:])
        return op(z)

    def _one_channel_mix(self, op: nn.Module, p: Mapping[str, Tensor], d: Tensor, channel: Tensor,
                         out_shape: torch.Size) -> Tensor:
        """Change of mixing ``op``'s output (``out_shape``, one query) when input channel ``channel[i]`` changes by
        ``d[i]`` (bias excluded)."""
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
        x = self.acts[j].unsqueeze(0).expand(index.numel(), *self.acts[j].shape)
        after_first, params = _Method(op, "forward_after_first"), self._block_params(j)
        return _on_queries(self.model, lambda xs, pres: functional_call(after_first, params, (xs, pres)), x, pre)
