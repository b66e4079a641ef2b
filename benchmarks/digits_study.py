"""The digits study: FO vs dense CGE vs ZO-GraSP 90% sparse CGE vs RGE (q = 64 and q = d), same epochs.

Runs the configs in configs/classification/ in one process, on scikit-learn's bundled digits (offline, real
data), prints one JSON object as its last line
``{"fo"|"cge"|"zo_grasp90"|"rge_q64"|"rge_qd": {"test_acc", "seconds", "queries"}}`` and writes a PNG plot of
test accuracy against queries.

Usage: ``python benchmarks/digits_study.py [--epochs 30] [--out benchmarks/out]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import run_config
from dz_lightning.figures import new_figure, save_figure

RUNS = {
    "fo": ("configs/classification/digits_fo.yaml", []),
    "cge": ("configs/classification/digits.yaml", []),
    "zo_grasp90": ("configs/classification/digits_zo_grasp90.yaml", []),
    "rge_q64": ("configs/classification/digits_rge.yaml", ["--model.init_args.q", "64"]),
    "rge_qd": ("configs/classification/digits_rge.yaml", ["--model.init_args.q", "2410"]),
}


def plot(results: dict, path: Path) -> None:
    fig = new_figure(5, 3.5)
    ax = fig.add_subplot()
    for name, r in results.items():
        ax.scatter(max(r["queries"], 1), 100 * r["test_acc"], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("loss queries (log; FO plotted at 1)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits, equal epochs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--only", nargs="*", choices=list(RUNS), default=list(RUNS))
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            config, extra = RUNS[name]
            results[name] = run_config(config, "--trainer.max_epochs", str(args.epochs), *extra,
                                       workdir=str(Path(tmp) / name))
            print(f"# {name}: {json.dumps(results[name])}", flush=True)  # partial results survive an interrupt
    plot(results, Path(args.out) / "digits_study.png")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
