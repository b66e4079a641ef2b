"""Feature reuse with train-mode dropout: torchvision's mobilenet_v3_small in training mode, CGE on a spread of
coordinates, the engine (common random numbers, the dropout mask cached) against batched full forwards
(``ModuleOracle(..., feature_reuse=False)``), timed in the same run.

    OMP_NUM_THREADS=2 python -m benchmarks.dropout_reuse [--batch 64] [--coords 64] [--repeats 3] [--out FILE]

Prints JSON: seconds per CGE call (median of the repeats, each on a fresh oracle: one step), queries, the ratio,
whether the engine ran on the traced graph, the CPU capability, thread count and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import dz_lightning as dz
from dz_lightning.models import tv_mobilenet_v3_small
from dz_lightning.reuse import GraphEngine


def _coordinates(params: dict[str, torch.Tensor], n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` coordinates in all, spread over an even sample of the tensors (first and last included)."""
    names = list(params)
    picked = [names[round(i * (len(names) - 1) / (min(n, len(names)) - 1))] for i in range(min(n, len(names)))]
    per = max(1, n // len(picked))
    return {name: torch.randperm(params[name].numel(), generator=gen)[:per] for name in picked}


def _time_cge(model, x, y, params, coords, feature_reuse: bool, repeats: int) -> tuple[float, int, bool]:
    seconds, queries, traced = [], 0, False
    for seed in range(repeats):
        oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=feature_reuse, dropout_seed=seed)
        start = time.perf_counter()
        est = dz.cge(oracle, params, coordinates=coords)
        seconds.append(time.perf_counter() - start)
        queries = est.queries
        traced = isinstance(oracle._engine, GraphEngine)
    return statistics.median(seconds), queries, traced


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--coords", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = tv_mobilenet_v3_small(10).train()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    coords = _coordinates(params, args.coords, torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reuse_s, queries, traced = _time_cge(model, x, y, params, coords, True, args.repeats)
    full_s, full_queries, _ = _time_cge(model, x, y, params, coords, False, args.repeats)
    result = {
        "model": "tv_mobilenet_v3_small (train mode, dropout p=0.2 in the classifier)",
        "batch": args.batch, "queries": queries, "repeats": args.repeats,
        "engine_traced_graph": traced, "warnings": [str(w.message)[:300] for w in caught],
        "engine_seconds": reuse_s, "full_forward_seconds": full_s, "full_forward_queries": full_queries,
        "speedup": full_s / reuse_s,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "load": os.getloadavg(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
