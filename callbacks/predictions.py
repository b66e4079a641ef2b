"""PredictionWriter: ``trainer.predict`` outputs saved to one file (what ``dz predict`` writes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Save every prediction of a ``predict`` run to a ``torch.save`` file.

    The file holds a dict ``{"predictions": [...], "batch_indices": [...], "split": ...}``: ``predictions`` has one
    entry per predict dataloader, each a list of the ``predict_step`` outputs of its batches, in order (a
    classifier's: class indices of shape ``(B,)``); ``batch_indices`` likewise one entry per dataloader, the
    dataset indices of each batch (empty where Lightning cannot see them); ``split`` names the data that was
    predicted (the data module's ``predict_split``, e.g. ``"test"``, or ``None`` when it has none). Under DDP each
    rank writes its own file, ``<stem>.rank<R><suffix>``.

    Args:
        output_path: the file; ``None`` writes ``predictions.pt`` in the run's log folder (``trainer.log_dir``).
    """

    def __init__(self, output_path: str | Path | None = None) -> None:
        super().__init__(write_interval="epoch")
        if output_path is not None and not isinstance(output_path, (str, Path)):
            raise TypeError(f"Expected argument `output_path` to be a path or None, but got {output_path!r}.")
        self.output_path = None if output_path is None else Path(output_path)
        self.written: Path | None = None

    def _path(self, trainer: L.Trainer) -> Path:
        path = self.output_path or Path(trainer.log_dir or trainer.default_root_dir) / "predictions.pt"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    @override
    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        # one dataloader gives a flat list of batch outputs; keep one list per dataloader in the file
        # (decided from the number of dataloaders: a predict_step may itself return a list)
        nested = len(trainer.num_predict_batches) > 1
        split = getattr(trainer.datamodule, "predict_split", None)
        torch.save({"predictions": list(predictions) if nested else [list(predictions)],
                    "batch_indices": list(batch_indices),
                    "split": split if isinstance(split, str) else None}, path)
        self.written = path
        rank_zero_info(f"Predictions written to {path}")
