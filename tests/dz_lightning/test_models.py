"""Model families: parameter counts, shapes and stages that compose to the forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dz_lightning.models import MLP, resnet20, resnet32, resnet44, resnet56, resnet110, simple_cnn
from dz_lightning.reuse import flatten_ops, get_stages


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("depth", "expected"), [(1, 730), (2, 3700), (3, 6670), (4, 9640), (5, 12610)])
def test_simple_cnn_parameter_counts_match_the_paper(depth, expected):
    assert _count(simple_cnn(depth)) == expected


def test_resnet20_has_about_027m_parameters_and_deeper_variants_grow():
    counts = [_count(f()) for f in (resnet20, resnet32, resnet44, resnet56, resnet110)]
    assert 0.26e6 < counts[0] < 0.28e6
    assert counts == sorted(counts)


@pytest.mark.parametrize("make", [resnet20, lambda: simple_cnn(4), lambda: MLP(3 * 16 * 16, (7,), 10)],
                         ids=["resnet20", "simple_cnn4", "mlp"])
def test_stages_compose_to_forward(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 16, 16)
    h = x
    for op in flatten_ops(get_stages(model)):
        h = op(h)
    torch.testing.assert_close(h, model(x))
    assert h.shape == (2, 10)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="depth=0"):
        simple_cnn(0)
    with pytest.raises(ValueError, match="hidden=\\[0\\]"):
        MLP(4, (0,), 2)


def test_a_plain_module_is_not_staged():
    assert get_stages(nn.Linear(2, 2)) is None
