"""ZOModule: a LightningModule whose training step is query -> estimate -> step, never backward."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from dz_lightning import distributed
from dz_lightning.estimators import Estimate, cge, rge, validate_masks
from dz_lightning.finite_step import NonFiniteStepError, StepUndo
from dz_lightning.oracle import ModuleOracle, Oracle
from dz_lightning.validation import check_choice, check_positive_float, check_positive_int

__all__ = ["NonFiniteStepError", "ZOModule", "build_optimizers"]

_PRECISIONS = ("32-true", "64-true", "32", "64")


class ZOModule(L.LightningModule):
    """Base class for zeroth-order training with Lightning's manual optimization.

    A subclass says what the objective is by implementing :meth:`make_oracle` (and what to log in
    ``validation_step`` / ``test_step``). The step itself is written once, here:

    1. ``oracle = self.make_oracle(batch)``;
    2. CGE (restricted to ``self.zo_masks`` when a callback such as ZO-GraSP set them) or RGE estimates the
       gradient of ``self.zo_parameters()``; under DDP each rank estimates its share of the coordinates (or
       directions) and one all-reduce combines them (CGE coordinates are split by measured cost: the same
       all-reduce carries each rank's seconds per parameter into an identical :class:`~dz_lightning.distributed.
       CostTable` on every rank; RGE all-reduces the directions' losses and every rank sums the directions in the
       single process's order);
    3. the estimate is written to ``p.grad``, optionally clipped, and the optimizer and scheduler step.

    Logged: ``train/loss``, ``train/queries`` (this step, all ranks), ``train/queries_total``,
    ``train/queries_per_s`` and ``train/grad_density`` (fraction of coordinates estimated); ``train/loss_vs_queries``
    with the cumulative query count as its step; the hyperparameters with the final metrics after ``fit`` and
    ``test`` (TensorBoard's HPARAMS tab). The progress bar shows ``queries/s`` (smoothed) and ``queries`` (total).

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
        delta_dtype: arithmetic of the staged engine's linear ops on a perturbation's difference from the cached
            base: ``"float32"`` (default), ``"bfloat16"`` (error relative to the difference; faster convolutions on
            CPUs with AVX512-BF16 and on GPUs) or ``"tf32"`` (CUDA only). The base forward, the nonlinear ops and the
            losses stay fp32/float64 whatever this says.
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
        delta_dtype: Literal["float32", "bfloat16", "tf32"] = "float32",
        nonfinite: Literal["raise", "skip"] = "raise",
        nonfinite_step: Literal["raise", "skip"] = "raise",
        max_queries: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _zo_module_validation(estimator, mu, q, difference, distribution, scheduler_interval, gradient_clip_val,
                              nonfinite, max_queries)
        check_choice("nonfinite_step", nonfinite_step, ("raise", "skip"))
        check_choice("delta_dtype", delta_dtype, ("float32", "bfloat16", "tf32"))
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected argument `model` to be an nn.Module, but got {type(model).__name__}.")
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler", *self._hparams_ignore])
        self.automatic_optimization = False
        self.model = model
        self.estimator = estimator
        self.mu = float(mu)
        self.q = q
        self.difference = difference
        self.distribution = distribution
        self.optimizer_fn = optimizer
        self.scheduler_fn = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.gradient_clip_val = gradient_clip_val
        self.max_batch = max_batch
        self.memory_budget = memory_budget
        self.delta_dtype = delta_dtype
        self.nonfinite = nonfinite
        self.nonfinite_step = nonfinite_step
        self.steps_undone = 0
        self.max_queries = max_queries
        self.seed = seed
        self.zo_masks: dict[str, Tensor] | None = None
        self.zo_cost_table: distributed.CostTable | None = None
        self._zo_timing: _StepTiming | None = None
        self._zo_rge: _RGEShare | None = None
        self.queries_total = 0
        self.last_train_outputs: Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self.last_estimate: Estimate | None = None
        self._zo_throughput = _Throughput()
        self._zo_hparams_logged: set[tuple[str, Any]] = set()  # (log folder, fit/test): fit and test each once

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
        """Parameters estimated by ZO: name (relative to ``self.model``) -> tensor. Default: trainable ones."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def module_oracle(self, loss_fn: Any, inputs: Tensor, targets: Tensor, head: Any = None) -> ModuleOracle:
        """A :class:`ModuleOracle` over ``self.model`` with this module's batching settings (``head``: see there)."""
        return ModuleOracle(self.model, loss_fn, inputs, targets, max_batch=self.max_batch,
                            memory_budget=self.memory_budget, delta_dtype=self.delta_dtype, head=head)

    # -------------------------------------------------------------------------------------- Lightning API
    def configure_optimizers(self) -> Any:
        return build_optimizers(self.parameters(), self.optimizer_fn, self.scheduler_fn, self.scheduler_interval)

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        connector = getattr(trainer, "_accelerator_connector", None)
        if stage == "fit" and trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "ZOModule splits each step's queries across ranks, so every rank must see the same batch, but the "
                "Trainer shards the data (use_distributed_sampler=True). Set `trainer.use_distributed_sampler: false` "
                "(the task data modules order batches by (seed, epoch), identically on every rank)."
            )
        precision = str(self.trainer.precision)
        if precision not in _PRECISIONS:
            raise ValueError(
                f"ZOModule needs full-precision finite differences, but the Trainer uses precision={precision!r}. "
                f"Use one of {_PRECISIONS[:2]} (queries run in fp32 regardless; mixed precision would corrupt the "
                "optimizer step through its gradient scaler)."
            )

    def estimate(self, oracle: Oracle, params: Mapping[str, Tensor]) -> Estimate:
        """The gradient estimate on one process; under DDP this rank's share of it (before the all-reduce).

        Under DDP, CGE returns this rank's coordinates (zero elsewhere). RGE evaluates this rank's round-robin share
        of the directions and records their losses; the returned grads are meaningless, and the step finishes after
        the all-reduce by replaying RGE on every rank from all the losses (the same sum as on one process).
        """
        rank, world = distributed.rank_and_world()
        masks = self.zo_masks
        validate_masks(params, masks)
        kwargs = {"nonfinite": self.nonfinite}
        if self.estimator == "rge":
            rge_kwargs = {"q": self.q, "mu": self.mu, "distribution": self.distribution,
                          "difference": self.difference, "masks": masks, **kwargs}
            if world == 1:
                return rge(oracle, params, generator=self._generator, **rge_kwargs)
            recorder = distributed.RecordingOracle(oracle, rank, world, self._rge_points(), _device(params))
            self._zo_rge = _RGEShare(recorder, self._generator.get_state(), rge_kwargs)
            return rge(recorder, params, generator=self._generator, **rge_kwargs)
        if world == 1:
            return cge(oracle, params, mu=self.mu, masks=masks, difference=self.difference, **kwargs)
        if self.zo_cost_table is None:
            inputs = oracle.inputs if isinstance(oracle, ModuleOracle) else None
            self.zo_cost_table = distributed.CostTable(
                distributed.query_costs(self.model, inputs) if inputs is not None else None)
        index = {n: (masks[n].reshape(-1).nonzero().reshape(-1) if masks is not None and n in masks
                     else torch.arange(p.numel(), device=p.device)) for n, p in params.items()}
        coordinates = self.zo_cost_table.split(index, rank, world)
        timing = _StepTiming(counts={n: c.numel() for n, c in coordinates.items()},
                             expected={n: i.numel() for n, i in index.items()})
        self._zo_timing = timing
        with distributed.timed_coordinates(oracle, timing.seconds):
            return cge(oracle, params, mu=self.mu, masks=masks, difference=self.difference,
                       coordinates=coordinates, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        start = time.perf_counter()
        self.last_train_outputs = None
        oracle = self.make_oracle(batch)
        if getattr(oracle, "model", None) is self.model and hasattr(oracle, "inputs") and self.model.training:
            self._update_batchnorm_stats(oracle)
        params = self.zo_parameters()
        self._zo_timing, self._zo_rge = None, None
        # exact distributed RGE sends the step's losses instead of partial gradients (a subclass that overrides
        # `estimate` keeps sending its partial gradients)
        rge_losses = (self.estimator == "rge" and distributed.rank_and_world()[1] > 1
                      and type(self).estimate is ZOModule.estimate)
        error: BaseException | None = None
        try:
            est = self.estimate(oracle, params)
            grads, queries, loss = est.grads, est.queries, est.loss
            if rge_losses:
                grads = {_LOSSES: self._zo_rge.recorder.payload()}
        except Exception as err:  # noqa: BLE001 - re-raised below, after the collective every rank joins
            error = err
            queries, loss = oracle.queries, float("nan")
            grads = ({_LOSSES: torch.zeros(self._rge_points(), dtype=torch.float64, device=_device(params))}
                     if rge_losses else {n: torch.zeros_like(p) for n, p in params.items()})
        timing = self._zo_timing
        # timings always travel (zeros when there are none), so every rank sends a buffer of the same layout
        reduced = distributed.all_reduce_step(grads, queries, error is not None,
                                              seconds=timing.seconds if timing else {},
                                              counts=timing.counts if timing else {})
        grads, queries, failed = reduced.grads, reduced.queries, reduced.failed
        if error is not None:
            raise error
        if failed:
            raise distributed.RankFailedError(
                "Another rank failed to estimate its share of the gradient (see its error); stopping all ranks."
            )
        if timing is not None and self.zo_cost_table is not None:
            _check_split(reduced.counts, timing.expected)
            self.zo_cost_table.update(reduced.seconds, reduced.counts)
        if rge_losses:
            grads = self._zo_rge.finish(params, grads[_LOSSES])
            self._zo_rge = None  # it holds the oracle (and its cached activations)
        if not all(torch.isfinite(g).all() for g in grads.values()):
            raise ValueError("The estimated gradient is not finite; refusing to write it into the weights.")
        self.last_estimate = Estimate(grads=grads, queries=queries, loss=loss)
        for name, p in params.items():
            p.grad = grads[name].to(p.dtype)
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        undo = StepUndo([getattr(opt, "optimizer", opt) for opt in opts])
        for opt in opts:
            if self.gradient_clip_val is not None:
                self.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
        self._undo_nonfinite_step(undo)
        if self.scheduler_interval == "step":
            self._step_schedulers()
        self.queries_total += queries
        elapsed = max(time.perf_counter() - start, 1e-9)
        self._log_step(loss, queries, elapsed, params)
        if self.max_queries is not None and self.queries_total >= self.max_queries:
            self.trainer.should_stop = True
        return torch.tensor(loss)

    def on_train_epoch_end(self) -> None:
        if self.scheduler_interval == "epoch":
            self._step_schedulers()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dz_lightning"] = {"generator_state": self._generator.get_state(),
                                      "queries_total": self.queries_total,
                                      "cost_table": None if self.zo_cost_table is None
                                      else self.zo_cost_table.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("dz_lightning")
        if state is None:
            rank_zero_warn("The checkpoint has no dz_lightning state; the direction generator restarts from its seed.")
            return
        self._generator.set_state(state["generator_state"])
        self.queries_total = int(state["queries_total"])
        # every rank loads the same file, so the resumed split is the same on all of them
        table = state.get("cost_table")
        self.zo_cost_table = None if table is None else distributed.CostTable.from_state_dict(table)

    def on_fit_end(self) -> None:
        self._log_hparams_with_metrics()

    def on_test_end(self) -> None:
        self._log_hparams_with_metrics()

    # -------------------------------------------------------------------------------------------- helpers
    def _undo_nonfinite_step(self, undo: StepUndo) -> None:
        """Undo the step if it left anything non-finite; then raise or warn (``nonfinite_step``)."""
        bad = undo.nonfinite()
        if not bad:
            return
        undo.restore()
        self.steps_undone += 1
        names = {id(p): n for n, p in self.named_parameters()}
        where = ", ".join(names.get(id(t), "optimizer state") for t in bad[:5])
        message = (f"Optimizer step {self.global_step} made {len(bad)} tensor(s) non-finite "
                   f"({where}{', ...' if len(bad) > 5 else ''}) although the estimated gradient was finite (huge "
                   "losses, a large learning rate or overflowing momentum). The step was undone: parameters and "
                   "optimizer state are back at their values before it.")
        if self.nonfinite_step == "raise":
            raise NonFiniteStepError(f"{message} Lower the learning rate, set `gradient_clip_val`, or pass "
                                     "nonfinite_step='skip' to skip such steps with a warning.")
        rank_zero_warn(f"{message} Skipping it (nonfinite_step='skip'); {self.steps_undone} step(s) skipped so far.",
                       category=RuntimeWarning)

    def _log_hparams_with_metrics(self) -> None:
        """Hyperparameters with the run's final metrics, for TensorBoard's HPARAMS tab (once per log folder).

        The configs set ``default_hp_metric: false``, so nothing reaches the tab at fit start; here the module's and
        data module's hyperparameters (and those callbacks added, e.g. ZO-GraSP's sparsity), the optimizer and the
        model class go out with the last logged epoch-level metrics (``val/acc``, ``train/loss_epoch``, ...,
        ``test/*`` after ``test``) and the query total.
        """
        metrics = {k: float(v) for k, v in self.trainer.logged_metrics.items()
                   if k != "epoch" and not k.endswith("_step") and (not torch.is_tensor(v) or v.numel() == 1)}
        metrics["train/queries_total"] = float(self.queries_total)
        opt = self.optimizers() if self.trainer.state.fn == "fit" else None
        opt = opt[0] if isinstance(opt, list) else opt
        extra = {"model_class": type(self.model).__name__}
        if opt is not None:
            group = opt.param_groups[0]
            extra.update(optimizer=type(opt.optimizer if hasattr(opt, "optimizer") else opt).__name__,
                         lr=float(group.get("initial_lr", group["lr"])))
        for logger in self.loggers:
            folder = str(getattr(logger, "log_dir", None) or id(logger))
            if not isinstance(logger, TensorBoardLogger) or (folder, self.trainer.state.fn) in self._zo_hparams_logged:
                continue
            logger.log_hyperparams({**dict(logger.hparams), **extra}, metrics=metrics, step=self.global_step)
            self._zo_hparams_logged.add((folder, self.trainer.state.fn))

    def _step_schedulers(self) -> None:
        scheds = self.lr_schedulers()
        if scheds is None:
            return
        for sch in scheds if isinstance(scheds, list) else [scheds]:
            sch.step()

    def _rge_points(self) -> int:
        """Perturbed points one RGE step evaluates."""
        return self.q * (2 if self.difference == "central" else 1)

    def _has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())

    def _update_batchnorm_stats(self, oracle: Oracle) -> None:
        """One plain forward of ``oracle.inputs`` so BatchNorm running statistics follow training.

        Queries never touch the statistics; oracles over ``self.model`` that expose ``model`` and ``inputs``
        (:class:`ModuleOracle` and task oracles alike) get this update. Its outputs (before the step's update) are
        kept in ``last_train_outputs`` for subclasses that log training metrics without another forward.
        """
        if self._has_batchnorm():
            with torch.no_grad(), torch.autocast(oracle.inputs.device.type, enabled=False):
                self.last_train_outputs = self.model(oracle.inputs)

    def _log_step(self, loss: float, queries: int, elapsed: float, params: Mapping[str, Tensor]) -> None:
        total = sum(p.numel() for p in params.values())
        if self.estimator == "cge":
            masks = self.zo_masks or {}
            estimated = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in params.items())
            self.log("train/grad_density", estimated / max(total, 1), on_step=True, on_epoch=False)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/queries", float(queries), on_step=True, on_epoch=False)
        self.log("train/queries_total", float(self.queries_total), on_step=True, on_epoch=False)
        self.log("train/queries_per_s", queries / elapsed, on_step=True, on_epoch=False)
        # the progress bar: smoothed throughput and the running total (the loggers get the raw per-step values)
        self.log("queries/s", self._zo_throughput.update(queries, elapsed), prog_bar=True, logger=False,
                 on_step=True, on_epoch=False)
        self.log("queries", float(self.queries_total), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        opt = self.optimizers()
        opt = opt[0] if isinstance(opt, list) else opt
        self.log("train/lr", float(opt.param_groups[0]["lr"]), on_step=True, on_epoch=False)
        if self.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            # loss against the unit a ZO user pays in: the cumulative query count is the x axis (the step); only
            # TensorBoard keeps one step axis per tag (CSV or W&B loggers would get a second step column)
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.log_metrics({"train/loss_vs_queries": loss}, step=self.queries_total)


class _Throughput:
    """Queries per second for the progress bar: exponential moving averages of queries and of seconds per step.

    Their ratio weighs each step by its duration, so one slow step (compilation, a checkpoint) or one very fast one
    moves the display by a fraction of ``alpha`` instead of making it jump. Both averages start at zero with the same
    bias, which cancels in the ratio: the first step shows its own rate.
    """

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha, self.queries, self.seconds = alpha, 0.0, 0.0

    def update(self, queries: float, seconds: float) -> float:
        """Add one step; return the smoothed queries per second."""
        self.queries += self.alpha * (queries - self.queries)
        self.seconds += self.alpha * (seconds - self.seconds)
        return self.queries / max(self.seconds, 1e-12)


@dataclass
class _StepTiming:
    """This rank's share of one DDP CGE step: coordinates per parameter, how many the step has, seconds spent."""

    counts: dict[str, int]
    expected: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)


_LOSSES = "__rge_losses__"


def _device(params: Mapping[str, Tensor]) -> torch.device:
    return next(iter(params.values())).device


@dataclass
class _RGEShare:
    """A DDP RGE step between its two passes: the recorder of this rank's losses and the random state to replay."""

    recorder: distributed.RecordingOracle
    generator_state: Tensor
    kwargs: dict[str, Any]

    def finish(self, params: Mapping[str, Tensor], losses: Tensor) -> dict[str, Tensor]:
        """Every rank: RGE again over the same directions, answered from the all-reduced ``losses``."""
        base = self.recorder.base
        replay = distributed.ReplayOracle(base, losses.to(base.device, base.dtype))
        generator = torch.Generator()
        generator.set_state(self.generator_state)
        return rge(replay, params, generator=generator, **self.kwargs).grads


def _check_split(counts: Mapping[str, float], expected: Mapping[str, int]) -> None:
    """Every coordinate evaluated by exactly one rank, judged from all-reduced counts (same verdict on all ranks)."""
    wrong = {n: (counts.get(n, 0.0), e) for n, e in expected.items()
             if e < 2**24 and abs(counts.get(n, 0.0) - e) > 0.5}
    if wrong:
        raise distributed.RankFailedError(
            "The ranks split the coordinates inconsistently (parameter: (evaluated, expected)): "
            f"{dict(list(wrong.items())[:5])}. Every rank must see the same batch, masks and cost table."
        )


def build_optimizers(parameters: Any, optimizer_fn: OptimizerCallable, scheduler_fn: LRSchedulerCallable | None,
                     interval: str = "step") -> Any:
    """What ``configure_optimizers`` returns for an optimizer factory and an optional scheduler factory."""
    opt = optimizer_fn(parameters)
    if scheduler_fn is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler_fn(opt), "interval": interval}}


def _zo_module_validation(estimator: str, mu: float, q: int, difference: str, distribution: str,
                          scheduler_interval: str, gradient_clip_val: float | None, nonfinite: str,
                          max_queries: int | None) -> None:
    check_choice("estimator", estimator, ("cge", "rge"))
    check_positive_float("mu", mu)
    check_positive_int("q", q)
    check_choice("difference", difference, ("forward", "central"))
    check_choice("distribution", distribution, ("gaussian", "sphere"))
    check_choice("scheduler_interval", scheduler_interval, ("step", "epoch"))
    check_positive_float("gradient_clip_val", gradient_clip_val, allow_none=True)
    check_choice("nonfinite", nonfinite, ("raise", "skip"))
    check_positive_int("max_queries", max_queries, allow_none=True)
