"""Forward parallelization: coordinate splits, and 2-rank CPU DDP runs against one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dz_lightning as dz
from dz_lightning.distributed import CostTable, RankFailedError, all_reduce_step, query_costs, split_coordinates
from dz_lightning.models import resnet20
from dz_lightning.step import RecordingOracle, ReplayOracle, StepPlan

WORKER = Path(__file__).with_name("ddp_worker.py")
COLLECTIVE_WORKER = Path(__file__).with_name("collective_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def test_split_covers_everything_once_and_balances_cost():
    index = {"a": torch.arange(10), "b": torch.arange(100, 130), "c": torch.arange(5)}
    costs = {"a": 6.0, "b": 1.0, "c": 0.5}
    parts = [split_coordinates(index, r, 3, costs) for r in range(3)]
    for name in index:
        merged = torch.cat([p[name] for p in parts])
        assert torch.equal(merged, index[name])  # disjoint, complete, in order
    loads = [sum(costs[n] * p[n].numel() for n in index) for p in parts]
    assert max(loads) - min(loads) <= 6.0  # within one (most expensive) coordinate
    assert split_coordinates(index, 0, 1) == index
    with pytest.raises(ValueError, match="rank=3, world_size=3"):
        split_coordinates(index, 3, 3)


def test_query_costs_fall_towards_the_output():
    costs = query_costs(resnet20(), torch.zeros(2, 3, 32, 32))
    assert costs["stem.0.weight"] > costs["blocks.4.conv1.weight"] > costs["blocks.8.conv2.weight"] > 0
    assert costs["head.2.weight"] < 0.05


def _loads(parts, true_cost):
    return [sum(true_cost[n] * p[n].numel() for n in p) for p in parts]


def test_cost_table_moves_the_split_towards_balance_with_fake_timings():
    """The prior says every coordinate costs the same; the (fake) clock says ``a`` is 8x dearer than ``b``."""
    index = {"a": torch.arange(200), "b": torch.arange(600), "c": torch.arange(0)}
    true_cost = {"a": 8e-3, "b": 1e-3, "c": 5e-3}
    tables = [CostTable({"a": 1.0, "b": 1.0, "c": 1.0}, momentum=0.5) for _ in range(2)]  # one per rank
    ratios = []
    for _ in range(6):
        parts = [tables[r].split(index, r, 2) for r in range(2)]
        for name in index:  # every coordinate once, in order
            assert torch.equal(torch.cat([p[name] for p in parts]), index[name])
        loads = _loads(parts, true_cost)
        ratios.append(max(loads) / min(loads))
        # each rank times its own share; the all-reduce sums them; every rank updates from the same sums
        seconds = {n: sum(true_cost[n] * p[n].numel() for p in parts) for n in index}
        counts = {n: float(sum(p[n].numel() for p in parts)) for n in index}
        for table in tables:
            table.update(seconds, counts)
    assert ratios[0] > 2.0  # the static prior is far off: rank 0 does most of the work
    assert ratios[-1] < 1.02  # measured costs balance the ranks to within a coordinate or so
    assert tables[0].costs() == tables[1].costs()
    costs = tables[0].costs()
    assert costs["a"] == pytest.approx(8e-3) and costs["b"] == pytest.approx(1e-3)
    # "c" was never evaluated (no coordinates): it keeps its prior, converted to seconds by the fitted scale
    assert costs["c"] == pytest.approx(1.0 * (8e-3 + 1e-3) / 2)


def test_cost_table_moving_average_and_unmeasured_parameters():
    table = CostTable({"a": 2.0, "b": 1.0}, momentum=0.25)
    assert table.costs() == {"a": 2.0, "b": 1.0}  # before any measurement: the prior itself
    table.update({"a": 4.0}, {"a": 2.0, "b": 0.0})  # "b" not evaluated this step
    assert table.costs() == {"a": 2.0, "b": 1.0}  # first measurement replaces the prior; b scaled by 2.0/2.0
    table.update({"a": 12.0, "b": 3.0}, {"a": 2.0, "b": 1.0})
    assert table.costs() == {"a": pytest.approx(0.75 * 2.0 + 0.25 * 6.0), "b": 3.0}
    table.update({"a": float("nan")}, {"a": 1.0})  # a broken measurement is ignored
    assert table.costs()["a"] == pytest.approx(3.0) and table.updates == 3
    table.update({"a": 300.0}, {"a": 1.0})  # one disturbed step counts at most 4x the current estimate
    assert table.costs()["a"] == pytest.approx(0.75 * 3.0 + 0.25 * 12.0)
    with pytest.raises(ValueError, match="momentum"):
        CostTable(momentum=0.0)
    with pytest.raises(ValueError, match="prior"):
        CostTable({"a": 0.0})


def test_cost_table_survives_a_checkpoint(tmp_path):
    """A resumed run splits like the interrupted one: the module saves its table and every rank loads the same."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    module = dz.ZOModule(model)
    module.zo_costs = {"0.weight": 3.0, "0.bias": 1.0, "2.weight": 1.0, "2.bias": 1.0}
    module.zo_cost_table.update({"0.weight": 6e-3, "2.weight": 1e-3}, {"0.weight": 12.0, "2.weight": 6.0})
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    resumed = dz.ZOModule(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)))
    resumed.on_load_checkpoint(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert resumed.zo_costs == module.zo_costs and resumed.zo_cost_table.updates == 1
    index = {n: torch.arange(p.numel()) for n, p in model.named_parameters()}
    for rank in range(2):
        assert all(torch.equal(a, b) for a, b in zip(resumed.zo_cost_table.split(index, rank, 2).values(),
                                                     module.zo_cost_table.split(index, rank, 2).values(), strict=True))
    fresh: dict = {}
    dz.ZOModule(model).on_save_checkpoint(fresh)  # no DDP step yet: no table, and none after loading
    resumed.on_load_checkpoint(fresh)
    assert resumed.zo_cost_table is None


def test_timed_cge_reports_seconds_per_parameter_and_the_same_estimate():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    oracle = dz.ModuleOracle(model, torch.nn.functional.cross_entropy, torch.randn(5, 4), torch.randint(0, 2, (5,)))
    params = {n: p.detach() for n, p in model.named_parameters()}
    timed = dz.cge(oracle, params, timed=True)
    assert set(timed.seconds) == set(params) and all(s > 0 for s in timed.seconds.values())
    plain = dz.cge(oracle, params)
    assert plain.seconds == {}  # untimed by default
    assert all(torch.equal(timed.grads[n], plain.grads[n]) for n in params)
    # a split step times only the parameters it evaluates
    part = dz.cge(oracle, params, coordinates={"0.weight": torch.arange(3)}, timed=True)
    assert set(part.seconds) == {"0.weight"}


def test_zo_costs_setter_gives_the_prior():
    module = dz.ZOModule(torch.nn.Linear(2, 1))
    assert module.zo_costs is None
    prior = {"weight": 3.0, "bias": 1.0}
    module.zo_costs = prior
    assert module.zo_cost_table.prior == prior and module.zo_costs == prior
    module.zo_costs = None
    assert module.zo_cost_table is None


def test_recorded_rge_losses_summed_over_ranks_replay_to_the_single_process_estimate():
    """Three simulated ranks in one process: record round-robin shares, add the payloads, replay RGE."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    oracle = dz.ModuleOracle(model, torch.nn.functional.cross_entropy, torch.randn(6, 4), torch.randint(0, 2, (6,)),
                             max_batch=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    settings = {"q": 7, "mu": 1e-2, "distribution": "gaussian", "chunk": 3}
    single = dz.rge(oracle, params, generator=torch.Generator().manual_seed(5), **settings)
    recorders = [RecordingOracle(oracle, r, 3, 7) for r in range(3)]
    for recorder in recorders:
        dz.rge(recorder, params, generator=torch.Generator().manual_seed(5), **settings)
    payloads = [r.payload() for r in recorders]
    assert all(int((p != 0).sum()) in (2, 3) for p in payloads)  # points 0..6 dealt round-robin to 3 ranks
    losses = sum(payloads).to(recorders[0].base.dtype)
    replayed = dz.rge(ReplayOracle(recorders[0].base, losses), params, generator=torch.Generator().manual_seed(5),
                      **settings)
    assert all(torch.equal(replayed.grads[n], single.grads[n]) for n in params) and replayed.queries == 0
    with pytest.raises(RuntimeError, match="asked for 0 perturbed points, expected 7"):
        RecordingOracle(oracle, 0, 2, 7).payload()
    with pytest.raises(RuntimeError, match="more points on replay"):
        dz.rge(ReplayOracle(recorders[0].base, losses[:4]), params, **settings)


def test_rge_replay_chunks_its_directions_as_the_recording_under_a_memory_budget():
    """The direction chunk orders the random draws: the replay must see the recorded oracle's budget."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    params = {n: p.detach() for n, p in model.named_parameters()}
    copy_bytes = sum(p.numel() * p.element_size() for p in params.values())
    oracle = dz.ModuleOracle(model, torch.nn.functional.cross_entropy, torch.randn(6, 4), torch.randint(0, 2, (6,)),
                             memory_budget=2 * 4 * copy_bytes)  # 2 directions per chunk
    settings = {"q": 7, "mu": 1e-2, "distribution": "gaussian"}
    single = dz.rge(oracle, params, generator=torch.Generator().manual_seed(5), **settings)
    recorder = RecordingOracle(oracle, 0, 1, 7)
    assert recorder.memory_budget == oracle.memory_budget
    dz.rge(recorder, params, generator=torch.Generator().manual_seed(5), **settings)
    replay = ReplayOracle(recorder.base, recorder.payload().to(recorder.base.dtype), recorder.memory_budget)
    replayed = dz.rge(replay, params, generator=torch.Generator().manual_seed(5), **settings)
    assert all(torch.equal(replayed.grads[n], single.grads[n]) for n in params)
    unbudgeted = dz.rge(ReplayOracle(recorder.base, recorder.payload().to(recorder.base.dtype)), params,
                        generator=torch.Generator().manual_seed(5), **settings)
    assert not all(torch.equal(unbudgeted.grads[n], single.grads[n]) for n in params)  # other draws: other gradient


def test_all_reduce_step_without_process_group_returns_the_inputs():
    r = all_reduce_step({"w": torch.ones(2), "v": torch.zeros(1)}, 3, False, seconds={"w": 0.5}, counts={"w": 2})
    assert r.queries == 3 and not r.failed and r.losses is None
    assert r.seconds == {"w": 0.5, "v": 0.0} and r.counts == {"w": 2.0, "v": 0.0}
    assert all_reduce_step({"w": torch.ones(2)}, 3, False).counts == {}
    losses = torch.arange(4, dtype=torch.float64)
    assert torch.equal(all_reduce_step({"w": torch.ones(3)}, 7, False, losses=losses).losses, losses)


def test_an_inconsistent_split_is_an_error_on_every_rank():
    from dz_lightning.step import _check_split

    _check_split({"a": 4.0, "b": 2.0}, {"a": 4, "b": 2})
    with pytest.raises(RankFailedError, match="inconsistently"):
        _check_split({"a": 3.0, "b": 2.0}, {"a": 4, "b": 2})


@pytest.mark.parametrize("estimator", ["cge", "rge"])
def test_step_plan_with_one_process_is_the_plain_estimator(estimator):
    """One code path: without a process group the plan's share is the whole estimate and `reduce` returns it."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    settings = {"mu": 1e-2, "q": 5, "difference": "forward", "distribution": "sphere", "nonfinite": "raise"}
    plan = StepPlan(estimator, generator=torch.Generator().manual_seed(2), **settings)
    oracle = dz.ModuleOracle(model, torch.nn.functional.cross_entropy, x, y)
    share = plan.estimate(oracle, params)
    est, timing = plan.reduce(params, share)
    generator = torch.Generator().manual_seed(2)
    reference = (dz.cge(oracle, params, mu=1e-2) if estimator == "cge" else
                 dz.rge(oracle, params, q=5, mu=1e-2, distribution="sphere", generator=generator))
    assert all(torch.equal(est.grads[n], reference.grads[n]) for n in params)
    assert est.queries == reference.queries and est.loss == reference.loss
    assert timing.reduce_end >= timing.reduce_start and plan.cost_table is None  # no split with one process
    with pytest.raises(ZeroDivisionError):  # a failed share is raised after the (here trivial) collective
        plan.reduce(params, None, ZeroDivisionError("boom"), queries=3)


def test_wrapper_oracles_count_what_they_evaluate():
    """Recording and replay are Oracles: the recorder counts the points it evaluated, the replay none."""
    model = torch.nn.Linear(3, 2)
    oracle = dz.ModuleOracle(model, torch.nn.functional.cross_entropy, torch.randn(4, 3), torch.randint(0, 2, (4,)))
    params = {n: p.detach() for n, p in model.named_parameters()}
    recorder = RecordingOracle(oracle, 1, 2, 6)
    assert isinstance(recorder, dz.Oracle)
    est = dz.rge(recorder, params, q=6, generator=torch.Generator().manual_seed(0))
    assert est.queries == recorder.queries == oracle.queries == 1 + 3  # the base point and points 1, 3, 5
    replay = ReplayOracle(recorder.base, recorder.payload())
    assert dz.rge(replay, params, q=6).queries == replay.queries == 0


@pytest.mark.slow
@pytest.mark.parametrize(("estimator", "sparsity"), [("cge", 0.9), ("rge", 0.0)])
def test_two_ranks_match_one_process(tmp_path, run_ddp, estimator, sparsity):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    for out, devices in ((one, "1"), (two, "2")):
        # one query per call: every finite difference is computed exactly as in the single process
        proc = run_ddp(WORKER, "--out", out, "--devices", devices, "--estimator", estimator, "--sparsity",
                       str(sparsity), "--max-batch", "1", cwd=out, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = torch.load(one / "rank0.pt", weights_only=True)
    r0, r1 = (torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for n, g in single["first_grads"].items():
        assert (r0["first_grads"][n] - g).abs().max() <= 1e-6, n
    for n, p in r0["params"].items():
        assert torch.equal(p, r1["params"][n]), f"ranks diverged on {n}"
        # CGE: each coordinate's difference is computed as on one process. RGE: the ranks all-reduce the losses
        # and every rank sums the directions in the single process's order.
        assert torch.equal(p, single["params"][n]), f"2-rank run differs from 1 process on {n}"
    if sparsity:
        assert all(torch.equal(r0["masks"][n], r1["masks"][n]) for n in r0["masks"])
    if estimator == "cge":
        # the measured cost table is built from all-reduced timings only: identical on both ranks, bit for bit
        assert r0["cost_updates"] == r1["cost_updates"] == 20
        assert r0["costs"] == r1["costs"] and set(r0["costs"]) == set(r0["params"])
    # every rank spends its base point; the coordinates (or directions) are split, not repeated
    assert r0["queries_total"] - single["queries_total"] == 20


@pytest.mark.slow
def test_a_post_processed_rge_estimate_on_two_ranks_matches_one_process(tmp_path, run_ddp):
    """A subclass that clips the estimate (``process_estimate``) keeps exact distributed RGE: it post-processes the
    reduced estimate, so 2 ranks write the same gradients as 1 process, bit for bit."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    for out, devices in ((one, "1"), (two, "2")):
        proc = run_ddp(WORKER, "--out", out, "--devices", devices, "--estimator", "rge", "--max-batch", "1",
                       "--clip-norm", "0.05", "--steps", "5", cwd=out, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = torch.load(one / "rank0.pt", weights_only=True)
    r0, r1 = (torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    norm = torch.stack([g.double().square().sum() for g in single["first_grads"].values()]).sum().sqrt()
    assert abs(float(norm) - 0.05) < 1e-6  # the clip acted
    for n, g in single["first_grads"].items():
        assert torch.equal(r0["first_grads"][n], g) and torch.equal(r1["first_grads"][n], g), n
    for n, p in single["params"].items():
        assert torch.equal(r0["params"][n], p) and torch.equal(r1["params"][n], p), n


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["cge", "rge"])
def test_a_failing_rank_stops_every_rank_without_hanging(tmp_path, run_ddp, estimator):
    proc = run_ddp(WORKER, "--out", tmp_path, "--devices", "2", "--nan-rank", "1", "--estimator", estimator,
                   timeout=180)
    assert proc.returncode != 0
    assert "non-finite loss" in proc.stderr and "Another rank failed" in proc.stderr
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3


def test_two_gloo_ranks_combine_to_the_single_process_gradient(run_ddp, free_port):
    """Fast 2-rank check without Lightning: cost-split CGE shares + one all-reduce == one-process CGE."""
    proc = run_ddp(COLLECTIVE_WORKER, "2", str(free_port), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    _, diff, queries, single_queries, failed, failed_later = line.split()
    assert float(diff) <= 1e-6
    # each rank spends its own base point; the coordinates themselves are not repeated
    assert int(queries) == int(single_queries) + 1
    assert failed == "0" and failed_later == "11"  # the last rank's failure reaches both ranks
    # splits by measured costs still combine to the exact gradient, and every rank holds the same cost table
    _, step_diff, same, updates = next(ln for ln in proc.stdout.splitlines() if ln.startswith("TABLE")).split()
    assert float(step_diff) <= 1e-6 and same == "1" and updates == "4"
    # exact RGE: every loss evaluated once on some rank, the estimate summed in the single process's order
    _, exact, rge_queries, rge_single = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RGE")).split()
    assert exact == "1" and int(rge_queries) == int(rge_single) + 1
    # the engine's StepPlan: its own CGE and RGE shares combine exactly; a partial estimate is summed as it is
    _, cge_diff, rge_exact, partial_diff, updates = next(
        ln for ln in proc.stdout.splitlines() if ln.startswith("PLAN")).split()
    assert float(cge_diff) <= 1e-6 and rge_exact == "1" and float(partial_diff) <= 1e-6 and updates == "1"


def test_zo_ddp_is_a_registered_lightning_strategy():
    import lightning as L

    import dz_lightning.module  # noqa: F401 - any ZOModule import registers it
    from dz_lightning.strategies import ZODDPStrategy

    trainer = L.Trainer(strategy="zo_ddp", accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False)
    assert isinstance(trainer.strategy, ZODDPStrategy)
