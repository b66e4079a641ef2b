"""The engine's per-parameter plans: every node a perturbation changes, in order, with its registered rule.

:func:`compile_plan` runs once per parameter when the engine is built (the rules come from
:func:`dz_lightning.reuse.selection.select`); :func:`output_change` runs a plan for one chunk of queries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import dz_lightning.reuse.rules as rules
from dz_lightning.reuse.graph import Graph, UntraceableError
from dz_lightning.reuse.selection import Change, Rule, Site, is_tensors, select

__all__ = ["Plan", "Query", "UnsupportedGraphError", "compile_plan", "output_change"]


class UnsupportedGraphError(UntraceableError):
    """The traced graph has a node the engine cannot carry a change through; the message names it."""


@dataclasses.dataclass(frozen=True)
class Query:
    """One chunk: entries ``index`` of the parameter move by ``delta``; ``starts``: node -> its local name there."""

    index: Tensor
    delta: float
    starts: Mapping[int, str]

    def start_local(self, i: int) -> str | None:
        return self.starts.get(i)


@dataclasses.dataclass
class Plan:
    """``steps``: (node, its rule, the states freed after it); ``starts``: node -> the local name perturbed there;
    ``bytes_per_query``: a chunk's footprint per query (the largest value it changes)."""

    steps: list[tuple[int, Rule, list[int]]]
    starts: dict[int, str]
    bytes_per_query: int


def compile_plan(graph: Graph, values: Sequence[Any], users: list[list[int]], name: str) -> Plan:
    """The plan of a perturbation of parameter ``name``.

    Raises:
        UnsupportedGraphError: a node it changes returns something other than tensors or sizes.
    """
    kinds: dict[int, str] = {}
    steps: list[tuple[int, Rule]] = []
    starts: dict[int, str] = {}
    for i, node in enumerate(graph.nodes):
        if not users[i] and i != graph.output:  # nothing reads it (e.g. a protocol identity shortcut)
            continue
        local = "" if node.kind == "param" and node.target == name else next(
            (loc for loc, full in node.perturbable().items() if full == name), None)
        changed = {j: kinds[j] for j in dict.fromkeys(node.refs()) if j in kinds}
        if (local is None and not changed) or _is_size(values[i]):  # shapes do not depend on parameter values
            continue
        if not isinstance(values[i], Tensor) and not is_tensors(values[i]):
            raise UnsupportedGraphError(f"node {node.name!r} returns a {type(values[i]).__name__} that depends on "
                                        f"parameter {name!r}; the engine carries changes of tensors only.")
        if local is not None:
            starts[i] = local
        rule, kinds[i] = select(Site(node, changed, values, i, local))
        steps.append((i, rule))
    last: dict[int, int] = {}
    for pos, (i, _) in enumerate(steps):
        for j in graph.nodes[i].refs():
            if j in kinds:
                last[j] = pos
    frees = [[j for j, p in last.items() if p == pos and j != graph.output] for pos in range(len(steps))]
    sizes = [_footprint(values[i], kinds[i]) for i, _ in steps]
    return Plan([(i, rule, frees[pos]) for pos, (i, rule) in enumerate(steps)], starts, max(sizes, default=1))


def output_change(ctx: Any, plan: Plan, index: Tensor, delta: float, at: list[int] | None = None) -> Tensor | None:
    """Each query's change of the model's output ``(k, *outputs.shape)`` (``ctx``: the engine); ``None``: it does not
    reach it. ``at`` (the self-check's) receives the index of each node before its rule runs."""
    q = Query(index, delta, plan.starts)
    states: dict[int, Change] = {}
    for i, rule, frees in plan.steps:
        if at is not None:
            at.append(i)
        states[i] = rule.apply(ctx, i, states, q)
        for j in frees:
            states.pop(j, None)
    out = ctx.graph.output
    return rules.full(ctx, out, states[out]) if out in states else None


def nbytes(value: Tensor) -> int:
    return max(1, value.numel() * value.element_size())


def _footprint(value: Any, kind: str) -> int:
    """Bytes of one query's change at a node. A one-channel change of a feature map counts one channel
    (simple_cnn's conv layers ran 1.4x slower per step with such changes counted whole); one feature of a
    ``(B, features)`` value counts whole (a dense MLP step ran slower with the larger chunks)."""
    if kind == "parts":
        return sum(nbytes(v) for v in value if v is not None)
    return nbytes(value) // (value.shape[1] if kind == "chan" and value.dim() > 2 else 1)


def _is_size(value: Any) -> bool:
    if isinstance(value, (int, torch.Size)):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value)
