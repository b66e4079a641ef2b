"""Compiled differences: the formulas of :mod:`dz_lightning.reuse.differences` through ``torch.compile``.

In eager mode a train-mode BatchNorm difference is about twenty dispatched ops and seven passes over the change,
most of them on tensors of one value per query and channel. Inductor fuses the formula into its reductions and one
output pass (C++ loops on CPU, Triton kernels on CUDA): 3.4x faster than eager on CPU, one thread, for a resnet20
chunk of 8 queries at batch 64. A whole CGE step gains less, because convolutions dominate it. Quiet, 2 threads:
a resnet20 step at the default ``delta_dtype`` 16% faster with AVX512-BF16 (154 against 184 s per projected step)
and 8% with the AVX2 kernels (253 against 275 s); simple_cnn the same.

``DZ_COMPILE_DIFFERENCES`` decides: unset (or ``cpu``), compiled for CPU tensors only; ``1``, on every device
(CUDA through Triton: not yet run on a GPU by this project, so opt-in there); ``0``, never.

The compiled function is used where it can be:

- plain tensors (fake, functional and other tensor subclasses run the eager formula: the fake-CUDA harness proves
  the eager path, which is the compiled one's reference);
- no ``torch.compile`` around the caller already (its own compile sees the eager formula);
- ``DZ_COMPILE_DIFFERENCES`` allows it for the tensors' device.

Each process compiles afresh, a few seconds per function and input layout: inductor's FX graph cache is not used,
because across processes on different CPU kernels it corrupted the heap in torch 2.14. Where compiling fails (no
C++ compiler, no Triton, a platform that inductor does not support) the eager formula runs from then on, after one
warning that says why. The two agree to rounding: the formula is the same, only the order of its sums differs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["ENV", "compile_failures", "compiled", "compiling_enabled"]

ENV = "DZ_COMPILE_DIFFERENCES"
_F = TypeVar("_F", bound=Callable[..., Tensor])
_FAILED: dict[str, str] = {}  # function name -> why compiling it failed (then it runs eagerly)


def compiling_enabled(device: torch.device | str = "cpu") -> bool:
    """Whether differences on ``device`` may be compiled (``DZ_COMPILE_DIFFERENCES``: unset or ``cpu``, on CPU only;
    ``1``, everywhere; ``0``, nowhere)."""
    value = os.environ.get(ENV, "cpu").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    return value in ("1", "true", "on", "yes") or torch.device(device).type == "cpu"


def compile_failures() -> dict[str, str]:
    """The functions that failed to compile in this process (they run eagerly), each with why."""
    return dict(_FAILED)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _plain(args: tuple[Any, ...]) -> bool:
    return all(type(a) is torch.Tensor for a in args if isinstance(a, Tensor))


def compiled(fn: _F) -> _F:
    """``fn`` compiled with ``torch.compile(dynamic=True)`` where that works (see the module), else ``fn``."""
    name = f"{fn.__module__}.{fn.__qualname__}"
    holder: list[Callable[..., Tensor]] = []

    @functools.wraps(fn)
    def call(*args: Any) -> Tensor:
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if name in _FAILED or first is None or not compiling_enabled(first.device) or not _plain(args) \
                or torch.compiler.is_compiling():
            return fn(*args)
        if not holder:
            with _quiet("torch.utils.cpp_extension"):  # its import says where it looked for CUDA: noise on a CPU
                importlib.import_module("torch.utils.cpp_extension")
            # not through the FX graph cache: torch 2.14 gave an AVX512 process the graph that another process had
            # compiled under ATEN_CPU_CAPABILITY=avx2, and the heap broke (tests/dz_lightning/test_fused.py)
            holder.append(torch.compile(fn, dynamic=True, options={"fx_graph_cache": False}))
        try:
            return holder[0](*args)
        except Exception as err:  # noqa: BLE001 - any failure of the compiler stack: the eager formula instead
            _FAILED[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            warnings.warn(f"dz_lightning could not compile {fn.__qualname__} ({_FAILED[name]}); it runs eagerly, "
                          f"slower but with the same values. Set {ENV}=0 to skip compiling.", RuntimeWarning,
                          stacklevel=2)
            return fn(*args)

    return call  # type: ignore[return-value]
