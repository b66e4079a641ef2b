""":class:`~dz_lightning.ZOModule`'s own checkpoint state, the renaming of older layouts, the checks on resume, and
the query budget (``max_queries``).

The state is what a resumed run needs to continue exactly: the direction generator, the queries spent, the density of
the gradient masks (a resume without them would estimate every coordinate) and the DDP cost table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from dz_lightning.distributed import CostTable

if TYPE_CHECKING:
    from dz_lightning.module import ZOModule

__all__ = ["RestoredState", "check_resume", "checkpoint_state", "mask_density", "remap_legacy_keys", "restore_state",
           "stop_when_spent"]


class RestoredState(NamedTuple):
    """What a checkpoint's ``"dz_lightning"`` entry gives back besides the generator state."""

    queries_total: int
    mask_density: float | None
    cost_table: CostTable | None


def checkpoint_state(generator: torch.Generator, queries_total: int, masks: Mapping[str, Tensor] | None,
                     cost_table: CostTable | None) -> dict[str, Any]:
    """The checkpoint's ``"dz_lightning"`` entry."""
    return {"generator_state": generator.get_state(),
            "queries_total": queries_total,
            "mask_density": mask_density(masks),
            "cost_table": None if cost_table is None else cost_table.state_dict()}


def restore_state(checkpoint: Mapping[str, Any], generator: torch.Generator) -> RestoredState | None:
    """Set ``generator`` to the checkpoint's state and return the rest; ``None`` (with a warning) when it has none."""
    state = checkpoint.get("dz_lightning")
    if state is None:
        rank_zero_warn("The checkpoint has no dz_lightning state; the direction generator restarts from its seed.")
        return None
    generator.set_state(state["generator_state"])
    # every rank loads the same file, so the resumed split is the same on all of them
    table = state.get("cost_table")
    return RestoredState(int(state["queries_total"]), state.get("mask_density"),
                         None if table is None else CostTable.from_state_dict(table))


def remap_legacy_keys(state: Mapping[str, Any], aliases: tuple[str, ...]) -> Mapping[str, Any]:
    """A state dict of an older layout, which stored the network twice, in the current one (else ``state``).

    Keys under an alias (``"denoiser."``) are the whole network: they replace the keys under ``"model."`` (the
    second copy, or a part of the network), renamed to ``"model."``.
    """
    for alias in aliases:
        prefix = alias + "."
        if any(k.startswith(prefix) for k in state):
            state = {("model." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()
                     if not k.startswith("model.")}
    return state


def check_resume(module: ZOModule, density: float | None) -> None:
    """On resuming ``module`` from a checkpoint whose masks had ``density``: fail when no masks were set again (the
    callbacks' ``on_train_start`` hands them over first), and stop when ``max_queries`` is already spent.

    Nothing to check without ``trainer.ckpt_path`` (``load_from_checkpoint`` + ``fit`` is new training from weights).
    """
    ckpt_path = module.trainer.ckpt_path
    if ckpt_path is None:
        return
    if density is not None and module.zo_masks is None:
        raise ValueError(
            f"The checkpoint {ckpt_path} was trained with gradient masks (density {density:.3g}: "
            "set by a callback such as ZOGraSP), but nothing set `zo_masks` in this run, which would estimate "
            f"every coordinate (about {1 / max(density, 1e-12):.3g}x the queries per step of the masked weights). "
            "Resume with the same callback (e.g. the same config, or `--trainer.callbacks+=ZOGraSP` with its "
            "settings), or start a new run from the weights to train densely."
        )
    if module.max_queries is not None and module.queries_total >= module.max_queries:
        rank_zero_warn(f"max_queries={module.max_queries} is already spent ({module.queries_total} queries at "
                       f"{ckpt_path}): not training. Raise max_queries to continue this run.")
        module.trainer.should_stop = True


def stop_when_spent(module: ZOModule, last_step_queries: int) -> None:
    """Stop training once ``module.queries_total`` reaches ``module.max_queries`` (said once, on rank 0)."""
    if module.max_queries is not None and module.queries_total >= module.max_queries:
        if not module.trainer.should_stop:
            rank_zero_info(f"max_queries={module.max_queries} reached ({module.queries_total} queries spent, the "
                           f"last step {last_step_queries}): stopping after step {module.trainer.global_step}.")
        module.trainer.should_stop = True


def mask_density(masks: Mapping[str, Tensor] | None) -> float | None:
    """Fraction of the masked tensors' coordinates the masks keep (``None``: no masks). Once per checkpoint."""
    if masks is None:
        return None
    total = sum(m.numel() for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values()) / max(total, 1))
