"""The fake-CUDA harness: calls run on ``FakeTensorMode`` CUDA tensors, host reads answered with 0 and counted.

Shared by ``tests/dz_lightning/test_fake_cuda.py`` (the engine's calls) and ``tests/tasks/test_fake_cuda_tasks.py``
(the task oracles); see the former's docstring for what the harness checks and answers.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

_READS = ("_local_scalar_dense", "is_nonzero", "nonzero", "equal", "allclose")


_ROOT = Path(__file__).resolve().parents[1].as_posix() + "/"
_TASKS = (_ROOT + "tasks/", _ROOT + "callbacks/")  # installed (editable) as dz_lightning.tasks and .callbacks


def _library_frame() -> str:
    """``file:line`` of the innermost frame in the library (``dz_lightning``, its tasks and callbacks: not in torch,
    not in the tests)."""
    where = None
    for frame in traceback.extract_stack():
        path = frame.filename.replace("\\", "/")
        if path.startswith(_TASKS):
            where = f"{path[len(_ROOT):]}:{frame.lineno}"
        elif "/dz_lightning/" in path and "/tests/" not in path:
            where = f"{path.rsplit('dz_lightning/', 1)[-1]}:{frame.lineno}"
    return where or "?"


class _AnswerHostReads(TorchDispatchMode):
    """Answers every host read of a fake tensor with 0 and records ``(op, file:line)`` of the library's frame.

    ``.tolist()`` (one device-to-host copy, however many entries) is answered whole and counted once (fake tensors
    implement it in Python as one read per entry: :meth:`answer_tolist` replaces that); any other read counts once
    per call of the op."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter[tuple[str, str]] = collections.Counter()

    def answer_tolist(self, tensor: Tensor) -> object:
        self.reads[("tolist", _library_frame())] += 1
        nested: object = False if tensor.dtype == torch.bool else 0
        for size in reversed(tensor.shape):
            nested = [nested] * size
        return nested

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        name = func._overloadpacket.__name__
        if name in _READS:
            where = _library_frame()
            self.reads[(name, where)] += 1
            if name == "_local_scalar_dense":
                return False if args[0].dtype == torch.bool else 0
            raise AssertionError(f"a data-dependent host read {name} at {where} that has no healthy answer")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeTensorMode, _AnswerHostReads]]:
    # what the CUDA runtime would answer: 16 GiB free of 80 (the library's memory budget reads it once per device)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # the full-forward fallback times its strategies once per situation, waiting for the device around the trial
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    answers = _AnswerHostReads()
    monkeypatch.setattr(FakeTensor, "tolist", lambda tensor: answers.answer_tolist(tensor))
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        yield mode, answers
