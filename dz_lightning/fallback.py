"""Full forwards at K parameter points: the path of a model that has no feature-reuse engine.

A model that ``torch.fx`` cannot trace and that has no ``stages()`` answers every query with a full forward. There
are three ways to run K of them, and which is fastest (or works at all) depends on the model, on the parameter that
varies and on the machine:

* ``vmap``: :func:`vmap_points` with the inputs shared by every point; what lies upstream of the varied parameter is
  computed once. Fails on data-dependent control flow, on NumPy or ``.item()`` reads of varying values and on an
  in-place write of a varying value into a tensor that does not vary (``out += shortcut(x)``).
* ``vmap_per_point``: the same with the inputs expanded (not copied) to one batch per point, so that every
  activation varies; gets past the in-place case, at the price of recomputing the upstream part per point.
  Tried only where ``vmap`` fails.
* ``loop``: one ``functional_call`` per point; always works, costs one Python forward per point.

:class:`FullForwards` picks one per situation (model structure and train/eval mode, the varied parameter names, the
number K of points per call, the input shape, dtype and device; chunk shapes are fixed per run, so a situation
recurs every step): at the first call of a new situation each strategy that has not failed there is timed on a
few of its points (the only host synchronisation, on CUDA), and the fastest answers the K points of that call and of
every later call. A failure is remembered (per model structure, varied names and strategy), so it is never
repeated. The choices are data (:func:`choices`), and one warning per model type names the first one.
"""

from __future__ import annotations

import contextlib
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

__all__ = ["STRATEGIES", "Choice", "FullForwards", "choices", "loop_points", "parameter_values", "vmap_points"]


Fresh = Callable[[], AbstractContextManager]
"""A context entered around each forward: where random draws start (``contextlib.nullcontext``: unchanged)."""


def parameter_values(module: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """All of ``module``'s parameters by name, taking the values in ``params`` where it names them."""
    return {n: params.get(n, p) for n, p in module.named_parameters()}


def vmap_points(module: nn.Module, params: Mapping[str, Tensor], varied: Mapping[str, Tensor], inputs: Tensor, *,
                per_point_inputs: bool = False, then: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``module`` evaluated at K parameter points as one batched computation (``vmap`` over ``functional_call``).

    Point ``k`` takes ``varied[name][k]`` for the names in ``varied`` and ``params`` (or the module's own value) for
    every other parameter. The caller chooses the context (no autograd, precision: :func:`~dz_lightning.query.
    query_mode`). A black box that cannot run under ``vmap`` goes after this call, on the result reshaped to one
    flat ``(K * B, ...)`` batch.

    Args:
        module: the white-box network.
        params: name -> value, the fixed part of every point.
        varied: name -> stacked values ``(K, *shape)``.
        inputs: ``(B, ...)`` shared by every point, or ``(K, B, ...)`` (one batch per point) with ``per_point_inputs``.
        per_point_inputs: whether ``inputs`` has a leading K dimension.
        then: applied to each point's outputs inside ``vmap`` (e.g. ``outputs -> loss``); it must be vmap-able.

    Returns:
        ``(K, B, ...)`` outputs, or ``(K, ...)`` values of ``then``.

    Raises:
        RuntimeError: what ``vmap`` raises where the module cannot run batched (see :class:`FullForwards`).
    """
    fixed = {n: v for n, v in parameter_values(module, params).items() if n not in varied}
    names = list(varied)

    def one(x: Tensor, *values: Tensor) -> Tensor:
        point = dict(fixed)
        point.update(zip(names, values, strict=True))
        out = functional_call(module, point, (x,))
        return out if then is None else then(out)

    in_dims = (0 if per_point_inputs else None, *([0] * len(names)))
    return vmap(one, in_dims=in_dims, randomness="same")(inputs, *(varied[n] for n in names))


def loop_points(module: nn.Module, params: Mapping[str, Tensor], varied: Mapping[str, Tensor], inputs: Tensor, *,
                then: Callable[[Tensor], Tensor] | None = None, fresh: Fresh = contextlib.nullcontext) -> Tensor:
    """As :func:`vmap_points` with shared inputs ``(B, ...)``, one plain ``functional_call`` per point, each inside
    ``fresh()`` (e.g. :func:`~dz_lightning.query.common_random_numbers`: every point draws the same dropout masks).

    Returns:
        ``(K, B, ...)`` outputs, or ``(K, ...)`` values of ``then``.
    """
    full = parameter_values(module, params)
    k = next(iter(varied.values())).shape[0]
    out = []
    for i in range(k):
        point = dict(full)
        point.update({n: v[i] for n, v in varied.items()})
        with fresh():
            value = functional_call(module, point, (inputs,))
            out.append(value if then is None else then(value))
    return torch.stack(out)


def _vmap_shared(module: nn.Module, params: Mapping[str, Tensor], varied: Mapping[str, Tensor], inputs: Tensor,
                 then: Callable[[Tensor], Tensor] | None, fresh: Fresh) -> Tensor:
    with fresh():  # one draw of each random op, shared by the points (randomness="same")
        return vmap_points(module, params, varied, inputs, then=then)


def _vmap_per_point(module: nn.Module, params: Mapping[str, Tensor], varied: Mapping[str, Tensor], inputs: Tensor,
                    then: Callable[[Tensor], Tensor] | None, fresh: Fresh) -> Tensor:
    k = next(iter(varied.values())).shape[0]
    with fresh():
        return vmap_points(module, params, varied, inputs.expand(k, *inputs.shape), per_point_inputs=True, then=then)


def _loop(module: nn.Module, params: Mapping[str, Tensor], varied: Mapping[str, Tensor], inputs: Tensor,
          then: Callable[[Tensor], Tensor] | None, fresh: Fresh) -> Tensor:
    return loop_points(module, params, varied, inputs, then=then, fresh=fresh)


@dataclass(frozen=True)
class _Strategy:
    """One way to run K full forwards; ``run(module, params, varied, inputs, then, fresh) -> (K, ...)``."""

    name: str
    description: str
    run: Callable[..., Tensor]
    may_fail: bool  # the loop never fails where the model itself works: its error is the model's own


STRATEGIES: dict[str, _Strategy] = {s.name: s for s in (
    _Strategy("vmap", "vmap with shared inputs", _vmap_shared, True),
    _Strategy("vmap_per_point", "vmap with per-point inputs", _vmap_per_point, True),
    _Strategy("loop", "a Python loop over points", _loop, False),
)}
"""name -> strategy, in the order they are tried."""


@dataclass
class Choice:
    """What :class:`FullForwards` chose for one situation, and why.

    Attributes:
        strategy: the name of the strategy in use (a key of :data:`STRATEGIES`).
        points_per_s: strategy name -> points per second on the timed trial (the strategies that ran).
        failed: strategy name -> the first line of the error it raised here.
    """

    strategy: str
    points_per_s: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def ratio(self) -> float | None:
        """The chosen strategy's measured speed over the loop's; ``None`` when either was not measured."""
        loop, best = self.points_per_s.get("loop"), self.points_per_s.get(self.strategy)
        return None if loop is None or best is None else best / loop


# model -> {situation: Choice}; held weakly so that a model is never kept alive by its choices
_CHOICES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Choice]] = weakref.WeakKeyDictionary()
# model -> {(structure, varied names, strategy name): error}: a failure is never repeated
_FAILED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, str]] = weakref.WeakKeyDictionary()
_MAX_SITUATIONS = 4096  # per model: modules swapped again and again keep the latest ones
_WARNED: set[type] = set()


def choices(model: nn.Module) -> dict[tuple, Choice]:
    """The choices made so far for ``model``: situation ``(structure, varied names, K, input shape, dtype,
    device)`` -> :class:`Choice` (a shallow copy of the table)."""
    return dict(_CHOICES.get(model, {}))


def _structure(model: nn.Module) -> tuple:
    # a swapped submodule or a train/eval switch (a forward may read `self.training`) is a new situation
    return tuple((name, id(m), m.training) for name, m in model.named_modules())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FullForwards:
    """K points of a module by full forwards, with the strategy that is fastest there (see the module docstring).

    Args:
        strategy: ``"auto"`` (time the strategies once per situation and keep the fastest), ``"first_working"``
            (the first of :data:`STRATEGIES` that works there, failures remembered) or one of :data:`STRATEGIES`
            (always that one). All but ``"auto"`` give results that do not depend on timings: strategies agree only
            to rounding, so ranks or runs that chose differently would differ in the last bits.
        trial_points: most points of the timed trial (at most an eighth of the K points of the call). A ``vmap``
            strategy runs it twice, timing the second (a first call allocates and picks kernels for new shapes);
            the loop once, in the base forward's shapes.

    Raises:
        ValueError: ``strategy`` or ``trial_points`` is not valid.
    """

    def __init__(self, strategy: str = "auto", trial_points: int = 8) -> None:
        if strategy not in ("auto", "first_working", *STRATEGIES):
            raise ValueError(f"Expected argument `fallback` to be 'auto', 'first_working' or one of "
                             f"{list(STRATEGIES)}, but got {strategy!r}.")
        if not isinstance(trial_points, int) or isinstance(trial_points, bool) or trial_points < 1:
            raise ValueError(f"Expected argument `trial_points` to be a positive int, but got {trial_points!r}.")
        self.strategy, self.trial_points = strategy, trial_points

    def __call__(self, module: nn.Module, params: Mapping[str, Tensor], varied: Mapping[str, Tensor],
                 inputs: Tensor, then: Callable[[Tensor], Tensor] | None = None,
                 fresh: Fresh = contextlib.nullcontext) -> Tensor:
        """``module`` at K points: ``(K, B, ...)`` outputs, or ``(K, ...)`` values of ``then``.

        Arguments as :func:`vmap_points` with shared ``inputs`` ``(B, ...)``; ``then`` must be vmap-able. ``fresh()``
        is entered around every forward (each point of the loop, each ``vmap`` call, trials included): with
        :func:`~dz_lightning.query.common_random_numbers` every forward draws the same dropout masks.
        """
        if self.strategy == "first_working":
            return self._first_working(module, params, varied, inputs, then, fresh)
        if self.strategy != "auto":
            return STRATEGIES[self.strategy].run(module, params, varied, inputs, then, fresh)
        structure, names = _structure(module), tuple(sorted(varied))
        k = next(iter(varied.values())).shape[0]  # chunk shapes are fixed per run: a situation recurs every step
        situation = (structure, names, k, tuple(inputs.shape), inputs.dtype, inputs.device)
        known = _CHOICES.setdefault(module, {})
        choice = known.get(situation)
        if choice is None:
            return self._choose(module, params, varied, inputs, then, fresh, situation, known)
        try:
            return STRATEGIES[choice.strategy].run(module, params, varied, inputs, then, fresh)
        except Exception as err:  # a vmap strategy that worked in its trial and fails now: never again here
            if not STRATEGIES[choice.strategy].may_fail:
                raise
            _FAILED.setdefault(module, {})[(structure, names, choice.strategy)] = _first_line(err)
            del known[situation]
            return self(module, params, varied, inputs, then, fresh)

    def _first_working(self, module: nn.Module, params: Mapping[str, Tensor], varied: Mapping[str, Tensor],
                       inputs: Tensor, then: Callable[[Tensor], Tensor] | None, fresh: Fresh) -> Tensor:
        """The first strategy, in the order of :data:`STRATEGIES`, that has not failed here (failures remembered)."""
        failed = _FAILED.setdefault(module, {})
        structure, names = _structure(module), tuple(sorted(varied))
        for strategy in STRATEGIES.values():
            key = (structure, names, strategy.name)
            if key in failed:
                continue
            try:
                return strategy.run(module, params, varied, inputs, then, fresh)
            except Exception as err:
                if not strategy.may_fail:
                    raise
                failed[key] = _first_line(err)
        raise AssertionError("unreachable: the loop strategy never fails without raising")

    def _choose(self, module: nn.Module, params: Mapping[str, Tensor], varied: Mapping[str, Tensor], inputs: Tensor,
                then: Callable[[Tensor], Tensor] | None, fresh: Fresh, situation: tuple,
                known: dict[tuple, Choice]) -> Tensor:
        """Time each strategy that has not failed here on the first few points, record the fastest, and answer all
        K points with it. A ``vmap`` trial's answers are dropped (a batch of another size may round differently),
        the loop's are kept where it wins: every call of a situation, the first included, gives the same values."""
        structure, names, k = situation[:3]
        failed = _FAILED.setdefault(module, {})
        t = max(1, min(self.trial_points, k // 8))
        sample = {name: v[:t] for name, v in varied.items()}
        choice, loop_values = Choice("loop"), None
        for strategy in STRATEGIES.values():
            if strategy.name == "vmap_per_point" and "vmap" in choice.points_per_s:
                continue  # per-point inputs only get past what shared inputs cannot do, and cost more
            key = (structure, names, strategy.name)
            if key in failed:
                choice.failed[strategy.name] = failed[key]
                continue
            try:
                if strategy.may_fail:  # a first vmap call allocates and picks kernels for its new shapes
                    strategy.run(module, params, sample, inputs, then, fresh)
                _synchronize(inputs.device)  # the one place the fallback waits for the device: once per situation
                start = time.perf_counter()
                values = strategy.run(module, params, sample, inputs, then, fresh)
                _synchronize(inputs.device)
            except Exception as err:
                if not strategy.may_fail:
                    raise
                failed[key] = choice.failed[strategy.name] = _first_line(err)
                continue
            choice.points_per_s[strategy.name] = t / max(time.perf_counter() - start, 1e-9)
            if strategy.name == "loop":
                loop_values = values
        choice.strategy = max(choice.points_per_s, key=choice.points_per_s.__getitem__)
        if len(known) >= _MAX_SITUATIONS:
            known.pop(next(iter(known)))
        known[situation] = choice
        _warn_once(module, names, choice)
        if choice.strategy == "loop" and t < k:  # the loop answers each point alone: its trial answers are final
            rest = STRATEGIES["loop"].run(module, params, {name: v[t:] for name, v in varied.items()}, inputs, then,
                                          fresh)
            return torch.cat([loop_values, rest])
        return self(module, params, varied, inputs, then, fresh)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:80] if lines else ''}"


def _warn_once(module: nn.Module, names: tuple[str, ...], choice: Choice) -> None:
    """One warning per model type: what was measured (or failed), then what is used."""
    if type(module) in _WARNED:
        return
    _WARNED.add(type(module))
    what = f"{type(module).__name__}'s {names[0]!r}" if len(names) == 1 else \
        f"{type(module).__name__} ({len(names)} parameters)"
    loop = choice.points_per_s["loop"]
    others = [n for n in STRATEGIES if n != "loop" and n in choice.points_per_s]
    if choice.strategy != "loop":
        cause = f"{STRATEGIES[choice.strategy].description} ran at {choice.ratio():.2f}x the queries/s of a loop"
    elif others:
        best = max(others, key=choice.points_per_s.__getitem__)
        cause = f"{STRATEGIES[best].description} ran at {choice.points_per_s[best] / loop:.2f}x a loop's queries/s"
    else:
        cause = f"vmap failed ({choice.failed.get('vmap', '?')[:60]})"
    warnings.warn(f"{cause} for {what}, so its full forwards use {STRATEGIES[choice.strategy].description} "
                  "(chosen per parameter and chunk; ModuleOracle(fallback=...) pins one).", stacklevel=2)
