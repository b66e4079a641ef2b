"""Black-box defense on digits (offline): no denoiser vs FO-DS vs ZO-DS, certified accuracy per radius.

One process: trains the black-box classifier on digits with Gaussian-noise augmentation, then a DnCNN denoiser in
front of it by ZO (sparse CGE through the black box) and by FO (backprop through the classifier), and certifies
``--certify`` test images with all three (Cohen et al. CERTIFY; ``--n`` estimation samples). The last line printed is
``{"radii": [...], "none": [...], "fo_ds": [...], "zo_ds": [...], "queries": int, ...}`` (certified accuracy per
radius, in [0, 1]; ``queries`` = black-box images classified to train the ZO denoiser).
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch
from dz_lightning.callbacks.zo_grasp import ZOGraSP
from dz_lightning.tasks.classification import DigitsDataModule, FOClassifier
from dz_lightning.tasks.defense import BlackBoxClassifier, FODenoisedSmoothing, NoDenoiser, ZODenoisedSmoothing

from dz_lightning.models import MLP, DnCNN


def _trainer(epochs: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                     callbacks=callbacks or [])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--classifier-epochs", type=int, default=40)
    parser.add_argument("--denoiser-epochs", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.0, help="ZO-GraSP sparsity for the ZO denoiser")
    parser.add_argument("--certify", type=int, default=100, help="test images certified")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="benchmarks/out/defense",
                        help="per-variant certify.csv and plots go to <output-dir>/<variant>/certification")
    args = parser.parse_args(argv)
    radii = [0.0, 0.25, 0.5, 0.75]
    cert = {"sigma": args.sigma, "n0": args.n0, "n": args.n, "alpha": args.alpha, "radii": radii,
            "max_certified": args.certify, "certify_seed": args.seed}
    data = DigitsDataModule(batch_size=64, seed=args.seed)
    start = time.perf_counter()

    L.seed_everything(args.seed, verbose=False)
    f = FOClassifier(MLP(64, (64,), 10), train_noise_std=args.sigma,
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    _trainer(args.classifier_epochs).fit(f, data)
    clean_acc = _trainer(1).test(f, data, verbose=False)[0]["test/acc"]
    blackbox = BlackBoxClassifier(fn=f.model.eval())

    results = {}
    none = NoDenoiser(blackbox, output_dir=f"{args.output_dir}/none", **cert)
    _trainer(1).test(none, data, verbose=False)
    results["none"] = none.certified

    L.seed_everything(args.seed, verbose=False)
    fo = FODenoisedSmoothing(DnCNN(1, 16, 3), f.model, sigma=args.sigma,
                             optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), output_dir=f"{args.output_dir}/fo_ds",
                             **{k: v for k, v in cert.items() if k != "sigma"})
    _trainer(args.denoiser_epochs).fit(fo, data)
    _trainer(1).test(fo, data, verbose=False)
    results["fo_ds"] = fo.certified

    L.seed_everything(args.seed, verbose=False)
    blackbox.queries = 0
    zo = ZODenoisedSmoothing(DnCNN(1, 16, 3), blackbox, estimator="cge", mu=5e-3,
                             optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), output_dir=f"{args.output_dir}/zo_ds",
                             **cert)
    callbacks = [ZOGraSP(sparsity=args.sparsity, method="zo_grasp", q=64)] if args.sparsity > 0 else []
    _trainer(args.denoiser_epochs, callbacks).fit(zo, data)
    train_queries = blackbox.queries
    _trainer(1).test(zo, data, verbose=False)
    results["zo_ds"] = zo.certified

    out = {"radii": radii, **{k: [v[r] for r in radii] for k, v in results.items()}, "queries": train_queries,
           "oracle_queries": zo.queries_total, "clean_test_acc": clean_acc, "certified_images": args.certify,
           "n0": args.n0, "n": args.n, "alpha": args.alpha, "sigma": args.sigma,
           "seconds": time.perf_counter() - start}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
