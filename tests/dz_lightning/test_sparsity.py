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


def test_zo_grasp_scores_track_fo_grasp_on_a_small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4))
    model = model.double()
    x, y = torch.randn(64, 16, dtype=torch.float64), torch.randint(0, 4, (64,))
    names = sp.prunable_parameters(model)
    fo = sp.grasp_scores(model, F.cross_entropy, x, y, names)
    oracle = dz.ModuleOracle(model, F.cross_entropy, x, y)
    zo, queries = sp.zo_grasp_scores(oracle, dict(model.named_parameters()), names, q=4000, mu=1e-3,
                                     generator=torch.Generator().manual_seed(0))
    assert queries == 2 * (4000 + 1)
    flat_fo = torch.cat([fo[n].reshape(-1) for n in names])
    flat_zo = torch.cat([zo[n].reshape(-1) for n in names])
    assert F.cosine_similarity(flat_fo, flat_zo, dim=0) > 0.5
    # the ratio ranking across layers agrees
    lpr_fo, lpr_zo = sp.layerwise_ratios(fo, 0.8), sp.layerwise_ratios(zo, 0.8)
    assert _spearman(list(lpr_fo.values()), list(lpr_zo.values())) > 0.4
