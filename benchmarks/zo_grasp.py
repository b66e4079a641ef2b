"""ZO-GraSP vs FO-GraSP layer-wise pruning ratios on a fresh ResNet-20, and sparse training on digits.

Part 1 scores a freshly initialized ResNet-20 on a class-balanced batch (CIFAR-10-shaped stand-in data by default:
the real files cannot be downloaded here; pass --cifar-root to use them) with FO GraSP (autograd) and with ZO-GraSP
(RGE, q unit directions, mu = 5e-3), turns both into layer-wise pruning ratios (LPRs) at 90% sparsity, and reports
their Spearman rank correlation across layers, for the default q and for other q. Part 2 trains digits with dense
CGE, ZO-GraSP 90% sparse CGE and random-LPR 90% sparse CGE for the same number of epochs.

The last line printed is one JSON object with ``lpr_zo``, ``lpr_fo``, ``spearman``, ``spearman_by_q``,
``density_error`` (realized minus target density of the drawn masks, in percentage points), ``queries``,
``seconds`` and ``digits``.
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
from benchmarks.common import run_config
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


def lpr_study(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = resnet20().train()
    x, y = cifar_data(args.cifar_root, args.per_class) if args.cifar_root else stand_in_data(args.per_class, gen)
    names = sp.prunable_parameters(model)
    params = dict(model.named_parameters())
    lpr_fo = sp.layerwise_ratios(sp.grasp_scores(model, F.cross_entropy, x, y, names), args.sparsity)
    out: dict = {"lpr_fo": lpr_fo, "spearman_by_q": {}, "queries_by_q": {}}
    for q in sorted(set(args.q_values) | {args.q}):
        oracle = dz.ModuleOracle(model, F.cross_entropy, x, y)
        start = time.perf_counter()
        scores, queries = sp.zo_grasp_scores(oracle, params, names, q=q, mu=args.mu,
                                             generator=torch.Generator().manual_seed(args.seed))
        lpr_zo = sp.layerwise_ratios(scores, args.sparsity)
        rho = spearman(list(lpr_fo.values()), [lpr_zo[n] for n in lpr_fo])
        out["spearman_by_q"][q], out["queries_by_q"][q] = rho, queries
        if q == args.q:
            out.update(lpr_zo=lpr_zo, spearman=rho, queries=queries, seconds=time.perf_counter() - start)
        print(f"q={q}: spearman {rho:.3f}, {queries} queries, {time.perf_counter() - start:.1f} s", flush=True)
    masks = sp.draw_masks(params, out["lpr_zo"], torch.Generator().manual_seed(args.seed))
    out["density_error"] = 100 * (sp.realized_density(masks) - (1 - args.sparsity))
    return out


def digits_study(epochs: int) -> dict:
    runs = {"dense_cge": ("configs/classification/digits.yaml", None),
            "zo_grasp90": ("configs/classification/digits_zo_grasp90.yaml", None),
            "random90": ("configs/classification/digits_zo_grasp90.yaml", ("method: zo_grasp", "method: random")),
            "uniform90": ("configs/classification/digits_zo_grasp90.yaml", ("method: zo_grasp", "method: uniform")),
            "fo_grasp90": ("configs/classification/digits_zo_grasp90.yaml", ("method: zo_grasp", "method: grasp"))}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, swap) in runs.items():
            if swap is not None:
                text = Path(config).read_text().replace(*swap)
                config = str(Path(tmp) / f"{name}.yaml")
                Path(config).write_text(text)
            results[name] = run_config(config, "--trainer.max_epochs", str(epochs), workdir=str(Path(tmp) / name))
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--q", type=int, default=192)
    parser.add_argument("--q-values", type=int, nargs="*", default=[48, 96, 384])
    parser.add_argument("--mu", type=float, default=5e-3)
    parser.add_argument("--per-class", type=int, default=10, help="images per class (the paper uses 25)")
    parser.add_argument("--cifar-root", default=None, help="use real CIFAR-10 files from this directory")
    parser.add_argument("--epochs", type=int, default=30, help="digits training epochs")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = lpr_study(args)
    if not args.skip_digits:
        result["digits"] = digits_study(args.epochs)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
