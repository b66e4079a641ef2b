"""torchvision image data sets (CIFAR-10, MNIST, Fashion-MNIST) as LightningDataModules.

``download=True`` fetches the files for users with a network; when the files are missing and the download
fails, the error says where to put them. Training order comes from :class:`~dz_lightning.SeededRandomSampler`,
so every DDP rank sees the same batches (the ranks split the queries, not the data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from dz_lightning.sampling import ResumableDataLoader, SeededRandomSampler

__all__ = ["CIFAR10DataModule", "FashionMNISTDataModule", "MNISTDataModule", "TorchvisionDataModule"]


class TorchvisionDataModule(L.LightningDataModule):
    """Base class: a torchvision data set with its train/test splits (the test split also validates).

    Args:
        root: directory holding (or receiving) the files.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size.
        num_workers: DataLoader workers.
        download: try to download missing files.
        augment: use the training augmentation (if the data set defines one).
        seed: shuffling seed.
    """

    name: ClassVar[str] = ""
    folder: ClassVar[str] = ""
    mean: ClassVar[tuple[float, ...]] = ()
    std: ClassVar[tuple[float, ...]] = ()
    num_classes: ClassVar[int] = 10

    def __init__(self, root: str = "data", batch_size: int = 256, eval_batch_size: int = 1000, num_workers: int = 2,
                 download: bool = True, augment: bool = True, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"Expected positive batch sizes, but got {batch_size} and {eval_batch_size}.")
        if num_workers < 0:
            raise ValueError(f"Expected argument `num_workers` to be >= 0, but got {num_workers}.")
        self.save_hyperparameters()
        self.root, self.batch_size, self.eval_batch_size = root, batch_size, eval_batch_size
        self.num_workers, self.download, self.augment, self.seed = num_workers, download, augment, seed
        self.train_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def dataset(self, train: bool, transform: Any) -> Dataset:
        """The torchvision data set object; subclasses override."""
        raise NotImplementedError

    def train_transforms(self) -> list[Any]:
        return []

    def _normalize(self) -> list[Any]:
        return [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]

    def _load(self, train: bool, transform: Any) -> Dataset:
        try:
            return self.dataset(train, transform)
        except (RuntimeError, OSError) as err:
            where = Path(self.root).resolve()
            raise FileNotFoundError(
                f"{self.name} was not found under {where} and could not be downloaded ({err}). Put the "
                f"'{self.folder}' folder there (as torchvision's {self.name} expects), or run once with a network "
                "and `download: true`."
            ) from err

    def prepare_data(self) -> None:
        if self.download:
            self._load(True, None)
            self._load(False, None)

    def setup(self, stage: str | None = None) -> None:
        train_tf = transforms.Compose((self.train_transforms() if self.augment else []) + self._normalize())
        test_tf = transforms.Compose(self._normalize())
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._load(True, train_tf)
        if self.test_set is None:
            self.test_set = self._load(False, test_tf)

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                          sampler=SeededRandomSampler(len(self.train_set), self.seed), drop_last=True,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 with the paper's augmentation: random crop (4-pixel padding), horizontal flip, normalization."""

    name, folder = "CIFAR-10", "cifar-10-batches-py"
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def dataset(self, train: bool, transform: Any) -> Dataset:
        return datasets.CIFAR10(self.root, train=train, transform=transform, download=self.download)

    def train_transforms(self) -> list[Any]:
        return [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]


class MNISTDataModule(TorchvisionDataModule):
    """MNIST (1x28x28), normalized."""

    name, folder = "MNIST", "MNIST/raw"
    mean, std = (0.1307,), (0.3081,)

    def dataset(self, train: bool, transform: Any) -> Dataset:
        return datasets.MNIST(self.root, train=train, transform=transform, download=self.download)


class FashionMNISTDataModule(TorchvisionDataModule):
    """Fashion-MNIST (1x28x28), normalized."""

    name, folder = "Fashion-MNIST", "FashionMNIST/raw"
    mean, std = (0.2860,), (0.3530,)

    def dataset(self, train: bool, transform: Any) -> Dataset:
        return datasets.FashionMNIST(self.root, train=train, transform=transform, download=self.download)
