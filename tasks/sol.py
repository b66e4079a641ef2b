"""Solver-in-the-loop (Um et al. 2020) with the PhiFlow solver as a black box (DeepZero's ZO-SOL).

A corrector network fixes the coarse solver's state after every step. ``ZOSOL`` trains it through ``m`` unrolled
solver steps using loss queries only (the solver runs under ``no_grad``, jit-compiled, with every perturbation of
a chunk simulated at once through a PhiFlow batch dimension). Baselines from the same data: ``SourceOnly`` (SRC, no
correction), ``NONCorrector`` (NON: backprop on precomputed one-step pairs, no solver in the loop), ``FOSOL``
(backprop through a differentiable solver) and ``FOSOLSparse`` (FO-SOL's exact gradient under ZO-SOL's sparse masks:
a control that separates the estimator from the sparsity). Every module's ``test`` reports the MAE against the
reference over all time steps of every test simulation and logs vorticity images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from dz_lightning.tasks.karman import KarmanSolver, check_cache_dir, load_or_generate
from dz_lightning.tasks.sol_figures import mae_over_time_figure, rollout_mae_curve, vorticity_figure
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dz_lightning import ZOModule
from dz_lightning import sparsity as sp
from dz_lightning.fallback import parameter_values, vmap_points
from dz_lightning.figures import log_figure, save_figure
from dz_lightning.module import build_optimizers
from dz_lightning.oracle_base import Oracle
from dz_lightning.sampling import ResumableDataLoader, SeededRandomSampler
from dz_lightning.validation import check_positive_int

__all__ = ["FOSOL", "FOSOLSparse", "KarmanDataModule", "NONCorrector", "SOLOracle", "SourceOnly", "ZOSOL"]

RE_SCALE = 500.0  # the Reynolds-number input channel is re / RE_SCALE


def corrector_input(u: Tensor, re: Tensor) -> Tensor:
    """``(N, 3, X, Y)``: velocity and a constant channel with the (scaled) Reynolds number."""
    return torch.cat([u, (re / RE_SCALE).view(-1, 1, 1, 1).expand(-1, 1, *u.shape[2:]).to(u)], 1)


class _Windows(Dataset):
    def __init__(self, traj: Tensor, re: Tensor, m: int) -> None:
        self.traj, self.re, self.m = traj, re, m
        self.per_sim = traj.shape[1] - m

    def __len__(self) -> int:
        return self.traj.shape[0] * self.per_sim

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        s, t = divmod(i, self.per_sim)
        return self.traj[s, t : t + self.m + 1], self.re[s]


class _Sequences(Dataset):
    def __init__(self, traj: Tensor, re: Tensor) -> None:
        self.traj, self.re = traj, re

    def __len__(self) -> int:
        return self.traj.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.traj[i], self.re[i]


class KarmanDataModule(L.LightningDataModule):
    """Windows of ``m + 1`` reference states from the training simulations; whole simulations for evaluation.

    Three disjoint sets of simulations, each with its own Reynolds numbers: training (windows), validation (whole
    sequences, for choosing learning rates and schedules) and test (whole sequences, reported once).

    Reference data are generated once (``factor`` x finer, down-sampled) and cached under ``cache_dir``.

    Args:
        cache_dir: cache folder.
        resolution: source grid ``(X, Y)``, ``Y = 2 X``.
        factor: reference grid = ``factor`` x source grid.
        train_re: Reynolds numbers of the training simulations.
        test_re: Reynolds numbers of the test simulations.
        val_re: Reynolds numbers of the held-out validation simulations (disjoint from ``test_re``); they are
            cached on their own and have ``steps`` recorded steps.
        warmup: reference steps discarded before recording. The default 250 skips the start-up transient: the
            shedding grows until about step 250 on the default grid, so the data show a developed vortex street.
        steps: recorded steps per simulation. 300 by default: correctors trained on 60-step sequences drifted
            over longer test rollouts, while the number of optimizer steps, not the data, sets the cost.
        test_steps: recorded steps per test simulation, when they should differ from ``steps`` (the paper evaluates
            500-step sequences; training windows need far fewer). The test simulations are then cached on their
            own. ``None``: ``steps``.
        window: unrolled steps ``m`` per training example. Longer windows show the corrector more of its own
            drift; 8 gave ZO-SOL and FO-SOL a lower test MAE over the recorded steps than 4 in
            ``benchmarks/sol_study.py``.
        batch_size: windows per batch.
        seed: shuffling seed.
    """

    def __init__(self, cache_dir: str = "data/karman", resolution: tuple[int, int] = (16, 32), factor: int = 4,
                 train_re: Sequence[float] = (100.0, 150.0, 250.0, 400.0), test_re: Sequence[float] = (125.0, 300.0),
                 val_re: Sequence[float] = (175.0, 350.0), warmup: int = 250, steps: int = 300,
                 test_steps: int | None = None, window: int = 8, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        if window < 1 or steps <= window:
            raise ValueError(f"Expected 1 <= window < steps, but got window={window}, steps={steps}.")
        if test_steps is not None and test_steps < 1:
            raise ValueError(f"Expected test_steps >= 1 or None, but got test_steps={test_steps}.")
        check_positive_int("batch_size", batch_size)
        if not train_re or not test_re or not val_re or min(*train_re, *test_re, *val_re) <= 0:
            raise ValueError(f"Expected non-empty positive Reynolds numbers, got train_re={train_re}, "
                             f"test_re={test_re}, val_re={val_re}.")
        if set(map(float, val_re)) & set(map(float, test_re)):
            raise ValueError(f"Expected validation Reynolds numbers disjoint from the test ones (the test set is "
                             f"reported once, never tuned on), but got val_re={val_re}, test_re={test_re}.")
        check_cache_dir(cache_dir)
        self.save_hyperparameters()
        self.cache_dir, self.resolution, self.factor = cache_dir, tuple(resolution), factor
        self.train_re, self.test_re, self.val_re = list(train_re), list(test_re), list(val_re)
        self.warmup, self.steps, self.window, self.batch_size, self.seed = warmup, steps, window, batch_size, seed
        self.test_steps = steps if test_steps is None else test_steps
        self.data: dict[str, Tensor] | None = None

    def _load(self) -> dict[str, Tensor]:
        data = load_or_generate(self.cache_dir, self.train_re, self.test_re, self.resolution, self.factor,
                                self.warmup, self.steps)
        if self.test_steps != self.steps:
            test = load_or_generate(self.cache_dir, [], self.test_re, self.resolution, self.factor, self.warmup,
                                    self.test_steps)
            data = {**data, "test": test["test"]}
        val = load_or_generate(self.cache_dir, [], self.val_re, self.resolution, self.factor, self.warmup, self.steps)
        return {**data, "val": val["test"], "val_re": val["test_re"]}

    def prepare_data(self) -> None:
        self._load()

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = self._load()

    def train_dataloader(self) -> DataLoader:
        ds = _Windows(self.data["train"], self.data["train_re"], self.window)
        return ResumableDataLoader(ds, batch_size=self.batch_size, sampler=SeededRandomSampler(len(ds), self.seed),
                          drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Sequences(self.data["val"], self.data["val_re"]), batch_size=len(self.val_re))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_Sequences(self.data["test"], self.data["test_re"]), batch_size=len(self.test_re))


class _SOLEvaluation:
    """Roll the (corrected) source solver out over whole test simulations; MAE and vorticity images."""

    corrector: nn.Module | None
    solver: KarmanSolver

    def correct(self, u: Tensor, re: Tensor) -> Tensor:
        return u if self.corrector is None else u + self.corrector(corrector_input(u, re))

    def rollout(self, u0: Tensor, re: Tensor, steps: int) -> Tensor:
        states, u = [], u0
        with torch.no_grad():
            for _ in range(steps):
                u = self.correct(self.solver(u, re), re)
                if not torch.isfinite(u).all():
                    raise FloatingPointError("The corrected simulation diverged (NaN/inf) during evaluation.")
                states.append(u)
        return torch.stack(states, 1)

    def rollout_mae(self, traj: Tensor, re: Tensor) -> tuple[Tensor, Tensor]:
        """Roll out from ``traj[:, 0]`` over every later step of ``traj``; the states and their MAE against it."""
        pred = self.rollout(traj[:, 0], re, traj.shape[1] - 1)
        return pred, (pred - traj[:, 1:]).abs().mean()

    def _evaluate(self, batch: Any, split: str) -> Tensor:
        traj, re = batch
        pred, mae = self.rollout_mae(traj, re)
        self.log(f"{split}/mae", mae, prog_bar=True)  # type: ignore[attr-defined]
        if split == "test":
            self._images(traj, pred, re)
        return mae

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def _images(self, traj: Tensor, pred: Tensor, re: Tensor) -> None:
        """Vorticity panels of the first test simulation at the last step, and the MAE over rollout time."""
        trainer = self.trainer  # type: ignore[attr-defined]
        if not trainer.is_global_zero:
            return
        steps, dt, name = traj.shape[1] - 1, self.solver.dt, type(self).__name__
        root = Path(trainer.default_root_dir)
        curves = {name: rollout_mae_curve(pred, traj)}
        source = pred
        if self.corrector is not None:
            source = SourceOnly.rollout_without_correction(self.solver, traj[:, 0], re, steps)
            curves["source (uncorrected)"] = rollout_mae_curve(source, traj)
        fig = vorticity_figure([traj[0, -1], source[0, -1], pred[0, -1]],
                               ["reference", "source (uncorrected)", name], re=float(re[0]), time=steps * dt)
        save_figure(fig, root / f"vorticity_{name}.png")
        log_figure(trainer.loggers, "test/vorticity", fig, trainer.global_step)
        reynolds = " and ".join(f"{r:g}" for r in re.tolist())
        plural = "s" if len(re) != 1 else ""
        fig = mae_over_time_figure(curves, dt, f"{steps}-step rollouts: mean over {len(re)} test simulation{plural} "
                                               f"(Reynolds number{plural} {reynolds})")
        save_figure(fig, root / f"mae_over_time_{name}.png")
        log_figure(trainer.loggers, "test/mae_over_time", fig, trainer.global_step)


class SOLOracle(Oracle):
    """MSE over ``m`` corrected solver steps as a function of the corrector's parameters; the solver is a black box.

    ``K`` parameter points of a chunk run together: the solver advances all ``K * B`` states in one call (one PhiFlow
    batch dimension), the corrector runs under ``vmap`` over the ``K`` parameter sets. The first solver step starts
    from the reference states, before any correction, so it is the same for every query: it runs once per oracle
    (that is, once per batch) and is reused, which saves ``1 / m`` of the solver time.
    """

    def __init__(self, corrector: nn.Module, solver: KarmanSolver, windows: Tensor, re: Tensor,
                 max_batch: int | None = None) -> None:
        super().__init__(max_batch=max_batch or 64)
        self.corrector, self.solver, self.windows, self.re = corrector, solver, windows, re
        self._first_step: Tensor | None = None

    def first_step(self) -> Tensor:
        """``(B, 2, X, Y)``: one uncorrected solver step from the windows' first states, computed once."""
        if self._first_step is None:
            self._first_step = self.solver(self.windows[:, 0], self.re)
        return self._first_step

    def _loss(self, params: Mapping[str, Tensor]) -> Tensor:
        points = {n: v.unsqueeze(0) for n, v in parameter_values(self.corrector, params).items()}
        return self._losses(params, points)[0]

    def _losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        k = next(iter(varied.values())).shape[0]
        b, m = self.windows.shape[0], self.windows.shape[1] - 1
        re = self.re.repeat(k)
        u = self.first_step().repeat(k, 1, 1, 1)
        loss = torch.zeros(k, device=u.device)
        diverged = torch.zeros(k * b, dtype=torch.bool, device=u.device)
        with torch.no_grad():
            for step in range(1, m + 1):
                if step > 1:
                    # a diverged simulation is not stepped again (its pressure solve would run to the iteration cap)
                    u = self.solver(torch.where(diverged.view(-1, 1, 1, 1), torch.zeros_like(u), u), re)
                x = corrector_input(u, re).reshape(k, b, 3, *u.shape[2:])
                u = u + vmap_points(self.corrector, params, varied, x, per_point_inputs=True).reshape(u.shape)
                diverged |= ~torch.isfinite(u).flatten(1).all(1)
                err = (u.reshape(k, b, *u.shape[1:]) - self.windows[:, step].unsqueeze(0)) ** 2
                loss += err.flatten(1).mean(1)
        # non-finite losses go to the estimator, which raises or skips them (never into the weights)
        return torch.where(diverged.view(k, b).any(1), torch.full_like(loss, float("nan")), loss / m)


class ZOSOL(_SOLEvaluation, ZOModule):
    """ZO-SOL: the corrector trained by (sparse) CGE through ``m`` steps of the black-box source solver.

    Args:
        corrector: the correction network ``(N, 3, X, Y) -> (N, 2, X, Y)``.
        resolution: source grid ``(X, Y)``.
        mu: finite-difference step. Smaller than :class:`~dz_lightning.ZOModule`'s 5e-3: the loss is a deterministic
            function of the weights, so a small step adds no noise, while a forward difference is biased by
            ``mu / 2`` times the loss's curvature. Near its optimum the last layer's bias has a gradient smaller
            than that bias at 5e-3, and a biased correction applied at every step drifts over a long rollout.
        **kwargs: estimator/optimizer options of :class:`~dz_lightning.ZOModule`.
    """

    _hparams_ignore = ("corrector",)
    _legacy_model_aliases = ("corrector",)  # checkpoints of earlier 0.1 development also held it as `corrector`

    def __init__(self, corrector: nn.Module, resolution: tuple[int, int] = (16, 32), mu: float = 1e-4,
                 **kwargs: Any) -> None:
        super().__init__(corrector, mu=mu, **kwargs)
        self.solver = KarmanSolver(tuple(resolution))

    @property
    def corrector(self) -> nn.Module:
        """The correction network (``self.model``)."""
        return self.model

    def make_oracle(self, batch: Any) -> Oracle:
        windows, re = batch
        return SOLOracle(self.corrector, self.solver, windows, re, self.max_batch)


class _BackpropSOL(_SOLEvaluation, L.LightningModule):
    """The backprop baselines: the corrector, an optimizer factory and a scheduler stepped every optimizer step.

    Args:
        corrector: the correction network ``(N, 3, X, Y) -> (N, 2, X, Y)``.
        resolution: source grid ``(X, Y)``.
        optimizer: optimizer factory for the corrector.
        lr_scheduler: optional scheduler factory, stepped every optimizer step.
    """

    #: whether training backpropagates through the solver (a differentiable PhiFlow solver for training)
    differentiable = False

    def __init__(self, corrector: nn.Module, resolution: tuple[int, int] = (16, 32),
                 optimizer: OptimizerCallable = torch.optim.Adam,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["corrector", "optimizer", "lr_scheduler"])
        self.corrector, self.optimizer_fn, self.lr_scheduler_fn = corrector, optimizer, lr_scheduler
        self.solver = KarmanSolver(tuple(resolution))
        self.train_solver = (KarmanSolver(tuple(resolution), differentiable=True) if self.differentiable
                             else self.solver)

    def configure_optimizers(self) -> Any:
        return build_optimizers(self.corrector.parameters(), self.optimizer_fn, self.lr_scheduler_fn, "step")


class NONCorrector(_BackpropSOL):
    """NON: the corrector trained by backprop on precomputed one-step pairs (no solver in the training loop).

    Pairs: ``s~ = P(ref_t)`` (one source step from a reference state) and the target correction ``ref_{t+1} - s~``.
    The optional ``lr_scheduler`` is stepped every optimizer step.
    """

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        windows, re = batch
        stepped = self.solver(windows[:, 0], re)  # computed on the fly; deterministic, so "precomputed"
        loss = F.mse_loss(self.corrector(corrector_input(stepped, re)), windows[:, 1] - stepped)
        self.log("train/loss", loss, prog_bar=True)
        return loss


class FOSOL(_BackpropSOL):
    """FO-SOL: backprop through ``m`` unrolled steps of the differentiable PhiFlow solver (FO reference).

    The optional ``lr_scheduler`` is stepped every optimizer step.
    """

    differentiable = True

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        windows, re = batch
        u, loss = windows[:, 0], 0.0
        for step in range(1, windows.shape[1]):
            u = self.train_solver(u, re)
            u = u + self.corrector(corrector_input(u, re))
            loss = loss + F.mse_loss(u, windows[:, step])
        loss = loss / (windows.shape[1] - 1)
        self.log("train/loss", loss, prog_bar=True)
        return loss


class FOSOLSparse(FOSOL):
    """FO-SOL sparse: FO-SOL's exact gradient, masked as sparse CGE masks ZO-SOL's estimate (a control).

    With a gradient-mask callback such as :class:`~dz_lightning.callbacks.zo_grasp.ZOGraSP` (the same sparsity, ratio
    method, resampling and seed as a ZO-SOL run, hence the same masks at every step), each optimizer step gets the
    exact gradient on the masked-in coordinates and zero elsewhere, which is what sparse CGE hands the optimizer;
    parameters without a mask (the biases) keep their dense gradient, as under CGE. Set against FO-SOL and ZO-SOL,
    it tells the effect of the sparsity apart from that of the finite-difference estimator. Without a mask callback
    it trains exactly as :class:`FOSOL`.
    """

    def __init__(self, corrector: nn.Module, resolution: tuple[int, int] = (16, 32),
                 optimizer: OptimizerCallable = torch.optim.Adam,
                 lr_scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__(corrector, resolution, optimizer, lr_scheduler)
        self.zo_masks: dict[str, Tensor] | None = None  # set by the mask callback (names of `zo_parameters()`)

    def zo_parameters(self) -> dict[str, Tensor]:
        """The corrector's trainable parameters, named as in :class:`ZOSOL` (relative to the corrector)."""
        return {n: p for n, p in self.corrector.named_parameters() if p.requires_grad}

    def make_oracle(self, batch: Any) -> Oracle:
        """The same loss oracle as :class:`ZOSOL`'s (ZO-GraSP scores the layers through it)."""
        windows, re = batch
        return SOLOracle(self.corrector, self.solver, windows, re)

    def on_after_backward(self) -> None:
        """Mask the gradient right after backward (before any clipping and the optimizer step)."""
        sp.mask_gradients(self.zo_parameters(), self.zo_masks)


class SourceOnly(_SOLEvaluation, L.LightningModule):
    """SRC: the uncorrected source solver (``dz test`` only).

    Args:
        resolution: source grid ``(X, Y)``.
    """

    def __init__(self, resolution: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.corrector = None
        self.solver = KarmanSolver(tuple(resolution))

    @staticmethod
    def rollout_without_correction(solver: KarmanSolver, u0: Tensor, re: Tensor, steps: int) -> Tensor:
        states, u = [], u0
        for _ in range(steps):
            u = solver(u, re)
            states.append(u)
        return torch.stack(states, 1)
