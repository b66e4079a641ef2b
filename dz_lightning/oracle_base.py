"""The oracle family: the :class:`Oracle` base every loss oracle derives from, and :class:`DelegatingOracle`.

An oracle answers "what is the loss at these parameter values?" for one point, for K points at once, or for K
one-coordinate perturbations. Concrete white-box and black-box oracles live in :mod:`dz_lightning.oracle`; wrappers
that restrict, record or otherwise transform another oracle derive from :class:`DelegatingOracle`, so they are
``Oracle`` s wherever one is expected and count queries the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = ["DelegatingOracle", "NonFiniteLossError", "Oracle", "coordinate_points"]


def coordinate_points(base: Tensor, index: Tensor, delta: float) -> Tensor:
    """``base`` once per entry of ``index`` ``(k,)`` (on ``base``'s device), flat entry ``index[i]`` of copy ``i``
    moved by ``delta``: shape ``(k, *base.shape)``. Zeros as ``base`` give the one-hot changes themselves."""
    k = index.numel()
    stacked = base.detach().reshape(1, -1).repeat(k, 1)
    stacked[torch.arange(k, device=stacked.device), index] += delta
    return stacked.reshape(k, *base.shape)


class NonFiniteLossError(ValueError):
    """Raised when the oracle returns NaN or infinity where a finite loss is needed."""


def _reject_bool_or_complex(value: object, where: str) -> None:
    """A loss is real: a bool (a comparison's result) or a complex value is a bug in the black box, not a loss."""
    kind = value.dtype if isinstance(value, Tensor) else type(value)
    if (kind == torch.bool or isinstance(value, complex) or type(value).__name__ in ("bool", "bool_")
            or (isinstance(value, Tensor) and value.is_complex())):
        raise TypeError(f"The loss returned by {where} must be real (a float, an int or a real tensor), but got "
                        f"{str(kind).replace('<class ', '').rstrip('>')}.")


def _as_loss_tensor(value: object) -> Tensor:
    """An oracle answer as a floating tensor in the precision the black box computed it in.

    A tensor keeps its dtype; a NumPy value or array keeps its floating dtype (``float64``, ``float32``, ...);
    Python floats and integers become ``float64`` (``torch.tensor(float)`` would round them to ``float32`` and
    destroy finite differences of a float64 simulator at small ``mu``).

    Raises:
        TypeError: ``value`` is not numeric.
    """
    if isinstance(value, Tensor):
        value = value.detach()
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Tensor) for v in value):
        value = torch.stack([v.detach().reshape(()) for v in value])
    else:
        array = np.asarray(value)
        if array.dtype.kind not in "fiu":
            raise TypeError(f"got {type(value).__name__} of dtype {array.dtype}")
        value = torch.from_numpy(np.array(array, dtype=array.dtype if array.dtype.kind == "f" else np.float64))
    if not value.is_floating_point():
        value = value.to(torch.float64)
    return value


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reject_low_precision(value: Tensor, where: str) -> None:
    """A float16 / bfloat16 loss resolves about 3 (8-bit mantissa) or 4 decimal digits: a finite difference at a
    typical ``mu`` is below its rounding, so the estimate is zero or noise. ``ModuleOracle`` refuses such models."""
    if value.dtype in _LOW_PRECISION:
        raise TypeError(
            f"The loss returned by {where} is {value.dtype}, whose relative resolution "
            f"({torch.finfo(value.dtype).eps:.1e}) drowns the finite differences of zeroth-order estimates (a "
            "bfloat16 loss gives an all-zero gradient). Compute and return the loss in float32 or float64."
        )


def _note(err: BaseException, text: str) -> None:
    """Add ``text`` to the report of ``err`` (type and traceback kept; Python 3.11+, a no-op before)."""
    add_note = getattr(err, "add_note", None)
    if add_note is not None:
        add_note(text)


def _as_scalar(value: object, where: str) -> Tensor:
    """Convert an oracle answer to a 0-d floating tensor of the black box's precision, checking it is a scalar.

    Integer losses are accepted as ``float64``; bool and complex ones are rejected with a ``TypeError``.
    """
    _reject_bool_or_complex(value, where)
    try:
        tensor = _as_loss_tensor(value)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"The loss returned by {where} must be a float or a 0-d tensor, but got {type(value).__name__}."
        ) from err
    if tensor.numel() != 1:
        raise ValueError(
            f"The loss returned by {where} must be a scalar, but got a tensor of shape {tuple(tensor.shape)}."
        )
    _reject_low_precision(tensor, where)
    return tensor.reshape(())


class Oracle:
    """Base class of loss oracles.

    Subclasses implement :meth:`_loss` (one point) and may override :meth:`_losses` (K points as one
    batched computation) and :meth:`coordinate_losses` (K one-coordinate perturbations, the CGE workhorse).
    The public :meth:`loss` and :meth:`losses` check and convert the answers and count them; an oracle that wraps
    another one derives from :class:`DelegatingOracle` instead of overriding them.

    Attributes:
        queries: evaluations of the objective spent so far (one per point; see :meth:`_evaluations`).
        max_batch: largest number of points evaluated in one call; ``None`` means unlimited.
        memory_budget: bytes that batched queries may use (``None``: :func:`~dz_lightning.query.memory_budget`'s
            default). Estimators size their own batches of perturbed points by it too (RGE's direction chunks).
    """

    memory_budget: int | None = None

    def __init__(self, max_batch: int | None = None) -> None:
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"Expected argument `max_batch` to be a positive int or None, but got {max_batch!r}.")
        self.max_batch = max_batch
        self.queries = 0

    # ----------------------------------------------------------------------------------------- public API
    def loss(self, params: Mapping[str, Tensor]) -> Tensor:
        """Loss at one point.

        Args:
            params: parameter name -> value.

        Returns:
            A 0-d tensor.
        """
        try:
            raw = self._loss(params)
        except Exception as err:
            _note(err, f"{type(self).__name__}.loss: the query of one point failed (in an estimator: the "
                       "unperturbed parameters).")
            raise
        value = _as_scalar(raw, type(self).__name__)
        self.queries += self._evaluations(1)
        return value

    def losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        """Loss at K points that differ from ``params`` in the entries of ``varied``.

        Args:
            params: parameter name -> value (the fixed part of every point).
            varied: name -> stacked values of shape ``(K, *params[name].shape)``.

        Returns:
            Losses of shape ``(K,)``.
        """
        k = self._check_varied(params, varied)
        chunk = self._chunk_size(k)
        out = []
        for start in range(0, k, chunk):
            part = {n: v[start : start + chunk] for n, v in varied.items()}
            try:
                raw = self._losses(params, part)
            except Exception as err:
                if chunk < k:
                    _note(err, f"{type(self).__name__}.losses: that call held points {start}.."
                               f"{min(start + chunk, k) - 1} (0-based) of the {k} asked for, varying {sorted(varied)}.")
                raise
            _reject_bool_or_complex(raw, type(self).__name__)
            try:
                values = _as_loss_tensor(raw).reshape(-1)
            except (TypeError, ValueError) as err:
                raise TypeError(f"{type(self).__name__} must return K losses as a tensor, an array or a list of "
                                f"floats ({err}).") from err
            n_part = min(chunk, k - start)
            if values.numel() != n_part:
                raise ValueError(
                    f"{type(self).__name__} returned {values.numel()} losses for a batch of {n_part} points."
                )
            _reject_low_precision(values, type(self).__name__)
            out.append(values)
            self.queries += self._evaluations(n_part)
        return torch.cat(out) if out else torch.zeros(0)

    def coordinate_base_loss(self, params: Mapping[str, Tensor]) -> Tensor:
        """Loss at one point whose one-coordinate perturbations (:meth:`coordinate_losses`) follow: CGE's base point.

        By default :meth:`loss`. An oracle whose coordinate queries run on an engine of their own answers it from
        that engine (:class:`~dz_lightning.oracle.ModuleOracle`: feature reuse, built here), so that each finite
        difference ``f(theta + mu e_i) - f(theta)`` comes from one base forward.

        Returns:
            A 0-d tensor; one query.
        """
        return self.loss(params)

    def coordinate_losses(self, params: Mapping[str, Tensor], name: str, index: Tensor, delta: float) -> Tensor:
        """Losses of one-coordinate perturbations of one parameter.

        Point ``i`` equals ``params`` except ``params[name].view(-1)[index[i]] += delta``.

        Args:
            params: parameter name -> value.
            name: the parameter to perturb.
            index: flat coordinate indices, shape ``(n,)``.
            delta: the perturbation added to each coordinate.

        Returns:
            Losses of shape ``(n,)``.
        """
        base = params[name]
        n = int(index.numel())
        chunk = self._chunk_size(n)
        out = []
        for start in range(0, n, chunk):
            idx = index[start : start + chunk].to(base.device)
            try:
                out.append(self.losses(params, {name: coordinate_points(base, idx, delta)}))
            except Exception as err:
                shown = idx[:16].tolist()  # error path only: the host read costs nothing on a good step
                _note(err, f"{type(self).__name__}.coordinate_losses: point i of that call shifts the flat "
                           f"coordinate coords[i] of {name!r} by {delta:+g}, with coords = {shown}"
                           f"{' ...' if idx.numel() > 16 else ''}.")
                raise
        return torch.cat(out) if out else torch.zeros(0, device=base.device)

    # ------------------------------------------------------------------------------------ for subclasses
    def _chunk_size(self, k: int) -> int:
        """Points per call when ``k`` are asked for: ``max_batch`` if set, else all of them."""
        return self.max_batch or k

    def _evaluations(self, points: int) -> int:
        """Evaluations of the objective that answering ``points`` points spent (added to ``queries``).

        One per point by default; an oracle that answers from memory (e.g. a replay of recorded losses) spends none.
        """
        return points

    def _loss(self, params: Mapping[str, Tensor]) -> Tensor | float:
        raise NotImplementedError

    def _losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        """Default: one point at a time."""
        k = next(iter(varied.values())).shape[0]
        values = []
        for i in range(k):
            point = dict(params)
            point.update({n: v[i] for n, v in varied.items()})
            try:
                raw = self._loss(point)
            except Exception as err:
                _note(err, f"{type(self).__name__}: the query of point {i} (0-based) of a call with {k} points "
                           f"failed; that point varies {sorted(varied)}.")
                raise
            values.append(_as_scalar(raw, type(self).__name__))
        return torch.stack(values)

    @staticmethod
    def _check_varied(params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> int:
        if not varied:
            raise ValueError("Expected argument `varied` to name at least one parameter, but got an empty dict.")
        sizes = set()
        for name, value in varied.items():
            if name not in params:
                raise ValueError(f"`varied` names {name!r}, which is not in `params` ({sorted(params)}).")
            if tuple(value.shape[1:]) != tuple(params[name].shape):
                raise ValueError(
                    f"`varied[{name!r}]` must have shape (K, *{tuple(params[name].shape)}), "
                    f"but got {tuple(value.shape)}."
                )
            sizes.add(value.shape[0])
        if len(sizes) != 1:
            raise ValueError(f"All entries of `varied` must stack the same number of points, but got {sorted(sizes)}.")
        return sizes.pop()


class DelegatingOracle(Oracle):
    """Base of oracles that wrap another one: every call goes to ``inner``, queries are counted where they are spent.

    The public calls (:meth:`loss`, :meth:`losses`, :meth:`coordinate_base_loss`, :meth:`coordinate_losses`) hand
    their points to the wrapped
    oracle's own public calls, so its fast paths (batched points under ``vmap``, feature reuse for coordinates) stay
    in use. Subclasses change what reaches it through two hooks: :meth:`_inner_params` (the full parameter dict
    the inner oracle sees, e.g. fixed values for the parameters a wrapper leaves out) and :meth:`_delegate_losses`
    (which of K points it evaluates, e.g. one rank's share).

    ``queries`` counts the evaluations the inner oracle spent on this wrapper's calls (its counter's increase), so
    a wrapper that evaluates only some points, or none, reports exactly what it cost.

    Args:
        inner: the wrapped oracle.
    """

    def __init__(self, inner: Oracle) -> None:
        super().__init__()
        self.inner = inner

    @property
    def memory_budget(self) -> int | None:  # type: ignore[override]
        """The wrapped oracle's budget (the memory is spent where the points are evaluated)."""
        return self.inner.memory_budget

    def loss(self, params: Mapping[str, Tensor]) -> Tensor:
        with self._counting():
            return self.inner.loss(self._inner_params(params))

    def losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        with self._counting():
            return self._delegate_losses(self._inner_params(params), varied)

    def coordinate_base_loss(self, params: Mapping[str, Tensor]) -> Tensor:
        with self._counting():
            return self.inner.coordinate_base_loss(self._inner_params(params))

    def coordinate_losses(self, params: Mapping[str, Tensor], name: str, index: Tensor, delta: float) -> Tensor:
        with self._counting():
            return self.inner.coordinate_losses(self._inner_params(params), name, index, delta)

    # ------------------------------------------------------------------------------------ for subclasses
    def _inner_params(self, params: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The parameter dict the inner oracle sees for ``params`` (default: ``params`` itself)."""
        return params

    def _delegate_losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        """K points' losses from the inner oracle (default: all of them, in one call)."""
        return self.inner.losses(params, varied)

    @contextlib.contextmanager
    def _counting(self) -> Iterator[None]:
        start = self.inner.queries
        try:
            yield
        finally:
            self.queries += self.inner.queries - start
