"""Forward-parallelization scaling: one process vs N Lightning DDP processes on the same total work.

Trains ``simple_cnn(depth=3)`` by sparse CGE at 90% sparsity (uniform layer-wise ratios; BatchNorm and biases dense)
on a fixed synthetic CIFAR-shaped batch stream, first with one process, then with N ranks (ZODDPStrategy; Gloo on
CPU, NCCL on GPU), one intra-op thread per process on CPU. Each step's coordinates are split across the ranks by
cost. Prints one JSON object as the last line: ``seconds_per_step`` for each run, ``speedup``, ``efficiency``
(speedup / N) and ``max_abs_diff`` (the N-rank combined gradient of the first step vs the single process's),
plus ``cpu_speedup``/``cpu_efficiency`` from per-step CPU time (the busiest rank's), which stay meaningful when
other jobs share the cores. Where each rank's step goes (wall seconds per step, steps after the first two):
``coordinate_seconds_per_rank`` (its share of the queries, as timed for the measured-cost split),
``allreduce_seconds_per_rank`` (the step's one collective, mostly waiting for the slowest rank) and
``other_seconds_per_rank`` (everything else between two all-reduces: loop, logging, data, base and BatchNorm
forwards).

Usage: ``python -m benchmarks.ddp_scaling [--devices 2] [--steps 12] [--batch 64] [--accelerator cpu]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from dz_lightning.callbacks.zo_grasp import ZOGraSP
    from dz_lightning.tasks.classification import ZOClassifier
    from torch.utils.data import DataLoader, TensorDataset

    from dz_lightning.models import simple_cnn
    from dz_lightning.sampling import SeededRandomSampler
    from dz_lightning.strategies import ZODDPStrategy

    if args.accelerator == "cpu":
        torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(args.batch * (args.steps + 1), 3, 32, 32, generator=gen),
                         torch.randint(0, 10, (args.batch * (args.steps + 1),), generator=gen))
    loader = DataLoader(data, batch_size=args.batch, sampler=SeededRandomSampler(len(data), 0))
    torch.manual_seed(0)
    times: list[float] = []
    cpu_times: list[float] = []
    coord_times: list[float] = []
    wait_times: list[float] = []
    cycle_times: list[float] = []
    first: dict = {}
    last_end = [None]

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if args.accelerator != "cpu":
                torch.cuda.synchronize()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if args.accelerator != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)
            cpu_times.append(time.process_time() - self.cpu_start)
            timing = pl_module.last_timing  # this rank's step: its coordinates' seconds and the collective
            coord_times.append(timing.coordinates if args.devices > 1 else float("nan"))
            wait_times.append(timing.reduce_end - timing.reduce_start)  # mostly waiting for the slowest rank
            if last_end[0] is not None:  # from the end of the previous step's all-reduce to this one's start
                cycle_times.append(timing.reduce_start - last_end[0])
            last_end[0] = timing.reduce_end
            if not first:
                first.update({n: g.cpu() for n, g in pl_module.last_estimate.grads.items()})

    module = ZOClassifier(simple_cnn(depth=3), optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    strategy = "auto" if args.devices == 1 else ZODDPStrategy(
        process_group_backend="gloo" if args.accelerator == "cpu" else "nccl")
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy,
                        max_steps=args.steps, use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[ZOGraSP(sparsity=0.9, method="uniform"), Clock()])
    trainer.fit(module, train_dataloaders=loader)
    warm = slice(2, None) if len(times) > 3 else slice(None)
    cpu = torch.tensor(cpu_times[warm]).mean().reshape(1)
    ranks = [cpu.clone() for _ in range(args.devices)]
    if args.devices > 1:  # the busiest rank's CPU time bounds the step when every rank has its own core
        torch.distributed.all_gather(ranks, cpu)
    cpu = max(ranks)
    # per rank: mean seconds per step spent on its coordinates and waiting in the all-reduce
    # and everything else it did between two all-reduces (loop, logging, data, base and BatchNorm forwards)
    busy = [c - t for c, t in zip(cycle_times[1:], coord_times[2:], strict=True)]
    diag = torch.tensor([sum(coord_times[warm]) / len(coord_times[warm]),
                         sum(wait_times[warm]) / max(len(wait_times[warm]), 1),
                         sum(busy) / max(len(busy), 1)], dtype=torch.float64)
    diags = [diag.clone() for _ in range(args.devices)]
    if args.devices > 1:
        torch.distributed.all_gather(diags, diag)
    if trainer.global_rank == 0:
        torch.save({"seconds_per_step": sum(times[warm]) / len(times[warm]), "first_grads": first,
                    "cpu_seconds_per_step": float(cpu), "cpu_seconds_per_rank": [float(r) for r in ranks],
                    "coordinate_seconds_per_rank": [float(d[0]) for d in diags],
                    "allreduce_seconds_per_rank": [float(d[1]) for d in diags],
                    "other_seconds_per_rank": [float(d[2]) for d in diags],
                    "queries_per_step": module.queries_total / args.steps},
                   args.out)


def launch(devices: int, args: argparse.Namespace, out: Path) -> dict:
    import torch

    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "benchmarks.ddp_scaling", "--worker", "--devices", str(devices), "--steps",
           str(args.steps), "--batch", str(args.batch), "--accelerator", args.accelerator, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the {devices}-process run failed:\n{proc.stderr[-4000:]}")
    return torch.load(out, weights_only=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        one = launch(1, args, Path(tmp) / "one.pt")
        many = launch(args.devices, args, Path(tmp) / "many.pt")
    speedup = one["seconds_per_step"] / many["seconds_per_step"]
    cpu_speedup = one["cpu_seconds_per_step"] / many["cpu_seconds_per_step"]
    result = {
        "model": "simple_cnn(depth=3)", "sparsity": 0.9, "batch": args.batch, "accelerator": args.accelerator,
        "devices": args.devices, "queries_per_step": one["queries_per_step"],
        "seconds_per_step": {"1": one["seconds_per_step"], str(args.devices): many["seconds_per_step"]},
        "speedup": speedup, "efficiency": speedup / args.devices,
        # CPU time of the busiest rank: what the wall-clock speedup becomes when every rank has an idle core
        # (robust to other jobs sharing the machine; it does not see time spent waiting in the all-reduce)
        "cpu_seconds_per_step": {"1": one["cpu_seconds_per_step"], str(args.devices): many["cpu_seconds_per_step"]},
        "cpu_seconds_per_rank": many["cpu_seconds_per_rank"],
        "cpu_speedup": cpu_speedup, "cpu_efficiency": cpu_speedup / args.devices,
        # where each rank's step goes: its coordinates (timed per parameter) and the wait in the all-reduce
        "coordinate_seconds_per_rank": many["coordinate_seconds_per_rank"],
        "allreduce_seconds_per_rank": many["allreduce_seconds_per_rank"],
        "other_seconds_per_rank": many["other_seconds_per_rank"],
        "max_abs_diff": max(float((one["first_grads"][n] - many["first_grads"][n]).abs().max())
                            for n in one["first_grads"]),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
