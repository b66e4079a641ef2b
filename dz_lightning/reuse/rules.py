"""Propagation rules of the graph engine: how a node's change follows from its inputs' changes.

A query's state at a node is a :data:`Change` ``(h, channel)``: with ``channel`` ``None``, ``h`` ``(k, *value.shape)``
holds each query's difference from the cached value; otherwise only channel ``channel[i]`` (dim 1 of the value)
of query i differs, and ``h`` ``(k, B, *spatial)`` holds that channel's difference. The selection
(:mod:`dz_lightning.reuse.selection`) picks, once per parameter when the engine is built, the rule of every node
downstream of it. A rule is a function ``rule(ctx, i, states, query) -> Change`` of the engine's caches (``ctx``, a
:class:`dz_lightning.reuse.engine.GraphEngine`), the states of node ``i``'s inputs and the query chunk, registered
where it is written (``@register``: when it applies, with predicates from :mod:`dz_lightning.reuse.predicates`, and
its precedence). A new op is one registered function here.

The rules, keyed on the node:

* a Conv/Linear weight or bias coordinate changes one output channel by ``delta`` times one column of the unfolded
  input (:func:`column_start`); a BatchNorm weight/bias coordinate by ``delta * xhat`` of one channel;
* channel-wise ops (activations, BatchNorm, pooling, depthwise convolutions, eval dropout) keep a one-channel
  change in its channel (:func:`channel_rule`); train-mode dropout multiplies it by the mask of the base forward
  (:func:`dropout_rule`: common random numbers); the next mixing op (Conv2d, Linear) sees a one-input-channel
  change, one batched matmul over the kernel taps (:func:`channel_mix_rule`); an add with a cached operand keeps
  it one-channel, a channel concatenation moves it to its new channel;
* on whole differences, linear ops act on ``d`` alone (in ``delta_dtype``), train-mode BatchNorm and ReLU use the
  forms of :mod:`dz_lightning.reuse.differences`, per-example ops (activations, pooling, LayerNorm, GroupNorm) run on
  one flat ``k * B`` batch;
* anything else is recomputed per query under ``vmap`` from the changed inputs and the cached others
  (:func:`generic_rule`): correct for any op, not specialised.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import dz_lightning.reuse.ops as ops
from dz_lightning.oracle_base import coordinate_points
from dz_lightning.reuse.differences import NormBase, batch_norm_difference, relu_difference, scatter_channel
from dz_lightning.reuse.graph import Node, Ref, map_refs
from dz_lightning.reuse.predicates import (
    ADD,
    DIV,
    MUL,
    RELU,
    SUB,
    batch_first_attention,
    binary,
    cat_dim,
    elementwise,
    linear_function,
    module_with,
    op_key,
    scales,
    start_input,
)
from dz_lightning.reuse.selection import Change, register

__all__ = ["call_with", "full"]

CHAN, FULL, ANY = {"chan"}, {"full"}, {"chan", "full"}

# ----------------------------------------------------------------------------------------------- helpers
def full(ctx: Any, j: int, state: Change) -> Tensor:
    """A state at node ``j`` as a whole difference ``(k, *values[j].shape)``."""
    h, channel = state
    return h if channel is None else scatter_channel(ctx.values[j], h, channel)


def _lift(d: Tensor, shape: torch.Size) -> Tensor:
    """A difference ``(k, *a)`` viewed to broadcast against values of ``shape`` (leading dims added to ``a``)."""
    extra = len(shape) - (d.dim() - 1)
    return d.reshape(d.shape[0], *([1] * extra), *d.shape[1:]) if extra > 0 else d


def _operand(ctx: Any, v: Any, states: dict[int, Change]) -> tuple[Any, Tensor | None]:
    """``(base value, difference or None)`` of an argument."""
    if not isinstance(v, Ref):
        return v, None
    return ctx.values[v.index], (full(ctx, v.index, states[v.index]) if v.index in states else None)


# ----------------------------------------------------------------------------------------------- start rules
@register(precedence=10, accepts={"start"}, gives="full", match=lambda site: site.node.kind == "param")
def param_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """A parameter read directly: its own change, one-hot per query."""
    return coordinate_points(torch.zeros_like(ctx.values[i]), q.index, q.delta), None


@register(precedence=20, accepts={"start"}, gives="chan",
          match=lambda site: (x := start_input(site)) is not None and ops.column_change(site.node.target, x))
def column_start(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """A Conv/Linear weight or bias coordinate: ``delta`` times one input column, in one output channel."""
    node = ctx.graph.nodes[i]
    channel, col = ops.column(node.target, ctx.values[node.args[0].index], q.start_local(i), q.index,
                              ctx.values[i].shape, ctx.cache, i)
    return q.delta * col, channel


@register(precedence=30, accepts={"start"}, gives="chan",
          match=lambda site: (x := start_input(site)) is not None and isinstance(site.node.target, ops.NORMS)
          and x.dim() >= 2)
def norm_affine_start(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """``d(w * xhat + b) = delta * xhat`` (weight) or ``delta`` (bias), in one channel."""
    node = ctx.graph.nodes[i]
    x = node.args[0].index
    xhat = ops.normalize_channels(node.target, ctx.channels(x, q.index), q.index)
    return (q.delta * xhat if q.start_local(i) == "weight" else torch.full_like(xhat, q.delta)), q.index


# ----------------------------------------------------------------------------------------------- one-channel rules
@register(precedence=100, accepts=ANY, gives="same", match=lambda site: site.node.identity)
def pass_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    return states[ctx.graph.nodes[i].args[0].index]


@register(precedence=210, accepts=CHAN, gives="chan", match=module_with(ops.is_channelwise))
def channel_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """A channel-wise module on a one-channel change: the change stays in its channel."""
    node = ctx.graph.nodes[i]
    x = node.args[0].index
    h, channel = states[x]
    return ops.channel_difference(ctx, node.target, ctx.node_params(i), x, i, h, channel), channel


@register(precedence=200, accepts=ANY, gives="same", match=module_with(lambda op, x: ops.is_random_dropout(op)))
def dropout_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """Train-mode dropout under common random numbers: the mask drawn in the base forward scales the change, which
    stays where it is (one channel included)."""
    h, channel = states[ctx.graph.nodes[i].args[0].index]
    mask = ctx.dropout_mask(i)
    if channel is None:
        return h * mask, None
    return h * ctx.channels_of(("dropout", i), mask, channel), channel


@register(precedence=300, accepts=CHAN, gives="chan", match=elementwise, user_code=True)
def elementwise_channel_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """An elementwise function on a one-channel change: ``f(x_c + d) - f(x)_c`` in that channel (ReLU from the
    change itself)."""
    node = ctx.graph.nodes[i]
    j = node.args[0].index
    h, channel = states[j]
    if op_key(node) in RELU and not node.kwargs:
        return ops.relu_channel_difference(ctx, j, h, channel), channel
    z = ctx.channels(j, channel) + h
    args, kwargs = call_with(node, lambda r: z)
    return ctx.call(i, args, kwargs) - ctx.channels(i, channel), channel


@register(precedence=320, accepts=FULL, gives="full", match=elementwise, user_code=True)
def elementwise_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """An elementwise function on whole differences: ``f(x + d) - f(x)``, all queries at once."""
    node = ctx.graph.nodes[i]
    j = node.args[0].index
    h = ctx.values[j] + full(ctx, j, states[j])
    args, kwargs = call_with(node, lambda r: h)
    return ctx.call(i, args, kwargs) - ctx.values[i], None


@register(precedence=220, accepts=CHAN, gives="full", match=module_with(ops.is_mixing))
def channel_mix_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """A mixing module on a one-input-channel change: a one-input-channel convolution (bias cancels)."""
    node = ctx.graph.nodes[i]
    h, channel = states[node.args[0].index]
    return ops.one_channel_mix(node.target, ctx.node_params(i), h, channel, ctx.values[i].shape), None


@register(precedence=400, accepts=ANY, gives="same",
          match=lambda site: binary(ADD | SUB)(site) and len(site.changed) == 1 and site.shapes_match())
@register(precedence=410, accepts=ANY, gives="full", match=binary(ADD | SUB))
def add_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """``a + b`` / ``a - b``: one changed operand of the output's shape keeps its state (one channel included)."""
    node = ctx.graph.nodes[i]
    sign = -1.0 if op_key(node) in SUB else 1.0
    changed = [(pos, v.index) for pos, v in enumerate(node.args) if isinstance(v, Ref) and v.index in states]
    out = ctx.values[i]
    if len(changed) == 1 and ctx.values[changed[0][1]].shape == out.shape:
        pos, j = changed[0]
        h, channel = states[j]
        return (h if pos == 0 or sign > 0 else -h), channel
    total = None
    for pos, j in changed:
        d = _lift(full(ctx, j, states[j]), out.shape)
        d = d if pos == 0 or sign > 0 else -d
        total = d if total is None else total + d
    return total.expand(total.shape[0], *out.shape) if total.shape[1:] != out.shape else total, None


@register(precedence=420, accepts=ANY, gives="same", match=lambda site: binary(MUL | DIV)(site) and scales(site))
def scale_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """A product with (or a quotient by) a constant: the change is scaled, in its channel."""
    node = ctx.graph.nodes[i]
    a, b = node.args
    changed, other = (a, b) if isinstance(a, Ref) and a.index in states else (b, a)
    h, channel = states[changed.index]
    c = ctx.values[other.index] if isinstance(other, Ref) else other
    return (h / c if op_key(node) in DIV else h * c), channel


@register(precedence=430, accepts=ANY, gives="full", match=binary(MUL))
def product_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """``(a + da)(b + db) - ab = da b + (a + da) db``, with cached tensors or constants for unchanged operands."""
    node = ctx.graph.nodes[i]
    (a, da), (b, db) = (_operand(ctx, v, states) for v in node.args)
    shape = ctx.values[i].shape
    da = _lift(da, shape) if da is not None else None
    db = _lift(db, shape) if db is not None else None
    if da is None:
        return a * db, None
    if db is None:
        return da * b, None
    return da * b + (a + da) * db, None


@register(precedence=500, accepts=CHAN, gives="chan", match=lambda site: cat_dim(site) == 1 and len(site.changed) == 1)
def cat_channel_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """A channel concatenation with one input changed in one channel: that channel, shifted."""
    node = ctx.graph.nodes[i]
    offset = 0
    for v in node.args[0]:
        if isinstance(v, Ref) and v.index in states:
            h, channel = states[v.index]
            return h, channel + offset
        offset += (ctx.values[v.index] if isinstance(v, Ref) else v).shape[1]
    raise AssertionError("no changed input")  # pragma: no cover - selected only with one changed input


@register(precedence=510, accepts=ANY, gives="full", match=lambda site: cat_dim(site) is not None)
def cat_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """A concatenation: the changed inputs' differences beside zeros for the cached ones."""
    node = ctx.graph.nodes[i]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % ctx.values[i].dim()
    k = q.index.numel()
    parts = []
    for v in node.args[0]:
        value = ctx.values[v.index] if isinstance(v, Ref) else v
        parts.append(full(ctx, v.index, states[v.index]) if isinstance(v, Ref) and v.index in states
                     else value.new_zeros((k, *value.shape)))
    return torch.cat(parts, dim + 1), None


# ----------------------------------------------------------------------------------------------- whole-difference rules
@register(precedence=230, accepts=ANY, gives="full", user_code=True,
          match=lambda site: module_with(lambda op, x: True)(site)
          and bool(site.node.linear or (site.node.linear is None and ops.is_linear(site.node.target))))
def linear_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """A module linear in its input: it acts on the difference alone (the bias cancels), in ``delta_dtype``."""
    node = ctx.graph.nodes[i]
    j = node.args[0].index
    d = full(ctx, j, states[j])
    op = node.target
    if node.linear is not None or not ops.is_linear(op):  # a protocol shortcut found linear: the op itself
        return ctx.run_batched(i, {j: d}), None
    return ops.linear_difference(ctx, op, ctx.node_params(i), d), None


@register(precedence=240, accepts=ANY, gives="full",
          match=module_with(lambda op, x: isinstance(op, ops.NORMS) and ops.is_train_norm(op) and x.dim() in (2, 4)))
def norm_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """Train-mode BatchNorm, each query with its own statistics, from the cached base
    (:func:`~dz_lightning.reuse.differences.batch_norm_difference`)."""
    node = ctx.graph.nodes[i]
    j = node.args[0].index
    base = ctx.cache(("norm", i), lambda: NormBase(ctx.values[j], ctx.node_params(i).get("weight"), node.target.eps))
    return batch_norm_difference(base, full(ctx, j, states[j])), None


@register(precedence=305, accepts=ANY, gives="same",
          match=lambda site: site.key in (torch.square, "square") and site.changes_first() and not site.node.kwargs)
def square_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """``(x + d)^2 - x^2 = d (2x + d)``: from the change itself (no rounding of ``x + d``), in its channel."""
    j = ctx.graph.nodes[i].args[0].index
    h, channel = states[j]
    return h * (2 * (ctx.values[j] if channel is None else ctx.channels(j, channel)) + h), channel


@register(precedence=250, accepts=ANY, gives="full", match=module_with(lambda op, x: isinstance(op, nn.ReLU)))
@register(precedence=310, accepts=FULL, gives="full",
          match=lambda site: elementwise(site) and site.key in RELU and not site.node.kwargs)
def relu_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    j = ctx.graph.nodes[i].args[0].index
    d = full(ctx, j, states[j])
    neg_part, neg_out = ctx.relu_base(j)
    shape = torch.broadcast_shapes(d.shape, neg_part.shape)
    return relu_difference(neg_part, neg_out, d, out=ctx.workspace(i, shape, d)), None


@register(precedence=260, accepts=ANY, gives="full", user_code=True,
          match=lambda site: module_with(lambda op, x: ops.is_per_example(op))(site) and site.node.linear is None)
def flat_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """A per-example module (no batch statistics) on one flat ``k * B`` batch: ``f(x + d) - f(x)``."""
    node = ctx.graph.nodes[i]
    j = node.args[0].index
    x, y = ctx.values[j], ctx.values[i]
    h = x + full(ctx, j, states[j])
    op, params = node.target, ctx.node_params(i)
    if ops.is_tiling_max_pool(op) and x.dim() == 4:
        return ops.tiling_max(op, h) - y, None
    return ctx.flat(lambda flat: torch.func.functional_call(op, params, (flat,)), h) - y, None


@register(precedence=600, accepts=ANY, gives="full", match=linear_function, user_code=True)
def vmap_linear_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """A function linear in its one tensor argument (view, flatten, slicing, zero padding, average pooling): it
    runs on the difference, per query under ``vmap``."""
    j = ctx.graph.nodes[i].args[0].index
    return ctx.run_batched(i, {j: full(ctx, j, states[j])}), None


@register(precedence=10_000, accepts={"chan", "full", "parts", "start"}, gives="full", user_code=True,
          returns=("tensor", "tuple"))
def generic_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """Any node: ``f(changed inputs, cached others) - f(cached)`` per query under ``vmap`` (with the perturbed
    parameter stacked per query when the perturbation starts here)."""
    node = ctx.graph.nodes[i]
    values = {j: _changed_value(ctx, j, states[j]) for j in dict.fromkeys(node.refs()) if j in states}
    if node.inplace:  # an in-place op writes into a per-query copy of every tensor input, never the cache
        k = q.index.numel()
        for j in dict.fromkeys(node.refs()):
            if j not in values and isinstance(ctx.values[j], Tensor):
                values[j] = ctx.values[j].unsqueeze(0).repeat(k, *([1] * ctx.values[j].dim()))
    out = ctx.run_batched(i, values, local=q.start_local(i), q=q)
    if isinstance(ctx.values[i], (tuple, list)):  # a tuple of tensors: the differences of its elements
        return tuple(None if v is None else o - v for o, v in zip(out, ctx.values[i], strict=True)), None
    return out - ctx.values[i], None


@register(precedence=50, accepts={"chan", "full", "parts"}, gives="parts", user_code=True, returns=("tuple",),
          match=lambda site: batch_first_attention(site.node))
def flat_module_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """A module without batch statistics whose tensor arguments all lead with the batch: one call on flat ``k * B``
    batches (cached arguments repeated per query)."""
    node = ctx.graph.nodes[i]
    k = q.index.numel()

    def flat(j: int) -> Any:
        value = ctx.values[j]
        if not isinstance(value, Tensor):
            return value
        v = _changed_value(ctx, j, states[j]) if j in states else value.unsqueeze(0).expand(k, *value.shape)
        return v.reshape(-1, *v.shape[2:])

    args, kwargs = call_with(node, lambda r: flat(r.index))
    out, y = ctx.call(i, args, kwargs), ctx.values[i]
    return tuple(None if v is None else o.reshape(k, *v.shape) - v for o, v in zip(out, y, strict=True)), None


@register(precedence=90, accepts={"parts"}, gives="full",
          match=lambda site: site.key is operator.getitem and isinstance(site.node.args[1], int)
          and len(site.changed) == 1)
def item_rule(ctx: Any, i: int, states: dict[int, Change], q: Any) -> Change:
    """Element ``n`` of a changed tuple: its difference."""
    node = ctx.graph.nodes[i]
    return states[node.args[0].index][0][node.args[1]], None


def _changed_value(ctx: Any, j: int, state: Change) -> Any:
    """Each query's value of node ``j`` ``(k, ...)``: the cache plus the change (element by element for a tuple)."""
    if isinstance(ctx.values[j], (tuple, list)):
        return tuple(None if v is None else v + d for v, d in zip(ctx.values[j], state[0], strict=True))
    return ctx.values[j] + full(ctx, j, state)


def call_with(node: Node, leaves_of: Callable[[Any], Any]) -> tuple[tuple, dict]:
    """``node``'s args and kwargs with every :class:`Ref` replaced by ``leaves_of(ref)``."""
    args, kwargs = map_refs((node.args, node.kwargs), leaves_of)
    return tuple(args), dict(kwargs)

