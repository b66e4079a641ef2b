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

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

import dz_lightning.reuse.ops as ops
import dz_lightning.reuse.rules as rules
import dz_lightning.reuse.selection as selection
from dz_lightning import query
from dz_lightning.query import query_mode
from dz_lightning.reuse.differences import per_example_loss
from dz_lightning.reuse.graph import Graph, UntraceableError
from dz_lightning.reuse.protocol import verify

__all__ = ["GraphEngine", "UnsupportedGraphError"]

_CPU_CACHE_BYTES = 2 << 20


class UnsupportedGraphError(UntraceableError):
    """The traced graph has a node the engine cannot carry a change through; the message names it."""


@dataclasses.dataclass(frozen=True)
class _Query:
    """One chunk: entries ``index`` of the parameter move by ``delta``; ``starts``: node -> its local name there."""

    index: Tensor
    delta: float
    starts: Mapping[int, str]

    def start_local(self, i: int) -> str | None:
        return self.starts.get(i)


@dataclasses.dataclass
class _Plan:
    steps: list[tuple[int, Callable[..., rules.Change], list[int]]]  # node, rule, states freed after it
    starts: dict[int, str]
    bytes_per_query: int


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
        ops: the graph's nodes.
        chunk_sizes: most queries per batched call for a perturbation starting at each node, fixed at construction
            (from ``max_batch``, or the memory budget and the model's activation sizes): the same every step.

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
        self.graph, self.ops = graph, graph.nodes
        self.model, self.loss_fn, self.inputs, self.targets = model, loss_fn, inputs, targets
        self.max_batch, self.memory_budget = max_batch, memory_budget
        self.delta_dtype, self.delta_tf32 = query.DELTA_DTYPES[delta_name], delta_name == "tf32"
        self.params = dict(model.named_parameters())
        unknown = set(params or {}) - set(self.params)
        if unknown:
            raise ValueError(f"Unknown parameter names {sorted(unknown)[:5]}; valid names: {sorted(self.params)[:20]}.")
        self.params.update(params or {})
        self._cache: dict[Any, Any] = {}
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
        self._users = graph.users()
        self._plans = {name: self._compile(name) for name in self.params}
        starts = {next(iter(plan.starts), 0): plan for plan in self._plans.values() if plan.starts}
        fallback = max([self._bytes(v) for v in self.values if isinstance(v, Tensor)], default=1)
        self.chunk_sizes = tuple(self._chunk(starts[i].bytes_per_query if i in starts else fallback)
                                 for i in range(len(self.ops)))

    # ------------------------------------------------------------------------------------------ public API
    def base_loss(self) -> Tensor:
        """Loss at the unperturbed parameters, a 0-d tensor."""
        return self._base

    def coordinate_losses(self, name: str, index: Tensor, delta: float) -> Tensor:
        """Losses with ``params[name].view(-1)[index[i]] += delta``, each ``i`` separately: shape ``(n,)``."""
        if name not in self._plans:
            raise ValueError(f"Unknown parameter {name!r}; valid names: {sorted(self._plans)}.")
        plan = self._plans[name]
        index = index.reshape(-1).to(device=self.inputs.device, dtype=torch.long)
        chunk = max(1, min(index.numel(), self._chunk(plan.bytes_per_query)))
        out = []
        with query_mode(self.model, self.inputs.device):
            for start in range(0, index.numel(), chunk):
                out.append(self._chunk_losses(plan, index[start : start + chunk], delta))
        return torch.cat(out) if out else self._base.new_zeros(0)

    def self_check(self) -> None:
        """Check the engine on this batch before it is trusted (host reads: for the first batch of a model, not per
        step; :func:`dz_lightning.reuse.build_staged` runs it once per graph, input shape and loss).

        The batched per-example loss of a known loss function must equal its value at the base point (else the
        losses are computed one query at a time: :attr:`batched_losses` is set ``False``). Then, on a zero
        step, every plan that holds a node recomputed by a rule that calls the user's code (``vmap`` over an unknown
        op, an elementwise or linear function) not met in a plan checked before must run and leave the model's
        output unchanged. A loss function without a per-example form is not called (it may hold a black box that
        counts what it sees).

        Raises:
            UnsupportedGraphError: naming the parameter, and the error or the output change, when one does not.
        """
        outputs = self.values[self.graph.output]
        if self._per_example is not None:  # the batched loss of a chunk equals loss_fn's value at the base
            with query_mode(self.model, self.inputs.device):
                batched = self._losses(torch.zeros_like(outputs).unsqueeze(0))[0]
            if not torch.allclose(batched, self._base, rtol=1e-6, atol=1e-9):
                self.batched_losses = False
        seen: set[tuple[int, str]] = set()
        for name, plan in self._plans.items():
            calls = {(i, rule.__name__) for i, rule, _ in plan.steps if rule.__name__ in rules.USER_CODE_RULES}
            if calls <= seen:
                continue
            seen |= calls
            at: list[int] = []
            with query_mode(self.model, self.inputs.device):
                try:
                    d = self._output_change(plan, torch.zeros(1, dtype=torch.long, device=self.inputs.device), 0.0,
                                            at)
                except Exception as exc:  # noqa: BLE001 - any failure of a rule means: not a graph for the engine
                    node, rule = next(((self.ops[i].name, r.__name__) for i, r, _ in plan.steps if i == at[-1]),
                                      ("?", "?")) if at else ("?", "?")
                    steps = ", ".join(f"{n} ({r})" for n, r in self.rules(name))
                    raise UnsupportedGraphError(f"node {node!r} ({rule}) failed in a query of "
                                                f"{name!r}: {type(exc).__name__}: "
                                                f"{str(exc).splitlines()[0] if str(exc) else ''}; the query's nodes: "
                                                f"[{steps}]") from exc
            if d is not None and float(d.abs().max()) > 1e-5 * (1 + float(outputs.abs().max())):
                suspects = [f"{n} ({r})" for n, r in self.rules(name) if r in rules.USER_CODE_RULES]
                raise UnsupportedGraphError(f"a zero step of {name!r} changed the outputs by up to "
                                            f"{float(d.abs().max()):.3g} (random or stateful ops recomputed by "
                                            f"{', '.join(suspects[-3:])}); its nodes: {self.rules(name)}")

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
        return [(self.ops[i].name, rule.__name__) for i, rule, _ in self._plans[name].steps]

    # ------------------------------------------------------------------------------------------ caches for the rules
    def cache(self, key: Any, make: Callable[[], Any]) -> Any:
        """A value computed once per engine (the cached activations never change)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def node_params(self, i: int) -> dict[str, Tensor]:
        """``local name -> value`` of the parameters a module node reads."""
        if i not in self._node_params:
            self._node_params[i] = {local: self.params[full] for local, full in self.ops[i].params.items()}
        return self._node_params[i]

    def channels_of(self, key: Any, x: Tensor, channel: Tensor) -> Tensor:
        """``x[:, channel[i]]`` for each i, ``(k, B, ...)``, gathered from a cached contiguous channel-major copy."""
        return self.cache(("major", key), lambda: x.transpose(0, 1).contiguous())[channel]

    def channels(self, j: int, channel: Tensor) -> Tensor:
        return self.channels_of(("value", j), self.values[j], channel)

    def channel_stats(self, j: int, eps: float) -> tuple[Tensor, Tensor]:
        """Node ``j``'s value centered per channel, and its per-channel variance plus ``eps`` ``(C,)``."""
        def make() -> tuple[Tensor, Tensor]:
            x = self.values[j]
            dims = (0, *range(2, x.dim()))
            centered = x - x.mean(dims, keepdim=True)
            return centered, (centered * centered).mean(dims) + eps
        return self.cache(("stats", j, eps), make)

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
        node = self.ops[i]
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
            base = self.node_params(i)[local] if self.ops[i].kind == "module" else self.params[local]
            k = q.index.numel()
            stacked = base.detach().reshape(1, -1).repeat(k, 1)
            stacked[torch.arange(k, device=stacked.device), q.index] += q.delta
            batched.append(stacked.reshape(k, *base.shape))

        def one(*vs: Tensor) -> Tensor:
            own = dict(zip(order, vs, strict=False))
            args, kwargs = rules.call_with(self.ops[i], lambda r: own.get(r.index, self.values[r.index]))
            return self.call(i, args, kwargs, {local: vs[-1]} if local is not None else None)

        value = self.values[i]  # a tuple may hold None (e.g. attention weights not asked for): not batched
        out_dims = tuple(0 if isinstance(v, Tensor) else None for v in value) if _is_tensors(value) else 0
        with ops.batchable_attention():
            return vmap(one, out_dims=out_dims, randomness="same")(*batched)

    # ------------------------------------------------------------------------------------------ internals
    def _forward(self) -> list[Any]:
        values: list[Any] = []
        for i, node in enumerate(self.ops):
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

    def _compile(self, name: str) -> _Plan:
        """The plan of a perturbation of ``name``: every node it changes, in order, with its rule."""
        kinds: dict[int, str] = {}
        steps: list[tuple[int, Callable[..., rules.Change]]] = []
        starts: dict[int, str] = {}
        for i, node in enumerate(self.ops):
            if not self._users[i] and i != self.graph.output:  # nothing reads it (e.g. a protocol identity shortcut)
                continue
            local = "" if node.kind == "param" and node.target == name else next(
                (loc for loc, full in node.perturbable().items() if full == name), None)
            changed = {j: kinds[j] for j in dict.fromkeys(node.refs()) if j in kinds}
            if local is None and not changed:
                continue
            value = self.values[i]
            if _is_size(value):  # shapes do not depend on parameter values
                continue
            if _is_tensors(value):
                if local is not None:
                    starts[i] = local
                # a tuple of tensors (chunk, split, attention)
                rule, kind = selection.select_tuple(node, local), "parts"
            elif not isinstance(value, Tensor):
                raise UnsupportedGraphError(f"node {node.name!r} returns a {type(value).__name__} that depends on "
                                            f"parameter {name!r}; the engine carries changes of tensors only.")
            elif local is not None:
                starts[i] = local
                rule, kind = selection.select_start(node, local, changed, self.values)
            else:
                rule, kind = selection.select(node, changed, self.values, value)
            kinds[i] = kind
            steps.append((i, rule))
        last: dict[int, int] = {}
        for pos, (i, _) in enumerate(steps):
            for j in self.ops[i].refs():
                if j in kinds:
                    last[j] = pos
        frees = [[j for j, p in last.items() if p == pos and j != self.graph.output] for pos in range(len(steps))]
        # a chunk's footprint: the largest value it changes. A one-channel change of a feature map counts one
        # channel (simple_cnn's conv layers ran 1.4x slower per step with such changes counted whole); one feature
        # of a (B, features) value counts whole (a dense MLP step ran slower with the larger chunks)
        sizes = [sum(self._bytes(v) for v in self.values[i] if v is not None) if kinds[i] == "parts" else
                 self._bytes(self.values[i]) // (self.values[i].shape[1] if _one_feature_map(kinds[i], self.values[i])
                                                  else 1)
                 for i, _ in steps]
        return _Plan([(i, rule, frees[pos]) for pos, (i, rule) in enumerate(steps)], starts, max(sizes, default=1))

    @staticmethod
    def _bytes(value: Tensor) -> int:
        return max(1, value.numel() * value.element_size())

    def _chunk(self, bytes_per_query: int) -> int:
        """Most queries per batched call: ``max_batch`` if set, else :func:`~dz_lightning.query.points_per_chunk`."""
        return query.points_per_chunk(self.inputs.device, self.memory_budget, 4 * bytes_per_query, self.max_batch,
                                      cpu_cache_bytes=4 * _CPU_CACHE_BYTES)

    def _output_change(self, plan: _Plan, index: Tensor, delta: float, at: list[int] | None = None) -> Tensor | None:
        """Each query's change of the model's output ``(k, *outputs.shape)``; ``None``: it does not reach it.
        ``at`` (the self-check's) receives the index of each node before its rule runs."""
        q = _Query(index, delta, plan.starts)
        states: dict[int, rules.Change] = {}
        for i, rule, frees in plan.steps:
            if at is not None:
                at.append(i)
            states[i] = rule(self, i, states, q)
            for j in frees:
                states.pop(j, None)
        out = self.graph.output
        return rules.full(self, out, states[out]) if out in states else None

    def _chunk_losses(self, plan: _Plan, index: Tensor, delta: float) -> Tensor:
        d = self._output_change(plan, index, delta)
        return self._base.expand(index.numel()).clone() if d is None else self._losses(d)

    def _losses(self, d: Tensor) -> Tensor:
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


def _example_weights(per_example: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, targets: Tensor,
                     dtype: torch.dtype) -> Tensor:
    """Each per-example value's weight in one query's mean loss, flat ``(n,)``: ``1 / n``, except for a
    cross-entropy with class-index targets, where targets equal to ``ignore_index`` weigh 0 and the others
    ``1 / (targets that count)`` (as ``reduction="mean"`` divides). No host read."""
    shape = per_example(outputs[:1].to(dtype), targets[:1]).shape[1:]
    n = targets.shape[0] * shape.numel()
    func = getattr(per_example, "func", None)
    if func is F.cross_entropy and not targets.is_floating_point():
        counts = targets != per_example.keywords.get("ignore_index", -100)
        return counts.reshape(-1).to(dtype) / counts.sum().to(dtype)
    return torch.full((n,), 1.0 / n, dtype=dtype, device=outputs.device)


def _is_tensors(value: Any) -> bool:
    """A tuple of tensors (``None`` allowed, as ``nn.MultiheadAttention``'s weights when not asked for)."""
    return (isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value)
            and all(isinstance(v, Tensor) or v is None for v in value))


def _is_size(value: Any) -> bool:
    if isinstance(value, (int, torch.Size)):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value)


def _one_feature_map(kind: str, value: Tensor) -> bool:
    """Whether a state of ``kind`` at ``value`` is one channel of a feature map ``(B, C, *spatial)``."""
    return kind == "chan" and value.dim() > 2
