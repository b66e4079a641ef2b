"""Feature reuse on traced graphs: any model's batched queries equal the one-at-a-time loop."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import one_query_at_a_time
from torch import Tensor, nn

import dz_lightning as dz
from dz_lightning.models import resnet20, simple_cnn, tv_mobilenet_v3_small, tv_resnet18, unet_small
from dz_lightning.reuse import StagedForward, build_graph_engine
from dz_lightning.reuse.engine import GraphEngine
from dz_lightning.reuse.graph import UntraceableError, trace


class _TokenMixer(nn.Module):
    """Patch embedding, then a pre-norm transformer-style MLP block on tokens (LayerNorm, GELU, residual add)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (B, T, dim)
        tokens = tokens + self.mlp(self.norm(tokens))
        return self.head(tokens.mean(1))


class _Attention(nn.Module):
    """Self-attention twice: written out (``chunk``, matmuls, softmax) and as ``nn.MultiheadAttention`` (a module
    returning a tuple)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        t = t + torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1) @ v
        t = t + self.mha(t, t, t, need_weights=False)[0]
        return self.head(self.norm(t).mean(1))


class _Functional(nn.Module):
    """Functional calls, a parameter read directly, in-place ops, depthwise/1d convolutions, GroupNorm,
    BatchNorm1d, Hardswish/Hardsigmoid, concatenation, reshapes and products with constants."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.gn = nn.GroupNorm(2, 6)
        self.act = nn.Hardswish(inplace=True)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(6, 6, 1), nn.Hardsigmoid())
        self.scale = nn.Parameter(torch.full((1, 12, 1, 1), 0.5))
        self.pool = nn.AvgPool2d(2)
        self.conv1d = nn.Conv1d(12, 4, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 16, 10)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.conv(x))
        b = self.act(self.gn(self.dw(a)))
        b = b * self.gate(b)
        h = torch.cat([a, b], dim=1) * self.scale * 2.0
        h = self.pool(h)
        h = h.view(h.size(0), 12, -1)  # (B, 12, 16)
        h = self.bn1d(self.conv1d(h))
        h = h.relu_() - 0.1
        return self.fc(self.drop(h.reshape(h.shape[0], -1)))


class _Squares(nn.Module):
    """``torch.square`` on one-channel changes (after a convolution) and ``Tensor.square`` on whole differences."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 64, 8)
        self.fc2 = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(torch.square(self.conv(x)).flatten(1)).square())


def _through_the_host(x: Tensor) -> Tensor:
    """A traced leaf that vmap cannot batch (``tolist``)."""
    return torch.tensor(x.tolist(), dtype=x.dtype)


torch.fx.wrap("_through_the_host")


class _HostRoundTrip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 2, 3), nn.Linear(2 * 6 * 6, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(_through_the_host(self.conv(x)).flatten(1))


def _eval_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()  # a train-mode dropout makes every query random, the loop included
    return model


# name -> (model, input shape, loss, full coverage of the tensors or a sample)
MODELS = {
    "resnet20": (resnet20, (3, 8, 8), F.cross_entropy),
    "simple_cnn": (lambda: simple_cnn(2), (3, 8, 8), F.cross_entropy),
    "tv_resnet18": (tv_resnet18, (3, 8, 8), F.cross_entropy),
    "tv_mobilenet_v3_small": (tv_mobilenet_v3_small, (3, 32, 32), F.cross_entropy),
    "unet_small": (lambda: unet_small(width=4), (3, 8, 8), F.mse_loss),
    "layernorm_gelu": (_TokenMixer, (3, 16, 16), F.cross_entropy),
    "attention": (_Attention, (3, 16, 16), F.cross_entropy),
    "functional": (_Functional, (3, 8, 8), F.cross_entropy),
    "squares": (_Squares, (3, 8, 8), F.cross_entropy),
}
_HEAVY = {"tv_resnet18", "tv_mobilenet_v3_small"}


def _data(shape: tuple[int, ...], loss_fn, batch: int = 3) -> tuple[Tensor, Tensor]:
    x = torch.randn(batch, *shape)
    y = torch.randn(batch, *shape) if loss_fn is F.mse_loss else torch.randint(0, 10, (batch,))
    return x, y


def _setup(model_name: str, train: bool, dtype: torch.dtype = torch.float32, shape: tuple[int, ...] | None = None):
    """The model (train or eval mode, non-trivial running statistics in eval), a batch of 3 (``shape``: the input
    shape instead of the model's small test one) and the loss, in ``dtype``; the same values whatever the dtype."""
    make, small, loss_fn = MODELS[model_name]
    shape = shape or small
    torch.manual_seed(0)
    model = _eval_dropout(make().train(train))
    x, y = _data(shape, loss_fn)
    if not train:  # non-trivial running statistics
        with torch.no_grad():
            model.train()(x * 2 + 0.5)
        _eval_dropout(model.eval())
    model, x = model.to(dtype), x.to(dtype)
    return model, x, y.to(dtype) if y.is_floating_point() else y, loss_fn


def _sample(params: dict[str, Tensor], tensors: int | None) -> list[str]:
    """The tensors to query: all of them, or an even sample (the first and last included)."""
    names = list(params)
    if tensors is None or tensors >= len(names):
        return names
    return [names[round(i * (len(names) - 1) / (tensors - 1))] for i in range(tensors)]


def _check_equal(model_name: str, max_batch: int | None, train: bool, tensors: int | None = None) -> None:
    """The engine's losses equal the one-at-a-time loop's to float64 rounding: the model runs in float64, so any
    rule that computes something else than the model (a wrong channel, a missed term) shows, and fp32 rounding
    cannot hide it or be mistaken for it (:func:`_check_fp32` bounds the fp32 error)."""
    model, x, y, loss_fn = _setup(model_name, train, torch.float64)
    stats = {n: b.clone() for n, b in model.named_buffers()}
    params = dict(model.named_parameters())
    engine = build_graph_engine(model, loss_fn, x, y, params, max_batch=max_batch)
    assert isinstance(engine, GraphEngine) and not isinstance(engine, StagedForward)  # the traced graph
    gen = torch.Generator().manual_seed(1)
    for name in _sample(params, tensors):
        index = torch.randperm(params[name].numel(), generator=gen)[:4]
        got = engine.coordinate_losses(name, index, 1e-2)
        want = one_query_at_a_time(model, loss_fn, x, y, name, index, 1e-2)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    assert all(torch.equal(stats[n], b) for n, b in model.named_buffers())


def _check_fp32(model_name: str, train: bool, tensors: int | None = None) -> None:
    """In fp32 the engine's finite differences ``f(theta + mu e_i) - f(theta)`` (what the estimators use) are as
    accurate as the one-at-a-time loop's: against the float64 values, the engine's largest error over the sampled
    coordinates is at most 4 times the fp32 loop's (or 1e-6). Measured on 2 threads: 0.00-0.46 times for every
    model but train-mode tv_resnet18 (2.3 times: its layer4 BatchNorm normalizes each channel over 3 numbers, which
    amplifies the rounding of the channels-last convolutions the engine runs on CPU)."""
    model, x, y, loss_fn = _setup(model_name, train)
    model64, x64, y64, _ = _setup(model_name, train, torch.float64)
    params = dict(model.named_parameters())
    engine = build_graph_engine(model, loss_fn, x, y, params, max_batch=3)
    with torch.no_grad():
        base, base64 = loss_fn(model(x), y).double(), loss_fn(model64(x64), y64)
    gen = torch.Generator().manual_seed(1)
    worst_engine = worst_loop = 0.0
    for name in _sample(params, tensors):
        index = torch.randperm(params[name].numel(), generator=gen)[:4]
        exact = one_query_at_a_time(model64, loss_fn, x64, y64, name, index, 1e-2) - base64
        engine_diff = engine.coordinate_losses(name, index, 1e-2) - engine.base_loss()
        loop_diff = one_query_at_a_time(model, loss_fn, x, y, name, index, 1e-2).double() - base
        worst_engine = max(worst_engine, float((engine_diff - exact).abs().max()))
        worst_loop = max(worst_loop, float((loop_diff - exact).abs().max()))
    assert worst_engine <= max(4 * worst_loop, 1e-6), (worst_engine, worst_loop)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("max_batch", [1, 3, None])
@pytest.mark.parametrize("model_name", [m for m in MODELS if m not in _HEAVY])
def test_traced_graph_equals_the_loop(model_name, max_batch, train):
    _check_equal(model_name, max_batch, train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("model_name", sorted(_HEAVY))
def test_torchvision_models_equal_the_loop(model_name, train):
    _check_equal(model_name, 3, train, tensors=12)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_tv_resnet18_at_32x32_equals_the_loop_in_fp32(train):
    """The issue's setting (CIFAR-sized images), in fp32 at the fp32 tolerance: measured 1.0e-6 at most."""
    model, x, y, loss_fn = _setup("tv_resnet18", train, shape=(3, 32, 32))
    params = dict(model.named_parameters())
    engine = build_graph_engine(model, loss_fn, x, y, params, max_batch=3)
    gen = torch.Generator().manual_seed(1)
    for name in _sample(params, 12):
        index = torch.randperm(params[name].numel(), generator=gen)[:4]
        want = one_query_at_a_time(model, loss_fn, x, y, name, index, 1e-2).double()
        torch.testing.assert_close(engine.coordinate_losses(name, index, 1e-2), want, rtol=1e-5, atol=2e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_fp32_differences_are_as_accurate_as_the_loop(model_name, train):
    _check_fp32(model_name, train, tensors=12)


@pytest.mark.slow
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("max_batch", [1, 3, None])
@pytest.mark.parametrize("model_name", sorted(_HEAVY))
def test_torchvision_models_equal_the_loop_on_every_tensor(model_name, max_batch, train):
    _check_equal(model_name, max_batch, train)


def test_one_channel_rules_follow_the_graph():
    model = _Functional().eval()
    engine = build_graph_engine(model, F.cross_entropy, *_data((3, 8, 8), F.cross_entropy))
    rules = dict(engine.rules("conv.weight"))
    # a conv weight coordinate: one channel through F.relu and the depthwise conv; GroupNorm mixes channels
    assert [rules[n] for n in ("conv", "relu", "dw", "gn", "act")] == [
        "column_start", "elementwise_channel_rule", "channel_rule", "flat_rule", "flat_rule"]
    assert dict(engine.rules("dw.weight"))["dw"] == "column_start"  # depthwise: one channel too
    # products with constants keep the change (the parameter read directly starts as a one-hot change)
    assert dict(engine.rules("scale"))["scale"] == "param_rule"
    assert dict(engine.rules("gate.1.weight"))["mul"] == "product_rule"


def test_a_square_keeps_a_change_in_one_channel():
    engine = build_graph_engine(_Squares(), F.cross_entropy, *_data((3, 8, 8), F.cross_entropy))
    assert [r for _, r in engine.rules("conv.weight")[:3]] == ["column_start", "square_rule", "vmap_linear_rule"]
    assert [r for _, r in engine.rules("fc1.weight")] == ["column_start", "square_rule", "channel_mix_rule"]


def test_unet_skips_keep_a_change_in_one_channel():
    model = unet_small(width=4).eval()
    engine = build_graph_engine(model, F.mse_loss, torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8))
    rules = dict(engine.rules("dec1.3.weight"))  # dec1's second conv: one channel to the 1x1 head
    assert rules["dec1_3"] == "column_start" and rules["head"] == "channel_mix_rule"
    # an up-sampling coordinate changes one channel, which the concatenation keeps (the skip is cached)
    assert [r for _, r in engine.rules("up1.weight")[:3]] == ["column_start", "cat_channel_rule", "channel_mix_rule"]
    assert [r for _, r in engine.rules("up2.bias")[:2]] == ["column_start", "cat_channel_rule"]


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; ``stages()`` makes it staged."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    def stages(self) -> list[nn.Module]:
        return [self.body, self.head]

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        if h.mean() > 100:  # never true here, but the tracer cannot know
            h = h * 0
        return self.head(h)


def test_untraceable_model_with_stages_uses_them_and_says_why():
    torch.manual_seed(0)
    model = _Branchy().train()
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 10, (3,))
    with pytest.warns(UserWarning, match=r"(?s)could not trace _Branchy.*if h.mean\(\) > 100.*`stages\(\)` protocol"):
        engine = build_graph_engine(model, F.cross_entropy, x, y, max_batch=3)
    assert isinstance(engine, StagedForward)
    for name, p in model.named_parameters():
        index = torch.arange(min(4, p.numel()))
        want = one_query_at_a_time(model, F.cross_entropy, x, y, name, index, 1e-2).double()
        torch.testing.assert_close(engine.coordinate_losses(name, index, 1e-2), want, rtol=1e-5, atol=2e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_graph_engine(model, F.cross_entropy, x, y)  # warned once per model type


def test_a_graph_the_engine_cannot_run_falls_back_naming_the_node():
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    with pytest.warns(UserWarning, match=r"^_HostRoundTrip: node '_through_the_host' \(generic_rule\) failed in a "
                                         r"query of 'conv.weight'.*full forward for every query") as record:
        assert build_graph_engine(_HostRoundTrip(), F.cross_entropy, x, y) is None
    assert len(str(record[0].message)) < 300  # the cause first, in a few lines; the whole of it at DEBUG level


def test_trace_names_what_stopped_it():
    with pytest.raises(UntraceableError,
                       match=r"_Branchy at `if h.mean\(\) > 100.*` \(.*test_graph.py:\d+, forward\): TraceError"):
        trace(_Branchy())

    class TwoInputs(nn.Module):
        def forward(self, x: Tensor, z: Tensor) -> Tensor:
            return x + z

    with pytest.raises(UntraceableError, match="more than one input"):
        trace(TwoInputs())


def test_oracle_cge_on_a_plain_model_uses_the_graph():
    torch.manual_seed(0)
    model = _TokenMixer().train()
    x, y = torch.randn(3, 3, 16, 16), torch.randint(0, 10, (3,))
    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the model is traced
        fast = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y), params)
    slow = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False), params)
    assert fast.queries == slow.queries
    for n in params:
        torch.testing.assert_close(fast.grads[n], slow.grads[n], rtol=1e-3, atol=1e-3)


def test_cached_graphs_do_not_keep_a_model_alive():
    import gc
    import weakref

    for make in (_Branchy, lambda: simple_cnn(1)):
        model = make()
        ref = weakref.ref(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = build_graph_engine(model, F.cross_entropy, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
            model.eval()
            build_graph_engine(model, F.cross_entropy, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))  # traced again
        del model, engine
        gc.collect()
        assert ref() is None


@pytest.mark.parametrize("model_name", ["functional", "attention", "unet_small"])
def test_traced_chunks_do_not_grow_with_queries_and_never_sync(model_name):
    from benchmarks.cge_throughput import DispatchCounter

    make, shape, loss_fn = MODELS[model_name]
    torch.manual_seed(0)
    model = _eval_dropout(make().train())
    x, y = _data(shape, loss_fn, batch=2)
    params = dict(model.named_parameters())
    counts = {}
    for k in (1, 64):
        engine = build_graph_engine(model, loss_fn, x, y, max_batch=k)
        counts[k] = syncs = 0
        for name, p in params.items():
            index = torch.arange(k) % p.numel()
            engine.coordinate_losses(name, index, 1e-2)  # the first call fills the per-node caches
            with DispatchCounter() as counter:
                engine.coordinate_losses(name, index, 1e-2)
            counts[k], syncs = counts[k] + counter.ops, syncs + counter.syncs
        assert syncs == 0
    assert counts[64] <= 1.5 * counts[1], counts


class _IntervalResNet(nn.Module):
    """A small CIFAR-style residual network whose forward takes options the oracle never passes: a start block and
    whether to return the intermediate features as well (a branch on a default argument, which symbolic tracing
    cannot decide unless the argument is taken as the constant it defaults to)."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
            for _ in range(2))
        self.fc = nn.Linear(width, classes)

    def forward(self, x: Tensor, starting_id: int = 0, return_interval: bool = False) -> Tensor:
        h = self.stem(x) if starting_id == 0 else x
        interval = []
        for block in self.blocks[starting_id:]:
            h = F.relu(block(h) + h)
            interval.append(h)
        out = self.fc(h.mean((2, 3)))
        if return_interval:
            return out, interval
        return out


@pytest.mark.parametrize("train", [False, True])
def test_default_arguments_are_traced_as_constants(train):
    """A forward branching on an argument the oracle does not pass gets the traced-graph engine, and its losses
    equal the one-at-a-time loop's in float64."""
    torch.manual_seed(0)
    model = _IntervalResNet().double().train(train)
    x, y = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    graph = trace(model)
    assert [n.target for n in graph.nodes if n.kind == "constant"] == [0, False]
    params = dict(model.named_parameters())
    engine = build_graph_engine(model, F.cross_entropy, x, y, params)
    assert isinstance(engine, GraphEngine) and not isinstance(engine, StagedForward)
    gen = torch.Generator().manual_seed(2)
    for name in params:
        index = torch.randperm(params[name].numel(), generator=gen)[:3]
        got = engine.coordinate_losses(name, index, 1e-2)
        want = one_query_at_a_time(model, F.cross_entropy, x, y, name, index, 1e-2)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_a_failed_self_check_is_remembered_and_the_check_can_be_switched_off(monkeypatch):
    """The self-check's verdict is kept with the traced graph per input shape: a failure sends later batches of that
    shape straight to the fallback (no engine, no base forward), and ``self_check=False`` skips the check."""

    class HostRoundTrip(_HostRoundTrip):  # a type of its own: the warning comes once per model type
        pass

    model = HostRoundTrip()
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    with pytest.warns(UserWarning, match="failed in a query of"):
        assert build_graph_engine(model, F.cross_entropy, x, y) is None
    built = []
    init = GraphEngine.__init__
    monkeypatch.setattr(GraphEngine, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    assert build_graph_engine(model, F.cross_entropy, x + 1, y) is None  # the same shape: the verdict stands
    assert not built
    assert build_graph_engine(model, F.cross_entropy, torch.randn(3, 3, 8, 8), torch.randint(0, 10, (3,))) is None
    assert built  # another shape: checked afresh (and failed again)
    monkeypatch.undo()
    engine = build_graph_engine(model, F.cross_entropy, torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)),
                          self_check=False)
    assert isinstance(engine, GraphEngine)  # trusted unchecked


def test_batched_losses_weigh_ignored_targets_as_the_loss_does():
    """A chunk's cross-entropy comes from one per-example call; targets equal to ``ignore_index`` weigh 0 and the
    mean is over the others, as ``reduction="mean"`` takes it (no host read to find out)."""
    torch.manual_seed(0)
    model = _TokenMixer().double().eval()
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.tensor([1, -100, 3, -100, 0])
    engine = build_graph_engine(model, F.cross_entropy, x, y, self_check=False)
    assert engine.batched_losses
    index = torch.arange(4)
    want = one_query_at_a_time(model, F.cross_entropy, x, y, "head.weight", index, 1e-2)
    torch.testing.assert_close(engine.coordinate_losses("head.weight", index, 1e-2), want, rtol=1e-10, atol=1e-12)
