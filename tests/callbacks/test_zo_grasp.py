"""The ZOGraSP callback: masks for ZOModule and for a plain LightningModule, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from dz_lightning.callbacks.zo_grasp import ZOGraSP
from dz_lightning.tasks.classification import DigitsDataModule, ZOClassifier
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import dz_lightning as dz
from dz_lightning.models import MLP


def _module() -> ZOClassifier:
    torch.manual_seed(0)
    return ZOClassifier(MLP(hidden=(16,)), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def test_masks_reach_the_estimator_and_are_redrawn_on_schedule(tiny_trainer, digits):
    cb = ZOGraSP(sparsity=0.9, method="zo_grasp", q=8, resample_every_n_epochs=2, samples_per_class=3)
    module = _module()
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append({n: m.clone() for n, m in pl_module.zo_masks.items()})
            est = pl_module.last_estimate.grads
            assert all(torch.all(est[n][~m] == 0) for n, m in pl_module.zo_masks.items())

    tiny_trainer(callbacks=[cb, Spy()], max_epochs=4, limit_train_batches=2).fit(module, digits)
    assert set(seen[0]) == {"1.weight", "3.weight"}
    assert all(torch.equal(seen[0][n], seen[3][n]) for n in seen[0])  # epochs 0 and 1 share masks
    assert not all(torch.equal(seen[0][n], seen[4][n]) for n in seen[0])  # redrawn at epoch 2
    total = sum(m.numel() for m in seen[0].values())
    assert abs(sum(int(m.sum()) for m in seen[0].values()) / total - 0.1) < 0.005
    assert cb.queries == 2 * (8 + 1)
    assert cb.drawn_epoch == 2 and cb.drawn_step == 4  # the last draw: epoch 2 starts at step 4


def test_masks_redrawn_every_n_steps(tiny_trainer, digits):
    cb = ZOGraSP(sparsity=0.9, method="uniform", resample_every_n_steps=3)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            seen.append({n: m.clone() for n, m in pl_module.zo_masks.items()})

    tiny_trainer(callbacks=[cb, Spy()], max_epochs=2, limit_train_batches=4).fit(_module(), digits)
    assert len(seen) == 8

    def same(i: int, j: int) -> bool:
        return all(torch.equal(seen[i][n], seen[j][n]) for n in seen[i])

    # draws at steps 0, 3 and 6, across the epoch boundary, and not at the epoch start (step 4)
    assert same(0, 1) and same(1, 2) and not same(2, 3)
    assert same(3, 4) and same(4, 5) and not same(5, 6) and same(6, 7)
    assert cb.drawn_step == 6


@pytest.mark.parametrize("schedule", [{"resample_every_n_epochs": 2}, {"resample_every_n_steps": 3}],
                         ids=["epochs", "steps"])
def test_resume_keeps_masks_and_future_draws(tiny_trainer, tmp_path, schedule):
    def run(root: Path, epochs: int, ckpt: str | None = None) -> tuple[ZOGraSP, ZOClassifier]:
        cb = ZOGraSP(sparsity=0.8, method="random", **schedule)
        module = _module()
        ckpt_cb = ModelCheckpoint(dirpath=root, save_last=True)
        tiny_trainer(default_root_dir=str(root), callbacks=[cb, ckpt_cb], max_epochs=epochs, limit_train_batches=2).fit(
            module, DigitsDataModule(batch_size=16), ckpt_path=ckpt)
        return cb, module

    straight, _ = run(tmp_path / "a", 5)
    run(tmp_path / "b", 3)
    resumed, _ = run(tmp_path / "b", 5, ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert straight.ratios == resumed.ratios
    assert all(torch.equal(straight.masks[n], resumed.masks[n]) for n in straight.masks)
    a = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


class PlainModule(L.LightningModule):
    """A user's own module following the protocol: zo_parameters(), zo_masks, make_oracle()."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.zo_masks = None

    def zo_parameters(self):
        return dict(self.named_parameters())

    def make_oracle(self, batch):
        return dz.ModuleOracle(self, F.cross_entropy, *batch)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        est = dz.cge(self.make_oracle(batch), self.zo_parameters(), masks=self.zo_masks)
        opt = self.optimizers()
        for n, p in self.named_parameters():
            p.grad = est.grads[n]
        opt.step()
        self.est = est

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_works_with_a_plain_lightning_module(tiny_trainer, tmp_path, digits):
    module = PlainModule()
    cb = ZOGraSP(sparsity=0.5, method="grasp", samples_per_class=2, save_ratios_path=str(tmp_path / "lpr.json"))
    tiny_trainer(callbacks=[cb], max_epochs=1, limit_train_batches=2).fit(module, digits)
    assert set(module.zo_masks) == {"net.1.weight"}
    assert module.est.queries == 320 + 10 + 1  # half of the 640 weights, the dense bias, the base point
    assert json.loads((tmp_path / "lpr.json").read_text()) == {"net.1.weight": pytest.approx(0.5)}


class HeadModule(PlainModule):
    """Its oracle has a black-box head between the network and the loss."""

    def make_oracle(self, batch):
        return dz.ModuleOracle(self, F.cross_entropy, *batch, head=lambda out, x: out / 2)


def test_fo_grasp_refuses_an_oracle_with_a_black_box_head(tiny_trainer, digits):
    cb = ZOGraSP(sparsity=0.5, method="grasp", samples_per_class=2)
    with pytest.raises(ValueError, match=r"method='grasp' \(FO GraSP\) differentiates.*black-box `head`.*zo_grasp"):
        tiny_trainer(callbacks=[cb], max_epochs=1, limit_train_batches=1).fit(HeadModule(), digits)


class NetModule(PlainModule):
    """The README's layout: the network in `self.net`, names relative to it, the oracle over `self.net`."""

    def zo_parameters(self):
        return dict(self.net.named_parameters())

    def make_oracle(self, batch):
        return dz.ModuleOracle(self.net, F.cross_entropy, *batch)

    def training_step(self, batch, batch_idx):
        est = dz.cge(self.make_oracle(batch), self.zo_parameters(), masks=self.zo_masks)
        for n, p in self.zo_parameters().items():
            p.grad = est.grads[n]
        self.optimizers().step()
        self.est = est


class PrefixedModule(NetModule):
    """Names relative to the LightningModule (`net.1.weight`), the oracle over `self.net` (`1.weight`).

    Only FO GraSP can score this module (ZO-GraSP queries the oracle under the names of `zo_parameters()`).
    """

    def zo_parameters(self):
        return dict(self.named_parameters())

    def training_step(self, batch, batch_idx):
        est = dz.cge(self.make_oracle(batch), dict(self.net.named_parameters()),
                     masks={n.removeprefix("net."): m for n, m in self.zo_masks.items()})
        for n, p in self.net.named_parameters():
            p.grad = est.grads[n]
        self.optimizers().step()
        self.est = est


@pytest.mark.parametrize(("module_cls", "name", "method"), [
    (NetModule, "1.weight", "zo_grasp"),
    (NetModule, "1.weight", "grasp"),
    (PrefixedModule, "net.1.weight", "grasp"),  # FO GraSP differentiates the oracle's model under its own names
])
def test_layers_found_by_identity_whatever_the_attribute(tiny_trainer, digits, module_cls, name, method):
    module = module_cls()
    cb = ZOGraSP(sparsity=0.5, method=method, q=8, samples_per_class=2)
    tiny_trainer(callbacks=[cb], max_epochs=1, limit_train_batches=2).fit(module, digits)
    assert set(module.zo_masks) == set(cb.ratios) == {name}
    assert cb.ratios[name] == pytest.approx(0.5)
    assert module.est.queries == 320 + 10 + 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, r"`sparsity`.*\[0, 1\).*1.0"),
        ({"sparsity": -0.1}, r"`sparsity`.*-0.1"),
        ({"resample_every_n_epochs": 0}, "`resample_every_n_epochs`.*>= 1.*0"),
        ({"resample_every_n_steps": 0}, "`resample_every_n_steps`.*>= 1 or None.*0"),
        ({"method": "snip"}, "`method`.*'zo_grasp'.*'snip'"),
        ({"ratios_path": "/nonexistent.json"}, "`ratios_path`.*existing JSON file"),
    ],
)
def test_bad_arguments_fail_before_any_trainer(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZOGraSP(**kwargs)


def test_model_without_prunable_layers_and_mismatched_ratio_file(tiny_trainer, tmp_path, digits):
    module = ZOClassifier(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.Flatten()))
    with pytest.raises(ValueError, match="no prunable layer"):
        tiny_trainer(callbacks=[ZOGraSP(method="uniform")]).fit(module, digits)
    bad = tmp_path / "lpr.json"
    bad.write_text(json.dumps({"conv.weight": 0.5}))
    with pytest.raises(ValueError, match="does not match the model.*conv.weight.*1.weight"):
        tiny_trainer(callbacks=[ZOGraSP(ratios_path=str(bad))]).fit(_module(), DigitsDataModule(batch_size=16))


_DDP_WORKER = '''
import sys
from pathlib import Path

import lightning as L
import torch

from dz_lightning.callbacks.zo_grasp import ZOGraSP
from dz_lightning.models import MLP
from dz_lightning.strategies import ZODDPStrategy
from dz_lightning.tasks.classification import DigitsDataModule, ZOClassifier


class Spy(L.Callback):
    def __init__(self):
        self.history = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.history.append({n: m.clone().cpu() for n, m in pl_module.zo_masks.items()})


out = Path(sys.argv[1])
torch.set_num_threads(1)
L.seed_everything(0, verbose=False)
module = ZOClassifier(MLP(hidden=(8,)), q=4, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
cb = ZOGraSP(sparsity=0.9, method="zo_grasp", q=4, samples_per_class=2, num_classes=10,
             resample_every_n_epochs=1)
spy = Spy()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ZODDPStrategy(process_group_backend="gloo"),
                    use_distributed_sampler=False, max_epochs=2, limit_train_batches=2, limit_val_batches=0,
                    logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, spy])
trainer.fit(module, DigitsDataModule(batch_size=16))
torch.save({"ratios": cb.ratios, "history": spy.history}, out / f"rank{trainer.global_rank}.pt")
trainer.strategy.barrier("saved")
'''


@pytest.mark.slow
def test_two_ddp_ranks_share_ratios_and_masks(tmp_path, run_ddp):
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    proc = run_ddp(script, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["ratios"] == r1["ratios"]
    assert len(r0["history"]) == len(r1["history"]) == 2
    for m0, m1 in zip(r0["history"], r1["history"], strict=True):
        assert m0.keys() == m1.keys() and all(torch.equal(m0[n], m1[n]) for n in m0)
    assert any(not torch.equal(r0["history"][0][n], r0["history"][1][n]) for n in r0["history"][0])  # redrawn


# ------------------------------------------------------------------- resume keeps the run's settings (issue 28)
def _fit_once(tiny_trainer, root: Path, cb: ZOGraSP, epochs: int, ckpt: Path | None = None) -> ZOGraSP:
    tiny_trainer(default_root_dir=str(root), max_epochs=epochs, limit_train_batches=2,
                 callbacks=[cb, ModelCheckpoint(dirpath=root, save_last=True)]).fit(
        _module(), DigitsDataModule(batch_size=16), ckpt_path=ckpt)
    return cb


def test_resume_with_another_method_is_refused(tiny_trainer, tmp_path):
    first = _fit_once(tiny_trainer, tmp_path, ZOGraSP(sparsity=0.9, method="random"), 1)
    assert first.ratios != {n: 0.9 for n in first.ratios}
    with pytest.raises(ValueError, match=r"computed its layer-wise ratios with method 'random', but this callback has "
                                         r"method 'uniform'"):
        _fit_once(tiny_trainer, tmp_path / "b", ZOGraSP(sparsity=0.9, method="uniform"), 2, tmp_path / "last.ckpt")
    same = _fit_once(tiny_trainer, tmp_path / "c", ZOGraSP(sparsity=0.9, method="random"), 2, tmp_path / "last.ckpt")
    assert same.ratios == first.ratios


def test_resume_with_another_ratios_file_is_refused_and_the_same_file_accepted(tiny_trainer, tmp_path):
    saved = tmp_path / "lpr.json"
    first = _fit_once(tiny_trainer, tmp_path, ZOGraSP(sparsity=0.9, method="random", save_ratios_path=str(saved)), 1)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({n: 0.9 for n in first.ratios}))
    with pytest.raises(ValueError, match=r"other.json' holds other ratios .* than the checkpoint's ZOGraSP trained "
                                         r"with"):
        _fit_once(tiny_trainer, tmp_path / "b", ZOGraSP(sparsity=0.9, ratios_path=str(other)), 2,
                  tmp_path / "last.ckpt")
    resumed = _fit_once(tiny_trainer, tmp_path / "c", ZOGraSP(sparsity=0.9, ratios_path=str(saved)), 2,
                        tmp_path / "last.ckpt")
    assert resumed.ratios == first.ratios
