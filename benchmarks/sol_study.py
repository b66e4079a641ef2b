"""Solver-in-the-loop study: SRC vs NON vs ZO-SOL vs FO-SOL on the Karman wake flow (one process, CPU-sized).

Generates (or reuses) the cached reference data, trains NON, ZO-SOL and FO-SOL for the same number of epochs with
the settings of configs/sol/, evaluates all four methods on the test simulations (MAE against the reference over
all time steps), writes a bar chart, and prints as its last line
``{"mae": {"src", "non", "zo_sol", "fo_sol"}, "queries": int, "seconds": float, ...}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from callbacks.zo_grasp import ZOGraSP
from dz_lightning.models import SOLCorrector
from tasks.sol import FOSOL, ZOSOL, KarmanDataModule, NONCorrector, SourceOnly


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--cache", default="data/karman")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data = KarmanDataModule(cache_dir=args.cache)
    data.prepare_data()
    seconds = {"data": time.perf_counter() - start}
    root = tempfile.mkdtemp()

    def trainer(epochs: int = 1, callbacks: list | None = None) -> L.Trainer:
        return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                         callbacks=callbacks or [], default_root_dir=root)

    adam = lambda p: torch.optim.Adam(p, lr=1e-3)  # noqa: E731
    results, queries = {}, 0
    results["src"] = trainer().test(SourceOnly(), data, verbose=False)[0]["test/mae"]
    for name, make in (("non", lambda: NONCorrector(SOLCorrector(width=args.width), optimizer=adam)),
                       ("zo_sol", lambda: ZOSOL(SOLCorrector(width=args.width), optimizer=adam, nonfinite="skip")),
                       ("fo_sol", lambda: FOSOL(SOLCorrector(width=args.width), optimizer=adam))):
        L.seed_everything(args.seed, verbose=False)
        module = make()
        callbacks = [ZOGraSP(sparsity=args.sparsity, method="uniform", resample_every_n_epochs=1)] \
            if name == "zo_sol" and args.sparsity > 0 else []
        t = time.perf_counter()
        trainer(args.epochs, callbacks).fit(module, data)
        seconds[name] = time.perf_counter() - t
        results[name] = trainer().test(module, data, verbose=False)[0]["test/mae"]
        if name == "zo_sol":
            queries = module.queries_total
        print(f"{name}: MAE {results[name]:.5f} in {seconds[name]:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(results, out / "sol_study.png")
    result = {"mae": results, "queries": queries, "seconds": time.perf_counter() - start,
              "seconds_by_method": seconds, "epochs": args.epochs,
              "relative_to_non": results["zo_sol"] / results["non"] - 1,
              "relative_to_src": results["zo_sol"] / results["src"] - 1}
    print(json.dumps(result))
    return result


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
