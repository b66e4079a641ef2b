"""Shared pytest fixtures: a tiny CPU Trainer, a DDP subprocess launcher with a clean environment, tiny data.

Use them by naming them as test arguments::

    def test_something(tiny_trainer, digits):
        tiny_trainer(max_steps=2).fit(ZOClassifier(MLP(hidden=(4,))), digits)

    @pytest.mark.slow
    def test_two_ranks(tmp_path, run_ddp):
        proc = run_ddp(WORKER, "--out", str(tmp_path), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (put on ``PYTHONPATH`` of every DDP subprocess)."""

# pytest puts `tests/` on sys.path (this file's folder, "prepend" import mode), where `tests/dz_lightning/` (no
# __init__.py) would be imported as a namespace package `dz_lightning` and shadow the editable install whenever the
# repository root is not on sys.path too: `python -m pytest` puts it there, the `pytest` console script does not.
if not any(Path(p or ".").resolve() == ROOT for p in sys.path):
    sys.path.append(str(ROOT))

import lightning as L  # noqa: E402
import pytest  # noqa: E402
from dz_lightning.tasks.classification import DigitsDataModule  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

DDP_ENV_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")
"""Variables through which a parent process (torchrun, an earlier Lightning DDP launch) would make a child process
join its process group or believe it is one rank of it; a test's DDP subprocess must start without them."""

TINY_TRAINER_DEFAULTS: dict[str, object] = {
    "accelerator": "cpu",
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "limit_val_batches": 0,
}
"""What every tiny Trainer gets unless the test says otherwise (Lightning's own tests do the same)."""


def make_tiny_trainer(root: Path, **overrides: object) -> L.Trainer:
    """A small, quiet CPU Trainer for tests.

    Args:
        root: ``default_root_dir`` (a test's ``tmp_path``), so that nothing is written to the working directory.
        **overrides: any ``L.Trainer`` argument; overrides :data:`TINY_TRAINER_DEFAULTS`. Without ``max_steps``
            and ``max_epochs`` the run stops after 3 steps; ``enable_checkpointing`` defaults to whether a
            ``ModelCheckpoint`` is among ``callbacks`` (Lightning refuses the pair ``False`` + ``ModelCheckpoint``,
            and a test that wants no checkpoints should not write any).

    Returns:
        The Trainer.
    """
    kw = {**TINY_TRAINER_DEFAULTS, "default_root_dir": str(root), **overrides}
    if "max_steps" not in kw and "max_epochs" not in kw:
        kw["max_steps"] = 3
    if "enable_checkpointing" not in kw:
        kw["enable_checkpointing"] = any(isinstance(cb, ModelCheckpoint) for cb in kw.get("callbacks") or ())
    return L.Trainer(**kw)


FP32_UNIT_ROUNDOFF = 2.0 ** -24
"""Half an fp32 ulp at 1: the relative rounding error of one fp32 operation."""


def fp32_tolerance(terms: int, scale: float = 1.0) -> dict[str, float]:
    """``rtol``/``atol`` for two fp32 evaluations of one computation that round differently (a batched call against
    one point at a time, another CPU's kernels, another thread count).

    A chain of fp32 sums and products whose longest accumulation path adds ``terms`` products (the fan-ins of the
    layers along the path, summed) is within ``terms * u`` of the exact result, relative to the magnitudes summed
    (u = 2**-24, the worst case of a recursive sum; blocked and tree sums are better). Two such evaluations are
    within twice that of each other. ``scale`` is the magnitude the absolute part refers to (the size of the
    compared values, or of the terms summed when they cancel).

    Returns:
        ``{"rtol": 2 * terms * u, "atol": 2 * terms * u * scale}``, for ``torch.testing.assert_close``.
    """
    bound = 2 * terms * FP32_UNIT_ROUNDOFF
    return {"rtol": bound, "atol": bound * scale}


def one_query_at_a_time(model, loss_fn, x, y, name: str, index, delta: float):
    """The reference for every feature-reuse test: perturb one coordinate, one full forward, restore; ``(n,)``."""
    import torch

    import dz_lightning as dz

    oracle = dz.ModuleOracle(model, loss_fn, x, y, feature_reuse=False)
    params = dict(model.named_parameters())
    out = []
    for i in index.tolist():
        w = params[name].detach().clone()
        w.view(-1)[i] += delta
        out.append(oracle.loss({**params, name: w}))
    return torch.stack(out)


@pytest.fixture
def tiny_trainer(tmp_path: Path) -> Callable[..., L.Trainer]:
    """Factory ``tiny_trainer(**trainer_kwargs) -> L.Trainer`` rooted in the test's ``tmp_path``.

    See :func:`make_tiny_trainer` for the defaults; pass ``default_root_dir=`` to root one elsewhere.
    """
    return lambda **overrides: make_tiny_trainer(tmp_path, **overrides)


@pytest.fixture
def digits() -> DigitsDataModule:
    """The bundled sklearn-digits data module with 16 images per batch (a fresh one per test)."""
    return DigitsDataModule(batch_size=16)


def clean_ddp_environ(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default ``os.environ``) for a DDP subprocess.

    Drops :data:`DDP_ENV_VARS`, puts the repository root first on ``PYTHONPATH`` (the workers import the test
    helpers and the repository folders) and sets ``OMP_NUM_THREADS=1`` (two ranks share the machine's cores).
    """
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if k not in DDP_ENV_VARS}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture
def ddp_env() -> dict[str, str]:
    """The environment for a DDP subprocess: see :func:`clean_ddp_environ`."""
    return clean_ddp_environ()


@pytest.fixture
def run_ddp(ddp_env: dict[str, str], tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Launcher ``run_ddp(script, *args, cwd=tmp_path, timeout=300) -> CompletedProcess``.

    Runs ``python script *args`` in a clean DDP environment (:func:`clean_ddp_environ`) and captures its text
    output; the script starts its ranks itself (a Lightning ``Trainer(devices=2)`` or ``torch.multiprocessing``).
    A run past ``timeout`` seconds raises ``subprocess.TimeoutExpired`` instead of hanging the suite.
    """

    def run(script: str | Path, *args: str, cwd: str | Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *map(str, args)], env=ddp_env,
                              cwd=tmp_path if cwd is None else cwd, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a hand-made ``init_process_group``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
