"""Run a short ZO fit on digits with N CPU processes (Lightning DDP, Gloo) and save what the tests compare.

Used by test_distributed.py through a subprocess with a clean environment (DDP re-launches this script for
every rank). Writes ``<out>/rank<r>.pt`` with the final parameters, the first step's combined gradient, the
query counts and the measured cost table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from dz_lightning.callbacks.zo_grasp import ZOGraSP
from dz_lightning.tasks.classification import DigitsDataModule, ZOClassifier
from lightning.pytorch.callbacks import ModelCheckpoint

import dz_lightning as dz
from dz_lightning.models import simple_cnn
from dz_lightning.strategies import ZODDPStrategy


class Recorder(ZOClassifier):
    """Keeps the first combined gradient; optionally returns NaN losses on one rank from a given step, and clips
    the reduced estimate to a global 2-norm (a post-processing subclass)."""

    def __init__(self, nan_rank: int = -1, nan_step: int = 3, clip_norm: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_rank, self.nan_step, self.clip_norm = nan_rank, nan_step, clip_norm
        self.first_grads = None

    def process_estimate(self, estimate: dz.Estimate) -> dz.Estimate:
        if self.clip_norm is None:
            return estimate
        norm = torch.stack([g.double().square().sum() for g in estimate.grads.values()]).sum().sqrt()
        scale = (self.clip_norm / norm).clamp(max=1.0)
        grads = {n: (g.double() * scale).to(g.dtype) for n, g in estimate.grads.items()}
        return dz.Estimate(grads, estimate.queries, estimate.loss, skipped=estimate.skipped)

    def make_oracle(self, batch):
        if self.global_rank == self.nan_rank and self.global_step >= self.nan_step:
            return dz.FunctionOracle(lambda p: float("nan"))
        return super().make_oracle(batch)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.first_grads is None:
            self.first_grads = {n: g.clone() for n, g in self.last_estimate.grads.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--estimator", default="cge")
    parser.add_argument("--sparsity", type=float, default=0.0)
    parser.add_argument("--nan-rank", type=int, default=-1)
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--clip-norm", type=float, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    out = Path(args.out)
    model = torch.nn.Sequential(torch.nn.Upsample(size=(16, 16)), simple_cnn(depth=2, channels=4, in_channels=1))
    module = Recorder(nan_rank=args.nan_rank, clip_norm=args.clip_norm, model=model, estimator=args.estimator, q=8,
                      max_batch=args.max_batch,
                      optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    callbacks = [ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_train_steps=1)]
    if args.sparsity > 0:
        callbacks.append(ZOGraSP(sparsity=args.sparsity, method="random", resample_every_n_epochs=1))
    strategy = ZODDPStrategy(process_group_backend="gloo") if args.devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
                        use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    torch.save({"params": {n: p.detach().clone() for n, p in module.model.named_parameters()},
                "first_grads": module.first_grads, "queries_total": module.queries_total,
                "masks": module.zo_masks, "costs": module.zo_costs,
                "cost_updates": module.zo_cost_table.updates if module.zo_cost_table else 0},
               out / f"rank{trainer.global_rank}.pt")
    # rank 0 is the launching process: without this it may exit before rank 1 has written its file
    trainer.strategy.barrier("saved")


if __name__ == "__main__":
    main()
