"""The ``dz`` command: LightningCLI with any LightningModule and LightningDataModule by ``class_path``.

On top of LightningCLI:

* short class names of our task modules, data modules and callbacks work (``--model ZOClassifier``,
  ``--trainer.callbacks+=ZOGraSP``), and ``dz fit --help`` lists them; ``dz --version``;
* ``--zo_grasp.*`` configures the ZO-GraSP callback (``--zo_grasp.sparsity 0.8``);
* ``--ckpt_path last`` is the newest ``last.ckpt`` of the config's runs (the run just trained); when a later run
  stopped before writing one (it left only ``interrupted.ckpt``, or no checkpoint at all), a warning names that run;
* ``validate``, ``test`` and ``predict`` with ``--ckpt_path`` log into the version folder of the run that wrote the
  checkpoint (their config as ``config_<subcommand>.yaml`` beside fit's ``config.yaml``);
* the config and the command line win over a checkpoint's saved hyperparameters (LightningCLI would silently apply
  the checkpoint's); where they differ, a warning names the keys;
* every Trainer writes checkpoints atomically with a SHA-256 beside them (:class:`~dz_lightning.checkpointing.
  SafeCheckpointIO`), checks checkpoint folders before training and saves ``interrupted.ckpt`` on an exception,
  Ctrl+C or SIGTERM (:class:`~dz_lightning.checkpointing.CheckpointGuard`), then exits non-zero;
* ``dz fit`` without ``--ckpt_path`` into a version folder that holds checkpoints already (an explicit logger
  ``version`` used twice) is refused: its ``config.yaml`` would not describe the checkpoints beside it;
* ``dz validate`` and ``dz test`` over a dataloader that gives no batch fail (Lightning would skip the loop and
  exit 0 with no metrics);
* ``dz predict`` writes ``predictions.pt`` in the run's log folder unless a prediction writer is configured;
* a configuration error prints its message, not a traceback (exit status 2); an error raised in a user's own class
  keeps its traceback; an unknown option names the nearest valid one, and a missing config or checkpoint file or an
  unknown subcommand is reported before Lightning is imported (:mod:`dz_lightning.cli_errors`).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from dz_lightning.cli_errors import SUBCOMMANDS, early_problem, explain_parser_error

__all__ = ["ConfigurationError", "build_cli", "cli_main"]

_LEAFSPEC = r".*isinstance\(treespec, LeafSpec\).*"


class ConfigurationError(ValueError):
    """A configuration that cannot be instantiated; ``dz`` prints its message without a traceback."""


def _cli_class() -> type:
    """Define :class:`DZCLI` on first use, so ``dz --help`` and ``dz --version`` never import Lightning."""
    global _DZCLI
    if _DZCLI is not None:
        return _DZCLI

    from pathlib import Path

    import lightning as L
    from jsonargparse import ArgumentError
    from lightning.fabric.plugins import CheckpointIO
    from lightning.pytorch.callbacks import BasePredictionWriter
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    # our classes must be imported for jsonargparse to resolve their short names and list them in --help
    import dz_lightning.callbacks as dz_callbacks
    import dz_lightning.tasks.classification  # noqa: F401
    import dz_lightning.tasks.defense  # noqa: F401
    import dz_lightning.tasks.sol  # noqa: F401
    from dz_lightning.checkpointing import CheckpointGuard, SafeCheckpointIO, load_checkpoint

    class DZCLI(LightningCLI):
        """LightningCLI with ``--zo_grasp``, ``--ckpt_path last``, safe checkpoints and explicit flags that win."""

        def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
            kwargs.setdefault("exit_on_error", False)  # parse_arguments prints one line, not the usage
            parser = super().init_parser(**kwargs)
            from dz_lightning import __version__

            parser.add_argument("--version", action="version", version=f"dz_lightning {__version__}")
            return parser

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument(
                "--zo_grasp", type=dz_callbacks.ZOGraSP | None, default=None,
                help="ZO-GraSP sparse CGE callback (added to trainer.callbacks); e.g. --zo_grasp.sparsity 0.8.",
            )

        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            """LightningCLI's parsing; a parser error prints its cause in one line (no usage) and exits with 2."""
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as err:
                print(f"dz: configuration error: {explain_parser_error(str(err))}", file=sys.stderr)
                raise SystemExit(2) from None

        def _parse_ckpt_path(self) -> None:
            """Replace LightningCLI's merge of a checkpoint's saved hyperparameters into the parsed config.

            The one private LightningCLI method we override (Lightning 2.x calls it in ``__init__`` right after
            ``parse_arguments``): no public hook sits between parsing and instantiation that could stop the
            checkpoint's hyperparameters from silently overriding the config and the command line
            (``parse_arguments`` runs before the merge, ``before_instantiate_classes`` after it).
            ``tests/dz_lightning/test_cli.py`` fails loudly if Lightning renames it or stops calling it there.
            """
            self.resolve_ckpt_path()

        def resolve_ckpt_path(self) -> None:
            """Resolve ``--ckpt_path last``; warn about every model setting the config changes from the checkpoint's.

            The config and the command line win; the checkpoint's hyperparameters are only compared, never applied.
            """
            subcommand = self.config.get("subcommand")
            if not subcommand:
                return
            ckpt_path = self.config[subcommand].get("ckpt_path")
            if ckpt_path == "last":
                ckpt_path = str(_find_last_checkpoint(self.config[subcommand]))
                self.config[subcommand]["ckpt_path"] = ckpt_path
                rank_zero_info(f"--ckpt_path last: {ckpt_path}")
            if not ckpt_path or not Path(ckpt_path).is_file():
                return
            if subcommand != "fit":
                _log_into_the_run_of(ckpt_path, self.config[subcommand])
            hparams = dict(load_checkpoint(ckpt_path).get("hyper_parameters") or {})
            hparams.pop("_instantiator", None)
            if not hparams:
                return
            saved = {"class_path": hparams.pop("_class_path"), "init_args": hparams} if "_class_path" in hparams \
                else {"init_args": hparams}
            current = self.parser.dump(self.config, skip_link_targets=False, skip_none=False, format="yaml")
            import yaml

            model = (yaml.safe_load(current).get(subcommand) or {}).get("model") or {}
            differ = _differences(saved, model)
            if differ:
                listed = "; ".join(f"model.{k}: checkpoint {a!r}, now {b!r}" for k, a, b in differ[:12])
                more = f" (and {len(differ) - 12} more)" if len(differ) > 12 else ""
                rank_zero_warn(
                    f"dz {subcommand}: the config and command line differ from the hyperparameters saved in "
                    f"{ckpt_path}; using the config and command line: {listed}{more}.", stacklevel=1,
                )

        def before_fit(self) -> None:
            _refuse_a_used_run_folder(self.trainer, self.config["fit"].get("ckpt_path"))

        def after_validate(self) -> None:
            _refuse_an_empty_evaluation("validate", self.trainer.num_val_batches, "val")

        def after_test(self) -> None:
            _refuse_an_empty_evaluation("test", self.trainer.num_test_batches, "test")

        def instantiate_classes(self) -> None:
            from lightning.fabric.utilities.exceptions import MisconfigurationException

            try:
                super().instantiate_classes()
            except (ValueError, TypeError, MisconfigurationException) as err:
                if _raised_in_user_code(err):  # a bug in the user's own class: its traceback is the help
                    raise
                raise ConfigurationError(_root_cause(str(err))) from err

        def instantiated(self, key: str, default: Any = None) -> Any:
            """``key`` of the instantiated config, inside the running subcommand's section when there is one."""
            return self.config_init.get(str(self.subcommand), self.config_init).get(key, default)

        def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
            if self.subcommand not in (None, "fit"):  # beside fit's config.yaml in the same run folder, not over it
                self.save_config_kwargs = {**self.save_config_kwargs,
                                           "config_filename": f"config_{self.subcommand}.yaml"}
            extra = [self.instantiated("zo_grasp")]
            plugins = self.instantiated("trainer", default={}).get("plugins")
            plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                plugins.append(SafeCheckpointIO())
            kwargs.setdefault("plugins", plugins)
            trainer = super().instantiate_trainer(**kwargs)
            for callback in extra:
                if callback is not None and any(isinstance(c, type(callback)) for c in trainer.callbacks):
                    raise ConfigurationError(
                        f"--zo_grasp configures a {type(callback).__name__} callback, but trainer.callbacks holds one "
                        "too (two would both set the masks and share one checkpoint entry); keep one of them.")
                if callback is not None:
                    trainer.callbacks.insert(0, callback)
            if not any(isinstance(c, CheckpointGuard) for c in trainer.callbacks):
                trainer.callbacks.insert(0, CheckpointGuard())
            if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter)
                                                        for c in trainer.callbacks):
                trainer.callbacks.append(dz_callbacks.PredictionWriter())
            return trainer

    _DZCLI = DZCLI
    return DZCLI


_DZCLI: type | None = None


def _differences(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Keys present in both nested dicts whose values differ: ``[(dotted key, saved, current)]``."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in saved:
            if key in current:
                out += _differences(saved[key], current[key], f"{prefix}{key}." if prefix or key else "")
        return out
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        if len(saved) == len(current):
            pairs = enumerate(zip(saved, current, strict=True))
            return [d for i, (a, b) in pairs for d in _differences(a, b, f"{prefix}{i}.")]
    if saved != current and not (isinstance(saved, (int, float)) and isinstance(current, (int, float))
                                 and float(saved) == float(current)):
        return [(prefix.rstrip("."), saved, current)]
    return []


def _find_last_checkpoint(config: Any) -> Any:
    """The newest ``last*.ckpt`` among the runs this config writes (logger version folders or fixed folders)."""
    from pathlib import Path

    trainer = config.get("trainer") or {}
    folders: list[Path] = []
    for callback in _as_list(trainer.get("callbacks")):
        init = _init_args(callback)
        if init.get("dirpath"):
            folders.append(Path(init["dirpath"]))
    root = Path(trainer.get("default_root_dir") or ".")
    runs: list[Path] = []
    for logger in _as_list(trainer.get("logger")):
        init = _init_args(logger)
        if init:
            save_dir = Path(init.get("save_dir") or root)
            name = init.get("name")
            runs.append(save_dir / name if name else save_dir)
    if not runs and trainer.get("logger") in (None, True):
        runs.append(root / "lightning_logs")
    if not runs and not folders:  # no logger: ModelCheckpoint's default folder
        folders.append(root / "checkpoints")
    candidates = [p for f in folders for p in f.glob("last*.ckpt")]
    candidates += [p for r in runs for p in r.glob("version_*/checkpoints/last*.ckpt")]
    candidates = [p for p in candidates if p.is_file()]
    if not candidates:
        searched = ", ".join(str(p) for p in [*folders, *(r / "version_*/checkpoints" for r in runs)]) or "nothing"
        raise ConfigurationError(f"--ckpt_path last: no last checkpoint found (searched {searched}); run `dz fit` "
                                 "with this config first, or give the checkpoint's path.")
    chosen = max(candidates, key=lambda p: p.stat().st_mtime)
    later = _later_runs_without_last(chosen, folders, runs)
    if later:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"--ckpt_path last: using {chosen}, but {later}", stacklevel=1)
    return chosen


def _later_runs_without_last(chosen: Any, folders: list[Any], runs: list[Any]) -> str | None:
    """What a run started after ``chosen`` was written left instead of a ``last*.ckpt`` (``None``: no such run).

    A run is a logger version folder: later when its ``config.yaml`` (written by ``dz fit`` before the first step) or
    an interrupt checkpoint in it is newer than ``chosen``. In a fixed checkpoint folder, a newer interrupt checkpoint
    is such a run.
    """
    since = chosen.stat().st_mtime
    left: list[tuple[float, str]] = []  # (when, what it left)
    interrupted = [p for f in folders for p in f.glob("interrupted*.ckpt")]
    for run in (v for r in runs for v in r.glob("version_*") if v.is_dir()):
        if any(p.is_file() for p in run.glob("checkpoints/last*.ckpt")):
            continue
        stopped = [p for p in run.glob("checkpoints/interrupted*.ckpt") if p.is_file()]
        if stopped:
            interrupted += stopped
        elif (run / "config.yaml").is_file() and (run / "config.yaml").stat().st_mtime > since:
            left.append(((run / "config.yaml").stat().st_mtime, f"a later run, {run}, stopped before writing any "
                         "checkpoint (pass a path to choose a run yourself)."))
    left += [(p.stat().st_mtime, f"a later run stopped early and left only {p}; pass that path to use it.")
             for p in interrupted if p.is_file() and p.stat().st_mtime > since]
    return max(left)[1] if left else None


def _refuse_a_used_run_folder(trainer: Any, ckpt_path: Any) -> None:
    """A new fit (no ``--ckpt_path``) into a logger version folder that holds checkpoints already is an error.

    That happens with an explicit ``version``: the new run would overwrite the folder's ``config.yaml`` (and
    ``hparams.yaml``) while ``last.ckpt`` beside them stays the earlier run's until the new run writes its own, and
    ``best.ckpt`` compares scores of two runs.
    """
    from pathlib import Path

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if ckpt_path or not trainer.loggers or not isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger)):
        return
    folder = Path(trainer.loggers[0].log_dir)
    files = [p for p in (folder / "checkpoints").glob("*.ckpt") if p.is_file()]
    if files:
        saved = sorted(p.name for p in files)
        listed = ", ".join(saved[:3]) + (", ..." if len(saved) > 3 else "")
        # the newest state of that run: its last or interrupt checkpoint (best.ckpt may be epochs behind)
        resumable = [p for p in files if p.name.startswith(("last", "interrupted"))] or files
        resume = max(resumable, key=lambda p: p.stat().st_mtime)
        raise ConfigurationError(
            f"dz fit: the run folder {folder} already holds an earlier run's checkpoints ({listed}); a new run there "
            f"would leave a config.yaml that does not describe them. Resume that run with --ckpt_path {resume}, or "
            "give the logger another version (or none, for the next free one)."
        )


def _refuse_an_empty_evaluation(subcommand: str, batches: list[int | float], split: str) -> None:
    """An evaluation that ran no batch is an error: Lightning only warns and ``dz`` would exit 0 with no metrics."""
    if not any(batches):
        raise ConfigurationError(
            f"dz {subcommand} evaluated nothing: the {split} dataloader gave no batch (an empty {split} split or "
            f"dataset, or --trainer.limit_{split}_batches 0). Check the data module's {split} split; no metrics "
            "were computed."
        )


def _log_into_the_run_of(ckpt_path: str, config: Any) -> None:
    """Point the config's loggers at the version folder of the run that wrote ``ckpt_path`` (validate/test/predict).

    A checkpoint at ``<save_dir>/<name>/<version>/checkpoints/`` came from the run whose logger wrote
    ``<save_dir>/<name>/<version>``; a logger of the config with that ``save_dir`` and ``name`` and no explicit
    ``version`` gets that version. The test metrics (or ``predictions.pt``) then land beside the training curves,
    and ModelCheckpoint finds its own folder (no "dirpath has changed" warning). Other checkpoints leave the loggers
    as they are.
    """
    from pathlib import Path

    folder = Path(ckpt_path).resolve().parent
    if folder.name != "checkpoints":
        return
    run = folder.parent
    trainer = config.get("trainer") or {}
    root = Path(trainer.get("default_root_dir") or ".")
    for logger in _as_list(trainer.get("logger")):
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if init is None or "version" not in init or init.get("version") is not None:
            continue
        save_dir = Path(init.get("save_dir") or root)
        name = init.get("name")
        if (save_dir / name if name else save_dir).resolve() == run.parent:
            init["version"] = run.name


def _raised_in_user_code(err: BaseException) -> bool:
    """Whether the original error (the last of ``err``'s causes) was raised outside this project, Lightning and
    jsonargparse, whose messages name the setting at fault: in the user's own class, or in a library it called."""
    from pathlib import Path

    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    if module.split(".")[0] in ("lightning", "lightning_fabric", "pytorch_lightning", "jsonargparse"):
        return False
    path = Path(tb.tb_frame.f_code.co_filename)
    return not (path.is_file() and path.resolve().is_relative_to(Path(__file__).resolve().parents[1]))


def _root_cause(message: str) -> str:
    """The one line of a jsonargparse union error that says what is wrong (our ``Expected argument ...``)."""
    lines = message.splitlines()
    causes = [line.strip()[2:] for line in lines
              if line.strip().startswith("- ") and "NoneType" not in line and "Expected a <class" not in line]
    return causes[0] if len(causes) == 1 else message if len(lines) <= 3 else "\n".join(lines[:3])


def _as_list(value: Any) -> list[Any]:
    return [] if value is None or isinstance(value, bool) else list(value) if isinstance(value, list) else [value]


def _init_args(component: Any) -> dict[str, Any]:
    if component is None or isinstance(component, bool):
        return {}
    init = component.get("init_args") if hasattr(component, "get") else None
    if init is None:
        return {}
    return dict(init.items()) if hasattr(init, "items") else dict(vars(init))


def build_cli(args: list[str] | None = None, run: bool = True) -> Any:
    """Build (and by default run) ``dz fit|validate|test|predict --config ...``.

    Model and data are chosen by ``class_path`` (subclass mode) or by a short class name of ours, so task modules
    and user modules work alike. Optimizers and schedulers are arguments of the model (``OptimizerCallable``), not of
    the CLI.

    Args:
        args: command-line arguments (``None`` reads ``sys.argv``).
        run: whether to run the subcommand (``False`` only instantiates, for tests).

    Returns:
        The :class:`DZCLI` (a ``LightningCLI``) after it ran.
    """
    import lightning as L

    cli_class = _cli_class()
    return cli_class(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def _short_help() -> str:
    from dz_lightning import __version__

    lines = [
        "usage: dz [-h] [--version] [-c CONFIG] {fit,validate,test,predict} ...",
        "",
        f"dz_lightning {__version__}: zeroth-order (DeepZero) training with the Lightning CLI.",
        "",
        "subcommands (each has its own --help listing the model, data and trainer options):",
    ]
    lines += [f"  {name:<10}{text}" for name, text in SUBCOMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help     show this help message and exit",
        "  --version      show the program's version number and exit",
        "",
        "example: dz fit -c configs/classification/digits.yaml",
        "         dz test -c configs/classification/digits.yaml --ckpt_path last",
    ]
    return "\n".join(lines)


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of the ``dz`` console script.

    Exit status: 0 on success, 2 for a configuration error (message only, no traceback), 1 for a corrupted checkpoint
    or an unwritable checkpoint folder (message only), 143 when a fit stopped on SIGTERM (after saving
    ``interrupted.ckpt``), 1 on Ctrl+C or another error.
    """
    argv = sys.argv[1:] if args is None else list(args)
    # the top-level help and version need no Lightning import (seconds of CPU)
    if argv in ([], ["-h"], ["--help"]):
        print(_short_help())
        if not argv:
            sys.exit(2)
        return
    if argv == ["--version"]:
        from dz_lightning import __version__

        print(f"dz_lightning {__version__}")
        return
    # mistakes that need no import to see are reported before Lightning and torch load (seconds of CPU)
    problem = early_problem(argv)
    if problem is not None:
        print(f"dz: configuration error: {problem}", file=sys.stderr)
        sys.exit(2)
    warnings.filterwarnings("ignore", message=_LEAFSPEC, category=FutureWarning)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from dz_lightning.checkpointing import CheckpointFolderError, CorruptCheckpointError

    try:
        build_cli(args)
    except ConfigurationError as err:
        print(f"dz: configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    except (CorruptCheckpointError, CheckpointFolderError) as err:
        print(f"dz: {err}", file=sys.stderr)
        sys.exit(1)
    except SIGTERMException:
        print("dz: stopped by SIGTERM", file=sys.stderr)
        sys.exit(143)


def __getattr__(name: str) -> Any:
    if name == "DZCLI":
        return _cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
