"""Zeroth-order gradient estimators: gradients from loss queries only.

Both estimators talk to the objective only through an :class:`~dz_lightning.oracle_base.Oracle`, never call
``backward`` and never modify the tensors in ``params`` (perturbations are applied to copies).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from dz_lightning import query
from dz_lightning.oracle_base import NonFiniteLossError, Oracle
from dz_lightning.resolution import check_step_resolves, directions_unmoved, report_directions
from dz_lightning.upstream import tensor_version
from dz_lightning.validation import check_choice, check_positive_float, check_positive_int

__all__ = ["Estimate", "cge", "device_generator", "loss_difference", "mask_coordinates", "params_device", "rge",
           "validate_masks"]

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
        finite: ``True`` when the estimator has established that every entry of ``grads`` is finite (CGE: each entry
            is a difference it counted in its one host read); ``False`` when it has not checked.
    """

    grads: dict[str, Tensor]
    queries: int
    loss: float
    skipped: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    finite: bool = False


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


# mask tensor -> (its in-place version, its coordinates): a mask is searched once per draw, not once per step
_MASK_COORDINATES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def mask_coordinates(mask: Tensor, coordinates: Tensor | None = None) -> Tensor:
    """The flat indices of ``mask``'s ``True`` entries, ``(n,)`` int64 on its device, ascending.

    Computed once per mask tensor (a ``nonzero``, the one host read a mask costs) and remembered with the tensor's
    identity and in-place version: a mask drawn once and used for many steps is searched once, and a mask changed
    in place is searched again.

    Args:
        mask: a bool tensor.
        coordinates: the ascending flat indices of ``mask``'s ``True`` entries when the caller already knows them
            (masks drawn from known indices): remembered as they are, without a search.
    """
    entry = _MASK_COORDINATES.get(mask)
    if coordinates is not None:
        entry = (tensor_version(mask), coordinates.reshape(-1).to(device=mask.device, dtype=torch.long))
        _MASK_COORDINATES[mask] = entry
    elif entry is None or entry[0] != tensor_version(mask):
        entry = (tensor_version(mask), mask.reshape(-1).nonzero().reshape(-1))
        _MASK_COORDINATES[mask] = entry
    return entry[1]


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


def _check_base_loss(f0: float) -> None:
    if not math.isfinite(f0):
        raise NonFiniteLossError(
            f"The oracle returned a non-finite loss ({f0}) at the unperturbed parameters; "
            "no gradient can be estimated (check the learning rate, the data and the model)."
        )


class _StepChecks:
    """What a call checks on the device while it queries, read back in one host sync at its end: the base loss,
    the count of non-finite differences of each group (a parameter, a chunk of directions) and any extra counts.
    Every value read is 0 when all is well (the fake-CUDA tests answer each host read with 0)."""

    def __init__(self, f0: Tensor, nonfinite: str) -> None:
        self.f0, self.nonfinite = f0, nonfinite
        self.groups: list[tuple[str, Tensor, Tensor, float]] = []  # (where, bad count, raw differences, limit)
        self.loss, self.counts = math.nan, []

    def differences(self, values: Tensor, where: str, limit: float = math.inf) -> Tensor:
        """``values`` with bad entries zeroed when skipping them (counted, on the device, either way): not finite,
        or beyond ``limit``, the largest value of the gradient's dtype (an entry that would overflow there)."""
        bad = ~(values.abs() <= limit)  # NaN fails the comparison too: one pass for NaN, infinity and overflow
        self.groups.append((where, bad.sum(), values, limit))
        return torch.where(bad, torch.zeros_like(values), values) if self.nonfinite == "skip" else values

    def read(self, *extra: Tensor) -> list[float]:
        """The one host read: the base loss (kept in :attr:`loss`; a non-finite one raises), the counts, and the
        ``extra`` 0-d tensors' values (returned)."""
        device = self.f0.device
        parts = [self.f0.to(torch.float64).reshape(1), *(c.to(device, torch.float64).reshape(1)
                                                          for _, c, _, _ in self.groups),
                 *(e.to(device, torch.float64).reshape(1) for e in extra)]
        values = torch.cat(parts).tolist()
        self.loss, self.counts = values[0], [int(n) for n in values[1 : 1 + len(self.groups)]]
        _check_base_loss(self.loss)
        return values[1 + len(self.groups) :]

    def skipped(self) -> int:
        """After :meth:`read`: the skipped differences, with a warning per group; with ``nonfinite="raise"``, an
        error naming the first group that holds a non-finite difference."""
        skipped = 0
        for (where, _, raw, limit), n_bad in zip(self.groups, self.counts, strict=True):
            if n_bad == 0:
                continue
            if self.nonfinite == "raise":  # only on failure: which entry, and what kind of failure
                first = int((~(raw.abs() <= limit)).nonzero()[0])
                if bool(torch.isfinite(raw[first])):
                    raise NonFiniteLossError(
                        f"The finite differences of {n_bad} perturbation(s) of {where} are finite but overflow the "
                        f"parameters' dtype (first at position {first}: {float(raw[first]):.3g}, beyond {limit:.3g}): "
                        "the losses are too large for a gradient in that dtype. Scale the loss down (a mean instead "
                        "of a sum, or divide it by a constant)."
                    )
                raise NonFiniteLossError(
                    f"The oracle returned {n_bad} non-finite loss(es) for perturbations of {where} (first at position "
                    f"{first}). Lower `mu`, or pass nonfinite='skip' to drop such differences with a warning."
                )
            warnings.warn(f"Skipped {n_bad} non-finite (or overflowing) finite difference(s) for {where}.",
                          RuntimeWarning, stacklevel=3)
            skipped += n_bad
        return skipped


def loss_difference(a: Tensor, b: Tensor) -> Tensor:
    """``a - b`` in the wider of the two loss dtypes, on ``a``'s device: never rounds a float64 loss first."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype) - b.to(a.device, dtype)


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
    f0 = oracle.coordinate_base_loss(params)  # the base of the coordinate queries that follow
    checks = _StepChecks(f0, nonfinite)
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    timer = _Timer(params_device(params)) if timed else None
    for name, value in params.items():
        if coordinates is not None:
            if name not in coordinates:
                continue
            index = coordinates[name].to(device=value.device, dtype=torch.long).reshape(-1)
        elif masks is not None and name in masks:
            index = mask_coordinates(masks[name]).to(value.device)
        else:
            index = torch.arange(value.numel(), device=value.device)
        if index.numel() == 0:
            continue
        if timer is not None:
            timer.start(name)
        # differences in the precision the oracle answered in (a float64 black box keeps float64 at small mu)
        plus = oracle.coordinate_losses(params, name, index, mu).to(value.device)
        minus = oracle.coordinate_losses(params, name, index, -mu).to(value.device) if difference == "central" else None
        if timer is not None:
            timer.stop(name)
        if minus is None:
            diff = loss_difference(plus, f0) / mu
        else:
            diff = loss_difference(plus, minus) / (2 * mu)
        limit = torch.finfo(value.dtype).max  # a difference beyond it would overflow the gradient's dtype
        grads[name].view(-1)[index] = checks.differences(diff, f"parameter {name!r}", limit).to(value.dtype)
    checks.read()
    seconds = timer.seconds() if timer is not None else {}
    # every entry of `grads` is 0 or a difference counted above: non-finite ones raised or were zeroed
    return Estimate(grads=grads, queries=oracle.queries - start, loss=checks.loss, skipped=checks.skipped(),
                    seconds=seconds, finite=True)


class _Timer:
    """Wall seconds of each parameter's queries, read once at the end of a call: CUDA events on a CUDA device
    (no synchronization between parameters), ``time.perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: dict[str, list] = {}

    def _now(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self, name: str) -> None:
        self.marks[name] = [self._now()]

    def stop(self, name: str) -> None:
        self.marks[name].append(self._now())

    def seconds(self) -> dict[str, float]:
        if not self.cuda:
            return {n: end - begin for n, (begin, end) in self.marks.items()}
        if self.marks:
            next(reversed(self.marks.values()))[1].synchronize()  # the last event: every earlier one has happened
        return {n: begin.elapsed_time(end) / 1000.0 for n, (begin, end) in self.marks.items()}


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
    distribution: Distribution = "sphere",
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
        distribution: ``"sphere"`` (the default, as :class:`~dz_lightning.ZOModule`'s) or ``"gaussian"``.
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
    f0 = oracle.loss(params)
    checks = _StepChecks(f0, nonfinite)
    if masks is None:
        d = sum(p.numel() for p in params.values())
    else:
        d = sum(mask_coordinates(masks[n]).numel() if n in masks else p.numel() for n, p in params.items())
    scale = (d if distribution == "sphere" else 1.0) / q
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    generators = {p.device: None for p in params.values()}
    generators = {device: device_generator(generator, device) for device in generators}
    # per direction: u, mu * u, the point, and the batched forward's copy of the point's weights (measured:
    # benchmarks/rge_memory.py); central differences hold the minus points too
    chunk = direction_chunk(oracle, params, chunk, 4 if difference == "forward" else 6)
    limit = min(torch.finfo(p.dtype).max for p in params.values())
    unmoved = None
    for begin in range(0, q, chunk):
        k = min(chunk, q - begin)
        dirs = _directions(params, masks, k, distribution, generators)
        points = {n: params[n].detach().unsqueeze(0) + mu * u for n, u in dirs.items()}
        if begin == 0:  # read with the step's other checks, at the end
            first_k, unmoved = k, directions_unmoved(params, points)
        plus = oracle.losses(params, points)
        if difference == "forward":
            coeff = loss_difference(plus, f0) / mu
        else:
            minus = oracle.losses(params, {n: params[n].detach().unsqueeze(0) - mu * u for n, u in dirs.items()})
            coeff = loss_difference(plus, minus) / (2 * mu)
        coeff = checks.differences(coeff, f"directions {begin}..{begin + k - 1}", limit)
        for name, u in dirs.items():
            c = coeff.to(u.device, u.dtype)
            grads[name] += scale * torch.tensordot(c, u, dims=1)
    (n_unmoved,) = checks.read(unmoved)  # the call's one host read
    report_directions(params, first_k - int(n_unmoved), mu, d, first_k, distribution)
    return Estimate(grads=grads, queries=oracle.queries - start, loss=checks.loss, skipped=checks.skipped())
