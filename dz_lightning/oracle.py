"""Loss oracles: the only door to the objective.

An oracle answers "what is the loss at these parameter values?" for one point or for K points at once.
Estimators (:mod:`dz_lightning.estimators`) talk to the objective exclusively through this interface, so
the objective may be a true black box (a NumPy program, a simulator, a remote service).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from dz_lightning import query
from dz_lightning.query import frozen_batchnorm_stats, query_mode

if TYPE_CHECKING:
    from dz_lightning import reuse

__all__ = [
    "FunctionOracle", "ModuleOracle", "NonFiniteLossError", "Oracle", "frozen_batchnorm_stats", "parameter_values",
    "query_mode",
]


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
    return tensor.reshape(())


class Oracle:
    """Base class of loss oracles.

    Subclasses implement :meth:`_loss` (one point) and may override :meth:`_losses` (K points as one
    batched computation) and :meth:`coordinate_losses` (K one-coordinate perturbations, the CGE workhorse).

    Attributes:
        queries: number of loss evaluations answered so far (one per point).
        max_batch: largest number of points evaluated in one call; ``None`` means unlimited.
    """

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
        value = _as_scalar(self._loss(params), type(self).__name__)
        self.queries += 1
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
            raw = self._losses(params, part)
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
            out.append(values)
            self.queries += n_part
        return torch.cat(out) if out else torch.zeros(0)

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
            stacked = base.detach().reshape(1, -1).repeat(idx.numel(), 1)
            stacked[torch.arange(idx.numel(), device=base.device), idx] += delta
            out.append(self.losses(params, {name: stacked.reshape(idx.numel(), *base.shape)}))
        return torch.cat(out) if out else torch.zeros(0, device=base.device)

    # ------------------------------------------------------------------------------------ for subclasses
    def _chunk_size(self, k: int) -> int:
        """Points per call when ``k`` are asked for: ``max_batch`` if set, else all of them."""
        return self.max_batch or k

    def _loss(self, params: Mapping[str, Tensor]) -> Tensor | float:
        raise NotImplementedError

    def _losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        """Default: one point at a time."""
        k = next(iter(varied.values())).shape[0]
        values = []
        for i in range(k):
            point = dict(params)
            point.update({n: v[i] for n, v in varied.items()})
            values.append(_as_scalar(self._loss(point), type(self).__name__))
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


class FunctionOracle(Oracle):
    """An oracle around any callable ``fn(params) -> loss``: the black-box case.

    Args:
        fn: called with a dict name -> tensor and returning a float or a 0-d tensor (an int is taken as a float;
            a bool or a complex value is rejected with a ``TypeError``). It may convert the
            tensors to NumPy, call a subprocess or a remote service: nothing is differentiated.
        batched: if ``True``, ``fn`` accepts a dict of stacked values ``(K, ...)`` for *every* parameter and
            returns ``K`` losses; otherwise it is called one point at a time.
        max_batch: most points per call when ``batched``.

    Example:
        >>> oracle = FunctionOracle(lambda p: float((p["w"].numpy() ** 2).sum()))
    """

    def __init__(self, fn: Callable[[dict[str, Tensor]], Tensor | float], batched: bool = False,
                 max_batch: int | None = None) -> None:
        super().__init__(max_batch=max_batch)
        if not callable(fn):
            raise TypeError(f"Expected argument `fn` to be callable, but got {type(fn).__name__}.")
        self.fn = fn
        self.batched = batched

    def _loss(self, params: Mapping[str, Tensor]) -> Tensor | float:
        with torch.no_grad():
            if self.batched:
                return self.fn({n: v.detach().unsqueeze(0) for n, v in params.items()})  # K = 1 losses
            return self.fn({n: v.detach() for n, v in params.items()})

    def _losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        if not self.batched:
            return super()._losses(params, varied)
        k = next(iter(varied.values())).shape[0]
        stacked = {
            n: (varied[n] if n in varied else v.detach().unsqueeze(0).expand(k, *v.shape)) for n, v in params.items()
        }
        with torch.no_grad():
            return self.fn(stacked)  # converted by `losses`, keeping the black box's precision


def parameter_values(module: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """All of ``module``'s parameters by name, taking the values in ``params`` where it names them."""
    return {n: params.get(n, p) for n, p in module.named_parameters()}


class ModuleOracle(Oracle):
    """Loss of ``loss_fn(model(inputs), targets)`` as a function of (some of) the model's parameters.

    White box inside, black box to the estimator. Queries run in :func:`~dz_lightning.query.query_mode`: no
    autograd, fp32 arithmetic (autocast and TF32 off, even inside a mixed-precision trainer or with TF32 enabled
    globally), BatchNorm running statistics never updated.
    K points are evaluated as one batched computation (``torch.func.vmap`` over ``functional_call``);
    one-coordinate perturbations of staged models use feature reuse (:mod:`dz_lightning.reuse`).

    Args:
        model: the network. Parameter names are those of ``model.named_parameters()``.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``, a mean over the batch.
        inputs: the batch inputs, e.g. ``(B, C, H, W)``.
        targets: the batch targets, e.g. ``(B,)``.
        max_batch: most points per batched call (bounds memory); ``None`` picks from ``memory_budget``.
        memory_budget: bytes the batched queries may use beyond the base forward; ``None`` means a default
            (:func:`~dz_lightning.query.memory_budget`: 1 GiB on CPU, a quarter of the CUDA memory free at first
            use, fixed for the process).
        feature_reuse: use the staged fast path for coordinate perturbations when the model is staged.
        delta_dtype: arithmetic of the staged path's linear ops on perturbation differences (``"float32"``,
            ``"bfloat16"``, ``"tf32"`` on CUDA); see :class:`~dz_lightning.reuse.StagedForward`.
        head: an optional black box between the model and the loss, ``head(outputs, inputs) -> (N, ...)`` for
            outputs ``(N, ...)`` and the inputs ``(N, ...)`` they came from; the loss is then
            ``loss_fn(head(model(inputs), inputs), targets)``. It never runs under ``vmap``: K points' outputs
            reach it as one flat ``(K * B, ...)`` batch (or, on the feature-reuse path, one ``(B, ...)`` batch per
            point), so a non-torch callable works and every image it sees is counted by it (e.g. a residual
            denoiser's black-box classifier).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inputs: Tensor,
        targets: Tensor,
        max_batch: int | None = None,
        memory_budget: int | None = None,
        feature_reuse: bool = True,
        delta_dtype: str = "float32",
        head: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(max_batch=max_batch)
        if head is not None and not callable(head):
            raise TypeError(f"Expected argument `head` to be callable or None, but got {type(head).__name__}.")
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}.")
        if isinstance(inputs, Tensor) and (inputs.dim() == 0 or inputs.shape[0] == 0):
            raise ValueError(f"Expected a non-empty batch of inputs, but got shape {tuple(inputs.shape)}: the mean "
                             "loss over no samples is NaN. Check the data loader (drop_last, an empty split).")
        self.model = model
        self.loss_fn = loss_fn
        self.inputs = inputs
        self.targets = targets
        self.memory_budget = memory_budget
        self.feature_reuse = feature_reuse
        self._names = frozenset(n for n, _ in model.named_parameters())
        self.delta_dtype = delta_dtype
        self.head = head
        self._staged = None
        self._staged_key: tuple | None = None
        self._staged_unavailable = False

    # -------------------------------------------------------------------------------------------- helpers
    def _query_context(self) -> contextlib.AbstractContextManager[None]:
        return query_mode(self.model, self.inputs.device)

    def _full(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return parameter_values(self.model, params)

    def _check_names(self, params: Mapping[str, Tensor]) -> None:
        unknown = params.keys() - self._names
        if unknown:
            raise ValueError(f"`params` names {sorted(unknown)[:5]}, which {'is' if len(unknown) == 1 else 'are'} not "
                             f"a parameter of {type(self.model).__name__}; valid names: {sorted(self._names)[:20]}.")

    def _chunk_size(self, k: int) -> int:
        """``max_batch`` if set, else as many points as ``memory_budget`` allows."""
        if self.max_batch is not None:
            return self.max_batch
        budget = query.memory_budget(self.inputs.device, self.memory_budget)
        # A rough cost per point: ten activations the size of the input batch.
        per_point = max(1, 10 * self.inputs.numel() * self.inputs.element_size())
        return max(1, min(k, budget // per_point))

    # ----------------------------------------------------------------------------------------- overrides
    def _loss(self, params: Mapping[str, Tensor]) -> Tensor:
        self._check_names(params)
        staged = self._staged_forward(params) if self.feature_reuse else None
        if staged is not None:  # its cached base forward is this query; coordinate queries restart from it
            return staged.base_loss()
        with self._query_context():
            out = functional_call(self.model, self._full(params), (self.inputs,))
            return self._outputs_loss(out, self.targets)

    def _outputs_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss (float64) of one point's model outputs ``(B, ...)``, through the black-box head if any."""
        if self.head is not None:
            # the head is a black box of the model's precision: the staged engine may hand it float64 outputs
            dtype = next((p.dtype for p in self.model.parameters()), torch.float32)
            outputs = self.head(outputs.to(dtype) if outputs.is_floating_point() else outputs, self.inputs)
        return query.float64_loss(self.loss_fn, outputs, targets)

    def _losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        self._check_names(params)
        fixed = {n: v for n, v in self._full(params).items() if n not in varied}
        names = list(varied)
        if self.head is not None:
            return self._head_losses(self.head, fixed, names, varied)

        def one(*values: Tensor) -> Tensor:
            point = dict(fixed)
            point.update(zip(names, values, strict=True))
            return query.float64_loss(self.loss_fn, functional_call(self.model, point, (self.inputs,)), self.targets)

        with self._query_context():
            return vmap(one, randomness="same")(*(varied[n] for n in names))

    def _head_losses(self, head: Callable[[Tensor, Tensor], Tensor], fixed: dict[str, Tensor], names: list[str],
                     varied: Mapping[str, Tensor]) -> Tensor:
        """K points with a black-box head: the model under ``vmap``, the head once on all ``K * B`` outputs."""

        def forward(*values: Tensor) -> Tensor:
            return functional_call(self.model, {**fixed, **dict(zip(names, values, strict=True))}, (self.inputs,))

        with self._query_context():
            outputs = vmap(forward, randomness="same")(*(varied[n] for n in names))  # (K, B, ...)
            k, b = outputs.shape[:2]
            inputs = self.inputs.unsqueeze(0).expand(k, *self.inputs.shape).reshape(k * b, *self.inputs.shape[1:])
            heads = head(outputs.reshape(k * b, *outputs.shape[2:]), inputs)
            heads = heads.reshape(k, b, *heads.shape[1:])
            return torch.stack([query.float64_loss(self.loss_fn, heads[i], self.targets).reshape(()) for i in range(k)])

    def coordinate_losses(self, params: Mapping[str, Tensor], name: str, index: Tensor, delta: float) -> Tensor:
        self._check_names(params)
        staged = self._staged_forward(params) if self.feature_reuse else None
        if staged is None:
            return super().coordinate_losses(params, name, index, delta)
        with self._query_context():
            values = staged.coordinate_losses(name, index, delta)
        self.queries += int(index.numel())
        return values

    def _staged_forward(self, params: Mapping[str, Tensor]) -> reuse.StagedForward | None:
        from dz_lightning import reuse

        if self._staged_unavailable:
            return None
        # the key holds the tensors themselves (identity and in-place version), so a freed tensor's memory can
        # never be mistaken for the cached parameters
        key = tuple((n, v, v._version) for n, v in params.items())
        stale = self._staged_key is None or len(key) != len(self._staged_key) or any(
            a[0] != b[0] or a[1] is not b[1] or a[2] != b[2] for a, b in zip(key, self._staged_key, strict=True))
        if self._staged is None or stale:
            with self._query_context():
                self._staged = reuse.build_staged(
                    # without a head the engine sees the plain loss function (it batches known losses per chunk)
                    self.model, self.loss_fn if self.head is None else self._outputs_loss, self.inputs, self.targets,
                    dict(params), max_batch=self.max_batch, memory_budget=self.memory_budget,
                    delta_dtype=self.delta_dtype,
                )
            if self._staged is None:  # not staged (warned once per model type): full forwards from now on
                self._staged_unavailable = True
                return None
            self._staged_key = key
        return self._staged
