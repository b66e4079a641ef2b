"""The ``dz`` command: LightningCLI with any LightningModule and LightningDataModule by ``class_path``."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

__all__ = ["build_cli", "cli_main"]


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) ``dz fit|validate|test|predict --config ...``.

    Model and data are chosen by ``class_path`` (subclass mode), so task modules and user modules work alike.
    Optimizers and schedulers are arguments of the model (``OptimizerCallable``), not of the CLI.

    Args:
        args: command-line arguments (``None`` reads ``sys.argv``).
        run: whether to run the subcommand (``False`` only instantiates, for tests).
    """
    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of the ``dz`` console script (returns nothing, so the exit status is 0 on success)."""
    build_cli(args)
