"""The README's pictures, regenerated: ``python -m benchmarks.figures`` (a few minutes on two CPU cores).

Writes PNGs to ``--out`` (default ``docs/images/``) and prints one JSON object as its last line with what each
figure shows (accuracies, query counts, MAEs, seconds):

* ``loss_vs_queries_digits.png``: training loss of dense CGE, ZO-GraSP 90% sparse CGE, RGE (q = 64) and FO on the
  digits configs, against optimizer steps and against loss queries (``--epochs``, 30 as in the configs). The
  legend gives each method's test accuracy; ZO-GraSP's is the 3-seed mean ± std that the README quotes, read from
  ``benchmarks/results/zo_grasp_cpu.json`` (its seed-to-seed spread is wider than the gaps between the other
  methods), the others are this run's (one seed, as in the README);
* ``lpr_resnet20.png``: ZO-GraSP's and FO-GraSP's layer-wise pruning ratios at 90% sparsity on a fresh ResNet-20
  (CIFAR-10-shaped stand-in data, as in ``benchmarks.zo_grasp``);
* ``certified_accuracy_digits.png``: certified accuracy against the l2 radius of the black-box defense on digits
  (no denoiser, FO-DS, ZO-DS; ``benchmarks.defense_digits`` with a small ``--n``);
* ``vorticity_sol.png`` and ``mae_over_time_sol.png``: the SOL test figures (reference, uncorrected source and
  corrected vorticity; MAE over rollout time), the same figures ``dz test`` logs to TensorBoard, of a NON corrector
  trained for the study's 438 steps (seconds; ``--sol-method zo_sol`` trains ZO-SOL instead, about 2 s per step).
  The reference data are generated once into ``--cache`` (the configs' cache folder by default, about a minute).

``--only`` picks figures: ``digits``, ``lpr``, ``defense``, ``sol``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import ROOT
from dz_lightning.figures import lpr_figure, new_figure, save_figure

DIGITS = {
    "dense CGE": ("configs/classification/digits.yaml", []),
    "ZO-GraSP 90% CGE": ("configs/classification/digits_zo_grasp90.yaml", []),
    "RGE, q = 64": ("configs/classification/digits_rge.yaml", ["--model.init_args.q", "64"]),
    "FO (backprop)": ("configs/classification/digits_fo.yaml", []),
}


# the result a method's legend quotes instead of this run's single seed: (results file, key under "digits")
REFERENCE = {"ZO-GraSP 90% CGE": ("zo_grasp_cpu.json", "zo_grasp90")}


def reference_accuracy(label: str, results_dir: Path = ROOT / "benchmarks" / "results") -> dict | None:
    """``{"mean", "std", "seeds", "source"}``: the multi-seed test accuracy of ``label`` the README quotes, if any."""
    if label not in REFERENCE:
        return None
    name, key = REFERENCE[label]
    entry = json.loads((results_dir / name).read_text())["digits"][key]
    return {"mean": entry["mean"], "std": entry["std"], "seeds": len(entry["by_seed"]),
            "source": f"benchmarks/results/{name}"}


class LossCurve(L.Callback):
    """Mean training loss of every epoch, with the optimizer steps and the loss queries spent by its end."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._losses.append(float(loss))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        queries = int(getattr(pl_module, "queries_total", 0))
        queries += sum(int(getattr(cb, "queries", 0)) for cb in trainer.callbacks)  # ZO-GraSP's scoring
        self.rows.append({"epoch": trainer.current_epoch + 1, "step": trainer.global_step, "queries": queries,
                          "loss": sum(self._losses) / max(len(self._losses), 1)})
        self._losses = []


def digits_curves(epochs: int, workdir: Path) -> dict[str, dict]:
    """Train the four digits configs; their loss curves and test accuracies."""
    from dz_lightning.cli import build_cli

    results = {}
    for label, (config, extra) in DIGITS.items():
        folder = workdir / label.replace(" ", "_").replace(",", "").replace("%", "")
        folder.mkdir(parents=True)
        cwd = os.getcwd()
        os.chdir(folder)  # checkpoints and ratio files of the configs land here
        try:
            start = time.perf_counter()
            cli = build_cli(["--config", str(ROOT / config), "--trainer.max_epochs", str(epochs),
                             "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                             "--trainer.enable_model_summary", "false", *extra], run=False)
            curve = LossCurve()
            cli.trainer.callbacks.append(curve)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            seconds = time.perf_counter() - start
            test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        finally:
            os.chdir(cwd)
        results[label] = {"curve": curve.rows, "test_acc": float(test["test/acc"]), "seconds": seconds,
                          "queries": curve.rows[-1]["queries"], "reference": reference_accuracy(label)}
        print(f"# digits {label}: test acc {results[label]['test_acc']:.3f}, {results[label]['queries']:,} "
              f"queries, {seconds:.0f} s", flush=True)
    return results


def digits_figure(results: dict[str, dict]) -> Any:
    fig = new_figure(9.0, 3.6)
    by_step, by_queries = fig.subplots(1, 2)
    for label, r in results.items():
        rows = r["curve"]
        ref = r.get("reference")
        name = f"{label}: {100 * r['test_acc']:.1f}% test" if ref is None else \
            f"{label}: {100 * ref['mean']:.1f} ± {100 * ref['std']:.1f}% test ({ref['seeds']} seeds)"
        style = "--" if r["queries"] == 0 else "-"  # FO dashed: dense CGE follows it almost exactly
        line = by_step.plot([row["step"] for row in rows], [row["loss"] for row in rows], style, label=name)[0]
        if r["queries"] > 0:
            by_queries.plot([row["queries"] for row in rows], [row["loss"] for row in rows], color=line.get_color(),
                            label=f"{label}: {r['queries']:,} queries")
        else:  # FO spends no loss queries: its final loss as a reference level
            by_queries.axhline(rows[-1]["loss"], color=line.get_color(), linestyle="--",
                               label=f"{label}: final loss (no queries)")
    by_step.set_xlabel("optimizer steps")
    by_queries.set_xlabel("loss queries (log scale)")
    by_queries.set_xscale("log")
    for ax in (by_step, by_queries):
        ax.set_ylabel("training loss (epoch mean)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("digits MLP (2,410 parameters), 30 epochs: the same steps cost very different numbers of queries",
                 fontsize=9)
    fig.tight_layout()
    return fig


def lpr_resnet20(seed: int = 0, per_class: int = 10, q: int = 96) -> tuple[Any, dict]:
    """ZO-GraSP vs FO-GraSP LPRs at 90% sparsity on a fresh ResNet-20, scored on CIFAR-shaped stand-in images.

    The stand-in data are class-dependent Gaussian blobs (a class-specific mean image plus noise), as in
    ``benchmarks.zo_grasp``: real CIFAR-10 files cannot be downloaded here.
    """
    import torch.nn.functional as F
    from scipy.stats import spearmanr

    import dz_lightning as dz
    from dz_lightning import sparsity as sp
    from dz_lightning.models import resnet20

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = resnet20().train()
    means = torch.randn(10, 3, 32, 32, generator=gen) * 0.5
    y = torch.arange(10).repeat_interleave(per_class)
    x = means[y] + torch.randn(len(y), 3, 32, 32, generator=gen)
    names = sp.prunable_parameters(model)
    params = dict(model.named_parameters())
    lpr_fo = sp.layerwise_ratios(sp.grasp_scores(model, F.cross_entropy, x, y, names), 0.9)
    scores, queries = sp.zo_grasp_scores(dz.ModuleOracle(model, F.cross_entropy, x, y), params, names, q=q,
                                         mu=5e-3, generator=torch.Generator().manual_seed(seed))
    lpr_zo = sp.layerwise_ratios(scores, 0.9)
    rho = float(spearmanr([lpr_zo[n] for n in names], [lpr_fo[n] for n in names]).statistic)
    fig = lpr_figure({"ZO-GraSP (loss queries)": lpr_zo, "FO-GraSP (autograd)": lpr_fo},
                     f"ResNet-20 at 90% sparsity: layer-wise pruning ratios (Spearman {rho:.2f}; ZO-GraSP used "
                     f"{queries} queries)")
    return fig, {"spearman": rho, "queries": queries}


def defense_curves(n: int, certify: int, workdir: Path) -> tuple[Any, dict]:
    """Run the digits defense benchmark with a small ``n``; curves from the per-image certified radii."""
    from dz_lightning.tasks.defense import certified_accuracy_figure

    from benchmarks.defense_digits import main as defense_main

    out = defense_main(["--n", str(n), "--certify", str(certify), "--output-dir", str(workdir)])
    radii = [i / 200 for i in range(0, 161)]  # 0 to 0.8
    labels = {"none": "no denoiser", "fo_ds": "FO-DS (backprop through f)", "zo_ds": "ZO-DS (f as a black box)"}
    curves = {}
    for key, label in labels.items():
        rows = list(csv.DictReader(open(workdir / key / "certification" / "certify.csv")))
        curves[label] = {r: sum(int(row["correct"]) and float(row["radius"]) >= r for row in rows) / len(rows)
                         for r in radii}
    fig = certified_accuracy_figure(curves, f"digits, sigma {out['sigma']}, {certify} test images, n = {n:,}, "
                                            f"alpha = {out['alpha']}")
    return fig, {k: out[k] for k in ("radii", "none", "fo_ds", "zo_ds", "queries", "seconds")}


def sol_figures(cache: str, method: str, steps: int, workdir: Path, out: Path) -> dict:
    """Train a corrector briefly on the default Karman data; copy its test figures (as ``dz test`` logs them).

    ``method="non"`` trains NON (backprop on one-step pairs, seconds) for ``steps`` optimizer steps with Adam and a
    cosine decay; ``"zo_sol"`` trains ZO-SOL (90% sparse CGE through the black-box solver, about 2 s per step on a
    CPU), which needs a few hundred steps to beat the uncorrected solver (``benchmarks.sol_study``).
    """
    from dz_lightning.callbacks.zo_grasp import ZOGraSP
    from dz_lightning.tasks.sol import ZOSOL, KarmanDataModule, NONCorrector, SourceOnly

    from dz_lightning.models import SOLCorrector

    start = time.perf_counter()
    data = KarmanDataModule(cache_dir=cache)
    data.setup()
    seconds = {"data": time.perf_counter() - start}

    def trainer(**kw: Any) -> L.Trainer:
        return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=0, default_root_dir=str(workdir), **kw)

    src = trainer().test(SourceOnly(), data, verbose=False)[0]["test/mae"]
    L.seed_everything(0, verbose=False)
    cosine = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, steps)  # noqa: E731
    if method == "non":
        module = NONCorrector(SOLCorrector(width=4), optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
                              lr_scheduler=cosine)
        callbacks = []
    else:
        module = ZOSOL(SOLCorrector(width=4), nonfinite="skip", optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
                       lr_scheduler=cosine)
        callbacks = [ZOGraSP(sparsity=0.9, method="uniform", resample_every_n_steps=1)]
    start = time.perf_counter()
    trainer(max_steps=steps, callbacks=callbacks).fit(module, data)
    seconds[method] = time.perf_counter() - start
    mae = trainer().test(module, data, verbose=False)[0]["test/mae"]
    name = type(module).__name__
    for figure in ("vorticity", "mae_over_time"):
        shutil.copyfile(workdir / f"{figure}_{name}.png", out / f"{figure}_sol.png")
    return {"mae": {"src": src, method: mae}, "method": method, "steps": steps,
            "queries": int(getattr(module, "queries_total", 0)), "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--only", nargs="*", choices=["digits", "lpr", "defense", "sol"],
                        default=["digits", "lpr", "defense", "sol"])
    parser.add_argument("--epochs", type=int, default=30, help="digits training epochs")
    parser.add_argument("--lpr-q", type=int, default=96, help="ZO-GraSP's RGE directions for the ResNet-20 LPRs")
    parser.add_argument("--n", type=int, default=2000, help="defense: Monte Carlo samples per certified image")
    parser.add_argument("--certify", type=int, default=100, help="defense: test images certified")
    parser.add_argument("--cache", default=str(ROOT / "data" / "karman"), help="SOL reference data cache")
    parser.add_argument("--sol-method", choices=["non", "zo_sol"], default="non",
                        help="SOL: the corrector drawn beside the reference and the uncorrected solver")
    parser.add_argument("--sol-steps", type=int, default=438, help="SOL: the corrector's optimizer steps")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "digits" in args.only:
            start = time.perf_counter()
            results = digits_curves(args.epochs, Path(tmp) / "digits")
            save_figure(digits_figure(results), out / "loss_vs_queries_digits.png")
            summary["digits"] = {k: {"test_acc": r["test_acc"], "queries": r["queries"], "seconds": r["seconds"],
                                     "legend_test_acc": r["reference"]} for k, r in results.items()}
            summary["digits"]["seconds"] = time.perf_counter() - start
        if "lpr" in args.only:
            start = time.perf_counter()
            fig, summary["lpr"] = lpr_resnet20(q=args.lpr_q)
            save_figure(fig, out / "lpr_resnet20.png")
            summary["lpr"]["seconds"] = time.perf_counter() - start
        if "defense" in args.only:
            fig, summary["defense"] = defense_curves(args.n, args.certify, Path(tmp) / "defense")
            save_figure(fig, out / "certified_accuracy_digits.png")
        if "sol" in args.only:
            summary["sol"] = sol_figures(args.cache, args.sol_method, args.sol_steps, Path(tmp) / "sol", out)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
