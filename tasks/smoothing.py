"""Randomized smoothing (Cohen, Rosenfeld and Kolter, 2019): PREDICT and CERTIFY, batched and seeded.

The smoothed classifier is ``g(x) = argmax_c P(f(x + delta) = c)``, ``delta ~ N(0, sigma^2 I)``. CERTIFY picks the
top class from ``n0`` noisy samples, bounds its probability from below with ``n`` fresh samples (one-sided
Clopper-Pearson at level ``alpha``) and certifies the l2 radius ``sigma * Phi^-1(p_lower)``, or abstains when
``p_lower < 1/2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor

from dz_lightning.validation import check_choice, check_positive_int

__all__ = ["ABSTAIN", "NonFiniteOutputError", "certify", "check_smoothing", "lower_confidence_bound", "predict",
           "sample_counts"]

ABSTAIN = -1


class NonFiniteOutputError(ValueError):
    """The classifier returned NaN or infinite logits (or labels) for noisy copies of an image."""


def check_smoothing(sigma: float, alpha: float, n0: int | None = None, n: int | None = None) -> None:
    """Raise ``ValueError`` unless ``sigma``, ``alpha`` (and ``n0`` <= ``n``, when given) are valid settings."""
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

    Non-finite logits are never counted: ``argmax`` would read NaN logits as class 0 and certify it.

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

    Raises:
        NonFiniteOutputError: the classifier returned a non-finite logit or label.
        ValueError: a label outside ``[0, num_classes)``, an output of the wrong shape, or a bad argument.
    """
    check_positive_int("num", num, minimum=0)
    check_positive_int("num_classes", num_classes)
    check_positive_int("batch_size", batch_size)
    counts = torch.zeros(num_classes, dtype=torch.long)
    remaining = num
    while remaining > 0:
        b = min(batch_size, remaining)
        noise = torch.randn((b, *x.shape), generator=generator).to(x.device, x.dtype)
        out = classify(x.unsqueeze(0) + sigma * noise)
        if not (out.dim() == 2 and out.shape == (b, num_classes)) and not (out.dim() == 1 and out.shape[0] == b):
            raise ValueError(f"The classifier must return labels ({b},) or logits ({b}, {num_classes}) for a batch of "
                             f"{b}, but returned shape {tuple(out.shape)}.")
        if out.is_floating_point() or out.is_complex():
            finite = torch.isfinite(out).all(1) if out.dim() == 2 else torch.isfinite(out)
            n_bad = int((~finite).sum())
            if n_bad:
                raise NonFiniteOutputError(
                    f"The classifier returned non-finite {'logits' if out.dim() == 2 else 'labels'} for {n_bad} of "
                    f"{b} noisy copies; refusing to count them as a class (pass nonfinite='abstain' to abstain on "
                    "such images instead)."
                )
        if out.dim() == 2:
            labels = out.argmax(1).cpu()
        else:
            labels = out.cpu().long()
            bad = (labels < 0) | (labels >= num_classes) | (labels.to(out.dtype) != out.cpu())
            if bool(bad.any()):
                raise ValueError(f"The classifier returned labels outside the integers 0..{num_classes - 1} "
                                 f"(num_classes={num_classes}): {out.cpu()[bad][:5].tolist()}.")
        counts += torch.bincount(labels, minlength=num_classes)
        remaining -= b
    return counts


def predict(classify: Callable[[Tensor], Tensor], x: Tensor, sigma: float, n: int, alpha: float, num_classes: int,
            batch_size: int = 1000, generator: torch.Generator | None = None,
            nonfinite: Literal["raise", "abstain"] = "raise") -> int:
    """PREDICT: the smoothed prediction, or ``ABSTAIN`` when the top two classes are not separated at ``alpha``.

    ``nonfinite``: on non-finite classifier outputs, ``"raise"`` :class:`NonFiniteOutputError` or ``"abstain"``.
    """
    check_smoothing(sigma, alpha, n=n)
    check_choice("nonfinite", nonfinite, ("raise", "abstain"))
    try:
        counts = sample_counts(classify, x, sigma, n, num_classes, batch_size, generator)
    except NonFiniteOutputError:
        if nonfinite == "raise":
            raise
        return ABSTAIN
    top2 = counts.topk(2)
    n_a, n_b = int(top2.values[0]), int(top2.values[1])
    if binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2.indices[0])


def certify(classify: Callable[[Tensor], Tensor], x: Tensor, sigma: float, n0: int = 100, n: int = 10_000,
            alpha: float = 0.001, num_classes: int = 10, batch_size: int = 1000,
            generator: torch.Generator | None = None,
            nonfinite: Literal["raise", "abstain"] = "raise") -> tuple[int, float]:
    """CERTIFY: ``(prediction, radius)``; ``(ABSTAIN, 0.0)`` when the lower bound on the top class is below 1/2.

    ``nonfinite``: on non-finite classifier outputs, ``"raise"`` :class:`NonFiniteOutputError` or ``"abstain"``
    (return ``(ABSTAIN, 0.0)``): such an image is never certified.
    """
    check_smoothing(sigma, alpha, n0=n0, n=n)
    check_choice("nonfinite", nonfinite, ("raise", "abstain"))
    try:
        selection = sample_counts(classify, x, sigma, n0, num_classes, batch_size, generator)
        top = int(selection.argmax())
        counts = sample_counts(classify, x, sigma, n, num_classes, batch_size, generator)
    except NonFiniteOutputError:
        if nonfinite == "raise":
            raise
        return ABSTAIN, 0.0
    p_lower = lower_confidence_bound(int(counts[top]), n, alpha)
    if p_lower < 0.5:
        return ABSTAIN, 0.0
    return top, float(sigma * norm.ppf(p_lower))
