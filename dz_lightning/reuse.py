"""Feature reuse and batched, structure-aware coordinate queries for staged models.

A staged model is an ordered list of modules whose composition is its forward (an ``nn.Sequential``, or any
model with a ``stages()`` method). Nested ``nn.Sequential`` stages are flattened into a list of *ops*. One base
forward caches every op's input; a perturbation of a parameter of op ``j`` restarts the forward at op ``j``, and
many perturbations run as one batched computation: ``k`` queries form one flat batch of ``k * B`` examples, and
train-mode BatchNorm layers are temporarily given a forward that normalizes each query with its own statistics.

Beyond batching, the structure of CGE is exploited:

* A coordinate of a Conv2d/Linear weight (or bias) changes the layer output by ``delta`` times one column of the
  unfolded input, in one output channel only: it is added to the cached output, no convolution is recomputed.
* Channel-wise ops that follow (BatchNorm, activations, pooling) keep the change inside that channel, so they
  run on one channel per query.
* The next channel-mixing layer then sees a one-channel change: its output is the cached output plus a
  one-input-channel convolution (a grouped convolution over the batch of queries).
* A block exposing ``first_layer`` and ``forward_after_first(x, pre)`` (e.g. a ResNet basic block) gets the
  first trick for its first convolution.

Every shortcut gives the same finite differences as the plain one-query-at-a-time loop, to float tolerance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dz_lightning.oracle import query_mode

__all__ = ["StagedForward", "flatten_ops", "get_stages"]

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Identity
)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_CPU_CACHE_BYTES = 4 << 20


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
    return isinstance(op, nn.Conv2d) and op.groups == 1 and op.padding_mode == "zeros"


def _is_channelwise(op: nn.Module) -> bool:
    if isinstance(op, _POOLS):
        return not getattr(op, "return_indices", False)
    return isinstance(op, _ELEMENTWISE + _NORMS)


def _group_batch_norm(bn: nn.modules.batchnorm._BatchNorm, groups: int) -> Callable[[Tensor], Tensor]:
    """A forward for ``bn`` on a batch of ``groups`` stacked queries: statistics per query, as each alone."""

    def forward(x: Tensor) -> Tensor:
        g = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        dims = (1, *range(3, g.dim()))
        var, mean = torch.var_mean(g, dims, unbiased=False, keepdim=True)
        scale = torch.rsqrt(var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight.view(1, 1, -1, *([1] * (g.dim() - 3)))
        shift = -mean * scale
        if bn.affine:
            shift = shift + bn.bias.view(1, 1, -1, *([1] * (g.dim() - 3)))
        return torch.addcmul(shift, g, scale).reshape(x.shape)

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


class _AfterFirst(nn.Module):
    """Calls ``block.forward_after_first(x, pre)`` so that it can go through ``functional_call``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, pre: Tensor) -> Tensor:
        return self.block.forward_after_first(x, pre)


class StagedForward:
    """Cached base forward of a staged model and batched one-coordinate perturbations of it.

    Args:
        model: a staged model (see :func:`get_stages`).
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``.
        inputs: batch inputs ``(B, ...)``.
        targets: batch targets.
        params: name (as in ``model.named_parameters()``) -> value to use; missing names use the model's own.
        max_batch: most queries per batched call; ``None`` derives it from ``memory_budget``.
        memory_budget: bytes the batched queries may use; ``None``: a quarter of free CUDA memory, 1 GiB on CPU.

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
        self._unfolded: dict[int, Tensor] = {}
        with query_mode(model, inputs.device):
            self.acts = [inputs]
            for j, op in enumerate(self.ops):
                self.acts.append(functional_call(op, self.op_params[j], (self.acts[-1],)))
            self._base = loss_fn(self.acts[-1], targets).reshape(())
        sizes = [a.numel() * a.element_size() for a in self.acts]
        # largest activation of one query from op j to the end: what a chunk of queries restarting at j allocates
        self._bytes_from = [max(sizes[j:]) for j in range(len(self.ops))]

    # ------------------------------------------------------------------------------------------ public API
    def base_loss(self) -> Tensor:
        """Loss at the unperturbed parameters, a 0-d tensor."""
        return self._base

    def coordinate_losses(self, name: str, index: Tensor, delta: float) -> Tensor:
        """Losses with ``params[name].view(-1)[index[i]] += delta``, each ``i`` separately: shape ``(n,)``."""
        if name not in self.where:
            raise ValueError(f"Unknown parameter {name!r}; valid names: {sorted(self.where)}.")
        index = index.reshape(-1).to(device=self.inputs.device, dtype=torch.long)
        chunk = self._chunk(index.numel(), self._full_restart(*self.where[name]))
        out = []
        with query_mode(self.model, self.inputs.device):
            for start in range(0, index.numel(), chunk):
                out.append(self._chunk_losses(name, index[start : start + chunk], delta))
        return torch.cat(out) if out else self._base.new_zeros(0)

    # ------------------------------------------------------------------------------------------ internals
    def _chunk(self, n: int, start: int = 0) -> int:
        """Queries per batched call for a restart at op ``start``.

        On CUDA: as many as ``memory_budget`` allows. On CPU a flat batch whose activations outgrow the cache runs
        slower per example than separate small batches, so queries are batched only while one activation of the
        whole chunk stays within ``_CPU_CACHE_BYTES``.
        """
        if self.max_batch is not None:
            return max(1, min(n, self.max_batch))
        per_query = 4 * self._bytes_from[start]
        budget = self.memory_budget
        if budget is None:
            budget = torch.cuda.mem_get_info(self.inputs.device)[0] // 4 if self.inputs.is_cuda else 1 << 30
        k = int(budget // per_query)
        if not self.inputs.is_cuda:
            k = min(k, int(_CPU_CACHE_BYTES // self._bytes_from[start]))
        return max(1, min(n, k))

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
        op = self.ops[j]
        if _is_mixing(op) and local in ("weight", "bias") and (isinstance(op, nn.Conv2d) or self.acts[j].dim() == 2):
            return self._mixing_path(j, local, index, delta)
        if isinstance(op, _NORMS) and local in ("weight", "bias") and self.acts[j].dim() in (2, 4):
            z = self._channelwise(j, self.acts[j].transpose(0, 1)[index], index, perturb=(local, delta))
            return self._channel_local(j + 1, z, index)
        first = getattr(op, "first_layer", None)
        if isinstance(first, nn.Conv2d) and _is_mixing(first) and hasattr(op, "forward_after_first"):
            prefix = next(n for n, m in op.named_modules() if m is first)
            if local in (f"{prefix}.weight", f"{prefix}.bias"):
                return self._first_layer_path(j, prefix, local, index, delta)
        return self._generic_path(j, local, index, delta)

    def _rest(self, start: int, h: Tensor) -> Tensor:
        """Losses ``(k,)`` of ``k`` queries whose activations at the input of op ``start`` are ``h`` ``(k, B, ...)``.

        The queries run as one flat batch of ``k * B`` examples; train-mode BatchNorm keeps per-query statistics.
        """
        k = h.shape[0]
        flat = h.reshape(k * h.shape[1], *h.shape[2:])
        with _grouped_batch_norm(self.model, k):
            for t in range(start, len(self.ops)):
                flat = functional_call(self.ops[t], self.op_params[t], (flat,))
        out = flat.reshape(k, -1, *flat.shape[1:])
        return torch.stack([self.loss_fn(out[i], self.targets).reshape(()) for i in range(k)])

    def _generic_path(self, j: int, local: str, index: Tensor, delta: float) -> Tensor:
        base = self.op_params[j][local]
        k = index.numel()
        stacked = base.detach().reshape(1, -1).repeat(k, 1)
        stacked[torch.arange(k, device=stacked.device), index] += delta
        stacked = stacked.reshape(k, *base.shape)
        h = torch.stack([functional_call(self.ops[j], {**self.op_params[j], local: w}, (self.acts[j],))
                         for w in stacked])
        return self._rest(j + 1, h)

    def _column(self, op: nn.Module, x: Tensor, j: int, local: str, index: Tensor,
                out_shape: torch.Size) -> tuple[Tensor, Tensor]:
        """Output channel of each coordinate and the change per unit delta: ``(k,)``, ``(k, B, *spatial)``."""
        k, b = index.numel(), x.shape[0]
        if local == "bias":
            return index, x.new_ones((k, b, *out_shape[2:]))
        if isinstance(op, nn.Linear):
            fan_in = op.in_features
            return index // fan_in, x[:, index % fan_in].transpose(0, 1)
        fan_in = op.in_channels * op.kernel_size[0] * op.kernel_size[1]
        if j not in self._unfolded:
            self._unfolded[j] = F.unfold(x, op.kernel_size, op.dilation, op.padding, op.stride)
        cols = self._unfolded[j][:, index % fan_in, :]  # (B, k, L)
        return index // fan_in, cols.transpose(0, 1).reshape(k, b, *out_shape[2:])

    def _mixing_path(self, j: int, local: str, index: Tensor, delta: float) -> Tensor:
        op = self.ops[j]
        channel, col = self._column(op, self.acts[j], j, local, index, self.acts[j + 1].shape)
        # the perturbed output channel of each query, then channel-wise ops on that channel only
        z = self.acts[j + 1].transpose(0, 1)[channel] + delta * col  # (k, B, *spatial)
        return self._channel_local(j + 1, z, channel)

    def _channel_local(self, t: int, z: Tensor, channel: Tensor) -> Tensor:
        """Continue queries whose only change at the input of op ``t`` is channel ``channel[i]``, now ``z[i]``."""
        k = z.shape[0]
        ar = torch.arange(k, device=z.device)
        while t < len(self.ops) and _is_channelwise(self.ops[t]) and self.acts[t].dim() in (2, 4):
            z = self._channelwise(t, z, channel)
            t += 1
        if t < len(self.ops) and _is_mixing(self.ops[t]) and self.acts[t].dim() == (
                2 if isinstance(self.ops[t], nn.Linear) else 4):
            d = z - self.acts[t].transpose(0, 1)[channel]
            pre = self.acts[t + 1].unsqueeze(0) + self._one_channel_mix(t, d, channel)
            return self._rest(t + 1, pre)
        h = self.acts[t].unsqueeze(0).repeat(k, *([1] * self.acts[t].dim()))
        h[ar, :, channel] = z
        return self._rest(t, h)

    def _channelwise(self, t: int, z: Tensor, channel: Tensor, perturb: tuple[str, float] | None = None) -> Tensor:
        """Apply op ``t`` to one channel per query: ``z`` is ``(k, B, *spatial)``, channel ``channel[i]``.

        ``perturb=(name, delta)`` adds ``delta`` to entry ``channel[i]`` of op ``t``'s parameter ``name`` for query i.
        """
        op, p = self.ops[t], self.op_params[t]
        if isinstance(op, _NORMS):
            dims = tuple(range(1, z.dim()))
            shape = (-1, *([1] * (z.dim() - 1)))
            if op.training or op.running_mean is None:
                mean = z.mean(dims, keepdim=True)
                var = z.var(dims, unbiased=False, keepdim=True)
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
        if isinstance(op, _POOLS):
            k, b = z.shape[:2]
            out = op(z.reshape(k * b, 1, *z.shape[2:]))
            return out.reshape(k, b, *out.shape[2:])
        return op(z)

    def _one_channel_mix(self, t: int, d: Tensor, channel: Tensor) -> Tensor:
        """Change of op ``t``'s output when input channel ``channel[i]`` changes by ``d[i]`` (bias excluded)."""
        op, w = self.ops[t], self.op_params[t]["weight"]
        k = d.shape[0]
        if isinstance(op, nn.Linear):
            return d.unsqueeze(-1) * w[:, channel].transpose(0, 1).unsqueeze(1)  # (k, B, out)
        kernels = w[:, channel].transpose(0, 1).reshape(k * op.out_channels, 1, *op.kernel_size)
        out = F.conv2d(d.transpose(0, 1), kernels, None, op.stride, op.padding, op.dilation, groups=k)
        b = d.shape[1]
        return out.reshape(b, k, op.out_channels, *out.shape[2:]).transpose(0, 1)

    def _first_layer_path(self, j: int, prefix: str, local: str, index: Tensor, delta: float) -> Tensor:
        op = self.ops[j]
        first = op.get_submodule(prefix)
        first_params = {n[len(prefix) + 1 :]: v for n, v in self.op_params[j].items() if n.startswith(prefix + ".")}
        if j not in self._first_pre:
            self._first_pre[j] = functional_call(first, first_params, (self.acts[j],))
        pre_base = self._first_pre[j]
        channel, col = self._column(first, self.acts[j], -1 - j, local[len(prefix) + 1 :], index, pre_base.shape)
        k = index.numel()
        pre = pre_base.unsqueeze(0).repeat(k, *([1] * pre_base.dim()))
        ar = torch.arange(k, device=index.device)
        pre[ar, :, channel] += delta * col
        wrapper = _AfterFirst(op)
        wparams = {f"block.{n}": v for n, v in self.op_params[j].items()}
        x = self.acts[j].unsqueeze(0).expand(k, *self.acts[j].shape).reshape(k * self.acts[j].shape[0],
                                                                               *self.acts[j].shape[1:])
        with _grouped_batch_norm(self.model, k):
            h = functional_call(wrapper, wparams, (x, pre.reshape(x.shape[0], *pre.shape[2:])))
        return self._rest(j + 1, h.reshape(k, -1, *h.shape[1:]))
