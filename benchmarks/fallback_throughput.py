"""CGE throughput of models that cannot be traced: the full-forward fallback vs one query at a time.

For each model of :mod:`benchmarks.fallback_models` (none can be traced by ``torch.fx`` and none has ``stages()``),
the same CGE coordinates (per tensor: ``--density`` of its entries, at least 1 and at most ``--per-param``) are
evaluated, tensor by tensor as a CGE step does, by:

* ``plain_loop``: one query at a time, a perturbed copy and one ``functional_call`` per coordinate (the original
  DeepZero scheme): the yardstick;
* ``max_batch_1``: ``ModuleOracle(max_batch=1, feature_reuse=False)``, one query per call through the oracle;
* ``fallback``: ``ModuleOracle(feature_reuse=False)`` (its chunk size from the memory budget; strategy chosen by
  :class:`dz_lightning.fallback.FullForwards`), timed once its choices are made; ``fallback_first_step`` is the same
  on a fresh copy of the model, the timed trials of the choice included (``feature_reuse=False``: the fallback even
  where the tracer reads the model, as it reads the in-place ResNet's default-argument branch since issue 23);
* ``chunk_<k>``: ``ModuleOracle(max_batch=k, feature_reuse=False)``, for each ``--chunks`` size; ``best_chunk`` names
  the fastest;
* ``engine``: the default ``ModuleOracle``: the traced-graph engine where the model can be traced;
* ``before``: what the fallback did before it chose (``vmap`` with shared inputs, per-point inputs from the first
  in-place failure on; any other ``vmap`` failure raised): ``null`` with the error where it could not run.

Each method runs once per round (``--rounds``, interleaved, so that a change in the machine's load hits every
method alike), after one untimed round that makes the oracles' choices; ``queries_per_s`` is the median over
rounds. ``chosen`` counts the tensors per strategy the default oracle chose, ``choices`` names them,
``max_abs_diff`` compares every method's losses with ``plain_loop``'s (fp32 models, float64 losses). The machine's
load average before and after and ``torch.backends.cpu.get_cpu_capability()`` are recorded.
The last line printed is one JSON object; ``--out`` also writes it.

Usage: ``OMP_NUM_THREADS=2 python -m benchmarks.fallback_throughput --out benchmarks/results/fallback_cpu.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import dz_lightning as dz
from benchmarks.fallback_models import FALLBACK_MODELS
from dz_lightning import fallback
from dz_lightning.query import float64_loss, query_mode

Coords = dict[str, Tensor]  # parameter name -> flat coordinate indices (n,)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_coords(model: nn.Module, density: float, per_param: int, gen: torch.Generator) -> Coords:
    """Per tensor: ``density`` of its entries (at least 1, at most ``per_param``), drawn without replacement."""
    coords = {}
    for name, p in model.named_parameters():
        n = min(p.numel(), per_param, max(1, round(density * p.numel())))
        coords[name] = torch.randperm(p.numel(), generator=gen)[:n].sort().values
    return coords


def plain_loop(model: nn.Module, x: Tensor, y: Tensor, coords: Coords, mu: float) -> Tensor:
    """One query at a time: a perturbed copy of the tensor and one full forward per coordinate; ``(n,)`` float64."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = []
    with query_mode(model, x.device):
        for name, index in coords.items():
            for i in index.tolist():
                w = params[name].clone()
                w.view(-1)[i] += mu
                out.append(float64_loss(F.cross_entropy, functional_call(model, {**params, name: w}, (x,)), y))
    return torch.stack(out)


def oracle_step(model: nn.Module, x: Tensor, y: Tensor, coords: Coords, mu: float, **options: object) -> Tensor:
    """The coordinates through a ``ModuleOracle(**options)``, one ``coordinate_losses`` call per tensor."""
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, **options)
    params = {n: p.detach() for n, p in model.named_parameters()}
    oracle.loss(params)  # the base loss of the step (and the engine's construction, which fails over to fallback)
    return torch.cat([oracle.coordinate_losses(params, name, index, mu) for name, index in coords.items()])


def before_step(model: nn.Module, x: Tensor, y: Tensor, coords: Coords, mu: float) -> Tensor:
    """The fallback before it chose: ``vmap`` with shared inputs, per-point inputs for the model from its first
    in-place failure on, any other failure raised (as ``vmap_points`` retried until this change)."""
    per_point = False
    pinned = {s: dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False, fallback=s)
              for s in ("vmap", "vmap_per_point")}
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = []
    for name, index in coords.items():
        try:
            out.append(pinned["vmap_per_point" if per_point else "vmap"].coordinate_losses(params, name, index, mu))
        except RuntimeError as err:
            if per_point or ("broadcast shape" not in str(err) and "inplace" not in str(err)):
                raise
            per_point = True
            out.append(pinned["vmap_per_point"].coordinate_losses(params, name, index, mu))
    return torch.cat(out)


def run_model(name: str, batch: int, density: float, per_param: int, chunks: list[int], rounds: int,
              device: torch.device, mu: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model = FALLBACK_MODELS[name]().to(device).train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    coords = pick_coords(model, density, per_param, torch.Generator().manual_seed(seed))
    n = sum(int(i.numel()) for i in coords.values())
    methods: dict[str, Callable[[nn.Module], Tensor]] = {
        "plain_loop": lambda m: plain_loop(m, x, y, coords, mu),
        # feature_reuse=False: the full-forward fallback even where the tracer can read the model (the in-place
        # ResNet's default-argument branch is traced as a constant since issue 23); "engine" is the default oracle
        "max_batch_1": lambda m: oracle_step(m, x, y, coords, mu, max_batch=1, feature_reuse=False),
        "fallback": lambda m: oracle_step(m, x, y, coords, mu, feature_reuse=False),
        **{f"chunk_{k}": (lambda m, k=k: oracle_step(m, x, y, coords, mu, max_batch=k, feature_reuse=False))
           for k in chunks},
        "engine": lambda m: oracle_step(m, x, y, coords, mu),
        "before": lambda m: before_step(m, x, y, coords, mu),
    }
    seconds: dict[str, list[float]] = {k: [] for k in ("fallback_first_step", *methods)}
    losses: dict[str, Tensor] = {}
    errors: dict[str, str] = {}
    for round_ in range(rounds + 1):  # round 0 makes the oracles' choices for `model` and is not timed
        fresh = copy.deepcopy(model)  # no choices made yet for this object: the first step includes the trials
        for method, run in (("fallback_first_step", methods["fallback"]), *methods.items()):
            if method in errors or round_ == 0 and method in ("fallback_first_step", "plain_loop", "before"):
                continue
            target = fresh if method == "fallback_first_step" else model
            _sync(device)
            start = time.perf_counter()
            try:
                losses[method] = run(target)
            except RuntimeError as err:
                errors[method] = str(err).strip().splitlines()[0][:160]
                continue
            _sync(device)
            if round_ == 0:
                continue
            seconds[method].append(time.perf_counter() - start)
            print(f"{name} {method}: {seconds[method][-1]:.2f} s for {n} queries", file=sys.stderr, flush=True)
    qps = {m: (n / statistics.median(s) if s else None) for m, s in seconds.items()}
    best = max((m for m in qps if m.startswith("chunk_") and qps[m]), key=qps.__getitem__, default=None)
    ref = losses["plain_loop"]
    # the default oracle's situations: one call per tensor (its chunk holds all of a tensor's coordinates here)
    made = {s[1][0]: c for s, c in fallback.choices(model).items()
            if len(s[1]) == 1 and s[2] == coords[s[1][0]].numel()}
    return {
        "coords": n,
        "tensors": len(coords),
        "queries_per_s": qps,
        "seconds": seconds,
        "best_chunk": None if best is None else {"max_batch": int(best.split("_")[1]), "queries_per_s": qps[best]},
        "fallback_vs_plain_loop": qps["fallback"] / qps["plain_loop"],
        "fallback_first_step_vs_plain_loop": qps["fallback_first_step"] / qps["plain_loop"],
        "before_vs_plain_loop": None if qps["before"] is None else qps["before"] / qps["plain_loop"],
        "chosen": dict(Counter(c.strategy for c in made.values())),
        "choices": {p: {"strategy": c.strategy, "ratio_vs_loop": c.ratio(),
                        "failed": sorted(c.failed)} for p, c in made.items()},
        "errors": errors,
        "max_abs_diff": {m: float((v.double() - ref).abs().max()) for m, v in losses.items() if m != "plain_loop"},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(FALLBACK_MODELS), choices=list(FALLBACK_MODELS))
    parser.add_argument("--batch", type=int, default=40, help="examples per batch (32x32 images)")
    parser.add_argument("--density", type=float, default=0.1, help="fraction of each tensor's entries queried")
    parser.add_argument("--per-param", type=int, default=16, help="most coordinates per tensor")
    parser.add_argument("--chunks", type=int, nargs="*", default=[4, 8], help="max_batch values timed")
    parser.add_argument("--rounds", type=int, default=1, help="timed interleaved rounds; the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mu", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON here (e.g. benchmarks/results/...json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} needs a CUDA GPU, but torch.cuda.is_available() is False.")
    if not 0 < args.density <= 1 or args.per_param < 1 or args.rounds < 1 or any(k < 1 for k in args.chunks):
        parser.error("--density must be in (0, 1], --per-param, --rounds and --chunks positive.")
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": args.batch, "density": args.density, "per_param": args.per_param, "rounds": args.rounds,
        "load_average_before": os.getloadavg(),
    }
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's and the fallback's one-time warnings: the choices are data
        for name in args.models:
            result[name] = run_model(name, args.batch, args.density, args.per_param, args.chunks, args.rounds,
                                     device, args.mu, args.seed)
    result["seconds"] = time.perf_counter() - start
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result))
    if args.out is not None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
