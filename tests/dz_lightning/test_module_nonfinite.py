"""ZOModule never lets a non-finite value reach the weights, the optimizer state or a checkpoint."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dz_lightning as dz


class _HugeLosses(dz.ZOModule):
    """A black box answering 0 at the base point and 1e36 (finite) at every perturbed point of a step.

    Forward differences are then 1e36 / mu = 2e38 (finite in float32) for every coordinate: finite estimates whose
    step overflows the momentum buffer (0.9 * 2e38 + 2e38) or, with a large learning rate, the weights.
    """

    def make_oracle(self, batch):
        calls = []

        def fn(params):
            calls.append(1)
            return 0.0 if len(calls) == 1 else 1e36

        return dz.FunctionOracle(fn)


def _fit(tmp_path, lr: float, momentum: float, steps: int = 4, **kwargs) -> tuple[_HugeLosses, L.Trainer]:
    torch.manual_seed(0)
    module = _HugeLosses(nn.Linear(3, 2), optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum), **kwargs)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)])
    trainer.fit(module, DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=1))
    return module, trainer


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize(("lr", "momentum", "bad_step"), [(1e-36, 0.9, 2), (10.0, 0.0, 1)])
def test_step_that_overflows_is_undone_and_the_last_checkpoint_stays_good(tmp_path, lr, momentum, bad_step):
    with pytest.raises(dz.NonFiniteStepError, match=rf"Optimizer step {bad_step} made .*non-finite.*undone"):
        _fit(tmp_path, lr, momentum)
    last = tmp_path / "ckpt" / "last.ckpt"
    if bad_step == 1:
        assert not last.exists()  # nothing was saved, in particular no inf weights
        return
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == bad_step - 1
    assert _all_finite(state["state_dict"].values())
    assert _all_finite(s["momentum_buffer"] for s in state["optimizer_states"][0]["state"].values())


class _Snapshots(L.Callback):
    """Weights and momentum buffers after every training batch."""

    def __init__(self) -> None:
        self.taken: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = trainer.optimizers[0].state.values()
        self.taken.append([p.detach().clone() for p in pl_module.parameters()]
                          + [s["momentum_buffer"].clone() for s in state])


def test_skip_undoes_every_overflowing_step_exactly(tmp_path):
    torch.manual_seed(0)
    module = _HugeLosses(nn.Linear(3, 2), optimizer=lambda p: torch.optim.SGD(p, lr=1e-36, momentum=0.9),
                         nonfinite_step="skip")
    snapshots = _Snapshots()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        callbacks=[snapshots])
    with pytest.warns(RuntimeWarning, match=r"undone.*Skipping it \(nonfinite_step='skip'\)"):
        trainer.fit(module, DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=1))
    # step 1 fills the momentum buffer (2e38); every later step overflows it and is undone exactly
    assert module.steps_undone == 2
    first, *later = snapshots.taken
    assert _all_finite(first) and len(later) == 2
    assert all(torch.equal(a, b) for snap in later for a, b in zip(first, snap, strict=True))


def test_nonfinite_step_option_is_checked():
    with pytest.raises(ValueError, match="`nonfinite_step`.*'ignore'"):
        _HugeLosses(nn.Linear(3, 2), nonfinite_step="ignore")


def test_step_undo_restores_adam_state_and_step_count_exactly():
    from dz_lightning.finite_step import StepUndo

    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    before = ([p.detach().clone() for p in model.parameters()],
              [{k: v.clone() for k, v in s.items()} for s in opt.state.values()])
    undo = StepUndo([opt])
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e38)  # its square overflows Adam's second moment
    opt.step()
    assert undo.nonfinite()  # the second moments are inf
    undo.restore()
    assert not undo.nonfinite()
    assert all(torch.equal(a, p) for a, p in zip(before[0], model.parameters(), strict=True))
    for saved, state in zip(before[1], opt.state.values(), strict=True):
        assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
