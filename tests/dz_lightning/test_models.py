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


def test_sol_resnet_is_solver_in_the_loops_corrector():
    """12 convolutions of 5 x 5 at 32 channels (stem, 5 residual blocks of two, head); stages compose to forward."""
    from dz_lightning.models import SOLResNet

    model = SOLResNet()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 12 and all(c.kernel_size == (5, 5) for c in convs)
    assert [c.out_channels for c in convs] == [32] * 11 + [2]
    assert sum(p.numel() for p in model.parameters()) == 3 * 32 * 25 + 32 + 10 * (32 * 32 * 25 + 32) + 32 * 2 * 25 + 2
    x = torch.randn(2, 3, 8, 16)
    assert torch.equal(model(x), torch.zeros(2, 2, 8, 16))  # starts from the uncorrected solver
    torch.manual_seed(0)
    model = SOLResNet(width=4, blocks=2, zero_output=False)
    h = x
    for op in flatten_ops(get_stages(model)):
        h = op(h)
    torch.testing.assert_close(h, model(x))
    assert h.abs().sum() > 0
    with pytest.raises(ValueError, match="kernel_size=4"):
        SOLResNet(kernel_size=4)


def test_unet_small_keeps_the_image_size_and_checks_its_sizes():
    from dz_lightning.models import unet_small

    model = unet_small(in_channels=1, out_channels=2, width=4)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 2, 16, 16)
    assert get_stages(model) is None  # feature reuse comes from its traced graph
    with pytest.raises(ValueError, match="width=0"):
        unet_small(width=0)


def test_torchvision_adaptations_take_32x32_images():
    from dz_lightning.models import tv_mobilenet_v3_small, tv_resnet18

    resnet = tv_resnet18()
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    assert resnet.eval()(x).shape == (2, 10) and tv_mobilenet_v3_small().eval()(x).shape == (2, 10)
