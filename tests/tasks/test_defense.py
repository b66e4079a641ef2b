"""Black-box defense: query-only classifier, ZO denoiser training without gradients from f, certification."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from dz_lightning.tasks.classification import DigitsDataModule, FOClassifier
from dz_lightning.tasks.defense import BlackBoxClassifier, FODenoisedSmoothing, NoDenoiser, ZODenoisedSmoothing
from torch import nn

from dz_lightning.models import MLP, DnCNN

CERT = {"n0": 10, "n": 50, "alpha": 0.01, "max_certified": 4, "certify_batch": 50}


def _trainer(tmp_path, **kw) -> L.Trainer:
    base = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_checkpointing": False,
            "enable_model_summary": False, "limit_val_batches": 0, "default_root_dir": str(tmp_path)}
    return L.Trainer(**{**base, **kw})


class _Tripwire(nn.Module):
    """A classifier that fails the test if any gradient ever flows back into it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(64, (16,), 10)

    def forward(self, x):
        out = self.net(x)
        if out.requires_grad:
            out.register_hook(lambda g: pytest.fail("a gradient reached the black-box classifier"))
        return out


def test_zo_denoiser_trains_without_any_gradient_from_the_classifier(tmp_path):
    torch.manual_seed(0)
    blackbox = BlackBoxClassifier(fn=_Tripwire())
    denoiser = DnCNN(1, 4, 3)
    before = {n: p.clone() for n, p in denoiser.named_parameters()}
    module = ZODenoisedSmoothing(denoiser, blackbox, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
                                 output_dir=str(tmp_path), **CERT)
    _trainer(tmp_path, max_steps=2).fit(module, DigitsDataModule(batch_size=16))
    assert not any(torch.equal(before[n], p) for n, p in denoiser.named_parameters() if n.endswith("weight"))
    n_params = sum(p.numel() for p in denoiser.parameters())
    # targets: f(x) on 16 clean images, then one image batch per query (CGE + base), per step
    assert blackbox.queries == 2 * 16 * (1 + n_params + 1)
    assert all(p.grad is None for p in blackbox._module.parameters())
    _trainer(tmp_path).test(module, DigitsDataModule(batch_size=16))
    rows = list(csv.DictReader(open(tmp_path / "certification" / "certify.csv")))
    assert len(rows) == 4 and set(rows[0]) == {"label", "prediction", "radius", "correct", "time"}
    assert (tmp_path / "certification" / "certified_accuracy.png").exists()
    assert set(module.certified) == {0.0, 0.25, 0.5, 0.75}


def test_fo_twin_and_no_denoiser_certify(tmp_path):
    torch.manual_seed(0)
    f = MLP(64, (16,), 10)
    fo = FODenoisedSmoothing(DnCNN(1, 4, 3), f, output_dir=str(tmp_path / "fo"), **CERT)
    _trainer(tmp_path, max_steps=2).fit(fo, DigitsDataModule(batch_size=16))
    _trainer(tmp_path).test(fo, DigitsDataModule(batch_size=16))
    none = NoDenoiser(BlackBoxClassifier(fn=f), output_dir=str(tmp_path / "none"), **CERT)
    _trainer(tmp_path).test(none, DigitsDataModule(batch_size=16))
    assert 0.0 in fo.certified and 0.0 in none.certified


def test_black_box_from_a_lightning_checkpoint(tmp_path):
    module = FOClassifier(MLP(64, (8,), 10))
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, DigitsDataModule(batch_size=16))
    trainer.save_checkpoint(tmp_path / "f.ckpt")
    blackbox = BlackBoxClassifier(model=MLP(64, (8,), 10), checkpoint=str(tmp_path / "f.ckpt"))
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(blackbox(x), module.model.eval()(x))
    assert blackbox.queries == 5 and not blackbox(x).requires_grad


def test_black_box_bad_input():
    with pytest.raises(ValueError, match="exactly one of"):
        BlackBoxClassifier()
    blackbox = BlackBoxClassifier(fn=lambda x: torch.zeros(x.shape[0], 3))
    with pytest.raises(ValueError, match=r"logits of shape \(2, 10\).*\(2, 3\)"):
        blackbox(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="`sigma`.*-0.5"):
        NoDenoiser(BlackBoxClassifier(fn=lambda x: x), sigma=-0.5)
    with pytest.raises(TypeError, match="BlackBoxClassifier.*Sequential"):
        ZODenoisedSmoothing(DnCNN(), nn.Sequential())


class _NumpyBlackBox:
    """A linear classifier evaluated in NumPy (it cannot run under vmap), counting the images it sees."""

    def __init__(self) -> None:
        import numpy as np

        self.weight = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += images.shape[0]
        return torch.from_numpy(images.reshape(images.shape[0], -1).numpy() @ self.weight)


@pytest.mark.parametrize("path", ["rge", "cge_staged", "cge_unstaged"])
def test_residual_denoiser_counts_every_black_box_image_on_every_path(path):
    """With a residual denoiser the black box is the oracle's head: it runs outside vmap on all K * B images."""
    import dz_lightning as dz

    torch.manual_seed(0)
    raw = _NumpyBlackBox()
    blackbox = BlackBoxClassifier(fn=raw)
    module = ZODenoisedSmoothing(DnCNN(1, 2, 3), blackbox, estimator="rge" if path == "rge" else "cge", max_batch=7,
                                 **CERT)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    oracle = module.make_oracle((x, y))
    oracle.feature_reuse = path != "cge_unstaged"
    assert blackbox.queries == raw.images == 5  # the prediction targets
    params = {n: p.detach() for n, p in module.zo_parameters().items()}
    if path == "rge":
        est = dz.rge(oracle, params, q=10, chunk=4, generator=torch.Generator().manual_seed(0))
    else:
        est = dz.cge(oracle, params)
    assert est.queries == oracle.queries == (11 if path == "rge" else 1 + sum(p.numel() for p in params.values()))
    assert blackbox.queries == raw.images == 5 + 5 * est.queries
    # the batched losses equal one-at-a-time ones (the head sees the right images for every point)
    name = "0.weight"
    stacked = params[name] + 0.1 * torch.randn(3, *params[name].shape)
    one_by_one = torch.stack([oracle.loss({**params, name: w}) for w in stacked])
    torch.testing.assert_close(oracle.losses(params, {name: stacked}), one_by_one)
    assert blackbox.queries == raw.images == 5 + 5 * (est.queries + 6)
