"""Checks that a finite-difference step ``mu`` changes the parameters in their floating-point dtype.

A perturbation below the resolution of a parameter's dtype leaves ``theta + mu == theta``: the query returns the
base loss and the finite difference is exactly 0 whatever the objective. The estimators call these checks before
spending queries: an error when no coordinate (direction) moves, a warning once when some do not.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["check_directions_resolve", "check_step_resolves", "directions_unmoved", "report_directions"]

_WARNED_MU: set[tuple[str, float]] = set()


def _warn_once(key: tuple[str, float], message: str) -> None:
    if key not in _WARNED_MU:
        _WARNED_MU.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


_DIVERGED_MU = 1.0  # a step this large is no finite difference: weights needing it have blown up


def _diverged(needed: float, largest: float, where: str) -> str | None:
    """The message for weights so large that only a step of ``needed`` or more would move them: a diverged run."""
    if needed <= _DIVERGED_MU:
        return None
    return (f"The parameters have diverged: the largest |parameter| is {largest:.3g}{where}, so only a step of about "
            f"{needed:.2g} or more could change it in its dtype. This is a diverged run, not a too-small mu: lower the "
            "learning rate, clip gradients (`gradient_clip_val`), or resume from an earlier checkpoint.")


def check_step_resolves(params: Mapping[str, Tensor], mu: float, masks: Mapping[str, Tensor] | None) -> None:
    """CGE: raise when ``theta_i + mu == theta_i`` for every estimated coordinate, warn once when for some.

    Such a coordinate's perturbed point is the base point in the parameters' dtype, so its finite difference is
    exactly 0 whatever the loss. Checked before any query is spent: one max-abs per parameter and one host sync;
    the exact count (one more pass) only when ``mu`` is within the resolution of the largest entries.
    """
    # theta + mu != theta whenever mu > ulp(theta) / 2, and ulp(theta) <= eps * |theta|
    limits = [v.detach().abs().amax().to(torch.float64) * (torch.finfo(v.dtype).eps / 2)
              for v in params.values() if v.numel()]
    if not limits or mu > float(torch.stack([x.to(limits[0].device) for x in limits]).max()):
        return
    stats = []
    for name, value in params.items():
        v = value.detach()
        same = (v + mu) == v
        total = v.new_tensor(float(v.numel()), dtype=torch.float64)
        if masks is not None and name in masks:
            mask = masks[name].to(v.device)
            same, total = same & mask, mask.sum().to(torch.float64)
        eps = torch.finfo(v.dtype).eps
        needed = v.abs().max().to(torch.float64) * eps if v.numel() else total * 0
        stats.append(torch.stack([same.sum().to(torch.float64), total, needed]).to(next(iter(params.values())).device))
    n_same, n_total, needed = torch.stack(stats).T.tolist()
    same, total, smallest = sum(n_same), sum(n_total), max(needed)
    if same == 0:
        return
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in params.values()})
    biggest = max(zip(needed, params, strict=True), key=lambda t: t[0])[1]
    diverged = _diverged(smallest, smallest / torch.finfo(params[biggest].dtype).eps, f" (in {biggest!r})")
    if diverged is not None and same == total:
        raise ValueError(f"{diverged} (mu={mu!r} leaves all {int(total)} estimated coordinates unchanged.)")
    advice = diverged or (f"The smallest mu that changes every coordinate is about {smallest * 1.01:.2g} (the dtype's "
                          "eps times the largest |parameter|); the default is 5e-3.")
    if same == total:
        raise ValueError(
            f"Expected argument `mu` to change the parameters, but mu={mu!r} is below the resolution of "
            f"{'/'.join(dtypes)} at every one of the {int(total)} estimated coordinates (theta + mu == theta): every "
            f"query would return the base loss and the gradient estimate would be all zero. {advice}"
        )
    worst = [n for n, k in zip(params, n_same, strict=True) if k]
    _warn_once(("cge", mu), f"mu={mu!r} leaves {int(same)} of {int(total)} estimated coordinates unchanged in "
                            f"{'/'.join(dtypes)} (theta + mu == theta, in {worst[:5]}); their gradient estimates are "
                            f"exactly 0. {advice}")


def directions_unmoved(params: Mapping[str, Tensor], points: Mapping[str, Tensor]) -> Tensor:
    """RGE: how many of the K points equal ``params`` in their dtype (0 when all is well), a 0-d tensor on the
    parameters' device (no host read: :func:`report_directions` judges the count once it is read)."""
    k = next(iter(points.values())).shape[0]
    moved = torch.zeros(k, dtype=torch.bool, device=next(iter(params.values())).device)
    for name, pts in points.items():
        moved |= (pts != params[name].detach().unsqueeze(0)).reshape(k, -1).any(1).to(moved.device)
    return k - moved.sum()


def check_directions_resolve(params: Mapping[str, Tensor], points: Mapping[str, Tensor], mu: float, d: int,
                             distribution: str) -> None:
    """RGE: raise when no direction moves the point in the parameters' dtype, warn once when some do not."""
    k = next(iter(points.values())).shape[0]
    report_directions(params, k - int(directions_unmoved(params, points)), mu, d, k, distribution)


def report_directions(params: Mapping[str, Tensor], n_moved: int, mu: float, d: int, k: int,
                      distribution: str) -> None:
    """RGE, given ``n_moved`` of ``k`` directions that moved the point: raise when none did, warn once when some
    did not."""
    if n_moved == k:
        return
    eps = max(torch.finfo(v.dtype).eps for v in params.values())
    biggest = max(float(v.detach().abs().max()) for v in params.values() if v.numel())
    scale = math.sqrt(d) if distribution == "sphere" else 1.0  # a unit-sphere direction's entries are ~ 1/sqrt(d)
    diverged = _diverged(eps * biggest, biggest, "")
    if diverged is not None and n_moved == 0:
        raise ValueError(f"{diverged} (mu={mu!r} leaves all {k} directions unchanged.)")
    advice = diverged or f"Use mu of at least about {eps * biggest * scale:.2g} (the default is 5e-3)."
    if n_moved == 0:
        raise ValueError(
            f"Expected argument `mu` to change the parameters, but theta + mu * u == theta for all {k} directions "
            f"drawn (mu={mu!r} is below the parameters' floating-point resolution): every query would return the "
            f"base loss and the gradient estimate would be all zero. {advice}"
        )
    _warn_once(("rge", mu), f"mu={mu!r} leaves the parameters unchanged for {k - n_moved} of {k} directions "
                            f"(theta + mu * u == theta): their finite differences are exactly 0. {advice}")


