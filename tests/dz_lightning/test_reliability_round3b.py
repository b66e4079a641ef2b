"""Nothing lost, round three (issue 28, the cases left): a hung query stopped by SIGTERM, runs that share a version
folder, ``--ckpt_path last`` over runs, SIGTERM/SIGINT exit statuses, empty test and validation loaders, and one
check of unreadable checkpoint bytes for both loaders."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from dz_lightning.checkpointing import CorruptCheckpointError, SafeCheckpointIO, load_checkpoint


# ------------------------------------------------------------------------- one check of unreadable bytes (issue 26)
def _legacy_flip_raising(error: type[BaseException]) -> bytes:
    """A legacy-format (non-zip) checkpoint with one bit flipped so that ``torch.load`` raises ``error``."""
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(10.0)}, "epoch": 1}, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    for at in range(len(data)):
        for bit in (0x01, 0xFF):
            damaged = bytearray(data)
            damaged[at] ^= bit
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # odd pickle protocols
                    torch.load(io.BytesIO(bytes(damaged)), weights_only=True)
            except error as err:
                if type(err) is error:
                    return bytes(damaged)
            except Exception:  # noqa: BLE001, S112 - another error type: try the next flip
                continue
    pytest.skip(f"no single flip makes torch.load raise {error.__name__} in this torch version")


@pytest.mark.parametrize("error", [IndexError, KeyError, AssertionError, TypeError])
def test_both_loaders_name_unreadable_bytes_without_a_digest_as_corruption(tmp_path, error):
    path = tmp_path / "copied.ckpt"  # copied without its .sha256: torch.load is the only check
    path.write_bytes(_legacy_flip_raising(error))
    with pytest.raises(CorruptCheckpointError, match=f"corrupted or truncated checkpoint {path}"):
        load_checkpoint(path)
    # was: the plugin's own tuple of errors lacked IndexError and KeyError (and both lacked the other two), so
    # `dz fit --ckpt_path` showed torch's bare error instead of naming the damaged file
    with pytest.raises(CorruptCheckpointError, match=f"corrupted or truncated checkpoint {path}"):
        SafeCheckpointIO().load_checkpoint(path)


# ------------------------------------------------------------------------------ SIGTERM during a hung query
HUNG_BOX_SCRIPT = '''
import sys, time
from pathlib import Path

import lightning as L
import torch
import dz_lightning as dz
from dz_lightning.checkpointing import CheckpointGuard, SafeCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

root, hang_at = Path(sys.argv[1]), int(sys.argv[2])
calls = []


def box(params):  # a black box (a simulator) that never answers its `hang_at`-th call
    calls.append(1)
    if len(calls) == hang_at:
        (root / "hung").write_text("")
        while True:
            time.sleep(1000)
    return float(((params["weight"] - 0.3) ** 2).sum() + (params["bias"] ** 2).sum())


class Boxed(dz.ZOModule):
    def make_oracle(self, batch):
        return dz.FunctionOracle(box)

    def test_step(self, batch, batch_idx):  # e.g. a certification that queries the black box
        self.log("test/loss", box({n: p.detach() for n, p in self.model.named_parameters()}))


torch.manual_seed(0)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(64, 1)), batch_size=4)
trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(root), plugins=[SafeCheckpointIO()],
                    callbacks=[CheckpointGuard(), ModelCheckpoint(dirpath=root, filename="last",
                                                                  every_n_train_steps=1)])
module = Boxed(torch.nn.Linear(3, 2), estimator="cge", optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
if sys.argv[3] == "fit":
    trainer.fit(module, data)
else:
    trainer.test(module, data)
'''


def _run_until_hung(tmp_path, script: str, hang_at: int, stage: str = "fit"):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    (tmp_path / "script.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "script.py"), str(tmp_path), str(hang_at), stage],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (tmp_path / "hung").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the black box never hung:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.1)
    time.sleep(0.5)
    return proc


def test_sigterm_while_a_black_box_hangs_saves_the_last_completed_step_and_exits_143(tmp_path):
    import signal
    import subprocess

    # 8 queries per CGE step (the base point, 8 coordinates, forward differences: 9): the 3rd step's 5th query hangs
    proc = _run_until_hung(tmp_path, HUNG_BOX_SCRIPT, hang_at=2 * 9 + 5)
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # was: "Received SIGTERM", then nothing until SIGKILL
        proc.kill()
        pytest.fail(f"SIGTERM did not stop a run whose black box hangs:\n{proc.communicate()[0][-3000:]}")
    assert proc.returncode == 143, out[-3000:]
    saved = load_checkpoint(tmp_path / "interrupted.ckpt")
    assert saved["global_step"] == 2  # the two completed steps; the third one's queries are lost
    last = load_checkpoint(tmp_path / "last.ckpt")  # saved at the end of step 2
    assert last["global_step"] == 2
    assert all(torch.equal(saved["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])
    assert "SIGTERM inside a step: stopping it at once" in out


# ------------------------------------------------------------------------------ an evaluation with no batch
EMPTY_DATA = '''
import torch
from dz_lightning.tasks.classification import DigitsDataModule


class EmptyEvaluation(DigitsDataModule):
    """Digits for training; validation and test splits with no example (a filter that matched nothing)."""

    def _empty(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 64), torch.zeros(0).long()))

    def val_dataloader(self):
        return self._empty()

    def test_dataloader(self):
        return self._empty()
'''


@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_an_evaluation_over_an_empty_loader_fails_in_one_line(tmp_path, monkeypatch, capsys, subcommand):
    from pathlib import Path

    from dz_lightning.cli import cli_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_data.py").write_text(EMPTY_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = Path(__file__).resolve().parents[2] / "configs/classification/digits.yaml"
    with pytest.raises(SystemExit) as exc:  # was: Lightning's warning, no metrics, exit status 0
        cli_main([subcommand, "-c", str(config), "--data", "empty_data.EmptyEvaluation",
                  "--trainer.enable_progress_bar", "false"])
    assert exc.value.code == 2
    split = "val" if subcommand == "validate" else "test"
    err = capsys.readouterr().err
    assert f"dz {subcommand} evaluated nothing: the {split} dataloader gave no batch" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------ --ckpt_path last over runs
def _run_folder(root, version: int, when: float, files: tuple[str, ...]):
    import os

    run = root / "logs/digits" / f"version_{version}"
    for name in files:
        path = run / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (when, when))
    return run


def test_ckpt_path_last_names_a_later_run_that_left_no_checkpoint(tmp_path, recwarn):
    from dz_lightning.cli import _find_last_checkpoint

    finished = _run_folder(tmp_path, 0, 1000, ("config.yaml", "checkpoints/last.ckpt"))
    _run_folder(tmp_path, 1, 1001, ("config_test.yaml", "metrics.csv"))  # `dz test` without a checkpoint: no run
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(tmp_path / "logs"), "name": "digits"}}
    config = {"trainer": {"logger": logger}}
    assert _find_last_checkpoint(config) == finished / "checkpoints/last.ckpt"
    assert not [w for w in recwarn if "--ckpt_path last" in str(w.message)]
    # a later fit that crashed before its first checkpoint (was: version_0 taken without a word)
    _run_folder(tmp_path, 2, 1002, ("config.yaml", "hparams.yaml"))
    with pytest.warns(UserWarning, match=r"using .*version_0.*last\.ckpt, but a later run, .*version_2, stopped "
                                         r"before writing any checkpoint"):
        assert _find_last_checkpoint(config) == finished / "checkpoints/last.ckpt"


# ------------------------------------------------------------------------------- two runs, one explicit version
def test_a_new_fit_into_a_version_folder_with_checkpoints_is_refused(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    import yaml

    from dz_lightning.cli import build_cli, cli_main

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[2] / "configs/classification/digits.yaml"
    tiny = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--model.init_args.model.init_args.hidden", "[4]", "--trainer.logger.init_args.version", "shared"]
    first = build_cli(["fit", "-c", str(config), *tiny])
    run = Path(first.trainer.log_dir)
    assert run.name == "shared" and (run / "checkpoints/last.ckpt").is_file()
    with pytest.raises(SystemExit) as exc:  # was: trained, overwriting config.yaml beside the first run's last.ckpt
        cli_main(["fit", "-c", str(config), *tiny, "--model.init_args.mu", "0.02"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"the run folder {run} already holds an earlier run's checkpoints" in err
    assert f"--ckpt_path {run / 'checkpoints/last.ckpt'}" in err
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]["mu"] != 0.02
    # resuming the run in its folder is what the message offers, and it runs
    resumed = build_cli(["fit", "-c", str(config), *tiny, "--trainer.max_epochs", "2",
                         "--ckpt_path", str(run / "checkpoints/last.ckpt")])
    assert resumed.trainer.global_step == 4 and Path(resumed.trainer.log_dir) == run


# ------------------------------------------------------------------------------------ signals under DDP (Gloo)
DDP_SIGNAL_SCRIPT = '''
import os, signal, sys
from pathlib import Path

import lightning as L
import torch
import dz_lightning as dz
from dz_lightning.checkpointing import CheckpointGuard, SafeCheckpointIO
from dz_lightning.strategies import ZODDPStrategy

root, signum, ranks = Path(sys.argv[1]), getattr(signal, sys.argv[2]), sys.argv[3]


class Quadratic(dz.ZOModule):
    def make_oracle(self, batch):
        return dz.FunctionOracle(lambda p: float(((p["weight"] - 0.3) ** 2).sum() + (p["bias"] ** 2).sum()))


class SignalAt(L.Callback):
    """The signal reaches the listed ranks inside the step from global step 2 to 3."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2 and str(trainer.global_rank) in ranks:
            os.kill(os.getpid(), signum)


torch.set_num_threads(1)
torch.manual_seed(0)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(64, 1)), batch_size=4)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ZODDPStrategy(process_group_backend="gloo"),
                    max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    use_distributed_sampler=False, enable_checkpointing=False, default_root_dir=str(root),
                    plugins=[SafeCheckpointIO()], callbacks=[CheckpointGuard(), SignalAt()])
trainer.fit(Quadratic(torch.nn.Linear(3, 2), optimizer=lambda p: torch.optim.SGD(p, lr=0.1)), data)
'''


@pytest.mark.slow
@pytest.mark.parametrize(("name", "ranks", "status"), [("SIGINT", "1", 1), ("SIGINT", "01", 1), ("SIGTERM", "01", 143)],
                         ids=["ctrl_c_on_rank_1", "ctrl_c_on_every_rank", "sigterm_on_every_rank"])
def test_a_signal_under_ddp_stops_every_rank_at_one_step_and_saves(tmp_path, ddp_env, name, ranks, status):
    import os
    import signal
    import subprocess
    import sys

    (tmp_path / "script.py").write_text(DDP_SIGNAL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "script.py"), str(tmp_path), name, ranks], env=ddp_env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:  # was, for SIGTERM on every rank: Lightning's handlers deadlock
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the ranks hung after {name}:\n{proc.communicate()[0][-3000:]}")
    # was: no checkpoint after Ctrl+C (a KeyboardInterrupt stops each rank wherever it is; on one rank, the other
    # fails in Gloo with "Connection closed by peer")
    assert proc.returncode == status, out[-3000:]
    saved = load_checkpoint(tmp_path / "checkpoints" / "interrupted.ckpt")
    assert saved["global_step"] == 3  # the step that was running when the signal came finished, on both ranks


def test_sigterm_while_a_black_box_hangs_in_a_test_batch_exits_143(tmp_path):
    import signal
    import subprocess

    proc = _run_until_hung(tmp_path, HUNG_BOX_SCRIPT, hang_at=3, stage="test")
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # was: Lightning checks for SIGTERM only between test batches
        proc.kill()
        pytest.fail(f"SIGTERM did not stop a test whose black box hangs:\n{proc.communicate()[0][-3000:]}")
    assert proc.returncode == 143, out[-3000:]
    assert not (tmp_path / "interrupted.ckpt").exists()  # nothing trained, nothing to save


def test_a_sigterm_stops_a_step_only_before_its_optimizer_step_and_an_evaluation_batch_anywhere():
    """The guard's window: from a training batch's start to its optimizer step (never half an update), and a whole
    validation, test or predict batch."""
    from dz_lightning.checkpointing import CheckpointGuard

    guard, trainer, module = CheckpointGuard(), object(), object()
    guard._stop_together = False
    guard.on_train_batch_start(trainer, module, None, 0)
    assert guard._interruptible
    guard.on_before_optimizer_step(trainer, module, None)
    assert not guard._interruptible
    for stage in ("validation", "test", "predict"):
        getattr(guard, f"on_{stage}_batch_start")(trainer, module, None, 0)
        assert guard._interruptible
        getattr(guard, f"on_{stage}_batch_end")(trainer, module, None, None, 0)
        assert not guard._interruptible
