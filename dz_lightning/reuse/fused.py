"""Compiled differences: the formulas of :mod:`dz_lightning.reuse.differences` through ``torch.compile``, opt-in.

In eager mode a train-mode BatchNorm difference is about twenty dispatched ops and seven passes over the change,
most of them on tensors of one value per query and channel. Inductor fuses the formula into its reductions and one
output pass (C++ loops on CPU, Triton kernels on CUDA): 3.4x faster than eager on CPU, one thread, for a resnet20
chunk of 8 queries at batch 64. A whole CGE step gains less, because convolutions dominate it: resnet20 5% at
2 threads on a quiet machine (215 against 227 s per projected step), about 20% of the CPU time at one thread on a
loaded one; simple_cnn nothing. So compiling is off unless ``DZ_COMPILE_DIFFERENCES=1`` is set: it costs a few
seconds per process, and the test suite runs the eager formulas everywhere (``tests/dz_lightning/test_fused.py``
checks the compiled ones against them).

The compiled function is used where it can be:

- plain tensors (fake, functional and other tensor subclasses run the eager formula: the fake-CUDA harness proves
  the eager path, which is the compiled one's reference);
- no ``torch.compile`` around the caller already (its own compile sees the eager formula);
- ``DZ_COMPILE_DIFFERENCES`` set to ``1``.

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


def compiling_enabled() -> bool:
    """Whether differences may be compiled: ``DZ_COMPILE_DIFFERENCES`` is ``1``/``true``/``on``/``yes``."""
    return os.environ.get(ENV, "0").strip().lower() in ("1", "true", "on", "yes")


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
        if name in _FAILED or not compiling_enabled() or torch.compiler.is_compiling() or not _plain(args):
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
                          f"slower but with the same values. Unset {ENV} to skip compiling.", RuntimeWarning,
                          stacklevel=2)
            return fn(*args)

    return call  # type: ignore[return-value]
