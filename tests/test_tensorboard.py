"""What a user sees in TensorBoard after a digits ZO-GraSP run, read back from the event files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from dz_lightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]


def _events(folder: Path) -> EventAccumulator:
    (run,) = {p.parent for p in folder.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def zo_grasp_run(tmp_path_factory) -> tuple[EventAccumulator, object]:
    tmp = tmp_path_factory.mktemp("tb")
    cwd = os.getcwd()
    os.chdir(tmp)  # the config's relative paths (lightning_logs/, checkpoints/) land here
    try:
        cli = build_cli(["fit", "-c", str(ROOT / "configs/classification/digits_zo_grasp90.yaml"),
                         "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4",
                         "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false",
                         "--trainer.enable_model_summary", "false"])
    finally:
        os.chdir(cwd)
    return _events(tmp / "lightning_logs"), cli, tmp


def test_hparams_with_final_metrics(zo_grasp_run):
    acc, cli, _ = zo_grasp_run
    content = acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["estimator"].string_value == "cge"
    assert start.hparams["zo_grasp/sparsity"].number_value == pytest.approx(0.9)
    assert start.hparams["zo_grasp/method"].string_value == "zo_grasp"
    assert start.hparams["lr"].number_value == pytest.approx(0.3)
    assert start.hparams["optimizer"].string_value == "SGD"
    # no experiment summary: TensorBoard takes the HPARAMS columns from the run's scalars, with their last values
    assert "_hparams_/experiment" not in content
    assert {"val/acc", "train/loss_epoch", "train/queries_total"} <= set(acc.Tags()["scalars"])
    final = acc.Scalars("train/queries_total")[-1].value
    assert final == pytest.approx(cli.model.queries_total)
    # the final metrics are not logged a second time: one val/acc per epoch, nothing after the last step
    assert [s.step for s in acc.Scalars("val/acc")] == [3, 7]
    last = cli.trainer.global_step - 1
    assert all(s.step <= last for tag in set(acc.Tags()["scalars"]) - {"train/loss_vs_queries"}
               for s in acc.Scalars(tag))


def test_loss_against_queries_beside_loss_against_steps(zo_grasp_run):
    acc, cli, _ = zo_grasp_run
    tags = acc.Tags()["scalars"]
    assert {"train/loss_step", "train/loss_epoch", "train/loss_vs_queries", "train/queries_per_s"} <= set(tags)
    points = acc.Scalars("train/loss_vs_queries")
    steps = [p.step for p in points]
    assert len(points) == 4 and steps == sorted(steps)  # every 2nd of 8 steps, at the cumulative query count
    assert steps[-1] == cli.model.queries_total
    by_step = {p.step: p.value for p in acc.Scalars("train/loss_step")}
    assert points[-1].value == pytest.approx(by_step[cli.trainer.global_step - 1])


def test_lpr_chart_logged_once(zo_grasp_run):
    acc, _, _ = zo_grasp_run
    assert "zo_grasp/lpr" in acc.Tags()["images"]
    (image,) = acc.Images("zo_grasp/lpr")
    assert image.width > 200 and image.height > 150
    assert "zo_grasp/density" in acc.Tags()["scalars"]


def test_a_test_run_adds_its_metrics_and_hparams_to_the_training_run(zo_grasp_run):
    _, fit_cli, tmp = zo_grasp_run
    # the configs keep best.ckpt and, in a second ModelCheckpoint, last.ckpt (the end of training)
    (last,) = [c for c in fit_cli.trainer.checkpoint_callbacks if c.filename == "last"]
    checkpoint = last.best_model_path
    assert checkpoint.endswith("last.ckpt")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        cli = build_cli(["test", "-c", str(ROOT / "configs/classification/digits_zo_grasp90.yaml"),
                         "--ckpt_path", checkpoint, "--trainer.enable_progress_bar", "false"])
    finally:
        os.chdir(cwd)
    run = tmp / cli.trainer.logger.log_dir
    assert run.resolve() == (tmp / fit_cli.trainer.logger.log_dir).resolve()  # the training run's folder
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert "_hparams_/experiment" not in acc.PluginTagToContent("hparams")  # columns come from the scalars ...
    assert {"test/acc", "test/loss", "val/acc"} <= set(acc.Tags()["scalars"])  # ... now train, val and test
    assert acc.Scalars("test/acc")[-1].value == pytest.approx(cli.trainer.callback_metrics["test/acc"].item())
    # the test run's own session names the optimizer and its learning rate too
    newest = max(run.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    own = EventAccumulator(str(newest), size_guidance={"tensors": 0})
    own.Reload()
    content = own.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optimizer"].string_value == "SGD" and start.hparams["lr"].number_value == pytest.approx(0.3)
