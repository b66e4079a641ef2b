"""Black-box defense: denoised smoothing with a denoiser trained through a query-only classifier.

A model owner exposes a classifier ``f`` only through queries. The defender prepends a denoiser ``D`` and
certifies the smoothed classifier ``g(x) = argmax_c P(f(D(x + delta)) = c)`` (Cohen et al. 2019; Salman et al.
2020). ``ZODenoisedSmoothing`` trains ``D``'s own parameters by (sparse) CGE through ``f``; ``FODenoisedSmoothing``
is the white-box reference that backpropagates through ``f``; ``NoDenoiser`` certifies ``f`` alone.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from dz_lightning.tasks.blackbox import BlackBoxClassifier, load_state_dict
from dz_lightning.tasks.smoothing import ABSTAIN, NonFiniteOutputError, certify, check_smoothing
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from dz_lightning import ZOModule
from dz_lightning.figures import log_figure, new_figure, save_figure
from dz_lightning.module import build_optimizers
from dz_lightning.oracle_base import Oracle
from dz_lightning.validation import check_choice, check_positive_int

__all__ = ["BlackBoxClassifier", "FODenoisedSmoothing", "NoDenoiser", "ZODenoisedSmoothing", "load_state_dict"]


class _CertifiedTest:
    """``test_step`` certifies every test image; the epoch end reports certified accuracy per radius."""

    denoiser: nn.Module
    classifier: Any

    def _setup_certification(self, sigma: float, n0: int, n: int, alpha: float, radii: Sequence[float],
                             num_classes: int, certify_batch: int, max_certified: int | None,
                             output_dir: str | None, seed: int, nonfinite: str = "raise") -> None:
        check_smoothing(sigma, alpha, n0, n)
        if any(r < 0 for r in radii):
            raise ValueError(f"Expected non-negative `radii`, but got {list(radii)}.")
        check_positive_int("num_classes", num_classes, minimum=2)
        check_positive_int("certify_batch", certify_batch)
        check_positive_int("max_certified", max_certified, allow_none=True)
        check_choice("certify_nonfinite", nonfinite, ("raise", "abstain"))
        self.certify_nonfinite, self.nonfinite_abstains = nonfinite, 0
        self.sigma, self.n0, self.n, self.alpha = sigma, n0, n, alpha
        self.radii, self.num_classes, self.certify_batch = list(radii), num_classes, certify_batch
        self.max_certified, self.output_dir, self.certify_seed = max_certified, output_dir, seed
        self._rows: list[dict[str, Any]] = []
        self.certified: dict[float, float] = {}

    def smoothed_base(self, images: Tensor) -> Tensor:
        """``f(D(images))`` logits, the base classifier that randomized smoothing certifies."""
        with torch.no_grad():
            return self.classifier(self.denoiser(images))

    def on_test_epoch_start(self) -> None:
        self._rows = []
        self.nonfinite_abstains = 0
        self._cert_gen = torch.Generator().manual_seed(self.certify_seed)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        _check_labels(y, self.num_classes)
        for xi, yi in zip(x, y.tolist(), strict=True):
            if self.max_certified is not None and len(self._rows) >= self.max_certified:
                return
            start = time.perf_counter()
            try:
                pred, radius = certify(self.smoothed_base, xi, self.sigma, self.n0, self.n, self.alpha,
                                       self.num_classes, self.certify_batch, self._cert_gen)
            except NonFiniteOutputError:
                if self.certify_nonfinite == "raise":
                    raise
                self.nonfinite_abstains += 1  # an abstention, counted and reported apart
                pred, radius = ABSTAIN, 0.0
            self._rows.append({"label": yi, "prediction": pred, "radius": radius, "correct": int(pred == yi),
                               "time": time.perf_counter() - start})

    def on_test_epoch_end(self) -> None:
        rows = self._rows
        if not rows:
            raise ValueError("No test image was certified (an empty test set?), so there is no certified accuracy to "
                             "report; give the test set at least one image.")
        if self.nonfinite_abstains:
            rank_zero_warn(f"Abstained on {self.nonfinite_abstains} of {len(rows)} test image(s) because the "
                           "classifier returned non-finite outputs (certify_nonfinite='abstain').")
        self.log("test/nonfinite_abstains", float(self.nonfinite_abstains))  # type: ignore[attr-defined]
        self.certified = {r: sum(1 for row in rows if row["correct"] and row["radius"] >= r) / max(len(rows), 1)
                          for r in self.radii}
        for r, acc in self.certified.items():
            self.log(f"test/certified_acc@{r:g}", acc)  # type: ignore[attr-defined]
        self.log("test/abstain_rate", sum(row["prediction"] == ABSTAIN for row in rows) / max(len(rows), 1))  # type: ignore[attr-defined]
        self._write_outputs(rows)

    def _write_outputs(self, rows: list[dict[str, Any]]) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        if not trainer.is_global_zero:
            return
        out = Path(self.output_dir or trainer.default_root_dir) / "certification"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "certify.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["label", "prediction", "radius", "correct", "time"])
            writer.writeheader()
            writer.writerows(rows)
        fig = certified_accuracy_figure(self.certified, f"{type(self).__name__}, sigma {self.sigma:g}, "
                                        f"{len(rows)} images, n = {self.n:,}")
        save_figure(fig, out / "certified_accuracy.png")
        log_figure(trainer.loggers, "test/certified_accuracy", fig, trainer.global_step)


def certified_accuracy_figure(curves: dict[float, float] | dict[str, dict[float, float]], title: str = "") -> Any:
    """Certified accuracy (%) against the l2 radius: one curve, or several labelled ones (``{label: curve}``).

    Args:
        curves: radius -> fraction certified correct at that radius, or label -> such a dict.
        title: figure title.
    """
    first = next(iter(curves.values()), None)
    named = curves if isinstance(first, dict) else {"": curves}
    fig = new_figure(5.0, 3.4)
    ax = fig.add_subplot()
    for label, curve in named.items():
        ax.plot(list(curve), [100 * v for v in curve.values()], marker="o" if len(curve) <= 12 else None,
                label=label or None)
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    if len(named) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _check_labels(y: Tensor, num_classes: int) -> None:
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"Expected labels in 0..{num_classes - 1} (num_classes={num_classes}), but the batch holds "
                         f"{y[bad][:5].tolist()}.")


def _noisy_targets(classifier: Any, x: Tensor, y: Tensor, target: str, num_classes: int) -> Tensor:
    if target == "prediction":
        return classifier(x).argmax(1)
    _check_labels(y, num_classes)
    return y


class ZODenoisedSmoothing(_CertifiedTest, ZOModule):
    """Denoised smoothing with the denoiser trained by ZO through a black-box classifier.

    Loss: ``CE(f(D(x + delta)), t)`` with ``t = f(x).argmax`` (``target="prediction"``) or the labels, where ``f`` is
    reachable only through :class:`BlackBoxClassifier`. The gradient with respect to ``D``'s parameters comes from
    (sparse, with a ZOGraSP callback) CGE: the denoiser never receives a gradient from ``f``.

    Args:
        denoiser: the denoiser ``D`` (trained).
        classifier: the black box ``f``.
        sigma: smoothing noise (training and certification).
        target: ``"prediction"`` or ``"label"``.
        n0, n, alpha: CERTIFY's selection samples, estimation samples and failure probability.
        radii: radii at which certified accuracy is reported.
        num_classes: classes of ``f``.
        certify_batch: noisy copies per black-box call during certification.
        max_certified: certify at most this many test images (``None``: all).
        output_dir: where ``certification/certify.csv`` and the plot go (default: the trainer's root dir).
        certify_seed: seed of the certification noise.
        certify_nonfinite: when the classifier returns non-finite logits for an image's noisy copies, ``"raise"``
            an error or ``"abstain"`` on that image (counted in ``test/nonfinite_abstains``); never certified.
        **kwargs: estimator/optimizer options of :class:`~dz_lightning.ZOModule`.
    """

    _hparams_ignore = ("denoiser", "classifier")
    _legacy_model_aliases = ("denoiser",)  # checkpoints of earlier 0.1 development also held the network as `denoiser`

    def __init__(self, denoiser: nn.Module, classifier: BlackBoxClassifier, sigma: float = 0.25,
                 target: Literal["prediction", "label"] = "prediction", n0: int = 100, n: int = 10_000,
                 alpha: float = 0.001, radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75), num_classes: int = 10,
                 certify_batch: int = 1000, max_certified: int | None = None, output_dir: str | None = None,
                 certify_seed: int = 0, certify_nonfinite: Literal["raise", "abstain"] = "raise",
                 **kwargs: Any) -> None:
        super().__init__(denoiser, **kwargs)
        if not isinstance(classifier, BlackBoxClassifier):
            raise TypeError(f"Expected `classifier` to be a BlackBoxClassifier, but got {type(classifier).__name__}.")
        if target not in ("prediction", "label"):
            raise ValueError(f"Expected argument `target` to be 'prediction' or 'label', but got {target!r}.")
        self.classifier, self.target = classifier, target
        self._setup_certification(sigma, n0, n, alpha, radii, num_classes, certify_batch, max_certified,
                                  output_dir, certify_seed, certify_nonfinite)
        self._noise = torch.Generator().manual_seed(self.seed + 1)

    @property
    def denoiser(self) -> nn.Module:
        """The denoiser ``D`` (``self.model``)."""
        return self.model

    @property
    def residual_body(self) -> bool:
        """Whether ``D(x) = x - body(x)`` with a staged body: queries then perturb the body with feature reuse."""
        return isinstance(getattr(self.model, "body", None), nn.Sequential) and getattr(self.model, "residual", False)

    def trained_network(self) -> nn.Module:
        """The network whose parameters ZO perturbs: the residual body, or the whole denoiser."""
        return self.model.body if self.residual_body else self.model

    def zo_parameters(self) -> dict[str, Tensor]:
        """The trainable parameters of :meth:`trained_network`, named relative to it (as the oracle names them)."""
        return {n: p for n, p in self.trained_network().named_parameters() if p.requires_grad}

    def on_fit_start(self) -> None:
        self.classifier.to(self.device)

    def on_test_start(self) -> None:
        self.classifier.to(self.device)

    def make_oracle(self, batch: Any) -> Oracle:
        """``CE(f(D(x + delta)), t)`` over :meth:`trained_network`, with the black box ``f`` as the oracle's head.

        The head runs outside ``vmap`` on every ``K * B`` denoised image of a chunk at once (or one image batch per
        point on the feature-reuse path): each image is counted, and a non-torch classifier works.
        """
        x, y = batch
        noisy = x + self.sigma * torch.randn(x.shape, generator=self._noise).to(x)
        targets = _noisy_targets(self.classifier, x, y, self.target, self.num_classes)
        if self.residual_body:
            def head(noise: Tensor, inputs: Tensor) -> Tensor:
                return self.classifier(inputs - noise)

            return self.module_oracle(F.cross_entropy, noisy, targets, head=head, model=self.model.body)
        return self.module_oracle(F.cross_entropy, noisy, targets, head=lambda images, inputs: self.classifier(images),
                                  feature_reuse=False, max_batch=self.max_batch or max(1, 8192 // noisy.shape[0]))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("blackbox/queries", float(self.classifier.queries), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        noisy = x + self.sigma * torch.randn_like(x)
        self.log("val/noisy_acc", (self.smoothed_base(noisy).argmax(1) == y).float().mean(), prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dz_lightning"]["noise_state"] = self._noise.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "noise_state" in checkpoint.get("dz_lightning", {}):
            self._noise.set_state(checkpoint["dz_lightning"]["noise_state"])


class FODenoisedSmoothing(_CertifiedTest, L.LightningModule):
    """The white-box reference (FO-DS): the denoiser trained by backprop THROUGH ``f``. FO only.

    Args:
        denoiser: the denoiser ``D``.
        classifier_model: ``f`` as a white-box network (weights from ``classifier_checkpoint``), frozen.
        classifier_checkpoint: Lightning checkpoint with ``f``'s weights under ``model.``.
        sigma, target, n0, n, alpha, radii, num_classes, certify_batch, max_certified, output_dir, certify_seed,
        certify_nonfinite: as in :class:`ZODenoisedSmoothing`.
        optimizer: optimizer factory for the denoiser.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(self, denoiser: nn.Module, classifier_model: nn.Module, classifier_checkpoint: str | None = None,
                 sigma: float = 0.25, target: Literal["prediction", "label"] = "prediction", n0: int = 100,
                 n: int = 10_000, alpha: float = 0.001, radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
                 num_classes: int = 10, certify_batch: int = 1000, max_certified: int | None = None,
                 output_dir: str | None = None, certify_seed: int = 0,
                 certify_nonfinite: Literal["raise", "abstain"] = "raise",
                 optimizer: OptimizerCallable = torch.optim.Adam, lr_scheduler: LRSchedulerCallable | None = None
                 ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["denoiser", "classifier_model", "optimizer", "lr_scheduler"])
        if classifier_checkpoint is not None:
            state = load_state_dict(classifier_checkpoint, "classifier_checkpoint")
            classifier_model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        self.denoiser = denoiser
        self.white_box = classifier_model.eval().requires_grad_(False)
        self.classifier = self.white_box
        self.target, self.optimizer_fn, self.scheduler_fn = target, optimizer, lr_scheduler
        self._setup_certification(sigma, n0, n, alpha, radii, num_classes, certify_batch, max_certified,
                                  output_dir, certify_seed, certify_nonfinite)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.white_box.eval()
        with torch.no_grad():
            t = _noisy_targets(self.white_box, x, y, self.target, self.num_classes)
        loss = F.cross_entropy(self.white_box(self.denoiser(x + self.sigma * torch.randn_like(x))), t)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        noisy = x + self.sigma * torch.randn_like(x)
        self.log("val/noisy_acc", (self.smoothed_base(noisy).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        return build_optimizers(self.denoiser.parameters(), self.optimizer_fn, self.scheduler_fn, interval="epoch")


class NoDenoiser(_CertifiedTest, L.LightningModule):
    """The "no denoiser" baseline: certify ``f`` alone (``dz test`` only; nothing to train).

    Args:
        classifier: the black box ``f``.
        sigma, n0, n, alpha, radii, num_classes, certify_batch, max_certified, output_dir, certify_seed,
        certify_nonfinite: as in :class:`ZODenoisedSmoothing`.
    """

    def __init__(self, classifier: BlackBoxClassifier, sigma: float = 0.25, n0: int = 100, n: int = 10_000,
                 alpha: float = 0.001, radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75), num_classes: int = 10,
                 certify_batch: int = 1000, max_certified: int | None = None, output_dir: str | None = None,
                 certify_seed: int = 0, certify_nonfinite: Literal["raise", "abstain"] = "raise") -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["classifier"])
        self.classifier, self.denoiser = classifier, nn.Identity()
        self._setup_certification(sigma, n0, n, alpha, radii, num_classes, certify_batch, max_certified,
                                  output_dir, certify_seed, certify_nonfinite)

    def on_test_start(self) -> None:
        self.classifier.to(self.device)
