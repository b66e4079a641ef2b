"""The shared fixtures in conftest.py do what their docstrings promise."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import DDP_ENV_VARS, ROOT, clean_ddp_environ
from lightning.pytorch.callbacks import ModelCheckpoint


def test_tiny_trainer_defaults_and_overrides(tiny_trainer, tmp_path):
    trainer = tiny_trainer()
    assert trainer.max_steps == 3 and trainer.logger is None and trainer.checkpoint_callback is None
    assert trainer.default_root_dir == str(tmp_path) and trainer.limit_val_batches == 0
    trainer = tiny_trainer(max_epochs=2, callbacks=[ModelCheckpoint(dirpath=tmp_path)])
    assert trainer.max_steps == -1 and trainer.max_epochs == 2 and trainer.checkpoint_callback is not None


def test_ddp_environment_is_clean(monkeypatch):
    for name in DDP_ENV_VARS:
        monkeypatch.setenv(name, "7")
    monkeypatch.setenv("PYTHONPATH", "elsewhere")
    env = clean_ddp_environ()
    assert not set(DDP_ENV_VARS) & set(env)
    assert env["PYTHONPATH"].split(":")[:2] == [str(ROOT), "elsewhere"] and env["OMP_NUM_THREADS"] == "1"


def test_run_ddp_runs_a_script_in_the_clean_environment(run_ddp, tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "1234")
    script = tmp_path / "show.py"
    script.write_text("import os, sys\nprint(os.environ.get('MASTER_PORT'), sys.argv[1], os.getcwd())\n")
    proc = run_ddp(script, 5)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "5", str(tmp_path)]


@pytest.mark.slow  # a fresh interpreter importing torch and Lightning: seconds, for a failure no one could miss
def test_the_pytest_console_script_imports_the_package_not_the_tests_folder(tmp_path):
    """`pytest` (unlike `python -m pytest`) does not put the repository root on sys.path; `tests/dz_lightning/`
    must still not shadow the package."""
    code = ("import sys, pytest; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
            f"sys.exit(pytest.main(['-q', '--co', '-p', 'no:cacheprovider', {str(ROOT / 'tests' / 'callbacks')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
