"""Feature reuse: batched, structure-aware finite differences equal the one-at-a-time loop."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import fp32_tolerance, one_query_at_a_time
from torch import Tensor, nn

import dz_lightning as dz
from dz_lightning.models import MLP, resnet20, simple_cnn
from dz_lightning.models.resnet import BasicBlock
from dz_lightning.query import query_mode
from dz_lightning.reuse import StagedForward, build_graph_engine, fused


class _CustomStaged(nn.Module):
    """A user model made staged by a `stages()` method."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))

    def stages(self) -> list[nn.Module]:
        return [self.features, self.pool, self.classifier]

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)))


class _ProjectionBlock(nn.Module):
    """A residual block with a learned 1x1-conv + BatchNorm shortcut and no op after the add."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.Tanh()
        self.proj = nn.Conv2d(c_in, c_out, 1, stride=2, bias=False)
        self.proj_bn = nn.BatchNorm2d(c_out)

    def residual_branch(self) -> list[nn.Module]:
        return [self.conv, self.bn, self.act]

    def shortcut(self, x: Tensor) -> Tensor:
        return self.proj_bn(self.proj(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x))) + self.shortcut(x)


class _CustomResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = _ProjectionBlock(4, 6)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))

    def stages(self) -> list[nn.Module]:
        return [self.stem, self.block, self.head]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.stem(x)))


class _FirstLayerOnlyBlock(BasicBlock):
    """A ResNet block without the residual protocol: one opaque stage, run per query under vmap."""

    residual_branch = None


MODELS = {
    "resnet20": resnet20,
    "simple_cnn1": lambda: simple_cnn(1),
    "simple_cnn2": lambda: simple_cnn(2),
    "simple_cnn3": lambda: simple_cnn(3),
    "sequential_mlp": lambda: MLP(3 * 8 * 8, (12, 6), 10, activation="tanh"),
    "sequential_bn1d": lambda: nn.Sequential(nn.Flatten(), nn.Linear(192, 12), nn.BatchNorm1d(12), nn.ReLU(),
                                             nn.Linear(12, 10)),
    "custom_staged": _CustomStaged,
    "custom_residual": _CustomResidual,
    "first_layer_only": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _FirstLayerOnlyBlock(4, 8, stride=2),
                                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("max_batch", [1, 3, None])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_structured_differences_equal_the_loop(model_name, max_batch, train):
    torch.manual_seed(0)
    model = MODELS[model_name]().train(train)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    if not train:  # non-trivial running statistics
        with torch.no_grad():
            model.train()(x * 2 + 0.5)
        model.eval()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    params = dict(model.named_parameters())
    staged = StagedForward(model, F.cross_entropy, x, y, params, max_batch=max_batch)
    gen = torch.Generator().manual_seed(1)
    for name, p in params.items():
        index = torch.randperm(p.numel(), generator=gen)[:5]
        got = staged.coordinate_losses(name, index, 1e-2)
        assert got.dtype == torch.float64  # the loss of fp32 outputs plus differences, in float64
        want = one_query_at_a_time(model, F.cross_entropy, x, y, name, index, 1e-2).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert all(torch.equal(stats[n], b) for n, b in model.named_buffers())


def test_resnet_blocks_take_the_residual_path():
    model = resnet20().train()
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    staged = StagedForward(model, F.cross_entropy, x, y)
    # the stem's one-channel change stays local through BatchNorm and ReLU and reaches blocks.0 as a
    # one-input-channel convolution
    assert [rule for _, rule in staged.rules("stem.0.weight")[:4]] == [
        "column_start", "channel_rule", "channel_rule", "channel_mix_rule"]
    # a conv2 coordinate stays one channel through bn2, the add (cached shortcut) and the block's ReLU
    assert [rule for _, rule in staged.rules("blocks.4.conv2.weight")[:5]] == [
        "column_start", "channel_rule", "add_rule", "channel_rule", "channel_mix_rule"]
    # the traced graph: the same computation (where no downsampling shortcut is crossed: the protocol runs it as
    # one linear node, the traced graph as its slicing and its zero padding)
    traced = build_graph_engine(model, F.cross_entropy, x, y)
    for name in ("blocks.6.conv1.weight", "blocks.6.bn1.bias", "blocks.7.conv2.weight", "head.2.weight"):
        assert [r for _, r in traced.rules(name)] == [r for _, r in staged.rules(name)]


def test_inconsistent_residual_protocol_is_an_error():
    class Wrong(_ProjectionBlock):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2

    model = nn.Sequential(Wrong(3, 4), nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ValueError, match="residual_branch.*differs from its forward"):  # when the engine is built
        StagedForward(model, F.cross_entropy, torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,)))


def test_module_oracle_cge_with_reuse_equals_generic_path_with_masks():
    torch.manual_seed(0)
    model = simple_cnn(2).train()
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 10, (3,))
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in params.items() if p.dim() > 1}
    fast = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y), params, masks=masks)
    slow = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False), params, masks=masks)
    assert fast.queries == slow.queries
    for n in params:
        torch.testing.assert_close(fast.grads[n], slow.grads[n], rtol=1e-3, atol=1e-3)


def test_unstaged_model_falls_back_with_one_warning():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.lin(x)
            return -self.lin(x)

    model = Plain()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    params = dict(model.named_parameters())
    with pytest.warns(UserWarning, match=r"(?s)could not trace Plain.*`if x.sum\(\) > 0:.*no `stages\(\)`"):
        est = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y), params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y), params)  # warned once only
    assert est.queries == 16


def test_stages_must_cover_every_parameter():
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def stages(self) -> list[nn.Module]:
            return [self.a]

    with pytest.raises(ValueError, match="'b.weight' belongs to no stage"):
        StagedForward(Partial(), F.mse_loss, torch.zeros(1, 2), torch.zeros(1, 2))


def test_benchmark_smoke():
    from benchmarks.cge_throughput import main

    result = main(["--models", "simple_cnn", "--batch", "2", "--coords", "6", "--per-param", "2",
                   "--rel-err-coords", "8", "--conv-reps", "1", "--graph-models", "simple_cnn",
                   "--graph-per-param", "2",
                   "--full-per-param", "1"])
    assert result["simple_cnn"]["max_abs_diff"] < 1e-4
    assert result["simple_cnn"]["step_queries_90pct"] > 0
    assert result["simple_cnn"]["ops_growth"] <= 1.5 and result["simple_cnn"]["syncs_per_chunk"] == 0
    assert result["simple_cnn"]["rel_err"]["eval"]["float32"] <= 1e-3
    assert set(result["simple_cnn"]["step_seconds_90pct_by_delta_dtype"]) == {"float32", "auto", "bfloat16"}
    assert result["compiled_differences"] is fused.compiling_enabled() and result["compile_failures"] == {}
    graph = result["graph_models"]["simple_cnn"]
    assert set(graph["step_queries_per_s"]) == {"graph", "full_forward", "stages"}
    assert graph["max_abs_diff"] < 1e-4


def test_benchmark_cuda_flag_fails_clearly_without_cuda(monkeypatch, capsys):
    from benchmarks.cge_throughput import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


_SAMPLE = ["stem.0.weight", "stem.1.weight", "blocks.0.conv1.weight", "blocks.3.bn1.bias", "blocks.3.conv2.weight",
           "blocks.8.bn2.weight", "head.2.weight", "head.2.bias"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_chunk_ops_do_not_grow_with_queries_and_never_sync(train):
    from benchmarks.cge_throughput import DispatchCounter

    torch.manual_seed(0)
    model = resnet20().train(train)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    params = dict(model.named_parameters())
    counts = {}
    for k in (1, 64):
        staged = StagedForward(model, F.cross_entropy, x, y, max_batch=k)
        total = syncs = 0
        for name in _SAMPLE:
            index = torch.arange(k) % params[name].numel()
            staged.coordinate_losses(name, index, 1e-2)  # first call fills the per-op caches
            with DispatchCounter() as counter:
                staged.coordinate_losses(name, index, 1e-2)
            total, syncs = total + counter.ops, syncs + counter.syncs
        counts[k] = total
        assert syncs == 0
    assert counts[64] <= 1.5 * counts[1], counts


def test_queries_do_not_patch_the_users_modules():
    model = resnet20().train()
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    patched = []

    def loss_fn(out, t):
        patched.extend(m for m in model.modules() if "forward" in vars(m))
        return F.cross_entropy(out, t)

    staged = StagedForward(model, loss_fn, x, y, max_batch=4)
    for name in _SAMPLE:
        staged.coordinate_losses(name, torch.arange(4), 1e-2)
    assert not patched


def _rel_err(model: nn.Module, x: Tensor, y: Tensor, delta_dtype: str, n: int = 32, mu: float = 5e-3) -> float:
    """max |CGE estimate - float64 loop| / RMS(float64 loop) over ``n`` random coordinates."""
    params = dict(model.named_parameters())
    names = list(params)
    gen = torch.Generator().manual_seed(0)
    staged = StagedForward(model, F.cross_entropy, x, y, delta_dtype=delta_dtype)
    model64 = copy.deepcopy(model).double()
    p64 = dict(model64.named_parameters())
    est, ref = [], []
    with query_mode(model64, x.device):
        base = F.cross_entropy(model64(x.double()), y)
        for _ in range(n):
            name = names[int(torch.randint(len(names), (1,), generator=gen))]
            i = int(torch.randint(params[name].numel(), (1,), generator=gen))
            est.append((staged.coordinate_losses(name, torch.tensor([i]), mu)[0] - staged.base_loss()) / mu)
            w = p64[name].detach().clone()
            w.view(-1)[i] += mu
            out = torch.func.functional_call(model64, {**p64, name: w}, (x.double(),))
            ref.append((F.cross_entropy(out, y) - base) / mu)
    est, ref = torch.stack(est).double(), torch.stack(ref)
    return float((est - ref).abs().max() / ref.pow(2).mean().sqrt())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_difference_path_error_against_a_float64_loop_on_resnet20(train):
    torch.manual_seed(0)
    model = resnet20()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    if not train:
        with torch.no_grad():
            model.train()(x * 2 + 0.5)
    model.train(train)
    assert _rel_err(model, x, y, "float32") <= 1e-3
    # bf16 convolutions round their outputs to 8 bits; train-mode BatchNorm then removes most of a change (its
    # mean and its part along the centered input), so the rounding error grows relative to what is left: 3.3e-2
    # measured here in train mode (16x16 inputs, batch 8), 0.3-1e-2 in eval mode and on 32x32 inputs
    assert _rel_err(model, x, y, "bfloat16") <= (1e-2 if not train else 5e-2)


def test_delta_dtype_is_checked():
    model = simple_cnn(1)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    with pytest.raises(ValueError, match=r"`delta_dtype`.*'bfloat16', 'float32', 'tf32'.*float16"):
        StagedForward(model, F.cross_entropy, x, y, delta_dtype=torch.float16)
    with pytest.raises(ValueError, match="'tf32'.*needs CUDA inputs.*cpu"):
        StagedForward(model, F.cross_entropy, x, y, delta_dtype="tf32")


def test_a_black_box_inside_the_loss_sees_every_query():
    seen = []

    def loss_fn(out, t):  # a loss the engine does not know: called once per query, with that query's outputs
        seen.append(out.shape[0])
        return F.cross_entropy(out, t)

    model = simple_cnn(2)
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 10, (3,))
    staged = StagedForward(model, loss_fn, x, y, max_batch=4)
    seen.clear()
    staged.coordinate_losses("0.0.weight", torch.arange(10), 1e-2)
    assert seen == [3] * 10


def test_a_linear_one_channel_change_comes_out_row_major_for_the_next_matmul():
    """Gathered weight columns are query-fastest in memory; a product inheriting that layout made the next Linear
    run as a batched matmul over expanded weights (2.1k copies per CGE step of a 784-256-256-10 MLP)."""
    from dz_lightning.reuse import ops

    lin = nn.Linear(16, 8)
    d, channel = torch.randn(3, 5).T, torch.tensor([0, 3, 3, 7, 15])  # a query-fastest change, as the engine has
    out = ops.one_channel_mix(lin, dict(lin.named_parameters()), d, channel, torch.Size([3, 8]))
    assert out.shape == (5, 3, 8) and out.is_contiguous()
    torch.testing.assert_close(out, d.unsqueeze(-1) * lin.weight.detach()[:, channel].T.unsqueeze(1), rtol=0, atol=0)


def test_relu_differences_write_into_one_buffer_per_node_reused_by_every_chunk():
    """The same values as a fresh result (bit for bit), in a buffer the next chunk reuses (no page faults per chunk)."""
    from dz_lightning.reuse import build_graph_engine
    from dz_lightning.reuse.differences import relu_difference

    x, d = torch.randn(4, 6), torch.randn(3, 4, 6)
    neg_part, neg_out = x.clamp(max=0), -x.clamp(min=0)
    buf = torch.empty(3, 4, 6)
    assert relu_difference(neg_part, neg_out, d, out=buf) is buf
    assert torch.equal(buf, relu_difference(neg_part, neg_out, d))
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y, index = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]), torch.arange(0, 128, 3)
    chunked = build_graph_engine(mlp, F.cross_entropy, x, y, max_batch=4, delta_dtype="float32")
    whole = build_graph_engine(mlp, F.cross_entropy, x, y, max_batch=64, delta_dtype="float32")
    first = chunked.coordinate_losses("0.weight", index, 1e-2)
    buffers = {i: b.data_ptr() for i, b in chunked.workspace.buffers.items()}
    assert buffers  # the dense ReLU differences after the second Linear
    again = chunked.coordinate_losses("0.weight", index, 1e-2)
    assert {i: b.data_ptr() for i, b in chunked.workspace.buffers.items()} == buffers  # reused, not reallocated
    assert torch.equal(first, again)
    torch.testing.assert_close(first, whole.coordinate_losses("0.weight", index, 1e-2), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_rows_equal_torchs_per_example_cross_entropy(dtype):
    from dz_lightning.reuse.differences import cross_entropy_rows

    x, t = 10 * torch.randn(257, 10, dtype=dtype), torch.randint(0, 10, (257,))
    t[::7] = -100  # ignored: 0, as torch gives
    # about 12 rounded operations (10 exponentials, their sum and log, the subtraction) on values up to max |x| + log 10
    scale = float(x.abs().max()) + 3
    tol = fp32_tolerance(12, scale) if dtype == torch.float32 else {"rtol": 0, "atol": 2 * 12 * 2**-53 * scale}
    torch.testing.assert_close(cross_entropy_rows(x, t), F.cross_entropy(x, t, reduction="none"), **tol)
    assert torch.equal(cross_entropy_rows(x, t)[::7], torch.zeros(37, dtype=dtype))
    t[::7] = 3
    for kwargs in ({"label_smoothing": 0.1}, {"ignore_index": 3}):  # smoothing: torch's own kernel
        torch.testing.assert_close(cross_entropy_rows(x, t, **kwargs), F.cross_entropy(x, t, reduction="none",
                                   **kwargs), **tol)
    image, target = torch.randn(2, 10, 3, 3, dtype=dtype), torch.randint(0, 10, (2, 3, 3))  # not (N, C): torch's
    assert torch.equal(cross_entropy_rows(image, target), F.cross_entropy(image, target, reduction="none"))
