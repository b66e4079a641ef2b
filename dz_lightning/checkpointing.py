"""Checkpoints that are written whole or not at all, verified on load, and saved when a run is interrupted.

* :class:`SafeCheckpointIO` (a Trainer plugin): every checkpoint is written to a temporary file in its folder,
  flushed to disk and renamed over the target (a crash leaves the old file or the new one, never half of one), with
  its SHA-256 in ``<checkpoint>.sha256`` beside it, written the same way. Loading checks the digest and names a
  damaged file plainly: ``corrupted or truncated checkpoint <path>``.
* :class:`CheckpointGuard` (a callback): fails before training when a checkpoint folder is not writable, saves
  ``interrupted.ckpt`` when a fit stops on an exception, Ctrl+C (SIGINT) or SIGTERM, and keeps a resumable
  data loader's position exact in every checkpoint.

``dz`` adds both to every Trainer; in your own script pass ``Trainer(plugins=[SafeCheckpointIO()],
callbacks=[CheckpointGuard(), ...])``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

__all__ = ["CheckpointFolderError", "CheckpointGuard", "CorruptCheckpointError", "SafeCheckpointIO", "atomic_write",
           "load_checkpoint", "sha256_file"]

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


def verify_checksum(path: str | Path) -> bool:
    """Raise :class:`CorruptCheckpointError` when ``<path>.sha256`` exists and does not match ``path``.

    Returns:
        ``True`` when the digest was checked and matches, ``False`` when there is no digest file.
    """
    sidecar = Path(f"{path}{_DIGEST_SUFFIX}")
    if not sidecar.is_file():
        return False
    expected = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
    actual = sha256_file(path)
    if actual != expected:
        raise CorruptCheckpointError(
            f"corrupted or truncated checkpoint {path}: its SHA-256 is {actual}, but {sidecar} records "
            f"{expected or 'nothing'}. Use another checkpoint (e.g. the previous run's or best.ckpt)."
        )
    return True


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
    intact = verify_checksum(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (EOFError, OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            UnicodeDecodeError, KeyError, IndexError) as err:
        if intact:  # the bytes are the ones written: not corruption (e.g. objects weights_only refuses)
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
        data = buffer.getvalue()
        # the digest goes first: a crash between the two renames leaves a digest that names the new bytes, and a
        # load then reports the old file as not matching rather than trusting a stale digest silently
        _atomic_write_bytes(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode(),
                            Path(f"{path}{_DIGEST_SUFFIX}"))
        _atomic_write_bytes(data, path)

    @override
    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        path = Path(str(path).removeprefix("file://"))
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        intact = verify_checksum(path)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (EOFError, OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, UnicodeDecodeError,
                ValueError) as err:
            if intact:  # the bytes are the ones written: not corruption (e.g. objects weights_only refuses)
                raise
            raise _corrupt(path, err) from err

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
    * When a fit stops on an exception, Ctrl+C or SIGTERM after at least one optimizer step, the current state is
      saved to ``<folder of the first ModelCheckpoint>/<filename>.ckpt`` (``last.ckpt`` and ``best.ckpt`` stay as
      they were); resume with ``--ckpt_path`` on that file. Weights that are not finite are not saved. Under DDP
      only SIGTERM saves (Lightning stops every rank at the same step; saving needs all of them).
    * Every checkpoint records how many batches of the current epoch are done, so a
      :class:`~dz_lightning.sampling.ResumableDataLoader` continues with the batch after them, also when the
      checkpoint was saved while a batch was in flight.

    Args:
        filename: name (without ``.ckpt``) of the checkpoint saved on an interrupt.
        save_on_interrupt: save that checkpoint (``False`` only checks folders and positions).
    """

    def __init__(self, filename: str = "interrupted", save_on_interrupt: bool = True) -> None:
        if not isinstance(filename, str) or not filename or "/" in filename or os.sep in filename:
            raise ValueError(f"Expected argument `filename` to be a plain file name, but got {filename!r}.")
        self.filename = filename
        self.save_on_interrupt = save_on_interrupt
        self.saved_path: str | None = None
        self._stepped = False  # a training batch ran in this process (nothing to save before that)
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
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._stepped = True

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not self.save_on_interrupt or not self._stepped or trainer.global_step == 0:
            return
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            # saving is collective (a barrier); only SIGTERM is known to stop every rank at the same step
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
        rank_zero_info(f"{type(exception).__name__} at step {trainer.global_step}: saved {path} "
                       f"(resume with --ckpt_path {path}).")

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
