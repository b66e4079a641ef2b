"""The FO-only gradient-fidelity probe."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import pytest
import torch
from dz_lightning.callbacks.fidelity import GradientFidelity
from dz_lightning.callbacks.zo_grasp import ZOGraSP
from dz_lightning.tasks.classification import DigitsDataModule, ZOClassifier

import dz_lightning as dz
from dz_lightning.models import MLP


def _fit(tiny_trainer: Callable[..., L.Trainer], callbacks: list, **module_kw) -> None:
    torch.manual_seed(0)
    module = ZOClassifier(MLP(hidden=(8,)), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **module_kw)
    tiny_trainer(max_steps=3, callbacks=callbacks).fit(module, DigitsDataModule(batch_size=32))


def test_dense_cge_is_faithful_and_rge_less_so(tiny_trainer):
    cge_probe, rge_probe = GradientFidelity(every_n_steps=1), GradientFidelity(every_n_steps=1)
    _fit(tiny_trainer, [cge_probe], mu=1e-3)
    _fit(tiny_trainer, [rge_probe], estimator="rge", q=16)
    assert cge_probe.last["fidelity/cosine"] > 0.99
    assert cge_probe.last["fidelity/norm_ratio"] == pytest.approx(1.0, rel=5e-2)
    assert rge_probe.last["fidelity/cosine"] < 0.9


def test_masked_cosine_with_sparse_cge(tiny_trainer):
    probe = GradientFidelity(every_n_steps=1)
    _fit(tiny_trainer, [ZOGraSP(sparsity=0.9, method="uniform"), probe], mu=1e-3)
    assert probe.last["fidelity/cosine_masked"] > 0.99
    assert probe.last["fidelity/cosine"] < probe.last["fidelity/cosine_masked"]


class _HeadClassifier(ZOClassifier):
    """Its oracle has a black-box head between the model and the loss (here: halved logits)."""

    def make_oracle(self, batch):
        return dz.ModuleOracle(self.model, torch.nn.functional.cross_entropy, *batch, head=lambda out, x: out / 2)


def test_an_oracle_with_a_black_box_head_is_refused(tiny_trainer):
    """The probe would differentiate loss_fn(model(x)), not the loss through the head that ZO estimates."""
    torch.manual_seed(0)
    module = _HeadClassifier(MLP(hidden=(8,)), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = tiny_trainer(max_steps=1, callbacks=[GradientFidelity(every_n_steps=1)])
    with pytest.raises(ValueError, match="GradientFidelity differentiates.*black-box `head`"):
        trainer.fit(module, DigitsDataModule(batch_size=32))


def test_bad_period():
    with pytest.raises(ValueError, match="`every_n_steps`.*0"):
        GradientFidelity(every_n_steps=0)
