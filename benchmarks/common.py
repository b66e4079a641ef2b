"""Helpers shared by the benchmark scripts: run a config through the CLI and measure it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dz_lightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]


def run_config(config: str, *overrides: str, workdir: str | None = None) -> dict:
    """``dz fit`` a config (no logger, no progress bar; checkpoints land in ``workdir``), then test the final weights.

    Returns:
        ``{"test_acc", "queries", "seconds"}``; queries include those spent by callbacks (ZO-GraSP scoring).
    """
    cwd = os.getcwd()
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)
    try:
        start = time.perf_counter()
        cli = build_cli(["fit", "--config", str(ROOT / config), "--trainer.logger", "false",
                         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                         *overrides])
        seconds = time.perf_counter() - start
        result = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    finally:
        os.chdir(cwd)
    queries = int(getattr(cli.model, "queries_total", 0))
    queries += sum(int(getattr(cb, "queries", 0)) for cb in cli.trainer.callbacks)
    return {"test_acc": float(result["test/acc"]), "queries": queries, "seconds": seconds}
