"""What :class:`~dz_lightning.ZOModule` logs: per-step scalars, a smoothed throughput, hyperparameters with metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.tensorboard.summary import hparams

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
        """Hyperparameters for TensorBoard's HPARAMS tab, where the run's final metrics sit beside them.

        The configs set ``default_hp_metric: false``, so nothing reaches the tab at fit start; here (at the end of
        ``fit`` and of ``test``, once per log folder each) the module's and data module's hyperparameters (and those
        callbacks added, e.g. ZO-GraSP's sparsity), the optimizer, its learning rate and the model class are written
        as the run's session, also to ``hparams.yaml``. No metric values and no experiment summary are written with
        them: TensorBoard then takes the metric columns from the scalars of the run's folder and shows their last
        values (``val/acc``, ``train/loss_epoch``, ``train/queries_total``, and ``test/*`` once ``dz test`` has logged
        into the same folder), so no metric is logged a second time at the last step.
        """
        extra: dict[str, Any] = {"model_class": type(module.model).__name__, **_optimizer_hparams(module)}
        for logger in module.loggers:
            folder = str(getattr(logger, "log_dir", None) or id(logger))
            if not isinstance(logger, TensorBoardLogger) or (folder, module.trainer.state.fn) in self.hparams_logged:
                continue
            params = {**dict(logger.hparams), **extra}
            logger.log_hyperparams(params)  # hparams.yaml (without metrics nothing reaches the event file)
            if module.trainer.state.fn == "fit" and _last_step_unlogged(module):
                # the query total's column shows the last logged value: make it the final one, at the last step
                logger.log_metrics({"train/queries_total": float(module.queries_total)}, step=module.global_step - 1)
            _write_session(logger, params)
            self.hparams_logged.add((folder, module.trainer.state.fn))


@rank_zero_only
def _write_session(logger: TensorBoardLogger, params: Mapping[str, Any]) -> None:
    """The HPARAMS tab's session (hyperparameters, no metric values) in the logger's event file."""
    writer = logger.experiment.file_writer  # None only once the logger was finalized (closed)
    if writer is not None:
        _, session_start, session_end = hparams(_flat_hparams(params), {})
        writer.add_summary(session_start)
        writer.add_summary(session_end)
        writer.flush()


def _last_step_unlogged(module: L.LightningModule) -> bool:
    """Whether Lightning left the last training step's scalars unwritten (it writes every ``log_every_n_steps``)."""
    trainer = module.trainer
    return module.global_step > 0 and not trainer.should_stop and \
        module.global_step % max(trainer.log_every_n_steps, 1) != 0


def _optimizer_hparams(module: L.LightningModule) -> dict[str, Any]:
    """``optimizer`` (class name) and ``lr`` (initial) of the module, also outside ``fit``.

    In ``fit`` they come from the running optimizer; in ``test``/``validate``/``predict``, where Lightning builds none,
    from the module's optimizer factory (``optimizer_fn``) applied to a throwaway parameter.
    """
    opt = module.optimizers() if module.trainer.state.fn == "fit" else None
    opt = opt[0] if isinstance(opt, list) else opt
    if opt is None and callable(getattr(module, "optimizer_fn", None)):
        opt = module.optimizer_fn([torch.nn.Parameter(torch.zeros(1))])
    if opt is None:
        return {}
    group = opt.param_groups[0]
    return {"optimizer": type(opt.optimizer if hasattr(opt, "optimizer") else opt).__name__,
            "lr": float(group.get("initial_lr", group["lr"]))}


def _flat_hparams(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested hyperparameters as ``{"a/b": value}`` with values TensorBoard can show (numbers, strings, booleans)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat_hparams(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif torch.is_tensor(value) and value.numel() == 1:
            flat[name] = value.item()
        else:
            flat[name] = str(value)
    return flat


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
