"""The graph IR of the graph engine, and its builder from ``torch.fx`` symbolic tracing.

A model's forward is a list of :class:`Node` s in topological order. Every node reads its inputs through
:class:`Ref` s to earlier nodes; the engine (:mod:`dz_lightning.reuse.engine`) caches every node's value in one base
forward and, for a perturbed parameter, recomputes only the nodes downstream of the nodes that read it.

Two builders produce this IR: :func:`trace` (any model that ``torch.fx`` can trace; ``torch.nn`` modules stay
single nodes) and :func:`dz_lightning.reuse.protocol.from_stages` (the hand-written ``stages()`` / residual protocol).
The same propagation runs on either, so a model built both ways takes the same computation.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import os
import traceback
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.fx.node import map_aggregate

__all__ = ["Graph", "Node", "Ref", "UntraceableError", "map_refs", "trace"]


@dataclasses.dataclass(frozen=True)
class Ref:
    """A reference to the value of node ``index``."""

    index: int


def map_refs(a: Any, fn: Callable[[Ref], Any]) -> Any:
    """``a`` with every :class:`Ref` in it replaced by ``fn(ref)``, through nested tuples, lists and dicts."""
    return map_aggregate(a, lambda v: fn(v) if isinstance(v, Ref) else v)


@dataclasses.dataclass
class Node:
    """One operation of the forward.

    Attributes:
        name: a readable name (the fx node's name, or the stage's path).
        kind: ``"input"`` (the batch), ``"param"`` (a parameter read directly: ``target`` is its full name),
            ``"constant"`` (``target`` is the value), ``"module"`` (``target`` is the module, called through
            ``functional_call``), ``"function"`` (``target`` is a callable) or ``"method"`` (``target`` is the name
            of a method of the first argument).
        target: see ``kind``.
        args: positional arguments, with :class:`Ref` s to other nodes, nested in lists/tuples as the call needs.
        kwargs: keyword arguments, as ``args``.
        params: for a module node, ``local name -> full parameter name`` of every parameter the module reads.
        sees: the local names whose perturbation starts at this node (default: all of ``params``).
        linear: ``True`` when the node is known to be linear in its (single) tensor input, so that it acts on a
            difference alone; ``None``: decided by the rules from the op's type.
        identity: the node returns its first input unchanged.
    """

    name: str
    kind: str
    target: Any = None
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    sees: frozenset[str] | None = None
    linear: bool | None = None
    identity: bool = False

    def refs(self) -> list[int]:
        """Indices of the nodes this node reads, in argument order (repeats kept)."""
        found: list[int] = []
        map_refs((self.args, self.kwargs), lambda r: found.append(r.index))
        return found

    def perturbable(self) -> dict[str, str]:
        """``local -> full`` names whose perturbation starts at this node."""
        if self.sees is None:
            return self.params
        return {local: full for local, full in self.params.items() if local in self.sees}

    @property
    def inplace(self) -> bool:
        """Whether the op may write into its first input (``nn.ReLU(inplace=True)``, ``x.relu_()``, ...)."""
        if self.kind == "module":
            return bool(getattr(self.target, "inplace", False))
        if self.kind == "method":
            return self.target.endswith("_") and not self.target.endswith("__")
        if self.kind == "function":
            return bool(self.kwargs.get("inplace", False)) or self.target in (operator.iadd, operator.imul)
        return False


@dataclasses.dataclass
class Graph:
    """Nodes in topological order; ``output`` is the node whose value is the model's output."""

    nodes: list[Node]
    output: int
    checks: list = dataclasses.field(default_factory=list)  # protocol blocks to check against their forwards
    # the engine's self-check on this graph, per (input shape, dtype, device type, loss): None when it passed with
    # batched losses, False when it passed with per-query losses, or why the graph cannot be used
    verdicts: dict[tuple, bool | str | None] = dataclasses.field(default_factory=dict)

    def users(self) -> list[list[int]]:
        """For each node, the nodes that read it."""
        users: list[list[int]] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for j in dict.fromkeys(node.refs()):
                users[j].append(i)
        return users


class UntraceableError(ValueError):
    """``torch.fx`` could not trace the model; the message names the construct that stopped it."""


def _where(exc: BaseException) -> str:
    """``file:line (function): source`` of the innermost frame outside torch, where tracing stopped."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename.replace("\\", "/") and f.filename != __file__]
    if not frames:
        return ""
    f = frames[-1]
    path = os.path.relpath(f.filename) if not os.path.relpath(f.filename).startswith("..") else f.filename
    return f" at `{(f.line or '').strip()}` ({path}:{f.lineno}, {f.name})"


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> full name`` (the first name of a shared parameter)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return names


def module_node(name: str, module: nn.Module, args: tuple, kwargs: dict, names: dict[int, str]) -> Node:
    """A module node reading ``module``'s parameters under their full names in ``names``."""
    params = {local: names[id(p)] for local, p in module.named_parameters()}
    return Node(name, "module", module, args, kwargs, params)


def trace(model: nn.Module, leaf: Callable[[nn.Module, str], bool] | None = None) -> Graph:
    """The IR of ``model`` from ``torch.fx.symbolic_trace`` (modules of ``torch.nn`` stay single nodes).

    Args:
        model: the network; its forward must take one tensor (further arguments need defaults). The oracles call
            ``model(inputs)``, so every further argument is traced as the constant it defaults to (``torch.fx``
            ``concrete_args``): a branch on it (``if return_interval:``) is resolved as in those calls.
        leaf: optional extra test ``(module, qualified_name) -> bool`` for modules kept as single nodes.

    Raises:
        UntraceableError: tracing failed (data-dependent control flow, an unsupported call) or the graph has a
            form the engine does not take (several tensor inputs, an output that is not one tensor); the message
            names the construct and where it is.
    """
    import torch.fx as fx

    fx_graph = _fx_graph(model, leaf)
    names = parameter_names(model)
    nodes: list[Node] = []
    index: dict[fx.Node, int] = {}
    output = None
    for n in fx_graph.nodes:
        if n.op == "output":
            if not isinstance(n.args[0], fx.Node):
                raise UntraceableError(f"{type(model).__name__}.forward returns {type(n.args[0]).__name__}, not one "
                                       "tensor; the engine computes a loss of one output tensor.")
            output = index[n.args[0]]
            continue
        index[n] = len(nodes)
        nodes.append(_node(model, n, names, lambda a: fx.node.map_arg(a, lambda v: Ref(index[v]))))
        if nodes[-1].kind == "input" and any(m.kind == "input" for m in nodes[:-1]):
            raise UntraceableError(f"{type(model).__name__}.forward takes more than one input ({n.name!r}); "
                                   "the engine feeds it one batch.")
    if sum(node.kind == "input" for node in nodes) != 1 or output is None:
        raise UntraceableError(f"{type(model).__name__}.forward must take one tensor and return one tensor.")
    return Graph(_alias_inplace(nodes), output)


def _fx_graph(model: nn.Module, leaf: Callable[[nn.Module, str], bool] | None) -> Any:
    """``model``'s ``torch.fx`` graph (``torch.nn`` modules and ``leaf`` ones kept as single nodes)."""
    import torch.fx as fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return super().is_leaf_module(m, qualname) or (leaf is not None and leaf(m, qualname))

    try:
        fx_graph = _Tracer().trace(model, concrete_args=_defaults(model))
        _drop_guards(fx_graph)
    except Exception as exc:  # noqa: BLE001 - any failure of the tracer means: no traced graph
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UntraceableError(f"torch.fx could not trace {type(model).__name__}{_where(exc)}: "
                               f"{type(exc).__name__}: {message}") from exc
    return fx_graph


def _node(model: nn.Module, n: Any, names: dict[int, str], conv: Callable[[Any], Any]) -> Node:
    """The IR node of fx node ``n`` (not an output); ``conv`` turns its fx arguments into :class:`Ref` s."""
    if n.op == "placeholder":  # an argument with a default value is a constant
        return Node(n.name, "constant", n.args[0]) if n.args else Node(n.name, "input")
    if n.op == "get_attr":
        value = _attr(model, n.target)
        if isinstance(value, nn.Parameter):
            return Node(n.name, "param", names[id(value)])
        return Node(n.name, "constant", value)
    if n.op == "call_module":
        return module_node(n.name, model.get_submodule(n.target), conv(n.args), conv(dict(n.kwargs)), names)
    if n.op in ("call_function", "call_method"):
        kind = "function" if n.op == "call_function" else "method"
        # `view` needs contiguous strides; the engine keeps activations channels-last on CPU
        target = "reshape" if n.target == "view" else n.target
        return Node(n.name, kind, target, conv(n.args), conv(dict(n.kwargs)))
    raise UntraceableError(f"unknown fx node kind {n.op!r}")  # pragma: no cover - fx has no other node kinds


_CONSTANT_TYPES = (type(None), bool, int, float, str)


def _defaults(model: nn.Module) -> dict[str, Any] | None:
    """``name -> default`` of ``model.forward``'s arguments after the first, where each is a plain constant (the
    oracles never pass them); ``None`` when there are none."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C-implemented forward: nothing to specialize
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    args = [p for p in signature.parameters.values() if p.kind in kinds]
    concrete = {p.name: p.default for p in args[1:]
                if p.default is not inspect.Parameter.empty and isinstance(p.default, _CONSTANT_TYPES)}
    return concrete or None


def _drop_guards(fx_graph: Any) -> None:
    """Remove the ``torch._assert(arg == default)`` guards fx adds for ``concrete_args``: they read no tensor and
    would only be evaluated (as constants) in every base forward."""
    import torch

    for n in list(fx_graph.nodes):
        if n.op == "call_function" and n.target is torch._assert and not n.users:
            check = n.args[0]
            fx_graph.erase_node(n)
            if (getattr(check, "target", None) is operator.eq and not check.users
                    and any(getattr(a, "op", None) == "placeholder" for a in check.args)):
                fx_graph.erase_node(check)


def _alias_inplace(nodes: list[Node]) -> list[Node]:
    """After an in-place op on node ``j`` (``x.relu_()``, ``nn.ReLU(inplace=True)(x)``), later readers of ``j``
    see the written value: they read the in-place node instead, so that the engine can keep ``j``'s value as it
    was (it copies the input of an in-place op in the base forward)."""
    alias: dict[int, int] = {}
    for i, node in enumerate(nodes):
        if alias:
            node.args, node.kwargs = map_refs((node.args, node.kwargs), lambda r: Ref(alias.get(r.index, r.index)))
        if node.inplace and node.args and isinstance(node.args[0], Ref):
            alias[node.args[0].index] = i
    return nodes


def _attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
