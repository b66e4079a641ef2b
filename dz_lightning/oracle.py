"""Loss oracles: the only door to the objective.

An oracle answers "what is the loss at these parameter values?" for one point or for K points at once.
Estimators (:mod:`dz_lightning.estimators`) talk to the objective exclusively through this interface, so
the objective may be a true black box (a NumPy program, a simulator, a remote service). The base classes are in
:mod:`dz_lightning.oracle_base`; here are the black-box :class:`FunctionOracle`, the white-box
:class:`ModuleOracle`, and :func:`vmap_points`, the one primitive that evaluates a module at K parameter points.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from dz_lightning import query, reuse
from dz_lightning.oracle_base import DelegatingOracle, NonFiniteLossError, Oracle
from dz_lightning.query import frozen_batchnorm_stats, query_mode

__all__ = [
    "DelegatingOracle", "FunctionOracle", "ModuleOracle", "NonFiniteLossError", "Oracle", "frozen_batchnorm_stats",
    "has_batchnorm", "parameter_values", "query_mode", "vmap_points",
]


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


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds a BatchNorm layer (whose running statistics a training forward updates)."""
    return any(isinstance(m, _BATCHNORMS) for m in module.modules())


def vmap_points(module: nn.Module, params: Mapping[str, Tensor], varied: Mapping[str, Tensor], inputs: Tensor, *,
                per_point_inputs: bool = False, then: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``module`` evaluated at K parameter points as one batched computation (``vmap`` over ``functional_call``).

    Point ``k`` takes ``varied[name][k]`` for the names in ``varied`` and ``params`` (or the module's own value) for
    every other parameter. The caller chooses the context (no autograd, precision: :func:`query_mode`). A black box
    that cannot run under ``vmap`` goes after this call, on the result reshaped to one flat ``(K * B, ...)`` batch.

    Args:
        module: the white-box network.
        params: name -> value, the fixed part of every point.
        varied: name -> stacked values ``(K, *shape)``.
        inputs: ``(B, ...)`` shared by every point, or ``(K, B, ...)`` (one batch per point) with ``per_point_inputs``.
        per_point_inputs: whether ``inputs`` has a leading K dimension.
        then: applied to each point's outputs inside ``vmap`` (e.g. ``outputs -> loss``); it must be vmap-able.

    Returns:
        ``(K, B, ...)`` outputs, or ``(K, ...)`` values of ``then``.
    """
    fixed = {n: v for n, v in parameter_values(module, params).items() if n not in varied}
    names = list(varied)

    def one(x: Tensor, *values: Tensor) -> Tensor:
        point = dict(fixed)
        point.update(zip(names, values, strict=True))
        out = functional_call(module, point, (x,))
        return out if then is None else then(out)

    values = [varied[n] for n in names]
    if not per_point_inputs and module in _BATCHED_INPUTS:
        inputs, per_point_inputs = inputs.expand(values[0].shape[0], *inputs.shape), True
    in_dims = (0 if per_point_inputs else None, *([0] * len(names)))
    try:
        return vmap(one, in_dims=in_dims, randomness="same")(inputs, *values)
    except RuntimeError as err:
        # An in-place op (``out += identity`` in torchvision's ResNets) writes a per-point value into a tensor that
        # does not vary over the points when only later parameters vary. Every activation varies once the inputs
        # do: give each point its own (expanded, not copied) inputs, for this module from now on.
        if per_point_inputs or ("broadcast shape" not in str(err) and "inplace" not in str(err)):
            raise
        _BATCHED_INPUTS.add(module)
        return vmap_points(module, params, varied, inputs, then=then)


_BATCHED_INPUTS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class ModuleOracle(Oracle):
    """Loss of ``loss_fn(model(inputs), targets)`` as a function of (some of) the model's parameters.

    White box inside, black box to the estimator. Queries run in :func:`~dz_lightning.query.query_mode`: no
    autograd, fp32 arithmetic (autocast and TF32 off, even inside a mixed-precision trainer or with TF32 enabled
    globally), BatchNorm running statistics never updated.
    K points are evaluated as one batched computation (``torch.func.vmap`` over ``functional_call``);
    one-coordinate perturbations use feature reuse (:func:`dz_lightning.reuse.build_staged`: the traced graph, else
    the model's ``stages()``, else batched full forwards). The feature-reuse engine is built when coordinate queries
    start (:meth:`coordinate_base_loss`, CGE's base point, answered by the engine's base forward; or the first
    :meth:`coordinate_losses`) and kept for the parameter set; never for :meth:`loss` or :meth:`losses` (RGE,
    ZO-GraSP, a plain loss).

    Args:
        model: the network. Parameter names are those of ``model.named_parameters()``.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d tensor``, a mean over the batch.
        inputs: the batch inputs, e.g. ``(B, C, H, W)``.
        targets: the batch targets, e.g. ``(B,)``.
        max_batch: most points per batched call (bounds memory); ``None`` picks from ``memory_budget``.
        memory_budget: bytes the batched queries may use beyond the base forward; ``None`` means a default
            (:func:`~dz_lightning.query.memory_budget`: 1 GiB on CPU, a quarter of the CUDA memory free at first
            use, fixed for the process).
        feature_reuse: use the feature-reuse engine for coordinate perturbations when the model has one (traced
            or staged).
        delta_dtype: arithmetic of the staged path's linear ops on perturbation differences (``"float32"``,
            ``"bfloat16"``, ``"tf32"`` on CUDA); see :class:`~dz_lightning.reuse.GraphEngine`.
        head: an optional black box between the model and the loss, ``head(outputs, inputs) -> (N, ...)`` for
            outputs ``(N, ...)`` and the inputs ``(N, ...)`` they came from; the loss is then
            ``loss_fn(head(model(inputs), inputs), targets)``. It never runs under ``vmap``: K points' outputs
            reach it as one flat ``(K * B, ...)`` batch (or, on the feature-reuse path, one ``(B, ...)`` batch per
            point), so a non-torch callable works and every image it sees is counted by it (e.g. a residual
            denoiser's black-box classifier).
        self_check: check the feature-reuse engine the first time it meets a model structure, input shape and loss
            (:meth:`~dz_lightning.reuse.GraphEngine.self_check`: every kind of plan runs a zero step, the batched
            loss is compared with the loss; a few host reads, once, remembered with the traced graph, a failure
            included). ``False`` trusts the traced graph unchecked: no host read when an engine is built.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor,
                 max_batch: int | None = None, memory_budget: int | None = None, feature_reuse: bool = True,
                 delta_dtype: str = "float32", head: Callable[[Tensor, Tensor], Tensor] | None = None,
                 self_check: bool = True) -> None:
        super().__init__(max_batch=max_batch)
        if head is not None and not callable(head):
            raise TypeError(f"Expected argument `head` to be callable or None, but got {type(head).__name__}.")
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}.")
        if isinstance(inputs, Tensor) and (inputs.dim() == 0 or inputs.shape[0] == 0):
            raise ValueError(f"Expected a non-empty batch of inputs, but got shape {tuple(inputs.shape)}: the mean "
                             "loss over no samples is NaN. Check the data loader (drop_last, an empty split).")
        self.model, self.loss_fn, self.inputs, self.targets, self.head = model, loss_fn, inputs, targets, head
        self.memory_budget, self.feature_reuse, self.delta_dtype = memory_budget, feature_reuse, delta_dtype
        self.self_check = self_check
        self._names = frozenset(n for n, _ in model.named_parameters())
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
        """``max_batch`` if set, else as many points as ``memory_budget`` allows (:func:`query.points_per_chunk`)."""
        # a rough cost per point: ten activations the size of the input batch
        per_point = 10 * self.inputs.numel() * self.inputs.element_size()
        return max(1, min(k, query.points_per_chunk(self.inputs.device, self.memory_budget, per_point, self.max_batch)))

    # ----------------------------------------------------------------------------------------- overrides
    def _loss(self, params: Mapping[str, Tensor]) -> Tensor:
        self._check_names(params)
        with self._query_context():
            out = functional_call(self.model, self._full(params), (self.inputs,))
            return self._outputs_loss(out, self.targets)

    def coordinate_base_loss(self, params: Mapping[str, Tensor]) -> Tensor:
        self._check_names(params)
        staged = self._staged_forward(params) if self.feature_reuse else None
        if staged is None:
            return self.loss(params)
        self.queries += self._evaluations(1)  # the engine's base forward is this query
        return staged.base_loss().reshape(())

    def _outputs_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss (float64) of one point's model outputs ``(B, ...)``, through the black-box head if any."""
        if self.head is not None:
            # the head is a black box of the model's precision: the staged engine may hand it float64 outputs
            dtype = next((p.dtype for p in self.model.parameters()), torch.float32)
            outputs = self.head(outputs.to(dtype) if outputs.is_floating_point() else outputs, self.inputs)
        return query.float64_loss(self.loss_fn, outputs, targets)

    def _losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        self._check_names(params)
        with self._query_context():
            if self.head is None:
                return vmap_points(self.model, params, varied, self.inputs,
                                   then=lambda out: query.float64_loss(self.loss_fn, out, self.targets))
            # the black-box head never runs under vmap: it gets all K * B outputs of the chunk as one flat batch
            outputs = vmap_points(self.model, params, varied, self.inputs)  # (K, B, ...)
            k, b = outputs.shape[:2]
            inputs = self.inputs.unsqueeze(0).expand(k, *self.inputs.shape).reshape(k * b, *self.inputs.shape[1:])
            heads = self.head(outputs.reshape(k * b, *outputs.shape[2:]), inputs)
            heads = heads.reshape(k, b, *heads.shape[1:])
            return torch.stack([query.float64_loss(self.loss_fn, heads[i], self.targets).reshape(()) for i in range(k)])

    def training_forward(self) -> Tensor:
        """One plain forward of ``inputs`` (fp32, no autograd) in the model's mode: the step's training forward.

        In train mode it updates BatchNorm running statistics, which queries never touch; returns ``(B, ...)``.
        """
        with torch.no_grad(), torch.autocast(self.inputs.device.type, enabled=False):
            return self.model(self.inputs)

    def coordinate_losses(self, params: Mapping[str, Tensor], name: str, index: Tensor, delta: float) -> Tensor:
        self._check_names(params)
        staged = self._staged_forward(params) if self.feature_reuse else None
        if staged is None:
            return super().coordinate_losses(params, name, index, delta)
        with self._query_context():
            values = staged.coordinate_losses(name, index, delta)
        self.queries += int(index.numel())
        return values

    def _staged_forward(self, params: Mapping[str, Tensor]) -> reuse.GraphEngine | None:
        if self._staged_unavailable:
            return None
        key = _params_key(params)
        if self._staged is None or not _same_params(key, self._staged_key):
            self._staged = None  # its cached activations are freed before the next engine's are made
            with self._query_context():
                self._staged = reuse.build_staged(
                    # without a head the engine sees the plain loss function (it batches known losses per chunk)
                    self.model, self.loss_fn if self.head is None else self._outputs_loss, self.inputs, self.targets,
                    dict(params), max_batch=self.max_batch, memory_budget=self.memory_budget,
                    delta_dtype=self.delta_dtype, self_check=self.self_check,
                )
            if self._staged is None:  # not staged (warned once per model type): full forwards from now on
                self._staged_unavailable = True
                return None
            self._staged_key = key
        return self._staged


def _params_key(params: Mapping[str, Tensor]) -> tuple:
    """The parameters as a cache key: the tensors themselves (identity and in-place version), so that a freed
    tensor's memory can never be mistaken for the cached parameters."""
    return tuple((n, v, v._version) for n, v in params.items())


def _same_params(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(
        x[0] == y[0] and x[1] is y[1] and x[2] == y[2] for x, y in zip(a, b, strict=True))
