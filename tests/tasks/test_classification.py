"""The classification task: ZO/FO classifiers, FO sparse baselines, the digits and torchvision data modules."""

from __future__ import annotations

import pytest
import torch
from dz_lightning.callbacks.zo_grasp import ZOGraSP
from dz_lightning.tasks.classification import (
    CIFAR10DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    FOClassifier,
    MNISTDataModule,
    ZOClassifier,
)
from torchvision import datasets

from dz_lightning.models import MLP


def _sgd(lr: float = 0.1):
    return lambda p: torch.optim.SGD(p, lr=lr)


# ------------------------------------------------------------------------------------------------- digits
def test_digits_splits_are_fixed_and_disjoint():
    dm = DigitsDataModule(batch_size=32, seed=3)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 360
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    again = DigitsDataModule(batch_size=32, seed=3)
    again.setup()
    assert torch.equal(again.splits["test"].tensors[0], dm.splits["test"].tensors[0])
    x2, _ = next(iter(again.train_dataloader()))
    assert torch.equal(x, x2)  # same seed -> same batches (on every DDP rank)


@pytest.mark.parametrize(("kw", "match"), [({"batch_size": 0}, "batch sizes"), ({"val_size": 0.9}, "val_size"),
                                            ({"normalize": "minmax"}, "normalize.*minmax")])
def test_digits_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kw)


# ------------------------------------------------------------------------------------------------- ZO / FO
def test_zo_classifier_logs_what_the_user_sees(tmp_path, tiny_trainer):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    module = ZOClassifier(MLP(hidden=(8,)), optimizer=_sgd())
    trainer = tiny_trainer(max_steps=4, logger=TensorBoardLogger(str(tmp_path), name="tb"), log_every_n_steps=1)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    bar = trainer.progress_bar_metrics
    assert {"train/loss_step", "train/acc_step", "queries/s", "queries"} <= set(bar)  # smoothed rate, running total
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss_step", "train/acc_step", "train/lr", "train/queries", "train/queries_total",
                "train/grad_density", "train/queries_per_s"):
        assert tag in tags, tag
    d = sum(p.numel() for p in module.model.parameters())
    assert acc.Scalars("train/queries")[-1].value == d + 1  # dense forward-difference CGE
    assert acc.Scalars("train/queries_total")[-1].value == 4 * (d + 1) == bar["queries"]
    assert bar["queries/s"] > 0


def test_train_accuracy_can_be_switched_off(tiny_trainer):
    module = ZOClassifier(MLP(hidden=(8,)), train_accuracy=False, optimizer=_sgd())
    trainer = tiny_trainer(max_steps=1)
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert "train/acc_step" not in trainer.logged_metrics and "train/loss_step" in trainer.logged_metrics


def test_train_accuracy_of_a_batchnorm_model_reuses_the_statistics_forward(tiny_trainer):
    from dz_lightning.models import simple_cnn

    torch.manual_seed(0)
    model = simple_cnn(1, in_channels=1)
    module = ZOClassifier(model, optimizer=_sgd())
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(out.detach().clone()))
    scored = []
    module.train_acc.register_forward_hook(lambda m, args, out: scored.append(args[0]))  # the logits it scores
    trainer = tiny_trainer(max_steps=2)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert len(calls) == 2 and len(scored) == 2  # one plain forward per step serves BN statistics and accuracy
    assert all(torch.equal(a, b) for a, b in zip(calls, scored, strict=True))


@pytest.mark.parametrize("batch_size", [8, 157, 16])
def test_digits_never_ends_an_epoch_with_a_batch_of_one(batch_size, tiny_trainer):
    from torch import nn

    data = DigitsDataModule(batch_size=batch_size)
    data.setup("fit")
    sizes = [len(y) for _, y in data.train_dataloader()]
    assert min(sizes) > 1 and sum(sizes) >= len(data.splits["train"]) - 1  # only a lone last example is dropped
    if batch_size == 16:
        assert sum(sizes) == len(data.splits["train"])  # a last batch of 9 is kept
    if batch_size == 157:  # 1,257 = 8 x 157 + 1: the last step of an epoch would have had one example
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
        module = ZOClassifier(model, estimator="rge", q=2, optimizer=_sgd())
        tiny_trainer(max_epochs=1).fit(module, data)  # was: "Expected more than 1 value per channel" at step 9
        assert module.global_step == 8


@pytest.mark.slow
def test_zo_and_fo_learn_digits_and_test(tiny_trainer):
    results = {}
    for name, cls in (("zo", ZOClassifier), ("fo", FOClassifier)):
        torch.manual_seed(0)
        module = cls(MLP(hidden=(16,)), optimizer=lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9))
        dm = DigitsDataModule(batch_size=64)
        trainer = tiny_trainer(max_steps=40)
        trainer.fit(module, dm)
        results[name] = trainer.test(module, datamodule=dm, verbose=False)[0]["test/acc"]
    assert results["fo"] > 0.7 and results["zo"] > 0.7
    assert abs(results["fo"] - results["zo"]) < 0.1  # dense CGE follows the true gradient


def test_fo_sparse_baselines_respect_the_masks(tiny_trainer):
    for sparse in ("weights", "gradients"):
        torch.manual_seed(0)
        module = FOClassifier(MLP(hidden=(16,)), optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9,
                                                                                      weight_decay=1e-3),
                              sparse=sparse)
        before = {n: p.detach().clone() for n, p in module.zo_parameters().items()}
        trainer = tiny_trainer(max_steps=3, callbacks=[ZOGraSP(sparsity=0.9, method="uniform")])
        trainer.fit(module, DigitsDataModule(batch_size=32))
        masks = module.zo_masks
        assert masks is not None
        params = module.zo_parameters()
        pruned = [n for n, m in masks.items() if not m.all()]
        assert pruned
        for n in pruned:
            off = ~masks[n]
            if sparse == "weights":
                assert (params[n][off] == 0).all()  # pruned weights stay zero despite weight decay and momentum
            else:
                assert torch.count_nonzero(params[n][off]) > 0  # the model stays dense; only gradients are masked
            assert not torch.equal(params[n][masks[n]], before[n][masks[n]])


def test_fo_sparse_gradient_step_touches_only_masked_coordinates(tiny_trainer):
    torch.manual_seed(0)
    module = FOClassifier(MLP(hidden=(16,)), optimizer=_sgd(0.5), sparse="gradients")
    before = {n: p.detach().clone() for n, p in module.zo_parameters().items()}
    trainer = tiny_trainer(max_steps=1, callbacks=[ZOGraSP(sparsity=0.9, method="uniform")])
    trainer.fit(module, DigitsDataModule(batch_size=32))
    for n, mask in module.zo_masks.items():
        changed = module.zo_parameters()[n].detach() != before[n]
        assert not (changed & ~mask).any(), n


def test_fo_sparse_needs_masks(tiny_trainer):
    module = FOClassifier(MLP(hidden=(8,)), optimizer=_sgd(), sparse="weights")
    with pytest.raises(ValueError, match="needs masks"):
        tiny_trainer(max_steps=1).fit(module, DigitsDataModule(batch_size=32))


def test_fo_bad_arguments():
    with pytest.raises(ValueError, match="sparse"):
        FOClassifier(MLP(hidden=(8,)), sparse="both")
    with pytest.raises(ValueError, match="train_noise_std"):
        FOClassifier(MLP(hidden=(8,)), train_noise_std=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        ZOClassifier(MLP(hidden=(8,)), num_classes=1)


# ------------------------------------------------------------------------------------------------- torchvision
def _fake(monkeypatch, name: str, shape: tuple[int, int, int], calls: list):
    def fake(root, train=True, transform=None, download=False):
        calls.append((root, train, download))
        return datasets.FakeData(size=12, image_size=shape, num_classes=10, transform=transform,
                                 random_offset=0 if train else 50)

    monkeypatch.setattr(datasets, name, fake)


@pytest.mark.parametrize(("cls", "name", "shape"), [(CIFAR10DataModule, "CIFAR10", (3, 32, 32)),
                                                    (MNISTDataModule, "MNIST", (1, 28, 28)),
                                                    (FashionMNISTDataModule, "FashionMNIST", (1, 28, 28))])
def test_torchvision_modules_on_fake_data(monkeypatch, tmp_path, cls, name, shape):
    calls: list = []
    _fake(monkeypatch, name, shape, calls)
    dm = cls(root=str(tmp_path), batch_size=4, eval_batch_size=5, num_workers=0, seed=1)
    dm.prepare_data()
    dm.setup("fit")
    assert all(download for _, _, download in calls) and {train for _, train, _ in calls} == {True, False}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, *shape) and x.dtype == torch.float32 and y.dtype == torch.long
    assert len(dm.train_dataloader()) == 3  # 12 images, drop_last
    xv, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (5, *shape)
    # SeededRandomSampler: the same order for the same seed (every rank), another for the next epoch
    first = list(dm.train_dataloader().sampler)
    twin = cls(root=str(tmp_path), num_workers=0, seed=1)
    twin.setup("fit")
    assert list(twin.train_dataloader().sampler) == first
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(1)
    assert sorted(sampler) == sorted(first) and list(sampler) != first


def test_cifar_augmentation_is_the_papers(monkeypatch, tmp_path):
    from torchvision import transforms

    _fake(monkeypatch, "CIFAR10", (3, 32, 32), [])
    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0)
    dm.setup("fit")
    kinds = [type(t) for t in dm.train_set.transform.transforms]
    assert kinds == [transforms.RandomCrop, transforms.RandomHorizontalFlip, transforms.ToTensor,
                     transforms.Normalize]
    assert dm.train_set.transform.transforms[0].padding == 4
    assert [type(t) for t in dm.test_set.transform.transforms] == [transforms.ToTensor, transforms.Normalize]
    plain = CIFAR10DataModule(root=str(tmp_path), num_workers=0, augment=False)
    plain.setup("fit")
    assert [type(t) for t in plain.train_set.transform.transforms] == [transforms.ToTensor, transforms.Normalize]


def test_missing_files_name_the_directory(monkeypatch, tmp_path):
    def offline(root, train=True, transform=None, download=False):
        raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")

    monkeypatch.setattr(datasets, "CIFAR10", offline)
    dm = CIFAR10DataModule(root=str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"nowhere.*cifar-10-batches-py"):
        dm.prepare_data()


def test_missing_files_without_download_use_the_real_loader(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path), download=False, num_workers=0)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        dm.setup("fit")


def test_torchvision_bad_arguments():
    with pytest.raises(ValueError, match="batch sizes"):
        CIFAR10DataModule(batch_size=0)
    with pytest.raises(ValueError, match="num_workers.*-1"):
        MNISTDataModule(num_workers=-1)
