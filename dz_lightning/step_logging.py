"""What :class:`~dz_lightning.ZOModule` logs: per-step scalars, a smoothed throughput, hyperparameters with metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from dz_lightning.estimators import mask_coordinates

__all__ = ["StepLog", "Throughput"]


class StepLog:
    """The logging of a ZO module (one per module): what a step logs, and what goes to TensorBoard's HPARAMS tab.

    Logged per step: ``train/loss``, ``train/queries`` (this step, all ranks), ``train/queries_total``,
    ``train/queries_per_s``, ``train/grad_density`` (CGE: fraction of coordinates estimated), ``train/lr``;
    ``train/loss_vs_queries`` with the cumulative query count as its step; the progress bar shows ``queries/s``
    (smoothed by :class:`Throughput`) and ``queries`` (total).
    """

    def __init__(self) -> None:
        self.throughput = Throughput()
        self.hparams_logged: set[tuple[str, Any]] = set()  # (log folder, fit/test): fit and test each once

    def step(self, module: L.LightningModule, loss: float, queries: int, elapsed: float,
             params: Mapping[str, Tensor]) -> None:
        """One step's scalars: loss, queries (this step, total, per second), gradient density, learning rate."""
        total = sum(p.numel() for p in params.values())
        if module.estimator == "cge":
            masks = module.zo_masks or {}
            # the masks' coordinates are searched once per mask draw (estimators.mask_coordinates): no host read here
            estimated = sum(mask_coordinates(masks[n]).numel() if n in masks else p.numel()
                            for n, p in params.items())
            module.log("train/grad_density", estimated / max(total, 1), on_step=True, on_epoch=False)
        module.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        module.log("train/queries", float(queries), on_step=True, on_epoch=False)
        module.log("train/queries_total", float(module.queries_total), on_step=True, on_epoch=False)
        module.log("train/queries_per_s", queries / elapsed, on_step=True, on_epoch=False)
        # the progress bar: smoothed throughput and the running total (the loggers get the raw per-step values)
        module.log("queries/s", self.throughput.update(queries, elapsed), prog_bar=True, logger=False,
                   on_step=True, on_epoch=False)
        module.log("queries", float(module.queries_total), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        opt = module.optimizers()
        opt = opt[0] if isinstance(opt, list) else opt
        module.log("train/lr", float(opt.param_groups[0]["lr"]), on_step=True, on_epoch=False)
        if module.global_step % max(module.trainer.log_every_n_steps, 1) == 0:
            # loss against the unit a ZO user pays in: the cumulative query count is the x axis (the step); only
            # TensorBoard keeps one step axis per tag (CSV or W&B loggers would get a second step column)
            for logger in module.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.log_metrics({"train/loss_vs_queries": loss}, step=module.queries_total)

    def hparams_with_metrics(self, module: L.LightningModule) -> None:
        """Hyperparameters with the run's final metrics, for TensorBoard's HPARAMS tab (once per log folder).

        The configs set ``default_hp_metric: false``, so nothing reaches the tab at fit start; here the module's and
        data module's hyperparameters (and those callbacks added, e.g. ZO-GraSP's sparsity), the optimizer and the
        model class go out with the last logged epoch-level metrics (``val/acc``, ``train/loss_epoch``, ...,
        ``test/*`` after ``test``) and the query total.
        """
        metrics = {k: float(v) for k, v in module.trainer.logged_metrics.items()
                   if k != "epoch" and not k.endswith("_step") and (not torch.is_tensor(v) or v.numel() == 1)}
        metrics["train/queries_total"] = float(module.queries_total)
        opt = module.optimizers() if module.trainer.state.fn == "fit" else None
        opt = opt[0] if isinstance(opt, list) else opt
        extra = {"model_class": type(module.model).__name__}
        if opt is not None:
            group = opt.param_groups[0]
            extra.update(optimizer=type(opt.optimizer if hasattr(opt, "optimizer") else opt).__name__,
                         lr=float(group.get("initial_lr", group["lr"])))
        for logger in module.loggers:
            folder = str(getattr(logger, "log_dir", None) or id(logger))
            if not isinstance(logger, TensorBoardLogger) or (folder, module.trainer.state.fn) in self.hparams_logged:
                continue
            logger.log_hyperparams({**dict(logger.hparams), **extra}, metrics=metrics, step=module.global_step)
            self.hparams_logged.add((folder, module.trainer.state.fn))


class Throughput:
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
