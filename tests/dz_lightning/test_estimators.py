"""CGE and RGE against autograd, query counts, masks, determinism and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dz_lightning as dz
from dz_lightning.models import MLP
from dz_lightning.query import memory_budget


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def _autograd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))
    return dict(zip(params, grads, strict=True))


def _small_convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4))


@pytest.mark.parametrize(
    ("make_model", "x_shape"),
    [(lambda: MLP(6, (5,), 3, activation="tanh"), (7, 6)), (_small_convnet, (5, 1, 4, 4))],
    ids=["mlp_tanh", "convnet"],
)
def test_cge_matches_autograd_in_float64(make_model, x_shape):
    torch.manual_seed(0)
    model = make_model().double()
    x = torch.randn(*x_shape, dtype=torch.float64)
    y = torch.randint(0, 3, (x_shape[0],))
    params = dict(model.named_parameters())
    est = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y), params, mu=1e-7)
    ref = _flat(_autograd(model, x, y))
    got = _flat(est.grads)
    assert F.cosine_similarity(got, ref, dim=0) >= 0.9999
    assert (got - ref).norm() / ref.norm() < 1e-4
    assert est.queries == sum(p.numel() for p in params.values()) + 1
    assert est.loss == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)


def test_masked_cge_zero_outside_mask_and_exact_query_count():
    torch.manual_seed(1)
    model = MLP(4, (3,), 2)
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    masks = {"1.weight": torch.rand(3, 4, generator=gen) < 0.5}
    est = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y), params, masks=masks)
    assert torch.all(est.grads["1.weight"][~masks["1.weight"]] == 0)
    n_dense = sum(p.numel() for n, p in params.items() if n != "1.weight")
    assert est.queries == int(masks["1.weight"].sum()) + n_dense + 1
    central = dz.cge(dz.ModuleOracle(model, F.cross_entropy, x, y), params, masks=masks, difference="central")
    assert central.queries == 2 * (int(masks["1.weight"].sum()) + n_dense) + 1


def test_central_differences_beat_forward_on_a_quadratic():
    a = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)
    oracle = dz.FunctionOracle(lambda p: ((p["w"] - a) ** 2).sum() * 2.0 + (p["w"] ** 3).sum())
    w = torch.tensor([0.2, 0.4, -0.3], dtype=torch.float64)
    true = 4.0 * (w - a) + 3 * w**2
    fwd = dz.cge(oracle, {"w": w}, mu=1e-2).grads["w"]
    ctr = dz.cge(oracle, {"w": w}, mu=1e-2, difference="central").grads["w"]
    assert (ctr - true).abs().max() < (fwd - true).abs().max() / 10


@pytest.mark.parametrize("distribution", ["gaussian", "sphere"])
def test_rge_mean_approaches_true_gradient(distribution):
    torch.manual_seed(2)
    model = MLP(5, (4,), 3, activation="tanh").double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    est = dz.rge(dz.ModuleOracle(model, F.cross_entropy, x, y), params, q=20000, mu=1e-5,
                 distribution=distribution, difference="central", generator=gen, chunk=4096)
    ref = _flat(_autograd(model, x, y))
    assert F.cosine_similarity(_flat(est.grads), ref, dim=0) >= 0.95
    # the scale is right too (sphere directions carry the factor d)
    assert _flat(est.grads).norm() / ref.norm() == pytest.approx(1.0, rel=0.15)
    assert est.queries == 2 * 20000 + 1


def test_rge_and_the_module_default_to_the_same_directions():
    import inspect

    rge_default = inspect.signature(dz.rge).parameters["distribution"].default
    assert rge_default == inspect.signature(dz.ZOModule).parameters["distribution"].default == "sphere"


def test_rge_same_seed_same_estimate():
    torch.manual_seed(3)
    model = MLP(4, (3,), 2)
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    params = dict(model.named_parameters())

    def run(**kw):
        return dz.rge(dz.ModuleOracle(model, F.cross_entropy, x, y), params, q=10,
                      generator=torch.Generator().manual_seed(7), chunk=4, **kw)

    a, b = run(), run()
    assert all(torch.equal(a.grads[n], b.grads[n]) for n in params)


def test_estimators_leave_params_bit_for_bit_unchanged():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = dict(model.named_parameters())
    for fn in (lambda o: dz.cge(o, params), lambda o: dz.cge(o, params, difference="central"),
               lambda o: dz.rge(o, params, q=8, generator=torch.Generator().manual_seed(0))):
        fn(dz.ModuleOracle(model, F.cross_entropy, x, y))
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
        assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mu": 0.0}, "`mu`.*finite number > 0.*0.0"),
        ({"mu": -1e-3}, "`mu`.*-0.001"),
        ({"difference": "backward"}, "`difference`.*'forward', 'central'.*'backward'"),
        ({"masks": {"nope": torch.ones(2, dtype=torch.bool)}}, "`masks` names 'nope'.*valid names"),
        ({"masks": {"w": torch.ones(2, dtype=torch.bool)}}, r"`masks\['w'\]` has shape \(2,\).*\(3,\)"),
    ],
)
def test_cge_bad_input(kwargs, match):
    oracle = dz.FunctionOracle(lambda p: p["w"].sum())
    with pytest.raises(ValueError, match=match):
        dz.cge(oracle, {"w": torch.zeros(3)}, **kwargs)


def test_mask_of_wrong_dtype_is_a_type_error():
    with pytest.raises(TypeError, match="bool Tensor"):
        dz.cge(dz.FunctionOracle(lambda p: p["w"].sum()), {"w": torch.zeros(3)}, masks={"w": torch.ones(3)})


@pytest.mark.parametrize(("q", "match"), [(0, "`q`.*>= 1.*0"), (2.5, "`q`.*2.5")])
def test_rge_bad_q(q, match):
    with pytest.raises(ValueError, match=match):
        dz.rge(dz.FunctionOracle(lambda p: p["w"].sum()), {"w": torch.zeros(3)}, q=q)


def test_non_finite_base_loss_raises():
    oracle = dz.FunctionOracle(lambda p: float("nan"))
    with pytest.raises(dz.NonFiniteLossError, match="non-finite loss.*unperturbed"):
        dz.cge(oracle, {"w": torch.zeros(3)})


def test_non_finite_perturbed_loss_raises_or_is_skipped():
    # the loss blows up when w[1] moves: that coordinate is unusable
    def fn(p):
        return float("inf") if p["w"][1] != 0 else float(p["w"].sum())

    with pytest.raises(dz.NonFiniteLossError, match="1 non-finite.*'w'.*position 1"):
        dz.cge(dz.FunctionOracle(fn), {"w": torch.zeros(3)})
    with pytest.warns(RuntimeWarning, match="Skipped 1 non-finite"):
        est = dz.cge(dz.FunctionOracle(fn), {"w": torch.zeros(3)}, nonfinite="skip")
    assert torch.isfinite(est.grads["w"]).all() and est.grads["w"][1] == 0 and est.skipped == 1


def test_non_scalar_loss_is_rejected():
    oracle = dz.FunctionOracle(lambda p: p["w"] * 2)
    with pytest.raises(ValueError, match=r"must be a scalar.*shape \(3,\)"):
        dz.cge(oracle, {"w": torch.zeros(3)})
    with pytest.raises(TypeError, match="float or a 0-d tensor.*str"):
        dz.cge(dz.FunctionOracle(lambda p: "one"), {"w": torch.zeros(3)})


def test_directions_are_drawn_with_a_generator_on_the_parameters_device():
    gen = torch.Generator().manual_seed(0)
    assert dz.estimators.device_generator(gen, torch.device("cpu")) is gen  # CPU results as before
    assert dz.estimators.device_generator(None, torch.device("cpu")) is None
    params = {"w": torch.zeros(3, 4)}
    seen = []

    def fn(p):
        seen.append(p["w"].device)
        return float(p["w"].sum())

    est = dz.rge(dz.FunctionOracle(fn), params, q=5, distribution="gaussian",
                 generator=torch.Generator().manual_seed(1))
    ref = torch.randn((5, 3, 4), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(est.grads["w"], (ref * ref.sum((1, 2), keepdim=True)).mean(0), rtol=1e-4, atol=1e-4)
    assert seen and all(d.type == "cpu" for d in seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_directions_derive_from_the_cpu_generator_and_replay_exactly():
    params = {"w": torch.zeros(3, 4, device="cuda")}
    oracle = dz.FunctionOracle(lambda p: p["w"].sum())

    def run():
        gen = torch.Generator().manual_seed(1)
        derived = dz.estimators.device_generator(gen, torch.device("cuda"))
        assert derived.device.type == "cuda"
        return dz.rge(oracle, params, q=5, generator=torch.Generator().manual_seed(1)).grads["w"]

    a, b = run(), run()
    assert a.device.type == "cuda" and torch.equal(a, b)


# ---------------------------------------------------------------------- memory_budget bounds RGE (issue 28)
def _spied(oracle):
    """``oracle`` wrapped so that the number of points of every ``losses`` call is recorded in ``.calls``."""
    from dz_lightning.oracle_base import DelegatingOracle

    class Spy(DelegatingOracle):
        def __init__(self, inner):
            super().__init__(inner)
            self.calls: list[int] = []

        def _delegate_losses(self, params, varied):
            self.calls.append(next(iter(varied.values())).shape[0])
            return super()._delegate_losses(params, varied)

    return Spy(oracle)


@pytest.mark.parametrize("difference", ["forward", "central"])
@pytest.mark.parametrize("budget", [1, 2**20, 8 * 2**20, None], ids=["1B", "1MiB", "8MiB", "default"])
def test_rge_direction_chunks_follow_the_memory_budget_on_a_wide_mlp(budget, difference):
    torch.manual_seed(0)
    model = MLP(64, (512, 512), 10)  # 300k weights: 1.2 MB per parameter-sized copy
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    oracle = _spied(dz.ModuleOracle(model, F.cross_entropy, x, y, memory_budget=budget))
    params = dict(model.named_parameters())
    copy_bytes = sum(p.numel() * p.element_size() for p in params.values())
    est = dz.rge(oracle, params, q=24, difference=difference, generator=torch.Generator().manual_seed(0))
    copies = 4 if difference == "forward" else 6
    per_call = max(oracle.calls)
    assert sum(oracle.calls) == 24 * (1 if difference == "forward" else 2) and est.queries == sum(oracle.calls) + 1
    allowed = memory_budget(torch.device("cpu"), budget) // (copies * copy_bytes)
    assert per_call == min(24, max(1, allowed))  # was 24 (one chunk of up to 64) whatever the budget
    if per_call > 1:
        assert per_call * copies * copy_bytes <= memory_budget(torch.device("cpu"), budget)


def test_zo_grasp_rge_direction_chunks_follow_the_memory_budget():
    from dz_lightning.sparsity import zo_grasp_scores

    torch.manual_seed(0)
    model = MLP(64, (512, 512), 10)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    names = ["1.weight", "3.weight"]
    copy_bytes = sum(dict(model.named_parameters())[n].numel() * 4 for n in names)
    for budget, want in ((2**20, 1), (5 * 5 * copy_bytes, 5), (None, 16)):
        oracle = _spied(dz.ModuleOracle(model, F.cross_entropy, x, y, memory_budget=budget))
        zo_grasp_scores(oracle, dict(model.named_parameters()), names, q=16, generator=torch.Generator().manual_seed(0))
        assert max(oracle.calls) == want, (budget, oracle.calls)


def test_finite_losses_whose_differences_overflow_float32_are_named_as_such():
    oracle = dz.FunctionOracle(lambda p: 1e301 * (1.0 + float(p["w"].double().sum())))  # finite float64 losses
    params = {"w": torch.zeros(3)}
    with pytest.raises(dz.NonFiniteLossError, match=r"finite but overflow the parameters' dtype .*1e\+301, beyond "
                                                   r"3.4e\+38.*Scale the loss down"):
        dz.cge(oracle, params)  # was: "The oracle returned 3 non-finite loss(es)"
    with pytest.raises(dz.NonFiniteLossError, match="finite but overflow"):
        dz.rge(oracle, params, q=4, generator=torch.Generator().manual_seed(0))  # was: an infinite gradient, no error
    wide = {"w": torch.zeros(3, dtype=torch.float64)}
    est = dz.cge(dz.FunctionOracle(lambda p: 1e301 * float(p["w"].sum())), wide)
    torch.testing.assert_close(est.grads["w"], torch.full((3,), 1e301, dtype=torch.float64))  # float64 holds them
