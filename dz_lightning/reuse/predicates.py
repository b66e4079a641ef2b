"""What the registrations of :mod:`dz_lightning.reuse.rules` test of a node: its op's key and predicates on a
:class:`~dz_lightning.reuse.selection.Site`."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dz_lightning.reuse.ops as ops
from dz_lightning.reuse.graph import Node, Ref
from dz_lightning.reuse.selection import Site

__all__ = ["ADD", "CAT", "DIV", "ELEMENTWISE_FUNCTIONS", "LINEAR_FUNCTIONS", "MUL", "RELU", "SUB",
           "batch_first_attention", "binary", "cat_dim", "elementwise", "linear_function", "module_with", "op_key",
           "scales", "start_input"]

# what a function/method node computes, by its target: the keys the rules and their selection test
ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"}
SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_", "__sub__"}
MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", "__rmul__"}
DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_", "__truediv__"}
CAT = {torch.cat, torch.concat, torch.concatenate}
RELU = {F.relu, torch.relu, "relu", "relu_"}
# elementwise functions of one tensor (their other arguments constants): a change stays where it is
ELEMENTWISE_FUNCTIONS = RELU | {
    torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.relu6, F.leaky_relu,
    F.elu, F.softplus, F.mish, "sigmoid", "tanh", "sigmoid_", "tanh_", "exp", "abs", torch.exp, torch.abs,
}
# functions of one tensor that are linear in it (the other arguments are sizes or constants)
LINEAR_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, operator.getitem,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d, F.avg_pool2d, torch.mean, torch.sum, operator.neg,
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "mean", "sum",
    "expand", "repeat", "t", "neg", "__neg__",
}


def op_key(node: Node) -> Any:
    return node.target if node.kind in ("function", "method") else None


def start_input(site: Site) -> Tensor | None:
    """The cached tensor input of a module reading the perturbed weight or bias; ``None`` for any other start."""
    node = site.node
    x = site.values[node.args[0].index] if node.args and isinstance(node.args[0], Ref) else None
    return x if node.kind == "module" and isinstance(x, Tensor) and site.local in ("weight", "bias") else None


def module_with(test: Callable[[nn.Module, Tensor], bool]) -> Callable[[Site], bool]:
    """A predicate: a module node with one changed tensor input ``x`` and ``test(module, x)``."""
    return lambda site: site.one_module_input() and test(site.node.target, site.values[site.refs[0]])


def elementwise(site: Site) -> bool:
    """An elementwise function of one changed tensor, the output of its shape (so it never writes into a cached
    tensor: in-place is fine)."""
    return (site.key in ELEMENTWISE_FUNCTIONS and site.changes_first()
            and site.value.shape == site.values[site.refs[0]].shape)


def binary(keys: set) -> Callable[[Site], bool]:
    """A predicate: a function of two positional arguments in ``keys``, no keyword arguments."""
    return lambda site: site.key in keys and len(site.node.args) == 2 and not site.node.kwargs


def scales(site: Site) -> bool:
    """A product with a constant or a quotient by one: one changed operand of the output's shape, no cached tensor."""
    a, b = site.node.args
    cached = any(isinstance(v, Ref) and isinstance(site.values[v.index], Tensor) and v.index not in site.changed
                 for v in (a, b))
    return (len(site.changed) == 1 and site.shapes_match() and not cached
            and (site.key in MUL or isinstance(a, Ref) and a.index in site.changed))


def cat_dim(site: Site) -> int | None:
    """The dimension of a concatenation of a list of tensors, ``None`` if not one (or written in place)."""
    node = site.node
    if site.key not in CAT or node.inplace or not isinstance(node.args[0], (list, tuple)):
        return None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return dim % site.value.dim() if isinstance(dim, int) else None


def linear_function(site: Site) -> bool:
    """A function linear in its one changed tensor argument (not written in place)."""
    return (site.key is not None and not site.node.inplace and site.changes_first()
            and (site.key in LINEAR_FUNCTIONS or ops.is_linear_pad(site.node)))


def batch_first_attention(node: Node) -> bool:
    """Batch-first ``nn.MultiheadAttention`` without masks: on a flat ``k * B`` batch (vmap has no batching rule for
    CPU flash attention)."""
    op = node.target
    return (node.kind == "module" and isinstance(op, nn.MultiheadAttention) and op.batch_first
            and len(node.args) == 3 and set(node.kwargs) <= {"need_weights"})
