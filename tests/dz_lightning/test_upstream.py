"""The private APIs of torch and Lightning that the project relies on: each test fails when the other project
changes what the project uses (dz_lightning/upstream.py lists them)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from dz_lightning import query
from dz_lightning.upstream import tensor_version


def test_tensor_version_counts_in_place_writes():
    t = torch.zeros(4)
    start = tensor_version(t)
    _ = t + 1  # out of place: no write
    assert tensor_version(t) == start
    t.add_(1)
    t[1:3].mul_(2)  # a write through a view counts for its base
    assert tensor_version(t) == start + 2


def test_lightning_state_key_of_a_callback():
    # dz_lightning.checkpointing.InterruptCheckpoint.state_key: the checkpoint's key of the callback's state
    assert L.Callback()._generate_state_key(filename="interrupted") == "Callback{'filename': 'interrupted'}"


def test_lightning_fit_loop_counts_processed_batches(tmp_path):
    # dz_lightning.checkpointing reads it to tell a finished batch from one in flight when a checkpoint is saved
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(BoringModel())
    assert trainer.fit_loop.epoch_loop.batch_progress.current.processed == 2


def test_lightning_cli_has_the_checkpoint_merge_the_dz_cli_overrides():
    # dz_lightning.cli overrides it (tests/dz_lightning/test_cli.py checks that Lightning still calls it)
    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None))


def test_batchnorms_name_every_batchnorm_class_of_torch():
    private_base = nn.modules.batchnorm._BatchNorm  # the test may name it: it checks the public list against it
    public = {cls for name in dir(nn) if isinstance(cls := getattr(nn, name), type) and issubclass(cls, private_base)}
    assert public == set(query.BATCHNORMS)
