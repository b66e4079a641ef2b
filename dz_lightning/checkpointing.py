"""Checkpoints that are written whole or not at all, verified on load, and saved when a run is interrupted.

* :class:`SafeCheckpointIO` (a Trainer plugin): every checkpoint is written to a temporary file in its folder,
  flushed to disk and renamed over the target, with its SHA-256 in ``<checkpoint>.sha256`` beside it, written so
  that a failed or killed save (disk full, a file-size limit, SIGKILL at any moment) leaves a checkpoint that loads
  and verifies: the old one, or the new one (see :func:`_save_bytes`). Temporary files of dead writers are removed
  by the next save. Loading checks the digest (the zip CRCs where there is none) and names a damaged file plainly:
  ``corrupted or truncated checkpoint <path>``.
* :class:`CheckpointGuard` (a callback): fails before training when a checkpoint folder is not writable, saves
  ``interrupted.ckpt`` when a fit stops on an exception, Ctrl+C (SIGINT) or SIGTERM, and keeps a resumable
  data loader's position exact in every checkpoint.

``dz`` adds both to every Trainer; in your own script pass ``Trainer(plugins=[SafeCheckpointIO()],
callbacks=[CheckpointGuard(), ...])``.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import os
import pickle
import re
import signal
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writers do not take turns
    fcntl = None

__all__ = ["CheckpointFolderError", "CheckpointGuard", "CorruptCheckpointError", "SafeCheckpointIO", "StepInterrupted",
           "atomic_write", "load_checkpoint", "sha256_file", "zip_damage"]

_DIGEST_SUFFIX = ".sha256"


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: its digest does not match, or it cannot be unpickled."""


class CheckpointFolderError(PermissionError):
    """A checkpoint folder that cannot hold a file (read-only, not a folder, no space for a new entry)."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` whole or not at all.

    ``write(tmp)`` fills a temporary file unique to this writer in the same folder (two writers never share one);
    it is then fsynced and renamed over ``path``. On any failure the temporary file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_bytes(data: bytes, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _is_local(path: str | Path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _sidecar(path: str | Path) -> Path:
    return Path(f"{path}{_DIGEST_SUFFIX}")


def _recorded_digests(sidecar: Path) -> list[str]:
    """The digests a ``.sha256`` file accepts, newest first (one line; two while a save is between its renames)."""
    return [line.split()[0] for line in sidecar.read_text().splitlines() if line.strip()]


def zip_damage(path: str | Path) -> str | None:
    """What the zip CRCs of a torch checkpoint say is damaged (``None``: intact, or not a zip file at all)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        return f"its zip structure is broken ({type(err).__name__}: {str(err)[:200]})"
    return None if bad is None else f"the zip CRC of its member {bad!r} does not match"


def verify_checksum(path: str | Path) -> bool:
    """Raise :class:`CorruptCheckpointError` when ``path`` is damaged; return whether a digest vouched for it.

    With ``<path>.sha256``: the file's SHA-256 must be one the digest file records (the newest, or the previous one
    when a save stopped between its two renames). A digest that is newer than the file and does not match it, while
    the file's zip CRCs all pass, is a digest written for a save that then failed (earlier versions wrote the digest
    first): the file is intact and is loaded, with a warning. Without a digest the zip CRCs of the file are checked.

    Returns:
        ``True`` when a digest was checked and matches, ``False`` when there is no digest file (the zip CRCs passed,
        or the file is not a zip archive and the unpickler is the only check).
    """
    return _verify(path, complete=False)


def _verify(path: str | Path, complete: bool) -> bool:
    """:func:`verify_checksum`; with ``complete``, first finish a save that stopped between its renames (below)."""
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        damage = zip_damage(path)
        if damage is not None:
            raise CorruptCheckpointError(f"corrupted or truncated checkpoint {path}: {damage} (it has no "
                                         f"{_DIGEST_SUFFIX} file). Use another checkpoint.")
        return False
    expected = _recorded_digests(sidecar)
    actual = sha256_file(path)
    if complete and expected and actual != expected[0] and _complete_save(Path(path), expected[0]):
        return True
    if actual in expected:
        if actual != expected[0]:
            rank_zero_warn(f"{path} is the checkpoint before the last save to it, which stopped before its rename "
                           f"(the newer one was never complete); loading this intact previous one.")
        return True
    damage = zip_damage(path)
    if damage is None and zipfile.is_zipfile(path) and sidecar.stat().st_mtime_ns > Path(path).stat().st_mtime_ns:
        rank_zero_warn(f"{sidecar} names another file than {path}, but it was written after the file and the file's "
                       "zip CRCs all pass: a save that wrote the digest and then failed left the previous, intact "
                       "checkpoint behind. Loading it.")
        return True
    raise CorruptCheckpointError(
        f"corrupted or truncated checkpoint {path}: its SHA-256 is {actual}, but {sidecar} records "
        f"{expected[0] if expected else 'nothing'}{f' ({damage})' if damage else ''}. Use another checkpoint (e.g. "
        "the previous run's or best.ckpt)."
    )


def load_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool | None = True) -> dict[str, Any]:
    """Load a checkpoint after checking its digest; a damaged file raises :class:`CorruptCheckpointError`.

    Args:
        path: checkpoint file.
        map_location: as in :func:`torch.load`.
        weights_only: as in :func:`torch.load` (``True``: tensors and plain containers only, never arbitrary code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    return _load_verified(path, lambda: torch.load(path, map_location=map_location, weights_only=weights_only))


# what torch.load raises on bytes it cannot read: a damaged zip, a truncated pickle, a garbled record, storage key or
# tensor-rebuild call (the legacy non-zip format fails with any of these when one bit flips)
_UNREADABLE = (EOFError, OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
               UnicodeDecodeError, KeyError, IndexError, AssertionError, TypeError)


def _load_verified(path: Path, load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``load()`` after checking ``path`` (:func:`_verify`); a read error of bytes no digest vouches for is
    :class:`CorruptCheckpointError`, one of bytes a digest vouches for is raised as it is (e.g. objects
    ``weights_only`` refuses: not corruption)."""
    intact = _verify(path, complete=True)
    try:
        return load()
    except _UNREADABLE as err:
        if intact:
            raise
        raise _corrupt(path, err) from err


def _corrupt(path: str | Path, err: BaseException) -> CorruptCheckpointError:
    # torch's own text for an unpickling failure advises weights_only=False, which is the wrong advice for a damaged
    # or untrusted file; name the error type only
    detail = type(err).__name__
    if not isinstance(err, pickle.UnpicklingError) and str(err):
        detail += f": {str(err).splitlines()[0][:200]}"
    return CorruptCheckpointError(
        f"corrupted or truncated checkpoint {path} (it cannot be read as a torch checkpoint of tensors and plain "
        f"containers: {detail}). It has no {_DIGEST_SUFFIX} file to compare with; use another checkpoint."
    )


_TMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")  # atomic_write's temporary names (mkstemp's 8 characters)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[int | None]:
    """An exclusive lock on ``folder``: its open file descriptor, or ``None`` where no lock could be taken (no
    ``flock``, or a file system that refuses it: warned once per folder).

    Writers of this module in one folder take turns, so a temporary file found while holding the lock belongs to a
    writer that died; the lock goes with the process (SIGKILL included).
    """
    if fcntl is None:
        yield None
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # a file system without flock (Lustre without -o flock, some FUSE mounts)
            _warn_no_lock(folder, err)
            yield None
            return
        yield fd
    finally:
        os.close(fd)  # releases the lock


_WARNED_NO_LOCK: set[str] = set()


def _warn_no_lock(folder: Path, err: OSError) -> None:
    if str(folder) not in _WARNED_NO_LOCK:
        _WARNED_NO_LOCK.add(str(folder))
        rank_zero_warn(f"Cannot lock the checkpoint folder {folder} ({type(err).__name__}: {err}): saves go on "
                       "unlocked, so two processes must not save the same checkpoint at once, and stale temporary "
                       "files are left in place.")


def _is_our_temporary(name: str, path: Path) -> bool:
    match = _TMP.match(name)
    return match is not None and (match["name"].endswith((".ckpt", f".ckpt{_DIGEST_SUFFIX}"))
                                  or match["name"] in (path.name, _sidecar(path).name))


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporary checkpoint files that dead writers left in ``path``'s folder (call with the lock held)."""
    for entry in path.parent.iterdir():
        if _is_our_temporary(entry.name, path) and entry.is_file():
            entry.unlink(missing_ok=True)


def _digest_lines(*digests: str, name: str) -> bytes:
    return "".join(f"{d}  {name}\n" for d in digests).encode()


def _save_bytes(data: bytes | memoryview, path: Path) -> None:
    """Write checkpoint bytes and their digest so that any failure leaves a file that verifies.

    1. the data go to a temporary file, fsynced (a failure here, disk full included, changes nothing visible);
    2. the digest file is replaced by one that accepts the new digest and the current file's (atomically);
    3. the data file is renamed over ``path``;
    4. the digest file is replaced by one with the new digest only.

    After a failure or a kill at any moment, ``path`` is the old file or the new one and the digest file accepts
    it; a kill between 2 and 3 leaves the new file complete in its temporary, which the next load puts in place.
    Writers in one folder take turns (:func:`_folder_lock`), and each save first removes temporaries that writers
    which died left behind.
    """
    sidecar = _sidecar(path)
    new = hashlib.sha256(data).hexdigest()
    with _folder_lock(path.parent) as folder_fd:
        if folder_fd is not None:  # only under the lock: unlocked, a temporary may be a live writer's
            _remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            previous: list[str] = []
            if path.is_file():  # every digest the current file may match (two after a save killed mid-way)
                with contextlib.suppress(OSError, ValueError):  # an unreadable digest file: hash the file itself
                    previous = _recorded_digests(sidecar)[:2] if sidecar.is_file() else []
                previous = previous or [sha256_file(path)]
            _atomic_write_bytes(_digest_lines(new, *[d for d in previous if d != new], name=path.name), sidecar)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:
            _atomic_write_bytes(_digest_lines(new, name=path.name), sidecar)
            if folder_fd is not None:
                os.fsync(folder_fd)
        except OSError as err:  # the checkpoint is saved and verifies (the digest file accepts both)
            rank_zero_warn(f"Saved {path}, but could not shorten its digest file {sidecar} to the new digest "
                           f"({type(err).__name__}: {err}); it still verifies.")


def _complete_save(path: Path, newest: str) -> bool:
    """Put in place a complete temporary whose digest is the newest ``path``'s digest file records.

    That is a save killed between its digest rename and its data rename (step 2 and 3 of :func:`_save_bytes`): the
    new checkpoint is whole, only not renamed. Returns whether it was put in place (a read-only folder: no).
    """
    try:
        with _folder_lock(path.parent):
            for entry in sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")):
                if _TMP.match(entry.name) and entry.is_file() and sha256_file(entry) == newest:
                    os.replace(entry, path)
                    _atomic_write_bytes(_digest_lines(newest, name=path.name), _sidecar(path))
                    rank_zero_warn(f"The last save of {path} was killed before its final rename; its complete new "
                                   f"file {entry.name} matched the digest and was put in place.")
                    return True
    except OSError:
        pass
    return False


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic checkpoint writes with a SHA-256 file beside each checkpoint, checked on load.

    Remote paths (``s3://`` and the like) fall back to Lightning's own writer, without a digest.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"`{type(self).__name__}.save_checkpoint` does not use `storage_options`, but got {storage_options}."
            )
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path)
            return
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        _save_bytes(buffer.getbuffer(), path)

    @override
    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        path = Path(str(path).removeprefix("file://"))
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        load = super().load_checkpoint
        return _load_verified(path, lambda: load(path, map_location=map_location, weights_only=weights_only))

    @override
    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if _is_local(path):
            Path(f"{str(path).removeprefix('file://')}{_DIGEST_SUFFIX}").unlink(missing_ok=True)


class CheckpointGuard(L.Callback):
    """Nothing lost: writable checkpoint folders, a checkpoint on interrupts, exact resume positions.

    * At fit start (after the checkpoint callbacks resolved their folders, before any training step), every
      ``ModelCheckpoint`` folder is created if needed and must accept a file; otherwise a ``PermissionError`` names
      it (Lightning would log the failure of each save and finish with no checkpoint at all).
    * A fit stopped by SIGTERM exits with status 143 (128 + SIGTERM), in a plain script too (Lightning's own
      ``SIGTERMException`` carries no status: exit 0).
    * In one process, SIGTERM during a training step before its optimizer step (while the step queries its oracle,
      however long a black box takes to answer), or during a validation, test or predict batch, stops the step at
      once with :class:`StepInterrupted`; Lightning alone would wait for the step to end, forever for a black box
      that hangs. The step's queries are lost; the
      weights and optimizer state are those of the last completed step (the step's one training forward may have
      updated BatchNorm statistics and the direction generator, so resuming is not bit-identical to a run that was
      never stopped, as after Ctrl+C). SIGTERM at any other moment, and under DDP (where every rank must stop at
      the same step), stops the run after the current step. A black box that blocks in C code without returning to
      Python (or swallows ``BaseException``) is not stopped: give its oracle a ``timeout``.
    * Under DDP, Ctrl+C (SIGINT) and SIGTERM on any rank stop every rank before the same next step: each rank
      records the signal, and before each training step the ranks agree (one all-reduce of one number) whether one
      of them got one. Then the interrupt checkpoint is saved and the run exits as in one process (1 after Ctrl+C,
      143 after SIGTERM). A second Ctrl+C on a rank stops it at once, without a checkpoint (for a step that hangs).
      The signal may reach one rank or all of them (a scheduler's SIGTERM to every process, Ctrl+C in a terminal).
      A signal during the last step ends nothing early: the fit finishes normally.
    * When a fit stops on an exception, Ctrl+C or SIGTERM after at least one optimizer step, the current state is
      saved to ``<folder of the first ModelCheckpoint>/<filename>.ckpt`` (``last.ckpt`` and ``best.ckpt`` stay as
      they were); resume with ``--ckpt_path`` on that file. Weights that are not finite are not saved. Under DDP
      only the signals above save (saving needs every rank at the same step); another exception does not.
    * Every checkpoint records how many batches of the current epoch are done, so a
      :class:`~dz_lightning.sampling.ResumableDataLoader` continues with the batch after them, also when the
      checkpoint was saved while a batch was in flight.

    Args:
        filename: name (without ``.ckpt``) of the checkpoint saved on an interrupt.
        save_on_interrupt: save that checkpoint (``False`` only checks folders and positions).
        stop_steps_on_sigterm: stop a training step (before its optimizer step) or an evaluation batch at once on
            SIGTERM in one process (``False``: let it finish, as Lightning does).
    """

    def __init__(self, filename: str = "interrupted", save_on_interrupt: bool = True,
                 stop_steps_on_sigterm: bool = True) -> None:
        if not isinstance(filename, str) or not filename or "/" in filename or os.sep in filename:
            raise ValueError(f"Expected argument `filename` to be a plain file name, but got {filename!r}.")
        self.filename = filename
        self.save_on_interrupt = save_on_interrupt
        self.stop_steps_on_sigterm = stop_steps_on_sigterm
        self.saved_path: str | None = None
        self._stepped = False  # a training batch ran in this process (nothing to save before that)
        self._interruptible = False  # inside a training step before its optimizer step, or an evaluation batch
        self._stop_signal = 0  # under DDP: the SIGINT or SIGTERM this rank received (0: none)
        self._stop_together = False  # under DDP: the ranks agree before each step whether to stop
        self._restored_groups: list[list[set[str]]] = []  # parameter-group keys of the checkpoint's optimizers

    @property
    def state_key(self) -> str:
        return self._generate_state_key(filename=self.filename)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stepped = False
        for optimizer, groups in zip(trainer.optimizers, self._restored_groups, strict=False):
            _check_optimizer_state(optimizer, groups, trainer.ckpt_path)
        self._restored_groups = []
        for callback in trainer.checkpoint_callbacks:
            folder = getattr(callback, "dirpath", None)
            if folder is not None and _is_local(folder):
                _check_writable(Path(str(folder).removeprefix("file://")))

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # the optimizers do not exist yet; on_fit_start compares them before Lightning loads their state
        self._restored_groups = [[set(g) for g in s.get("param_groups", [])]
                                 for s in checkpoint.get("optimizer_states", [])]

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registered its own SIGTERM handler before this hook (it only records the signal) and puts the
        # handler it found back at teardown, which removes this one with it
        self._stop_signal, self._stop_together = 0, False
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
            return
        if trainer.world_size == 1:
            self._stop_steps_on_sigterm(trainer)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            # instead of Lightning's SIGTERM handler, whose broadcast inside the handler hangs when every rank gets
            # the signal (rank 0 forwards it, so another rank broadcasts twice), and of Ctrl+C's KeyboardInterrupt,
            # which stops each rank wherever it is (no rank can save then)
            self._stop_together = True
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, _StopRanksTogether(self))

    def _stop_steps_on_sigterm(self, trainer: L.Trainer) -> None:
        """In one process, put :class:`_StopStepOnSigterm` before the SIGTERM handler (once per run)."""
        handler = signal.getsignal(signal.SIGTERM)
        if (self.stop_steps_on_sigterm and trainer.world_size == 1 and hasattr(signal, "SIGTERM")
                and threading.current_thread() is threading.main_thread()
                and not isinstance(handler, _StopStepOnSigterm)):
            signal.signal(signal.SIGTERM, _StopStepOnSigterm(self, handler))

    def _evaluation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_steps_on_sigterm(trainer)

    def _enter_batch(self, *args: Any, **kwargs: Any) -> None:
        """A validation, test or predict batch starts: a SIGTERM from now on stops it at once."""
        self._interruptible = True

    def _leave_batch(self, *args: Any, **kwargs: Any) -> None:
        self._interruptible = False

    # the same for every evaluation loop (Lightning calls each hook by name)
    on_validation_start = on_test_start = on_predict_start = _evaluation_start
    on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _enter_batch
    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _leave_batch

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._stop_together:
            self._stop_ranks_together(trainer)
        self._stepped = True
        self._interruptible = True

    def _stop_ranks_together(self, trainer: L.Trainer) -> None:
        """Raise on every rank at once when one of them received SIGINT or SIGTERM (one all-reduce, one host read)."""
        signum = torch.tensor([self._stop_signal], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
        received = int(signum.item())
        if received == signal.SIGTERM:
            raise SIGTERMException(128 + signal.SIGTERM)
        if received == signal.SIGINT:
            raise _RanksInterrupted

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._interruptible = False  # the step's update runs to its end: a SIGTERM now waits for the step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._interruptible = False

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._interruptible = False

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._interruptible = False
        if isinstance(exception, SIGTERMException) and exception.code is None:
            # Lightning's SIGTERMException is a SystemExit without a status: a plain script would exit 0 after it
            exception.code = 128 + signal.SIGTERM
        if not self.save_on_interrupt or not self._stepped or trainer.global_step == 0:
            return
        self._stop_together = False
        if trainer.world_size > 1 and not isinstance(exception, (SIGTERMException, _RanksInterrupted)):
            # saving is collective (a barrier); only a signal is known to stop every rank at the same step
            rank_zero_warn(f"Not saving an interrupt checkpoint after {type(exception).__name__} under DDP: another "
                           "rank may not reach the save. Resume from the last checkpoint.")
            return
        if any(not torch.isfinite(p).all() for p in pl_module.parameters()):
            rank_zero_warn(f"Not saving an interrupt checkpoint after {type(exception).__name__}: the weights are not "
                           "finite. The last good checkpoint is unchanged.")
            return
        path = Path(self._folder(trainer)) / f"{self.filename}{ModelCheckpoint.FILE_EXTENSION}"
        try:
            trainer.save_checkpoint(path)
        except OSError as err:  # never hide the exception that stopped the run behind a failed save
            rank_zero_warn(f"Could not save {path} after {type(exception).__name__}: {err}")
            return
        self.saved_path = str(path)
        cause = ("SIGTERM" if isinstance(exception, SIGTERMException)
                 else "Ctrl+C" if isinstance(exception, KeyboardInterrupt) else type(exception).__name__)
        rank_zero_info(f"{cause} at step {trainer.global_step}: saved {path} (resume with --ckpt_path {path}).")

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A resumable loader counts the batches it handed out; when a checkpoint is saved while a batch is in flight
        # (an interrupt), that batch is not done. The loop's processed count is the truth (`completed` lags by one
        # inside on_train_batch_end, where ModelCheckpoint(every_n_train_steps) saves).
        try:
            states = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        except (KeyError, TypeError):
            return
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        for state in states:
            if isinstance(state, dict) and "batches" in state and state["batches"] > done:
                state["batches"] = done

    def _folder(self, trainer: L.Trainer) -> str:
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                return str(callback.dirpath)
        return str(Path(trainer.default_root_dir) / "checkpoints")


class StepInterrupted(SIGTERMException):
    """SIGTERM arrived inside a training step, before its optimizer step: the step was stopped (exit status 143).

    A :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException` (a ``SystemExit``), so everything that
    handles Lightning's SIGTERM handles it, and a black box's ``except Exception`` does not swallow it.
    """

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class _StopStepOnSigterm:
    """SIGTERM handler: the previous one (Lightning's, which records the signal), then, inside a training step that
    has not reached its optimizer step or inside an evaluation batch, :class:`StepInterrupted` (the step stops
    wherever it waits)."""

    def __init__(self, guard: CheckpointGuard, previous: Any) -> None:
        self.guard, self.previous = guard, previous

    def __call__(self, signum: int, frame: Any) -> None:
        if callable(self.previous):
            self.previous(signum, frame)
        if self.guard._interruptible:
            self.guard._interruptible = False  # a second SIGTERM during the unwinding does not raise again
            rank_zero_info("SIGTERM inside a step: stopping it at once (a training step before it changes a weight).")
            raise StepInterrupted


class _RanksInterrupted(KeyboardInterrupt):
    """Ctrl+C under DDP, raised on every rank before the same training step (Lightning handles it as Ctrl+C)."""


class _StopRanksTogether:
    """SIGINT and SIGTERM handler under DDP: record the signal; the ranks stop together before the next step.

    No collective runs in the handler (the all-reduce before each step tells the other ranks). A second SIGINT
    raises ``KeyboardInterrupt`` at once, without a checkpoint: the way out of a step that never ends.
    """

    def __init__(self, guard: CheckpointGuard) -> None:
        self.guard = guard

    def __call__(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.guard._stop_signal == signal.SIGINT:
            raise KeyboardInterrupt
        first = self.guard._stop_signal == 0
        self.guard._stop_signal = max(self.guard._stop_signal, int(signum))
        if first:
            name = signal.Signals(signum).name
            rank_zero_info(f"{name} received: every rank stops before its next training step and the interrupt "
                           "checkpoint is saved" + (" (Ctrl+C again: stop at once, no checkpoint)."
                                                    if signum == signal.SIGINT else "."))


def _check_optimizer_state(optimizer: torch.optim.Optimizer, groups: list[set[str]], ckpt_path: Any) -> None:
    """Refuse optimizer state restored from a checkpoint of another optimizer class (e.g. SGD into Adam).

    Lightning would hand the state to ``Optimizer.load_state_dict``, which fails obscurely (Adam: ``KeyError: 'step'``)
    or not at all. The hyperparameter names of the saved parameter groups tell the class apart.
    """
    expected = set(optimizer.defaults)
    for group in groups:
        restored = group - {"params", "initial_lr"}
        missing, extra = expected - restored, restored - expected
        if missing and extra:
            raise ValueError(
                f"The checkpoint {ckpt_path} holds the state of another optimizer than the configured "
                f"{type(optimizer).__name__}: its parameter groups have {sorted(extra)} and lack {sorted(missing)}. "
                "Resume with the optimizer the run was trained with, or start a new run from the weights only "
                "(e.g. `dz fit ...` without --ckpt_path after loading the state_dict)."
            )


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dz-write-check-"):
            pass
    except OSError as err:
        raise CheckpointFolderError(
            f"The checkpoint folder {folder} is not writable ({type(err).__name__}: {err.strerror or err}); no "
            "checkpoint could be saved. Make it writable or choose another one (ModelCheckpoint `dirpath`, or the "
            "logger's `save_dir`)."
        ) from err
