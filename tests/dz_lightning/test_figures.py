"""Figures: own Agg canvas (no pyplot, no backend switch), one way to log them to any logger."""

from __future__ import annotations

import matplotlib
import numpy as np
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dz_lightning.figures import figure_to_image, log_figure, lpr_figure, new_figure, save_figure


def test_figures_leave_pyplot_and_the_backend_alone(tmp_path):
    backend = matplotlib.get_backend()
    fig = lpr_figure({"0.weight": 0.5, "2.weight": 0.95}, "LPRs")
    image = figure_to_image(fig)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 100
    assert image.min() < 100 < image.max()  # something is drawn on the white background
    assert save_figure(fig, tmp_path / "sub" / "lpr.png").stat().st_size > 1000
    assert matplotlib.get_backend() == backend
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # no figure registered with pyplot: nothing to close, nothing leaks


def test_grouped_lprs_draw_one_bar_per_layer_and_series():
    fig = lpr_figure({"ZO-GraSP": {"a": 0.2, "b": 0.9}, "FO-GraSP": {"a": 0.3, "b": 0.8}})
    (ax,) = fig.axes
    assert len(ax.patches) == 4 and [t.get_text() for t in ax.get_legend().get_texts()] == ["ZO-GraSP", "FO-GraSP"]


class _ImageLogger:
    """A logger with ``log_image`` (the Weights & Biases / Neptune style)."""

    def __init__(self) -> None:
        self.images = []

    def log_image(self, key, images, step):
        self.images.append((key, images[0].shape, step))


def test_log_figure_reaches_tensorboard_and_image_loggers_and_skips_others(tmp_path):
    tb = TensorBoardLogger(str(tmp_path), name="tb")
    other = _ImageLogger()
    fig = new_figure(3, 2)
    fig.add_subplot().plot([0, 1], [1, 0])
    assert log_figure([tb, other, CSVLogger(str(tmp_path))], "x/curve", fig, step=7) == 2
    tb.experiment.flush()
    events = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("x/curve")
    assert image.step == 7 and image.width == 300 and image.height == 200
    assert other.images == [("x/curve", (200, 300, 3), 7)]


def test_a_long_title_is_wrapped_inside_a_narrow_figure():
    # the ZOGraSP callback's chart of a two-layer MLP: the narrowest figure, its longest title
    fig = lpr_figure({"1.weight": 0.85, "3.weight": 0.9},
                     "zo_grasp layer-wise pruning ratios, sparsity 0.9 (density 0.100)")
    fig.canvas.draw()
    (ax,) = fig.axes
    box = ax.title.get_window_extent()
    assert "\n" in ax.get_title() and box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
