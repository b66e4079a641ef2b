"""ZO-GraSP: layer-wise pruning ratios at fit start, random gradient masks redrawn every N epochs (or steps).

Works with any :class:`~dz_lightning.ZOModule`, and with any LightningModule that follows the protocol
:class:`~dz_lightning.trainable.ZOTrainable`:

* ``zo_parameters() -> dict[str, Tensor]``: the parameters its estimator perturbs;
* a ``zo_masks`` attribute that its estimator reads (``None`` = dense);
* ``make_oracle(batch) -> dz_lightning.Oracle`` (used by ``method="zo_grasp"``; ``"grasp"`` needs the oracle
  to be a :class:`~dz_lightning.ModuleOracle`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from dz_lightning import sparsity as sp
from dz_lightning.checkpointing import atomic_write
from dz_lightning.figures import log_figure, lpr_figure
from dz_lightning.oracle import white_box_oracle
from dz_lightning.trainable import ZOTrainable
from dz_lightning.validation import check_choice, check_positive_float, check_positive_int

__all__ = ["ZOGraSP"]

Method = Literal["zo_grasp", "grasp", "random", "uniform"]


class ZOGraSP(L.Callback):
    """Compute layer-wise pruning ratios (LPRs) once, then draw sparse gradient masks at those ratios.

    At the start of training the callback scores the freshly initialized model (or loads LPRs from
    ``ratios_path``), draws a random mask per conv/linear weight at its LPR, and sets ``pl_module.zo_masks``; CGE
    then estimates only the masked-in coordinates while the dense model trains. Masks are redrawn every
    ``resample_every_n_epochs`` epochs (or every ``resample_every_n_steps`` optimizer steps) from the callback's own
    seeded generator, so every DDP rank draws the same masks, and LPRs, masks and generator state are saved in
    checkpoints (a resumed run continues with the same masks and the same future draws).

    Args:
        sparsity: fraction of the conv/linear weights NOT estimated per step, in [0, 1).
        method: ``"zo_grasp"`` (scores from loss queries: DeepZero's RGE with directions normalized per tensor,
            :func:`~dz_lightning.sparsity.zo_grasp_scores`), ``"grasp"`` (FO reference, autograd, logits at
            temperature 200 as in DeepZero's code), ``"random"`` (global prune of random scores) or ``"uniform"``
            (every layer at ``sparsity``). GraSP-type scores are ``-theta * Hg``: a layer initialized at zero (e.g.
            a corrector's output layer) scores 0 and is never estimated; keep such a layer in ``dense``.
        resample_every_n_epochs: redraw the masks every this many epochs (>= 1).
        resample_every_n_steps: redraw the masks every this many optimizer steps instead (>= 1; takes precedence
            over ``resample_every_n_epochs``). With few steps per epoch and many epochs, a redraw every step spreads
            the estimated coordinates evenly over the run instead of training one 1 - sparsity block per epoch.
        q: RGE directions for ZO-GraSP.
        mu: RGE smoothing radius for ZO-GraSP.
        samples_per_class: class-balanced examples used for scoring.
        num_classes: classes to collect (stops reading the loader early); ``None`` reads until exhausted.
        seed: seed of the callback's generator (scores and masks).
        ratios_path: load LPRs from this JSON file instead of computing them.
        save_ratios_path: write the computed LPRs to this JSON file (rank zero); ``None`` writes ``lpr.json`` in the
            run's log folder (``trainer.log_dir``, beside its checkpoints and curves) when the trainer has a logger.
        dense: further parameter names to keep dense (biases and BatchNorm are always dense).
    """

    def __init__(
        self,
        sparsity: float = 0.9,
        method: Method = "zo_grasp",
        resample_every_n_epochs: int = 5,
        resample_every_n_steps: int | None = None,
        q: int = 192,
        mu: float = 5e-3,
        samples_per_class: int = 25,
        num_classes: int | None = None,
        seed: int = 0,
        ratios_path: str | None = None,
        save_ratios_path: str | None = None,
        dense: list[str] | None = None,
    ) -> None:
        sp.check_sparsity(sparsity)
        check_choice("method", method, ("zo_grasp", "grasp", "random", "uniform"))
        check_positive_int("resample_every_n_epochs", resample_every_n_epochs)
        check_positive_int("resample_every_n_steps", resample_every_n_steps, minimum=1, allow_none=True)
        check_positive_int("q", q)
        check_positive_float("mu", mu)
        check_positive_int("samples_per_class", samples_per_class)
        check_positive_int("num_classes", num_classes, minimum=1, allow_none=True)
        if ratios_path is not None and not Path(ratios_path).is_file():
            raise ValueError(f"Expected argument `ratios_path` to be an existing JSON file, but got {ratios_path!r}.")
        self.sparsity = float(sparsity)
        self.method = method
        self.resample_every_n_epochs = resample_every_n_epochs
        self.resample_every_n_steps = resample_every_n_steps
        self.q, self.mu = q, mu
        self.samples_per_class = samples_per_class
        self.num_classes = num_classes
        self.seed = seed
        self.ratios_path = ratios_path
        self.save_ratios_path = save_ratios_path
        if dense is not None and (isinstance(dense, str) or not all(isinstance(n, str) for n in dense)):
            raise TypeError(f"Expected argument `dense` to be a list of parameter names, but got {dense!r}.")
        self.dense = list(dense or [])
        self._generator = torch.Generator().manual_seed(seed)
        self.ratios: dict[str, float] | None = None
        self.masks: dict[str, torch.Tensor] | None = None
        self._names: list[str] | None = None
        self._drawn_epoch = -1
        self._drawn_step = -1
        self.queries = 0

    @property
    def prunable_names(self) -> list[str] | None:
        """Names (as in ``zo_parameters()``) of the conv/linear weights the callback masks; ``None`` before setup.

        Biases, normalization layers and the names in ``dense`` are not among them: they are always estimated.
        """
        return None if self._names is None else list(self._names)

    @property
    def drawn_epoch(self) -> int:
        """The epoch at which the current masks were drawn (-1 before the first draw); saved in checkpoints."""
        return self._drawn_epoch

    @property
    def drawn_step(self) -> int:
        """The optimizer step at which the current masks were drawn (-1 before the first draw); saved in checkpoints."""
        return self._drawn_step

    # ------------------------------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "ratios": self.ratios,
            "masks": {n: m.cpu() for n, m in self.masks.items()} if self.masks is not None else None,
            "generator_state": self._generator.get_state(),
            "drawn_epoch": self._drawn_epoch,
            "drawn_step": self._drawn_step,
            "sparsity": self.sparsity,
            "method": self.method,
            "ratios_path": self.ratios_path,
            "queries": self.queries,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if abs(state_dict["sparsity"] - self.sparsity) > 1e-12:
            raise ValueError(f"The checkpoint's ZOGraSP ran at sparsity {state_dict['sparsity']}, but this callback "
                             f"has sparsity {self.sparsity}; resume with the same sparsity or start a new run.")
        method = state_dict.get("method")  # absent in checkpoints of earlier versions
        if (method is not None and method != self.method and state_dict.get("ratios_path") is None
                and self.ratios_path is None):
            raise ValueError(f"The checkpoint's ZOGraSP computed its layer-wise ratios with method {method!r}, but "
                             f"this callback has method {self.method!r}; a resumed run keeps the checkpoint's ratios "
                             f"{_rounded(state_dict['ratios'])}, so resume with method {method!r} or start a new run.")
        if self.ratios_path is not None and state_dict["ratios"] is not None:
            self._check_ratios_file(self.ratios_path, state_dict["ratios"])
        self.ratios = state_dict["ratios"]
        self.masks = state_dict["masks"]
        self._generator.set_state(state_dict["generator_state"])
        self._drawn_epoch = state_dict["drawn_epoch"]
        self._drawn_step = state_dict.get("drawn_step", -1)
        self.queries = state_dict.get("queries", 0)

    def _check_ratios_file(self, path: str, saved: dict[str, float]) -> None:
        """Refuse a ``ratios_path`` whose ratios are not the ones the checkpoint trained with (which would be used)."""
        try:
            ratios = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"The LPR file {path!r} cannot be read ({err}).") from None
        same = (isinstance(ratios, dict) and set(ratios) == set(saved)
                and all(isinstance(r, (int, float)) and abs(float(r) - saved[n]) <= 1e-9 for n, r in ratios.items()))
        if not same:
            raise ValueError(f"The LPR file {path!r} holds other ratios ({_rounded(ratios)}) than the checkpoint's "
                             f"ZOGraSP trained with ({_rounded(saved)}); a resumed run keeps the checkpoint's. Resume "
                             "without `ratios_path` (or with the file the run started from), or start a new run with "
                             "the new file.")

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, ZOTrainable):
            missing = [a for a in ("zo_parameters", "zo_masks", "make_oracle") if not hasattr(pl_module, a)]
            raise TypeError(f"ZOGraSP needs a module that follows dz_lightning.trainable.ZOTrainable "
                            f"(`zo_parameters()`, a `zo_masks` attribute, `make_oracle(batch)`), but "
                            f"{type(pl_module).__name__} lacks {missing}.")
        params = pl_module.zo_parameters()
        unknown = sorted(set(self.dense) - set(params))
        if unknown:
            owner = type(getattr(pl_module, "model", pl_module)).__name__
            raise ValueError(f"Expected argument `dense` to name parameters of {owner}, but {unknown} "
                             f"{'is' if len(unknown) == 1 else 'are'} not among them; its `zo_parameters()`: "
                             f"{list(params)[:20]}.")
        # by identity: the network may sit under any attribute, and the names are those of `zo_parameters()`
        self._names = sp.prunable_among(pl_module, params, self.dense)
        if stage == "fit":  # beside the module's hyperparameters, so runs can be compared by sparsity and method
            for logger in trainer.loggers:
                logger.log_hyperparams({"zo_grasp": {"sparsity": self.sparsity, "method": self.method,
                                                     "resample_every_n_epochs": self.resample_every_n_epochs,
                                                     "resample_every_n_steps": self.resample_every_n_steps}})
        if self.ratios_path is not None and self.ratios is None:
            self.ratios = self._load_ratios(self.ratios_path, params)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = pl_module.zo_parameters()
        if self.ratios is None:
            start = time.perf_counter()
            ratios = self._compute_ratios(trainer, pl_module, params)
            ratios = trainer.strategy.broadcast(ratios, src=0)
            self.ratios = ratios
            rank_zero_info(f"ZOGraSP: {self.method} LPRs at sparsity {self.sparsity} in "
                           f"{time.perf_counter() - start:.1f} s ({self.queries} queries).")
            self._save_ratios(self._ratios_file(trainer))
        if self.masks is None:
            self._draw(pl_module, trainer)
        else:
            self.masks = {n: m.to(params[n].device) for n, m in self.masks.items()}
            pl_module.zo_masks = self.masks
        self._log(trainer, pl_module, chart=True)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (self.resample_every_n_steps is None and epoch % self.resample_every_n_epochs == 0
                and epoch != self._drawn_epoch):
            self._draw(pl_module, trainer)
            self._log(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if (self.resample_every_n_steps is not None and step % self.resample_every_n_steps == 0
                and step != self._drawn_step):
            self._draw(pl_module, trainer)
            if batch_idx == 0:  # scalars and the chart once per epoch, not every step
                self._log(trainer, pl_module)

    # -------------------------------------------------------------------------------------------- helpers
    def _draw(self, pl_module: L.LightningModule, trainer: L.Trainer) -> None:
        """Draw fresh masks, hand them to the module, and remember when (for the schedule and checkpoints)."""
        self.masks = sp.draw_masks(pl_module.zo_parameters(), self.ratios, self._generator)
        pl_module.zo_masks = self.masks
        self._drawn_epoch, self._drawn_step = trainer.current_epoch, trainer.global_step

    def _compute_ratios(self, trainer: L.Trainer, pl_module: L.LightningModule,
                        params: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.method == "uniform":
            return sp.uniform_ratios(self._names, self.sparsity)
        if self.method == "random":
            return sp.random_ratios(params, self._names, self.sparsity, self._generator)
        device = next(iter(params.values())).device
        x, y = sp.class_balanced_sample(trainer.train_dataloader, self.samples_per_class, self.num_classes)
        oracle = pl_module.make_oracle((x.to(device), y.to(device)))
        if self.method == "grasp":
            white = white_box_oracle(oracle, "method='grasp' (FO GraSP)",
                                     "use method='zo_grasp' for black-box objectives.")
            # the oracle's model may name its weights differently from `zo_parameters()`: translate by identity
            own = {id(p): n for n, p in white.model.named_parameters()}
            if any(id(params[n]) not in own for n in self._names):
                raise ValueError(f"method='grasp' differentiates the oracle's model, but the model of "
                                 f"{type(pl_module).__name__}.make_oracle(batch) does not hold its `zo_parameters()`.")
            inner = {own[id(params[n])]: n for n in self._names}
            scores = sp.grasp_scores(white.model, white.loss_fn, white.inputs, white.targets, list(inner))
            scores = {inner[n]: s for n, s in scores.items()}
        else:
            scores, self.queries = sp.zo_grasp_scores(oracle, params, self._names, self.q, self.mu, self._generator)
        return sp.layerwise_ratios(scores, self.sparsity)

    def _load_ratios(self, path: str, params: dict[str, torch.Tensor]) -> dict[str, float]:
        try:
            ratios = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"The LPR file {path!r} is not valid JSON ({err}); expected an object mapping every "
                             f"prunable layer {self._names} to its pruning ratio in [0, 1].") from None
        if not isinstance(ratios, dict) or set(ratios) != set(self._names):
            got = sorted(ratios) if isinstance(ratios, dict) else type(ratios).__name__
            raise ValueError(f"The LPR file {path!r} does not match the model: it names {got}, but the prunable "
                             f"layers are {self._names}.")
        bad = {n: r for n, r in ratios.items()
               if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1}  # NaN fails 0 <= r
        if bad:
            raise ValueError(f"The LPR file {path!r} holds pruning ratios outside [0, 1]: {bad}.")
        frozen = [n for n, r in ratios.items() if round((1 - r) * params[n].numel()) == 0]
        if len(frozen) == len(ratios):
            raise ValueError(f"The LPR file {path!r} prunes every coordinate of every prunable layer (ratios "
                             f"{ratios}): no weight would ever be estimated, so training would only move biases. "
                             f"Use ratios below 1 (the callback's sparsity is {self.sparsity}).")
        if frozen:
            rank_zero_warn(f"The LPR file {path!r} freezes {frozen}: their ratio keeps no coordinate, so these "
                           "weights are never estimated.")
        total = sum(params[n].numel() for n in ratios)
        pruned = sum(r * params[n].numel() for n, r in ratios.items()) / total
        if abs(pruned - self.sparsity) > 0.02:
            rank_zero_warn(f"The LPR file {path!r} prunes {pruned:.3f} of the prunable coordinates, but the "
                           f"callback's sparsity is {self.sparsity}; the file's ratios are used as they are.")
        return {n: float(r) for n, r in ratios.items()}

    def _ratios_file(self, trainer: L.Trainer) -> Path | None:
        """Where computed LPRs go: ``save_ratios_path``, else the run's log folder (all ranks ask: it broadcasts)."""
        if self.save_ratios_path is not None:
            return Path(self.save_ratios_path)
        folder = trainer.log_dir if trainer.loggers else None
        return None if folder is None else Path(folder) / "lpr.json"

    @rank_zero_only
    def _save_ratios(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.ratios, indent=2)  # whole or absent: other processes may read it
            atomic_write(path, lambda tmp: tmp.write_text(text))
            rank_zero_info(f"ZOGraSP: LPRs written to {path}")

    @rank_zero_only
    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, chart: bool = False) -> None:
        """Scalars (LPRs, realized density, scoring queries); with ``chart`` the LPR bar chart (once per fit)."""
        if trainer.logger is None or self.masks is None:
            return
        metrics = {f"zo_grasp/lpr/{n}": r for n, r in self.ratios.items()}
        metrics["zo_grasp/density"] = sp.realized_density(self.masks)
        metrics["zo_grasp/queries"] = float(self.queries)
        trainer.logger.log_metrics(metrics, step=trainer.global_step)
        if chart:
            fig = lpr_figure(self.ratios, f"{self.method} layer-wise pruning ratios, sparsity {self.sparsity:g} "
                                          f"(density {metrics['zo_grasp/density']:.3f})")
            log_figure(trainer.loggers, "zo_grasp/lpr", fig, trainer.global_step)


def _rounded(ratios: object) -> object:
    """Ratios for a message: three decimals (anything else as it is)."""
    if isinstance(ratios, dict):
        return {n: round(r, 3) if isinstance(r, float) else r for n, r in ratios.items()}
    return ratios
