"""Host reads (device-to-host syncs on a GPU) per steady-state call and per training step, counted on the CPU.

A dispatch mode counts the ops that read a tensor's value on the host (``_local_scalar_dense`` behind ``.item()``,
``float()``, ``bool()``; ``nonzero``; ``is_nonzero``; ``equal``; ``allclose``) and a function mode counts
``.tolist()`` (one copy, whatever its length). The budgets and the reads they allow:

* ``cge`` (masks drawn before): 2, the step-resolution check before any query and the end-of-call read of the base
  loss and the non-finite counts;
* ``rge``: 1, the end-of-call read (base loss, non-finite counts, unmoved directions);
* a ``ZOModule`` CGE training step: 3, the two of ``cge`` and the check that the optimizer step left everything
  finite.
"""

from __future__ import annotations

import collections
import traceback

import torch
import torch.nn.functional as F
from dz_lightning.tasks.classification import ZOClassifier
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import dz_lightning as dz
from dz_lightning.models import simple_cnn

_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "allclose"}


def _where() -> str:
    frames = [f for f in traceback.extract_stack() if "/dz_lightning/" in f.filename.replace("\\", "/")
              and "/tests/" not in f.filename.replace("\\", "/")]
    return f"{frames[-1].filename.rsplit('dz_lightning/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"


class _ToList(TorchFunctionMode):
    def __init__(self, reads: collections.Counter) -> None:
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        if getattr(func, "__name__", "") == "tolist":
            self.reads[("tolist", _where())] += 1
        return func(*args, **(kwargs or {}))


class HostReads(TorchDispatchMode):
    """Counts host reads by ``(op, library file:line)``."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter[tuple[str, str]] = collections.Counter()
        self._tolist = _ToList(self.reads)

    def __enter__(self) -> HostReads:
        self._tolist.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._tolist.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        if func._overloadpacket.__name__ in _READS:
            self.reads[(func._overloadpacket.__name__, _where())] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.reads.values())


def _setup():
    torch.manual_seed(0)
    model = simple_cnn(depth=2, channels=4).train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    params = dict(model.named_parameters())
    masks = {n: torch.rand(p.shape) < 0.2 for n, p in params.items() if p.dim() > 1}
    return model, x, y, params, masks


def test_steady_state_cge_and_rge_calls_read_the_host_at_most_twice_and_once():
    model, x, y, params, masks = _setup()
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y)
    dz.cge(oracle, params, masks=masks)  # the masks' coordinates and the engine: once
    with HostReads() as cge_reads:
        dz.cge(oracle, params, masks=masks)
    assert cge_reads.total <= 2, dict(cge_reads.reads)
    with HostReads() as rge_reads:
        dz.rge(oracle, params, q=4)
    assert rge_reads.total <= 1, dict(rge_reads.reads)


class _Counted(ZOClassifier):
    """Counts the host reads of every training step after the first."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_reads: list[HostReads] = []

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            return super().training_step(batch, batch_idx)
        with HostReads() as reads:
            out = super().training_step(batch, batch_idx)
        self.step_reads.append(reads)
        return out


def test_a_cge_training_step_reads_the_host_at_most_three_times(tiny_trainer):
    model, _, _, _, masks = _setup()
    module = _Counted(model, estimator="cge", train_accuracy=False)
    module.zo_masks = masks
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 16, 16), torch.randint(0, 10, (12,)))
    tiny_trainer(max_steps=3).fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert len(module.step_reads) == 2
    for reads in module.step_reads:
        assert reads.total <= 3, dict(reads.reads)
