"""Randomized-smoothing certification against closed forms."""

from __future__ import annotations

import pytest
import torch
from dz_lightning.tasks.smoothing import (
    ABSTAIN,
    NonFiniteOutputError,
    certify,
    lower_confidence_bound,
    predict,
    sample_counts,
)
from scipy.stats import beta, norm


def _threshold(t: float):
    """Class 1 iff pixel 0 exceeds t: under noise, P(class 1) = Phi((x0 - t) / sigma) in closed form."""
    return lambda images: (images.reshape(images.shape[0], -1)[:, 0] > t).long()


def test_all_votes_give_alpha_to_the_one_over_n():
    assert lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), abs=1e-12)
    assert lower_confidence_bound(0, 100, 0.001) == 0.0


def test_certified_radius_is_sigma_times_inverse_normal_of_the_lower_bound():
    x = torch.zeros(1, 2, 2)
    x[0, 0, 0] = 0.3
    sigma, n0, n, alpha = 0.5, 50, 2000, 0.001
    gen = torch.Generator().manual_seed(0)
    pred, radius = certify(_threshold(0.0), x, sigma, n0, n, alpha, num_classes=2, batch_size=300, generator=gen)
    # replay the same noise to get the count CERTIFY saw
    gen = torch.Generator().manual_seed(0)
    sample_counts(_threshold(0.0), x, sigma, n0, 2, 300, gen)
    count = int(sample_counts(_threshold(0.0), x, sigma, n, 2, 300, gen)[1])
    p_lower = float(beta.ppf(alpha, count, n - count + 1))
    assert pred == 1
    assert radius == pytest.approx(sigma * norm.ppf(p_lower), abs=1e-6)
    # and the empirical proportion is near the closed form Phi(0.3 / 0.5)
    assert count / n == pytest.approx(norm.cdf(0.3 / 0.5), abs=0.04)


def test_abstains_near_the_decision_boundary_and_not_far_from_it():
    gen = torch.Generator().manual_seed(1)
    x_on = torch.zeros(1, 2, 2)
    abstain = [certify(_threshold(0.0), x_on, 0.5, 20, 500, 0.001, 2, 500, gen)[0] for _ in range(10)]
    assert abstain.count(ABSTAIN) >= 9
    x_far = torch.full((1, 2, 2), 3.0)
    assert certify(_threshold(0.0), x_far, 0.5, 20, 500, 0.001, 2, 500, gen)[0] == 1
    assert predict(_threshold(0.0), x_far, 0.5, 200, 0.001, 2, generator=gen) == 1
    assert predict(_threshold(0.0), x_on, 0.5, 200, 0.001, 2, generator=gen) == ABSTAIN


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0.0}, "`sigma`.*> 0.*0.0"),
        ({"sigma": -1.0}, "`sigma`.*-1.0"),
        ({"n0": 200, "n": 100}, "`n0` <= `n`.*n0=200, n=100"),
        ({"alpha": 1.0}, r"`alpha`.*\(0, 1\).*1.0"),
        ({"alpha": 0.0}, r"`alpha`.*0.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"sigma": 0.25, "n0": 10, "n": 100, "alpha": 0.001, **kwargs}
    with pytest.raises(ValueError, match=match):
        certify(_threshold(0.0), torch.zeros(1, 2, 2), num_classes=2, **args)


def test_wrong_classifier_output_shape():
    with pytest.raises(ValueError, match=r"labels \(10,\) or logits \(10, 2\).*\(10, 3\)"):
        sample_counts(lambda imgs: torch.zeros(imgs.shape[0], 3), torch.zeros(1, 2, 2), 0.5, 10, 2)


def test_nan_logits_are_never_certified():
    nan = lambda images: torch.full((images.shape[0], 3), float("nan"))  # noqa: E731
    x = torch.zeros(1, 2, 2)
    with pytest.raises(NonFiniteOutputError, match=r"non-finite logits for 10 of 10 noisy copies"):
        certify(nan, x, 0.5, n0=10, n=20, num_classes=3, batch_size=10)
    with pytest.raises(NonFiniteOutputError, match="non-finite logits"):
        predict(nan, x, 0.5, n=20, alpha=0.01, num_classes=3)
    assert certify(nan, x, 0.5, n0=10, n=20, num_classes=3, nonfinite="abstain") == (ABSTAIN, 0.0)
    assert predict(nan, x, 0.5, n=20, alpha=0.01, num_classes=3, nonfinite="abstain") == ABSTAIN
    one_inf = lambda images: torch.eye(3)[:1].repeat(images.shape[0], 1).index_put_(  # noqa: E731
        (torch.tensor([0]), torch.tensor([2])), torch.tensor(float("inf")))
    with pytest.raises(NonFiniteOutputError, match="1 of 5"):
        sample_counts(one_inf, x, 0.5, 5, 3, batch_size=5)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"batch_size": 0}, "`batch_size`.* 0"),
    ({"batch_size": -3}, "`batch_size`.*-3"),
    ({"nonfinite": "ignore"}, "`nonfinite`.*'ignore'"),
])
def test_certify_batch_size_and_options_fail_fast_instead_of_hanging(kwargs, match):
    with pytest.raises(ValueError, match=match):
        certify(_threshold(0.0), torch.zeros(1, 2, 2), 0.5, n0=10, n=20, num_classes=2, **kwargs)


@pytest.mark.parametrize("labels", [[-1.0, 0.0], [0.0, 2.0], [0.5, 1.0]])
def test_labels_outside_the_classes_are_rejected(labels):
    out = torch.tensor(labels)
    with pytest.raises(ValueError, match=r"labels outside the integers 0\.\.1 \(num_classes=2\)"):
        sample_counts(lambda images: out, torch.zeros(1, 2, 2), 0.5, 2, 2, batch_size=2)
