"""The query context: precision flags, dtype policy, frozen BatchNorm statistics."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dz_lightning as dz
from dz_lightning import query
from dz_lightning.query import fp32_precision, frozen_batchnorm_stats, query_mode


def _flags() -> tuple:
    b = torch.backends
    return (b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision,
            b.mkldnn.conv.fp32_precision)


_FP32 = ("ieee",) * 4


@pytest.fixture
def tf32_user_settings():
    """A user who turned every fast-fp32 switch on; restored after the test."""
    saved = _flags()
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")  # TF32 on cuBLAS, bf16 in oneDNN matmuls
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    yield _flags()
    torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved[:2]
    torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision = saved[2:]


def test_tf32_is_off_inside_query_mode_and_restored(tf32_user_settings):
    model = nn.Linear(2, 2)
    with query_mode(model, torch.device("cpu")):
        assert _flags() == _FP32
        with query_mode(model, torch.device("cpu")):  # nested: still off, and the outer exit restores
            pass
        assert _flags() == _FP32
        assert not torch.is_grad_enabled()
    assert _flags() == tf32_user_settings
    assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "medium"


def test_flags_restored_after_an_exception(tf32_user_settings):
    model = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.raises(RuntimeError, match="boom"), query_mode(model, torch.device("cpu")):
        assert model[0].track_running_stats is False
        raise RuntimeError("boom")
    assert _flags() == tf32_user_settings
    assert model[0].track_running_stats is True


def test_oracle_queries_see_fp32_flags(tf32_user_settings):
    seen = []

    def loss_fn(out, y):
        seen.append(_flags())
        return F.mse_loss(out, y)

    model = nn.Sequential(nn.Linear(3, 2))
    oracle = dz.ModuleOracle(model, loss_fn, torch.randn(4, 3), torch.randn(4, 2))
    dz.cge(oracle, dict(model.named_parameters()))
    assert seen and all(f == _FP32 for f in seen)
    assert _flags() == tf32_user_settings


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_is_refused(dtype):
    model = nn.Linear(3, 2).to(dtype)
    with pytest.raises(TypeError, match=rf"parameter 'weight' in {dtype}.*model.float\(\)"):
        with query_mode(model, torch.device("cpu")):
            pass
    oracle = dz.ModuleOracle(model, F.mse_loss, torch.randn(4, 3, dtype=dtype), torch.randn(4, 2, dtype=dtype))
    with pytest.raises(TypeError, match="Loss queries run in float32 or float64"):
        oracle.loss(dict(model.named_parameters()))


def test_concurrent_contexts_restore_once():
    bn = nn.BatchNorm1d(2)
    inside, release = threading.Event(), threading.Event()

    def worker():
        with fp32_precision(), frozen_batchnorm_stats(bn):
            inside.set()
            release.wait(5)

    saved = _flags()
    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    with fp32_precision(), frozen_batchnorm_stats(bn):
        pass
    # the other thread is still querying: its settings must survive this thread's exit
    assert bn.track_running_stats is False
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    release.set()
    t.join()
    assert bn.track_running_stats is True
    assert _flags() == saved


def test_memory_budget_is_decided_once_per_device(monkeypatch):
    calls = []

    def fake_mem_get_info(index):
        calls.append(index)
        return (4 << 30) * len(calls), 80 << 30  # free memory that changes at every call

    monkeypatch.setattr(torch.cuda, "mem_get_info", fake_mem_get_info)
    monkeypatch.setattr(query, "_CUDA_BUDGETS", {})
    cuda0 = torch.device("cuda", 0)
    assert [query.memory_budget(cuda0) for _ in range(3)] == [1 << 30] * 3
    assert calls == [0]
    assert query.memory_budget(cuda0, 123) == 123
    assert query.memory_budget(torch.device("cpu")) == 1 << 30


def test_staged_chunk_sizes_are_fixed_at_construction():
    from dz_lightning.models import simple_cnn
    from dz_lightning.reuse import StagedForward

    model = simple_cnn(2)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    staged = StagedForward(model, F.cross_entropy, x, y, memory_budget=1 << 20)
    again = StagedForward(model, F.cross_entropy, x, y, memory_budget=1 << 20)
    assert staged.chunk_sizes == again.chunk_sizes and all(c >= 1 for c in staged.chunk_sizes.values())
    assert set(staged.chunk_sizes) == {name for name, _ in model.named_parameters()}
    assert StagedForward(model, F.cross_entropy, x, y, max_batch=3).chunk_sizes == dict.fromkeys(staged.chunk_sizes, 3)


def test_points_per_chunk_is_one_rule_for_every_engine():
    cpu = torch.device("cpu")
    assert query.points_per_chunk(cpu, None, 1 << 20) == 1024  # 1 GiB CPU budget
    assert query.points_per_chunk(cpu, 1 << 20, 1 << 10) == 1024
    assert query.points_per_chunk(cpu, 1 << 20, 1 << 10, cpu_cache_bytes=1 << 13) == 8  # small flat batches on CPU
    assert query.points_per_chunk(cpu, 1 << 20, 1 << 30) == 1  # never below one point
    assert query.points_per_chunk(cpu, 1 << 20, 1 << 10, max_batch=3) == 3


def test_common_random_numbers_repeat_the_draws_and_restore_the_generator():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    assert query.has_random_dropout(model) and not query.has_random_dropout(model.eval())
    assert not query.has_random_dropout(nn.Sequential(nn.Dropout(0.0)).train())
    x, state = torch.randn(4, 3), torch.get_rng_state()
    with torch.no_grad():
        draws = []
        for _ in range(2):
            with query.common_random_numbers(5, x.device):
                draws.append(model.train()(x))
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(torch.get_rng_state(), state)
    with query.common_random_numbers(None, x.device):  # no seed: nothing changes
        torch.rand(1)
    assert not torch.equal(torch.get_rng_state(), state)



@pytest.fixture
def cpu_kind(monkeypatch):
    """``cpu_kind(capability, flags, onednn_isa=None)``: mock the CPU that ``delta_dtype='auto'`` looks at."""
    def mock(capability: str, flags: set[str], onednn_isa: str | None = None) -> None:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(query, "_cpu_flags", lambda: frozenset(flags))
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        if onednn_isa is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_isa)
        monkeypatch.setattr(query, "_told", set())
    return mock


@pytest.mark.parametrize(("capability", "flags", "isa", "chosen"), [
    ("AVX512", {"avx512f", "amx_bf16"}, None, "bfloat16"),  # Sapphire Rapids and later: AMX
    ("AVX512", {"avx512f", "avx512_bf16"}, None, "bfloat16"),  # Cooper Lake, Zen 4
    ("AVX512", {"avx512f"}, None, "float32"),  # Skylake-X: AVX512 without bf16 dot products
    ("AVX2", {"avx2", "amx_bf16"}, None, "float32"),  # ATEN_CPU_CAPABILITY=avx2 on an AMX machine
    ("AVX512", {"avx512f", "amx_bf16"}, "AVX2", "float32"),  # oneDNN capped below bf16
    ("AVX2", {"avx2"}, None, "float32"),  # an AVX2-only EPYC
])
def test_auto_delta_dtype_is_bf16_only_where_the_cpu_computes_it_natively(cpu_kind, capability, flags, isa, chosen,
                                                                          caplog):
    cpu_kind(capability, flags, isa)
    with caplog.at_level("INFO", logger="dz_lightning"):
        assert query.check_delta_dtype("auto", torch.zeros(1)) == chosen
        assert query.check_delta_dtype("auto", torch.zeros(1)) == chosen
    told = [r.getMessage() for r in caplog.records if "delta_dtype='auto'" in r.getMessage()]
    assert told == [f"delta_dtype='auto' chose {chosen!r} on {capability} "
                    f"({'native' if chosen == 'bfloat16' else 'no native'} bf16 arithmetic)."]  # logged once


def test_explicit_bf16_on_a_cpu_without_it_warns_once_with_the_cost(cpu_kind, recwarn):
    cpu_kind("AVX2", {"avx2"})
    with pytest.warns(UserWarning, match=r"bfloat16' on a CPU without native bf16 \(AVX2 kernels\).*0\.14x"):
        assert query.check_delta_dtype("bfloat16", torch.zeros(1)) == "bfloat16"  # still honoured
    recwarn.clear()
    query.check_delta_dtype("bfloat16", torch.zeros(1))
    assert not [w for w in recwarn if "native bf16" in str(w.message)]
    cpu_kind("AVX512", {"amx_bf16"})
    query.check_delta_dtype("bfloat16", torch.zeros(1))
    assert not [w for w in recwarn if "native bf16" in str(w.message)]


def test_auto_is_the_default_and_reaches_the_engine(cpu_kind):
    from dz_lightning.reuse import build_graph_engine

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    assert dz.ZOModule(model).delta_dtype == "auto"
    assert dz.ModuleOracle(model, F.cross_entropy, x, y).delta_dtype == "auto"
    for flags, dtype in (({"amx_bf16"}, torch.bfloat16), (set(), None)):
        cpu_kind("AVX512", flags)
        engine = build_graph_engine(model, F.cross_entropy, x, y, delta_dtype="auto", self_check=False)
        assert engine.delta_dtype == dtype


def test_auto_keeps_float64_arithmetic_even_where_bf16_is_native(cpu_kind):
    cpu_kind("AVX512", {"amx_bf16"})
    assert query.check_delta_dtype("auto", torch.zeros(1, dtype=torch.float64)) == "float32"  # no cast at all
    assert query.check_delta_dtype("auto", torch.zeros(1)) == "bfloat16"


def test_auto_lowers_convolutions_only_and_an_explicit_bf16_lowers_linears_too(cpu_kind):
    """A Linear's difference matmul is too small to gain from bf16: under "auto" it keeps fp32, bit for bit."""
    from dz_lightning.reuse import build_graph_engine

    cpu_kind("AVX512", {"amx_bf16"})
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    index = torch.arange(0, 128, 9)

    def losses(delta_dtype):
        engine = build_graph_engine(mlp, F.cross_entropy, x, y, delta_dtype=delta_dtype, self_check=False)
        return engine.coordinate_losses("0.weight", index, 1e-2)

    assert torch.equal(losses("auto"), losses("float32"))
    assert not torch.equal(losses("bfloat16"), losses("float32"))
