"""GradientFidelity: how close the ZO estimate is to the true gradient (an FO-only diagnostic)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from typing_extensions import override

from dz_lightning.oracle import white_box_oracle
from dz_lightning.query import frozen_batchnorm_stats
from dz_lightning.trainable import ZOTrainable
from dz_lightning.validation import check_positive_int

__all__ = ["GradientFidelity"]


class GradientFidelity(L.Callback):
    """Every ``every_n_steps`` steps, compare the ZO estimate with the autograd gradient on the same batch.

    FO ONLY: it backpropagates through the module's :class:`~dz_lightning.ModuleOracle`, so it needs a white-box
    objective and is off unless added to the Trainer's callbacks. It runs inside the optimizer step, before the
    parameters move, and touches neither ``.grad`` nor BatchNorm statistics. Logged: ``fidelity/cosine`` (over all
    estimated parameters), ``fidelity/cosine_masked`` (over the estimated coordinates only) and
    ``fidelity/norm_ratio`` (``|g_zo| / |g_fo|``).

    Args:
        every_n_steps: probe period in optimizer steps (>= 1).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        check_positive_int("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self._batch: Any = None
        self.last: dict[str, float] = {}

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch = batch

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if trainer.global_step % self.every_n_steps != 0 or self._batch is None:
            return
        if not isinstance(pl_module, ZOTrainable):
            raise TypeError(f"GradientFidelity needs a module that follows dz_lightning.trainable.ZOTrainable "
                            f"(`zo_parameters()`, `zo_masks`, `make_oracle(batch)`); {type(pl_module).__name__} "
                            "does not.")
        oracle = white_box_oracle(pl_module.make_oracle(self._batch), "GradientFidelity",
                                  "remove the probe for black-box objectives.")
        params = pl_module.zo_parameters()
        names = [n for n, p in params.items() if p.grad is not None]
        with torch.enable_grad(), frozen_batchnorm_stats(oracle.model):
            loss = oracle.loss_fn(oracle.model(oracle.inputs), oracle.targets)
            fo = torch.autograd.grad(loss, [params[n] for n in names])
        zo = torch.cat([params[n].grad.reshape(-1) for n in names])
        fo_flat = torch.cat([g.reshape(-1) for g in fo])
        masks = pl_module.zo_masks or {}
        keep = torch.cat([masks[n].reshape(-1) if n in masks else torch.ones_like(params[n], dtype=torch.bool)
                          .reshape(-1) for n in names])
        self.last = {
            "fidelity/cosine": float(F.cosine_similarity(zo, fo_flat, dim=0)),
            "fidelity/cosine_masked": float(F.cosine_similarity(zo[keep], fo_flat[keep], dim=0)),
            "fidelity/norm_ratio": float(zo.norm() / fo_flat.norm().clamp_min(1e-30)),
        }
        pl_module.log_dict(self.last, on_step=True, on_epoch=False)
