"""The query context: how every loss query runs, whatever the engine that computes it.

* no autograd and no autocast;
* full fp32 arithmetic: TF32 off for cuDNN convolutions and for matmuls (CUDA and oneDNN), whatever the user's
  global settings, restored on exit (also after an exception); a model in fp16/bf16 is refused;
* BatchNorm running statistics left untouched;
* one memory-budget rule (:func:`memory_budget`), decided once per process and device.

Lower precision is allowed only on a perturbation's *difference* from a cached fp32 base (see
:class:`dz_lightning.reuse.engine.GraphEngine` ``delta_dtype``), where its error is relative to the difference.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "BATCHNORMS", "DELTA_DTYPES", "DELTA_DTYPE_CHOICES", "MASK_DROPOUTS", "check_delta_dtype",
    "common_random_numbers", "float64_loss", "fp32_precision", "frozen_batchnorm_stats", "has_random_dropout",
    "low_precision_deltas", "mask_of", "memory_budget", "native_bf16", "points_per_chunk", "query_mode",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_LOCK = threading.RLock()


class _Flags:
    """Process-wide precision flags with a depth count, so that nested and concurrent contexts restore them once."""

    depth = 0
    saved: dict[str, str] | tuple | None = None


# the operator-level switches of PyTorch's fp32 precision API (``fp32_precision``: "ieee", "tf32", "bf16",
# "none" = inherit); the legacy switches (``allow_tf32``, ``set_float32_matmul_precision``) are mapped onto them.
# Only these leaves are set: mixing levels makes PyTorch refuse to read the legacy flags.
_LEAVES = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def _leaf(path: str) -> object | None:
    obj: object = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj if obj is not None and hasattr(obj, "fp32_precision") else None


def _read_flags() -> dict[str, str]:
    return {path: _leaf(path).fp32_precision for path in _LEAVES if _leaf(path) is not None}


def _write_flags(flags: dict[str, str]) -> None:
    for path, value in flags.items():
        _leaf(path).fp32_precision = value


def _legacy_flags() -> tuple:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()


def _write_legacy_flags(flags: tuple) -> None:
    torch.set_float32_matmul_precision(flags[2])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[1], flags[0]


@contextlib.contextmanager
def fp32_precision() -> Iterator[None]:
    """Full fp32 convolutions and matmuls inside (no TF32 on cuDNN/cuBLAS, no bf16/TF32 in oneDNN); the previous
    settings come back on exit, also after an exception. Nested or concurrent uses restore them once, at the end."""
    with _LOCK:
        if _Flags.depth == 0:
            if _leaf("cuda.matmul") is not None:
                _Flags.saved = _read_flags()
                _write_flags(dict.fromkeys(_Flags.saved, "ieee"))
            else:  # PyTorch before the fp32_precision API
                _Flags.saved = _legacy_flags()
                _write_legacy_flags((False, False, "highest"))
        _Flags.depth += 1
    try:
        yield
    finally:
        with _LOCK:
            _Flags.depth -= 1
            if _Flags.depth == 0:
                (_write_flags if isinstance(_Flags.saved, dict) else _write_legacy_flags)(_Flags.saved)
                _Flags.saved = None


@contextlib.contextmanager
def low_precision_deltas(enabled: bool) -> Iterator[None]:
    """TF32 for cuDNN and cuBLAS inside (``enabled``): only for ops acting on a perturbation's difference."""
    if not enabled:
        yield
        return
    if _leaf("cuda.matmul") is None:
        saved = _legacy_flags()
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    else:
        saved = {path: _leaf(path).fp32_precision for path in ("cuda.matmul", "cudnn.conv")}
        _write_flags(dict.fromkeys(saved, "tf32"))
    try:
        yield
    finally:
        (_write_flags if isinstance(saved, dict) else _write_legacy_flags)(saved)


def check_query_dtypes(model: nn.Module) -> None:
    """Refuse a model with fp16/bf16 parameters or buffers: finite differences of a few 1e-3 drown in their
    rounding error.

    Raises:
        TypeError: naming the first offending tensor.
    """
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, value in named:
            if value.dtype in _LOW_PRECISION:
                raise TypeError(
                    f"Loss queries run in float32 or float64, but {type(model).__name__} has {kind} {name!r} in "
                    f"{value.dtype}: finite differences would drown in its rounding error. Query an fp32 copy "
                    "(`model.float()`); lower precision is only allowed on differences (StagedForward `delta_dtype`)."
                )


MASK_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
"""Dropouts that multiply their input by a random mask (alpha dropouts also shift it)."""
_DROPOUTS = (*MASK_DROPOUTS, nn.AlphaDropout, nn.FeatureAlphaDropout)


def has_random_dropout(model: nn.Module) -> bool:
    """Whether a dropout module of ``model`` draws masks (training mode, ``p > 0``)."""
    return any(isinstance(m, _DROPOUTS) and m.training and m.p > 0 for m in model.modules())


# F.dropout draws its mask differently in a plain forward (CPU: in the input's memory layout; CUDA: a fused kernel)
# and under vmap (contiguous bernoulli): under common random numbers every dropout draws ``mask_of`` instead
_FEATURE_RANK = {F.dropout1d: 3, F.dropout2d: 4, F.dropout3d: 5}  # (N, C, *spatial): one draw per channel


def mask_of(x: Tensor, p: float, feature: bool = False) -> Tensor:
    """A dropout mask for ``x`` (``0`` or ``1 / (1 - p)``), drawn on a contiguous tensor of ``x``'s shape, or of
    ``(N, C, 1, ...)`` for channel dropout: the same draw in a plain forward, under ``vmap`` (one mask for every
    point) and on every device, from the same generator state."""
    shape = (*x.shape[:2], *([1] * (x.dim() - 2))) if feature else x.shape
    return torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p).div_(1 - p)


class _SameDropoutMasks(TorchFunctionMode):
    """Train-mode ``F.dropout`` / ``dropout1d-3d`` as ``x * mask_of(x)`` (see :func:`mask_of`)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.dropout or func in _FEATURE_RANK:
            x, *rest = args
            p, training, inplace = (list(rest) + [kwargs.get(k, d) for k, d in
                                                  (("p", 0.5), ("training", True), ("inplace", False))][len(rest):])
            feature = func is not F.dropout
            if training and p > 0 and (not feature or x.dim() == _FEATURE_RANK[func]):
                mask = mask_of(x, p, feature)
                return x.mul_(mask) if inplace else x * mask
        return func(*args, **kwargs)


@contextlib.contextmanager
def common_random_numbers(seed: int | None, device: torch.device) -> Iterator[None]:
    """Every random draw inside starts from ``seed`` (on the CPU generator, and ``device``'s own on CUDA), and the
    generators' previous states come back on exit. Dropout draws its masks with :func:`mask_of` inside, so queries
    run inside it see the same masks whether they run one at a time, under ``vmap`` or in the feature-reuse engine,
    and a finite difference of two queries measures the parameters, not the masks (common random numbers).
    ``None``: nothing changes.
    """
    if seed is None:
        yield
        return
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), _SameDropoutMasks():
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d,
              nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
"""The layers with running statistics that a training forward updates: torch's BatchNorm classes (lazy and sync
ones included) and their subclasses from other libraries (named, not by their private common base)."""

_FROZEN: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Evaluate ``model`` without updating BatchNorm running statistics.

    In train mode BatchNorm still normalizes with batch statistics (the same numbers a training forward
    computes); in eval mode it uses the running statistics. Only the buffer updates are suppressed. Nested and
    concurrent uses on the same layers restore the flags once, when the last one exits.
    """
    bns = [m for m in model.modules() if isinstance(m, BATCHNORMS)]
    with _LOCK:
        for m in bns:
            entry = _FROZEN.get(m)
            if entry is None:
                _FROZEN[m] = entry = [0, m.track_running_stats]
                m.track_running_stats = False
            entry[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            for m in bns:
                entry = _FROZEN[m]
                entry[0] -= 1
                if entry[0] == 0:
                    m.track_running_stats = entry[1]
                    del _FROZEN[m]


@contextlib.contextmanager
def query_mode(model: nn.Module, device: torch.device) -> Iterator[None]:
    """How every query runs: no autograd, autocast off, fp32 arithmetic (no TF32), BatchNorm statistics untouched.

    Raises:
        TypeError: ``model`` holds fp16/bf16 parameters or buffers.
    """
    check_query_dtypes(model)
    device_type = device.type if device.type in ("cuda", "cpu", "mps", "xpu") else "cpu"
    with (torch.no_grad(), torch.autocast(device_type, enabled=False), fp32_precision(),
          frozen_batchnorm_stats(model)):
        yield


_CPU_BUDGET = 1 << 30
_CUDA_BUDGETS: dict[int, int] = {}


def memory_budget(device: torch.device, budget: int | None = None) -> int:
    """Bytes that batched queries may use on ``device``: the one rule for every engine.

    ``budget`` when given; else 1 GiB on CPU, or a quarter of the CUDA memory free at the first call for that
    device, then fixed for the process: chunk shapes do not change from step to step or rank to rank (which
    ``cudnn.benchmark`` and CUDA graphs need).
    """
    if budget is not None:
        return int(budget)
    if device.type != "cuda":
        return _CPU_BUDGET
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _LOCK:
        if index not in _CUDA_BUDGETS:
            _CUDA_BUDGETS[index] = torch.cuda.mem_get_info(index)[0] // 4
        return _CUDA_BUDGETS[index]


_NO_FLOAT64: weakref.WeakSet = weakref.WeakSet()


def float64_loss(loss_fn: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, targets: Tensor) -> Tensor:
    """``loss_fn(outputs, targets)`` evaluated on float64 copies of fp32 ``outputs``, where ``loss_fn`` allows it.

    The outputs stay those of the fp32 model; only the loss is taken in float64, so that two nearby losses (a
    finite difference of a few 1e-5 on a loss near 2.3) are not lost to fp32 rounding. A loss that cannot take
    float64 (e.g. one holding an fp32 module) is evaluated as given, and remembered.
    """
    try:
        known_fp32 = loss_fn in _NO_FLOAT64
    except TypeError:  # not weakly referenceable: not remembered
        known_fp32 = False
    if outputs.dtype == torch.float32 and not known_fp32:
        try:
            return loss_fn(outputs.double(), targets)
        except (RuntimeError, TypeError):
            with contextlib.suppress(TypeError):
                _NO_FLOAT64.add(loss_fn)
    return loss_fn(outputs, targets)


def points_per_chunk(device: torch.device, budget: int | None, bytes_per_point: int, max_batch: int | None = None,
                     cpu_cache_bytes: int | None = None) -> int:
    """Points (queries) per batched call: the one chunking rule of every engine.

    ``max_batch`` if set; else as many points of ``bytes_per_point`` as :func:`memory_budget` allows. On CPU, with
    ``cpu_cache_bytes``, also no more than fit in it: a flat batch whose activations outgrow the cache runs slower
    per example than separate small batches. Always at least 1.
    """
    if max_batch is not None:
        return max(1, int(max_batch))
    bytes_per_point = max(1, int(bytes_per_point))
    k = memory_budget(device, budget) // bytes_per_point
    if device.type != "cuda" and cpu_cache_bytes is not None:
        k = min(k, cpu_cache_bytes // bytes_per_point)
    return max(1, int(k))


# arithmetic of a perturbation's differences in the graph engine (the base forward is always fp32)
DELTA_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "tf32": None}
DELTA_DTYPE_CHOICES = ("auto", *DELTA_DTYPES)
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first ISA with native bf16 dot products (AVX512_CORE_BF16)
_ONEDNN_NO_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
# measured on an AVX2-only AMD EPYC: a bf16 convolution at 0.14x the speed of fp32, resnet20 steps 4.6x slower
_EMULATED_BF16_COST = "bf16 convolutions ran at 0.14x fp32 speed on an AVX2-only CPU (resnet20 steps 4.6x slower)"
_logger = logging.getLogger("dz_lightning")
_told: set[tuple[str, ...]] = set()


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none: not Linux); read once."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 convolutions and matmuls natively (faster than fp32, not emulated).

    CUDA: tensor cores with bf16 (compute capability 8.0 or newer). CPU: the kernels PyTorch dispatches to are
    AVX512 ones (``torch.backends.cpu.get_cpu_capability()``, so ``ATEN_CPU_CAPABILITY=avx2`` says no), the CPU has
    AVX512-BF16 or AMX-BF16, and oneDNN is not capped below them (``ONEDNN_MAX_CPU_ISA``).
    """
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_capability(device) >= (8, 0)
        except (RuntimeError, AssertionError, AttributeError):  # no driver (e.g. fake CUDA tensors)
            return False
    if device.type != "cpu" or not torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512"):
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).upper() in _ONEDNN_NO_BF16:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def _tell_once(key: tuple[str, ...], message: str, warn: bool) -> None:
    with _LOCK:
        if key in _told:
            return
        _told.add(key)
    if warn:
        warnings.warn(message, UserWarning, stacklevel=4)
    else:
        _logger.info(message)


def check_delta_dtype(delta_dtype: str | torch.dtype, inputs: Tensor) -> str:
    """The name of a valid ``delta_dtype``, with ``"auto"`` resolved for the inputs' device.

    ``"auto"`` is ``"bfloat16"`` for fp32 inputs on a device that computes bf16 natively (:func:`native_bf16`),
    and ``"float32"`` (the inputs' own arithmetic, float64 included) elsewhere. Under ``"auto"`` the engine lowers
    only convolutions, where bf16 pays (resnet20 steps about 13% faster with AMX); a ``Linear`` keeps fp32, as its
    difference matmuls are too small to gain (a 784-256-256-10 MLP's queries took 133 us with bf16 against 102 us).
    Each choice is logged once per device kind (logger ``dz_lightning``, INFO). An explicit ``"bfloat16"`` on a CPU
    without native bf16 warns once, with its measured cost.

    Raises:
        ValueError: not one of ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"tf32"`` (CUDA inputs only).
    """
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
    name = names.get(delta_dtype, delta_dtype) if isinstance(delta_dtype, torch.dtype) else delta_dtype
    if name not in DELTA_DTYPE_CHOICES:
        raise ValueError(f"Expected argument `delta_dtype` to be one of {sorted(DELTA_DTYPE_CHOICES)}, but got "
                         f"{delta_dtype!r}.")
    if name == "tf32" and not inputs.is_cuda:
        raise ValueError("`delta_dtype='tf32'` needs CUDA inputs (TF32 is a CUDA tensor-core format), but the "
                         f"inputs are on {inputs.device}; use 'float32' or 'bfloat16'.")
    if name not in ("auto", "bfloat16"):
        return name
    native = native_bf16(inputs.device)  # only for the choices it decides (engines are built every step)
    if name == "auto":  # bf16 replaces fp32 arithmetic only: float64 inputs keep theirs
        name = "bfloat16" if native and inputs.dtype == torch.float32 else "float32"
        where = (torch.backends.cpu.get_cpu_capability() if inputs.device.type == "cpu" else inputs.device.type)
        _tell_once(("auto", inputs.device.type, name), f"delta_dtype='auto' chose {name!r} on {where} "
                   f"({'native' if native else 'no native'} bf16 arithmetic).", warn=False)
    elif name == "bfloat16" and not native and inputs.device.type == "cpu":  # logged once per process
        _tell_once(("bfloat16", "cpu"), "delta_dtype='bfloat16' on a CPU without native bf16 "
                   f"({torch.backends.cpu.get_cpu_capability()} kernels) makes steps slower, not faster: "
                   f"{_EMULATED_BF16_COST}. Use 'auto' or 'float32'.", warn=True)
    return name
