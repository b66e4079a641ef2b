"""Figures of the SOL task: vorticity panels and the MAE against the reference over rollout time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dz_lightning.figures import new_figure, wrap_title

__all__ = ["mae_over_time_figure", "rollout_mae_curve", "vorticity", "vorticity_figure"]


def vorticity(u: Tensor) -> Tensor:
    """``dv/dx - du/dy`` of a centred velocity ``(2, X, Y)`` by central differences: ``(X - 2, Y - 2)``."""
    return (u[1, 2:, 1:-1] - u[1, :-2, 1:-1]) / 2 - (u[0, 1:-1, 2:] - u[0, 1:-1, :-2]) / 2


def rollout_mae_curve(pred: Tensor, traj: Tensor) -> Tensor:
    """``(T,)``: the MAE of rollouts ``pred`` ``(N, T, 2, X, Y)`` against ``traj[:, 1:]`` at every step."""
    return (pred - traj[:, 1:]).abs().mean(dim=(0, 2, 3, 4)).detach().cpu()


def vorticity_figure(states: list[Tensor], titles: list[str], re: float | None = None, time: float | None = None,
                     limit: float | None = None) -> Any:
    """Side-by-side vorticity panels of velocity states ``(2, X, Y)``, one colour scale and a colorbar.

    Args:
        states: velocities to draw, e.g. reference, uncorrected source, corrected.
        titles: one title per panel.
        re: the simulation's Reynolds number (in the title).
        time: simulated time since the start of the rollout (in the title).
        limit: the colour scale runs from ``-limit`` to ``limit``; ``None``: the 99th percentile of ``|vorticity|``
            of the first state (the reference), so that its vortices are not clipped.
    """
    fields = [vorticity(u.detach().cpu().float()).T for u in states]
    if limit is None:
        limit = max(float(torch.quantile(fields[0].abs().flatten(), 0.99)), 1e-6)
    fig = new_figure(1.9 * len(states) + 1.0, 4.2)
    axes = fig.subplots(1, len(states))
    axes = axes if len(states) > 1 else [axes]
    for ax, field, title in zip(axes, fields, titles, strict=True):
        shown = ax.imshow(field.numpy(), origin="lower", cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel("inflow at the bottom, flow upwards", fontsize=8)
    label = ", ".join(part for part in (f"Re = {re:g}" if re is not None else "",
                                        f"t = {time:g} into the rollout" if time is not None else "") if part)
    fig.suptitle(f"vorticity{': ' + label if label else ''}", fontsize=10)
    fig.colorbar(shown, ax=list(axes), fraction=0.04, pad=0.03, label="vorticity")
    return fig


def mae_over_time_figure(curves: Mapping[str, Tensor], dt: float = 1.0, title: str = "") -> Any:
    """MAE against the reference over rollout time, one line per method (``{label: (T,) tensor}``)."""
    fig = new_figure(5.0, 3.4)
    ax = fig.add_subplot()
    for label, curve in curves.items():
        ax.plot([dt * (i + 1) for i in range(len(curve))], curve.tolist(), label=label)
    ax.set_xlabel("rollout time (solver steps x dt)")
    ax.set_ylabel("MAE vs reference")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(wrap_title(title, fig.get_figwidth(), 9), fontsize=9)
    fig.tight_layout()
    return fig
