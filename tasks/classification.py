"""Image classification: a ZO-trained classifier, its FO twin, and the offline digits data.

``ZOClassifier`` trains any model (a staged one from :mod:`dz_lightning.models` or the user's own) from
loss queries only; ``FOClassifier`` trains the same model, data, optimizer and schedule by backprop, as the
reference every ZO result is compared with.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from dz_lightning.tasks.vision import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from dz_lightning import ZOModule
from dz_lightning import sparsity as sp
from dz_lightning.module import build_optimizers
from dz_lightning.oracle import ModuleOracle
from dz_lightning.oracle_base import Oracle
from dz_lightning.query import query_mode
from dz_lightning.sampling import ResumableDataLoader, SeededRandomSampler
from dz_lightning.validation import check_choice

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FOClassifier",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "ZOClassifier",
]


class _ClassificationMetrics:
    """Top-1 accuracy per split and the shared validation/test steps (mixed into both classifiers)."""

    model: nn.Module

    def _configure_metrics(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"Expected argument `num_classes` to be >= 2, but got {num_classes}.")
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def _log_train_acc(self, logits: Tensor, targets: Tensor) -> None:
        self.train_acc(logits.detach(), targets)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=True, on_epoch=True)  # type: ignore[attr-defined]

    def _eval_step(self, batch: Any, split: Literal["val", "test"]) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        metric = self.val_acc if split == "val" else self.test_acc
        metric(logits, y)
        self.log(f"{split}/loss", loss, sync_dist=True)  # type: ignore[attr-defined]
        self.log(f"{split}/acc", metric, prog_bar=True)  # type: ignore[attr-defined]
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.model(x).argmax(-1)


class ZOClassifier(_ClassificationMetrics, ZOModule):
    """A classifier trained by zeroth-order optimization of the cross-entropy.

    Logged besides the engine's ``train/*`` keys: ``train/acc`` (top-1 on the training batch at the weights
    before the step; one extra forward that is not counted as a query, and never updates BatchNorm statistics)
    and ``val/acc``, ``test/acc``, ``val/loss``, ``test/loss``.

    Args:
        model: maps ``(B, C, H, W)`` images to ``(B, num_classes)`` logits.
        num_classes: number of classes (for the accuracy metrics).
        train_accuracy: log ``train/acc`` (costs one forward of the batch per step); ``False`` skips it.
        **kwargs: estimator, optimizer and schedule options of :class:`~dz_lightning.ZOModule`.
    """

    def __init__(self, model: nn.Module, num_classes: int = 10, train_accuracy: bool = True, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.train_accuracy = train_accuracy
        self._configure_metrics(num_classes)

    def training_forward(self, batch: Any, oracle: Oracle) -> Tensor | None:
        """The engine's training forward (BatchNorm statistics), or a query-mode forward; logs ``train/acc``."""
        logits = super().training_forward(batch, oracle)
        if not self.train_accuracy:
            return logits
        if logits is None:  # no statistics to update: a forward that leaves the model untouched
            with query_mode(self.model, batch[0].device):
                logits = self.model(batch[0])
        self._log_train_acc(logits, batch[1])
        return logits

    def make_oracle(self, batch: Any) -> Oracle:
        x, y = batch
        return self.module_oracle(F.cross_entropy, x, y)


class FOClassifier(_ClassificationMetrics, L.LightningModule):
    """The first-order (backprop) twin of :class:`ZOClassifier`: same model, data, optimizer and schedule.

    FO only: it differentiates through the model and is never used on a black-box path. With a
    :class:`~dz_lightning.callbacks.zo_grasp.ZOGraSP` callback it gives the paper's two FO baselines at the same
    layer-wise ratios: ``sparse="gradients"`` trains the dense model but keeps only the masked-in gradient entries
    (the masks are redrawn like DeepZero's), ``sparse="weights"`` trains a sparse model (weights outside the mask
    stay 0).

    Args:
        model: maps images to logits.
        num_classes: number of classes.
        optimizer: optimizer factory.
        lr_scheduler: optional scheduler factory.
        scheduler_interval: step the scheduler every ``"step"`` or every ``"epoch"``.
        sparse: ``"none"``, ``"gradients"`` or ``"weights"`` (needs masks in ``zo_masks``, e.g. from ZOGraSP).
        train_noise_std: add Gaussian noise of this standard deviation to training images (the base classifier
            of randomized smoothing is trained this way); 0 disables.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        sparse: Literal["none", "gradients", "weights"] = "none",
        train_noise_std: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice("scheduler_interval", scheduler_interval, ("step", "epoch"))
        check_choice("sparse", sparse, ("none", "gradients", "weights"))
        self.save_hyperparameters(ignore=["model", "optimizer", "lr_scheduler"])
        if train_noise_std < 0:
            raise ValueError(f"Expected argument `train_noise_std` to be >= 0, but got {train_noise_std}.")
        self.sparse = sparse
        self.train_noise_std = train_noise_std
        self.zo_masks: dict[str, Tensor] | None = None
        self.model = model
        self.optimizer_fn = optimizer
        self.scheduler_fn = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self._configure_metrics(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def zo_parameters(self) -> dict[str, Tensor]:
        """The parameters masks refer to (same names as in :class:`ZOClassifier`)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def make_oracle(self, batch: Any) -> Oracle:
        """A loss oracle on ``batch`` (used by ZOGraSP to score the network)."""
        x, y = batch
        return ModuleOracle(self.model, F.cross_entropy, x, y)

    def on_train_start(self) -> None:
        if self.sparse != "none" and self.zo_masks is None:
            raise ValueError(f"FOClassifier(sparse={self.sparse!r}) needs masks: add a ZOGraSP callback.")
        self._apply_weight_masks()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.sparse != "none":
            sp.mask_gradients(self.zo_parameters(), self.zo_masks)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._apply_weight_masks()  # weight decay and momentum must not revive pruned weights

    def _apply_weight_masks(self) -> None:
        if self.sparse == "weights" and self.zo_masks:
            params = self.zo_parameters()
            with torch.no_grad():
                for name, mask in self.zo_masks.items():
                    params[name].mul_(mask)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        if self.train_noise_std > 0:
            x = x + self.train_noise_std * torch.randn_like(x)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self._log_train_acc(logits, y)
        return loss

    def configure_optimizers(self) -> Any:
        return build_optimizers(self.parameters(), self.optimizer_fn, self.scheduler_fn, self.scheduler_interval)


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): the offline default.

    Images are ``(1, 8, 8)`` float32 scaled to [0, 1] (``normalize="unit"``) or standardized with the training
    split's mean and std (``"standard"``); labels are ``int64``. The stratified train/val/test split is fixed
    by ``seed``; the training order depends only on (seed, epoch), identically on every DDP rank.

    Args:
        batch_size: training batch size. A last batch of one example (1,257 training images: batch sizes 2, 4, 8,
            157) is dropped, as train-mode BatchNorm cannot normalize one example; any other last batch is kept.
        eval_batch_size: validation/test batch size.
        val_size: fraction of all images for validation.
        test_size: fraction of all images for testing.
        normalize: ``"unit"`` or ``"standard"``.
        seed: split and shuffling seed.
        num_workers: DataLoader workers.
        predict_split: the split ``dz predict`` runs on (``predictions.pt`` records it).
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        val_size: float = 0.1,
        test_size: float = 0.2,
        normalize: Literal["unit", "standard"] = "unit",
        seed: int = 0,
        num_workers: int = 0,
        predict_split: Literal["train", "val", "test"] = "test",
    ) -> None:
        super().__init__()
        check_choice("predict_split", predict_split, ("train", "val", "test"))
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"Expected positive batch sizes, but got {batch_size} and {eval_batch_size}.")
        if not (0 < val_size < 1 and 0 < test_size < 1 and val_size + test_size < 1):
            raise ValueError(
                f"Expected `val_size` and `test_size` in (0, 1) with a sum < 1, but got {val_size} and {test_size}."
            )
        if normalize not in ("unit", "standard"):
            raise ValueError(f"Expected argument `normalize` to be 'unit' or 'standard', but got {normalize!r}.")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.normalize = normalize
        self.seed = seed
        self.num_workers = num_workers
        self.predict_split = predict_split
        self.num_classes = 10
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        idx = torch.arange(len(y)).numpy()
        rest, test = train_test_split(idx, test_size=self.test_size, random_state=self.seed, stratify=y.numpy())
        train, val = train_test_split(
            rest, test_size=self.val_size / (1 - self.test_size), random_state=self.seed, stratify=y.numpy()[rest]
        )
        if self.normalize == "standard":
            mean, std = x[train].mean(), x[train].std()
            x = (x - mean) / std
        self.splits = {name: TensorDataset(x[i], y[i]) for name, i in (("train", train), ("val", val), ("test", test))}

    def train_dataloader(self) -> DataLoader:
        ds = self.splits["train"]
        # a last batch of one example breaks train-mode BatchNorm (one value per channel); it is dropped, and only it
        return ResumableDataLoader(ds, batch_size=self.batch_size, sampler=SeededRandomSampler(len(ds), self.seed),
                                   num_workers=self.num_workers, drop_last=len(ds) % self.batch_size == 1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        """The ``predict_split`` images in order (no shuffling), at the evaluation batch size."""
        return DataLoader(self.splits[self.predict_split], batch_size=self.eval_batch_size,
                          num_workers=self.num_workers)
