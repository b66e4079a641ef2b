"""Two Gloo processes without Lightning: split CGE coordinates, all-reduce, compare with one process.

Used by test_distributed.py's fast 2-rank test through a subprocess with a clean environment. Each rank
estimates its share of a small MLP's coordinates, and ``all_reduce_step`` combines them; the script prints
one line ``RESULT <max_abs_diff> <queries> <failed_flags>`` from rank 0 and exits non-zero on any error.
Then a few steps split by a measured :class:`CostTable` (timings in the same all-reduce) print
``TABLE <max_abs_diff over the steps> <tables identical on all ranks: 1/0> <updates>``. Last, exact RGE (record
a round-robin share of the losses, all-reduce them, replay RGE on every rank) prints
``RGE <bit-identical to one process: 1/0> <queries> <single-process queries>``. Then the engine's
:class:`~dz_lightning.step.StepPlan` (its own shares, and a subclass-style partial estimate that is summed) prints
``PLAN <cge max_abs_diff> <rge bit-identical: 1/0> <partial max_abs_diff> <cost table updates>``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dz_lightning import ModuleOracle, cge, rge
from dz_lightning.distributed import CostTable, all_reduce_step, rank_and_world, split_coordinates
from dz_lightning.estimators import Estimate
from dz_lightning.step import RecordingOracle, ReplayOracle, StepPlan, StepShare


def _problem() -> tuple[torch.nn.Module, ModuleOracle]:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    inputs, targets = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    # one query per call, so every finite difference is computed exactly as in the single process
    oracle = ModuleOracle(model, torch.nn.functional.cross_entropy, inputs, targets, max_batch=1)
    return model, oracle


def _rank(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert rank_and_world() == (rank, world)
        model, oracle = _problem()
        params = {n: p.detach() for n, p in model.named_parameters()}
        reference = cge(oracle, params)
        costs = {n: 1.0 + i for i, n in enumerate(params)}
        index = {n: torch.arange(p.numel()) for n, p in params.items()}
        part = cge(oracle, params, coordinates=split_coordinates(index, rank, world, costs))
        reduced = all_reduce_step(part.grads, part.queries, False)
        grads, queries, failed = reduced.grads, reduced.queries, reduced.failed
        diff = max(float((grads[n] - reference.grads[n]).abs().max()) for n in params)
        # a failure on the last rank reaches every rank through the same single collective
        failed_later = all_reduce_step(part.grads, 0, rank == world - 1).failed
        flags = [torch.tensor([float(failed_later)])]
        gathered = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(gathered, flags[0])
        if rank == 0:
            print(f"RESULT {diff:.3e} {queries} {reference.queries} {int(failed)} "
                  f"{''.join(str(int(g.item())) for g in gathered)}", flush=True)
        # measured costs: each step's timings travel in the gradient's all-reduce; every rank updates its table
        table = CostTable(costs, momentum=0.5)
        step_diff = 0.0
        for _ in range(4):
            share = table.split(index, rank, world)
            part = cge(oracle, params, coordinates=share, timed=True)
            reduced = all_reduce_step(part.grads, part.queries, False, seconds=part.seconds,
                                      counts={n: c.numel() for n, c in share.items()})
            assert reduced.counts == {n: float(i.numel()) for n, i in index.items()}, reduced.counts
            table.update(reduced.seconds, reduced.counts)
            step_diff = max(step_diff, *(float((reduced.grads[n] - reference.grads[n]).abs().max()) for n in params))
        mine = torch.tensor([table.costs()[n] for n in params], dtype=torch.float64)
        tables = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(tables, mine)
        same = all(torch.equal(t, tables[0]) for t in tables)
        if rank == 0:
            print(f"TABLE {step_diff:.3e} {int(same)} {table.updates}", flush=True)
        # exact RGE: central differences over several chunks, so the points of one call land on both ranks
        settings = {"q": 10, "mu": 5e-3, "distribution": "sphere", "difference": "central", "chunk": 4}
        single = rge(oracle, params, generator=torch.Generator().manual_seed(3), **settings)
        generator = torch.Generator().manual_seed(3)
        state = generator.get_state()
        recorder = RecordingOracle(oracle, rank, world, 20)
        first = rge(recorder, params, generator=generator, **settings)
        reduced = all_reduce_step({n: torch.zeros_like(p) for n, p in params.items()}, first.queries, False,
                                  losses=recorder.payload())
        replay_generator = torch.Generator()
        replay_generator.set_state(state)
        replayed = rge(ReplayOracle(recorder.base, reduced.losses.to(recorder.base.dtype)), params,
                       generator=replay_generator, **settings)
        exact = all(torch.equal(replayed.grads[n], single.grads[n]) for n in params)
        if rank == 0:
            print(f"RGE {int(exact)} {reduced.queries} {single.queries}", flush=True)
        # the step plan: CGE and RGE shares, then a partial estimate (an overriding subclass's) summed as it is
        plans = {e: StepPlan(e, mu=5e-3, q=10, difference=d, distribution="sphere", nonfinite="raise",
                             generator=torch.Generator().manual_seed(3)) for e, d in (("cge", "forward"),
                                                                                      ("rge", "central"))}
        cge_full, _ = plans["cge"].reduce(params, plans["cge"].estimate(oracle, params))
        rge_full, _ = plans["rge"].reduce(params, plans["rge"].estimate(oracle, params))
        partial = Estimate({n: g / world for n, g in reference.grads.items()}, 1, reference.loss)
        summed, _ = plans["cge"].reduce(params, StepShare(partial))
        cge_diff = max(float((cge_full.grads[n] - reference.grads[n]).abs().max()) for n in params)
        one = rge(oracle, params, generator=torch.Generator().manual_seed(3), q=10, mu=5e-3, distribution="sphere",
                  difference="central")
        rge_exact = all(torch.equal(rge_full.grads[n], one.grads[n]) for n in params)
        partial_diff = max(float((summed.grads[n] - reference.grads[n]).abs().max()) for n in params)
        if rank == 0:
            print(f"PLAN {cge_diff:.3e} {int(rge_exact)} {partial_diff:.3e} {plans['cge'].cost_table.updates}",
                  flush=True)
    finally:
        dist.destroy_process_group()


def main() -> None:
    world, port = int(sys.argv[1]), int(sys.argv[2])
    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(_rank, args=(world, port), nprocs=world, join=True)


if __name__ == "__main__":
    main()
