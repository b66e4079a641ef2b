"""One CGE step at 90% sparsity: the engine against the reuse loop, for one model, several repeats.

The step is projected as in :mod:`benchmarks.cge_throughput` (``project_step``: up to ``--per-param`` queries per
tensor timed, scaled to the tensor's count at the paper's counting) for each ``--delta-dtypes`` value and for
DeepZero's one-query-at-a-time reuse loop, in the same process, ``--repeats`` times after one warm-up.

``--clock cpu`` times CPU seconds of this process instead of wall seconds: steadier on a loaded machine, and equal to
wall time for one thread on an idle core. The JSON records the clock, the threads, the CPU capability, whether the
differences were compiled, and the load average before and after.

Usage: ``OMP_NUM_THREADS=1 python -m benchmarks.step_ratio --model resnet20 --clock cpu --out r.json``; prefix
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` for the AVX2 kernels, ``DZ_COMPILE_DIFFERENCES=0`` for the
eager differences.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks import cge_throughput as ct
from dz_lightning.reuse import fused


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="simple_cnn", choices=["simple_cnn", "resnet20"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--per-param", type=int, default=64, help="queries timed per tensor (scaled to its count)")
    parser.add_argument("--loop-per-param", type=int, default=16,
                        help="queries timed per tensor for the reuse loop (each costs the same: one at a time)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--delta-dtypes", nargs="+", default=["float32", "auto"], choices=["float32", "auto",
                                                                                            "bfloat16"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.clock == "cpu":  # project_step's timer, for this process only
        ct.time = _CPUClock()  # type: ignore[assignment]
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = ct.MODELS[args.model]().train()
    x = torch.randn(args.batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    result: dict = {"model": args.model, "clock": args.clock, "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "compiled_differences": fused.compiling_enabled(), "batch": args.batch,
                    "per_param": args.per_param, "loop_per_param": args.loop_per_param,
                    "load_before": os.getloadavg(), "runs": []}
    ct.project_step(model, x, y, 5e-3, None, 8, gen, delta_dtypes=tuple(args.delta_dtypes))  # warm-up, compiles
    for _ in range(args.repeats):
        steps, loop, queries = ct.project_step(model, x, y, 5e-3, None, args.per_param, gen, args.loop_per_param,
                                               delta_dtypes=tuple(args.delta_dtypes))
        run = {"step_seconds": steps, "reuse_loop_seconds": loop, "queries": queries,
               "speedup_vs_reuse_loop": {d: loop / s for d, s in steps.items()}}
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
    result["load_after"] = os.getloadavg()
    result["compile_failures"] = fused.compile_failures()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


class _CPUClock:
    """``time`` with ``perf_counter`` reading this process's CPU seconds."""

    def __getattr__(self, name: str):
        return time.process_time if name == "perf_counter" else getattr(time, name)


if __name__ == "__main__":
    main()
