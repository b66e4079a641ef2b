"""The propagation engine: a cached base forward over the graph IR and batched one-coordinate perturbations.

One base forward caches every node's value (:mod:`dz_lightning.reuse.graph`). For each parameter a *plan* is compiled
once, when the engine is built: the nodes downstream of the nodes that read the parameter, in topological order,
each with the rule (:mod:`dz_lightning.reuse.rules`) that gives its change from its inputs' changes. A chunk of ``k``
queries then runs every step of the plan once for the whole chunk: the number of ops does not grow with ``k``, no
per-query Python calls, no host syncs, no patching of the user's modules. The loss of a chunk is one call on the
cached outputs plus each query's difference, taken in float64 (:func:`dz_lightning.query.float64_loss`).

On CPU the activations are kept channels-last (several times faster convolutions and BatchNorm) and queries are
batched only while one chunk's activation stays small: larger flat batches run slower per example there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

import dz_lightning.reuse.check as check
import dz_lightning.reuse.ops as ops
import dz_lightning.reuse.rules as rules
from dz_lightning import query
from dz_lightning.oracle_base import coordinate_points
from dz_lightning.query import query_mode
from dz_lightning.reuse.differences import cross_entropy_rows, per_example_loss
from dz_lightning.reuse.graph import Graph
from dz_lightning.reuse.plan import Plan, compile_plan, output_change
from dz_lightning.reuse.protocol import verify
from dz_lightning.reuse.selection import is_tensors

__all__ = ["GraphEngine"]

_CPU_CACHE_BYTES = 2 << 20


class GraphEngine:
    """Cached base forward of a model's graph and batched one-coordinate perturbations of it.

    Args:
        graph: the model's IR (:func:`dz_lightning.reuse.graph.trace` or
            :func:`dz_lightning.reuse.protocol.from_stages`).
        model: the model (its parameters and buffers; BatchNorm statistics are never updated).
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``.
        inputs: batch inputs ``(B, ...)``.
        targets: batch targets.
        params: name (as in ``model.named_parameters()``) -> value to use; missing names use the model's own.
        max_batch: most queries per batched call; ``None`` derives it from ``memory_budget``.
        memory_budget: bytes the batched queries may use; ``None``: :func:`~dz_lightning.query.memory_budget`.
        delta_dtype: arithmetic of the linear ops on the differences: ``"float32"`` (default), ``"bfloat16"``
            (faster where the hardware has it; error relative to the differences, about 1e-2 of the gradient's RMS on
            resnet20), ``"tf32"`` (CUDA only) or ``"auto"`` (bf16 where the device computes it natively, else fp32:
            :func:`~dz_lightning.query.check_delta_dtype`). The base forward and nonlinear ops always run in fp32.

    Attributes:
        nodes: the graph's nodes.
        plans: parameter name -> its :class:`~dz_lightning.reuse.plan.Plan` (the nodes a perturbation changes, with
            their rules), compiled at construction.
        chunk_sizes: parameter name -> most queries per batched call of :meth:`coordinate_losses`, fixed at
            construction (from ``max_batch``, or the memory budget and the plan's activation sizes): the same every
            step.

    Raises:
        ValueError: ``delta_dtype`` is not valid, or a residual protocol disagrees with the block's forward.
        UnsupportedGraphError: a node downstream of a parameter returns something other than a tensor or a size.
    """

    def __init__(
        self,
        graph: Graph,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inputs: Tensor,
        targets: Tensor,
        params: Mapping[str, Tensor] | None = None,
        *,
        max_batch: int | None = None,
        memory_budget: int | None = None,
        delta_dtype: str | torch.dtype = "float32",
    ) -> None:
        delta_name = query.check_delta_dtype(delta_dtype, inputs)
        self.graph, self.nodes = graph, graph.nodes
        self.model, self.loss_fn, self.inputs, self.targets = model, loss_fn, inputs, targets
        self.max_batch, self.memory_budget = max_batch, memory_budget
        self.delta_dtype, self.delta_tf32 = query.DELTA_DTYPES[delta_name], delta_name == "tf32"
        self.delta_convs_only = delta_dtype == "auto"  # "auto" lowers only convolutions: see check_delta_dtype
        self.params = _parameters(model, params)
        self._cache: dict[Any, Any] = {}
        self.workspace = Workspace()  # output buffers reused by every chunk
        self._node_params: dict[int, dict[str, Tensor]] = {}
        # channels-last convolutions and BatchNorm run several times faster than NCHW on CPU
        self.layout = torch.channels_last if not inputs.is_cuda else torch.contiguous_format
        with query_mode(model, inputs.device):
            self.values = self._forward()
            verify(graph, self.values, self.params)
            outputs = self.values[graph.output]
            # the loss in float64 where loss_fn allows it: perturbed losses come from the same outputs plus each
            # query's difference, and f(theta + mu e_i) - f(theta) is not lost to the rounding of fp32 losses
            self._base = query.float64_loss(loss_fn, outputs, targets).reshape(())
            self._per_example = per_example_loss(loss_fn)
            # each per-example value's weight in the mean: ignored targets weigh 0 (computed on the device)
            self._weights = (None if self._per_example is None
                             else _example_weights(self._per_example, outputs, targets, self._base.dtype))
        users = graph.users()
        self.plans = {name: compile_plan(graph, self.values, users, name) for name in self.params}
        self.chunk_sizes = {name: self._chunk(plan.bytes_per_query) for name, plan in self.plans.items()}

    # ------------------------------------------------------------------------------------------ public API
    def base_loss(self) -> Tensor:
        """Loss at the unperturbed parameters, a 0-d tensor."""
        return self._base

    def coordinate_losses(self, name: str, index: Tensor, delta: float) -> Tensor:
        """Losses with ``params[name].view(-1)[index[i]] += delta``, each ``i`` separately: shape ``(n,)``."""
        if name not in self.plans:
            raise ValueError(f"Unknown parameter {name!r}; valid names: {sorted(self.plans)}.")
        plan = self.plans[name]
        index = index.reshape(-1).to(device=self.inputs.device, dtype=torch.long)
        chunk = max(1, min(index.numel(), self.chunk_sizes[name]))
        out = []
        with query_mode(self.model, self.inputs.device):
            for start in range(0, index.numel(), chunk):
                out.append(self._chunk_losses(plan, index[start : start + chunk], delta))
        return torch.cat(out) if out else self._base.new_zeros(0)

    def self_check(self) -> None:
        """Check the engine on this batch before it is trusted (host reads: for the first batch of a model, not per
        step; :func:`dz_lightning.reuse.build_graph_engine` runs it once per graph, input shape and loss).

        The batched per-example loss of a known loss function must equal its value at the base point (else the
        losses are computed one query at a time: :attr:`batched_losses` is set ``False``). Then, on a zero
        step, every plan that holds a node recomputed by a rule that calls the user's code (``vmap`` over an unknown
        op, an elementwise or linear function) not met in a plan checked before must run and leave the model's
        output unchanged. A loss function without a per-example form is not called (it may hold a black box that
        counts what it sees).

        Raises:
            UnsupportedGraphError: naming the parameter, and the error or the output change, when one does not.
        """
        check.self_check(self)

    @property
    def batched_losses(self) -> bool:
        """Whether a chunk's losses come from one per-example call of a known loss (else one call per query).
        Set it to ``False`` to call ``loss_fn`` once per query (the self-check does when the two disagree)."""
        return self._per_example is not None

    @batched_losses.setter
    def batched_losses(self, value: bool) -> None:
        if not value:
            self._per_example = self._weights = None
        elif self._per_example is None:
            raise ValueError(f"{self.loss_fn!r} has no per-example form the engine knows; its losses are computed "
                             "one query at a time.")

    def rules(self, name: str) -> list[tuple[str, str]]:
        """``(node name, rule name)`` of every node that a perturbation of ``name`` recomputes, in order."""
        return [(self.nodes[i].name, rule.name) for i, rule, _ in self.plans[name].steps]

    # ------------------------------------------------------------------------------------------ caches for the rules
    def cache(self, key: Any, make: Callable[[], Any]) -> Any:
        """A value computed once per engine (the cached activations never change)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def node_params(self, i: int) -> dict[str, Tensor]:
        """``local name -> value`` of the parameters a module node reads."""
        if i not in self._node_params:
            self._node_params[i] = {local: self.params[full] for local, full in self.nodes[i].params.items()}
        return self._node_params[i]

    def channels_of(self, key: Any, x: Tensor, channel: Tensor) -> Tensor:
        """``x[:, channel[i]]`` for each i, ``(k, B, ...)``, gathered from a cached contiguous channel-major copy."""
        return self.cache(("major", key), lambda: x.transpose(0, 1).contiguous())[channel]

    def channels(self, j: int, channel: Tensor) -> Tensor:
        return self.channels_of(("value", j), self.values[j], channel)

    def dropout_mask(self, i: int) -> Tensor:
        """The scaled mask (``0`` or ``1 / (1 - p)``, the shape of its input) that train-mode dropout node ``i``
        drew in the base forward."""
        return self._cache[("dropout", i)]

    def relu_base(self, j: int) -> tuple[Tensor, Tensor]:
        """``(min(x, 0), -relu(x))`` for node ``j``'s value ``x``."""
        return self.cache(("relu", j), lambda: (self.values[j].clamp(max=0), -self.values[j].clamp(min=0)))

    def flat(self, op: Callable[[Tensor], Tensor], h: Tensor) -> Tensor:
        """``op`` on ``(k, B, ...)`` as one flat batch of ``k * B`` examples (ops without batch statistics)."""
        flat = h.reshape(-1, *h.shape[2:])
        if flat.dim() == 4:
            flat = flat.contiguous(memory_format=self.layout)
        out = op(flat)
        return out.reshape(h.shape[0], h.shape[1], *out.shape[1:])

    def call(self, i: int, args: tuple, kwargs: dict, override: Mapping[str, Tensor] | None = None) -> Any:
        """Node ``i`` on the given arguments (``override``: parameter values replacing its own)."""
        node = self.nodes[i]
        if node.kind == "module":
            params = self.node_params(i) if not override else {**self.node_params(i), **override}
            return functional_call(node.target, params, args, kwargs)
        if node.kind == "function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    def run_batched(self, i: int, changed: Mapping[int, Tensor], local: str | None = None, q: Any = None) -> Tensor:
        """Node ``i`` per query under ``vmap``: the inputs in ``changed`` (node -> ``(k, ...)``) batched, the others
        cached; with ``local``, that parameter batched too (entry ``q.index[i]`` moved by ``q.delta``)."""
        order = list(changed)
        batched = [changed[j] for j in order]
        if local is not None:
            base = self.node_params(i)[local] if self.nodes[i].kind == "module" else self.params[local]
            batched.append(coordinate_points(base, q.index, q.delta))

        def one(*vs: Tensor) -> Tensor:
            own = dict(zip(order, vs, strict=False))
            args, kwargs = rules.call_with(self.nodes[i], lambda r: own.get(r.index, self.values[r.index]))
            return self.call(i, args, kwargs, {local: vs[-1]} if local is not None else None)

        value = self.values[i]  # a tuple may hold None (e.g. attention weights not asked for): not batched
        out_dims = tuple(0 if isinstance(v, Tensor) else None for v in value) if is_tensors(value) else 0
        with ops.batchable_attention():
            return vmap(one, out_dims=out_dims, randomness="same")(*batched)

    # ------------------------------------------------------------------------------------------ internals
    def _forward(self) -> list[Any]:
        values: list[Any] = []
        for i, node in enumerate(self.nodes):
            if node.kind == "input":
                value = self.inputs
            elif node.kind == "param":
                value = self.params[node.target]
            elif node.kind == "constant":
                value = node.target
            else:
                args, kwargs = rules.call_with(node, lambda r: values[r.index])
                if node.inplace:  # the cache keeps the input as it was
                    args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
                if node.kind == "module" and ops.is_random_dropout(node.target):
                    # common random numbers: the mask is drawn here, once (the same draw as the module's own
                    # forward from the same generator state: contiguous, as the model's own activation would be),
                    # and every query of the engine reuses it
                    ones = torch.ones(args[0].shape, dtype=args[0].dtype, device=args[0].device)
                    mask = self._cache[("dropout", i)] = node.target(ones)
                    value = args[0] * mask
                else:
                    value = self.call(i, args, kwargs)
            if isinstance(value, Tensor) and value.dim() == 4 and value.is_floating_point():
                value = value.contiguous(memory_format=self.layout)
            values.append(value)
        return values

    def _chunk(self, bytes_per_query: int) -> int:
        """Most queries per batched call: ``max_batch`` if set, else :func:`~dz_lightning.query.points_per_chunk`."""
        return query.points_per_chunk(self.inputs.device, self.memory_budget, 4 * bytes_per_query, self.max_batch,
                                      cpu_cache_bytes=4 * _CPU_CACHE_BYTES)

    def _chunk_losses(self, plan: Plan, index: Tensor, delta: float) -> Tensor:
        d = output_change(self, plan, index, delta)
        return self._base.expand(index.numel()).clone() if d is None else self.losses(d)

    def losses(self, d: Tensor) -> Tensor:
        """``loss_fn`` at the cached outputs plus each query's difference ``d`` ``(k, B, ...)``, shape ``(k,)``.

        A mean-reduced cross-entropy, MSE or L1 loss runs once for the whole chunk (``reduction="none"`` on the flat
        ``k * B`` batch, then a weighted sum per query: the mean over the targets that count). Any other ``loss_fn``
        is called once per query: it may hold a black box that must see, and count, every example (``vmap`` would
        hide the query dimension from it).
        """
        outputs = self.values[self.graph.output].to(self._base.dtype) + d.to(self._base.dtype)
        per_example = self._per_example
        if per_example is None:
            return torch.stack([self.loss_fn(out, self.targets).reshape(()) for out in outputs])
        k, b = outputs.shape[:2]
        targets = self.targets.expand(k, *self.targets.shape).reshape(k * b, *self.targets.shape[1:])
        values = per_example(outputs.reshape(k * b, *outputs.shape[2:]), targets)
        return (values.reshape(k, -1) * self._weights).sum(1)


class Workspace:
    """Output buffers of the engine's nodes, reused by every chunk and call.

    A chunk's changes live until its losses are taken, so one buffer per node and shape serves every chunk, and the
    allocator does not page-fault a fresh result in per chunk (which dominated on CPU).
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, Tensor] = {}

    def __call__(self, i: int, shape: torch.Size, like: Tensor) -> Tensor:
        """Node ``i``'s buffer of ``shape`` (``like``'s dtype, device and layout)."""
        key = (i, tuple(shape))  # a step's last chunk is often shorter: it keeps its own buffer
        buf = self.buffers.get(key)
        if buf is None or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[key] = torch.empty_like(like) if like.shape == shape else like.new_empty(shape)
        return buf


def _parameters(model: nn.Module, params: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """``model``'s parameters by name, with the values in ``params`` in place of their own."""
    own = dict(model.named_parameters())
    unknown = set(params or {}) - set(own)
    if unknown:
        raise ValueError(f"Unknown parameter names {sorted(unknown)[:5]}; valid names: {sorted(own)[:20]}.")
    return {**own, **(params or {})}


def _example_weights(per_example: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, targets: Tensor,
                     dtype: torch.dtype) -> Tensor:
    """Each per-example value's weight in one query's mean loss, flat ``(n,)``: ``1 / n``, except for a
    cross-entropy with class-index targets, where targets equal to ``ignore_index`` weigh 0 and the others
    ``1 / (targets that count)`` (as ``reduction="mean"`` divides). No host read."""
    shape = per_example(outputs[:1].to(dtype), targets[:1]).shape[1:]
    n = targets.shape[0] * shape.numel()
    func = getattr(per_example, "func", None)
    if func in (F.cross_entropy, cross_entropy_rows) and not targets.is_floating_point():
        counts = targets != per_example.keywords.get("ignore_index", -100)
        return counts.reshape(-1).to(dtype) / counts.sum().to(dtype)
    return torch.full((n,), 1.0 / n, dtype=dtype, device=outputs.device)
