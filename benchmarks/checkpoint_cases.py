"""Before/after table of the checkpoint and command-line cases of issues #17 and #18 (prints JSON).

Runs each case through ``python -m dz_lightning`` (and a few Trainer-level scripts) in a fresh folder, on tiny
digits runs. ``--source DIR`` runs another checkout of the project instead of the installed one (put first on
``PYTHONPATH``), e.g. an export of the commit before the fixes:

    git archive d369d08 | tar -x -C /tmp/before
    ln -s ../tasks /tmp/before/dz_lightning/tasks; ln -s ../callbacks /tmp/before/dz_lightning/callbacks
    python -m benchmarks.checkpoint_cases --source /tmp/before > before.json
    python -m benchmarks.checkpoint_cases > after.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "1",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--model.init_args.model.init_args.hidden", "[4]"]

CALLBACKS = '''
import os, signal
import lightning as L

class SigtermAt(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

class FailAt(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 3:
            raise RuntimeError("black box crashed at step 3")
'''

MID_EPOCH = '''
import lightning as L, torch
from lightning.pytorch.callbacks import ModelCheckpoint
from dz_lightning.tasks.classification import DigitsDataModule, ZOClassifier
from dz_lightning.models import MLP

def module():
    torch.manual_seed(0)
    return ZOClassifier(MLP(hidden=(4,)), estimator="rge", q=4, mu=0.01,
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))

def trainer(root, cbs, **kw):
    kw.setdefault("max_epochs", 2)
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_train_batches=5, limit_val_batches=0, default_root_dir=root, callbacks=cbs, **kw)

a = module(); trainer("a", [ModelCheckpoint(dirpath="a")]).fit(a, DigitsDataModule(batch_size=32))
trainer("b", [ModelCheckpoint(dirpath="b", filename="{step}", every_n_train_steps=2, save_top_k=-1)],
        max_steps=4).fit(module(), DigitsDataModule(batch_size=32))
b = module(); trainer("b", [ModelCheckpoint(dirpath="b2")]).fit(b, DigitsDataModule(batch_size=32),
                                                                ckpt_path="b/step=4.ckpt")
print(max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values())))
'''

OVERRIDE = '''
import sys
from dz_lightning.cli import build_cli
cli = build_cli(sys.argv[1:])
print("MU", cli.model.mu)
'''


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> dict:
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    err = out.stderr.strip().splitlines()
    return {"rc": out.returncode, "stdout": out.stdout, "stderr_lines": len(err),
            "last_error": next((line for line in reversed(err) if "Error" in line or "error" in line or
                                line.startswith("dz: ")), "")[:240]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help="checkout to run instead of the installed one")
    args = parser.parse_args()
    src = args.source.resolve() if args.source else ROOT
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    work = Path(tempfile.mkdtemp(prefix="dz-cases-"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src) if args.source else "", str(work)) if p)
    (work / "cases_callbacks.py").write_text(CALLBACKS)
    digits = str(src / "configs" / "classification" / "digits.yaml")
    grasp = str(src / "configs" / "classification" / "digits_zo_grasp90.yaml")
    dz = ["-m", "dz_lightning"]
    results: dict[str, object] = {"source": str(src)}

    def fresh(name: str) -> Path:
        folder = work / name
        folder.mkdir()
        return folder

    def ckpts(folder: Path) -> list[str]:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.ckpt"))

    # re-running a config: which checkpoint files exist, and what the README's test command would read
    f = fresh("rerun")
    for _ in range(2):
        _run([*dz, "fit", "-c", digits, *TINY], f, env)
    results["rerun_checkpoints"] = ckpts(f)

    # the last checkpoint: step of last.ckpt after 2 epochs x 5 steps
    import torch

    lasts = [p for p in f.rglob("last.ckpt")]
    results["last_ckpt_global_step_of_10"] = int(torch.load(lasts[0], weights_only=False)["global_step"])

    # test-time override of a model argument
    f = fresh("override")
    _run([*dz, "fit", "-c", digits, *TINY], f, env)
    last = sorted(f.rglob("last.ckpt"))[0]
    r = _run(["-c", OVERRIDE, "test", "-c", digits, *TINY, "--ckpt_path", str(last), "--model.init_args.mu", "0.02"],
             f, env)
    results["test_override_mu_0.02_used"] = next((line.split()[1] for line in r["stdout"].splitlines()
                                                  if line.startswith("MU")), r["last_error"])

    # --zo_grasp.sparsity
    f = fresh("zo_grasp")
    r = _run([*dz, "fit", "-c", grasp, *TINY, "--zo_grasp.sparsity", "0.8", "--zo_grasp.q", "8",
              "--zo_grasp.samples_per_class", "2"], f, env)
    results["zo_grasp_sparsity_flag"] = {"rc": r["rc"], "error": r["last_error"]}

    # SIGTERM mid-epoch and an exception at step 3
    for name, cb in (("sigterm", "SigtermAt"), ("exception", "FailAt")):
        f = fresh(name)
        r = _run([*dz, "fit", "-c", digits, *TINY, f"--trainer.callbacks+=cases_callbacks.{cb}"], f, env)
        results[f"{name}_at_step_3"] = {"rc": r["rc"], "checkpoints": ckpts(f)}

    # mid-epoch resume vs uninterrupted (max |weight difference|)
    f = fresh("mid_epoch")
    r = _run(["-c", MID_EPOCH], f, env)
    results["mid_epoch_resume_max_abs_diff"] = r["stdout"].strip().splitlines()[-1] if r["rc"] == 0 else r["last_error"]

    # corrupted / truncated / garbage checkpoints given to dz test
    f = fresh("corrupt")
    _run([*dz, "fit", "-c", digits, *TINY], f, env)
    good = sorted(f.rglob("last.ckpt"))[0]
    data = bytearray(good.read_bytes())
    cases = {"flipped_64_bytes": None, "truncated": data[: len(data) // 2], "garbage": b"not a checkpoint" * 8}
    flipped = bytearray(data)
    middle = len(flipped) - 4096
    flipped[middle:middle + 64] = bytes(b ^ 0x55 for b in flipped[middle:middle + 64])
    cases["flipped_64_bytes"] = flipped
    for name, content in cases.items():
        path = f / f"{name}.ckpt"
        path.write_bytes(bytes(content))
        sidecar = Path(f"{good}.sha256")
        if sidecar.exists():  # the damaged copy carries the good file's digest, as a damaged last.ckpt would
            Path(f"{path}.sha256").write_text(sidecar.read_text())
        r = _run([*dz, "test", "-c", digits, *TINY, "--ckpt_path", str(path)], f, env)
        results[f"corrupt_{name}"] = {"rc": r["rc"], "error": r["last_error"]}

    # unwritable checkpoint folder (a path below a regular file; root ignores chmod)
    f = fresh("unwritable")
    (f / "blocker").write_text("a file")
    r = _run([*dz, "fit", "-c", digits, *TINY, "--trainer.callbacks.dirpath", str(f / "blocker" / "ckpts")], f, env)
    results["unwritable_checkpoint_folder"] = {"rc": r["rc"], "error": r["last_error"]}

    # SGD checkpoint resumed into Adam
    f = fresh("optimizer")
    _run([*dz, "fit", "-c", digits, *TINY], f, env)
    last = sorted(f.rglob("last.ckpt"))[0]
    r = _run([*dz, "fit", "-c", digits, *TINY, "--trainer.max_epochs", "3", "--ckpt_path", str(last),
              "--model.init_args.optimizer", "torch.optim.Adam", "--model.init_args.optimizer.lr", "0.01"], f, env)
    results["sgd_checkpoint_into_adam"] = {"rc": r["rc"], "error": r["last_error"]}

    # a configuration error
    f = fresh("config_error")
    r = _run([*dz, "fit", "-c", digits, "--model.init_args.mu", "-1"], f, env)
    results["config_error_mu_-1"] = {"rc": r["rc"], "stderr_lines": r["stderr_lines"], "error": r["last_error"]}

    # predict, --version, short names
    f = fresh("predict")
    _run([*dz, "fit", "-c", digits, *TINY], f, env)
    last = sorted(f.rglob("last.ckpt"))[0]
    r = _run([*dz, "predict", "-c", digits, *TINY, "--ckpt_path", str(last)], f, env)
    results["predict_files_written"] = {"rc": r["rc"], "files": sorted(str(p.relative_to(f)) for p in f.rglob("pred*"))}
    r = _run([*dz, "--version"], work, env)
    results["version"] = {"rc": r["rc"], "stdout": r["stdout"].strip()[:80]}
    r = _run([*dz, "fit", "--model.help", "ZOClassifier"], work, env)
    results["model_help_short_name"] = {"rc": r["rc"], "error": r["last_error"]}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
