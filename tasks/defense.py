"""Black-box defense: denoised smoothing with a denoiser trained through a query-only classifier.

A model owner exposes a classifier ``f`` only through queries. The defender prepends a denoiser ``D`` and
certifies the smoothed classifier ``g(x) = argmax_c P(f(D(x + delta)) = c)`` (Cohen et al. 2019; Salman et al.
2020). ``ZODenoisedSmoothing`` trains ``D``'s own parameters by (sparse) CGE through ``f``; ``FODenoisedSmoothing``
is the white-box reference that backpropagates through ``f``; ``NoDenoiser`` certifies ``f`` alone.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from dz_lightning.tasks.smoothing import ABSTAIN, _check, certify
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.func import functional_call, vmap

from dz_lightning import ZOModule
from dz_lightning.oracle import Oracle, parameter_values, query_mode

__all__ = ["BlackBoxClassifier", "DenoiserOracle", "FODenoisedSmoothing", "NoDenoiser", "ZODenoisedSmoothing"]


class BlackBoxClassifier:
    """A classifier that can only be queried: images in, logits out, no gradients, every image counted.

    Exactly one source: ``model`` (an architecture) plus ``checkpoint`` (a Lightning checkpoint whose
    ``state_dict`` holds it under ``prefix``), a ``torchscript`` file, or a Python callable ``fn``.
    It is deliberately not an ``nn.Module``: no parameter of it can be reached by an optimizer or by autograd.

    Args:
        model: architecture whose weights come from ``checkpoint``.
        checkpoint: path of a ``.ckpt`` file.
        prefix: key prefix of the model's weights in the checkpoint (``"model."`` for the task modules).
        torchscript: path of a TorchScript file.
        fn: a callable ``images -> logits``.
        num_classes: expected width of the logits.
    """

    def __init__(self, model: nn.Module | None = None, checkpoint: str | None = None, prefix: str = "model.",
                 torchscript: str | None = None, fn: Callable[[Tensor], Tensor] | None = None,
                 num_classes: int = 10) -> None:
        given = [s for s, v in (("model+checkpoint", checkpoint), ("torchscript", torchscript), ("fn", fn))
                 if v is not None]
        if len(given) != 1:
            raise ValueError(f"Expected exactly one of `checkpoint` (with `model`), `torchscript` or `fn`, but got "
                             f"{given or 'none'}.")
        if checkpoint is not None:
            if model is None:
                raise ValueError("Expected argument `model` (the architecture) together with `checkpoint`.")
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
            model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            fn = model.eval()
        elif torchscript is not None:
            fn = torch.jit.load(torchscript, map_location="cpu").eval()
        if isinstance(fn, nn.Module):
            fn.requires_grad_(False)
            self._module: nn.Module | None = fn
        else:
            self._module = None
        self._fn = fn
        self.num_classes = num_classes
        self.queries = 0

    def to(self, device: torch.device | str) -> BlackBoxClassifier:
        """Move the wrapped model (if any) to ``device``."""
        if self._module is not None:
            self._module.to(device)
        return self

    def __call__(self, images: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, C, H, W)``; detached, no graph."""
        with torch.no_grad():
            out = self._fn(images.detach())
        if not isinstance(out, Tensor) or out.shape != (images.shape[0], self.num_classes):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"The black-box classifier must return logits of shape ({images.shape[0]}, "
                             f"{self.num_classes}), but returned {shape}.")
        self.queries += images.shape[0]
        return out.detach()


class DenoiserOracle(Oracle):
    """Loss of ``CE(f(D_theta(x_noisy)), targets)`` as a function of the denoiser's parameters ``theta``.

    ``D`` is ours (white box, evaluated for K parameter points at once with ``vmap``); ``f`` is only queried.
    """

    def __init__(self, denoiser: nn.Module, classifier: BlackBoxClassifier, noisy: Tensor, targets: Tensor,
                 max_batch: int | None = None) -> None:
        super().__init__(max_batch=max_batch or max(1, 8192 // noisy.shape[0]))
        self.denoiser, self.classifier, self.noisy, self.targets = denoiser, classifier, noisy, targets
        self.model, self.inputs = denoiser, noisy  # what ZOModule uses to update BatchNorm statistics

    def _full(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return parameter_values(self.denoiser, params)

    def _loss(self, params: Mapping[str, Tensor]) -> Tensor:
        with query_mode(self.denoiser, self.noisy.device):
            out = functional_call(self.denoiser, self._full(params), (self.noisy,))
            return F.cross_entropy(self.classifier(out), self.targets)

    def _losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        fixed = {n: v for n, v in self._full(params).items() if n not in varied}
        names = list(varied)

        def denoise(*values: Tensor) -> Tensor:
            return functional_call(self.denoiser, {**fixed, **dict(zip(names, values, strict=True))}, (self.noisy,))

        with query_mode(self.denoiser, self.noisy.device):
            images = vmap(denoise, randomness="same")(*(varied[n] for n in names))  # (K, B, C, H, W)
            k, b = images.shape[:2]
            logits = self.classifier(images.reshape(k * b, *images.shape[2:])).reshape(k, b, -1)
            return torch.stack([F.cross_entropy(logits[i], self.targets) for i in range(k)])


class _CertifiedTest:
    """``test_step`` certifies every test image; the epoch end reports certified accuracy per radius."""

    denoiser: nn.Module
    classifier: Any

    def _setup_certification(self, sigma: float, n0: int, n: int, alpha: float, radii: Sequence[float],
                             num_classes: int, certify_batch: int, max_certified: int | None,
                             output_dir: str | None, seed: int) -> None:
        _check(sigma, alpha, n0, n)
        if any(r < 0 for r in radii):
            raise ValueError(f"Expected non-negative `radii`, but got {list(radii)}.")
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
        self._cert_gen = torch.Generator().manual_seed(self.certify_seed)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for xi, yi in zip(x, y.tolist(), strict=True):
            if self.max_certified is not None and len(self._rows) >= self.max_certified:
                return
            start = time.perf_counter()
            pred, radius = certify(self.smoothed_base, xi, self.sigma, self.n0, self.n, self.alpha,
                                   self.num_classes, self.certify_batch, self._cert_gen)
            self._rows.append({"label": yi, "prediction": pred, "radius": radius, "correct": int(pred == yi),
                               "time": time.perf_counter() - start})

    def on_test_epoch_end(self) -> None:
        rows = self._rows
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
        image = _plot_certified(self.certified, out / "certified_accuracy.png", type(self).__name__, self.sigma)
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_image("test/certified_accuracy", image, trainer.global_step,
                                                dataformats="HWC")


def _plot_certified(certified: dict[float, float], path: Path, title: str, sigma: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(4.5, 3), dpi=100)
    ax.plot(list(certified), [100 * v for v in certified.values()], marker="o")
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title(f"{title}, sigma {sigma}", fontsize=9)
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def _noisy_targets(classifier: Any, x: Tensor, y: Tensor, target: str) -> Tensor:
    return classifier(x).argmax(1) if target == "prediction" else y


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
        **kwargs: estimator/optimizer options of :class:`~dz_lightning.ZOModule`.
    """

    _hparams_ignore = ("denoiser", "classifier")

    def __init__(self, denoiser: nn.Module, classifier: BlackBoxClassifier, sigma: float = 0.25,
                 target: Literal["prediction", "label"] = "prediction", n0: int = 100, n: int = 10_000,
                 alpha: float = 0.001, radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75), num_classes: int = 10,
                 certify_batch: int = 1000, max_certified: int | None = None, output_dir: str | None = None,
                 certify_seed: int = 0, **kwargs: Any) -> None:
        # a residual denoiser D(x) = x - body(x) with a staged body: queries use feature reuse over the body
        self.residual_body = isinstance(getattr(denoiser, "body", None), nn.Sequential) and getattr(
            denoiser, "residual", False)
        super().__init__(denoiser.body if self.residual_body else denoiser, **kwargs)
        if not isinstance(classifier, BlackBoxClassifier):
            raise TypeError(f"Expected `classifier` to be a BlackBoxClassifier, but got {type(classifier).__name__}.")
        if target not in ("prediction", "label"):
            raise ValueError(f"Expected argument `target` to be 'prediction' or 'label', but got {target!r}.")
        self.denoiser, self.classifier, self.target = denoiser, classifier, target
        self._setup_certification(sigma, n0, n, alpha, radii, num_classes, certify_batch, max_certified,
                                  output_dir, certify_seed)
        self._noise = torch.Generator().manual_seed(self.seed + 1)

    def on_fit_start(self) -> None:
        self.classifier.to(self.device)

    def on_test_start(self) -> None:
        self.classifier.to(self.device)

    def make_oracle(self, batch: Any) -> Oracle:
        x, y = batch
        noisy = x + self.sigma * torch.randn(x.shape, generator=self._noise).to(x)
        targets = _noisy_targets(self.classifier, x, y, self.target)
        if self.residual_body:
            # the black box is the oracle's head, run outside vmap on every K * B denoised image of a chunk at once:
            # each image is counted, and a non-torch classifier works
            def head(noise: Tensor, inputs: Tensor) -> Tensor:
                return self.classifier(inputs - noise)

            return self.module_oracle(F.cross_entropy, noisy, targets, head=head)
        return DenoiserOracle(self.denoiser, self.classifier, noisy, targets, self.max_batch)

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
        sigma, target, n0, n, alpha, radii, num_classes, certify_batch, max_certified, output_dir, certify_seed:
            as in :class:`ZODenoisedSmoothing`.
        optimizer: optimizer factory for the denoiser.
        lr_scheduler: optional scheduler factory.
    """

    def __init__(self, denoiser: nn.Module, classifier_model: nn.Module, classifier_checkpoint: str | None = None,
                 sigma: float = 0.25, target: Literal["prediction", "label"] = "prediction", n0: int = 100,
                 n: int = 10_000, alpha: float = 0.001, radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
                 num_classes: int = 10, certify_batch: int = 1000, max_certified: int | None = None,
                 output_dir: str | None = None, certify_seed: int = 0,
                 optimizer: OptimizerCallable = torch.optim.Adam, lr_scheduler: LRSchedulerCallable | None = None
                 ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["denoiser", "classifier_model", "optimizer", "lr_scheduler"])
        if classifier_checkpoint is not None:
            state = torch.load(classifier_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
            classifier_model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        self.denoiser = denoiser
        self.white_box = classifier_model.eval().requires_grad_(False)
        self.classifier = self.white_box
        self.target, self.optimizer_fn, self.scheduler_fn = target, optimizer, lr_scheduler
        self._setup_certification(sigma, n0, n, alpha, radii, num_classes, certify_batch, max_certified,
                                  output_dir, certify_seed)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.white_box.eval()
        with torch.no_grad():
            t = _noisy_targets(self.white_box, x, y, self.target)
        loss = F.cross_entropy(self.white_box(self.denoiser(x + self.sigma * torch.randn_like(x))), t)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        noisy = x + self.sigma * torch.randn_like(x)
        self.log("val/noisy_acc", (self.smoothed_base(noisy).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        opt = self.optimizer_fn(self.denoiser.parameters())
        return opt if self.scheduler_fn is None else {"optimizer": opt, "lr_scheduler": self.scheduler_fn(opt)}


class NoDenoiser(_CertifiedTest, L.LightningModule):
    """The "no denoiser" baseline: certify ``f`` alone (``dz test`` only; nothing to train).

    Args:
        classifier: the black box ``f``.
        sigma, n0, n, alpha, radii, num_classes, certify_batch, max_certified, output_dir, certify_seed:
            as in :class:`ZODenoisedSmoothing`.
    """

    def __init__(self, classifier: BlackBoxClassifier, sigma: float = 0.25, n0: int = 100, n: int = 10_000,
                 alpha: float = 0.001, radii: Sequence[float] = (0.0, 0.25, 0.5, 0.75), num_classes: int = 10,
                 certify_batch: int = 1000, max_certified: int | None = None, output_dir: str | None = None,
                 certify_seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["classifier"])
        self.classifier, self.denoiser = classifier, nn.Identity()
        self._setup_certification(sigma, n0, n, alpha, radii, num_classes, certify_batch, max_certified,
                                  output_dir, certify_seed)

    def on_test_start(self) -> None:
        self.classifier.to(self.device)
