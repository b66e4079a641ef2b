"""The ``dz`` command as a user meets it: quick start, overrides, short names, --zo_grasp, predict, signals, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from dz_lightning.checkpointing import load_checkpoint
from dz_lightning.cli import build_cli, cli_main

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "classification" / "digits.yaml"
GRASP = ROOT / "configs" / "classification" / "digits_zo_grasp90.yaml"
# a few steps of the shipped quick-start config (the checkpoint and logger wiring under test is unchanged)
TINY = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--model.init_args.model.init_args.hidden", "[4]"]


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- quick start: fit, then test
def test_quick_start_test_command_tests_the_run_just_trained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tested = []
    for run in range(2):
        fit = build_cli(["fit", "-c", str(DIGITS), *TINY, "--seed_everything", str(run)])
        final = _weights(fit.model)
        last = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
        saved = load_checkpoint(last)
        assert saved["global_step"] == fit.trainer.global_step == 4  # last.ckpt is the end of training
        assert _equal({k: v for k, v in saved["state_dict"].items()}, final)
        test = build_cli(["test", "-c", str(DIGITS), *TINY, "--ckpt_path", "last"])
        assert Path(test.config.test.ckpt_path).resolve() == last.resolve()
        assert _equal(_weights(test.model), final), "dz test did not test the final weights of the run just trained"
        tested.append(last.resolve())
    # each test logged into the folder of the run it tested: the second fit is version_1
    assert tested[0] != tested[1] and tested[1].parent.parent.name == "version_1"
    assert (tested[0].parent / "best.ckpt").is_file()


def test_fit_then_test_and_predict_fill_one_run_folder(tmp_path, monkeypatch, recwarn):
    """``dz test``/``dz predict --ckpt_path last`` log into the fit's version folder; ZO-GraSP's ratios go there too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    fit = build_cli(["fit", "-c", str(GRASP), *TINY, "--zo_grasp.q", "4"])
    run = Path(fit.trainer.log_dir).resolve()
    test = build_cli(["test", "-c", str(GRASP), *TINY, "--zo_grasp.q", "4", "--ckpt_path", "last"])
    predict = build_cli(["predict", "-c", str(GRASP), *TINY, "--zo_grasp.q", "4", "--ckpt_path", "last"])
    assert Path(test.trainer.log_dir).resolve() == run == Path(predict.trainer.log_dir).resolve()
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # no version_1 for the test or the predict run
    assert not [str(w.message) for w in recwarn if "dirpath" in str(w.message)]  # Lightning's "dirpath has changed"
    files = {p.relative_to(run).as_posix() for p in run.rglob("*") if not p.name.startswith("events.out")}
    assert {"config.yaml", "config_test.yaml", "config_predict.yaml", "hparams.yaml", "lpr.json", "predictions.pt",
            "checkpoints/last.ckpt", "checkpoints/best.ckpt"} <= files
    (grasp,) = [c for c in fit.trainer.callbacks if type(c).__name__ == "ZOGraSP"]
    assert yaml.safe_load((run / "lpr.json").read_text()) == grasp.ratios
    assert not (tmp_path / "checkpoints").exists()  # nothing written outside the run folder
    tags = set()
    for events in run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss_epoch", "train/queries_total", "val/acc", "test/acc", "test/loss"} <= tags


def test_ckpt_path_last_without_a_run_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main(["test", "-c", str(DIGITS), *TINY, "--ckpt_path", "last"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no last checkpoint found" in err and "dz fit" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- explicit flags beat checkpoints
def test_test_time_overrides_win_over_the_checkpoint_and_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_cli(["fit", "-c", str(DIGITS), *TINY])
    with pytest.warns(UserWarning, match=r"model\.init_args\.mu: checkpoint 0\.005, now 0\.02"):
        test = build_cli(["test", "-c", str(DIGITS), *TINY, "--ckpt_path", "last", "--model.init_args.mu", "0.02"])
    assert test.model.mu == 0.02 and test.model.hparams.mu == 0.02


def test_resume_with_another_estimator_warns_and_uses_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rge = ["--model.init_args.estimator", "rge", "--model.init_args.q", "4"]
    fit = build_cli(["fit", "-c", str(DIGITS), *TINY, *rge])
    last = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    with pytest.warns(UserWarning, match=r"estimator: checkpoint 'rge', now 'cge'"):
        resumed = build_cli(["fit", "-c", str(DIGITS), *TINY, "--trainer.max_epochs", "3", "--ckpt_path", str(last),
                             "--model.init_args.estimator", "cge"])
    assert resumed.model.estimator == "cge" and resumed.trainer.global_step == 6


# -------------------------------------------------------------------------------------------- ZO-GraSP key
def test_zo_grasp_key_overrides_the_shipped_callback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from dz_lightning.callbacks import ZOGraSP

    cli = build_cli(["-c", str(GRASP), "--zo_grasp.sparsity", "0.8", "--zo_grasp.q", "8"], run=False)
    grasp = [c for c in cli.trainer.callbacks if isinstance(c, ZOGraSP)]
    assert len(grasp) == 1 and grasp[0].sparsity == 0.8 and grasp[0].q == 8
    assert grasp[0].resample_every_n_epochs == 1  # the rest of the shipped settings stay
    plain = build_cli(["-c", str(DIGITS)], run=False)
    assert not any(isinstance(c, ZOGraSP) for c in plain.trainer.callbacks)


# ------------------------------------------------------------------------------------------- short names
def test_short_class_names_work_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    from dz_lightning.callbacks import ZOGraSP

    cli = build_cli(["-c", str(DIGITS), "--trainer.callbacks+=ZOGraSP", "--trainer.callbacks.sparsity", "0.5"],
                    run=False)
    assert [c.sparsity for c in cli.trainer.callbacks if isinstance(c, ZOGraSP)] == [0.5]
    with pytest.raises(SystemExit) as exc:
        build_cli(["fit", "--model.help", "ZOClassifier"])
    assert exc.value.code == 0
    assert "estimator" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_cli(["fit", "--help"])
    out = capsys.readouterr().out
    assert "dz_lightning.tasks.classification.ZOClassifier" in out and "ZOSOL" in out and "--zo_grasp" in out


def test_version_and_top_level_help_do_not_import_lightning():
    script = textwrap.dedent(
        """
        import sys
        from dz_lightning.cli import cli_main
        cli_main(["--version"])
        cli_main(["--help"])
        assert "lightning" not in sys.modules and "torch" not in sys.modules, "slow imports on --help"
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dz_lightning 0." in out.stdout and "fit" in out.stdout and "predict" in out.stdout


def test_mistakes_seen_without_imports_are_reported_before_lightning_loads(tmp_path):
    """A missing config, an unknown subcommand, a missing checkpoint: one line, exit 2, no torch or Lightning import."""
    (tmp_path / "folder.yaml").mkdir()
    script = textwrap.dedent(
        """
        import sys
        from dz_lightning.cli import cli_main
        for argv in (["fit", "-c", "missing.yaml"], ["-c", "folder.yaml", "fit"], ["test", "--config=folder.yaml"],
                     ["fitt"], ["test", "--ckpt_path", "nope.ckpt"]):
            try:
                cli_main(argv)
            except SystemExit as exit:
                assert exit.code == 2, (argv, exit.code)
            else:
                raise AssertionError(f"{argv} did not exit")
        assert "lightning" not in sys.modules and "torch" not in sys.modules, "imports before the early errors"
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [
        f"dz: configuration error: config file 'missing.yaml' does not exist (relative to {tmp_path}).",
        f"dz: configuration error: config file 'folder.yaml' is a folder, not a file (relative to {tmp_path}).",
        f"dz: configuration error: config file 'folder.yaml' is a folder, not a file (relative to {tmp_path}).",
        "dz: configuration error: did you mean `fit`? unknown subcommand 'fitt'; choose from fit, validate, test, "
        "predict (dz --help).",
        f"dz: configuration error: --ckpt_path: checkpoint file 'nope.ckpt' does not exist (relative to {tmp_path}).",
    ]


def test_early_checks_leave_valid_and_parser_only_arguments_alone(tmp_path, monkeypatch):
    from dz_lightning.cli_errors import early_problem

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text("seed_everything: 1\n")
    for argv in (["fit", "-c", "a.yaml", "--ckpt_path", "last"], ["-c", "a.yaml", "test", "--ckpt_path", "best"],
                 ["fit", "--config", "{trainer: {max_epochs: 1}}"], ["predict", "--ckpt_path", "s3://bucket/x.ckpt"],
                 ["--print_config", "fit"], ["fit", "--model", "ZOClassifier", "-ca.yaml"]):
        assert early_problem(argv) is None, argv
    assert "a.yaml" not in (early_problem(["fit", "-cmissing.yaml"]) or "a.yaml")


def test_unknown_option_suggests_the_valid_name_first_without_usage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "-c", str(DIGITS), "--model.init_args.muu", "0.1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dz: configuration error: did you mean `mu`? `muu` is not an option of ZOClassifier")
    assert len(err.strip().splitlines()) == 1 and "usage" not in err and "Traceback" not in err
    # nested classes and callbacks name their own options; a mistyped class name gets the nearest known one
    cases = ((["--model.init_args.model.init_args.hiden", "[4]"], "did you mean `hidden`? `hiden` is not an option "
              "of MLP"),
             (["--zo_grasp.sparsty", "0.5"], "did you mean `sparsity`? `sparsty` is not an option of ZOGraSP"),
             (["--model", "ZOClassifer"], "did you mean `ZOClassifier`? no class named 'ZOClassifer'"))
    for argv, said in cases:
        with pytest.raises(SystemExit) as exc:
            cli_main(["fit", "-c", str(DIGITS), *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dz: configuration error: {said}") and len(err.strip().splitlines()) == 1, err


# -------------------------------------------------------------------------------------------------- predict
def test_predict_writes_predictions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_cli(["fit", "-c", str(DIGITS), *TINY])
    cli = build_cli(["predict", "-c", str(DIGITS), *TINY, "--ckpt_path", "last"])
    path = Path(cli.trainer.log_dir) / "predictions.pt"
    saved = torch.load(path, weights_only=True)
    classes = torch.cat(saved["predictions"][0])
    assert classes.shape == (360,) and classes.dtype == torch.long and int(classes.max()) < 10
    assert saved["split"] == "test"  # the data module's predict_split, recorded with the predictions
    assert [i for batch in saved["batch_indices"][0] for i in batch] == list(range(360))


# ------------------------------------------------------------------------------------ errors and interrupts
def test_configuration_error_prints_the_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "-c", str(DIGITS), "--model.init_args.mu", "-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "`mu`" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3


def test_sigterm_mid_epoch_saves_a_checkpoint_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sigterm_at.py").write_text(textwrap.dedent(
        """
        import os, signal
        import lightning as L

        class SigtermAt(L.Callback):
            def __init__(self, step: int = 3):
                self.step = step

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == self.step:
                    os.kill(os.getpid(), signal.SIGTERM)
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["fit", "-c", str(DIGITS), *TINY, "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "5",
            "--trainer.callbacks+=sigterm_at.SigtermAt"]
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 143
    saved = sorted(tmp_path.glob("lightning_logs/digits/version_*/checkpoints/interrupted.ckpt"))
    assert len(saved) == 1
    state = load_checkpoint(saved[0])
    assert state["global_step"] == 3 and state["epoch"] == 0  # mid-epoch: 3 of 5 batches
    assert "SIGTERM" in capsys.readouterr().err
    # resuming from it finishes the run
    resumed = build_cli(["fit", "-c", str(DIGITS), *TINY, "--trainer.max_epochs", "3",
                         "--trainer.limit_train_batches", "5", "--ckpt_path", str(saved[0])])
    assert resumed.trainer.global_step == 15


def test_resolved_config_lists_zo_grasp_under_its_key():
    text = GRASP.read_text()
    cfg = yaml.safe_load(text)
    assert cfg["zo_grasp"]["class_path"].endswith("ZOGraSP")
    assert all("ZOGraSP" not in c["class_path"] for c in cfg["trainer"]["callbacks"])


def test_corrupted_checkpoint_and_unwritable_folder_print_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fit = build_cli(["fit", "-c", str(DIGITS), *TINY])
    last = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(SystemExit) as exc:
        cli_main(["test", "-c", str(DIGITS), *TINY, "--ckpt_path", "last"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert f"corrupted or truncated checkpoint {last}" in err and "Traceback" not in err
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "-c", str(DIGITS), *TINY, "--trainer.callbacks.dirpath", str(tmp_path / "blocker" / "x")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "blocker/x is not writable" in err and "Traceback" not in err


def test_zo_grasp_key_and_a_zo_grasp_callback_together_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[2] / "configs/classification/digits_zo_grasp90.yaml")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "-c", config, "--trainer.callbacks+=ZOGraSP", "--trainer.max_steps", "1"])
    assert exit_info.value.code != 0
    assert "--zo_grasp configures a ZOGraSP callback, but trainer.callbacks holds one too" in capsys.readouterr().err


def test_ckpt_path_last_names_a_later_interrupted_run(tmp_path):
    import os

    from dz_lightning.cli import _find_last_checkpoint

    finished = tmp_path / "logs/digits/version_0/checkpoints/last.ckpt"
    stopped = tmp_path / "logs/digits/version_1/checkpoints/interrupted.ckpt"
    for i, path in enumerate((finished, stopped)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(tmp_path / "logs"), "name": "digits"}}
    with pytest.warns(UserWarning, match=r"using .*version_0.*last\.ckpt, but a later run .*version_1.*interrupted"):
        assert _find_last_checkpoint({"trainer": {"logger": logger}}) == finished


def test_prediction_writer_keeps_list_outputs_of_one_dataloader_intact(tiny_trainer, tmp_path):
    import lightning as L
    from dz_lightning.callbacks import PredictionWriter

    class ListPredictor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def predict_step(self, batch, batch_idx):
            return [batch[0].sum(), batch[0].mean()]  # a list per batch, from one dataloader

    writer = PredictionWriter(output_path=tmp_path / "p.pt")
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)
    tiny_trainer(callbacks=[writer]).predict(ListPredictor(), data, return_predictions=False)
    saved = torch.load(tmp_path / "p.pt", weights_only=True)["predictions"]
    assert len(saved) == 1 and len(saved[0]) == 2 and all(len(batch) == 2 for batch in saved[0])


def test_lightning_still_calls_the_private_hook_dzcli_overrides():
    """DZCLI overrides one private LightningCLI method, ``_parse_ckpt_path`` (see its docstring).

    If Lightning renames it or stops calling it between parsing and instantiation, the override would silently stop
    working and a checkpoint's hyperparameters would again override the config: fail here, loudly.
    """
    import inspect

    from lightning.pytorch.cli import LightningCLI

    from dz_lightning.cli import DZCLI

    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None)), "LightningCLI._parse_ckpt_path is gone"
    assert DZCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path
    init = inspect.getsource(LightningCLI.__init__)
    calls = [init.find(f"self.{name}(") for name in ("parse_arguments", "_parse_ckpt_path", "instantiate_classes")]
    assert -1 not in calls and calls == sorted(calls), "LightningCLI.__init__ no longer calls _parse_ckpt_path " \
        "between parse_arguments and instantiate_classes"


def test_a_negative_max_epochs_is_a_one_line_configuration_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main(["fit", "-c", str(DIGITS), "--trainer.max_epochs", "-2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2  # was: Lightning's MisconfigurationException traceback, exit 1
    assert "dz: configuration error: `max_epochs` must be a non-negative integer or -1. You passed in -2." in err
    assert "Traceback" not in err


_USER_MODULE = '''
from dz_lightning.tasks.classification import ZOClassifier


class MyClassifier(ZOClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.table = {"a": 1}["b" if kwargs else "a"]  # fine


class Buggy(ZOClassifier):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.width = int("sixty-four")  # the user's bug: a ValueError in their own __init__
'''


def test_a_bug_in_a_users_own_init_keeps_its_traceback(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(_USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="invalid literal for int") as exc:  # was: a one-line "configuration error"
        cli_main(["fit", "-c", str(DIGITS), *TINY, "--model", "user_models.Buggy"])
    shown = "".join(__import__("traceback").format_exception(exc.value))  # what Python prints, causes included
    assert 'user_models.py", line 14, in __init__' in shown
    with pytest.raises(SystemExit) as exc:  # our own validation, reached through the user's class: one line
        cli_main(["fit", "-c", str(DIGITS), *TINY, "--model", "user_models.Buggy", "--model.init_args.mu", "-1"])
    assert exc.value.code == 2


@pytest.mark.parametrize("value", ["null", "None", "~"])
def test_a_cleared_ckpt_path_is_no_missing_file(value):
    from conftest import ROOT

    from dz_lightning.cli_errors import early_problem

    config = str(ROOT / "configs/classification/digits.yaml")
    assert early_problem(["fit", "-c", config, "--ckpt_path", value]) is None
    assert "does not exist" in early_problem(["fit", "-c", config, "--ckpt_path", "missing.ckpt"])
