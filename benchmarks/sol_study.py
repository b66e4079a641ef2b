"""Solver-in-the-loop study: SRC vs NON vs ZO-SOL vs FO-SOL on the Karman wake flow (one process, CPU-sized).

Generates (or reuses) the cached reference data, trains NON, ZO-SOL and FO-SOL for the same number of epochs with
the settings of configs/sol/, evaluates all four methods on the test simulations (MAE against the reference over
all recorded time steps; ``--long-steps`` adds a longer rollout of the same Reynolds numbers), writes a bar chart,
and prints as its last line ``{"mae": {"src", "non", "zo_sol", "fo_sol"}, "queries": int, "seconds": float, ...}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from dz_lightning.callbacks.zo_grasp import ZOGraSP
from dz_lightning.tasks.karman import KarmanSolver
from dz_lightning.tasks.sol import FOSOL, ZOSOL, KarmanDataModule, NONCorrector, SOLOracle, SourceOnly

from dz_lightning.models import SOLCorrector


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
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of NON and FO-SOL")
    parser.add_argument("--zo-lr", type=float, default=3e-3,
                        help="Adam learning rate of ZO-SOL: each step estimates only 1 - sparsity of the weights")
    parser.add_argument("--mu", type=float, default=1e-4, help="ZO-SOL finite-difference step (see ZOSOL)")
    parser.add_argument("--difference", default="forward", choices=["forward", "central"],
                        help="ZO-SOL finite differences; central ones cost twice the queries")
    parser.add_argument("--schedule", default="cosine", choices=["constant", "cosine"],
                        help="learning rate of every method: cosine decay to 0 over the run's steps, or constant")
    parser.add_argument("--window", type=int, default=8, help="unrolled solver steps m per training window")
    parser.add_argument("--steps", type=int, default=300,
                        help="recorded steps per simulation, training and test (the test MAE covers all of them)")
    parser.add_argument("--resample-steps", type=int, default=1,
                        help="ZO-SOL redraws its sparse masks every N optimizer steps (0: every epoch instead)")
    parser.add_argument("--methods", default="non,zo_sol,fo_sol",
                        help="comma-separated methods to train (SRC is always evaluated)")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--long-steps", type=int, default=0,
                        help="also roll every method out this many steps on the test Reynolds numbers (0: skip); "
                             "the regular test covers the --steps recorded steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - {"non", "zo_sol", "fo_sol"}
    if unknown:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from non, zo_sol, fo_sol")
    start = time.perf_counter()
    data = KarmanDataModule(cache_dir=args.cache, steps=args.steps, window=args.window)
    data.setup()  # generates the data on a cold cache, else loads it once
    long = None
    if args.long_steps:
        long = KarmanDataModule(cache_dir=args.cache, steps=args.steps, test_steps=args.long_steps)
        long.setup()
    seconds = {"data": time.perf_counter() - start}

    def trainer(epochs: int = 1, callbacks: list | None = None) -> L.Trainer:
        return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         callbacks=callbacks or [], default_root_dir=root)

    adam = lambda p: torch.optim.Adam(p, lr=args.lr)  # noqa: E731
    zo_adam = lambda p: torch.optim.Adam(p, lr=args.zo_lr)  # noqa: E731
    total_steps = len(data.train_dataloader()) * args.epochs
    cosine = (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, total_steps)) \
        if args.schedule == "cosine" else None
    results, long_results, queries = {}, {}, 0
    source = SourceOnly()
    results["src"] = trainer().test(source, data, verbose=False)[0]["test/mae"]
    if long is not None:
        long_results["src"] = _long_mae(source, long)
    for name, make in (("non", lambda: NONCorrector(SOLCorrector(width=args.width), optimizer=adam,
                                                     lr_scheduler=cosine)),
                       ("zo_sol", lambda: ZOSOL(SOLCorrector(width=args.width), optimizer=zo_adam, nonfinite="skip",
                                                  mu=args.mu, difference=args.difference, lr_scheduler=cosine)),
                       ("fo_sol", lambda: FOSOL(SOLCorrector(width=args.width), optimizer=adam, lr_scheduler=cosine))):
        if name not in args.methods.split(","):
            continue
        L.seed_everything(args.seed, verbose=False)
        module = make()
        callbacks = [ZOGraSP(sparsity=args.sparsity, method="uniform", resample_every_n_epochs=1,
                             resample_every_n_steps=args.resample_steps or None)] \
            if name == "zo_sol" and args.sparsity > 0 else []
        t = time.perf_counter()
        trainer(args.epochs, callbacks).fit(module, data)
        seconds[name] = time.perf_counter() - t
        results[name] = trainer().test(module, data, verbose=False)[0]["test/mae"]
        if long is not None:
            long_results[name] = _long_mae(module, long)
        if name == "zo_sol":
            queries = module.queries_total
        print(f"{name}: MAE {results[name]:.5f} in {seconds[name]:.0f} s", flush=True)
    seconds["batched_vs_loop"] = batched_vs_loop(data, args.width)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, out / "sol_study.png")
    result = {"mae": results, "queries": queries, "seconds": time.perf_counter() - start,
              "seconds_by_method": seconds, "epochs": args.epochs,
              "mu": args.mu, "difference": args.difference, "lr": args.lr,
              "zo_lr": args.zo_lr, "sparsity": args.sparsity, "schedule": args.schedule, "window": args.window,
              "resample_steps": args.resample_steps}
    if long is not None:
        result[f"mae_{args.long_steps}_steps"] = long_results
    if {"zo_sol", "non"} <= set(results):
        result["relative_to_non"] = results["zo_sol"] / results["non"] - 1
    if "zo_sol" in results:
        result["relative_to_src"] = results["zo_sol"] / results["src"] - 1
    print(json.dumps(result))
    return result


def _long_mae(module: SourceOnly | NONCorrector | ZOSOL | FOSOL, long: KarmanDataModule) -> float:
    """MAE against the reference over every step of a long rollout of the test simulations."""
    return float(module.rollout_mae(long.data["test"], long.data["test_re"])[1])


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


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3), dpi=100)
    ax.bar(list(results), list(results.values()))
    ax.set_ylabel("test MAE vs reference")
    ax.set_title("Karman wake, solver in the loop")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
