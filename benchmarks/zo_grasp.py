"""ZO-GraSP vs FO-GraSP layer-wise pruning ratios on a fresh ResNet-20, and the 90% sparsity ablation on digits.

Part 1 scores a freshly initialized ResNet-20 on a class-balanced batch (CIFAR-10-shaped stand-in data by default:
the real files cannot be downloaded here; pass --cifar-root to use them) with FO GraSP (autograd, logits divided by
the original's temperature 200) and with ZO-GraSP (DeepZero's RGE: q directions normalized per tensor, mu = 5e-3),
turns both into layer-wise pruning ratios (LPRs) at 90% sparsity, and compares them per q: ``spearman`` (rank
correlation across layers) and ``lpr_mad`` (mean absolute LPR difference over the layers: the values, not only
their order). Every seed draws a new model, new data and new directions. ``--estimator shared_sphere`` adds the
earlier variant (one unit sphere over all weights scaled by d, the same directions for both estimates).
Part 2 trains digits with ZO-GraSP, FO-GraSP, uniform and random LPRs at 90% sparsity (sparse CGE), same epochs,
for every seed of ``--digits-seeds``.

The last line printed is one JSON object with ``by_seed`` (per seed: ``lpr_fo``, ``lpr_zo``, ``spearman_by_q``,
``lpr_mad_by_q``, ``queries_by_q``, ``seconds``, ``density_error``), ``summary`` (mean, std, min, max over the
seeds of ``spearman`` and ``lpr_mad`` at ``--q``) and ``digits`` (per method: ``by_seed`` and the mean/std/min/max
of the test accuracy).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dz_lightning as dz
from benchmarks.common import ROOT, run_config
from dz_lightning import sparsity as sp
from dz_lightning.models import resnet20


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def stand_in_data(per_class: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-dependent Gaussian blobs shaped like CIFAR-10 (a class-specific mean image plus noise)."""
    means = torch.randn(10, 3, 32, 32, generator=gen) * 0.5
    y = torch.arange(10).repeat_interleave(per_class)
    x = means[y] + torch.randn(len(y), 3, 32, 32, generator=gen)
    return x, y


def cifar_data(root: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    from dz_lightning.tasks.vision import CIFAR10DataModule
    from torch.utils.data import DataLoader

    dm = CIFAR10DataModule(root=root, download=False, augment=False, num_workers=0, batch_size=500)
    dm.setup("fit")
    return sp.class_balanced_sample(DataLoader(dm.train_set, batch_size=500), per_class, 10)


def lpr_mad(a: dict[str, float], b: dict[str, float]) -> float:
    """Mean absolute difference of two LPR dicts over their (common) layers."""
    return float(sum(abs(a[n] - b[n]) for n in a) / len(a))


def _stats(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def shared_sphere_scores(oracle: dz.Oracle, params: dict, names: list[str], q: int, mu: float,
                         generator: torch.Generator) -> tuple[dict, int]:
    """The project's earlier ZO-GraSP, for comparison only: RGE on one unit sphere over all weights scaled by d,
    the same directions for both estimates (``dz.sparsity.zo_grasp_scores`` is DeepZero's estimator)."""
    sub = {n: params[n].detach() for n in names}
    start, restricted = oracle.queries, sp.RestrictedOracle(oracle, params)  # the other parameters stay at `params`
    state = generator.get_state()
    g0 = dz.rge(restricted, sub, q=q, mu=mu, distribution="sphere", generator=generator).grads
    generator.set_state(state)
    shifted = {n: sub[n] + mu * g0[n] for n in names}
    g1 = dz.rge(restricted, shifted, q=q, mu=mu, distribution="sphere", generator=generator).grads
    return {n: -sub[n] * (g1[n] - g0[n]) / mu for n in names}, oracle.queries - start


ESTIMATORS = {"deepzero": sp.zo_grasp_scores, "shared_sphere": shared_sphere_scores}


def lpr_study(args: argparse.Namespace, seed: int, q_values: list[int]) -> dict:
    """LPRs of FO-GraSP and ZO-GraSP (every estimator of ``--estimator``) on one fresh ResNet-20."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = resnet20().train()
    x, y = cifar_data(args.cifar_root, args.per_class) if args.cifar_root else stand_in_data(args.per_class, gen)
    names = sp.prunable_parameters(model)
    params = dict(model.named_parameters())
    lpr_fo = sp.layerwise_ratios(sp.grasp_scores(model, F.cross_entropy, x, y, names, args.temperature),
                                 args.sparsity)
    out: dict = {"lpr_fo": lpr_fo}
    other_fo = {t: sp.layerwise_ratios(sp.grasp_scores(model, F.cross_entropy, x, y, names, t), args.sparsity)
                for t in args.other_temperatures}
    for estimator in args.estimator:
        prefix = "" if estimator == "deepzero" else f"{estimator}_"
        res: dict = {"spearman_by_q": {}, "lpr_mad_by_q": {}, "queries_by_q": {}}
        for q in sorted(set(q_values) | {args.q}):
            oracle = dz.ModuleOracle(model, F.cross_entropy, x, y)
            start = time.perf_counter()
            scores, queries = ESTIMATORS[estimator](oracle, params, names, q=q, mu=args.mu,
                                                    generator=torch.Generator().manual_seed(seed))
            lpr_zo = sp.layerwise_ratios(scores, args.sparsity)
            rho = spearman(list(lpr_fo.values()), [lpr_zo[n] for n in lpr_fo])
            mad = lpr_mad(lpr_zo, lpr_fo)
            res["spearman_by_q"][q], res["lpr_mad_by_q"][q], res["queries_by_q"][q] = rho, mad, queries
            if q == args.q:
                res.update(lpr_zo=lpr_zo, spearman=rho, lpr_mad=mad, queries=queries,
                           seconds=time.perf_counter() - start)
                for t, lpr in other_fo.items():  # the same ZO ratios against FO-GraSP at other temperatures
                    res[f"lpr_mad_fo_t{t:g}"] = lpr_mad(lpr_zo, lpr)
                    res[f"spearman_fo_t{t:g}"] = spearman(list(lpr.values()), [lpr_zo[n] for n in lpr])
            print(f"seed={seed} {estimator} q={q}: spearman {rho:.3f}, lpr_mad {mad:.3f}, {queries} queries, "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        out.update({f"{prefix}{k}": v for k, v in res.items()})
    lpr_zo = out["lpr_zo"] if "lpr_zo" in out else out[f"{args.estimator[0]}_lpr_zo"]
    masks = sp.draw_masks(params, lpr_zo, torch.Generator().manual_seed(seed))
    out["density_error"] = 100 * (sp.realized_density(masks) - (1 - args.sparsity))
    return out


DIGITS_RUNS = {"zo_grasp90": "zo_grasp", "fo_grasp90": "grasp", "uniform90": "uniform", "random90": "random"}


def digits_study(epochs: int, seeds: list[int], runs: list[str]) -> dict:
    """Digits at 90% sparsity with each LPR method, per seed (model init, data order, ratios and masks)."""
    config = ROOT / "configs/classification/digits_zo_grasp90.yaml"
    results: dict = {name: {"by_seed": {}} for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name in runs:
                text = config.read_text().replace("method: zo_grasp", f"method: {DIGITS_RUNS[name]}")
                text = text.replace("seed_everything: 0", f"seed_everything: {seed}")
                text = text.replace("seed: 0", f"seed: {seed}")  # the ZOGraSP callback's and the data's
                path = Path(tmp) / f"{name}_{seed}.yaml"
                path.write_text(text)
                run = run_config(str(path), "--trainer.max_epochs", str(epochs), workdir=str(Path(tmp) / name))
                results[name]["by_seed"][seed] = run
                print(f"digits {name} seed={seed}: {json.dumps(run)}", flush=True)
    for name in runs:
        results[name].update(_stats([r["test_acc"] for r in results[name]["by_seed"].values()]))
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--q", type=int, default=192)
    parser.add_argument("--q-values", type=int, nargs="*", default=[48, 96, 384],
                        help="further q values (first seed only)")
    parser.add_argument("--mu", type=float, default=5e-3)
    parser.add_argument("--temperature", type=float, default=200.0, help="FO-GraSP's logit temperature")
    parser.add_argument("--other-temperatures", type=float, nargs="*", default=[1.0],
                        help="also compare the ZO ratios at --q with FO-GraSP at these temperatures")
    parser.add_argument("--estimator", nargs="+", default=["deepzero"], choices=list(ESTIMATORS))
    parser.add_argument("--per-class", type=int, default=10, help="images per class (the paper uses 25)")
    parser.add_argument("--cifar-root", default=None, help="use real CIFAR-10 files from this directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="ResNet-20 LPR study seeds")
    parser.add_argument("--epochs", type=int, default=30, help="digits training epochs")
    parser.add_argument("--digits-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--digits-runs", nargs="*", default=list(DIGITS_RUNS), choices=list(DIGITS_RUNS))
    parser.add_argument("--skip-lpr", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    result: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("json",)}}
    if not args.skip_lpr:
        result["by_seed"] = {s: lpr_study(args, s, args.q_values if i == 0 else []) for i, s in enumerate(args.seeds)}
        result["summary"] = {}
        for estimator in args.estimator:
            prefix = "" if estimator == "deepzero" else f"{estimator}_"
            result["summary"][estimator] = {
                f"{key}_q{args.q}": _stats([r[f"{prefix}{key}"] for r in result["by_seed"].values()])
                for key in ("spearman", "lpr_mad")}
    if not args.skip_digits and args.digits_seeds:
        result["digits"] = digits_study(args.epochs, args.digits_seeds, args.digits_runs)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
