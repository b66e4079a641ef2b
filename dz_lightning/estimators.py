"""Zeroth-order gradient estimators: gradients from loss queries only.

Both estimators talk to the objective only through an :class:`~dz_lightning.oracle.Oracle`, never call
``backward`` and never modify the tensors in ``params`` (perturbations are applied to copies).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from dz_lightning import query
from dz_lightning.oracle import NonFiniteLossError, Oracle
from dz_lightning.resolution import check_directions_resolve, check_step_resolves
from dz_lightning.validation import check_choice, check_positive_float, check_positive_int

__all__ = ["Estimate", "cge", "device_generator", "loss_difference", "params_device", "rge", "validate_masks"]

Difference = Literal["forward", "central"]
Distribution = Literal["gaussian", "sphere"]
NonFinite = Literal["raise", "skip"]


@dataclass
class Estimate:
    """A gradient estimate and what it cost.

    Attributes:
        grads: name -> estimated gradient, same shapes as ``params``; zero outside the mask.
        queries: oracle evaluations spent, the base point included.
        loss: loss at the unperturbed parameters.
        skipped: number of finite differences dropped because a perturbed loss was not finite.
        seconds: name -> wall seconds spent on that parameter's queries (``cge(..., timed=True)``; empty otherwise).
            A DDP step splits coordinates by these (:class:`~dz_lightning.distributed.CostTable`).
    """

    grads: dict[str, Tensor]
    queries: int
    loss: float
    skipped: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def _check_common(mu: float, difference: str, nonfinite: str) -> None:
    check_positive_float("mu", mu)
    check_choice("difference", difference, ("forward", "central"))
    check_choice("nonfinite", nonfinite, ("raise", "skip"))


def _check_params(params: Mapping[str, Tensor]) -> None:
    if not isinstance(params, Mapping) or not params:
        raise ValueError("Expected argument `params` to be a non-empty dict name -> Tensor.")
    for name, value in params.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"`params[{name!r}]` must be a Tensor, but got {type(value).__name__}.")
        if not value.is_floating_point():
            raise TypeError(f"`params[{name!r}]` must be a floating-point tensor, but got dtype {value.dtype}.")


def validate_masks(params: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None) -> None:
    """Check that ``masks`` names only entries of ``params`` and that each mask has the right shape.

    Raises:
        ValueError: unknown name or wrong shape.
        TypeError: a mask that is not a bool tensor.
    """
    if masks is None:
        return
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"`masks` names {name!r}, which is not a parameter; valid names: {sorted(params)}.")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"`masks[{name!r}]` must be a bool Tensor, but got {getattr(mask, 'dtype', type(mask))}.")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(
                f"`masks[{name!r}]` has shape {tuple(mask.shape)}, but the parameter has shape "
                f"{tuple(params[name].shape)}."
            )


def params_device(params: Mapping[str, Tensor]) -> torch.device:
    """The device of the (first) parameter: where a step's small bookkeeping tensors live."""
    return next(iter(params.values())).device


def _is_integer(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def _check_coordinates(params: Mapping[str, Tensor], coordinates: Mapping[str, Tensor] | None) -> None:
    """``coordinates`` names parameters of ``params`` and holds integer flat indices within each one."""
    if coordinates is None:
        return
    outside = []
    for name, index in coordinates.items():
        if name not in params:
            raise ValueError(f"`coordinates` names {name!r}, which is not a parameter; valid names: {sorted(params)}.")
        if not isinstance(index, Tensor) or index.dtype == torch.bool or not _is_integer(index):
            raise TypeError(f"`coordinates[{name!r}]` must be an integer Tensor of flat indices, but got "
                            f"{getattr(index, 'dtype', type(index).__name__)}.")
        flat = index.reshape(-1)
        outside.append(((flat < 0) | (flat >= params[name].numel())).any().to(params_device(params)))
    if not outside or not bool(torch.stack(outside).any()):  # one host sync for all parameters
        return
    for (name, index), bad in zip(coordinates.items(), outside, strict=True):
        if bool(bad):
            n, flat = params[name].numel(), index.reshape(-1)
            raise ValueError(f"`coordinates[{name!r}]` holds flat indices outside 0..{n - 1} (the parameter has {n} "
                             f"entries): {flat[(flat < 0) | (flat >= n)][:5].tolist()}.")


def _base_loss(oracle: Oracle, params: Mapping[str, Tensor]) -> Tensor:
    f0 = oracle.loss(params)
    if not torch.isfinite(f0):
        raise NonFiniteLossError(
            f"The oracle returned a non-finite loss ({f0.item()}) at the unperturbed parameters; "
            "no gradient can be estimated (check the learning rate, the data and the model)."
        )
    return f0


def loss_difference(a: Tensor, b: Tensor) -> Tensor:
    """``a - b`` in the wider of the two loss dtypes, on ``a``'s device: never rounds a float64 loss first."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype) - b.to(a.device, dtype)


def _handle_nonfinite(values: Tensor, nonfinite: str, where: str, limit: float) -> tuple[Tensor, int]:
    """Raise on (or zero, with ``"skip"``) differences that are not finite or beyond ``limit``, the largest value of
    the parameters' dtype (a gradient entry that would overflow to infinity there)."""
    bad = ~(values.abs() <= limit)  # NaN fails the comparison too: one pass for NaN, infinity and overflow
    n_bad = int(bad.sum())
    if n_bad == 0:
        return values, 0
    if nonfinite == "raise":
        first = int(bad.nonzero()[0])
        if bool(torch.isfinite(values[first])):  # the error path only
            raise NonFiniteLossError(
                f"The finite differences of {n_bad} perturbation(s) of {where} are finite but overflow the "
                f"parameters' dtype (first at position {first}: {float(values[first]):.3g}, beyond {limit:.3g}): "
                "the losses are too large for a gradient in that dtype. Scale the loss down (a mean instead of a "
                "sum, or divide it by a constant)."
            )
        raise NonFiniteLossError(
            f"The oracle returned {n_bad} non-finite loss(es) for perturbations of {where} (first at position "
            f"{first}). Lower `mu`, or pass nonfinite='skip' to drop such differences with a warning."
        )
    warnings.warn(f"Skipped {n_bad} non-finite (or overflowing) finite difference(s) for {where}.", RuntimeWarning,
                  stacklevel=3)
    return torch.where(bad, torch.zeros_like(values), values), n_bad


def cge(
    oracle: Oracle,
    params: Mapping[str, Tensor],
    mu: float = 5e-3,
    masks: Mapping[str, Tensor] | None = None,
    difference: Difference = "forward",
    *,
    coordinates: Mapping[str, Tensor] | None = None,
    nonfinite: NonFinite = "raise",
    timed: bool = False,
) -> Estimate:
    r"""Coordinate-wise gradient estimate (CGE), dense or restricted to a mask.

    Forward differences (the paper's default), for every selected coordinate :math:`i`:

    .. math:: \hat g_i = \frac{f(\theta + \mu e_i) - f(\theta)}{\mu}

    Central differences: :math:`\hat g_i = (f(\theta + \mu e_i) - f(\theta - \mu e_i)) / (2\mu)`.
    Coordinates outside the selection get :math:`\hat g_i = 0`.

    Args:
        oracle: the loss oracle.
        params: name -> value. Never modified.
        mu: finite-difference step, > 0.
        masks: name -> bool tensor of the parameter's shape; ``True`` marks estimated coordinates.
            Parameters absent from ``masks`` are estimated densely; ``None`` means fully dense.
        difference: ``"forward"`` (n + 1 queries) or ``"central"`` (2n + 1 queries; the base point is
            still evaluated to report the loss).
        coordinates: name -> flat indices to estimate, overriding ``masks`` (used to split one step's
            coordinates across ranks). Parameters absent from it are not estimated.
        nonfinite: ``"raise"`` a :class:`NonFiniteLossError` on a non-finite perturbed loss, or ``"skip"``
            the coordinate (its estimate stays 0) with a warning.
        timed: record the wall seconds of every parameter's queries in ``Estimate.seconds`` (on CUDA the device is
            synchronized around them, so the time is the queries' and not their launch's).

    Returns:
        The :class:`Estimate`.

    Raises:
        ValueError: before any query, when ``theta_i + mu == theta_i`` in the parameters' dtype for every estimated
            coordinate (``mu`` below the floating-point resolution; the message gives the smallest ``mu`` that
            works), or when ``coordinates`` holds unknown names or out-of-range indices. When only some
            coordinates are unchanged, a ``RuntimeWarning`` says so once.
    """
    _check_common(mu, difference, nonfinite)
    _check_params(params)
    validate_masks(params, masks)
    _check_coordinates(params, coordinates)
    check_step_resolves(params, mu, masks)
    start = oracle.queries
    f0 = _base_loss(oracle, params)
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    skipped = 0
    seconds: dict[str, float] = {}
    for name, value in params.items():
        if coordinates is not None:
            if name not in coordinates:
                continue
            index = coordinates[name].to(device=value.device, dtype=torch.long).reshape(-1)
        elif masks is not None and name in masks:
            index = masks[name].reshape(-1).nonzero().reshape(-1).to(value.device)
        else:
            index = torch.arange(value.numel(), device=value.device)
        if index.numel() == 0:
            continue
        start_time = _clock(value.device) if timed else 0.0
        # differences in the precision the oracle answered in (a float64 black box keeps float64 at small mu)
        plus = oracle.coordinate_losses(params, name, index, mu).to(value.device)
        minus = oracle.coordinate_losses(params, name, index, -mu).to(value.device) if difference == "central" else None
        if timed:
            seconds[name] = _clock(value.device) - start_time
        if minus is None:
            diff = loss_difference(plus, f0) / mu
        else:
            diff = loss_difference(plus, minus) / (2 * mu)
        diff, n_bad = _handle_nonfinite(diff, nonfinite, f"parameter {name!r}", torch.finfo(value.dtype).max)
        diff = diff.to(value.dtype)
        skipped += n_bad
        grads[name].view(-1)[index] = diff
    return Estimate(grads=grads, queries=oracle.queries - start, loss=float(f0), skipped=skipped, seconds=seconds)


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the work queued on ``device`` (CUDA) has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` for drawing directions there, derived from ``generator``.

    ``generator`` itself when it already lives on ``device`` (or is ``None``: the device's global RNG); otherwise
    a fresh generator on ``device`` seeded by one draw from ``generator``. The state that matters stays in
    ``generator`` (e.g. a module's CPU generator saved in checkpoints), so resuming and replaying stay exact, and
    every DDP rank holding the same ``generator`` derives the same device generator.
    """
    if generator is None or generator.device.type == device.type and (
            device.type == "cpu" or generator.device.index == device.index):
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def _directions(
    params: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None,
    k: int,
    distribution: str,
    generators: Mapping[torch.device, torch.Generator | None],
) -> dict[str, Tensor]:
    """``k`` random directions, stacked per parameter: name -> ``(k, *shape)``; unit norm for 'sphere'.

    Drawn on each parameter's device, with ``generators[device]``: no host-to-device copies.
    """
    dirs = {}
    for name, value in params.items():
        u = torch.randn((k, *value.shape), generator=generators[value.device], dtype=value.dtype,
                        device=value.device)
        if masks is not None and name in masks:
            u = u * masks[name].to(u.device)
        dirs[name] = u
    if distribution == "sphere":
        first = next(iter(dirs.values()))
        norm = torch.sqrt(sum(u.reshape(k, -1).pow(2).sum(1).to(first.device) for u in dirs.values()))
        norm = torch.clamp(norm, min=torch.finfo(norm.dtype).tiny)
        for name in dirs:
            dirs[name] = dirs[name] / norm.to(dirs[name].device).reshape(k, *([1] * (dirs[name].dim() - 1)))
    return dirs


def direction_chunk(oracle: Oracle, params: Mapping[str, Tensor], chunk: int, copies: int) -> int:
    """Directions per batch of a randomized estimate: at most ``chunk``, and no more than ``oracle.memory_budget``
    holds at ``copies`` parameter-sized tensors per direction (:func:`~dz_lightning.query.points_per_chunk`).

    The default budget is the CPU one on every device: the chunk orders the random draws, so it must not follow a
    GPU's free memory (which can differ between DDP ranks and runs).
    """
    per_direction = copies * sum(p.numel() * p.element_size() for p in params.values())
    return min(chunk, query.points_per_chunk(torch.device("cpu"), oracle.memory_budget, per_direction))


def rge(
    oracle: Oracle,
    params: Mapping[str, Tensor],
    q: int = 192,
    mu: float = 5e-3,
    distribution: Distribution = "gaussian",
    difference: Difference = "forward",
    generator: torch.Generator | None = None,
    masks: Mapping[str, Tensor] | None = None,
    *,
    chunk: int = 64,
    nonfinite: NonFinite = "raise",
) -> Estimate:
    r"""Randomized (vector-wise) gradient estimate (RGE).

    Forward differences with ``q`` directions :math:`u_k`:

    .. math:: \hat g = \frac{c}{q} \sum_{k=1}^{q} \frac{f(\theta + \mu u_k) - f(\theta)}{\mu} u_k

    with :math:`u_k \sim \mathcal N(0, I)` and :math:`c = 1` (``"gaussian"``), or :math:`u_k` uniform on
    the unit sphere of the :math:`d` estimated coordinates and :math:`c = d` (``"sphere"``), which makes both
    unbiased for the gradient of the smoothed loss. Central differences use
    :math:`(f(\theta + \mu u_k) - f(\theta - \mu u_k)) / (2\mu)`.

    Args:
        oracle: the loss oracle.
        params: name -> value. Never modified.
        q: number of directions, >= 1.
        mu: smoothing radius, > 0.
        distribution: ``"gaussian"`` or ``"sphere"``.
        difference: ``"forward"`` (q + 1 queries) or ``"central"`` (2q + 1 queries).
        generator: ``torch.Generator`` for the directions (reproducibility); ``None`` uses the global RNG. The
            directions are drawn on the parameters' device: with a generator on another device (a module's CPU
            generator, parameters on CUDA), a device generator is derived from it once per call
            (:func:`device_generator`).
        masks: optional bool masks; directions are zero outside them (``d`` counts only masked-in entries).
        chunk: most directions generated and evaluated per batch. Fewer when ``oracle.memory_budget`` (its
            default: 1 GiB) cannot hold ``chunk`` of them: each takes about 4 parameter-sized tensors (6 with
            central differences), the one chunking rule :func:`~dz_lightning.query.points_per_chunk`. The chunk
            decides the order of the random draws, so it never depends on the device's free memory.
        nonfinite: ``"raise"`` or ``"skip"`` directions whose loss is not finite.

    Returns:
        The :class:`Estimate`.

    Raises:
        ValueError: when no direction of the first chunk moves the parameters in their dtype (``mu`` below the
            floating-point resolution); a ``RuntimeWarning`` says once when only some do not.
    """
    _check_common(mu, difference, nonfinite)
    check_choice("distribution", distribution, ("gaussian", "sphere"))
    check_positive_int("q", q)
    check_positive_int("chunk", chunk)
    _check_params(params)
    validate_masks(params, masks)
    start = oracle.queries
    f0 = _base_loss(oracle, params)
    if masks is None:
        d = sum(p.numel() for p in params.values())
    else:
        d = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in params.items())
    scale = (d if distribution == "sphere" else 1.0) / q
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    skipped = 0
    generators = {p.device: None for p in params.values()}
    generators = {device: device_generator(generator, device) for device in generators}
    # per direction: u, mu * u, the point, and the batched forward's copy of the point's weights (measured:
    # benchmarks/rge_memory.py); central differences hold the minus points too
    chunk = direction_chunk(oracle, params, chunk, 4 if difference == "forward" else 6)
    limit = min(torch.finfo(p.dtype).max for p in params.values())
    for begin in range(0, q, chunk):
        k = min(chunk, q - begin)
        dirs = _directions(params, masks, k, distribution, generators)
        points = {n: params[n].detach().unsqueeze(0) + mu * u for n, u in dirs.items()}
        if begin == 0:
            check_directions_resolve(params, points, mu, d, distribution)
        plus = oracle.losses(params, points)
        if difference == "forward":
            coeff = loss_difference(plus, f0) / mu
        else:
            minus = oracle.losses(params, {n: params[n].detach().unsqueeze(0) - mu * u for n, u in dirs.items()})
            coeff = loss_difference(plus, minus) / (2 * mu)
        coeff, n_bad = _handle_nonfinite(coeff, nonfinite, f"directions {begin}..{begin + k - 1}", limit)
        skipped += n_bad
        for name, u in dirs.items():
            c = coeff.to(u.device, u.dtype)
            grads[name] += scale * torch.tensordot(c, u, dims=1)
    return Estimate(grads=grads, queries=oracle.queries - start, loss=float(f0), skipped=skipped)
