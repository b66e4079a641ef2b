"""Compiled differences (dz_lightning.reuse.fused): the same values as the eager formulas, a fallback that warns once,
and the eager path when turned off, on CUDA unless asked, and for fake tensors."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dz_lightning.reuse import differences, fused


def _eager(fn):
    return fn.__wrapped__


def _case(layout: str, dtype: torch.dtype = torch.float64, k: int = 3):
    gen = torch.Generator().manual_seed(0)
    shape = (6, 5) if layout == "2d" else (6, 5, 4, 3)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(5, generator=gen, dtype=dtype) + 0.5
    base = differences.NormBase(x, weight, 1e-5)
    d = torch.randn(k, *shape, generator=gen, dtype=dtype) * 1e-3
    if layout == "channels_last":
        d = d.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return base, d, x, weight


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "2d"])
def test_the_compiled_batch_norm_difference_is_the_eager_one_to_rounding(layout, monkeypatch):
    monkeypatch.setenv(fused.ENV, "1")
    base, d, x, weight = _case(layout)
    args = (base.view(d), base.centered, base.mean, base.scale, base.inv_var, base.inv_n_var, base.dims)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # compiling must work here (it has a C++ compiler)
        got = differences._norm_change(*args)
    want = _eager(differences._norm_change)(*args)
    assert not any(n.endswith("_norm_change") for n in fused._FAILED)
    # float64: the two differ only in the order of the sums (n <= 72 terms), so by a few ulps of the output
    assert torch.allclose(got, want, rtol=0, atol=1e-13 * float(want.abs().max()))
    # and the difference of two train-mode BatchNorms, query by query (which loses eps * |BN(x)| ~ 1e-15 to
    # cancellation against changes of ~1e-3)
    norm = lambda h: torch.nn.functional.batch_norm(h, None, None, weight, None, training=True, eps=1e-5)  # noqa: E731
    direct = torch.stack([norm(x + di) - norm(x) for di in d])
    assert torch.allclose(base.unview(got, d), direct, rtol=0, atol=1e-9 * float(direct.abs().max()))


def test_the_compiled_one_channel_batch_norm_difference_is_the_eager_one_to_rounding(monkeypatch):
    monkeypatch.setenv(fused.ENV, "1")
    gen = torch.Generator().manual_seed(1)
    xc = torch.randn(4, 8, 5, 5, generator=gen, dtype=torch.float64)
    xc = xc - xc.mean((1, 2, 3), keepdim=True)
    var_eps = (xc * xc).mean((1, 2, 3), keepdim=True) + 1e-5
    scale = torch.rand(4, 1, 1, 1, generator=gen, dtype=torch.float64) * torch.rsqrt(var_eps)
    d = torch.randn(4, 8, 5, 5, generator=gen, dtype=torch.float64) * 1e-3
    got = differences.batch_norm_channel_difference(xc, var_eps, scale, d)
    want = _eager(differences.batch_norm_channel_difference)(xc, var_eps, scale, d)
    assert torch.allclose(got, want, rtol=0, atol=1e-13 * float(want.abs().max()))


def _spy_compile(monkeypatch, behaviour):
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(fn.__name__)
        return behaviour(fn)

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_a_compiler_failure_warns_once_and_the_eager_formula_gives_the_values(monkeypatch):
    def broken(fn):
        def run(*args):
            raise RuntimeError("InductorError: no C++ compiler\nmore detail")
        return run

    calls = _spy_compile(monkeypatch, broken)
    monkeypatch.setattr(fused, "_FAILED", {})
    monkeypatch.setenv(fused.ENV, "1")

    @fused.compiled
    def twice(x):
        return 2 * x

    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match=r"could not compile .*twice \(RuntimeError: InductorError: no C\+\+ "
                                            r"compiler\); it runs eagerly.*DZ_COMPILE_DIFFERENCES=0"):
        assert torch.equal(twice(x), 2 * x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(twice(x), 2 * x)  # eager from now on, without a word
    assert calls == ["twice"]


def test_compiling_is_on_for_cpu_by_default_and_the_variable_decides(monkeypatch):
    monkeypatch.delenv(fused.ENV, raising=False)
    assert fused.compiling_enabled("cpu") and not fused.compiling_enabled("cuda")  # CUDA: not yet run on a GPU
    monkeypatch.setenv(fused.ENV, "1")
    assert fused.compiling_enabled("cpu") and fused.compiling_enabled("cuda")
    monkeypatch.setenv(fused.ENV, "0")
    assert not fused.compiling_enabled("cpu") and not fused.compiling_enabled("cuda")


@pytest.mark.parametrize("why", ["off", "fake"])
def test_turned_off_or_on_fake_tensors_the_eager_formula_runs(why, monkeypatch):
    calls = _spy_compile(monkeypatch, lambda fn: fn)

    @fused.compiled
    def twice(x):
        return 2 * x

    if why == "off":
        monkeypatch.setenv(fused.ENV, "0")
        assert torch.equal(twice(torch.ones(2)), torch.full((2,), 2.0))
    else:
        monkeypatch.setenv(fused.ENV, "1")  # even where CUDA is allowed: fake tensors run eagerly
        with FakeTensorMode():
            out = twice(torch.empty(2, device="cuda"))
        assert out.device.type == "cuda"
    assert calls == []
    monkeypatch.delenv(fused.ENV)
    twice(torch.ones(2))
    assert calls == ["twice"]  # a plain CPU tensor, the default: compiled once
    twice(torch.ones(3))
    assert calls == ["twice"]


_CALLS = """
import torch
from dz_lightning.reuse import differences, fused
for n in (64, 16):  # one query; two batch sizes: the second call runs the dynamic-shape kernel of the first
    x = torch.randn(n, 18, 4, 4).contiguous(memory_format=torch.channels_last)
    base = differences.NormBase(x, None, 1e-5)
    d = torch.randn(1, n, 18, 4, 4) * 1e-3
    got = differences.batch_norm_difference(base, d)
    v = base.view(d)
    want = base.unview(differences._norm_change.__wrapped__(v, base.centered, base.mean, base.scale, base.inv_var,
                                                             base.inv_n_var, base.dims), d)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-9), (got - want).abs().max()
    junk = [torch.randn(n * 288) for _ in range(200)]  # the allocator notices a corrupted heap
assert not fused.compile_failures(), fused.compile_failures()
print("ok")
"""


def test_a_compile_cache_written_under_the_avx2_kernels_is_not_loaded_by_the_default_ones(tmp_path):
    # torch 2.14's FX graph cache gave a process on the AVX512 kernels the graph compiled under
    # ATEN_CPU_CAPABILITY=avx2 by another process, and the heap broke ("free(): invalid next size"). Our compiled
    # differences do not use that cache. (On an AVX2-only CPU both runs use the same kernels.)
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), OMP_NUM_THREADS="1", DZ_COMPILE_DIFFERENCES="1")
    for extra in ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, {}):
        run = subprocess.run([sys.executable, "-c", _CALLS], env={**env, **extra}, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0 and run.stdout.strip() == "ok", (extra, run.returncode, run.stderr[-2000:])
