"""One command for the day a GPU is lent: everything we could not measure without one, in one JSON file.

``python -m benchmarks.gpu_check`` (about 8 minutes budgeted on one H100) runs, in order:

1. ``gpu_tests``: the ``gpu``-marked tests (``pytest -m gpu``), their pass/fail/skip counts;
2. ``error_vs_float64``: the feature-reuse engine's forward differences on the device against a float64 loop on the
   same device, ``max |estimate - float64| / RMS(float64)`` for ``delta_dtype`` float32 and bfloat16 (resnet20,
   batch 256, eval and train mode);
3. ``sparse_step``: one resnet20 CGE step at 90% sparsity (random masks at 10% density per weight, batch 256): its
   seconds, queries and queries per second, the first step (engine build and self-check) apart from the steady
   state;
4. ``fit``: a 20-step ``dz fit`` of ``configs/classification/resnet20_cifar10_zo_grasp90.yaml`` on random
   CIFAR-shaped data (torchvision's ``FakeData`` in place of CIFAR-10; ZO-GraSP scoring included);
5. ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` after each part.

Without a CUDA device the GPU parts are skipped, each with the reason in the JSON (the ``gpu`` tests still run and
report their skips). ``--smoke`` runs every part at toy sizes on whatever device there is (to check the script).
Writes ``--out`` (default ``benchmarks/results/gpu_check.json``) and prints the same JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import dz_lightning as dz
from dz_lightning.models import resnet20
from dz_lightning.query import frozen_batchnorm_stats

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/classification/resnet20_cifar10_zo_grasp90.yaml"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def gpu_tests(timeout: int) -> dict[str, Any]:
    """``pytest -m gpu`` in a subprocess: the summary line and the return code."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:],
            "failures": [line for line in lines if line.startswith("FAILED")][:20],
            "seconds": time.perf_counter() - start}


def error_vs_float64(device: torch.device, batch: int, n_coords: int, seed: int = 0) -> dict[str, Any]:
    """max |engine - float64 loop| / RMS(float64 loop) of forward differences, per delta_dtype and train/eval."""
    result: dict[str, Any] = {}
    mu = 5e-3
    for train in (False, True):
        torch.manual_seed(seed)
        model = resnet20().to(device).train(train)
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        params = dict(model.named_parameters())
        gen = torch.Generator().manual_seed(seed)
        names = list(params)
        coords = {}
        for _ in range(n_coords):
            name = names[int(torch.randint(len(names), (1,), generator=gen))]
            coords.setdefault(name, []).append(int(torch.randint(params[name].numel(), (1,), generator=gen)))
        model64 = copy.deepcopy(model).double()
        p64 = dict(model64.named_parameters())
        ref: dict[str, torch.Tensor] = {}
        with torch.no_grad(), frozen_batchnorm_stats(model64):
            base = F.cross_entropy(model64(x.double()), y)
            for name, index in coords.items():
                values = []
                for i in index:
                    w = p64[name].detach().clone()
                    w.view(-1)[i] += mu
                    out = torch.func.functional_call(model64, {**p64, name: w}, (x.double(),))
                    values.append((F.cross_entropy(out, y) - base) / mu)
                ref[name] = torch.stack(values)
        want = torch.cat(list(ref.values()))
        rms = want.pow(2).mean().sqrt()
        for dtype in ("float32", "bfloat16"):
            oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, delta_dtype=dtype)
            f0 = oracle.loss(params)
            got = torch.cat([(oracle.coordinate_losses(params, n, torch.tensor(i, device=device), mu) - f0) / mu
                             for n, i in coords.items()])
            result[f"{'train' if train else 'eval'}_{dtype}"] = float((got - want).abs().max() / rms)
    result["coordinates"] = n_coords
    result["batch"] = batch
    return result


def sparse_step(device: torch.device, batch: int, steps: int, density: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """resnet20 CGE steps at ``1 - density`` sparsity (masks on the conv/linear weights, the rest dense, as
    ZO-GraSP leaves it): first step and steady-state seconds, queries, queries/s."""
    torch.manual_seed(seed)
    model = resnet20().to(device).train()
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    masks = {n: (torch.rand(p.shape, generator=gen) < density).to(device) for n, p in params.items() if p.dim() > 1}
    times, queries = [], 0
    for _ in range(steps):
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        _sync(device)
        start = time.perf_counter()
        est = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y), params, masks=masks)
        _sync(device)
        times.append(time.perf_counter() - start)
        queries = est.queries
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    return {"batch": batch, "sparsity": 1 - density, "queries": queries, "first_step_seconds": times[0],
            "step_seconds": steady, "queries_per_s": queries / steady, "steps": steps}


def fit(device: torch.device, steps: int, batch: int, smoke: bool) -> dict[str, Any]:
    """``dz fit`` of the CIFAR ResNet-20 config for ``steps`` steps on random CIFAR-shaped images."""
    from torchvision import datasets

    from dz_lightning.cli import build_cli

    real = datasets.CIFAR10

    def fake(root: str, train: bool = True, transform: Callable | None = None, download: bool = False) -> Any:
        return datasets.FakeData(size=max(batch * steps, 250) if train else batch, image_size=(3, 32, 32),
                                 num_classes=10, transform=transform, random_offset=0 if train else 10_000)

    overrides = ["--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
                 "--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu",
                 "--data.init_args.batch_size", str(batch), "--data.init_args.num_workers", "0",
                 "--data.init_args.download", "false"]
    if smoke:  # toy ZO-GraSP scoring and masks
        overrides += ["--zo_grasp.init_args.q", "2", "--zo_grasp.init_args.samples_per_class", "1",
                      "--zo_grasp.init_args.sparsity", "0.999"]
    cwd = os.getcwd()
    datasets.CIFAR10 = fake
    try:
        with tempfile.TemporaryDirectory() as work:
            os.chdir(work)
            start = time.perf_counter()
            cli = build_cli(["fit", "--config", str(ROOT / CONFIG), *overrides])
            seconds = time.perf_counter() - start
    finally:
        datasets.CIFAR10 = real
        os.chdir(cwd)
    module = cli.model
    return {"config": CONFIG, "steps": int(cli.trainer.global_step), "batch": batch, "seconds": seconds,
            "queries": int(module.queries_total), "last_loss": float(module.last_estimate.loss)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--smoke", action="store_true", help="toy sizes on any device (checks the script)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the gpu-marked tests")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    run_gpu_parts = cuda or args.smoke
    batch = 8 if args.smoke else 256
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (no CUDA device)",
        "torch": torch.__version__, "smoke": args.smoke,
    }
    why = ("skipped: no CUDA device on this machine; run `python -m benchmarks.gpu_check` where one is "
           "(or `--smoke` for toy sizes on the CPU)")
    parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("error_vs_float64", lambda: error_vs_float64(device, batch, 4 if args.smoke else 64)),
        ("sparse_step", lambda: sparse_step(device, batch, 2 if args.smoke else 5, 0.002 if args.smoke else 0.1)),
        ("fit", lambda: fit(device, 2 if args.smoke else 20, batch, args.smoke)),
    ]
    if not args.skip_tests:
        report["gpu_tests"] = gpu_tests(timeout=240)
    for name, part in parts:
        if not run_gpu_parts:
            report[name] = {"skipped": why}
            print(f"{name}: {why}", file=sys.stderr)
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            report[name] = part()
        except Exception as exc:  # noqa: BLE001 - one failed part must not hide the others' figures
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report[name]["peak_memory_bytes"] = _peak(device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
