"""The engine's self-check: run once per graph, input shape and loss before the engine is trusted (host reads).

:func:`self_check` is :meth:`dz_lightning.reuse.engine.GraphEngine.self_check`; it runs the engine's plans on a zero
step, so that every node recomputed by a rule that calls the user's code (``Rule.user_code`` of
:mod:`dz_lightning.reuse.selection`) runs once and is seen to leave the model's output unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from dz_lightning.query import query_mode
from dz_lightning.reuse.plan import Plan, UnsupportedGraphError, output_change

__all__ = ["self_check"]


def self_check(engine: Any) -> None:
    """Check ``engine`` (a :class:`~dz_lightning.reuse.engine.GraphEngine`) on its batch.

    Raises:
        UnsupportedGraphError: naming the parameter, and the error or the output change, when a plan fails.
    """
    outputs = engine.values[engine.graph.output]
    if engine.batched_losses:  # the batched loss of a chunk equals loss_fn's value at the base
        with query_mode(engine.model, engine.inputs.device):
            batched = engine.losses(torch.zeros_like(outputs).unsqueeze(0))[0]
        if not torch.allclose(batched, engine.base_loss(), rtol=1e-6, atol=1e-9):
            engine.batched_losses = False
    seen: set[tuple[int, str]] = set()
    for name, plan in engine.plans.items():
        calls = {(i, rule.name) for i, rule, _ in plan.steps if rule.user_code}
        if calls <= seen:
            continue
        seen |= calls
        d = _zero_step(engine, name, plan)
        if d is not None and float(d.abs().max()) > 1e-5 * (1 + float(outputs.abs().max())):
            suspects = [f"{engine.nodes[i].name} ({r.name})" for i, r, _ in plan.steps if r.user_code]
            raise UnsupportedGraphError(f"a zero step of {name!r} changed the outputs by up to "
                                        f"{float(d.abs().max()):.3g} (random or stateful ops recomputed by "
                                        f"{', '.join(suspects[-3:])}); its nodes: {engine.rules(name)}")


def _zero_step(engine: Any, name: str, plan: Plan) -> torch.Tensor | None:
    """The output change of a zero step of parameter ``name``; an error names the node whose rule failed."""
    at: list[int] = []
    with query_mode(engine.model, engine.inputs.device):
        try:
            return output_change(engine, plan, torch.zeros(1, dtype=torch.long, device=engine.inputs.device), 0.0, at)
        except Exception as exc:  # noqa: BLE001 - any failure of a rule means: not a graph for the engine
            node, rule = next(((engine.nodes[i].name, r.name) for i, r, _ in plan.steps if i == at[-1]),
                              ("?", "?")) if at else ("?", "?")
            steps = ", ".join(f"{n} ({r})" for n, r in engine.rules(name))
            raise UnsupportedGraphError(f"node {node!r} ({rule}) failed in a query of {name!r}: "
                                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                                        f"the query's nodes: [{steps}]") from exc
