"""Randomized smoothing (Cohen, Rosenfeld and Kolter, 2019): PREDICT and CERTIFY, batched and seeded.

The smoothed classifier is ``g(x) = argmax_c P(f(x + delta) = c)``, ``delta ~ N(0, sigma^2 I)``. CERTIFY picks the
top class from ``n0`` noisy samples, bounds its probability from below with ``n`` fresh samples (one-sided
Clopper-Pearson at level ``alpha``) and certifies the l2 radius ``sigma * Phi^-1(p_lower)``, or abstains when
``p_lower < 1/2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor

__all__ = ["ABSTAIN", "certify", "lower_confidence_bound", "predict", "sample_counts"]

ABSTAIN = -1


def _check(sigma: float, alpha: float, n0: int | None = None, n: int | None = None) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"Expected argument `sigma` to be a finite float > 0, but got {sigma!r}.")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"Expected argument `alpha` to be in (0, 1), but got {alpha!r}.")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"Expected argument `n` to be an int >= 1, but got {n!r}.")
    if n0 is not None and (not isinstance(n0, int) or n0 < 1):
        raise ValueError(f"Expected argument `n0` to be an int >= 1, but got {n0!r}.")
    if n0 is not None and n is not None and n0 > n:
        raise ValueError(f"Expected `n0` <= `n` (selection samples no more than estimation samples), but got "
                         f"n0={n0}, n={n}.")


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion with ``k`` successes in ``n``."""
    if k == 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def sample_counts(classify: Callable[[Tensor], Tensor], x: Tensor, sigma: float, num: int, num_classes: int,
                  batch_size: int = 1000, generator: torch.Generator | None = None) -> Tensor:
    """Class counts of ``classify(x + delta)`` over ``num`` noise draws.

    Args:
        classify: images ``(N, C, H, W)`` -> labels ``(N,)`` or logits ``(N, num_classes)``.
        x: one image ``(C, H, W)``.
        sigma: noise standard deviation.
        num: number of noisy copies.
        num_classes: number of classes.
        batch_size: noisy copies per call.
        generator: CPU generator for the noise.

    Returns:
        ``(num_classes,)`` int64 counts.
    """
    counts = torch.zeros(num_classes, dtype=torch.long)
    remaining = num
    while remaining > 0:
        b = min(batch_size, remaining)
        noise = torch.randn((b, *x.shape), generator=generator).to(x.device, x.dtype)
        out = classify(x.unsqueeze(0) + sigma * noise)
        if out.dim() == 2 and out.shape == (b, num_classes):
            labels = out.argmax(1)
        elif out.dim() == 1 and out.shape[0] == b:
            labels = out.long()
        else:
            raise ValueError(f"The classifier must return labels ({b},) or logits ({b}, {num_classes}) for a batch of "
                             f"{b}, but returned shape {tuple(out.shape)}.")
        counts += torch.bincount(labels.cpu(), minlength=num_classes)[:num_classes]
        remaining -= b
    return counts


def predict(classify: Callable[[Tensor], Tensor], x: Tensor, sigma: float, n: int, alpha: float, num_classes: int,
            batch_size: int = 1000, generator: torch.Generator | None = None) -> int:
    """PREDICT: the smoothed prediction, or ``ABSTAIN`` when the top two classes are not separated at ``alpha``."""
    _check(sigma, alpha, n=n)
    counts = sample_counts(classify, x, sigma, n, num_classes, batch_size, generator)
    top2 = counts.topk(2)
    n_a, n_b = int(top2.values[0]), int(top2.values[1])
    if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2.indices[0])


def certify(classify: Callable[[Tensor], Tensor], x: Tensor, sigma: float, n0: int = 100, n: int = 10_000,
            alpha: float = 0.001, num_classes: int = 10, batch_size: int = 1000,
            generator: torch.Generator | None = None) -> tuple[int, float]:
    """CERTIFY: ``(prediction, radius)``; ``(ABSTAIN, 0.0)`` when the lower bound on the top class is below 1/2."""
    _check(sigma, alpha, n0=n0, n=n)
    selection = sample_counts(classify, x, sigma, n0, num_classes, batch_size, generator)
    top = int(selection.argmax())
    counts = sample_counts(classify, x, sigma, n, num_classes, batch_size, generator)
    p_lower = lower_confidence_bound(int(counts[top]), n, alpha)
    if p_lower < 0.5:
        return ABSTAIN, 0.0
    return top, float(sigma * norm.ppf(p_lower))
