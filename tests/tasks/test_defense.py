"""Black-box defense: query-only classifier, ZO denoiser training without gradients from f, certification."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import fp32_tolerance
from dz_lightning.tasks.classification import DigitsDataModule, FOClassifier
from dz_lightning.tasks.defense import BlackBoxClassifier, FODenoisedSmoothing, NoDenoiser, ZODenoisedSmoothing
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from dz_lightning.models import MLP, DnCNN

CERT = {"n0": 10, "n": 50, "alpha": 0.01, "max_certified": 4, "certify_batch": 50}



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


def test_zo_denoiser_trains_without_any_gradient_from_the_classifier(tmp_path, tiny_trainer):
    torch.manual_seed(0)
    tripwire = _Tripwire()
    blackbox = BlackBoxClassifier(fn=tripwire)
    denoiser = DnCNN(1, 4, 3)
    before = {n: p.clone() for n, p in denoiser.named_parameters()}
    module = ZODenoisedSmoothing(denoiser, blackbox, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
                                 output_dir=str(tmp_path), **CERT)
    tiny_trainer(max_steps=2).fit(module, DigitsDataModule(batch_size=16))
    assert not any(torch.equal(before[n], p) for n, p in denoiser.named_parameters() if n.endswith("weight"))
    n_params = sum(p.numel() for p in denoiser.parameters())
    # targets: f(x) on 16 clean images, then one image batch per query (CGE + base), per step
    assert blackbox.queries == 2 * 16 * (1 + n_params + 1)
    assert all(p.grad is None for p in tripwire.parameters())
    tiny_trainer().test(module, DigitsDataModule(batch_size=16))
    rows = list(csv.DictReader(open(tmp_path / "certification" / "certify.csv")))
    assert len(rows) == 4 and set(rows[0]) == {"label", "prediction", "radius", "correct", "time"}
    assert (tmp_path / "certification" / "certified_accuracy.png").exists()
    assert set(module.certified) == {0.0, 0.25, 0.5, 0.75}


def test_fo_twin_and_no_denoiser_certify(tmp_path, tiny_trainer):
    torch.manual_seed(0)
    f = MLP(64, (16,), 10)
    fo = FODenoisedSmoothing(DnCNN(1, 4, 3), f, output_dir=str(tmp_path / "fo"), **CERT)
    tiny_trainer(max_steps=2).fit(fo, DigitsDataModule(batch_size=16))
    tiny_trainer().test(fo, DigitsDataModule(batch_size=16))
    none = NoDenoiser(BlackBoxClassifier(fn=f), output_dir=str(tmp_path / "none"), **CERT)
    logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    tiny_trainer(logger=logger).test(none, DigitsDataModule(batch_size=16))
    assert 0.0 in fo.certified and 0.0 in none.certified
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("test/certified_accuracy")) == 1  # the whole curve as one figure


def test_black_box_from_a_lightning_checkpoint(tmp_path, tiny_trainer):
    module = FOClassifier(MLP(64, (8,), 10))
    trainer = tiny_trainer(max_steps=1)
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


class _Payload:
    """Unpickling this object runs a shell command that creates ``marker`` (what a crafted checkpoint can do)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_crafted_checkpoint_runs_nothing_and_is_refused_clearly(tmp_path, tiny_trainer):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": MLP(64, (8,), 10).state_dict(), "hyper_parameters": _Payload(marker)}, crafted)
    with pytest.raises(ValueError, match=r"Refusing to load `checkpoint` '.*crafted\.ckpt'.*could run code"):
        BlackBoxClassifier(model=MLP(64, (8,), 10), checkpoint=str(crafted))
    with pytest.raises(ValueError, match=r"Refusing to load `classifier_checkpoint` '.*crafted\.ckpt'"):
        FODenoisedSmoothing(DnCNN(1, 4, 3), MLP(64, (8,), 10), classifier_checkpoint=str(crafted))
    # Lightning's own resume (`dz fit --ckpt_path`) loads with torch's safe default too
    with pytest.raises(Exception, match="Weights only load failed"):
        tiny_trainer(max_steps=1).fit(FOClassifier(MLP(64, (8,), 10)), DigitsDataModule(batch_size=16),
                                            ckpt_path=str(crafted))
    assert not marker.exists(), "the crafted checkpoint ran its command"
    torch.save({"weights": MLP(64, (8,), 10).state_dict()}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"'state_dict' of tensors.*keys \['weights'\]"):
        BlackBoxClassifier(model=MLP(64, (8,), 10), checkpoint=str(tmp_path / "plain.pt"))


def _nan_classifier(images):
    return torch.full((images.shape[0], 10), float("nan"))


def test_nan_classifier_is_an_error_or_a_counted_abstention_never_a_certificate(tmp_path, tiny_trainer):
    raising = NoDenoiser(BlackBoxClassifier(fn=_nan_classifier), output_dir=str(tmp_path), **CERT)
    with pytest.raises(ValueError, match="non-finite logits"):
        tiny_trainer().test(raising, DigitsDataModule(batch_size=16))
    abstaining = NoDenoiser(BlackBoxClassifier(fn=_nan_classifier), output_dir=str(tmp_path),
                            certify_nonfinite="abstain", **CERT)
    with pytest.warns(UserWarning, match=r"Abstained on 4 of 4 test image\(s\).*non-finite"):
        metrics = tiny_trainer().test(abstaining, DigitsDataModule(batch_size=16))[0]
    assert abstaining.nonfinite_abstains == 4 and metrics["test/nonfinite_abstains"] == 4
    assert metrics["test/abstain_rate"] == 1.0 and all(acc == 0.0 for acc in abstaining.certified.values())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"certify_batch": 0}, "`certify_batch`.* 0"),
    ({"certify_batch": -5}, "`certify_batch`.*-5"),
    ({"max_certified": 0}, "`max_certified`.* 0"),
    ({"max_certified": -1}, "`max_certified`.*-1"),
    ({"num_classes": 1}, "`num_classes`.*>= 2.* 1"),
    ({"certify_nonfinite": "skip"}, "`certify_nonfinite`.*'skip'"),
])
def test_certification_settings_fail_before_any_work(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NoDenoiser(BlackBoxClassifier(fn=lambda x: x), **{**CERT, **kwargs})


def test_empty_test_set_and_bad_labels_are_errors_not_zero_accuracy(tmp_path, tiny_trainer):
    module = NoDenoiser(BlackBoxClassifier(fn=MLP(64, (8,), 10)), output_dir=str(tmp_path), **CERT)
    empty = torch.utils.data.DataLoader(  # one batch of no images
        [0], batch_sampler=[[]], collate_fn=lambda _: (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="No test image was certified"):
        tiny_trainer().test(module, empty)
    negative = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(2, 1, 8, 8),
                                                                           torch.tensor([3, -1])), batch_size=2)
    with pytest.raises(ValueError, match=r"labels in 0\.\.9 \(num_classes=10\).*\[-1\]"):
        tiny_trainer().test(module, negative)


class _NumpyBlackBox:
    """A linear classifier evaluated in NumPy (it cannot run under vmap), counting the images it sees."""

    def __init__(self) -> None:
        import numpy as np

        self.weight = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
        self.images = 0
        self.magnitude = 0.0  # the largest sum of |weight * pixel| behind one logit: the scale of its rounding

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        import numpy as np

        self.images += images.shape[0]
        flat = images.reshape(images.shape[0], -1).numpy()
        self.magnitude = max(self.magnitude, float((np.abs(flat) @ np.abs(self.weight)).max()))
        return torch.from_numpy(flat @ self.weight)


@pytest.mark.parametrize("path", ["rge", "cge_staged", "cge_unstaged", "plain_rge", "plain_cge"])
def test_residual_denoiser_counts_every_black_box_image_on_every_path(path):
    """The black box is the oracle's head: it runs outside vmap on all K * B images, for a residual denoiser (its
    body perturbed, with or without feature reuse) and for a plain one (``plain_*``: the whole denoiser)."""
    import dz_lightning as dz

    torch.manual_seed(0)
    raw = _NumpyBlackBox()
    blackbox = BlackBoxClassifier(fn=raw)
    denoiser = (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 3, padding=1))
                if path.startswith("plain") else DnCNN(1, 2, 3))
    module = ZODenoisedSmoothing(denoiser, blackbox, estimator="rge" if path.endswith("rge") else "cge", max_batch=7,
                                 **CERT)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    oracle = module.make_oracle((x, y))
    oracle.feature_reuse = path != "cge_unstaged"
    assert blackbox.queries == raw.images == 5  # the prediction targets
    params = {n: p.detach() for n, p in module.zo_parameters().items()}
    if path.endswith("rge"):
        est = dz.rge(oracle, params, q=10, chunk=4, generator=torch.Generator().manual_seed(0))
    else:
        est = dz.cge(oracle, params)
    n_params = sum(p.numel() for p in params.values())
    assert est.queries == oracle.queries == (11 if path.endswith("rge") else 1 + n_params)
    assert blackbox.queries == raw.images == 5 + 5 * est.queries
    # the batched losses equal one-at-a-time ones (the head sees the right images for every point)
    name = "0.weight"
    stacked = params[name] + 0.1 * torch.randn(3, *params[name].shape)
    one_by_one = torch.stack([oracle.loss({**params, name: w}) for w in stacked])
    # fp32 images and logits, rounded differently in a batch: the longest accumulation path is the denoiser's
    # convolutions (at most 9 + 18 + 18 products) and the black box's 64-pixel dot product; cross-entropy moves by at
    # most 2x the largest logit change, and a logit's rounding is relative to the magnitudes it sums
    tol = fp32_tolerance(terms=9 + 18 + 18 + 64)
    tol["atol"] *= 2 * raw.magnitude
    torch.testing.assert_close(oracle.losses(params, {name: stacked}), one_by_one, **tol)
    assert blackbox.queries == raw.images == 5 + 5 * (est.queries + 6)


def test_classifier_checkpoint_with_a_wrong_digest_or_truncated_is_named(tmp_path):
    from dz_lightning.tasks.defense import load_state_dict

    from dz_lightning.checkpointing import sha256_file

    path = tmp_path / "classifier.ckpt"
    torch.save({"state_dict": MLP(64, (8,), 10).state_dict()}, path)
    (tmp_path / "classifier.ckpt.sha256").write_text(sha256_file(path) + "\n")
    assert set(load_state_dict(path)) == set(MLP(64, (8,), 10).state_dict())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted or truncated checkpoint"):
        load_state_dict(path)
    (tmp_path / "classifier.ckpt.sha256").unlink()
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ValueError, match="corrupted or truncated checkpoint .*`checkpoint`"):
        load_state_dict(path)


def test_checkpoints_carry_the_denoiser_once_and_the_old_layout_loads():
    """The denoiser is `model`; the trained body is chosen by `zo_parameters()`, not registered a second time."""
    module = ZODenoisedSmoothing(DnCNN(1, 2, 3), BlackBoxClassifier(fn=MLP(64, (8,), 10)), **CERT)
    state = module.state_dict()
    assert all(k.startswith("model.") for k in state) and module.denoiser is module.model
    assert set(module.zo_parameters()) == {n for n, _ in module.model.body.named_parameters()}
    # before: `model.` held the body, `denoiser.` the whole denoiser (the body's weights twice)
    old = {**{"model." + k[11:]: v for k, v in state.items() if k.startswith("model.body.")},
           **{"denoiser." + k[6:]: v + 1 for k, v in state.items()}}
    fresh = ZODenoisedSmoothing(DnCNN(1, 2, 3), BlackBoxClassifier(fn=MLP(64, (8,), 10)), **CERT)
    fresh.load_state_dict(old)
    assert all(torch.equal(fresh.state_dict()[k], v + 1) for k, v in state.items())
    checkpoint = {"state_dict": old}
    fresh.on_load_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(state)


@pytest.mark.parametrize("residual", [True, False])
def test_both_denoiser_oracles_carry_the_module_settings(residual):
    """The plain denoiser's oracle used to drop ``memory_budget`` and ``delta_dtype`` (it built its own)."""
    denoiser = DnCNN(1, 2, 3) if residual else nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(),
                                                             nn.Conv2d(2, 1, 3, padding=1))
    module = ZODenoisedSmoothing(denoiser, BlackBoxClassifier(fn=_NumpyBlackBox()), memory_budget=1 << 20,
                                 delta_dtype="bfloat16", **CERT)
    oracle = module.make_oracle((torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))))
    assert oracle.memory_budget == 1 << 20 and oracle.delta_dtype == "bfloat16"
    assert oracle.feature_reuse is residual  # the plain denoiser's head sees whole images: no feature reuse
