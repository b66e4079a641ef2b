"""ZOModule: a LightningModule whose training step is query -> estimate -> step, never backward."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from dz_lightning import distributed, optim_step, query, strategies  # noqa: F401 - strategies registers "zo_ddp" with Lightning
from dz_lightning.estimators import Estimate
from dz_lightning.finite_step import NonFiniteStepError
from dz_lightning.module_state import check_resume, checkpoint_state, remap_legacy_keys, restore_state, stop_when_spent
from dz_lightning.oracle import ModuleOracle, has_batchnorm
from dz_lightning.oracle_base import Oracle
from dz_lightning.step import StepPlan, StepShare, StepTiming
from dz_lightning.step_logging import StepLog
from dz_lightning.validation import check_choice, check_positive_float, check_positive_int

__all__ = ["NonFiniteStepError", "ZOModule", "build_optimizers"]

_PRECISIONS = ("32-true", "64-true", "32", "64")


def _plan_setting(name: str) -> property:
    """A ZOModule attribute that is the step plan's setting of the same name (one place for each setting)."""

    def get(self: ZOModule) -> Any:
        return getattr(self.zo_plan, name)

    def set_(self: ZOModule, value: Any) -> None:
        setattr(self.zo_plan, name, value)

    return property(get, set_, doc=f"The step plan's ``{name}``: changing it changes the next steps.")


class ZOModule(L.LightningModule):
    """Base class for zeroth-order training with Lightning's manual optimization.

    A subclass says what the objective is by implementing :meth:`make_oracle` (and what to log in
    ``validation_step`` / ``test_step``). The step itself is written once, here:

    1. ``oracle = self.make_oracle(batch)``; :meth:`training_forward` (BatchNorm statistics, training metrics);
    2. :meth:`estimate`: CGE (restricted to ``self.zo_masks`` when a callback such as ZO-GraSP set them) or RGE
       estimates this rank's share of the gradient of :meth:`zo_parameters` through :attr:`zo_plan`, a
       :class:`~dz_lightning.step.StepPlan` (CGE coordinates split by measured cost, RGE points round-robin; it
       takes the estimator settings below when the module is built);
    3. ``zo_plan.reduce``: one all-reduce gives every rank the full estimate (with one process it returns its
       input), identical on all ranks; :meth:`process_estimate` may post-process it (the same on every rank);
    4. the estimate is written to ``p.grad``, optionally clipped, and the optimizer and scheduler step.

    The module follows :class:`~dz_lightning.trainable.ZOTrainable`, the protocol the bundled callbacks check.
    After each step ``last_estimate`` holds the full :class:`~dz_lightning.Estimate` and ``last_timing`` the
    :class:`~dz_lightning.step.StepTiming` of this rank (benchmarks read them).

    Logged (by :class:`~dz_lightning.step_logging.StepLog`, which lists them): ``train/loss``, ``train/queries`` and
    the other per-step ``train/`` scalars; ``queries/s`` and ``queries`` in the progress bar; the hyperparameters with
    the final metrics after ``fit`` and ``test`` (TensorBoard's HPARAMS tab).

    Args:
        model: the trained network.
        estimator: ``"cge"`` (coordinate-wise, the paper's choice) or ``"rge"`` (random directions).
        mu: finite-difference step (> 0).
        q: RGE directions per step (ignored by CGE).
        difference: ``"forward"`` or ``"central"`` differences.
        distribution: RGE direction distribution, ``"sphere"`` or ``"gaussian"``.
        optimizer: optimizer factory, called with the parameters (YAML: ``class_path`` + ``init_args``).
        lr_scheduler: optional scheduler factory, called with the optimizer.
        scheduler_interval: step the scheduler every optimizer ``"step"`` or every ``"epoch"``.
        gradient_clip_val: clip the estimated gradient to this global 2-norm; ``None`` disables.
        max_batch: most perturbed points per batched oracle call; ``None`` derives it from ``memory_budget``.
        memory_budget: bytes batched queries may use; ``None`` means a default fraction of free memory.
        delta_dtype: arithmetic of the graph engine's linear ops on a perturbation's difference from the cached
            base: ``"auto"`` (default: ``"bfloat16"`` convolutions where the device computes bf16 natively, i.e.
            CPUs with AVX512-BF16/AMX-BF16 and GPUs with bf16 tensor cores, else and for ``Linear`` ``"float32"``;
            the choice is logged once), ``"float32"``, ``"bfloat16"`` (error relative to the difference; on a CPU
            without native bf16 it is slower and warns) or ``"tf32"`` (CUDA only). The base forward, the nonlinear
            ops and the losses stay fp32/float64 whatever this says.
        nonfinite: what to do with a non-finite perturbed loss: ``"raise"`` or ``"skip"`` it (with a warning).
            A non-finite loss at the unperturbed point always raises; nothing non-finite reaches the weights.
        nonfinite_step: what to do when an optimizer step leaves a parameter or an optimizer state tensor
            non-finite (finite but huge losses, a large learning rate, momentum overflowing): the step is always
            undone first (parameters and optimizer state restored to their values before it), then ``"raise"``
            stops the run with :class:`NonFiniteStepError` (the last checkpoint is the last good state) or
            ``"skip"`` goes on to the next batch with a warning. The check is one fused ``isfinite`` reduction (one
            host sync) per step; the undo keeps one copy of the parameters and optimizer state.
        max_queries: stop training once this many queries have been spent (``None``: no budget).
        seed: seed of the module's private generator for random directions.
    """

    #: constructor arguments of subclasses that are modules or black boxes (kept out of ``hparams``)
    _hparams_ignore: tuple[str, ...] = ()
    estimator = _plan_setting("estimator")
    mu = _plan_setting("mu")
    q = _plan_setting("q")
    difference = _plan_setting("difference")
    distribution = _plan_setting("distribution")
    nonfinite = _plan_setting("nonfinite")
    zo_cost_table = _plan_setting("cost_table")  # the DDP CGE split's :class:`~dz_lightning.distributed.CostTable`
    #: attributes under which older versions of a subclass also registered its network (the whole network, or the
    #: module that holds ``self.model``); their checkpoint keys are renamed to ``model.`` on load
    _legacy_model_aliases: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        estimator: Literal["cge", "rge"] = "cge",
        mu: float = 5e-3,
        q: int = 192,
        difference: Literal["forward", "central"] = "forward",
        distribution: Literal["gaussian", "sphere"] = "sphere",
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        gradient_clip_val: float | None = None,
        max_batch: int | None = None,
        memory_budget: int | None = None,
        delta_dtype: Literal["auto", "float32", "bfloat16", "tf32"] = "auto",
        nonfinite: Literal["raise", "skip"] = "raise",
        nonfinite_step: Literal["raise", "skip"] = "raise",
        max_queries: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _zo_module_validation(model, estimator, mu, q, difference, distribution, scheduler_interval,
                              gradient_clip_val, delta_dtype, nonfinite, nonfinite_step, max_queries)
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler", *self._hparams_ignore])
        self.automatic_optimization = False
        self.model = model
        self._generator = torch.Generator().manual_seed(seed)
        # the estimator's settings live in the step plan (``self.mu`` etc. read and write them there)
        self.zo_plan = StepPlan(estimator, mu=float(mu), q=q, difference=difference, distribution=distribution,
                                nonfinite=nonfinite, generator=self._generator)
        self.seed = seed
        self.optimizer_fn, self.scheduler_fn, self.scheduler_interval = optimizer, lr_scheduler, scheduler_interval
        self.gradient_clip_val, self.nonfinite_step, self.max_queries = gradient_clip_val, nonfinite_step, max_queries
        # batched queries: points per call, memory and the graph engine's arithmetic
        self.max_batch, self.memory_budget, self.delta_dtype = max_batch, memory_budget, delta_dtype
        self.steps_undone = 0
        self.zo_masks: dict[str, Tensor] | None = None
        self._restored_mask_density: float | None = None  # a resumed checkpoint's, checked in on_train_start
        self.queries_total = 0
        self.last_estimate: Estimate | None = None
        self.last_timing: StepTiming | None = None
        self.zo_log = StepLog()

    @property
    def zo_costs(self) -> dict[str, float] | None:
        """Current cost of one coordinate per parameter under DDP (seconds once measured); ``None`` before.

        Setting a dict name -> relative cost starts a fresh :class:`~dz_lightning.distributed.CostTable` with it
        as the prior (instead of :func:`~dz_lightning.distributed.query_costs`); ``None`` resets the table.
        """
        return None if self.zo_cost_table is None else self.zo_cost_table.costs()

    @zo_costs.setter
    def zo_costs(self, prior: Mapping[str, float] | None) -> None:
        self.zo_cost_table = None if prior is None else distributed.CostTable(prior)

    # ------------------------------------------------------------------------------------ template hooks
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def make_oracle(self, batch: Any) -> Oracle:
        """Return the loss oracle for ``batch``. Subclasses must implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement `make_oracle(batch)`.")

    def zo_parameters(self) -> dict[str, Tensor]:
        """Parameters estimated by ZO: name (relative to ``self.model``) -> tensor. Default: trainable ones.

        A task that trains only part of ``self.model`` overrides this (and names the parameters relative to the
        sub-network its oracle evaluates) instead of registering the sub-network under a second attribute.
        """
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def module_oracle(self, loss_fn: Any, inputs: Tensor, targets: Tensor, head: Any = None,
                      model: nn.Module | None = None, **options: Any) -> ModuleOracle:
        """A :class:`ModuleOracle` over ``model`` (default ``self.model``) with this module's batching settings.

        ``head``: a black box between the model and the loss (see :class:`ModuleOracle`); ``options``: other
        :class:`ModuleOracle` arguments, which take precedence over this module's (``feature_reuse``, ``max_batch``).
        """
        model = self.model if model is None else model
        settings = {"max_batch": self.max_batch, "memory_budget": self.memory_budget, "delta_dtype": self.delta_dtype}
        if query.has_random_dropout(model):
            # the step's dropout masks from the module's own generator: saved in checkpoints (a resumed run draws the
            # same masks) and the same on every rank (ranks estimate their shares under one set of masks)
            settings["dropout_seed"] = int(torch.randint(0, 2**62, (), generator=self._generator))
        if distributed.rank_and_world()[1] > 1:  # timed fallback choices could differ between ranks: untimed
            settings["fallback"] = "first_working"
        return ModuleOracle(model, loss_fn, inputs, targets, head=head, **{**settings, **options})

    def training_forward(self, batch: Any, oracle: Oracle) -> Tensor | None:
        """The step's one plain forward of the training batch, before the estimate; returns its outputs or ``None``.

        Queries never update BatchNorm running statistics, so this forward does: by default, when ``oracle`` is a
        :class:`ModuleOracle` over one of this module's networks that holds BatchNorm layers in train mode, one
        forward of the oracle's inputs (:meth:`ModuleOracle.training_forward`, no autograd). Subclasses override it
        to log training metrics from the outputs (taken at the weights before the step) or to forward differently.
        """
        model = oracle.model if isinstance(oracle, ModuleOracle) else None
        owned = model is not None and any(m is model for m in self.modules())
        if not owned or not model.training or not has_batchnorm(model):
            return None
        return oracle.training_forward()

    # -------------------------------------------------------------------------------------- Lightning API
    def configure_optimizers(self) -> Any:
        return build_optimizers(self.parameters(), self.optimizer_fn, self.scheduler_fn, self.scheduler_interval)

    def on_train_start(self) -> None:
        # the callbacks' on_train_start (which hands over masks) ran before this hook
        density, self._restored_mask_density = self._restored_mask_density, None
        check_resume(self, density)
        _check_unsharded(self.trainer)

    def setup(self, stage: str) -> None:
        _check_precision(str(self.trainer.precision))

    def estimate(self, oracle: Oracle, params: Mapping[str, Tensor]) -> StepShare | Estimate:
        """This rank's share of the step's estimate (with one process: the estimate), from :attr:`zo_plan`.

        A subclass may override it to compute its share in its own way: returning ``super().estimate(...)`` keeps the
        plan's exact split (and exact distributed RGE); an :class:`~dz_lightning.Estimate` it returns (or
        ``StepShare(estimate)``) is a partial estimate whose grads are summed over the ranks under DDP (an override
        that does not split the work across ranks must return ``grads / world``). The share is opaque: to scale,
        clip or otherwise post-process the estimate, override :meth:`process_estimate`, which sees the reduced one.
        """
        return self.zo_plan.estimate(oracle, params, self.zo_masks)

    def process_estimate(self, estimate: Estimate) -> Estimate:
        """The step's reduced estimate (identical on every rank) before it is written to ``p.grad``; a subclass may
        return a post-processed one (scaled, clipped, ...). The default returns it unchanged."""
        return estimate

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The paper's step: oracle, this rank's estimate, one all-reduce, ``p.grad``, optimizer step, log."""
        start = time.perf_counter()
        oracle = self.make_oracle(batch)
        self.training_forward(batch, oracle)
        params = self.zo_parameters()
        try:
            share, error = self.estimate(oracle, params), None
        except Exception as err:  # noqa: BLE001 - re-raised by `reduce`, after the collective every rank joins
            share, error = None, err
        if isinstance(share, Estimate):  # a subclass's own partial estimate
            share = StepShare(share)
        est, self.last_timing = self.zo_plan.reduce(params, share, error, queries=oracle.queries)
        self.last_estimate = est = self.process_estimate(est)
        for name, p in params.items():
            p.grad = est.grads[name].to(p.dtype)
        optim_step.optimizer_step(self)
        self.queries_total += est.queries
        self.zo_log.step(self, est.loss, est.queries, max(time.perf_counter() - start, 1e-9), params)
        stop_when_spent(self, est.queries)
        return torch.tensor(est.loss)

    def on_train_epoch_end(self) -> None:
        if self.scheduler_interval == "epoch":
            optim_step.step_schedulers(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dz_lightning"] = checkpoint_state(self._generator, self.queries_total, self.zo_masks,
                                                      self.zo_cost_table)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if isinstance(checkpoint.get("state_dict"), Mapping):
            checkpoint["state_dict"] = remap_legacy_keys(checkpoint["state_dict"], self._legacy_model_aliases)
        restored = restore_state(checkpoint, self._generator)
        if restored is not None:
            self.queries_total, self._restored_mask_density, self.zo_cost_table = restored

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, accepting the layouts of older versions (see ``_legacy_model_aliases``)."""
        state_dict = remap_legacy_keys(state_dict, self._legacy_model_aliases)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_fit_end(self) -> None:
        self.zo_log.hparams_with_metrics(self)

    def on_test_end(self) -> None:
        self.zo_log.hparams_with_metrics(self)


def _check_precision(precision: str) -> None:
    if precision not in _PRECISIONS:
        raise ValueError(
            f"ZOModule needs full-precision finite differences, but the Trainer uses precision={precision!r}. "
            f"Use one of {_PRECISIONS[:2]} (queries run in fp32 regardless; mixed precision would corrupt the "
            "optimizer step through its gradient scaler)."
        )


def _check_unsharded(trainer: L.Trainer) -> None:
    """Fail when the ranks of ``trainer`` see different training batches (each step's queries are split across them)."""
    if trainer.world_size > 1 and any(_shards(loader) for loader in _loaders(trainer.train_dataloader)):
        raise ValueError(
            "ZOModule splits each step's queries across ranks, so every rank must see the same batch, but the "
            "training data are sharded across ranks (a DistributedSampler; the Trainer adds one when "
            "use_distributed_sampler=True). Set `trainer.use_distributed_sampler: false` (the task data modules "
            "order batches by (seed, epoch), identically on every rank)."
        )


def _loaders(loaders: Any) -> Iterator[Any]:
    """The data loaders in what ``trainer.train_dataloader`` returns (one loader, or a list/dict of them)."""
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        for item in loaders:
            yield from _loaders(item)
    elif loaders is not None:
        yield loaders


def _shards(loader: Any) -> bool:
    """Whether a loader gives each rank a different part of the data (a ``DistributedSampler`` in it)."""
    if not isinstance(loader, DataLoader):
        return False
    samplers = (loader.sampler, getattr(loader.batch_sampler, "sampler", None))
    return any(isinstance(s, DistributedSampler) for s in samplers)


def build_optimizers(parameters: Any, optimizer_fn: OptimizerCallable, scheduler_fn: LRSchedulerCallable | None,
                     interval: str = "step") -> Any:
    """What ``configure_optimizers`` returns for an optimizer factory and an optional scheduler factory."""
    opt = optimizer_fn(parameters)
    if scheduler_fn is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler_fn(opt), "interval": interval}}


def _zo_module_validation(model: Any, estimator: str, mu: float, q: int, difference: str, distribution: str,
                          scheduler_interval: str, gradient_clip_val: float | None, delta_dtype: str,
                          nonfinite: str, nonfinite_step: str, max_queries: int | None) -> None:
    check_choice("estimator", estimator, ("cge", "rge"))
    check_positive_float("mu", mu)
    check_positive_int("q", q)
    check_choice("difference", difference, ("forward", "central"))
    check_choice("distribution", distribution, ("gaussian", "sphere"))
    check_choice("scheduler_interval", scheduler_interval, ("step", "epoch"))
    check_positive_float("gradient_clip_val", gradient_clip_val, allow_none=True)
    check_choice("nonfinite", nonfinite, ("raise", "skip"))
    check_positive_int("max_queries", max_queries, allow_none=True)
    check_choice("nonfinite_step", nonfinite_step, ("raise", "skip"))
    check_choice("delta_dtype", delta_dtype, ("auto", "float32", "bfloat16", "tf32"))
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}.")

