"""Oracles: batched K-point evaluation, BatchNorm semantics, precision, black-box callables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fp32_tolerance
from torch import nn

import dz_lightning as dz


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("max_batch", [None, 1, 3])
def test_batched_losses_equal_single_evaluations(train, max_batch):
    model = _bn_model().train(train)
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, max_batch=max_batch)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    varied = {"0.weight": params["0.weight"].detach() + 0.1 * torch.randn(7, 3, 2, 3, 3, generator=gen),
              "1.bias": params["1.bias"].detach() + 0.1 * torch.randn(7, 3, generator=gen)}
    stats = {n: b.clone() for n, b in model.named_buffers()}
    batched = oracle.losses(params, varied)
    single = torch.stack([oracle.loss({**params, **{n: v[i] for n, v in varied.items()}}) for i in range(7)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    assert oracle.queries == 14
    assert all(torch.equal(stats[n], b) for n, b in model.named_buffers()), "queries must not touch BN stats"
    # the train/eval semantics are those of the model's own forward
    with torch.no_grad():
        ref = F.cross_entropy(model(x), y)
    model.load_state_dict({**model.state_dict(), **stats})
    # an fp32 forward against the model's own (conv: 18 products per output, linear: 48), loss magnitude ~2
    torch.testing.assert_close(oracle.loss(params).float(), ref, **fp32_tolerance(terms=18 + 48, scale=2.0))


def test_coordinate_losses_match_explicit_perturbation():
    model = _bn_model()
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, max_batch=4)
    params = dict(model.named_parameters())
    index = torch.tensor([0, 5, 17, 53])
    got = oracle.coordinate_losses(params, "0.weight", index, 1e-2)
    for i, j in enumerate(index.tolist()):
        w = params["0.weight"].detach().clone()
        w.view(-1)[j] += 1e-2
        assert float(got[i]) == pytest.approx(float(oracle.loss({**params, "0.weight": w})), rel=1e-5)


def test_queries_run_in_full_precision_inside_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(4, 16), torch.randint(0, 3, (4,))
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y)
    params = dict(model.named_parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = oracle.loss(params)
    assert inside.dtype == torch.float64  # fp32 outputs, the loss taken in float64 (not bf16 from autocast)
    assert float(inside) == pytest.approx(float(oracle.loss(params)), abs=0)


def test_function_oracle_batched_and_unbatched_agree():
    def loss_one(p):
        return (p["w"] ** 2).sum() + p["b"].sum()

    def loss_batched(p):
        return (p["w"] ** 2).flatten(1).sum(1) + p["b"].flatten(1).sum(1)

    params = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    one, many = dz.FunctionOracle(loss_one), dz.FunctionOracle(loss_batched, batched=True, max_batch=2)
    e1, e2 = dz.cge(one, params), dz.cge(many, params)
    for n in params:
        torch.testing.assert_close(e1.grads[n], e2.grads[n])
    assert e1.queries == e2.queries == 9


def test_function_oracle_rejects_wrong_batch_length():
    oracle = dz.FunctionOracle(lambda p: torch.zeros(2), batched=True)
    with pytest.raises(ValueError, match="returned 2 losses for a batch of 3 points"):
        oracle.losses({"w": torch.zeros(1)}, {"w": torch.zeros(3, 1)})


def test_function_oracle_trains_through_a_numpy_black_box():
    """A NumPy-only logistic-regression loss: nothing torch can differentiate."""
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(200, 3))
    w_true = np.array([1.5, -2.0, 0.5])
    ys = (xs @ w_true > 0).astype(np.float64)

    def numpy_loss(p: dict[str, torch.Tensor]) -> float:
        w = p["w"].numpy().astype(np.float64)
        z = xs @ w
        return float(np.mean(np.logaddexp(0.0, z) - ys * z))

    w = torch.zeros(3, dtype=torch.float64)
    oracle = dz.FunctionOracle(numpy_loss)
    first = numpy_loss({"w": w})
    for _ in range(200):
        est = dz.cge(oracle, {"w": w}, mu=1e-4)
        w = w - 1.0 * est.grads["w"]
    assert numpy_loss({"w": w}) < 0.5 * first
    acc = np.mean(((xs @ w.numpy()) > 0) == ys)
    assert acc > 0.95
    assert oracle.queries == 200 * 4


def test_module_oracle_type_errors():
    with pytest.raises(TypeError, match="`model` to be an nn.Module.*function"):
        dz.ModuleOracle(lambda x: x, F.cross_entropy, torch.zeros(1), torch.zeros(1))
    with pytest.raises(TypeError, match="`fn` to be callable.*int"):
        dz.FunctionOracle(3)
    with pytest.raises(ValueError, match="`max_batch`.*0"):
        dz.FunctionOracle(lambda p: 0.0, max_batch=0)


def _rosenbrock(x: np.ndarray) -> np.ndarray:
    """Rosenbrock's function over the last axis, in float64 (loss ~1e2 at the test point)."""
    return (100.0 * (x[..., 1:] - x[..., :-1] ** 2) ** 2 + (1.0 - x[..., :-1]) ** 2).sum(-1)


def _rosenbrock_grad(x: np.ndarray) -> np.ndarray:
    g = np.zeros_like(x)
    g[:-1] = -400.0 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * (x[1:] - x[:-1] ** 2)
    return g


@pytest.mark.parametrize(
    "kind", ["python_float", "numpy_float64", "batched_numpy", "batched_list"],
)
@pytest.mark.parametrize("estimator", ["cge", "rge"])
def test_float64_black_box_keeps_float64_finite_differences(kind, estimator):
    """A float64 simulator gets float64 differences: CGE at mu 1e-7 has ~1e-7 relative error, not ~0.2."""
    x = np.array([-1.2, 1.0, 0.3, -0.5, 0.8])
    if kind == "python_float":
        oracle = dz.FunctionOracle(lambda p: float(_rosenbrock(p["x"].numpy())))
    elif kind == "numpy_float64":
        oracle = dz.FunctionOracle(lambda p: _rosenbrock(p["x"].numpy()))  # a 0-d float64 array / np.float64
    elif kind == "batched_numpy":
        oracle = dz.FunctionOracle(lambda p: _rosenbrock(p["x"].numpy()), batched=True)
    else:
        oracle = dz.FunctionOracle(lambda p: [float(v) for v in _rosenbrock(p["x"].numpy())], batched=True)
    params = {"x": torch.tensor(x, dtype=torch.float64)}
    assert oracle.loss(params).dtype == torch.float64
    assert oracle.losses(params, {"x": params["x"].unsqueeze(0).repeat(3, 1)}).dtype == torch.float64
    true = _rosenbrock_grad(x)
    if estimator == "cge":
        est = dz.cge(oracle, params, mu=1e-7)
    else:  # q = d orthonormal-free check: RGE with central differences recovers u.g for each direction
        gen = torch.Generator().manual_seed(0)
        est = dz.rge(oracle, params, q=4096, mu=1e-7, distribution="gaussian", generator=gen, difference="central",
                     chunk=4096)
        same = {torch.device("cpu"): torch.Generator().manual_seed(0)}  # the generator rge drew its directions with
        dirs = dz.estimators._directions(params, None, 4096, "gaussian", same)["x"]
        true = (dirs.numpy().T @ (dirs.numpy() @ true)) / 4096  # the same directions, exact directional slopes
    assert est.grads["x"].dtype == torch.float64
    rel = np.linalg.norm(est.grads["x"].numpy() - true) / np.linalg.norm(true)
    assert rel < 2e-6, rel


def test_loss_dtype_of_the_black_box_is_kept():
    params = {"w": torch.zeros(2)}
    assert dz.FunctionOracle(lambda p: 1.5).loss(params).dtype == torch.float64
    assert dz.FunctionOracle(lambda p: np.float32(1.5)).loss(params).dtype == torch.float32
    assert dz.FunctionOracle(lambda p: 3).loss(params).dtype == torch.float64
    assert dz.FunctionOracle(lambda p: torch.tensor(1.5)).loss(params).dtype == torch.float32
    with pytest.raises(TypeError, match="must be a float or a 0-d tensor.*str"):
        dz.FunctionOracle(lambda p: "1.5").loss(params)
    with pytest.raises(TypeError, match="must return K losses"):
        dz.FunctionOracle(lambda p: ["a", "b"], batched=True).losses(params, {"w": torch.zeros(2, 2)})


def test_wrappers_are_oracles_that_count_what_the_wrapped_oracle_spent():
    """A restricted oracle is an Oracle; its queries are the evaluations it caused, whatever the call."""
    from dz_lightning.sparsity import RestrictedOracle

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    oracle = dz.ModuleOracle(model, F.cross_entropy, torch.randn(5, 3), torch.randint(0, 2, (5,)))
    params = {n: p.detach() for n, p in model.named_parameters()}
    restricted = RestrictedOracle(oracle, params)
    assert isinstance(restricted, dz.Oracle) and isinstance(restricted, dz.oracle_base.DelegatingOracle)
    sub = {"2.weight": params["2.weight"]}
    assert torch.equal(restricted.loss(sub), oracle.loss(params))
    stacked = sub["2.weight"] + 0.1 * torch.randn(3, 2, 4)
    torch.testing.assert_close(restricted.losses(sub, {"2.weight": stacked}),
                               oracle.losses(params, {"2.weight": stacked}), rtol=0, atol=0)
    assert restricted.queries == 1 + 3 and oracle.queries == 2 * (1 + 3)
    est = dz.cge(restricted, sub)  # its coordinates reach the wrapped oracle's own coordinate path
    assert est.queries == 1 + 8 and restricted.queries == 4 + 9 and oracle.queries == 8 + 9
    torch.testing.assert_close(est.grads["2.weight"], dz.cge(oracle, params).grads["2.weight"])


def test_vmap_points_with_per_point_inputs_equals_a_loop():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = {n: p.detach() for n, p in model.named_parameters()}
    stacked = params["0.bias"] + 0.1 * torch.randn(3, 4)
    inputs = torch.randn(3, 5, 3)
    batched = dz.fallback.vmap_points(model, params, {"0.bias": stacked}, inputs, per_point_inputs=True)
    loop = torch.stack([torch.func.functional_call(model, {**params, "0.bias": stacked[k]}, (inputs[k],))
                        for k in range(3)])
    torch.testing.assert_close(batched, loop)
    shared = dz.fallback.vmap_points(model, params, {"0.bias": stacked}, inputs[0], then=lambda out: out.sum())
    torch.testing.assert_close(shared, loop.new_tensor([
        float(torch.func.functional_call(model, {**params, "0.bias": stacked[k]}, (inputs[0],)).sum())
        for k in range(3)]))


class _InPlaceResidual(nn.Module):
    """``out += identity`` as in torchvision's ResNets: the written tensor may not vary while the other does."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        identity = self.a(x)
        out = self.b(x)
        out += identity
        return self.c(out)


@pytest.mark.parametrize("name", ["a.weight", "b.weight", "c.bias"])
def test_batched_points_through_an_in_place_residual_add_equal_one_at_a_time(name):
    torch.manual_seed(0)
    model, x, y = _InPlaceResidual(), torch.randn(5, 4), torch.randint(0, 3, (5,))
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False)
    p = dict(model.named_parameters())[name].detach()
    points = p + 0.1 * torch.randn(3, *p.shape)
    batched = oracle.losses({name: p}, {name: points})
    for _ in range(2):  # the second call starts with per-point inputs for this model
        torch.testing.assert_close(oracle.losses({name: p}, {name: points}), batched)
    loop = torch.stack([oracle.loss({name: q}) for q in points])
    # three 4-input linear layers in fp32, rounded differently in a batch; losses near 1
    torch.testing.assert_close(batched.to(loop.dtype), loop, **fp32_tolerance(terms=3 * 4, scale=1.0))


# ------------------------------------------------------------------------------- black boxes contained (issue 28)
def _quadratic(w: np.ndarray) -> np.ndarray:
    """``sum((w - 0.3)^2)`` over the last axis, in float64."""
    return ((w.astype(np.float64) - 0.3) ** 2).sum(-1)


@pytest.mark.parametrize("estimator", ["cge", "rge"])
@pytest.mark.parametrize("batched", [False, True], ids=["one", "batched"])
def test_black_box_that_changes_its_arguments_changes_neither_the_params_nor_the_estimate(estimator, batched):
    def meddling(p):
        a = p["w"].numpy()
        a *= 1.0001  # in place, on what the box was given
        p["b"].numpy()[...] = 7.0
        return _quadratic(a.reshape(len(a), -1) if batched else a)

    def polite(p):
        return _quadratic(1.0001 * (p["w"].numpy().reshape(len(p["w"]), -1) if batched else p["w"].numpy()))

    w0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    params = {"w": w0.clone(), "b": torch.zeros(2, dtype=torch.float64)}
    run = dz.cge if estimator == "cge" else (lambda o, p: dz.rge(o, p, q=4, generator=torch.Generator().manual_seed(0)))
    got = run(dz.FunctionOracle(meddling, batched=batched), params)
    assert torch.equal(params["w"], w0) and torch.equal(params["b"], torch.zeros(2, dtype=torch.float64))
    want = run(dz.FunctionOracle(polite, batched=batched), {"w": w0.clone(), "b": torch.zeros(2, dtype=torch.float64)})
    torch.testing.assert_close(got.grads["w"], want.grads["w"], rtol=0, atol=0)
    assert got.loss == want.loss


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, np.float16], ids=["fp16", "bf16", "numpy_fp16"])
def test_low_precision_losses_are_refused(dtype):
    params = {"w": torch.zeros(3)}

    def box(p):
        value = float((p["w"] ** 2).sum()) + 1.0
        return np.float16(value) if dtype is np.float16 else torch.tensor(value, dtype=dtype)

    name = "float16" if dtype is np.float16 else str(dtype).removeprefix("torch.")
    with pytest.raises(TypeError, match=f"FunctionOracle is torch.{name}.*Compute and return the loss in float32"):
        dz.cge(dz.FunctionOracle(box), params)
    many = dz.FunctionOracle(lambda p: torch.ones(len(p["w"]), dtype=torch.float16), batched=True)
    with pytest.raises(TypeError, match="float16.*float32 or float64"):
        many.losses(params, {"w": torch.zeros(4, 3)})


def test_a_failing_black_box_keeps_its_error_and_names_the_query():
    def box(p):
        if float(p["w"][4]) != 0.0:
            raise ArithmeticError("simulator diverged")
        return float(p["w"].sum())

    with pytest.raises(ArithmeticError, match="simulator diverged") as exc:  # the type and message are kept
        dz.cge(dz.FunctionOracle(box, max_batch=3), {"w": torch.zeros(8)}, mu=0.01)
    notes = "\n".join(getattr(exc.value, "__notes__", []))
    if hasattr(exc.value, "add_note"):  # Python 3.11+
        assert "point 1 (0-based) of a call with 3 points" in notes
        assert "coordinate coords[i] of 'w' by +0.01, with coords = [3, 4, 5]" in notes

    def base_fails(p):
        raise ConnectionError("service down")

    with pytest.raises(ConnectionError) as exc:
        dz.cge(dz.FunctionOracle(base_fails), {"w": torch.zeros(2)})
    if hasattr(exc.value, "add_note"):
        assert "the unperturbed parameters" in "\n".join(exc.value.__notes__)


def test_a_batched_black_box_that_returns_one_loss_too_few_is_named():
    box = dz.FunctionOracle(lambda p: _quadratic(p["w"].numpy())[:-1], batched=True)
    with pytest.raises(ValueError, match=r"returned 0 losses for a batch of 1 point; a batched `fn` returns one "
                                         r"loss per point, shape \(K,\)"):
        dz.cge(box, {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="returned 2 losses for a batch of 3 points"):
        box.losses({"w": torch.zeros(3)}, {"w": torch.zeros(3, 3)})


def test_a_hung_black_box_times_out_naming_the_query_and_a_flaky_one_is_retried():
    import threading

    release = threading.Event()
    calls = []

    def box(p):
        calls.append(1)
        if len(calls) == 3:  # the third query hangs (a simulator that never answers)
            release.wait(10)
        return float(p["w"].sum())

    oracle = dz.FunctionOracle(box, timeout=0.2)
    try:
        with pytest.raises(TimeoutError, match=r"did not answer within timeout=0.2 s") as exc:
            dz.cge(oracle, {"w": torch.zeros(4)}, mu=0.01)  # was: waits forever (no timeout existed)
    finally:
        release.set()
    if hasattr(exc.value, "add_note"):
        assert "point 1 (0-based) of a call with 4 points" in "\n".join(exc.value.__notes__)

    calls.clear()

    def service(p):
        calls.append(1)
        if len(calls) == 2:  # the second call fails once
            raise ConnectionError("service down")
        return float(p["w"].sum())

    flaky = dz.FunctionOracle(service, retries=1)
    with pytest.warns(RuntimeWarning, match=r"attempt 1 of 2 failed \(ConnectionError: service down\); retrying"):
        est = dz.cge(flaky, {"w": torch.zeros(3)}, mu=0.5)
    torch.testing.assert_close(est.grads["w"], torch.ones(3))
    assert flaky.failed_attempts == 1 and est.queries == 4


@pytest.mark.parametrize(("kwargs", "match"), [({"timeout": 0}, "`timeout`.*> 0 or None.*0"),
                                               ({"timeout": float("inf")}, "`timeout`.*inf"),
                                               ({"retries": -1}, "`retries`.*>= 0.*-1")])
def test_function_oracle_timeout_and_retries_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dz.FunctionOracle(lambda p: 0.0, **kwargs)


def test_the_feature_reuse_engine_is_built_on_the_first_coordinate_query_only(monkeypatch):
    """A plain loss, K points, RGE and ZO-GraSP's estimates never build the engine; CGE builds it once per parameter
    set, at its base point (``coordinate_base_loss``), and its differences equal the plain forwards'."""
    from dz_lightning import reuse
    from dz_lightning.models import simple_cnn
    from dz_lightning.sparsity import zo_grasp_scores

    torch.manual_seed(0)
    model = simple_cnn(depth=2, channels=4).eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    built = []
    build = reuse.build_graph_engine
    monkeypatch.setattr(reuse, "build_graph_engine", lambda *a, **k: built.append(1) or build(*a, **k))
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y)
    params = dict(model.named_parameters())
    oracle.loss(params)
    dz.rge(oracle, params, q=3)
    zo_grasp_scores(oracle, params, [n for n, p in params.items() if p.dim() > 1], q=2)
    assert not built
    est = dz.cge(oracle, params, masks={n: torch.rand(p.shape) < 0.1 for n, p in params.items()})
    again = dz.cge(oracle, params, masks={n: torch.rand(p.shape) < 0.1 for n, p in params.items()})
    assert len(built) == 1 and est.loss == again.loss
    reference = dz.ModuleOracle(model, F.cross_entropy, x, y, feature_reuse=False)
    name = next(iter(params))
    index = torch.arange(5)
    got = oracle.coordinate_losses(params, name, index, 1e-2) - oracle.coordinate_base_loss(params)
    want = reference.coordinate_losses(params, name, index, 1e-2) - reference.loss(params)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
