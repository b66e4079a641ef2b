"""Which propagation rule runs at which node: chosen once per parameter when the engine is built.

:func:`select_start` gives the rule of the node where a perturbation starts, :func:`select` the rule of a node whose
inputs carry changes (from the kinds of those changes: one channel or whole), :func:`select_tuple` that of a node
returning a tuple of tensors. The rules themselves are in :mod:`dz_lightning.reuse.rules`.
"""

from __future__ import annotations

import operator
from typing import Any

from torch import Tensor, nn

import dz_lightning.reuse.ops as ops
from dz_lightning.reuse.graph import Node, Ref
from dz_lightning.reuse.rules import (
    ADD,
    CAT,
    DIV,
    ELEMENTWISE_FUNCTIONS,
    LINEAR_FUNCTIONS,
    MUL,
    RELU,
    SUB,
    Rule,
    add_rule,
    cat_channel_rule,
    cat_rule,
    channel_mix_rule,
    channel_rule,
    column_start,
    dropout_rule,
    elementwise_channel_rule,
    elementwise_rule,
    flat_module_rule,
    flat_rule,
    generic_rule,
    item_rule,
    linear_rule,
    norm_affine_start,
    norm_rule,
    op_key,
    param_rule,
    pass_rule,
    product_rule,
    relu_rule,
    scale_rule,
    vmap_linear_rule,
)

__all__ = ["select", "select_start", "select_tuple"]


def _tensor_refs(node: Node, values: list[Any]) -> list[int]:
    return [j for j in node.refs() if isinstance(values[j], Tensor)]


# ----------------------------------------------------------------------------------------------- selection
def select_start(node: Node, local: str, changed: dict[int, str], values: list[Any]) -> tuple[Rule, str]:
    """Rule and state kind (``"chan"``/``"full"``) of the node where a perturbation of ``local`` starts."""
    if node.kind == "param":
        return param_rule, "full"
    op = node.target
    x = values[node.args[0].index] if node.args and isinstance(node.args[0], Ref) else None
    if not changed and isinstance(x, Tensor) and local in ("weight", "bias") and node.kind == "module":
        if ops.column_change(op, x):
            return column_start, "chan"
        if isinstance(op, ops.NORMS) and x.dim() >= 2:
            return norm_affine_start, "chan"
    return generic_rule, "full"


def select_tuple(node: Node, local: str | None) -> Rule:
    """Rule of a node returning a tuple of tensors: batch-first attention (no masks) on a flat ``k * B`` batch
    (vmap has no batching rule for CPU flash attention), anything else per query under ``vmap``."""
    op = node.target
    if (local is None and node.kind == "module" and isinstance(op, nn.MultiheadAttention) and op.batch_first
            and len(node.args) == 3 and set(node.kwargs) <= {"need_weights"}):
        return flat_module_rule
    return generic_rule


def select(node: Node, changed: dict[int, str], values: list[Any], out: Tensor) -> tuple[Rule, str]:
    """Rule and state kind of a node whose inputs ``changed`` (input index -> kind) carry changes."""
    refs = _tensor_refs(node, values)
    key = op_key(node)
    if "parts" in changed.values():  # an element of a changed tuple, or a node reading a whole tuple
        if key is operator.getitem and isinstance(node.args[1], int) and len(changed) == 1:
            return item_rule, "full"
        return generic_rule, "full"
    if node.identity:
        return pass_rule, changed[refs[0]]
    if node.kind == "module":
        if len(changed) != 1 or len(refs) != 1:
            return generic_rule, "full"
        op, kind, x = node.target, next(iter(changed.values())), values[refs[0]]
        if ops.is_random_dropout(op):
            return dropout_rule, kind
        if kind == "chan":
            if ops.is_channelwise(op, x):
                return channel_rule, "chan"
            if ops.is_mixing(op, x):
                return channel_mix_rule, "full"
        if node.linear or (node.linear is None and ops.is_linear(op)):
            return linear_rule, "full"
        if isinstance(op, ops.NORMS) and ops.is_train_norm(op) and x.dim() in (2, 4):
            return norm_rule, "full"
        if isinstance(op, nn.ReLU):
            return relu_rule, "full"
        if node.linear is None and ops.is_per_example(op):
            return flat_rule, "full"
        return generic_rule, "full"
    if node.kind not in ("function", "method"):
        return generic_rule, "full"
    if key in ELEMENTWISE_FUNCTIONS and len(refs) == 1 and isinstance(node.args[0], Ref) and node.args[0].index \
            in changed and out.shape == values[refs[0]].shape:  # never fed a cached tensor: in-place is fine
        if changed[refs[0]] == "chan":
            return elementwise_channel_rule, "chan"
        return (relu_rule if key in RELU and not node.kwargs else elementwise_rule), "full"
    if node.inplace and key not in ADD | SUB | MUL | DIV:
        return generic_rule, "full"
    shapes_match = all(values[j].shape == out.shape for j in changed)
    if key in ADD | SUB and len(node.args) == 2 and not node.kwargs and len(refs) >= 1:
        if len(changed) == 1 and shapes_match:
            return add_rule, next(iter(changed.values()))
        return add_rule, "full"
    if key in MUL | DIV and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if len(changed) == 1 and shapes_match and not any(isinstance(v, Ref) and isinstance(values[v.index], Tensor)
                                                          and v.index not in changed for v in (a, b)):
            if key in MUL or isinstance(a, Ref) and a.index in changed:
                return scale_rule, next(iter(changed.values()))
        if key in MUL:
            return product_rule, "full"
        return generic_rule, "full"
    if key in CAT:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if isinstance(dim, int) and isinstance(node.args[0], (list, tuple)):
            dim = dim % out.dim()
            if dim == 1 and list(changed.values()) == ["chan"]:
                return cat_channel_rule, "chan"
            return cat_rule, "full"
        return generic_rule, "full"
    if len(refs) == 1 and isinstance(node.args[0], Ref) and node.args[0].index in changed:
        if key in LINEAR_FUNCTIONS or ops.is_linear_pad(node):
            return vmap_linear_rule, "full"
    return generic_rule, "full"
