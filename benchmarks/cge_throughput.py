"""CGE query throughput: naive full forwards vs the original's reuse loop vs dz_lightning's batched path.

For each model, the same randomly chosen coordinates are evaluated three ways:

(a) naive: one full forward per query;
(b) reuse loop: one query at a time, restarting from the cached input of the perturbed op (DeepZero's
    original scheme, at op granularity);
(c) ours: :class:`dz_lightning.reuse.StagedForward` (batched, structure-aware).

Ours keeps CPU activations channels-last; ``speedup_vs_reuse_loop_channels_last`` compares against the loop given
the same layout, so the gain from the layout alone can be told apart from the gain of the engine.

The three must agree. ``step_seconds_90pct`` projects one full CGE step at 90% sparsity as the paper counts it
(10% of every conv/linear weight, BatchNorm parameters and biases dense) from per-parameter timings of (c), and
``step_speedup_vs_reuse_loop`` compares it with the same projection for (b): the speedup on a real step's mix of
coordinates, with the per-tensor setup amortized as in training.

Per model it also reports ``step_seconds_90pct_by_delta_dtype`` (the projection with ``delta_dtype`` float32 and
bfloat16), ``ops_per_chunk`` (dispatched aten ops for one chunk of ``k = 1`` and ``k = 64`` queries of every tensor,
counted with a ``TorchDispatchMode``), ``ops_growth`` (their ratio), ``syncs_per_chunk`` (``.item()``-like calls and
device-to-host copies inside ``coordinate_losses``) and ``rel_err``: max |estimate - float64 loop| / RMS(float64
loop) of forward differences over random coordinates, train and eval mode, per ``delta_dtype``. On top,
``conv_fp32_vs_bf16`` times resnet20's convolutions in both dtypes on the device.
The last line printed is one JSON object; ``--out`` (default on CUDA: ``cge_throughput_cuda.json`` in
``benchmarks/results``) also writes it.

``graph_models`` covers models with and without a hand-written protocol (resnet20, simple_cnn, tv_resnet18,
tv_mobilenet_v3_small, unet_small): per model, ``step_queries_per_s`` of one CGE step at 90% sparsity (the same
projection, the engine's construction included) on the traced-graph engine (``graph``), on the full forward
without feature reuse (``full_forward``: ``ModuleOracle(feature_reuse=False)``, batched or one query at a time as
:mod:`dz_lightning.fallback` chooses) and on the ``stages()`` protocol (``stages``, where the model has one), and
``max_abs_diff`` of their losses. Dropout modules run in eval mode (a train-mode dropout makes every query random).

Usage: ``python -m benchmarks.cge_throughput --models resnet20 simple_cnn --batch 64 --coords 128``;
``--model tv_resnet18`` runs only that model's ``graph_models`` entry;
on a GPU: ``python -m benchmarks.cge_throughput --device cuda`` (batch 256). The JSON records the CPU capability
(``torch.backends.cpu.get_cpu_capability()``) and the load average before and after; ``--avx2`` reruns the same
figures in a child process on the AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``), so that an
AVX512 machine measures the AVX2 kind of CPU too (key ``avx2``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

import dz_lightning as dz
from dz_lightning.models import resnet20, simple_cnn, tv_mobilenet_v3_small, tv_resnet18, unet_small
from dz_lightning.query import fp32_precision, frozen_batchnorm_stats
from dz_lightning.reuse import GraphEngine, StagedForward, build_graph_engine, flatten_ops, fused, get_stages

_T = TypeVar("_T")

MODELS: dict[str, Callable[[], nn.Module]] = {"resnet20": resnet20, "simple_cnn": lambda: simple_cnn(depth=3)}
# name -> (model, loss); unet_small is a denoiser (MSE to an image), the others classify 32x32 images
GRAPH_MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[Tensor, Tensor], Tensor]]] = {
    "resnet20": (resnet20, F.cross_entropy),
    "simple_cnn": (lambda: simple_cnn(depth=3), F.cross_entropy),
    "tv_resnet18": (tv_resnet18, F.cross_entropy),
    "tv_mobilenet_v3_small": (tv_mobilenet_v3_small, F.cross_entropy),
    "unet_small": (unet_small, F.mse_loss),
}


_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose"}


class DispatchCounter(TorchDispatchMode):
    """Counts dispatched aten ops, and device-to-host syncs among them (``.item()``, ``nonzero``, comparisons
    returning a Python bool, copies from an accelerator to the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        self.ops += 1
        name = func.__name__.split(".")[0]
        if name in _SYNC_OPS:
            self.syncs += 1
        elif name in ("_to_copy", "copy_", "to"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0].device if name == "copy_" else kwargs.get("device")
            if isinstance(src, Tensor) and src.device.type != "cpu" and dst is not None and \
                    torch.device(dst).type == "cpu":
                self.syncs += 1
        return func(*args, **kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def _perturbed(value: Tensor, i: int, delta: float) -> Tensor:
    w = value.detach().clone()
    w.view(-1)[i] += delta
    return w


def naive(model: nn.Module, x: Tensor, y: Tensor, coords: list[tuple[str, int]], delta: float) -> Tensor:
    params = dict(model.named_parameters())
    out = []
    with torch.no_grad(), frozen_batchnorm_stats(model):
        for name, i in coords:
            logits = functional_call(model, {**params, name: _perturbed(params[name], i, delta)}, (x,))
            out.append(F.cross_entropy(logits, y))
    return torch.stack(out)


def base_acts(model: nn.Module, x: Tensor, layout: torch.memory_format = torch.contiguous_format) -> list[Tensor]:
    """The cached input of every op (and the output), as the original scheme keeps them."""
    acts = [x.contiguous(memory_format=layout)]
    with torch.no_grad(), frozen_batchnorm_stats(model):
        for op in flatten_ops(get_stages(model)):
            acts.append(op(acts[-1]))
    return acts


def reuse_loop(model: nn.Module, x: Tensor, y: Tensor, coords: list[tuple[str, int]], delta: float,
               layout: torch.memory_format = torch.contiguous_format, acts: list[Tensor] | None = None) -> Tensor:
    """The original scheme; ``layout=torch.channels_last`` gives it the memory layout that ours uses on CPU;
    ``acts`` (from :func:`base_acts`) skips the base forward."""
    ops = flatten_ops(get_stages(model))
    owner = {id(p): (j, local) for j, op in enumerate(ops) for local, p in op.named_parameters()}
    params = dict(model.named_parameters())
    out = []
    acts = base_acts(model, x, layout) if acts is None else acts
    with torch.no_grad(), frozen_batchnorm_stats(model):
        for name, i in coords:
            j, local = owner[id(params[name])]
            op_params = dict(ops[j].named_parameters())
            h = functional_call(ops[j], {**op_params, local: _perturbed(op_params[local], i, delta)}, (acts[j],))
            for op in ops[j + 1 :]:
                h = op(h)
            out.append(F.cross_entropy(h, y))
    return torch.stack(out)


def ours(model: nn.Module, x: Tensor, y: Tensor, coords: list[tuple[str, int]], delta: float,
         max_batch: int | None) -> Tensor:
    staged = StagedForward(model, F.cross_entropy, x, y, dict(model.named_parameters()), max_batch=max_batch)
    out = torch.empty(len(coords), device=x.device, dtype=torch.float64)
    by_name: dict[str, list[int]] = {}
    for pos, (name, _) in enumerate(coords):
        by_name.setdefault(name, []).append(pos)
    for name, positions in by_name.items():
        idx = torch.tensor([coords[p][1] for p in positions], device=x.device)
        out[torch.tensor(positions, device=x.device)] = staged.coordinate_losses(name, idx, delta)
    return out


def _timed(fn: Callable[[], _T], device: torch.device) -> tuple[_T, float]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def _sparse_counts(model: nn.Module, density: float) -> dict[str, int]:
    """Queries per parameter at the paper's counting: conv/linear weights at ``density``, the rest dense."""
    counts = {}
    for mod_name, mod in model.named_modules():
        for local, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{local}" if mod_name else local
            sparse = isinstance(mod, (nn.Conv2d, nn.Linear)) and local == "weight"
            counts[full] = max(1, round(density * p.numel())) if sparse else p.numel()
    return counts


def project_step(model: nn.Module, x: Tensor, y: Tensor, delta: float, max_batch: int | None,
                 per_param: int, gen: torch.Generator, loop_per_param: int = 16,
                 delta_dtypes: tuple[str, ...] = ("float32",)) -> tuple[dict[str, float], float, int]:
    """Seconds of one CGE step at 90% sparsity, ours (per ``delta_dtype``) and the reuse loop's, and its queries.

    Timed on up to ``per_param`` queries per tensor for ours and ``loop_per_param`` for the loop (one query at a
    time costs the same for every coordinate of a tensor), scaled to the tensor's count; each includes its base
    forward once.
    """
    staged, totals = {}, {}
    for dtype in delta_dtypes:
        staged[dtype], totals[dtype] = _timed(lambda dtype=dtype: StagedForward(
            model, F.cross_entropy, x, y, dict(model.named_parameters()), max_batch=max_batch, delta_dtype=dtype),
            x.device)
    acts, loop_total = _timed(lambda: base_acts(model, x), x.device)
    queries = 0
    for name, n in _sparse_counts(model, 0.1).items():
        numel = dict(model.named_parameters())[name].numel()
        m = min(n, per_param)
        idx = torch.randperm(numel, generator=gen)[:m].to(x.device)
        for dtype in delta_dtypes:
            _, seconds = _timed(lambda idx=idx, name=name, dtype=dtype: staged[dtype].coordinate_losses(
                name, idx, delta), x.device)
            totals[dtype] += seconds * n / m
        coords = [(name, int(i)) for i in idx[:loop_per_param].tolist()]
        _, seconds = _timed(lambda coords=coords: reuse_loop(model, x, y, coords, delta, acts=acts), x.device)
        loop_total += seconds * n / len(coords)
        queries += n
    return totals, loop_total, queries + 1


def ops_per_chunk(model: nn.Module, device: torch.device, batch: int = 2) -> dict:
    """Dispatched aten ops and syncs for one chunk of ``k = 1`` and ``k = 64`` queries of every parameter tensor
    (summed over the tensors; counted on a batch of ``batch`` 32x32 images: op counts do not depend on it)."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    params = dict(model.named_parameters())
    ops, syncs, chunks = {}, 0, 0
    for k in (1, 64):
        staged = StagedForward(model, F.cross_entropy, x, y, params, max_batch=k)
        ops[k] = 0
        for name, p in params.items():
            index = torch.arange(k, device=device) % p.numel()
            staged.coordinate_losses(name, index, 1e-3)  # the first call fills per-op caches
            with DispatchCounter() as counter:
                staged.coordinate_losses(name, index, 1e-3)
            ops[k] += counter.ops
            syncs += counter.syncs
            chunks += 1
    return {"ops_per_chunk": {"k1": ops[1], "k64": ops[64]}, "ops_growth": ops[64] / ops[1],
            "syncs_per_chunk": syncs / chunks}


def rel_err(model: nn.Module, x: Tensor, y: Tensor, delta: float, n_coords: int, gen: torch.Generator,
            delta_dtypes: tuple[str, ...]) -> dict[str, float]:
    """max |estimate - float64 loop| / RMS(float64 loop) of forward differences over ``n_coords`` random
    coordinates, per ``delta_dtype``; the model's train/eval mode as it is."""
    params = dict(model.named_parameters())
    names = list(params)
    sizes = torch.tensor([params[n].numel() for n in names], dtype=torch.float)
    which = torch.multinomial(sizes, n_coords, replacement=True, generator=gen).tolist()
    coords = [(names[w], int(torch.randint(params[names[w]].numel(), (1,), generator=gen))) for w in which]
    model64 = copy.deepcopy(model).double()
    p64 = dict(model64.named_parameters())
    x64 = x.double()
    ref = []
    with torch.no_grad(), frozen_batchnorm_stats(model64):
        base = F.cross_entropy(model64(x64), y)
        for name, i in coords:
            out = functional_call(model64, {**p64, name: _perturbed(p64[name], i, delta)}, (x64,))
            ref.append((F.cross_entropy(out, y) - base) / delta)
    ref = torch.stack(ref)
    result = {}
    for dtype in delta_dtypes:
        staged = StagedForward(model, F.cross_entropy, x, y, params, delta_dtype=dtype)
        est = torch.empty(n_coords, dtype=torch.float64, device=x.device)
        by_name: dict[str, list[int]] = {}
        for pos, (name, _) in enumerate(coords):
            by_name.setdefault(name, []).append(pos)
        for name, positions in by_name.items():
            idx = torch.tensor([coords[p][1] for p in positions], device=x.device)
            losses = staged.coordinate_losses(name, idx, delta).double()
            est[torch.tensor(positions, device=x.device)] = (losses - staged.base_loss().double()) / delta
        result[dtype] = float((est - ref).abs().max() / ref.pow(2).mean().sqrt())
    return result


def conv_bf16_speedup(device: torch.device, reps: int = 20) -> dict[str, float]:
    """Seconds of resnet20's 3x3 convolutions on a flat batch of 256 examples, fp32 vs bf16, and their ratio."""
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        total = 0.0
        for c, hw in ((16, 32), (32, 16), (64, 8)):
            x = torch.randn(256, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c, c, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            F.conv2d(x, w, padding=1)
            _, seconds = _timed(lambda x=x, w=w: [F.conv2d(x, w, padding=1) for _ in range(reps)], device)
            total += seconds / reps
        times[str(dtype).removeprefix("torch.")] = total
    return {"float32_s": times["float32"], "bfloat16_s": times["bfloat16"],
            "bf16_speedup": times["float32"] / times["bfloat16"]}


def run_model(name: str, batch: int, n_coords: int, device: torch.device, delta: float, max_batch: int | None,
              per_param: int, seed: int, delta_dtypes: tuple[str, ...] = ("float32",), rel_err_coords: int = 0,
              count_ops: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MODELS[name]().to(device).train()
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    params = dict(model.named_parameters())
    names = list(params)
    sizes = torch.tensor([params[n].numel() for n in names], dtype=torch.float)
    which = torch.multinomial(sizes, n_coords, replacement=True, generator=gen)
    coords = [(names[w], int(torch.randint(params[names[w]].numel(), (1,), generator=gen))) for w in which.tolist()]
    ours(model, x, y, coords[:4], delta, max_batch)  # warm-up
    a, t_naive = _timed(lambda: naive(model, x, y, coords, delta), device)
    b, t_loop = _timed(lambda: reuse_loop(model, x, y, coords, delta), device)
    _, t_loop_cl = _timed(lambda: reuse_loop(model, x, y, coords, delta, torch.channels_last), device)
    c, t_ours = _timed(lambda: ours(model, x, y, coords, delta, max_batch), device)
    steps, loop_step_seconds, step_queries = project_step(model, x, y, delta, max_batch, per_param, gen,
                                                          delta_dtypes=tuple(dict.fromkeys(("float32", *delta_dtypes))))
    result = {
        "params": int(sizes.sum()),
        "coords": n_coords,
        "queries_per_s": {"naive": n_coords / t_naive, "reuse_loop": n_coords / t_loop,
                          "reuse_loop_channels_last": n_coords / t_loop_cl, "ours": n_coords / t_ours},
        "speedup_vs_reuse_loop": t_loop / t_ours,
        "speedup_vs_reuse_loop_channels_last": t_loop_cl / t_ours,
        "speedup_vs_naive": t_naive / t_ours,
        "max_abs_diff": max(float((a - c).abs().max()), float((b - c).abs().max())),
        "step_seconds_90pct": steps["float32"],
        "step_seconds_90pct_reuse_loop": loop_step_seconds,
        "step_speedup_vs_reuse_loop": loop_step_seconds / steps["float32"],
        "step_queries_90pct": step_queries,
        "step_seconds_90pct_by_delta_dtype": steps,
    }
    if count_ops:
        result.update(ops_per_chunk(model, device))
    if rel_err_coords:
        evaluated = copy.deepcopy(model)
        with torch.no_grad():  # non-trivial running statistics for eval mode
            evaluated.train()(x * 2 + 0.5)
        result["rel_err"] = {
            mode: rel_err(m, x, y, delta, rel_err_coords, torch.Generator().manual_seed(seed + 1), delta_dtypes)
            for mode, m in (("train", model.train()), ("eval", evaluated.eval()))}
        result["rel_err_coords"] = rel_err_coords
    return result


def _full_forward_losses(oracle: dz.ModuleOracle, params: dict[str, Tensor], name: str, idx: Tensor,
                         delta: float) -> tuple[Tensor, bool]:
    """Losses by full forwards: the oracle's batched (``vmap``) path, else one query at a time (``False``)."""
    try:
        return oracle.coordinate_losses(params, name, idx, delta), True
    except RuntimeError:  # e.g. torchvision's in-place `out += identity` under vmap
        return torch.stack([oracle.loss({**params, name: _perturbed(params[name], int(i), delta)})
                            for i in idx.tolist()]), False


def run_graph_model(name: str, batch: int, device: torch.device, delta: float, max_batch: int | None,
                    per_param: int, full_per_param: int, seed: int) -> dict:
    """``graph_models.<name>``: step queries/s (90% sparsity) of the graph engine, the batched full forward and
    the ``stages()`` path (where one exists), and the largest difference between their losses."""
    make, loss_fn = GRAPH_MODELS[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make().to(device).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = (torch.randn(batch, 3, 32, 32, generator=gen) if loss_fn is F.mse_loss
         else torch.randint(0, 10, (batch,), generator=gen)).to(device)
    params = dict(model.named_parameters())
    kwargs = {"max_batch": max_batch}
    makers: dict[str, Callable[[], object]] = {
        "graph": lambda: build_graph_engine(model, loss_fn, x, y, params, **kwargs)}
    if get_stages(model) is not None:
        makers["stages"] = lambda: StagedForward(model, loss_fn, x, y, params, **kwargs)
    makers["graph"]()  # warm-up (and the trace, cached per model)
    engines, seconds = {}, {}
    for key, make_engine in makers.items():
        engines[key], seconds[key] = _timed(make_engine, device)
    if not isinstance(engines["graph"], GraphEngine) or isinstance(engines["graph"], StagedForward):
        raise RuntimeError(f"{name}: build_graph_engine did not give a traced-graph engine")
    oracle = dz.ModuleOracle(model, loss_fn, x, y, feature_reuse=False, max_batch=max_batch)
    _, seconds["full_forward"] = _timed(lambda: oracle.loss(params), device)
    max_diff, queries, batched = 0.0, 0, True
    for pname, n in _sparse_counts(model, 0.1).items():
        numel = params[pname].numel()
        idx = torch.randperm(numel, generator=gen)[: min(n, per_param)].to(device)
        out = {}
        for key, engine in engines.items():
            out[key], sec = _timed(
                lambda engine=engine, idx=idx, pname=pname: engine.coordinate_losses(pname, idx, delta), device)
            seconds[key] += sec * n / idx.numel()
        few = idx[:full_per_param]
        (full, ok), sec = _timed(
            lambda few=few, pname=pname: _full_forward_losses(oracle, params, pname, few, delta), device)
        seconds["full_forward"] += sec * n / few.numel()
        batched = batched and ok
        for key in engines:
            max_diff = max(max_diff, float((out[key][: few.numel()].double() - full.double()).abs().max()))
        queries += n
    return {"params": sum(p.numel() for p in params.values()), "step_queries": queries + 1,
            "step_queries_per_s": {key: (queries + 1) / sec for key, sec in seconds.items()},
            "step_seconds": seconds, "graph_speedup_vs_full_forward": seconds["full_forward"] / seconds["graph"],
            "graph_vs_stages": seconds["stages"] / seconds["graph"] if "stages" in seconds else None,
            "full_forward_batched": batched, "max_abs_diff": max_diff,
            "timed_queries_per_tensor": {"engines": per_param, "full_forward": full_per_param}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--model", default=None, choices=list(GRAPH_MODELS),
                        help="run only this model's graph_models entry")
    parser.add_argument("--graph-models", nargs="*", default=list(GRAPH_MODELS), choices=list(GRAPH_MODELS),
                        help="models of the graph_models section (none: skip it)")
    parser.add_argument("--graph-per-param", type=int, default=8,
                        help="queries timed per tensor on the engines for graph_models")
    parser.add_argument("--full-per-param", type=int, default=2,
                        help="queries timed per tensor on the full forward for graph_models")
    parser.add_argument("--batch", type=int, default=None, help="examples per batch (default: 64 on CPU, 256 on CUDA)")
    parser.add_argument("--coords", type=int, default=128, help="coordinates timed with all three methods")
    parser.add_argument("--per-param", type=int, default=256, help="queries timed per tensor for the projection")
    parser.add_argument("--max-batch", type=int, default=None, help="queries per batched call (default: auto)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mu", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delta-dtypes", nargs="+", default=["float32", "auto", "bfloat16"],
                        choices=["float32", "auto", "bfloat16", "tf32"],
                        help="delta_dtype values timed and checked (auto: the default of ZOModule)")
    parser.add_argument("--rel-err-coords", type=int, default=64,
                        help="coordinates of the error check against a float64 loop (0: skip it)")
    parser.add_argument("--count-ops", action=argparse.BooleanOptionalAction, default=True,
                        help="count dispatched ops and syncs per chunk")
    parser.add_argument("--conv-reps", type=int, default=10, help="repetitions of the fp32-vs-bf16 convolution timing")
    parser.add_argument("--out", default=None,
                        help="write the JSON here (default on CUDA: benchmarks/results/cge_throughput_cuda.json)")
    parser.add_argument("--avx2", action="store_true",
                        help="on CPU, also rerun the same figures in a child process on the AVX2 kernels "
                             f"({' '.join(f'{k}={v}' for k, v in AVX2_ENV.items())}), under the key 'avx2'")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device} needs a CUDA GPU, but torch.cuda.is_available() is False "
                     f"(torch {torch.__version__}); run on a machine with one, or use --device cpu.")
    if "tf32" in args.delta_dtypes and device.type != "cuda":
        parser.error("--delta-dtypes tf32 needs --device cuda (TF32 is a CUDA tensor-core format).")
    batch = args.batch or (256 if device.type == "cuda" else 64)
    out = args.out or ("benchmarks/results/cge_throughput_cuda.json" if device.type == "cuda" else None)
    with fp32_precision():  # baselines and ours alike in true fp32 (no TF32), whatever the global settings
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "compiled_differences": fused.compiling_enabled(device),  # DZ_COMPILE_DIFFERENCES=0: the eager ones
            "load_before": os.getloadavg(),
            "batch": batch,
            "matmul_gflops": matmul_gflops(device),
            "conv_fp32_vs_bf16": conv_bf16_speedup(device, args.conv_reps),
        }
        for name in [] if args.model else args.models:
            result[name] = run_model(name, batch, args.coords, device, args.mu, args.max_batch, args.per_param,
                                     args.seed, tuple(args.delta_dtypes), args.rel_err_coords, args.count_ops)
        start = time.perf_counter()
        result["graph_models"] = {
            name: run_graph_model(name, batch, device, args.mu, args.max_batch, args.graph_per_param,
                                  args.full_per_param, args.seed)
            for name in ([args.model] if args.model else args.graph_models)}
        result["graph_models_seconds"] = time.perf_counter() - start
        result["compile_failures"] = fused.compile_failures()
    result["load_after"] = os.getloadavg()
    if args.avx2 and device.type == "cpu":
        result["avx2"] = _rerun_on_avx2(argv if argv is not None else sys.argv[1:])
    print(json.dumps(result))
    if out is not None:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
"""The kernels an AVX2-only CPU runs (ATen's and oneDNN's), selectable on any x86 CPU."""


def _rerun_on_avx2(argv: list[str]) -> dict:
    """The same benchmark in a child process on the AVX2 kernels (its JSON, ``--avx2`` and ``--out`` dropped)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif arg != "--avx2" and not arg.startswith("--out="):
            rest.append(arg)
    child = subprocess.run([sys.executable, "-m", "benchmarks.cge_throughput", *rest], env={**os.environ, **AVX2_ENV},
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
