"""Per-query cost of CGE on a wide MLP: the feature-reuse engine against the batched full forward (prints JSON).

MLP 784-256-256-10, batch 64, 2,048 random coordinates of the first layer's weight (one CGE estimate, forward
differences). Each oracle is built and warmed up by one estimate, then the best of ``--reps`` estimates is taken, in
CPU seconds of this process (``time.process_time``: steadier than wall time on a shared machine) and in wall seconds.
``ratio`` is the full forward's cost per query over the engine's.

Usage: ``OMP_NUM_THREADS=1 python -m benchmarks.wide_mlp --delta-dtype float32 --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import dz_lightning as dz


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delta-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--coords", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(args.batch, 784), torch.randint(0, 10, (args.batch,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    coords = {"0.weight": torch.randperm(784 * 256)[: args.coords]}
    result: dict = {"delta_dtype": args.delta_dtype, "coords": args.coords, "batch": args.batch,
                    "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "load_before": os.getloadavg()}
    losses = {}
    for name, options in (("engine", {}), ("full_forward", {"feature_reuse": False})):
        oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, delta_dtype=args.delta_dtype, **options)
        dz.cge(oracle, params, coordinates=coords)  # builds (and self-checks) the engine, warms the allocator
        cpu, wall = [], []
        for _ in range(args.reps):
            c, w = time.process_time(), time.perf_counter()
            est = dz.cge(oracle, params, coordinates=coords)
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
        losses[name] = est.grads["0.weight"].flatten()[coords["0.weight"]]
        result[name] = {"cpu_us_per_query": min(cpu) / args.coords * 1e6,
                        "wall_us_per_query": min(wall) / args.coords * 1e6}
    result["ratio_cpu"] = result["full_forward"]["cpu_us_per_query"] / result["engine"]["cpu_us_per_query"]
    result["ratio_wall"] = result["full_forward"]["wall_us_per_query"] / result["engine"]["wall_us_per_query"]
    result["max_abs_grad_diff"] = float((losses["engine"] - losses["full_forward"]).abs().max())
    result["load_after"] = os.getloadavg()
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
