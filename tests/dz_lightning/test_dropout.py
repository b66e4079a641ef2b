"""Train-mode dropout under common random numbers: every query of an oracle sees the base point's masks, so feature
reuse stays on and a finite difference measures the parameters, not the masks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dz_lightning as dz
from dz_lightning.models import tv_mobilenet_v3_small
from dz_lightning.query import common_random_numbers
from dz_lightning.reuse import GraphEngine, StagedForward


class _DropoutNet(nn.Module):
    """Dropout after a convolution (a one-channel change meets it), a channel dropout, and one before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.drop2d = nn.Dropout2d(0.25)
        self.head_drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(torch.tanh(self.conv(x)))
        h = self.drop2d(F.relu(self.conv2(h)))
        return self.fc(self.head_drop(h.flatten(1)))


def _loop(model: nn.Module, loss_fn, x, y, seed: int, name: str, index: Tensor, delta: float) -> Tensor:
    """One full forward per coordinate, each from the same generator state (the same masks), in the model's dtype."""
    full = dz.ModuleOracle(model, loss_fn, x, y, feature_reuse=False, dropout_seed=seed)
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = []
    for i in index.tolist():
        w = params[name].clone()
        w.view(-1)[i] += delta
        out.append(full.loss({**params, name: w}))
    return torch.stack(out)


@pytest.mark.parametrize("model_name", ["dropout_net", "tv_mobilenet_v3_small"])
def test_train_mode_dropout_keeps_the_traced_engine_and_equals_the_loop(model_name):
    """float64: the engine's coordinate losses equal full forwards under the same masks, to rounding."""
    torch.manual_seed(0)
    if model_name == "dropout_net":
        model, x = _DropoutNet(), torch.randn(3, 3, 6, 6)
    else:
        model, x = tv_mobilenet_v3_small(), torch.randn(3, 3, 32, 32)
    model, x, y = model.double().train(), x.double(), torch.randint(0, 5, (3,))
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, dropout_seed=1234)
    params = {n: p.detach() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning, no dropout warning
        base = oracle.coordinate_base_loss(params)  # CGE's base point: the engine's base forward
    engine = oracle._engine
    assert isinstance(engine, GraphEngine) and not isinstance(engine, StagedForward)
    assert any(rule == "dropout_rule" for n in params for _, rule in engine.rules(n))
    torch.testing.assert_close(base, _loop(model, F.cross_entropy, x, y, 1234, next(iter(params)), torch.tensor([0]),
                                           0.0)[0], rtol=1e-12, atol=1e-12)
    gen = torch.Generator().manual_seed(2)
    names = list(params)
    for name in (names if model_name == "dropout_net" else [names[0], names[len(names) // 2], names[-1]]):
        index = torch.randperm(params[name].numel(), generator=gen)[:4]
        got = oracle.coordinate_losses(params, name, index, 1e-2)
        want = _loop(model, F.cross_entropy, x, y, 1234, name, index, 1e-2)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_each_oracle_draws_its_masks_once_and_restores_the_generator():
    torch.manual_seed(0)
    model, x, y = _DropoutNet().train(), torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    a = dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False)
    state = torch.get_rng_state()
    first = a.loss(params)
    assert torch.equal(torch.get_rng_state(), state)  # queries leave the global generator where it was
    assert torch.equal(a.loss(params), first)  # the same masks on every query of one oracle
    b = dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False)
    assert b.dropout_seed != a.dropout_seed and not torch.equal(b.loss(params), first)  # the next step: new masks
    # eval mode (or no dropout): no seed, no generator touched
    state = torch.get_rng_state()
    assert dz.ModuleOracle(model.eval(), F.cross_entropy, x, y).dropout_seed is None
    assert torch.equal(torch.get_rng_state(), state)


def test_batched_points_see_the_base_masks():
    torch.manual_seed(0)
    model, x, y = _DropoutNet().train(), torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False, dropout_seed=7)
    stacked = params["fc.weight"] + 0.1 * torch.randn(3, *params["fc.weight"].shape)
    batched = oracle.losses(params, {"fc.weight": stacked})
    one_by_one = torch.stack([oracle.loss({**params, "fc.weight": w}) for w in stacked])
    # fp32, rounded differently in a batch: 36 + 36 + 144 products on the longest path, losses near 2
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=2e-5)


def test_cge_under_common_masks_is_the_gradient_at_those_masks():
    """float64: for each draw, CGE equals autograd's gradient of the loss with the same masks fixed; averaged over
    draws, the estimate is the gradient of the expected loss that plain dropout training follows."""
    torch.manual_seed(0)
    model, x, y = _DropoutNet().double().train(), torch.randn(4, 3, 6, 6).double(), torch.randint(0, 5, (4,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    mean_cge = {n: torch.zeros_like(p) for n, p in params.items()}
    mean_fo = {n: torch.zeros_like(p) for n, p in params.items()}
    draws = 3
    for seed in range(draws):
        est = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y, dropout_seed=seed), params, mu=1e-6,
                     difference="central")
        model.zero_grad()
        with common_random_numbers(seed, x.device):
            F.cross_entropy(model(x), y).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(est.grads[n], p.grad, rtol=1e-5, atol=1e-7)
            mean_cge[n] += est.grads[n] / draws
            mean_fo[n] += p.grad / draws
    for n in params:
        torch.testing.assert_close(mean_cge[n], mean_fo[n], rtol=1e-5, atol=1e-7)


def _assert_cge_is_the_gradient_at_the_masks(model: nn.Module, x: Tensor, y: Tensor, **oracle_options) -> None:
    """float64: central CGE through a ``ModuleOracle(**oracle_options)`` equals autograd's gradient of the loss with
    the masks of its ``dropout_seed`` fixed."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    est = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y, **oracle_options), params, mu=1e-6,
                 difference="central")
    model.zero_grad()
    with common_random_numbers(oracle_options["dropout_seed"], x.device):
        F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(est.grads[n], p.grad, rtol=1e-5, atol=1e-7)


class _FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.5, self.training))


@pytest.mark.filterwarnings("ignore:.*full forward for every query")
def test_functional_dropout_shares_masks_with_an_explicit_seed():
    """``F.dropout`` is no module: no seed is drawn for it, but an explicit one makes every query share the masks
    (the engine's self-check sees its generic rule redraw them and falls back to full forwards)."""
    torch.manual_seed(0)
    model, x, y = _FunctionalDropout().double().train(), torch.randn(4, 5).double(), torch.randint(0, 3, (4,))
    assert dz.ModuleOracle(model, F.cross_entropy, x, y).dropout_seed is None
    _assert_cge_is_the_gradient_at_the_masks(model, x, y, dropout_seed=3)


class _UntraceableDropout(nn.Module):
    """fx cannot trace it (a branch on the input), vmap can run it: the full-forward fallback with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x)) if x.mean() > -100 else self.a(x)
        return self.b(self.drop(h))


@pytest.mark.filterwarnings("ignore:.*full forward for every query", "ignore:.*full forwards use")
@pytest.mark.parametrize("fallback", ["auto", "first_working", "vmap", "loop"])  # per-point inputs: the branch fails
def test_every_fallback_strategy_shares_the_masks(fallback):
    """float64: CGE through each full-forward strategy (trials included) is the gradient at the base point's masks."""
    torch.manual_seed(0)
    model, x, y = _UntraceableDropout().double().train(), torch.randn(4, 5).double(), torch.randint(0, 3, (4,))
    _assert_cge_is_the_gradient_at_the_masks(model, x, y, dropout_seed=11, fallback=fallback, max_batch=16)


@pytest.mark.filterwarnings("ignore:.*full forwards use")
@pytest.mark.parametrize("fallback", ["vmap", "vmap_per_point", "loop"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_one_point_batched_equals_the_base_loss_in_any_layout(fallback, layout):
    """A plain forward, a vmap call and the engine draw their masks alike (native dropout would fill a channels-last
    activation's mask in memory order, and vmap's contiguously)."""
    torch.manual_seed(0)
    model, x = _DropoutNet().train(), torch.randn(4, 3, 6, 6).contiguous(memory_format=layout)
    model = model.to(memory_format=layout)
    y = torch.randint(0, 5, (4,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, dropout_seed=7, fallback=fallback)
    base = oracle.loss(params)
    torch.testing.assert_close(oracle.losses(params, {"fc.bias": params["fc.bias"][None]})[0], base,
                               rtol=1e-5, atol=1e-6)
    engine = dz.ModuleOracle(model, F.cross_entropy, x, y, dropout_seed=7)
    zero = engine.coordinate_losses(params, "conv.weight", torch.tensor([0]), 0.0)[0]
    torch.testing.assert_close(zero, base, rtol=1e-5, atol=1e-6)


def test_a_zo_module_draws_the_step_masks_from_its_checkpointed_generator():
    """The seed of each step's masks comes from the module's direction generator, which checkpoints carry: a resumed
    run draws the masks the uninterrupted one would have (PyTorch's global generator is not in checkpoints)."""
    from dz_lightning.tasks.classification import ZOClassifier

    def module() -> ZOClassifier:
        return ZOClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Dropout(0.5), nn.Linear(8, 10)), seed=3)

    batch = (torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    first = module()
    first.make_oracle(batch)
    checkpoint: dict = {}
    first.on_save_checkpoint(checkpoint)
    expected = [first.make_oracle(batch).dropout_seed for _ in range(2)]
    resumed = module()
    resumed.on_load_checkpoint(checkpoint)
    torch.manual_seed(123)  # the global generator plays no part
    assert [resumed.make_oracle(batch).dropout_seed for _ in range(2)] == expected
    assert expected[0] != expected[1]  # a new draw every step
