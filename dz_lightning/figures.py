"""Figures for loggers and files: matplotlib ``Figure`` objects on their own Agg canvas, one way to log them.

No global backend switch (``matplotlib.use``) and no pyplot state: a figure made here belongs to its caller, works in
a headless job, and leaves an interactive session's backend alone. Task-specific pictures (vorticity panels, the
certified-accuracy curve) are drawn by their tasks with :func:`new_figure` and logged with :func:`log_figure`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["figure_to_image", "log_figure", "lpr_figure", "new_figure", "save_figure", "wrap_title"]


def new_figure(width: float = 5.0, height: float = 3.5, dpi: int = 100) -> Any:
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches with an Agg canvas attached (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_to_image(fig: Any) -> Any:
    """The figure rendered as a ``uint8`` RGB array ``(H, W, 3)``."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write the figure to ``path`` (format from the suffix), creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def log_figure(loggers: Iterable[Any], tag: str, fig: Any, step: int) -> int:
    """Send a figure to every logger that takes images; returns how many did.

    TensorBoard (``experiment.add_figure``) gets the figure itself; loggers with ``log_image(key, images, step)``
    (Weights & Biases, Neptune-style) get the rendered RGB array. Others are skipped.

    Args:
        loggers: e.g. ``trainer.loggers``.
        tag: image tag, e.g. ``"zo_grasp/lpr"``.
        fig: a matplotlib ``Figure`` (for example from :func:`new_figure`).
        step: global step to log at.
    """
    logged = 0
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(tag, fig, global_step=step, close=False)
            logged += 1
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=tag, images=[figure_to_image(fig)], step=step)
            logged += 1
    return logged


def lpr_figure(ratios: Mapping[str, float] | Mapping[str, Mapping[str, float]],
               title: str = "layer-wise pruning ratios") -> Any:
    """A bar chart of layer-wise pruning ratios (one bar per masked weight, in the model's order).

    Args:
        ratios: parameter name -> fraction of its coordinates NOT estimated, in [0, 1]; or label -> such a dict,
            for grouped bars (e.g. ZO-GraSP beside FO-GraSP; the first dict's names and order are used).
        title: figure title.
    """
    first = next(iter(ratios.values()), None)
    series = dict(ratios) if isinstance(first, Mapping) else {"": ratios}
    names = list(next(iter(series.values())))
    fig = new_figure(max(4.0, 0.35 * len(names) + 1.5), 3.4)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(names))], [100 * values[n] for n in names], width,
               label=label or None)
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 4 else 0, fontsize=7)
    ax.set_ylabel("pruned coordinates (%)")
    ax.set_ylim(0, 100 if len(series) == 1 else 118)  # headroom for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper center", ncol=len(series), frameon=False)
    ax.set_title(wrap_title(title, fig.get_figwidth(), 9), fontsize=9)
    fig.tight_layout()
    return fig


def wrap_title(title: str, width_inches: float, fontsize: float) -> str:
    """``title`` broken into lines that fit ``width_inches`` at ``fontsize`` (a long title is never clipped)."""
    # an average character of matplotlib's default font is about 0.55 of the font size wide (1 pt = 1/72 inch)
    per_line = max(20, int(0.9 * width_inches * 72 / (0.55 * fontsize)))
    return textwrap.fill(title, per_line)
