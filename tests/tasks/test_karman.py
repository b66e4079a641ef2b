"""The Karman wake solver: batched simulations, the inflow mask, input checks, reference data."""

from __future__ import annotations

import warnings

import pytest
import torch
from dz_lightning.tasks.karman import KarmanSolver, generate_reference, initial_state

RES = (8, 16)


def test_batched_simulations_equal_one_at_a_time():
    torch.manual_seed(0)
    solver = KarmanSolver(RES)
    u = 0.1 * torch.randn(3, 2, *RES)
    re = torch.tensor([100.0, 200.0, 400.0])
    batched = solver(u, re)
    single = torch.cat([solver(u[i : i + 1], re[i : i + 1]) for i in range(3)])
    assert batched.shape == (3, 2, *RES) and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], batched[2])  # the Reynolds number reaches the solver per simulation


def test_inflow_mask_is_a_strip_not_the_whole_domain():
    solver = KarmanSolver(RES)
    values = solver.inflow.values
    assert float(values.min) == 0.0 and float(values.max) == 1.0


def test_black_box_step_has_no_autograd_and_the_differentiable_one_does():
    u = initial_state(1, RES).requires_grad_()
    re = torch.tensor([150.0])
    assert not KarmanSolver(RES)(u, re).requires_grad
    out = KarmanSolver(RES, differentiable=True)(u, re)
    assert out.requires_grad and out.abs().sum() > 0  # the inflow starts the flow from rest


@pytest.mark.parametrize("differentiable", [False, True], ids=["black_box", "differentiable"])
def test_solver_silences_only_phiflow_notices_and_keeps_user_warnings_visible(differentiable, monkeypatch):
    from phi.torch.flow import fluid

    re = torch.tensor([150.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning is recorded unless the solver's own filters silence it
        # a configuration of its own: solvers of one configuration share their compiled step, which another test
        # may have traced for these shapes already
        solver = KarmanSolver(RES, differentiable=differentiable, cg_tolerance=1.01e-4)
        for _ in range(2):  # the first call traces the black box's step, the second reuses it
            u = initial_state(1, RES).requires_grad_(differentiable)
            out = solver(u, re)
            if differentiable:
                out.square().sum().backward()  # the adjoint solve's notices are silenced too
        assert [str(w.message) for w in caught] == []
        inner = fluid.make_incompressible

        def make_incompressible_that_warns(*args, **kwargs):
            warnings.warn("a warning from inside the step", RuntimeWarning, stacklevel=1)
            return inner(*args, **kwargs)

        monkeypatch.setattr(fluid, "make_incompressible", make_incompressible_that_warns)
        solver(initial_state(2, RES), re.expand(2))  # a first call for this shape: the black box traces its step
        warnings.warn("the user's own warning", UserWarning, stacklevel=1)
        warnings.warn("`torch.jit.trace` is deprecated (the user's own tracing)", FutureWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    inside = messages.count("a warning from inside the step")  # phiml's jit may run the step more than once to trace
    assert inside >= 1 and messages[inside:] == [
        "the user's own warning", "`torch.jit.trace` is deprecated (the user's own tracing)"]


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match=r"Y = 2 X.*\(8, 12\)"):
        KarmanSolver((8, 12))
    with pytest.raises(ValueError, match=r"\(N, 2, 8, 16\).*\(1, 2, 4, 8\)"):
        KarmanSolver(RES)(torch.zeros(1, 2, 4, 8), torch.tensor([100.0]))


def test_reference_is_downsampled_and_split():
    data = generate_reference([100.0], [300.0], RES, factor=2, warmup=1, steps=2)
    assert data["train"].shape == (1, 3, 2, *RES) and data["test"].shape == (1, 3, 2, *RES)
    assert data["train_re"].tolist() == [100.0] and data["test_re"].tolist() == [300.0]
    assert torch.isfinite(data["train"]).all() and data["train"].abs().max() > 0


def _fake_reference(train_re, test_re, resolution, factor, warmup, steps):
    """Stands in for the PhiFlow run: deterministic data of the right shapes, and a count of the runs."""
    _fake_reference.runs += 1
    n, m = len(train_re), len(test_re)
    traj = torch.arange(float((n + m) * (steps + 1) * 2 * resolution[0] * resolution[1]))
    traj = traj.reshape(n + m, steps + 1, 2, *resolution)
    re = torch.tensor(list(train_re) + list(test_re))
    return {"train": traj[:n], "test": traj[n:], "train_re": re[:n], "test_re": re[n:]}


@pytest.mark.parametrize(("damage", "reason"), [
    ("truncate", "truncated or corrupted"),
    ("nan", "NaN or infinite"),
    ("resolution", r"shape \(1, 4, 2, 4, 8\), expected \(1, 4, 2, 8, 16\)"),
    ("meta", "meta.json .* does not describe this data set"),
    ("flip", r"corrupted \(the zip CRC of its member .*data/0"),
])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, monkeypatch, damage, reason):
    from dz_lightning.tasks import karman

    _fake_reference.runs = 0
    monkeypatch.setattr(karman, "generate_reference", _fake_reference)
    args = (str(tmp_path), [100.0], [123.4], RES)
    first = karman.load_or_generate(*args, factor=2, warmup=2, steps=3)
    assert _fake_reference.runs == 1
    karman.load_or_generate(*args, factor=2, warmup=2, steps=3)
    assert _fake_reference.runs == 1  # a good cache is reused (float32 Reynolds numbers included)
    (folder,) = tmp_path.glob("karman_*")
    data = folder / "data.pt"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "nan":
        torch.save({**first, "train": torch.full_like(first["train"], float("nan"))}, data)
    elif damage == "resolution":
        torch.save({**first, "train": first["train"][..., ::2, ::2]}, data)
    elif damage == "flip":  # an exponent bit of one test value: finite, 2^64 times larger; torch.load reads it
        raw = bytearray(data.read_bytes())
        at = bytes(raw).index(first["test"].flatten()[7:9].numpy().tobytes()) + 3
        raw[at] ^= 0x20
        data.write_bytes(bytes(raw))
        assert torch.isfinite(torch.load(data, weights_only=True)["test"]).all()  # was: used as it is
    else:
        (folder / "meta.json").write_text((folder / "meta.json").read_text().replace('"steps": 3', '"steps": 4'))
    with pytest.warns(RuntimeWarning, match=rf"Rebuilding the Karman cache '.*data\.pt': .*{reason}"):
        again = karman.load_or_generate(*args, factor=2, warmup=2, steps=3)
    assert _fake_reference.runs == 2 and torch.equal(again["train"], first["train"])
    assert torch.equal(karman.load_or_generate(*args, factor=2, warmup=2, steps=3)["train"], first["train"])


def test_cache_writers_use_unique_temporary_names(tmp_path, monkeypatch):
    from dz_lightning.tasks import karman

    _fake_reference.runs = 0
    monkeypatch.setattr(karman, "generate_reference", _fake_reference)
    written = []
    save = torch.save
    monkeypatch.setattr(karman.torch, "save", lambda obj, path: (written.append(str(path)), save(obj, path)))
    karman.load_or_generate(str(tmp_path / "a"), [100.0], [150.0], RES, factor=2, warmup=2, steps=3)
    karman.load_or_generate(str(tmp_path / "b"), [100.0], [150.0], RES, factor=2, warmup=2, steps=3)
    names = [p.rsplit("/", 1)[1] for p in written]
    assert len(set(names)) == 2 and all(n.startswith(".data.pt.") and n.endswith(".tmp") for n in names)
    assert not list(tmp_path.rglob("*.tmp"))  # renamed into place, nothing left behind


def test_sol_study_removes_its_scratch_folder_even_when_it_fails(monkeypatch):
    from pathlib import Path

    from benchmarks import sol_study

    roots = []

    def failing_study(argv, root):
        roots.append(Path(root))
        (Path(root) / "lightning_logs").mkdir()
        raise RuntimeError("a method diverged")

    monkeypatch.setattr(sol_study, "_study", failing_study)
    with pytest.raises(RuntimeError, match="diverged"):
        sol_study.main([])
    assert roots and not roots[0].exists()


def test_a_cache_dir_that_is_a_file_fails_before_any_simulation(tmp_path, monkeypatch):
    from dz_lightning.tasks import karman
    from dz_lightning.tasks.sol import KarmanDataModule

    _fake_reference.runs = 0
    monkeypatch.setattr(karman, "generate_reference", _fake_reference)
    blocker = tmp_path / "cache"
    blocker.write_text("a file")
    with pytest.raises(ValueError, match=r"`cache_dir` to be a folder .*cache' is a file"):
        KarmanDataModule(cache_dir=str(blocker))
    with pytest.raises(ValueError, match=r"cache' is a file above it: '.*cache/karman'"):
        KarmanDataModule(cache_dir=str(blocker / "karman"))
    with pytest.raises(ValueError, match="is a file"):
        karman.load_or_generate(str(blocker), [100.0], [150.0], RES, factor=2, warmup=2, steps=3)
    assert _fake_reference.runs == 0  # was: the data generated, then NotADirectoryError


def test_karman_data_module_batch_size_is_checked():
    from dz_lightning.tasks.sol import KarmanDataModule

    with pytest.raises(ValueError, match="`batch_size`.*-2"):
        KarmanDataModule(batch_size=-2)


def test_first_generation_says_what_where_and_once_with_a_progress_bar(tmp_path, capsys, caplog):
    import logging

    from dz_lightning.tasks.karman import load_or_generate

    args = (str(tmp_path), [100.0], [150.0], RES)
    with caplog.at_level(logging.INFO):
        load_or_generate(*args, factor=1, warmup=2, steps=3)
    (line,) = [r.getMessage() for r in caplog.records if "Karman reference" in r.getMessage()]
    assert "2 simulations of 2 + 3 steps" in line and str(tmp_path) in line and "once" in line
    assert "5/5" in capsys.readouterr().err  # the bar counts the solver steps
    caplog.clear()
    with caplog.at_level(logging.INFO):
        load_or_generate(*args, factor=1, warmup=2, steps=3)
    assert not caplog.records and "5/5" not in capsys.readouterr().err  # cached: silent


def _resident_mb() -> float:
    import os
    from pathlib import Path

    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        pytest.skip("needs /proc (Linux) to read the resident memory")


def test_solvers_of_one_configuration_share_one_compiled_step_and_memory_stays_flat():
    """torch.jit keeps every trace for the life of the process: a step compiled per solver grew RSS ~10 MB each."""
    u, re = 0.1 * torch.randn(2, 2, 8, 16), torch.full((2,), 150.0)
    first = KarmanSolver((8, 16))
    expected = first(u, re)
    before = _resident_mb()
    for _ in range(6):
        solver = KarmanSolver((8, 16))
        assert solver._jit is first._jit
        torch.testing.assert_close(solver(u, re), expected, rtol=0, atol=0)
    assert _resident_mb() - before < 15  # was about 6 x 10 MB
    assert KarmanSolver((8, 16), cg_tolerance=1e-5)._jit is not first._jit  # another configuration, its own step
    assert KarmanSolver((16, 32))._jit is not first._jit


def test_a_solver_built_under_fake_tensors_keeps_its_step_to_itself():
    """Its geometry holds fake tensors: a step shared with real solvers would carry them into every later call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = KarmanSolver((8, 16), cg_tolerance=2e-4)
    real = KarmanSolver((8, 16), cg_tolerance=2e-4)
    assert real._jit is not fake._jit
    u, re = 0.1 * torch.randn(2, 2, 8, 16), torch.full((2,), 150.0)
    assert torch.isfinite(real(u, re)).all()
