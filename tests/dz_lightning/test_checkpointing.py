"""Nothing lost: atomic checksummed checkpoints, early failure on unwritable folders, interrupts, exact resume."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from dz_lightning.tasks.classification import DigitsDataModule, ZOClassifier
from lightning.pytorch.callbacks import ModelCheckpoint

from dz_lightning.checkpointing import CheckpointGuard, CorruptCheckpointError, SafeCheckpointIO, load_checkpoint
from dz_lightning.models import MLP
from dz_lightning.sampling import ResumableDataLoader, SeededRandomSampler


def _module(optimizer=None) -> ZOClassifier:
    torch.manual_seed(0)
    return ZOClassifier(MLP(hidden=(4,)), estimator="rge", q=4, mu=0.01,
                        optimizer=optimizer or (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)))


@pytest.fixture
def guarded_trainer(tiny_trainer) -> Callable[..., L.Trainer]:
    """``guarded_trainer(root, callbacks=(), **kw)``: a tiny Trainer in ``root``, safe checkpoint IO, the guard."""

    def make(root: Path, callbacks=(), **kw) -> L.Trainer:
        kw.setdefault("max_epochs", 2)
        return tiny_trainer(default_root_dir=str(root), limit_train_batches=5, plugins=[SafeCheckpointIO()],
                            callbacks=[CheckpointGuard(), *callbacks], **kw)

    return make


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _uninterrupted(guarded_trainer: Callable[..., L.Trainer], root: Path) -> dict[str, torch.Tensor]:
    model = _module()
    guarded_trainer(root, [ModelCheckpoint(dirpath=root, filename="last")]).fit(model, DigitsDataModule(batch_size=32))
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------- checksums, atomic
def test_checkpoint_is_written_with_its_sha256_and_no_temporary_files(tmp_path):
    io = SafeCheckpointIO()
    path = tmp_path / "sub" / "a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}}, path)
    digest = (tmp_path / "sub" / "a.ckpt.sha256").read_text().split()[0]
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.ckpt", "a.ckpt.sha256"]
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.arange(4.0))
    io.remove_checkpoint(path)
    assert list(path.parent.iterdir()) == []


def test_failed_write_leaves_the_previous_checkpoint_whole(tmp_path):
    io = SafeCheckpointIO()
    path = tmp_path / "a.ckpt"
    io.save_checkpoint({"v": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full halfway")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"v": 2, "bad": Unpicklable()}, path)
    assert io.load_checkpoint(path)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "a.ckpt.sha256"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "truncate_no_digest"])
def test_corrupted_checkpoint_is_named_plainly(tmp_path, damage):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.randn(1000)}}, path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    elif damage.startswith("truncate"):
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"this is not a checkpoint" * 10)
    path.write_bytes(bytes(data))
    if damage == "truncate_no_digest":
        (tmp_path / "last.ckpt.sha256").unlink()
    with pytest.raises(CorruptCheckpointError, match=f"corrupted or truncated checkpoint {path}"):
        io.load_checkpoint(path)
    with pytest.raises(CorruptCheckpointError, match="corrupted or truncated checkpoint"):
        load_checkpoint(path)


def test_resuming_from_a_corrupted_checkpoint_fails_before_training(guarded_trainer, tmp_path):
    _uninterrupted(guarded_trainer, tmp_path)
    path = tmp_path / "last.ckpt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    model = _module()
    with pytest.raises(CorruptCheckpointError, match=f"corrupted or truncated checkpoint {path}"):
        guarded_trainer(tmp_path / "again", max_epochs=3).fit(model, DigitsDataModule(batch_size=32), ckpt_path=path)


# ------------------------------------------------------------------------------------------ unwritable folder
def test_unwritable_checkpoint_folder_fails_before_the_first_step(guarded_trainer, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    model = _module()
    trainer = guarded_trainer(tmp_path, [ModelCheckpoint(dirpath=blocker / "ckpts")])
    with pytest.raises(PermissionError, match="checkpoint folder .*a_file/ckpts is not writable"):
        trainer.fit(model, DigitsDataModule(batch_size=32))
    assert trainer.global_step == 0


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_checkpoint_folder_fails_before_the_first_step(guarded_trainer, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        trainer = guarded_trainer(tmp_path, [ModelCheckpoint(dirpath=folder)])
        with pytest.raises(PermissionError, match="not writable"):
            trainer.fit(_module(), DigitsDataModule(batch_size=32))
        assert trainer.global_step == 0
    finally:
        folder.chmod(0o700)


# --------------------------------------------------------------------------------- interrupts, exact resume
class _FailAt(L.Callback):
    """Raise inside the training step of global step ``step`` (a batch in flight, as with Ctrl+C)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"black box crashed at step {self.step}")


def test_exception_mid_epoch_saves_a_checkpoint_and_resume_is_bit_identical(guarded_trainer, tmp_path):
    reference = _uninterrupted(guarded_trainer, tmp_path / "straight")
    root = tmp_path / "split"
    with pytest.raises(RuntimeError, match="crashed at step 3"):
        guarded_trainer(root, [ModelCheckpoint(dirpath=root, filename="last"), _FailAt(3)]).fit(
            _module(), DigitsDataModule(batch_size=32))
    saved = load_checkpoint(root / "interrupted.ckpt")
    assert saved["global_step"] == 3 and saved["epoch"] == 0
    assert not (root / "last.ckpt").exists()  # no epoch finished: last.ckpt untouched
    model = _module()
    guarded_trainer(root, [ModelCheckpoint(dirpath=root, filename="last")]).fit(
        model, DigitsDataModule(batch_size=32), ckpt_path=root / "interrupted.ckpt")
    assert _equal(model.state_dict(), reference), "the resumed run diverged from the uninterrupted one"


class _CtrlCAt(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            raise KeyboardInterrupt


def test_ctrl_c_saves_a_checkpoint_and_exits_non_zero(guarded_trainer, tmp_path):
    import signal

    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a KeyboardInterrupt; restore it
    try:
        with pytest.raises(SystemExit) as exc:
            guarded_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path, filename="last"), _CtrlCAt()]).fit(
                _module(), DigitsDataModule(batch_size=32))
    finally:
        signal.signal(signal.SIGINT, handler)
    assert exc.value.code == 1
    assert load_checkpoint(tmp_path / "interrupted.ckpt")["global_step"] == 2


def test_mid_epoch_checkpoint_resume_is_bit_identical(guarded_trainer, tmp_path):
    reference = _uninterrupted(guarded_trainer, tmp_path / "straight")
    root = tmp_path / "split"
    every = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    guarded_trainer(root, [every], max_steps=4).fit(_module(), DigitsDataModule(batch_size=32))
    mid = root / "step=4.ckpt"
    saved = load_checkpoint(mid)
    assert saved["global_step"] == 4 and saved["epoch"] == 0  # 4 of the epoch's 5 batches done
    model = _module()
    guarded_trainer(root, [ModelCheckpoint(dirpath=root, filename="last")]).fit(
        model, DigitsDataModule(batch_size=32), ckpt_path=mid)
    assert _equal(model.state_dict(), reference), "mid-epoch resume diverged from the uninterrupted run"


def test_resume_into_another_optimizer_is_refused_with_a_clear_error(guarded_trainer, tmp_path):
    _uninterrupted(guarded_trainer, tmp_path)
    model = _module(optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    with pytest.raises(ValueError, match=r"another optimizer than the configured Adam.*momentum"):
        guarded_trainer(tmp_path / "adam", max_epochs=3).fit(model, DigitsDataModule(batch_size=32),
                                                      ckpt_path=tmp_path / "last.ckpt")


# ------------------------------------------------------------------------------------------- sampler / loader
def test_resumable_loader_continues_after_the_saved_batches():
    data = list(range(20))
    loader = ResumableDataLoader(data, batch_size=3, sampler=SeededRandomSampler(20, seed=1))
    loader.sampler.set_epoch(2)
    full = [b.tolist() for b in loader]
    it = iter(loader)
    first = [next(it).tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state["batches"] == 2 and state["sampler"]["epoch"] == 2
    fresh = ResumableDataLoader(data, batch_size=3, sampler=SeededRandomSampler(20, seed=1))
    fresh.load_state_dict(state)
    rest = [b.tolist() for b in fresh]
    assert first + rest == full
    assert [b.tolist() for b in fresh] == full  # the skip applies to one epoch only
    other = ResumableDataLoader(data, batch_size=3, sampler=SeededRandomSampler(20, seed=2))
    with pytest.raises(ValueError, match="seeded with 1, this one with 2"):
        other.load_state_dict(state)


def test_intact_checkpoint_with_refused_objects_is_not_called_corrupted(tmp_path):
    io = SafeCheckpointIO()
    path = tmp_path / "custom.ckpt"
    io.save_checkpoint({"state_dict": {}, "extra": _Custom()}, path)
    with pytest.raises(Exception) as exc:  # torch's weights_only refusal, not a corruption verdict
        load_checkpoint(path)
    assert not isinstance(exc.value, CorruptCheckpointError)
    assert isinstance(load_checkpoint(path, weights_only=False)["extra"], _Custom)


class _Custom:
    """A pickled object that ``weights_only`` loading refuses."""


# ---------------------------------------------------------------------------- failed and killed saves (issue 28)
_FILE_SIZE_LIMITED_SAVE = '''
import resource, signal, sys, torch
from dz_lightning.checkpointing import SafeCheckpointIO
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # the digest fits, the new checkpoint does not
try:
    SafeCheckpointIO().save_checkpoint({"v": 2, "w": torch.ones(200_000)}, sys.argv[1])
except OSError as err:
    print("EFBIG" if err.errno == 27 else err)
'''


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs resource limits (POSIX)")
def test_save_past_the_file_size_limit_leaves_the_previous_checkpoint_verifiable(tmp_path):
    import subprocess
    import sys

    io = SafeCheckpointIO()
    path = tmp_path / "best.ckpt"
    io.save_checkpoint({"v": 1, "w": torch.zeros(10)}, path)
    out = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMITED_SAVE, str(path)], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert "EFBIG" in out.stdout, out.stdout + out.stderr[-2000:]
    assert io.load_checkpoint(path)["v"] == 1  # was: "corrupted or truncated checkpoint" (the digest went first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "best.ckpt.sha256"]


def _kill_during_save(path: Path, checkpoint: dict, call: int, after: bool) -> None:
    """Save ``checkpoint`` in a forked child that dies (``os._exit``, like SIGKILL: no cleanup) at its ``call``-th
    ``os.replace``, before or after it."""
    import os

    pid = os.fork()
    if pid == 0:  # the child
        real, count = os.replace, [0]

        def replace(src, dst):
            count[0] += 1
            if count[0] == call and not after:
                os._exit(9)
            real(src, dst)
            if count[0] == call:
                os._exit(9)

        os.replace = replace
        try:
            SafeCheckpointIO().save_checkpoint(checkpoint, path)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("call", [1, 2, 3])
def test_a_save_killed_at_any_rename_leaves_a_checkpoint_that_loads_and_verifies(tmp_path, call, after):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"v": 1, "w": torch.zeros(1000)}, path)
    _kill_during_save(path, {"v": 2, "w": torch.ones(1000)}, call, after)
    loaded = io.load_checkpoint(path)  # was: the old file refused when killed between the digest and data renames
    assert loaded["v"] in (1, 2) and torch.equal(loaded["w"], torch.full((1000,), float(loaded["v"] - 1)))
    if call >= 2 or after:  # the digest that accepts the new file was in place: the new, complete file is used
        assert loaded["v"] == 2
    assert load_checkpoint(path)["v"] == loaded["v"]
    io.save_checkpoint({"v": 3}, path)  # the next save removes what the dead writer left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]
    assert io.load_checkpoint(path)["v"] == 3


def test_stale_temporaries_of_dead_writers_are_removed_and_others_kept(tmp_path):
    for name in (".last.ckpt.abcd1234.tmp", ".best.ckpt.sha256.x_y_z_12.tmp", ".epoch=1.ckpt.k2k2k2k2.tmp"):
        (tmp_path / name).write_bytes(b"x" * 100)
    (tmp_path / ".notes.txt.abcd1234.tmp").write_text("not ours")
    SafeCheckpointIO().save_checkpoint({"v": 1}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.abcd1234.tmp", "last.ckpt", "last.ckpt.sha256"]


def test_a_digest_written_for_a_failed_save_does_not_condemn_the_intact_file(tmp_path):
    import os

    io = SafeCheckpointIO()
    path = tmp_path / "best.ckpt"
    io.save_checkpoint({"v": 1, "w": torch.zeros(100)}, path)
    # what earlier versions left after a failed save: the digest of bytes that were never written, newer than the file
    sidecar = tmp_path / "best.ckpt.sha256"
    sidecar.write_text(f"{'0' * 64}  best.ckpt\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**9))
    with pytest.warns(UserWarning, match="zip CRCs all pass"):
        assert io.load_checkpoint(path)["v"] == 1
    # the same digest file, but the checkpoint changed after it: refused
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(sidecar, ns=(stat.st_atime_ns, stat.st_mtime_ns - 2 * 10**9))
    with pytest.raises(CorruptCheckpointError, match="corrupted or truncated checkpoint"):
        io.load_checkpoint(path)


def test_flipped_weight_bit_without_a_digest_is_caught_by_the_zip_crc(tmp_path):
    io = SafeCheckpointIO()
    path = tmp_path / "copy.ckpt"
    w = torch.full((4096,), 0.25)
    io.save_checkpoint({"state_dict": {"w": w}}, path)
    (tmp_path / "copy.ckpt.sha256").unlink()
    data = bytearray(path.read_bytes())
    at = bytes(data).index(w[:4].numpy().tobytes()) + 4 * 2000 + 3  # the exponent byte of one weight
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], w)  # torch alone reads it
    with pytest.raises(CorruptCheckpointError, match=r"copy.ckpt: the zip CRC of its member .*data/0"):
        io.load_checkpoint(path)
    with pytest.raises(CorruptCheckpointError, match="zip CRC"):
        load_checkpoint(path)


class _SigtermAt(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_in_a_plain_script_saves_and_exits_143(guarded_trainer, tmp_path):
    with pytest.raises(SystemExit) as exc:
        guarded_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path, filename="last"), _SigtermAt()]).fit(
            _module(), DigitsDataModule(batch_size=32))
    assert exc.value.code == 143  # was: None, i.e. exit status 0 for a script that only calls trainer.fit
    assert load_checkpoint(tmp_path / "interrupted.ckpt")["global_step"] == 2


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_two_writers_of_one_checkpoint_leave_one_that_verifies(tmp_path):
    import os

    path = tmp_path / "last.ckpt"
    pids = []
    for writer in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                for step in range(15):
                    SafeCheckpointIO().save_checkpoint({"writer": writer, "w": torch.full((20_000,), float(step))},
                                                       path)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    final = SafeCheckpointIO().load_checkpoint(path)  # whichever writer renamed last, its digest is the one kept
    assert final["writer"] in (0, 1) and torch.equal(final["w"], torch.full((20_000,), 14.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


def test_a_garbled_digest_file_does_not_stop_the_next_save(tmp_path):
    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"v": 1}, path)
    (tmp_path / "last.ckpt.sha256").write_bytes(b"\xff\xfe not a digest")
    io.save_checkpoint({"v": 2}, path)  # was: UnicodeDecodeError on every later save
    assert io.load_checkpoint(path)["v"] == 2


def test_a_folder_that_cannot_be_locked_saves_unlocked_and_keeps_temporaries(tmp_path, monkeypatch):
    import fcntl

    def refuse(fd, op):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)
    (tmp_path / ".last.ckpt.abcd1234.tmp").write_bytes(b"maybe a live writer's")
    with pytest.warns(UserWarning, match="Cannot lock the checkpoint folder"):
        SafeCheckpointIO().save_checkpoint({"v": 1}, tmp_path / "last.ckpt")
    assert SafeCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")["v"] == 1
    assert (tmp_path / ".last.ckpt.abcd1234.tmp").exists()  # unlocked, nobody's temporary is removed
