"""The optimizer half of :class:`~dz_lightning.ZOModule`'s step: clip, step, undo a non-finite step, schedulers.

Plain functions of the module (its optimizers, schedulers and settings), called from its thin hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_warn

from dz_lightning.finite_step import NonFiniteStepError, StepUndo

if TYPE_CHECKING:
    from dz_lightning.module import ZOModule

__all__ = ["optimizer_step", "step_schedulers", "undo_nonfinite_step"]


def optimizer_step(module: ZOModule) -> None:
    """Clip, step every optimizer (undoing a step that leaves anything non-finite), step per-step schedulers."""
    opts = module.optimizers()
    opts = opts if isinstance(opts, list) else [opts]
    undo = StepUndo([getattr(opt, "optimizer", opt) for opt in opts])
    for opt in opts:
        if module.gradient_clip_val is not None:
            module.clip_gradients(opt, gradient_clip_val=module.gradient_clip_val, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
    undo_nonfinite_step(module, undo)
    if module.scheduler_interval == "step":
        step_schedulers(module)


def undo_nonfinite_step(module: ZOModule, undo: StepUndo) -> None:
    """Undo the step if it left anything non-finite; then raise or warn (``module.nonfinite_step``)."""
    bad = undo.nonfinite()
    if not bad:
        return
    undo.restore()
    module.steps_undone += 1
    names = {id(p): n for n, p in module.named_parameters()}
    where = ", ".join(names.get(id(t), "optimizer state") for t in bad[:5])
    message = (f"Optimizer step {module.global_step} made {len(bad)} tensor(s) non-finite "
               f"({where}{', ...' if len(bad) > 5 else ''}) although the estimated gradient was finite (huge "
               "losses, a large learning rate or overflowing momentum). The step was undone: parameters and "
               "optimizer state are back at their values before it.")
    if module.nonfinite_step == "raise":
        raise NonFiniteStepError(f"{message} Lower the learning rate, set `gradient_clip_val`, or pass "
                                 "nonfinite_step='skip' to skip such steps with a warning.")
    rank_zero_warn(f"{message} Skipping it (nonfinite_step='skip'); {module.steps_undone} step(s) skipped so far.",
                   category=RuntimeWarning)


def step_schedulers(module: ZOModule) -> None:
    """Step every learning-rate scheduler of ``module`` once."""
    scheds = module.lr_schedulers()
    if scheds is None:
        return
    for sch in scheds if isinstance(scheds, list) else [scheds]:
        sch.step()
