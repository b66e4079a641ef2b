"""ZOModule through the CLI and the Trainer: training, resume, precision, bad configuration."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from dz_lightning.tasks.classification import DigitsDataModule, ZOClassifier
from torch import nn

import dz_lightning as dz
from dz_lightning.cli import build_cli
from dz_lightning.models import MLP


def _config(tmp_path: Path, estimator: str = "rge", **model_args) -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 1,
            "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}],
        },
        "model": {
            "class_path": "dz_lightning.tasks.classification.ZOClassifier",
            "init_args": {
                "model": {"class_path": "dz_lightning.models.MLP", "init_args": {"hidden": [6]}},
                "estimator": estimator, "q": 6, "mu": 0.01,
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9}},
                "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR",
                                 "init_args": {"step_size": 2, "gamma": 0.5}},
                **model_args,
            },
        },
        "data": {"class_path": "dz_lightning.tasks.classification.DigitsDataModule", "init_args": {"batch_size": 32}},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["state_dict"]


@pytest.mark.parametrize("estimator", ["cge", "rge"])
def test_cli_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, estimator):
    straight, split = tmp_path / "straight", tmp_path / "split"
    cfg_a, cfg_b = _config(straight, estimator), _config(split, estimator)
    build_cli(["fit", "--config", str(cfg_a), "--trainer.max_epochs", "4"])
    build_cli(["fit", "--config", str(cfg_b), "--trainer.max_epochs", "2"])
    first_half = _weights(split / "ckpt" / "last.ckpt")
    build_cli(["fit", "--config", str(cfg_b), "--trainer.max_epochs", "4",
               "--ckpt_path", str(split / "ckpt" / "last.ckpt")])
    a, b = _weights(straight / "ckpt" / "last.ckpt"), _weights(split / "ckpt" / "last.ckpt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    assert not all(torch.equal(a[k], first_half[k]) for k in a), "the second half must have trained"
    state = torch.load(straight / "ckpt" / "last.ckpt", weights_only=True)
    # 4 epochs x 3 steps: every step spends (coordinates or directions) + 1 base query
    per_step = 6 + 1 if estimator == "rge" else sum(p.numel() for p in MLP(hidden=(6,)).parameters()) + 1
    assert state["dz_lightning"]["queries_total"] == 12 * per_step
    assert state["lr_schedulers"][0]["last_epoch"] == 12  # stepped every optimizer step


def test_cli_rejects_unknown_estimator_name(tmp_path, capsys):
    cfg = _config(tmp_path, estimator="sge")
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert "estimator" in err and "sge" in err and "cge" in err


def test_print_config_lists_every_model_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        build_cli(["fit", "--config", str(_config(tmp_path)), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("estimator: rge", "mu: 0.01", "difference: forward", "max_queries: null", "nonfinite: raise"):
        assert option in out



def test_sixteen_bit_precision_is_refused_before_training(tiny_trainer):
    module = ZOClassifier(MLP(hidden=(4,)))
    with pytest.raises(ValueError, match="precision='bf16-mixed'.*'32-true', '64-true'"):
        tiny_trainer(precision="bf16-mixed").fit(module, DigitsDataModule(batch_size=16))


class _NaNAfterOneStep(ZOClassifier):
    """Its oracle goes non-finite from the second step on."""

    def make_oracle(self, batch):
        oracle = super().make_oracle(batch)
        if self.global_step >= 1:
            return dz.FunctionOracle(lambda p: float("nan"))
        return oracle


def test_non_finite_loss_never_reaches_the_weights(tiny_trainer):
    module = _NaNAfterOneStep(MLP(hidden=(4,)), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(dz.NonFiniteLossError, match="non-finite loss"):
        tiny_trainer().fit(module, DigitsDataModule(batch_size=16))
    assert module.global_step == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_batchnorm_running_stats_follow_training_and_budget_stops_the_run(tiny_trainer):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    n_params = sum(p.numel() for p in model.parameters())
    module = ZOClassifier(model, max_queries=2 * (n_params + 1), gradient_clip_val=1.0,
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    tiny_trainer(max_steps=10).fit(module, DigitsDataModule(batch_size=16))
    assert module.global_step == 2, "the query budget must stop training after two steps"
    assert int(model[2].num_batches_tracked) == 2, "one plain forward per step updates the BN statistics"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"estimator": "sge"}, "`estimator`.*'cge', 'rge'.*'sge'"),
        ({"mu": 0}, "`mu`.*> 0.*0"),
        ({"q": 0}, "`q`.*>= 1.*0"),
        ({"scheduler_interval": "batch"}, "`scheduler_interval`.*'batch'"),
        ({"gradient_clip_val": -1.0}, "`gradient_clip_val`.*-1.0"),
    ],
)
def test_zo_module_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZOClassifier(MLP(hidden=(4,)), **kwargs)


def test_masks_with_unknown_names_fail_at_the_first_step(tiny_trainer):
    module = ZOClassifier(MLP(hidden=(4,)))
    module.zo_masks = {"conv.weight": torch.ones(3, dtype=torch.bool)}
    with pytest.raises(ValueError, match="`masks` names 'conv.weight'.*valid names"):
        tiny_trainer().fit(module, DigitsDataModule(batch_size=16))


def test_progress_bar_throughput_is_smoothed():
    from dz_lightning.step_logging import Throughput

    meter = Throughput(alpha=0.1)
    assert meter.update(310, 1.0) == pytest.approx(310)  # the first step shows its own rate
    rates = [meter.update(310, 0.0155) for _ in range(5)]  # then steps run 64x faster (2.0e4 queries/s)
    assert all(a < b for a, b in zip(rates, rates[1:], strict=False))  # it climbs ...
    assert rates[0] < 1000 and rates[-1] < 2500  # ... instead of jumping to 2.0e4
    for _ in range(200):
        rate = meter.update(310, 0.0155)
    assert rate == pytest.approx(2.0e4, rel=1e-3)  # and settles on the steady rate


def test_delta_dtype_reaches_the_oracle_and_is_checked():
    module = ZOClassifier(MLP(hidden=(8,)), delta_dtype="bfloat16")
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    assert module.module_oracle(torch.nn.functional.cross_entropy, x, y).delta_dtype == "bfloat16"
    with pytest.raises(ValueError, match="`delta_dtype`.*'float16'"):
        ZOClassifier(MLP(hidden=(8,)), delta_dtype="float16")


class _FrozenEstimate(ZOClassifier):
    """Overrides `estimate`: the step writes whatever it returns (under DDP, summed over the ranks as partials)."""

    def estimate(self, oracle, params):
        share = super().estimate(oracle, params)  # opaque: its queries and base loss, no gradient
        return dz.Estimate({n: torch.zeros_like(p) for n, p in params.items()}, share.queries, share.loss)


def test_a_subclass_estimate_is_what_the_step_writes(tiny_trainer):
    model = MLP(hidden=(4,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = _FrozenEstimate(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    tiny_trainer(max_steps=2).fit(module, DigitsDataModule(batch_size=16))
    assert module.global_step == 2 and module.queries_total == 2 * (sum(p.numel() for p in model.parameters()) + 1)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(not g.any() for g in module.last_estimate.grads.values())


class _HalvedEstimate(ZOClassifier):
    """Post-processes the reduced estimate: what the step writes is half of it."""

    def process_estimate(self, estimate):
        return dz.Estimate({n: g / 2 for n, g in estimate.grads.items()}, estimate.queries, estimate.loss)


def test_a_processed_estimate_is_what_the_step_writes(tiny_trainer):
    grads = {}
    for cls in (ZOClassifier, _HalvedEstimate):
        L.seed_everything(0, verbose=False)
        model = MLP(hidden=(4,))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        module = cls(model, estimator="rge", q=4, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
        tiny_trainer(max_steps=1).fit(module, DigitsDataModule(batch_size=16))
        grads[cls] = module.last_estimate.grads
        assert all(torch.equal(p, before[n].add(grads[cls][n], alpha=-0.5)) for n, p in model.named_parameters())
    assert all(torch.equal(grads[_HalvedEstimate][n], g / 2) for n, g in grads[ZOClassifier].items())


def test_a_step_share_is_opaque_and_required_by_reduce():
    from dz_lightning.step import StepShare

    module = dz.ZOModule(nn.Linear(2, 1), estimator="cge", mu=1e-2)
    w = torch.tensor([1.0, 2.0])
    share = module.zo_plan.estimate(dz.FunctionOracle(lambda p: (p["w"] ** 2).sum()), {"w": w})
    assert isinstance(share, StepShare) and share.queries == 3 and share.loss == 5.0
    assert not hasattr(share, "grads")
    with pytest.raises(TypeError, match="Expected `share` to be a StepShare.*got Estimate"):
        module.zo_plan.reduce({"w": w}, dz.Estimate({"w": w}, 1, 0.0))
    est, _ = module.zo_plan.reduce({"w": w}, StepShare(dz.Estimate({"w": w}, 1, 0.0)))  # a partial: summed as it is
    assert torch.equal(est.grads["w"], w)


def test_modules_follow_the_protocol_the_callbacks_check():
    from dz_lightning.callbacks.zo_grasp import ZOGraSP
    from dz_lightning.tasks.classification import FOClassifier

    from dz_lightning.trainable import ZOTrainable

    assert isinstance(ZOClassifier(MLP(hidden=(4,))), ZOTrainable)
    assert isinstance(FOClassifier(MLP(hidden=(4,))), ZOTrainable)
    assert not isinstance(L.LightningModule(), ZOTrainable)
    with pytest.raises(TypeError, match=r"ZOTrainable.*LightningModule lacks \['zo_parameters', 'zo_masks', 'make_"):
        ZOGraSP(sparsity=0.5, method="uniform").setup(None, L.LightningModule(), "fit")


def test_sharded_training_data_are_recognised_through_the_loader():
    """Every rank must see the same batch: the check reads the loaders' samplers (public API), not the Trainer's."""
    from torch.utils.data import DataLoader, DistributedSampler

    from dz_lightning.module import _loaders, _shards

    data = list(range(8))
    sharded = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    plain = DataLoader(data, batch_size=2)
    assert [_shards(dl) for dl in _loaders({"a": plain, "b": [sharded]})] == [False, True]
    assert list(_loaders(None)) == []


def test_training_forward_updates_batchnorm_only_for_this_modules_networks():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    module = ZOClassifier(model, train_accuracy=False)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    outputs = module.training_forward((x, y), module.make_oracle((x, y)))
    assert outputs.shape == (6, 10) and int(model[2].num_batches_tracked) == 1
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8))
    assert module.training_forward((x, y), dz.ModuleOracle(other, lambda o, t: o.sum(), x, y)) is None
    assert int(other[2].num_batches_tracked) == 0
    assert module.training_forward((x, y), dz.FunctionOracle(lambda p: 0.0)) is None


def test_estimator_settings_have_one_home_in_the_step_plan():
    module = dz.ZOModule(nn.Linear(2, 1), estimator="cge", mu=1e-2)
    module.mu = 0.25  # a user (or a schedule callback) changing the step changes the next estimates
    assert module.zo_plan.mu == 0.25
    w = torch.tensor([1.0, 2.0])
    share = module.zo_plan.estimate(dz.FunctionOracle(lambda p: (p["w"] ** 2).sum()), {"w": w})
    est, _ = module.zo_plan.reduce({"w": w}, share)
    # forward differences of w**2 at step 0.25: 2w + 0.25
    torch.testing.assert_close(est.grads["w"], torch.tensor([2.25, 4.25]))


# ------------------------------------------------------------------- resume keeps the run's settings (issue 28)
def test_max_queries_holds_across_resumes(tiny_trainer, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt=None) -> ZOClassifier:
        torch.manual_seed(0)
        module = ZOClassifier(MLP(hidden=(4,)), estimator="rge", q=4, max_queries=12,
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        tiny_trainer(default_root_dir=str(tmp_path), max_steps=50, limit_train_batches=3,
                     callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(
            module, DigitsDataModule(batch_size=16), ckpt_path=ckpt)
        return module

    first = run()
    assert first.global_step == 3 and first.queries_total == 15  # 5 queries a step: stops once 12 are spent
    with pytest.warns(UserWarning, match=r"max_queries=12 is already spent \(15 queries"):
        again = run(tmp_path / "last.ckpt")
    assert again.global_step == 3 and again.queries_total == 15  # was: one more step (20 queries) per resume


def test_resuming_a_masked_run_without_the_mask_callback_is_refused(tiny_trainer, tmp_path):
    from dz_lightning.callbacks.zo_grasp import ZOGraSP
    from lightning.pytorch.callbacks import ModelCheckpoint

    def module() -> ZOClassifier:
        torch.manual_seed(0)
        return ZOClassifier(MLP(hidden=(16,)), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))

    tiny_trainer(default_root_dir=str(tmp_path), max_epochs=1, limit_train_batches=2,
                 callbacks=[ZOGraSP(sparsity=0.9, method="uniform"), ModelCheckpoint(dirpath=tmp_path, save_last=True)]
                 ).fit(module(), DigitsDataModule(batch_size=16))
    trainer = tiny_trainer(default_root_dir=str(tmp_path / "b"), max_epochs=2, limit_train_batches=2)
    with pytest.raises(ValueError, match=r"trained with gradient masks \(density 0\.09\d+.*nothing set `zo_masks`"):
        trainer.fit(module(), DigitsDataModule(batch_size=16), ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 2  # restored, and not a single dense step taken
    # the weights of that run, trained anew (load_from_checkpoint, no ckpt_path): dense training is what is asked for
    fresh = ZOClassifier.load_from_checkpoint(tmp_path / "last.ckpt", model=MLP(hidden=(16,)),
                                              optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = tiny_trainer(default_root_dir=str(tmp_path / "c"), max_epochs=1, limit_train_batches=2)
    trainer.fit(fresh, DigitsDataModule(batch_size=16))
    assert trainer.global_step == 2
