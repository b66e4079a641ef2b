"""Settings that used to waste every query or fail obscurely: a step too small for the dtype, out-of-range
coordinates, unknown parameter names, an empty batch, and losses that are not real numbers."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dz_lightning as dz
from dz_lightning.models import MLP


class _Unstaged(nn.Module):
    """A model with no stages (not a Sequential, no `stages()`): every query runs the full forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(x) * self.a(x).sum(1, keepdim=True)


def _half_everywhere(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    return model


def _oracles():
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    staged = _half_everywhere(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    plain = _half_everywhere(_Unstaged())
    return {
        "staged": (dz.ModuleOracle(staged, F.cross_entropy, x, y), staged),
        "batched": (dz.ModuleOracle(staged, F.cross_entropy, x, y, feature_reuse=False), staged),
        "not staged": (dz.ModuleOracle(plain, lambda out, t: out.pow(2).mean(), x, y), plain),
        "function": (dz.FunctionOracle(lambda p: sum(v.pow(2).sum() for v in p.values())), staged),
        "function batched": (dz.FunctionOracle(lambda p: sum(v.pow(2).flatten(1).sum(1) for v in p.values()),
                                               batched=True), staged),
    }


@pytest.mark.filterwarnings("ignore:.*full forward for every query")
@pytest.mark.parametrize("path", ["staged", "batched", "not staged", "function", "function batched"])
def test_mu_below_the_dtype_resolution_is_refused_before_any_query(path):
    oracle, model = _oracles()[path]
    params = dict(model.named_parameters())
    # float32 eps (1.19e-7) x the largest |parameter| (0.5) = 6e-8
    with pytest.raises(ValueError, match=r"`mu`.*mu=1e-12 is below the resolution of float32.*all zero.*about 6e-08"):
        dz.cge(oracle, params, mu=1e-12)
    assert oracle.queries == 0
    with pytest.raises(ValueError, match=r"`mu`.*for all 4 directions.*all zero"):
        dz.rge(oracle, params, q=4, mu=1e-12, generator=torch.Generator().manual_seed(0))
    dz.cge(oracle, params, mu=6.1e-8)  # the advised value works


def test_mu_that_leaves_some_coordinates_unchanged_warns_once():
    params = {"small": torch.full((3,), 0.5), "huge": torch.full((2,), 1e6)}  # float32 spacing at 1e6: 0.0625
    oracle = dz.FunctionOracle(lambda p: p["small"].sum() + 1e-6 * p["huge"].sum())
    with pytest.warns(RuntimeWarning, match=r"leaves 2 of 5 estimated coordinates unchanged.*\['huge'\].*about 0.12"):
        est = dz.cge(oracle, params, mu=1.2345e-3)
    assert torch.allclose(est.grads["small"], torch.ones(3), atol=1e-2) and torch.equal(est.grads["huge"],
                                                                                        torch.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dz.cge(oracle, params, mu=1.2345e-3)  # once is enough
    # masked-out coordinates do not count
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dz.cge(oracle, params, mu=2.5e-3, masks={"huge": torch.zeros(2, dtype=torch.bool)})


def test_out_of_range_coordinates_are_named():
    params = {"w": torch.zeros(4), "b": torch.zeros(2)}
    oracle = dz.FunctionOracle(lambda p: p["w"].sum())
    with pytest.raises(ValueError, match=r"`coordinates\['w'\]` holds flat indices outside 0\.\.3.*\[4, -1\]"):
        dz.cge(oracle, params, coordinates={"w": torch.tensor([0, 4, -1]), "b": torch.tensor([1])})
    with pytest.raises(ValueError, match=r"`coordinates` names 'v', which is not a parameter"):
        dz.cge(oracle, params, coordinates={"v": torch.tensor([0])})
    with pytest.raises(TypeError, match=r"`coordinates\['w'\]` must be an integer Tensor.*float32"):
        dz.cge(oracle, params, coordinates={"w": torch.tensor([0.0, 1.0])})
    assert oracle.queries == 0


def test_unknown_parameter_name_and_empty_batch_are_clear_errors():
    model = MLP(4, (3,), 2)
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y)
    with pytest.raises(ValueError, match=r"`params` names \['nope'\], which is not a parameter of MLP; valid names"):
        dz.cge(oracle, {"nope": torch.zeros(3), **dict(model.named_parameters())})
    with pytest.raises(ValueError, match=r"non-empty batch of inputs.*\(0, 4\)"):
        dz.ModuleOracle(model, F.cross_entropy, x[:0], y[:0])


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize(("value", "kind"), [(True, "bool"), (torch.tensor(True), "torch.bool"),
                                             (1 + 2j, "complex"), (torch.tensor(1 + 2j), "torch.complex64")])
def test_bool_and_complex_losses_are_rejected(value, kind, batched):
    if batched:
        oracle = dz.FunctionOracle(lambda p: torch.stack([torch.as_tensor(value)] * p["w"].shape[0]), batched=True)
        kind = kind if kind.startswith("torch") else {"bool": "torch.bool", "complex": "torch.complex"}[kind]
    else:
        oracle = dz.FunctionOracle(lambda p: value)
    with pytest.raises(TypeError, match=rf"must be real \(a float, an int or a real tensor\), but got '?{kind}"):
        dz.cge(oracle, {"w": torch.zeros(2)})


@pytest.mark.parametrize("value", [3, torch.tensor(3)])
def test_integer_losses_are_taken_as_floats(value):
    est = dz.cge(dz.FunctionOracle(lambda p: value), {"w": torch.zeros(2)})
    assert est.loss == 3.0 and torch.equal(est.grads["w"], torch.zeros(2))


def test_diverged_weights_are_reported_as_divergence_not_as_a_small_mu():
    params = {"w": torch.full((4,), 3.6e10)}  # float32 spacing at 3.6e10: 4096
    oracle = dz.FunctionOracle(lambda p: p["w"].double().sum())
    with pytest.raises(ValueError, match=r"diverged: the largest \|parameter\| is 3.6e\+10 \(in 'w'\).*not a too-small "
                                         r"mu: lower the learning rate"):
        dz.cge(oracle, params)  # was: "mu=0.005 is below the resolution of float32 ... about 4.3e+03"
    assert oracle.queries == 0
    with pytest.raises(ValueError, match=r"diverged.*3.6e\+10.*not a too-small mu"):
        dz.rge(oracle, params, q=4, generator=torch.Generator().manual_seed(0))
