"""Solver-in-the-loop: batched black-box queries, data caching, the four methods end to end on a tiny grid."""

from __future__ import annotations

import dz_lightning.tasks.karman as karman
import lightning as L
import pytest
import torch
from dz_lightning.callbacks.zo_grasp import ZOGraSP
from dz_lightning.tasks.karman import KarmanSolver, load_or_generate
from dz_lightning.tasks.sol import FOSOL, ZOSOL, FOSOLSparse, KarmanDataModule, NONCorrector, SOLOracle, SourceOnly

from dz_lightning.models import SOLCorrector

RES = (8, 16)
DATA = {"resolution": RES, "factor": 2, "train_re": (100.0, 200.0), "test_re": (150.0,), "warmup": 3, "steps": 6,
        "window": 2, "batch_size": 2}


@pytest.fixture
def data(tmp_path):
    return KarmanDataModule(cache_dir=str(tmp_path / "cache"), **DATA)



def test_batched_perturbations_equal_one_at_a_time(data):
    data.setup()
    torch.manual_seed(0)
    corrector = SOLCorrector(width=3)
    torch.nn.init.normal_(corrector[-1].weight, std=0.01)
    windows, re = next(iter(data.train_dataloader()))
    oracle = SOLOracle(corrector, KarmanSolver(RES), windows, re, max_batch=8)
    params = dict(corrector.named_parameters())
    name = "2.weight"
    stacked = params[name].detach() + 0.01 * torch.randn(5, *params[name].shape)
    batched = oracle.losses(params, {name: stacked})
    single = torch.stack([oracle.loss({**params, name: w}) for w in stacked])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-7)
    assert len(set(batched.tolist())) == 5


def test_first_solver_step_runs_once_per_batch(data):
    """Every query starts from the same reference states, so the uncorrected first step is shared."""
    data.setup()
    windows, re = next(iter(data.train_dataloader()))
    solver, calls = KarmanSolver(RES), []

    def counting(u, r):
        calls.append(u.shape[0])
        return solver(u, r)

    corrector = SOLCorrector(width=2)
    oracle = SOLOracle(corrector, counting, windows, re, max_batch=8)
    params = {n: p.detach() for n, p in corrector.named_parameters()}
    oracle.loss(params)
    oracle.losses(params, {"2.bias": params["2.bias"] + 0.01 * torch.randn(3, 2)})
    b, m = windows.shape[0], windows.shape[1] - 1
    assert calls == [b] + [b] * (m - 1) + [3 * b] * (m - 1)


def test_black_box_cge_matches_backprop_through_the_differentiable_solver(data):
    """CGE through the jit-compiled black-box solver agrees with autograd through the eager differentiable one.

    Checked at the settings ZO-SOL uses: forward differences with a small ``mu`` (the loss is deterministic, so a
    small step costs no noise) and central differences.
    """
    import torch.nn.functional as F
    from dz_lightning.tasks.sol import corrector_input

    import dz_lightning as dz

    data.setup()
    torch.manual_seed(0)
    corrector = SOLCorrector(width=2)
    torch.nn.init.normal_(corrector[-1].weight, std=0.01)
    windows, re = next(iter(data.train_dataloader()))
    solver = KarmanSolver(RES, differentiable=True)
    u, loss = windows[:, 0], 0.0
    for step in range(1, windows.shape[1]):
        u = solver(u, re)
        u = u + corrector(corrector_input(u, re))
        loss = loss + F.mse_loss(u, windows[:, step])
    (loss / (windows.shape[1] - 1)).backward()
    exact = torch.cat([p.grad.flatten() for p in corrector.parameters()])
    params = {n: p.detach() for n, p in corrector.named_parameters()}
    oracle = SOLOracle(corrector, KarmanSolver(RES), windows, re)
    torch.testing.assert_close(oracle.loss(params), loss.detach() / (windows.shape[1] - 1), rtol=1e-4, atol=0)

    def cosine(**kw) -> float:
        grads = dz.cge(oracle, params, **kw).grads
        return F.cosine_similarity(torch.cat([grads[n].flatten() for n in params]), exact, 0).item()

    assert cosine(mu=1e-4, difference="forward") > 0.99
    assert cosine(mu=5e-3, difference="central") > 0.99


def test_reference_data_are_cached_and_reused(tmp_path, monkeypatch):
    first = load_or_generate(str(tmp_path), [100.0], [150.0], RES, factor=2, warmup=2, steps=3)
    assert first["train"].shape == (1, 4, 2, *RES) and torch.isfinite(first["train"]).all()
    (meta,) = tmp_path.glob("karman_*/meta.json")
    assert '"steps": 3' in meta.read_text()
    monkeypatch.setattr(karman, "generate_reference", lambda *a, **k: pytest.fail("regenerated"))
    again = load_or_generate(str(tmp_path), [100.0], [150.0], RES, factor=2, warmup=2, steps=3)
    assert torch.equal(first["train"], again["train"])


def test_longer_test_sequences_are_cached_on_their_own(tmp_path):
    short = KarmanDataModule(cache_dir=str(tmp_path), **DATA)
    long = KarmanDataModule(cache_dir=str(tmp_path), **{**DATA, "test_steps": 9})
    short.setup()
    long.setup()
    assert long.data["test"].shape == (1, 10, 2, *RES) and short.data["test"].shape == (1, 7, 2, *RES)
    assert torch.equal(long.data["train"], short.data["train"])
    # the same simulation run on its own: its first 6 steps agree with the joint run's
    torch.testing.assert_close(long.data["test"][:, :7], short.data["test"], rtol=0, atol=1e-5)
    assert len(list(tmp_path.glob("karman_*/meta.json"))) == 3  # train + test, the longer test, validation
    (traj, re), = list(long.test_dataloader())
    assert traj.shape[1] == 10
    with pytest.raises(ValueError, match="test_steps=0"):
        KarmanDataModule(test_steps=0)


def test_all_four_methods_train_and_evaluate(data, tmp_path, tiny_trainer):
    results = {"src": tiny_trainer().test(SourceOnly(RES), data, verbose=False)[0]["test/mae"]}
    adam = lambda p: torch.optim.Adam(p, lr=1e-3)  # noqa: E731
    zo = ZOSOL(SOLCorrector(width=3), resolution=RES, optimizer=adam)
    tiny_trainer(max_steps=2, callbacks=[ZOGraSP(sparsity=0.5, method="uniform")]).fit(zo, data)
    assert zo.queries_total > 0 and all(torch.isfinite(p).all() for p in zo.parameters())
    for name, module in (("zo", zo), ("non", NONCorrector(SOLCorrector(width=3), RES, adam)),
                         ("fo", FOSOL(SOLCorrector(width=3), RES, adam))):
        if name != "zo":
            tiny_trainer(max_steps=2).fit(module, data)
        results[name] = tiny_trainer().test(module, data, verbose=False)[0]["test/mae"]
    assert all(v > 0 for v in results.values())
    assert (tmp_path / "vorticity_ZOSOL.png").exists() and (tmp_path / "mae_over_time_ZOSOL.png").exists()


def test_test_run_logs_vorticity_panels_and_mae_over_time(data, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)
    trainer = L.Trainer(accelerator="cpu", logger=logger, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.test(NONCorrector(SOLCorrector(width=3), RES), data, verbose=False)
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert {"test/vorticity", "test/mae_over_time"} <= set(acc.Tags()["images"])
    panels = acc.Images("test/vorticity")[0]
    assert panels.width > panels.height * 0.9  # three tall panels and a colorbar side by side


class _DivergesUnderPerturbation(KarmanSolver):
    """Returns NaN for every batch larger than the unperturbed one: each perturbed query "diverges"."""

    def __call__(self, u, re):
        if u.shape[0] > DATA["batch_size"]:
            return u * float("nan")
        return super().__call__(u, re)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_a_diverging_query_never_reaches_the_weights(data, tmp_path, nonfinite, tiny_trainer):
    import dz_lightning as dz

    zo = ZOSOL(SOLCorrector(width=1, depth=2), resolution=RES, nonfinite=nonfinite,
               optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    zo.solver = _DivergesUnderPerturbation(RES)
    before = {n: p.clone() for n, p in zo.named_parameters()}
    if nonfinite == "skip":
        with pytest.warns(RuntimeWarning, match="Skipped .* non-finite"):
            tiny_trainer(max_steps=1).fit(zo, data)
    else:
        with pytest.raises(dz.NonFiniteLossError, match="non-finite loss"):
            tiny_trainer(max_steps=1).fit(zo, data)
    assert all(torch.equal(before[n], p) for n, p in zo.named_parameters())


def test_bad_resolution_and_window():
    with pytest.raises(ValueError, match=r"Y = 2 X.*\(8, 8\)"):
        KarmanSolver((8, 8))
    with pytest.raises(ValueError, match="window=5, steps=5"):
        KarmanDataModule(window=5, steps=5)


@pytest.mark.parametrize("cls", [NONCorrector, FOSOL])
def test_backprop_baselines_take_a_per_step_scheduler(cls):
    module = cls(SOLCorrector(width=1, depth=2), RES, optimizer=lambda p: torch.optim.Adam(p, lr=1.0),
                 lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 4))
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    assert config["lr_scheduler"]["scheduler"].optimizer is config["optimizer"]
    assert isinstance(cls(SOLCorrector(width=1, depth=2), RES).configure_optimizers(), torch.optim.Adam)


def test_fo_gradient_is_exact_at_a_trained_corrector(data):
    """FO-SOL's gradient equals central-difference CGE where the loss is small (a trained corrector).

    The targets are the corrector's own rollout plus a 1e-3 offset, so the loss is ~1e-6, as after training: the
    adjoint pressure solve's right-hand side is then far below the forward solve's absolute tolerance, and an
    adjoint solve that inherited it stopped at once (cosine 0.998, norm -11% before the fix).
    """
    import torch.nn.functional as F
    from dz_lightning.tasks.sol import corrector_input

    import dz_lightning as dz

    data.setup()
    torch.manual_seed(0)
    corrector = SOLCorrector(width=2)
    torch.nn.init.normal_(corrector[-1].weight, std=0.01)
    start, re = data.data["train"][:, 0], data.data["train_re"]
    black_box, differentiable = KarmanSolver(RES), KarmanSolver(RES, differentiable=True)
    with torch.no_grad():
        states, u = [start], start
        for _ in range(3):
            u = black_box(u, re)
            u = u + corrector(corrector_input(u, re))
            states.append(u)
        target = torch.stack(states, 1)
        target[:, 1:] += 1e-3 * torch.randn(target[:, 1:].shape, generator=torch.Generator().manual_seed(1))
    u, loss = start, 0.0
    for step in range(1, target.shape[1]):
        u = differentiable(u, re)
        u = u + corrector(corrector_input(u, re))
        loss = loss + F.mse_loss(u, target[:, step])
    loss = loss / (target.shape[1] - 1)
    assert loss.item() < 1e-5
    loss.backward()
    exact = torch.cat([p.grad.flatten() for p in corrector.parameters()])
    params = {n: p.detach() for n, p in corrector.named_parameters()}
    grads = dz.cge(SOLOracle(corrector, black_box, target, re), params, mu=1e-3, difference="central").grads
    estimate = torch.cat([grads[n].flatten() for n in params])
    assert F.cosine_similarity(estimate, exact, 0).item() >= 0.9999
    assert exact.norm().item() == pytest.approx(estimate.norm().item(), rel=2e-3)


def test_validation_simulations_are_held_out_from_test(tmp_path):
    data = KarmanDataModule(cache_dir=str(tmp_path), **DATA, val_re=(120.0, 180.0))
    data.setup()
    (val, val_re), = list(data.val_dataloader())
    (test, test_re), = list(data.test_dataloader())
    assert val_re.tolist() == [120.0, 180.0] and test_re.tolist() == [150.0]
    assert val.shape == (2, DATA["steps"] + 1, 2, *RES) and torch.isfinite(val).all()
    assert not set(val_re.tolist()) & set(test_re.tolist()) and not set(val_re.tolist()) & set(DATA["train_re"])
    with pytest.raises(ValueError, match=r"disjoint from the test ones.*val_re=\(150.0,\)"):
        KarmanDataModule(**{**DATA, "val_re": (150.0,)})
    with pytest.raises(ValueError, match="val_re=()"):
        KarmanDataModule(**{**DATA, "val_re": ()})


def test_checkpoints_carry_the_corrector_once_and_the_old_layout_loads():
    zo = ZOSOL(SOLCorrector(width=2, depth=2), resolution=RES)
    state = zo.state_dict()
    assert state and all(k.startswith("model.") for k in state)  # no second copy under `corrector.`
    assert zo.corrector is zo.model
    old = {**{k: v + 1 for k, v in state.items()}, **{"corrector." + k[6:]: v + 1 for k, v in state.items()}}
    fresh = ZOSOL(SOLCorrector(width=2, depth=2), resolution=RES)
    fresh.load_state_dict(old)  # the layout that stored the corrector twice
    assert all(torch.equal(fresh.state_dict()[k], v + 1) for k, v in state.items())
    checkpoint = {"state_dict": old}
    fresh.on_load_checkpoint(checkpoint)  # what Trainer(ckpt_path=...) and load_from_checkpoint call first
    assert set(checkpoint["state_dict"]) == set(state)


class _StepRecorder(L.Callback):
    """The masks and gradients each optimizer step uses (read just before the step)."""

    def __init__(self) -> None:
        self.masks: list[dict[str, torch.Tensor]] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.masks.append({n: m.clone() for n, m in pl_module.zo_masks.items()})
        self.grads.append({n: p.grad.clone() for n, p in pl_module.zo_parameters().items()})


def test_fo_sol_sparse_masks_the_exact_gradient_as_zo_sol_masks_its_estimate(data, tiny_trainer):
    """The control steps with ZO-SOL's own masks (same callback settings and seed): exact inside, zero outside."""
    adam = lambda p: torch.optim.Adam(p, lr=1e-3)  # noqa: E731
    recorders = {}
    for name, cls in (("zo", ZOSOL), ("fo_sparse", FOSOLSparse)):
        L.seed_everything(0, verbose=False)
        module = cls(SOLCorrector(width=2, depth=2), resolution=RES, optimizer=adam)
        recorders[name] = _StepRecorder()
        grasp = ZOGraSP(sparsity=0.5, method="uniform", resample_every_n_steps=1, seed=5)
        tiny_trainer(max_steps=3, callbacks=[grasp, recorders[name]]).fit(module, data)
    zo, fo = recorders["zo"], recorders["fo_sparse"]
    assert len(zo.masks) == len(fo.masks) == 3
    first, second = fo.masks[0].values(), fo.masks[1].values()
    assert any(not torch.equal(a, b) for a, b in zip(first, second, strict=True))  # redrawn every step
    for step in range(3):
        assert zo.masks[step].keys() == fo.masks[step].keys() == {"0.weight", "2.weight"}
        for n, mask in fo.masks[step].items():
            assert torch.equal(mask, zo.masks[step][n])
            assert torch.count_nonzero(fo.grads[step][n][~mask]) == 0
        # the zero-initialized output layer: its gradient is nonzero from the start (the first layer's once it moved)
        assert torch.count_nonzero(fo.grads[step]["2.weight"][fo.masks[step]["2.weight"]]) > 0
        assert torch.count_nonzero(fo.grads[step]["2.bias"]) == 2  # biases have no mask: dense, as under CGE


def test_fo_sol_sparse_mask_zeroes_only_the_masked_out_coordinates(data):
    """One step by hand: the masked gradient is the FO gradient times the mask, bit for bit."""
    data.setup()
    batch = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    dense, sparse = FOSOL(SOLCorrector(width=2, depth=2), RES), FOSOLSparse(SOLCorrector(width=2, depth=2), RES)
    sparse.corrector.load_state_dict(dense.corrector.state_dict())
    for m in (dense, sparse):
        m.log = lambda *a, **k: None
        m.training_step(batch, 0).backward()
    sparse.on_after_backward()  # no masks yet: nothing changes
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(dense.parameters(), sparse.parameters(), strict=True))
    masks = {"0.weight": torch.rand(sparse.corrector[0].weight.shape) < 0.3}
    sparse.zo_masks = masks
    sparse.on_after_backward()
    torch.testing.assert_close(sparse.corrector[0].weight.grad, dense.corrector[0].weight.grad * masks["0.weight"],
                               rtol=0, atol=0)
    assert torch.equal(sparse.corrector[2].weight.grad, dense.corrector[2].weight.grad)


def test_zo_grasp_on_the_sol_corrector_freezes_no_layer(data, tiny_trainer):
    """The zero-initialized output layer scores 0 under GraSP: it gets the global ratio, with a warning."""
    zo = ZOSOL(SOLCorrector(width=2, depth=2), resolution=RES, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    grasp = ZOGraSP(sparsity=0.75, method="zo_grasp", resample_every_n_steps=1, seed=0, samples_per_class=2, q=8)
    with pytest.warns(UserWarning, match=r"GraSP cannot score \[.*'2.weight'\].*global ratio 0.75"):
        tiny_trainer(max_steps=1, callbacks=[grasp]).fit(zo, data)
    assert set(grasp.ratios) == {"0.weight", "2.weight"} and all(r < 1 for r in grasp.ratios.values())
    assert grasp.ratios["2.weight"] == 0.75
    assert all(m.any() for m in zo.zo_masks.values())  # every layer keeps coordinates to train
