"""Feature reuse: the entry point of the graph engine for the oracles.

:func:`build_graph_engine` gives any model an engine that caches every activation of one base forward and recomputes,
for each perturbed coordinate, only what the perturbation changes, as a difference from the cache
(:class:`~dz_lightning.reuse.engine.GraphEngine`). The model's graph comes from ``torch.fx`` tracing
(:func:`dz_lightning.reuse.graph.trace`); a model that cannot be traced but defines ``stages()`` (or is an
``nn.Sequential``) gets the graph of its hand-written protocol (:func:`dz_lightning.reuse.protocol.from_stages`); any
other model gets ``None`` and one warning that names the construct that stopped the tracer. Both graphs run
through the same propagation rules (:mod:`dz_lightning.reuse.rules`).

The rooms of the package: :mod:`~dz_lightning.reuse.graph` (the IR and the fx builder),
:mod:`~dz_lightning.reuse.protocol` (the model-side ``stages()`` / residual protocol, checked when the engine is
built), :mod:`~dz_lightning.reuse.selection` (the rule registry, looked up by precedence),
:mod:`~dz_lightning.reuse.rules` (every propagation rule with its registration; the keys and predicates they test in
:mod:`~dz_lightning.reuse.predicates`) and :mod:`~dz_lightning.reuse.ops` (their op-level math, with
:mod:`~dz_lightning.reuse.differences`), :mod:`~dz_lightning.reuse.plan` (per-parameter plans),
:mod:`~dz_lightning.reuse.check` (the self-check), :mod:`~dz_lightning.reuse.engine` (base forward, the rules'
caches, chunks, losses) and, outside the package, :mod:`~dz_lightning.query` (the query context and the
memory-budget rule).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from dz_lightning.reuse.differences import per_example_loss
from dz_lightning.reuse.engine import GraphEngine
from dz_lightning.reuse.graph import Graph, UntraceableError, trace
from dz_lightning.reuse.plan import UnsupportedGraphError
from dz_lightning.reuse.protocol import flatten_ops, from_stages, get_stages, residual_parts

__all__ = ["GraphEngine", "StagedForward", "UnsupportedGraphError", "UntraceableError", "build_graph_engine",
           "flatten_ops", "get_stages", "residual_parts", "traced_graph"]


class StagedForward(GraphEngine):
    """The engine on the graph of a staged model's hand-written protocol (``nn.Sequential``, ``stages()``,
    residual blocks; see :mod:`dz_lightning.reuse.protocol`). Arguments as
    :class:`~dz_lightning.reuse.engine.GraphEngine`, less ``graph``.

    Raises:
        ValueError: the model is not staged, a parameter belongs to no stage, a residual protocol disagrees with
            the block's forward, or ``delta_dtype`` is not valid.
    """

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(from_stages(model), model, *args, **kwargs)


# model -> {structure key: its graph, or why it could not be traced}
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Graph | str]] = weakref.WeakKeyDictionary()


def traced_graph(model: nn.Module) -> Graph:
    """``model``'s traced graph, traced once per model, module structure and train/eval setting (a forward may
    read ``self.training``).

    Raises:
        UntraceableError: naming the construct that stopped the tracer.
    """
    key = tuple((name, id(m), m.training) for name, m in model.named_modules())  # a swapped module: traced anew
    graphs = _GRAPHS.setdefault(model, {})
    if key not in graphs:
        if len(graphs) >= 4:  # modules swapped again and again: keep the latest few
            graphs.pop(next(iter(graphs)))
        try:
            graphs[key] = trace(model)
        except UntraceableError as exc:  # the message only: a traceback's frames would hold the model
            graphs[key] = str(exc)
    if isinstance(graphs[key], str):
        raise UntraceableError(graphs[key])
    return graphs[key]


def build_graph_engine(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor,
                 params: Mapping[str, Tensor] | None = None, *, self_check: bool = True,
                 **options: Any) -> GraphEngine | None:
    """The feature-reuse engine for ``model``: on its traced graph, else on its ``stages()`` protocol, else
    ``None`` (with one warning per model type, naming what stopped the tracer).

    This is the one entry point the oracles use; the arguments are those of
    :class:`~dz_lightning.reuse.engine.GraphEngine`, less ``graph``, with ``max_batch``, ``memory_budget`` and
    ``delta_dtype`` as keyword ``options``.

    Args:
        self_check: run :meth:`~dz_lightning.reuse.engine.GraphEngine.self_check` (host reads) the first time the
            traced graph meets an input shape, dtype, device type and loss function; its verdict is remembered,
            a failure included (later batches go straight to the fallback, without a base forward). ``False``
            trusts the graph without checking (the engine then makes no host read when it is built).
    """
    unknown = options.keys() - {"max_batch", "memory_budget", "delta_dtype"}
    if unknown:
        raise TypeError(f"build_graph_engine got unexpected options {sorted(unknown)}; valid: max_batch, "
                        "memory_budget, delta_dtype, self_check.")
    try:
        return _traced_engine(model, loss_fn, inputs, targets, params, self_check, options)
    except UntraceableError as exc:  # UnsupportedGraphError included
        reason = str(exc).rstrip(".")
    if get_stages(model) is not None:
        _warn_once(model, reason, "Feature reuse uses its `stages()` protocol instead.")
        return StagedForward(model, loss_fn, inputs, targets, params, **options)
    _warn_once(model, reason, "CGE runs the full forward for every query (no `stages()` either).")
    return None


def _traced_engine(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor,
                   params: Mapping[str, Tensor] | None, self_check: bool, options: dict[str, Any]) -> GraphEngine:
    """The engine on ``model``'s traced graph, self-checked once per kind of batch (the verdict kept on the graph).

    Raises:
        UntraceableError: the model cannot be traced, or the engine failed on this kind of batch, now or before.
    """
    graph = traced_graph(model)
    key = (tuple(inputs.shape), inputs.dtype, inputs.device.type, _loss_key(loss_fn))
    verdict = graph.verdicts.get(key)
    if isinstance(verdict, str):  # failed before on this kind of batch: no engine, no base forward
        raise UntraceableError(verdict)
    try:
        engine = GraphEngine(graph, model, loss_fn, inputs, targets, params, **options)
        if self_check and key not in graph.verdicts:
            engine.self_check()
            graph.verdicts[key] = None if engine.batched_losses else False
    except UnsupportedGraphError as exc:
        graph.verdicts[key] = str(exc)
        raise
    engine.batched_losses = engine.batched_losses and graph.verdicts.get(key) is not False
    return engine


def _loss_key(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Any:
    """What the self-check's verdict depends on of the loss: nothing for a loss without a per-example form (it is
    called as it is), else the known function, or a loss module's type and settings (no reference to the oracle)."""
    if per_example_loss(loss_fn) is None:
        return None
    if isinstance(loss_fn, nn.Module):
        return (type(loss_fn), tuple(sorted((k, v) for k, v in vars(loss_fn).items()
                                            if isinstance(v, (int, float, str, bool, type(None))))))
    return loss_fn


_WARNED: set[type] = set()
_LOG = logging.getLogger(__name__)
_LIMIT = 300  # characters of the warning; the whole reason is logged at DEBUG level


def _warn_once(model: nn.Module, reason: str, consequence: str) -> None:
    """One warning per model type, under 300 characters: the cause first, then what follows; the whole reason
    (every node of the failed plan, say) goes to the ``dz_lightning.reuse`` logger at DEBUG level."""
    if type(model) in _WARNED:
        return
    _WARNED.add(type(model))
    _LOG.debug("feature reuse for %s: %s", type(model).__name__, reason)
    more = " Details: logger 'dz_lightning.reuse', DEBUG."
    room = _LIMIT - 1 - len(f"{type(model).__name__}: . {consequence}{more}")
    short, more = (reason, "") if len(reason) <= room else (reason[: room - 3].rstrip() + "...", more)
    warnings.warn(f"{type(model).__name__}: {short}. {consequence}{more}", stacklevel=4)
