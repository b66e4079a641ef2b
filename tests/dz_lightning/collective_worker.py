"""Two Gloo processes without Lightning: split CGE coordinates, all-reduce, compare with one process.

Used by test_distributed.py's fast 2-rank test through a subprocess with a clean environment. Each rank
estimates its share of a small MLP's coordinates, and ``all_reduce_estimate`` combines them; the script prints
one line ``RESULT <max_abs_diff> <queries> <failed_flags>`` from rank 0 and exits non-zero on any error.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dz_lightning import ModuleOracle, cge
from dz_lightning.distributed import all_reduce_estimate, rank_and_world, split_coordinates


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
        grads, queries, failed = all_reduce_estimate(part.grads, part.queries, False)
        diff = max(float((grads[n] - reference.grads[n]).abs().max()) for n in params)
        # a failure on the last rank reaches every rank through the same single collective
        _, _, failed_later = all_reduce_estimate(part.grads, 0, rank == world - 1)
        flags = [torch.tensor([float(failed_later)])]
        gathered = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(gathered, flags[0])
        if rank == 0:
            print(f"RESULT {diff:.3e} {queries} {reference.queries} {int(failed)} "
                  f"{''.join(str(int(g.item())) for g in gathered)}", flush=True)
    finally:
        dist.destroy_process_group()


def main() -> None:
    world, port = int(sys.argv[1]), int(sys.argv[2])
    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(_rank, args=(world, port), nprocs=world, join=True)


if __name__ == "__main__":
    main()
