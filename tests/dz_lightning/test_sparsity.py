"""GraSP / ZO-GraSP scores, layer-wise ratios and masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dz_lightning as dz
from dz_lightning import sparsity as sp
from dz_lightning.models import simple_cnn


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_prunable_parameters_are_conv_and_linear_weights():
    names = sp.prunable_parameters(simple_cnn(2))
    assert names == ["0.0.weight", "1.0.weight", "2.2.weight"]
    assert sp.prunable_parameters(simple_cnn(2), extra_dense=["2.2.weight"]) == ["0.0.weight", "1.0.weight"]
    with pytest.raises(ValueError, match="no prunable layer"):
        sp.prunable_parameters(nn.Sequential(nn.BatchNorm1d(3)))


def test_prunable_among_matches_weights_by_identity_under_any_names():
    owner = nn.Module()
    owner.net = simple_cnn(2)  # any attribute name
    owner.frozen = nn.Linear(3, 3)  # not among the parameters given: left out
    params = {f"w{i}": p for i, (_, p) in enumerate(owner.net.named_parameters())}  # any names
    expected = {f"w{i}" for i, (n, _) in enumerate(owner.net.named_parameters())
                if n in sp.prunable_parameters(owner.net)}
    assert set(sp.prunable_among(owner, params)) == expected and len(expected) == 3
    first = sp.prunable_among(owner, params)[0]
    assert first not in sp.prunable_among(owner, params, extra_dense=[first])
    with pytest.raises(ValueError, match="no prunable layer.*among the 1 parameters"):
        sp.prunable_among(owner, {"bias": owner.frozen.bias})


def test_layerwise_ratios_prune_exactly_the_target_globally():
    scores = {"a": torch.tensor([5.0, -4.0, 0.1, 0.2]), "b": torch.tensor([3.0, 0.0, 0.0, 0.0, -0.3, 0.05])}
    ratios = sp.layerwise_ratios(scores, 0.6)  # keep 4 of 10 by |score|: 5, -4, 3, -0.3
    assert ratios == {"a": 0.5, "b": pytest.approx(4 / 6)}
    with pytest.raises(ValueError, match=r"`sparsity`.*\[0, 1\).*1.0"):
        sp.layerwise_ratios(scores, 1.0)


def test_masks_have_exact_density_and_are_deterministic_by_seed():
    params = dict(simple_cnn(3).named_parameters())
    names = sp.prunable_parameters(simple_cnn(3))
    ratios = sp.uniform_ratios(names, 0.9)
    a = sp.draw_masks(params, ratios, torch.Generator().manual_seed(3))
    b = sp.draw_masks(params, ratios, torch.Generator().manual_seed(3))
    c = sp.draw_masks(params, ratios, torch.Generator().manual_seed(4))
    assert all(torch.equal(a[n], b[n]) for n in names) and not all(torch.equal(a[n], c[n]) for n in names)
    for n in names:
        assert int(a[n].sum()) == round(0.1 * params[n].numel())
    assert abs(sp.realized_density(a) - 0.1) < 0.005
    with pytest.raises(ValueError, match="`ratios` names 'nope'"):
        sp.draw_masks(params, {"nope": 0.5})


def test_class_balanced_sample_takes_per_class():
    batches = [(torch.arange(10.0).reshape(10, 1), torch.tensor([0, 1, 0, 1, 2, 0, 0, 1, 2, 2]))]
    x, y = sp.class_balanced_sample(batches, per_class=2)
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    assert x[:, 0].tolist() == [0.0, 2.0, 1.0, 3.0, 4.0, 8.0]


def test_per_tensor_rge_is_deepzeros_estimator_in_expectation():
    """Directions normalized per tensor and scaled by mu, no d factor: E[g] = mu * grad_l / n_l per tensor l."""
    a = {"a": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), "b": torch.linspace(-1, 1, 10, dtype=torch.float64)}

    def linear(p):  # batched: (K, ...) -> (K,)
        return (p["a"] * a["a"]).sum(1) + (p["b"] * a["b"]).sum(1)

    params = {n: torch.zeros_like(v) for n, v in a.items()}
    oracle = dz.FunctionOracle(linear, batched=True)
    est, queries = sp.per_tensor_rge(oracle, params, q=40000, mu=1e-2, generator=torch.Generator().manual_seed(0),
                                     chunk=8192)
    assert queries == 40001
    for n in a:
        # about 4 standard deviations of the Monte Carlo error; a d factor or one shared sphere is off by 3x-13x
        torch.testing.assert_close(est[n], 1e-2 * a[n] / a[n].numel(), rtol=0, atol=1e-2 * 1e-2 * a[n].abs().max())


def test_zo_grasp_scores_use_fresh_per_tensor_directions_for_the_second_estimate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    names = sp.prunable_parameters(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    points: list[dict[str, torch.Tensor]] = []

    class Recording(dz.ModuleOracle):
        def _losses(self, params, varied):
            points.append({n: (v - params[n].unsqueeze(0)).clone() for n, v in varied.items()})
            return super()._losses(params, varied)

    oracle = Recording(model, F.cross_entropy, x, y)
    scores, queries = sp.zo_grasp_scores(oracle, params, names, q=12, mu=5e-3,
                                         generator=torch.Generator().manual_seed(1))
    assert queries == oracle.queries == 2 * (12 + 1)
    first, second = points[0], points[-1]  # one chunk per estimate
    for n in names:
        assert first[n].shape == (12, *params[n].shape)
        # every tensor's share of every direction has length mu
        torch.testing.assert_close(first[n].flatten(1).norm(dim=1), torch.full((12,), 5e-3, dtype=torch.float64))
        torch.testing.assert_close(second[n].flatten(1).norm(dim=1), torch.full((12,), 5e-3, dtype=torch.float64))
        assert not torch.allclose(first[n], second[n])  # fresh directions, not common random numbers
    again, _ = sp.zo_grasp_scores(dz.ModuleOracle(model, F.cross_entropy, x, y), params, names, q=12, mu=5e-3,
                                  generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(scores[n], again[n]) for n in names)


def test_fo_grasp_divides_the_logits_by_the_temperature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    hot = sp.grasp_scores(model, F.cross_entropy, x, y, temperature=200.0)
    scaled = nn.Sequential(model, _Scale(1 / 200.0))
    plain = sp.grasp_scores(scaled, F.cross_entropy, x, y, ["0.0.weight", "0.2.weight"], temperature=1.0)
    torch.testing.assert_close(hot["0.weight"], plain["0.0.weight"])
    torch.testing.assert_close(hot["2.weight"], plain["0.2.weight"])
    with pytest.raises(ValueError, match="temperature"):
        sp.grasp_scores(model, F.cross_entropy, x, y, temperature=0.0)


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_a_layer_grasp_cannot_score_gets_the_global_ratio_not_frozen():
    scores = {"zero": torch.zeros(40), "a": torch.randn(30), "b": torch.randn(10) * 10}
    with pytest.warns(UserWarning, match=r"GraSP cannot score \['zero'\].*global ratio 0.75"):
        ratios = sp.layerwise_ratios(scores, 0.75)
    assert list(ratios) == ["zero", "a", "b"] and ratios["zero"] == 0.75
    kept = sum((1 - ratios[n]) * s.numel() for n, s in scores.items())
    assert kept == pytest.approx(0.25 * 80)  # the overall density is the one asked for
    assert ratios["b"] < ratios["a"]  # the others are still ranked by their scores
    with pytest.warns(UserWarning, match="cannot score"):  # nothing scored at all: every layer at the global ratio
        assert sp.layerwise_ratios({"x": torch.zeros(4), "y": torch.zeros(6)}, 0.5) == {"x": 0.5, "y": 0.5}


def test_zo_grasp_on_the_sol_corrector_freezes_no_layer():
    """Its output layer starts at zero, so GraSP scores it zero: it must not get ratio 1.0 (no coordinate trained)."""
    from dz_lightning.models.corrector import SOLCorrector

    torch.manual_seed(0)
    model = SOLCorrector(width=4, depth=3, kernel_size=3)
    x, y = torch.randn(4, 3, 8, 8), torch.randn(4, 2, 8, 8)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = sp.prunable_parameters(model)
    oracle = dz.ModuleOracle(model, F.mse_loss, x, y)
    scores, _ = sp.zo_grasp_scores(oracle, params, names, q=8, generator=torch.Generator().manual_seed(0))
    last = names[-1]
    assert not bool(scores[last].any())
    with pytest.warns(UserWarning, match=rf"cannot score \['{last}'\]"):
        ratios = sp.layerwise_ratios(scores, 0.9)
    assert max(ratios.values()) < 1.0 and ratios[last] == 0.9
