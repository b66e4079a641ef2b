"""The model-side protocol of the graph engine: ``stages()`` and residual blocks, as a builder of the graph IR.

A staged model is an ordered list of modules whose composition is its forward: an ``nn.Sequential``'s children,
or what its ``stages()`` method returns. Nested ``nn.Sequential`` s are flattened into ops. One block protocol
lets a stage show its inside: ``residual_branch()`` (the ops of the branch, in order), ``shortcut(x)`` (the skip
path) and ``after_add`` (optional, applied to their sum), so that ``block(x) == after_add(branch(x) +
shortcut(x))``. :func:`from_stages` turns this into the same IR that :func:`dz_lightning.reuse.graph.trace` builds;
:func:`verify` checks the protocol against the blocks' own forwards when the engine is built, not mid-training.

The protocol is the fallback for models that ``torch.fx`` cannot trace; any other model needs none of it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dz_lightning.reuse.graph import Graph, Node, Ref, module_node, parameter_names

__all__ = ["flatten_ops", "from_stages", "get_stages", "residual_parts", "verify"]


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


def residual_parts(block: nn.Module) -> tuple[list[nn.Module], nn.Module | None] | None:
    """``(branch ops, after_add)`` of a block exposing the residual protocol, else ``None``."""
    branch = getattr(block, "residual_branch", None)
    if not callable(branch) or not callable(getattr(block, "shortcut", None)):
        return None
    return flatten_ops(list(branch())), getattr(block, "after_add", None)


class _Method(nn.Module):
    """Calls ``getattr(block, method)(*args)`` so that a block's method can go through ``functional_call``."""

    def __init__(self, block: nn.Module, method: str) -> None:
        super().__init__()
        self.block = block
        self.method = method

    def forward(self, *args: Tensor) -> Tensor:
        return getattr(self.block, self.method)(*args)


def _open_block(op: nn.Module, parts: tuple[list[nn.Module], nn.Module | None], path: str, paths: dict[int, str],
                names: dict[int, str], nodes: list[Node]) -> None:
    """Append the nodes of residual block ``op`` (input: the last node): its branch, shortcut, add and after_add."""
    branch, after_add = parts
    x = len(nodes) - 1
    owned = {id(p) for m in branch for p in m.parameters()}
    for i, m in enumerate(branch):
        if any(True for _ in m.parameters()) and not any(m is s for s in op.modules()):
            raise ValueError(f"{type(op).__name__}.residual_branch() returns a {type(m).__name__} with "
                             "parameters that is not a submodule of the block.")
        nodes.append(module_node(paths.get(id(m), f"{path}.branch{i}"), m, (Ref(len(nodes) - 1),), {}, names))
    branch_out = len(nodes) - 1
    shortcut = module_node(f"{path}.shortcut", _Method(op, "shortcut"), (Ref(x),), {}, names)
    after = list(after_add.parameters()) if after_add is not None else []
    shortcut.sees = frozenset(local for local, p in _Method(op, "shortcut").named_parameters()
                              if id(p) not in owned and not any(p is q for q in after))
    nodes.append(shortcut)
    nodes.append(Node(f"{path}.add", "function", operator.add, (Ref(branch_out), Ref(len(nodes) - 1))))
    if after_add is not None:
        nodes.append(module_node(f"{path}.after_add", after_add, (Ref(len(nodes) - 1),), {}, names))


def from_stages(model: nn.Module) -> Graph:
    """The IR of a staged model: one node per op, residual blocks opened into branch, shortcut, add, after_add.

    Raises:
        ValueError: the model is not staged, a parameter belongs to no stage, or a residual branch returns a
            module with parameters that is not a submodule of its block.
    """
    stages = get_stages(model)
    if stages is None:
        raise ValueError(f"{type(model).__name__} is not staged: make it an nn.Sequential or define `stages()`.")
    names = parameter_names(model)
    paths = {id(m): path for path, m in model.named_modules()}
    nodes: list[Node] = [Node("input", "input")]
    checks: list[tuple[nn.Module, int, int]] = []
    for j, op in enumerate(flatten_ops(stages)):
        x = len(nodes) - 1
        parts = residual_parts(op)
        path = paths.get(id(op), f"op{j}")
        if parts is None:
            nodes.append(module_node(path, op, (Ref(x),), {}, names))
            continue
        _open_block(op, parts, path, paths, names, nodes)
        checks.append((op, x, len(nodes) - 1))
    covered = {full for node in nodes for full in node.params.values()}
    for name, _ in model.named_parameters():
        if name not in covered:
            raise ValueError(f"Parameter {name!r} belongs to no stage of {type(model).__name__}: the stages must "
                             "compose to the whole model.")
    return Graph(nodes, len(nodes) - 1, checks)


def verify(graph: Graph, values: list[Any], params: dict[str, Tensor]) -> None:
    """Check every residual block of ``graph`` against its own forward on the cached values, and mark shortcuts
    that are the identity or linear (then they act on a difference alone). Runs once, when the engine is built.

    Raises:
        ValueError: ``after_add(residual_branch(x) + shortcut(x))`` differs from the block's ``forward(x)``.
    """
    for block, x, out in getattr(graph, "checks", []):
        block_params = {local: params[full] for local, full in module_node("", block, (), {},
                                                                           _names_of(graph, block)).params.items()}
        expected = functional_call(block, block_params, (values[x],))
        if not torch.allclose(values[out], expected, rtol=1e-4, atol=1e-5):
            raise ValueError(f"{type(block).__name__}: after_add(residual_branch(x) + shortcut(x)) differs from its "
                             "forward(x); fix the residual protocol or remove it.")
    for i, node in enumerate(graph.nodes):
        if node.kind == "module" and isinstance(node.target, _Method):
            x = node.args[0].index
            node.identity = values[i] is values[x]
            node.linear = node.identity or _is_linear(node, values[x], params)
            if node.identity:  # its readers read its input: the same graph as a traced `out + x`
                for reader in graph.nodes[i + 1 :]:
                    reader.args = tuple(Ref(x) if isinstance(a, Ref) and a.index == i else a for a in reader.args)


def _names_of(graph: Graph, block: nn.Module) -> dict[int, str]:
    """``id(parameter) -> full name`` for the parameters of ``block``, from the graph's module nodes."""
    names: dict[int, str] = {}
    for node in graph.nodes:
        if node.kind == "module":
            for local, full in node.params.items():
                names[id(node.target.get_parameter(local))] = full
    return names


def _is_linear(node: Node, x: Tensor, params: dict[str, Tensor]) -> bool:
    """Whether a shortcut is linear (subsampling, zero padding, a bias-free projection), checked on random inputs."""
    values = {local: params[full] for local, full in node.params.items()}
    gen = torch.Generator(device=x.device).manual_seed(0)
    a, b = (torch.randn(x.shape, generator=gen, device=x.device).contiguous(
        memory_format=torch.channels_last if x.dim() == 4 and x.stride(1) == 1 else torch.contiguous_format)
        for _ in range(2))

    def run(h: Tensor) -> Tensor:
        return functional_call(node.target, values, (h,))

    sa, sb = run(a), run(b)
    return (torch.allclose(run(a + b), sa + sb, rtol=1e-5, atol=1e-5)
            and torch.allclose(run(2.5 * a), 2.5 * sa, rtol=1e-5, atol=1e-5))
