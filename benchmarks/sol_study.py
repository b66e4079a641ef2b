"""Solver-in-the-loop study: SRC vs NON vs ZO-SOL vs FO-SOL on the Karman wake flow (one process, CPU-sized).

Protocol (no choice is made on the test simulations):

1. Reference data are generated once (or reused from the cache): training windows, held-out *validation*
   simulations and *test* simulations, each set with its own Reynolds numbers.
2. Learning-rate selection: with the first of ``--seeds``, every method trains once per learning rate of its grid
   (``--non-lrs``, ``--fo-lrs``, ``--zo-lrs``), all for the same number of epochs (the same budget), and keeps the
   rate with the lowest validation MAE. ZO-SOL's layer-wise pruning ratios are chosen the same way: its grid runs
   with the first of ``--zo-ratios``, then every other ratio method runs at the chosen rate.
3. Every method then trains with its chosen settings for every seed and is evaluated once on the test simulations
   (the selection run of the first seed is that seed's run). SRC has nothing to train.

Writes ``--json`` after every run (a partial study is never lost) and prints the final JSON as its last line:
``{"test_mae": {method: {"mean", "std", "min", "max", "by_seed"}}, "selection": {...}, "ordering": [...], ...}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from dz_lightning.callbacks.zo_grasp import ZOGraSP
from dz_lightning.tasks.karman import KarmanSolver
from dz_lightning.tasks.sol import FOSOL, ZOSOL, KarmanDataModule, NONCorrector, SOLOracle, SourceOnly

from dz_lightning.models import SOLCorrector

METHODS = ("non", "zo_sol", "fo_sol")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> dict:
    """Run the study; Lightning's scratch folder is removed afterwards, also when a run fails."""
    root = tempfile.mkdtemp(prefix="sol_study_")
    try:
        return _study(argv, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _study(argv: list[str] | None, root: str) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cache", default="data/karman")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the first one selects the settings")
    parser.add_argument("--non-lrs", default="1e-3,3e-3", help="NON's Adam learning-rate grid")
    parser.add_argument("--fo-lrs", default="1e-3,3e-3", help="FO-SOL's Adam learning-rate grid")
    parser.add_argument("--zo-lrs", default="3e-3,1e-2",
                        help="ZO-SOL's Adam learning-rate grid (each step estimates only 1 - sparsity of the weights)")
    parser.add_argument("--zo-ratios", default="zo_grasp,uniform",
                        help="ZO-SOL's layer-wise pruning ratio methods (ZOGraSP `method`), chosen on validation")
    parser.add_argument("--mu", type=float, default=1e-4, help="ZO-SOL finite-difference step (see ZOSOL)")
    parser.add_argument("--difference", default="forward", choices=["forward", "central"],
                        help="ZO-SOL finite differences; central ones cost twice the queries")
    parser.add_argument("--schedule", default="cosine", choices=["constant", "cosine"],
                        help="learning rate of every method: cosine decay to 0 over the run's steps, or constant")
    parser.add_argument("--warmup", type=int, default=250, help="reference steps discarded before recording")
    parser.add_argument("--window", type=int, default=8, help="unrolled solver steps m per training window")
    parser.add_argument("--steps", type=int, default=300,
                        help="recorded steps per simulation (the validation and test MAE cover all of them)")
    parser.add_argument("--resample-steps", type=int, default=1,
                        help="ZO-SOL redraws its sparse masks every N optimizer steps (0: every epoch instead)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods to train (SRC is always evaluated)")
    parser.add_argument("--out", default="benchmarks/out", help="folder of the bar chart")
    parser.add_argument("--json", default=None, help="also write the results here, updated after every run")
    parser.add_argument("--long-steps", type=int, default=0,
                        help="also roll the chosen runs out this many steps on the test Reynolds numbers (0: skip)")
    parser.add_argument("--timing", action="store_true", help="also time batched vs looped ZO-SOL queries")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not seeds:
        parser.error("--seeds needs at least one seed")
    grids = {"non": _floats(args.non_lrs), "fo_sol": _floats(args.fo_lrs), "zo_sol": _floats(args.zo_lrs)}
    zo_ratios = [r for r in args.zo_ratios.split(",") if r]
    if not zo_ratios or set(zo_ratios) - {"zo_grasp", "uniform", "random"}:
        parser.error(f"--zo-ratios {args.zo_ratios!r}: choose from zo_grasp, uniform, random")

    start = time.perf_counter()
    data = KarmanDataModule(cache_dir=args.cache, steps=args.steps, window=args.window, warmup=args.warmup)
    data.setup()  # generates the data on a cold cache, else loads it once
    long = None
    if args.long_steps:
        long = KarmanDataModule(cache_dir=args.cache, steps=args.steps, window=args.window, warmup=args.warmup,
                                test_steps=args.long_steps)
        long.setup()
    total_steps = len(data.train_dataloader()) * args.epochs
    val = (data.data["val"], data.data["val_re"])
    test = (data.data["test"], data.data["test_re"])

    def train(method: str, lr: float, seed: int, ratios: str | None) -> tuple[Any, dict]:
        L.seed_everything(seed, verbose=False)
        adam = lambda p: torch.optim.Adam(p, lr=lr)  # noqa: E731
        cosine = (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, total_steps)) \
            if args.schedule == "cosine" else None
        corrector = SOLCorrector(width=args.width)
        callbacks: list = []
        if method == "non":
            module: Any = NONCorrector(corrector, optimizer=adam, lr_scheduler=cosine)
        elif method == "fo_sol":
            module = FOSOL(corrector, optimizer=adam, lr_scheduler=cosine)
        else:
            module = ZOSOL(corrector, optimizer=adam, nonfinite="skip", mu=args.mu, difference=args.difference,
                           lr_scheduler=cosine)
            if args.sparsity > 0:
                callbacks = [ZOGraSP(sparsity=args.sparsity, method=ratios, resample_every_n_epochs=1,
                                     resample_every_n_steps=args.resample_steps or None, seed=seed)]
        t = time.perf_counter()
        L.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                  callbacks=callbacks, default_root_dir=root).fit(module, data)
        record = {"lr": lr, "seed": seed, "seconds": time.perf_counter() - t,
                  "val_mae": float(module.rollout_mae(*val)[1])}
        if method == "zo_sol":
            record["ratios"] = ratios
            record["queries"] = module.queries_total
            if callbacks:
                record["lpr"] = callbacks[0].ratios
                record["zo_grasp_queries"] = callbacks[0].queries
        print(f"{method} lr={lr:g} seed={seed} {ratios or ''}: val MAE {record['val_mae']:.5f} in "
              f"{record['seconds']:.0f} s", flush=True)
        return module, record

    source = SourceOnly()
    result: dict[str, Any] = {
        "protocol": "lr (and ZO-SOL ratios) chosen on validation MAE with the first seed, same epochs for all; "
                    "test MAE once per seed with the chosen settings",
        "src": {"val_mae": float(source.rollout_mae(*val)[1]), "test_mae": float(source.rollout_mae(*test)[1])},
        "selection": {}, "test_mae": {}, "seconds_by_method": {"data": time.perf_counter() - start},
        "settings": {"epochs": args.epochs, "optimizer_steps": total_steps, "mu": args.mu,
                     "difference": args.difference, "sparsity": args.sparsity, "schedule": args.schedule,
                     "window": args.window, "steps": args.steps, "warmup": args.warmup,
                     "resample_steps": args.resample_steps, "width": args.width, "seeds": seeds,
                     "lr_grids": {m: grids[m] for m in methods}, "zo_ratios": zo_ratios,
                     "train_re": data.train_re, "val_re": data.val_re,
                     "test_re": data.test_re},
    }
    if long is not None:
        result[f"src_mae_{args.long_steps}_steps"] = float(source.rollout_mae(long.data["test"],
                                                                              long.data["test_re"])[1])

    def save() -> None:
        result["seconds"] = time.perf_counter() - start
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2))

    for method in methods:
        runs: list[dict] = []
        result["selection"][method] = runs
        ratios = zo_ratios[0] if method == "zo_sol" else None
        candidates: list[tuple[float, str | None]] = [(lr, ratios) for lr in grids[method]]
        trained: list[Any] = []

        def select(candidates: list[tuple[float, str | None]], runs: list[dict] = runs,
                   trained: list[Any] = trained, method: str = method) -> int:
            for lr, ratios in candidates:
                module, record = train(method, lr, seeds[0], ratios)
                runs.append(record)
                trained.append(module)
                save()
            return min(range(len(runs)), key=lambda i: runs[i]["val_mae"])

        best = select(candidates)
        if method == "zo_sol" and len(zo_ratios) > 1:
            best = select([(runs[best]["lr"], r) for r in zo_ratios[1:]])
        chosen = {"lr": runs[best]["lr"], "ratios": runs[best].get("ratios")}
        by_seed = {seeds[0]: float(trained[best].rollout_mae(*test)[1])}
        modules = {seeds[0]: trained[best]}
        seconds = [runs[best]["seconds"]]
        seed_runs = [runs[best]]
        result["test_mae"][method] = _summary(chosen, by_seed, seed_runs)
        save()
        for seed in seeds[1:]:
            module, record = train(method, chosen["lr"], seed, chosen["ratios"])
            by_seed[seed] = float(module.rollout_mae(*test)[1])
            modules[seed] = module
            seconds.append(record["seconds"])
            seed_runs.append(record)
            result["test_mae"][method] = _summary(chosen, by_seed, seed_runs)
            save()
        result["seconds_by_method"][method] = {"per_seed_mean": statistics.fmean(seconds),
                                               "selection_total": sum(r["seconds"] for r in runs)}
        if long is not None:
            result["test_mae"][method][f"mae_{args.long_steps}_steps"] = {
                s: float(m.rollout_mae(long.data["test"], long.data["test_re"])[1]) for s, m in modules.items()}
        print(f"{method}: chosen {chosen}, test MAE {result['test_mae'][method]['mean']:.5f} "
              f"+- {result['test_mae'][method]['std']:.5f} over {len(by_seed)} seed(s)", flush=True)
        save()

    means = {"src": result["src"]["test_mae"], **{m: v["mean"] for m, v in result["test_mae"].items()}}
    result["ordering"] = sorted(means, key=means.get)
    if args.timing:
        result["seconds_by_method"]["batched_vs_loop"] = batched_vs_loop(data, args.width)
    save()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(means, {m: v["std"] for m, v in result["test_mae"].items()}, out / "sol_study.png")
    print(json.dumps(result))
    return result


def _summary(chosen: dict, by_seed: dict[int, float], runs: list[dict]) -> dict[str, Any]:
    values = list(by_seed.values())
    summary = {"chosen": chosen, "by_seed": by_seed, "mean": statistics.fmean(values),
               "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
               "val_mae_by_seed": {r["seed"]: r["val_mae"] for r in runs}}
    if "queries" in runs[0]:
        summary["queries_per_run"] = runs[0]["queries"]
    return summary


def batched_vs_loop(data: KarmanDataModule, width: int, k: int = 32) -> dict[str, float]:
    """Seconds for ``k`` perturbed ZO-SOL queries on one batch: one PhiFlow batch of ``k * B`` simulations vs a loop.

    Both paths are warmed up first (PhiFlow traces the jit-compiled step once per batch shape).
    """
    data.setup()
    windows, re = next(iter(data.train_dataloader()))
    corrector = SOLCorrector(width=width)
    params = {n: p.detach() for n, p in corrector.named_parameters()}
    name = next(reversed(params))  # the last layer's bias: every perturbation changes the loss
    stacked = params[name] + 1e-3 * torch.randn(k, *params[name].shape)
    oracle = SOLOracle(corrector, KarmanSolver(data.resolution), windows, re, max_batch=k)
    oracle.losses(params, {name: stacked})
    oracle.loss({**params, name: stacked[0]})
    t = time.perf_counter()
    batched = oracle.losses(params, {name: stacked})
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    loop = torch.stack([oracle.loss({**params, name: w}) for w in stacked])
    t_loop = time.perf_counter() - t
    return {"queries": k, "batched": t_batched, "loop": t_loop, "speedup": t_loop / t_batched,
            "max_abs_diff": float((batched - loop).abs().max())}


def _plot(means: dict[str, float], stds: dict[str, float], path: Path) -> None:
    from dz_lightning.figures import new_figure, save_figure

    names: list[str] = list(means)
    fig = new_figure(4.5, 3.0)
    ax = fig.add_subplot()
    ax.bar(names, [means[n] for n in names], yerr=[stds.get(n, 0.0) for n in names], capsize=3)
    ax.set_ylabel("test MAE vs reference")
    ax.set_title("Karman wake, solver in the loop")
    fig.tight_layout()
    save_figure(fig, path)

if __name__ == "__main__":
    main()
