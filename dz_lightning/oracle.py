"""Loss oracles: the only door to the objective.

An oracle answers "what is the loss at these parameter values?" for one point or for K points at once.
Estimators (:mod:`dz_lightning.estimators`) talk to the objective exclusively through this interface, so
the objective may be a true black box (a NumPy program, a simulator, a remote service). The base classes are in
:mod:`dz_lightning.oracle_base`; here are the black-box :class:`FunctionOracle`, the white-box
:class:`ModuleOracle`, and (from :mod:`dz_lightning.fallback`) :func:`vmap_points`, the one primitive that evaluates
a module at K parameter points as one batched computation.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from dz_lightning import query, reuse
from dz_lightning.fallback import FullForwards, parameter_values
from dz_lightning.oracle_base import Oracle, _note
from dz_lightning.query import query_mode
from dz_lightning.upstream import tensor_version

__all__ = ["FunctionOracle", "ModuleOracle", "has_batchnorm", "white_box_oracle"]


class FunctionOracle(Oracle):
    """An oracle around any callable ``fn(params) -> loss``: the black-box case.

    ``fn`` receives copies of the parameter values, never views of them: whatever it does to its arguments (a NumPy
    view changed in place, tensors kept for later) leaves the parameters and the estimate alone. A failing call
    keeps its exception and traceback, with notes naming the query (which point of which call; for coordinate
    queries, which coordinate).

    Args:
        fn: called with a dict name -> tensor and returning a float or a 0-d tensor in float32 or float64 (an int is
            taken as a float; a bool, a complex value, or a float16 / bfloat16 loss is rejected with a
            ``TypeError``). It may convert the tensors to NumPy, call a subprocess or a remote service: nothing is
            differentiated.
        batched: if ``True``, ``fn`` accepts a dict of stacked values ``(K, ...)`` for *every* parameter and
            returns ``K`` losses; otherwise it is called one point at a time.
        max_batch: most points per call when ``batched``.
        timeout: seconds one call of ``fn`` may take (``None``: no limit). A call past it raises ``TimeoutError``
            (after the retries); ``fn`` then runs in a daemon thread, which is left to finish on its own, as a hung
            simulator or service cannot be stopped from Python.
        retries: calls repeated after a ``TimeoutError`` or an ``OSError`` (e.g. ``ConnectionError``), each with
            fresh copies of the parameters; ``queries`` counts answered points, :attr:`failed_attempts` the others.

    Example:
        >>> oracle = FunctionOracle(lambda p: float((p["w"].numpy() ** 2).sum()))
    """

    def __init__(self, fn: Callable[[dict[str, Tensor]], Tensor | float], batched: bool = False,
                 max_batch: int | None = None, timeout: float | None = None, retries: int = 0) -> None:
        super().__init__(max_batch=max_batch)
        if not callable(fn):
            raise TypeError(f"Expected argument `fn` to be callable, but got {type(fn).__name__}.")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout < float("inf")):
            raise ValueError(f"Expected argument `timeout` to be a finite number of seconds > 0 or None, but got "
                             f"{timeout!r}.")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"Expected argument `retries` to be an int >= 0, but got {retries!r}.")
        self.fn = fn
        self.batched = batched
        self.timeout, self.retries = timeout, retries
        self.failed_attempts = 0

    def _call(self, arguments: Callable[[], dict[str, Tensor]]) -> object:
        """``fn`` on fresh ``arguments()``, under the timeout, repeated up to ``retries`` times."""
        for attempt in range(self.retries + 1):
            try:
                return self._call_once(arguments())
            except (TimeoutError, OSError) as err:
                if attempt == self.retries:
                    if self.retries:
                        _note(err, f"{type(self).__name__}: the last of {attempt + 1} attempts.")
                    raise
                self.failed_attempts += 1
                warnings.warn(f"{type(self).__name__}: attempt {attempt + 1} of {self.retries + 1} failed "
                              f"({type(err).__name__}: {err}); retrying.", RuntimeWarning, stacklevel=2)
        raise AssertionError("unreachable")

    def _call_once(self, arguments: dict[str, Tensor]) -> object:
        if self.timeout is None:
            with torch.no_grad():
                return self.fn(arguments)
        outcome: list[object] = []

        def run() -> None:
            try:
                with torch.no_grad():  # thread-local: set in the worker
                    outcome.append((True, self.fn(arguments)))
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                outcome.append((False, err))

        worker = threading.Thread(target=run, name=f"{type(self).__name__}-query", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if not outcome:
            raise TimeoutError(f"{type(self).__name__}: the black box did not answer within timeout={self.timeout} s "
                               "(its call is left running in a daemon thread).")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _loss(self, params: Mapping[str, Tensor]) -> Tensor | float:
        with torch.no_grad():
            if not self.batched:
                return self._call(lambda: {n: v.detach().clone() for n, v in params.items()})
            answer = self._call(lambda: {n: v.detach().unsqueeze(0).clone() for n, v in params.items()})  # K = 1
        count = _answer_count(answer)
        if count is not None and count != 1:
            raise ValueError(f"{type(self).__name__}(batched=True) returned {count} losses for a batch of 1 point; "
                             "a batched `fn` returns one loss per point, shape (K,).")
        return answer

    def _losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        if not self.batched:
            return super()._losses(params, varied)
        k = next(iter(varied.values())).shape[0]

        def stacked() -> dict[str, Tensor]:  # one copy of each fixed value, expanded (a view of the copy)
            return {n: (varied[n].detach().clone() if n in varied
                        else v.detach().clone().unsqueeze(0).expand(k, *v.shape)) for n, v in params.items()}

        with torch.no_grad():
            try:
                return self._call(stacked)  # converted by `losses`, keeping the black box's precision
            except Exception as err:
                _note(err, f"{type(self).__name__}: the batched black box failed on a call with {k} points varying "
                           f"{sorted(varied)}.")
                raise


def _answer_count(answer: object) -> int | None:
    """How many values a black box's answer holds (``None`` when it is not array-like: left to the conversion)."""
    if isinstance(answer, Tensor):
        return answer.numel()
    if isinstance(answer, (list, tuple)):
        return len(answer)
    size = getattr(answer, "size", None)
    return size if isinstance(size, int) else None


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds a BatchNorm layer (whose running statistics a training forward updates)."""
    return any(isinstance(m, query.BATCHNORMS) for m in module.modules())


class ModuleOracle(Oracle):
    """Loss of ``loss_fn(model(inputs), targets)`` as a function of (some of) the model's parameters.

    White box inside, black box to the estimator. Queries run in :func:`~dz_lightning.query.query_mode`: no
    autograd, fp32 arithmetic (autocast and TF32 off, even inside a mixed-precision trainer or with TF32 enabled
    globally), BatchNorm running statistics never updated.
    One-coordinate perturbations use feature reuse (:func:`dz_lightning.reuse.build_graph_engine`: the traced graph,
    else the model's ``stages()``); K points otherwise run as full forwards, batched with ``torch.func.vmap`` or one by
    one, whichever :class:`~dz_lightning.fallback.FullForwards` measured fastest for the model. The feature-reuse
    engine is built when coordinate queries start (:meth:`coordinate_base_loss`, CGE's base point, answered by the
    engine's base forward; or the first :meth:`coordinate_losses`) and kept for the parameter set; never for
    :meth:`loss` or :meth:`losses` (RGE, ZO-GraSP, a plain loss).

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
        delta_dtype: arithmetic of the graph engine's linear ops on perturbation differences: ``"auto"`` (default:
            bf16 where the device computes it natively, else fp32; see :func:`~dz_lightning.query.native_bf16`),
            ``"float32"``, ``"bfloat16"``, ``"tf32"`` (CUDA); see :class:`~dz_lightning.reuse.GraphEngine`.
        head: an optional black box between the model and the loss, ``head(outputs, inputs) -> (N, ...)`` for
            outputs ``(N, ...)`` and the inputs ``(N, ...)`` they came from; the loss is then
            ``loss_fn(head(model(inputs), inputs), targets)``. It never runs under ``vmap``: K points' outputs
            reach it as one flat ``(K * B, ...)`` batch (or, on the feature-reuse path, one ``(B, ...)`` batch per
            point), so a non-torch callable works and every image it sees is counted by it (e.g. a residual
            denoiser's black-box classifier).
        dropout_seed: the seed of the dropout masks when the model has dropout in training mode (common random
            numbers): every query of this oracle, the base point included, draws the same masks, so a finite
            difference measures the parameters, not the masks, and feature reuse treats dropout as a fixed
            elementwise multiply. ``None`` draws one seed from PyTorch's default CPU generator when the oracle is
            made (a task makes one oracle per step: new masks every step) when a dropout module is in training
            mode; give a seed for dropout that is not a module (``F.dropout`` in ``forward``).
        fallback: how K full forwards run (:class:`~dz_lightning.fallback.FullForwards`): ``"auto"`` times each
            strategy once per parameter and chunk and keeps the fastest where the model has no feature-reuse
            engine (or ``feature_reuse`` is off), else takes the first that works; ``"first_working"``,
            ``"vmap"``, ``"vmap_per_point"`` or ``"loop"`` give results that do not depend on timings (pin one
            for bit-identical DDP ranks on a model without an engine).
        self_check: check the feature-reuse engine the first time it meets a model structure, input shape and loss
            (:meth:`~dz_lightning.reuse.GraphEngine.self_check`: every kind of plan runs a zero step, the batched
            loss is compared with the loss; a few host reads, once, remembered with the traced graph, a failure
            included). ``False`` trusts the traced graph unchecked: no host read when an engine is built.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor,
                 max_batch: int | None = None, memory_budget: int | None = None, feature_reuse: bool = True,
                 delta_dtype: str = "auto", head: Callable[[Tensor, Tensor], Tensor] | None = None,
                 dropout_seed: int | None = None, fallback: str = "auto", self_check: bool = True) -> None:
        super().__init__(max_batch=max_batch)
        # timed choices only where the model has no feature-reuse engine (or it is off): a model with one keeps
        # batched points that do not depend on timings (DDP ranks stay bit-identical to one process)
        self._full_forwards, self._first_working = FullForwards(fallback), FullForwards("first_working")
        if head is not None and not callable(head):
            raise TypeError(f"Expected argument `head` to be callable or None, but got {type(head).__name__}.")
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}.")
        if isinstance(inputs, Tensor) and (inputs.dim() == 0 or inputs.shape[0] == 0):
            raise ValueError(f"Expected a non-empty batch of inputs, but got shape {tuple(inputs.shape)}: the mean "
                             "loss over no samples is NaN. Check the data loader (drop_last, an empty split).")
        self.model, self.loss_fn, self.inputs, self.targets, self.head = model, loss_fn, inputs, targets, head
        self.memory_budget, self.feature_reuse, self.delta_dtype = memory_budget, feature_reuse, delta_dtype
        self.dropout_seed = dropout_seed
        if dropout_seed is None and query.has_random_dropout(model):  # one draw per oracle, on the CPU: no sync
            self.dropout_seed = int(torch.randint(0, 2**62, (), generator=torch.default_generator))
        self.self_check = self_check
        self._names = frozenset(n for n, _ in model.named_parameters())
        self._engine = None
        self._engine_key: tuple | None = None
        self._no_graph_engine = False

    # -------------------------------------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _query_context(self) -> Iterator[None]:
        with query_mode(self.model, self.inputs.device), \
                query.common_random_numbers(self.dropout_seed, self.inputs.device):
            yield

    def _same_draws(self) -> contextlib.AbstractContextManager[None]:
        """Around each forward of a batched call: every point draws this oracle's dropout masks."""
        return query.common_random_numbers(self.dropout_seed, self.inputs.device)

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
        engine = self._graph_engine(params) if self.feature_reuse else None
        if engine is None:
            return self.loss(params)
        self.queries += self._evaluations(1)  # the engine's base forward is this query
        return engine.base_loss().reshape(())

    def _outputs_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss (float64) of one point's model outputs ``(B, ...)``, through the black-box head if any."""
        if self.head is not None:
            # the head is a black box of the model's precision: the graph engine may hand it float64 outputs
            dtype = next((p.dtype for p in self.model.parameters()), torch.float32)
            outputs = self.head(outputs.to(dtype) if outputs.is_floating_point() else outputs, self.inputs)
        return query.float64_loss(self.loss_fn, outputs, targets)

    def _losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        self._check_names(params)
        forwards = self._full_forwards
        if forwards.strategy == "auto" and self.feature_reuse and not self._no_graph_engine:
            forwards = self._first_working  # a model with an engine (or not yet known without one): no timings
        with self._query_context():
            if self.head is None:
                return forwards(self.model, params, varied, self.inputs,
                                then=lambda out: query.float64_loss(self.loss_fn, out, self.targets),
                                fresh=self._same_draws)
            # the black-box head never runs under vmap: it gets all K * B outputs of the chunk as one flat batch
            outputs = forwards(self.model, params, varied, self.inputs, fresh=self._same_draws)  # (K, B, ...)
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
        engine = self._graph_engine(params) if self.feature_reuse else None
        if engine is None:
            return super().coordinate_losses(params, name, index, delta)
        with self._query_context():
            values = engine.coordinate_losses(name, index, delta)
        self.queries += int(index.numel())
        return values

    def _graph_engine(self, params: Mapping[str, Tensor]) -> reuse.GraphEngine | None:
        if self._no_graph_engine:
            return None
        key = _params_key(params)
        if self._engine is None or not _same_params(key, self._engine_key):
            self._engine = None  # its cached activations are freed before the next engine's are made
            with self._query_context():
                self._engine = reuse.build_graph_engine(
                    # without a head the engine sees the plain loss function (it batches known losses per chunk)
                    self.model, self.loss_fn if self.head is None else self._outputs_loss, self.inputs, self.targets,
                    dict(params), max_batch=self.max_batch, memory_budget=self.memory_budget,
                    delta_dtype=self.delta_dtype, self_check=self.self_check,
                )
            if self._engine is None:  # no graph engine (warned once per model type): full forwards from now on
                self._no_graph_engine = True
                return None
            self._engine_key = key
        return self._engine


def _params_key(params: Mapping[str, Tensor]) -> tuple:
    """The parameters as a cache key: the tensors themselves (identity and in-place version), so that a freed
    tensor's memory can never be mistaken for the cached parameters."""
    return tuple((n, v, tensor_version(v)) for n, v in params.items())


def _same_params(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(
        x[0] == y[0] and x[1] is y[1] and x[2] == y[2] for x, y in zip(a, b, strict=True))


def white_box_oracle(oracle: Oracle, probe: str, remedy: str) -> ModuleOracle:
    """``oracle`` as the white-box :class:`ModuleOracle` that a first-order ``probe`` differentiates
    (``loss_fn(model(inputs), targets)``), or an error naming ``probe`` and ``remedy``.

    Raises:
        TypeError: ``oracle`` is not a :class:`ModuleOracle` (a black box).
        ValueError: it has a black-box ``head``: the loss ZO estimates runs through the head, which a first-order
            probe cannot differentiate (it would differentiate another loss).
    """
    if not isinstance(oracle, ModuleOracle):
        raise TypeError(f"{probe} needs a white-box ModuleOracle, but make_oracle returned a {type(oracle).__name__}; "
                        f"{remedy}")
    if oracle.head is not None:
        raise ValueError(f"{probe} differentiates loss_fn(model(inputs)), but this ModuleOracle has a black-box "
                         f"`head` between the model and the loss (head={oracle.head!r}), so that is not the loss ZO "
                         f"estimates; {remedy}")
    return oracle
