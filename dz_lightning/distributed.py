"""Forward parallelization: split one step's coordinates across ranks, then sum the partial gradients.

Every rank holds the same parameters, the same batch and the same masks. Each takes a cost-balanced,
contiguous share of the step's coordinates, estimates those, and a single ``all_reduce`` (sum) of one flat
buffer gives every rank the full gradient. The buffer also carries a failure flag and the query count, so a
rank whose oracle failed makes *every* rank raise after the same collective instead of hanging.

The cost of a coordinate is *measured*: CGE times its queries per parameter (``cge(..., timed=True)`` fills
``Estimate.seconds``), the seconds and coordinate counts ride in the same buffer, and every rank feeds the
identical sums into its :class:`CostTable` (a moving average of seconds per coordinate). The table starts from
the static :func:`query_costs` and is only ever updated from all-reduced numbers, so every rank computes the
same split without another collective. :class:`~dz_lightning.step.StepPlan` puts these pieces together.
All functions return early when no process group exists, so one code path serves one process and DDP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dz_lightning.reuse import flatten_ops, get_stages

__all__ = [
    "CostTable",
    "RankFailedError",
    "Reduced",
    "all_reduce_step",
    "query_costs",
    "rank_and_world",
    "split_coordinates",
]


class RankFailedError(RuntimeError):
    """Raised on every rank when at least one rank failed to estimate its share of the gradient."""


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def query_costs(model: nn.Module, inputs: Tensor) -> dict[str, float]:
    """Relative cost of one query per parameter: the multiply-adds of the forward from its op to the end.

    With feature reuse a query perturbing a late layer recomputes only the end of the network, so late
    coordinates are cheap and early ones dear. For a model without stages every query costs the same (1.0).
    The result depends only on the model and the input shape, so every rank computes the same numbers. A fixed
    0.02 per query stands for the work that does not scale with the network.

    This static count ignores the engine's shortcuts (a perturbed channel stays one channel through channel-wise
    ops), so it can be far from the real cost. :class:`~dz_lightning.ZOModule` uses it only as the
    :class:`CostTable` prior for the first step and splits later steps by measured seconds.

    Args:
        model: the network.
        inputs: a batch ``(B, ...)`` (only shapes matter).
    """
    stages = get_stages(model)
    if stages is None:
        return {n: 1.0 for n, _ in model.named_parameters()}
    ops = flatten_ops(stages)
    macs: list[float] = []
    counter = [0.0]

    def count(module: nn.Module, args: tuple, out: Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            counter[0] += out.numel() * fan_in
        elif isinstance(module, nn.Linear):
            counter[0] += out.numel() * module.in_features
        elif not any(True for _ in module.children()):
            counter[0] += out.numel()  # elementwise work of a leaf (norm, activation, pooling)

    handles = [m.register_forward_hook(count) for op in ops for m in op.modules()]
    h = inputs
    try:
        with torch.no_grad():
            for op in ops:
                counter[0] = 0.0
                h = op(h)
                macs.append(max(counter[0], 1.0))
    finally:
        for handle in handles:
            handle.remove()
    suffix = [sum(macs[j:]) for j in range(len(ops))]
    owner = {id(p): j for j, op in enumerate(ops) for p in op.parameters()}
    # plus a fixed share per query for what does not scale with the network (Python overhead, the loss)
    return {n: suffix[owner[id(p)]] / suffix[0] + 0.02 for n, p in model.named_parameters() if id(p) in owner}


def split_coordinates(
    index: Mapping[str, Tensor],
    rank: int,
    world_size: int,
    costs: Mapping[str, float] | None = None,
) -> dict[str, Tensor]:
    """This rank's contiguous share of the coordinates, balanced by cost.

    Coordinates are ordered by parameter (in ``index``'s order) then by flat index; the ordered list is cut
    into ``world_size`` pieces of nearly equal total cost, where every coordinate of parameter ``name`` costs
    ``costs[name]`` (default 1). The result is a pure function of its arguments, so every rank computes the
    same partition without communicating.

    Args:
        index: name -> flat coordinate indices ``(n_name,)`` to estimate this step.
        rank: this rank, ``0 <= rank < world_size``.
        world_size: number of ranks.
        costs: name -> cost of one coordinate of that parameter, in any unit: measured seconds from a
            :class:`CostTable`, or the static :func:`query_costs`.

    Returns:
        name -> this rank's indices (possibly empty).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Expected 0 <= rank < world_size, but got rank={rank}, world_size={world_size}.")
    if world_size == 1:
        return dict(index)
    if costs is not None:
        bad = {n: c for n, c in costs.items() if not c > 0}
        if bad:
            raise ValueError(f"Expected every cost to be > 0, but got {bad}.")
    names = list(index)
    counts = [index[n].numel() for n in names]
    unit = [float(costs.get(n, 1.0)) if costs else 1.0 for n in names]
    total = math.fsum(cnt * c for cnt, c in zip(counts, unit, strict=True))
    if total == 0:
        return {n: index[n][:0] for n in names}
    lo_cost, hi_cost = total * rank / world_size, total * (rank + 1) / world_size
    out: dict[str, Tensor] = {}
    start_cost = 0.0
    for n, cnt, c in zip(names, counts, unit, strict=True):
        # coordinate j of this parameter occupies [start_cost + j c, start_cost + (j+1) c); it belongs to the
        # rank whose interval contains its midpoint.
        j_lo = max(0, min(cnt, math.ceil((lo_cost - start_cost) / c - 0.5)))
        j_hi = max(0, min(cnt, math.ceil((hi_cost - start_cost) / c - 0.5)))
        if rank == world_size - 1:
            j_hi = cnt
        out[n] = index[n][j_lo:j_hi]
        start_cost += cnt * c
    return out


_MAX_JUMP = 4.0


class CostTable:
    """Seconds per coordinate for every parameter, learned from the all-reduced timings of past steps.

    Before a parameter is measured its cost is its ``prior`` (relative units, e.g. :func:`query_costs`) times a
    scale that converts the prior into seconds (fitted on the parameters measured so far; 1 before any
    measurement). Each :meth:`update` moves a measured parameter's cost towards ``seconds / count`` by an
    exponential moving average (the first measurement replaces the prior; a later one counts at most 4x above or
    below the current estimate, so one disturbed step cannot swing the split). Parameters nobody evaluated keep
    their estimate.

    The table is a pure function of its prior and of the sequence of :meth:`update` arguments, so feeding it only
    all-reduced numbers keeps it (and every :meth:`split`) identical on all ranks.

    Args:
        prior: name -> relative cost of one coordinate before any measurement (missing names: 1).
        momentum: weight of a new measurement in the moving average, in ``(0, 1]``.
    """

    def __init__(self, prior: Mapping[str, float] | None = None, momentum: float = 0.5) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"Expected 0 < momentum <= 1, but got momentum={momentum}.")
        bad = {n: c for n, c in (prior or {}).items() if not c > 0}
        if bad:
            raise ValueError(f"Expected every prior cost to be > 0, but got {bad}.")
        self.prior = {n: float(c) for n, c in (prior or {}).items()}
        self.momentum = float(momentum)
        self.seconds: dict[str, float] = {}  # measured seconds per coordinate
        self.updates = 0

    def _scale(self) -> float:
        measured = [n for n in self.seconds if n in self.prior]
        if not measured:
            return 1.0 if not self.seconds else sum(self.seconds.values()) / len(self.seconds)
        return sum(self.seconds[n] for n in measured) / sum(self.prior[n] for n in measured)

    def costs(self, names: Any = None) -> dict[str, float]:
        """name -> current cost of one coordinate (seconds once measured), for ``names`` (default: all known)."""
        names = list(names) if names is not None else list(dict.fromkeys([*self.prior, *self.seconds]))
        scale = self._scale()
        return {n: self.seconds[n] if n in self.seconds else self.prior.get(n, 1.0) * scale for n in names}

    def split(self, index: Mapping[str, Tensor], rank: int, world_size: int) -> dict[str, Tensor]:
        """:func:`split_coordinates` of ``index`` by the current costs."""
        return split_coordinates(index, rank, world_size, self.costs(index))

    def update(self, seconds: Mapping[str, float], counts: Mapping[str, float]) -> None:
        """Fold in one step's timings: ``seconds[n]`` spent on ``counts[n]`` coordinates of ``n`` (all ranks)."""
        for n, count in counts.items():
            spent = float(seconds.get(n, 0.0))
            if not count > 0 or not spent > 0 or spent != spent or spent == float("inf"):
                continue
            per = spent / float(count)
            old = self.seconds.get(n)
            if old is not None:  # one step's hiccup (another process, a pause) moves an estimate at most 4x
                per = min(max(per, old / _MAX_JUMP), old * _MAX_JUMP)
            self.seconds[n] = per if old is None else (1 - self.momentum) * old + self.momentum * per
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The whole table as plain Python values (for checkpoints)."""
        return {"prior": dict(self.prior), "momentum": self.momentum, "seconds": dict(self.seconds),
                "updates": self.updates}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> CostTable:
        """The table :meth:`state_dict` saved: same costs, so the same split on every rank that loads it."""
        table = cls(state["prior"], state["momentum"])
        table.seconds = {n: float(c) for n, c in state["seconds"].items()}
        table.updates = int(state["updates"])
        return table


@dataclass
class Reduced:
    """What :func:`all_reduce_step` returns, identical on every rank.

    Attributes:
        grads: name -> summed gradient.
        queries: oracle evaluations over all ranks.
        failed: whether any rank failed.
        seconds: name -> seconds all ranks spent on that parameter's coordinates (empty if none were sent).
        counts: name -> coordinates of that parameter evaluated over all ranks (empty if none were sent).
        losses: the summed ``losses`` buffer (``None`` if none was sent).
    """

    grads: dict[str, Tensor]
    queries: int
    failed: bool
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    losses: Tensor | None = None


def all_reduce_step(
    grads: Mapping[str, Tensor],
    queries: int,
    failed: bool,
    seconds: Mapping[str, float] | None = None,
    counts: Mapping[str, float] | None = None,
    losses: Tensor | None = None,
) -> Reduced:
    """Sum partial gradients, query counts, failure flags, timings and losses over all ranks in one collective.

    Args:
        grads: this rank's partial gradient (zero outside its share).
        queries: oracle evaluations spent on this rank.
        failed: whether this rank failed (its grads and timings are then ignored by everyone).
        seconds: name -> seconds this rank spent on its coordinates of ``name`` (names of ``grads``).
        counts: name -> how many coordinates of ``name`` this rank evaluated. Timings travel only when
            ``counts`` is given.
        losses: a flat buffer of per-point losses to sum (exact distributed RGE: each rank's share at its
            positions, zeros elsewhere); it travels in the same collective, in float64.

    Returns:
        The :class:`Reduced` sums. Without a process group the inputs come back unchanged.
    """
    _, world = rank_and_world()
    names = list(grads)
    timed = counts is not None
    seconds = seconds or {}
    if world == 1:
        return Reduced(dict(grads), queries, failed,
                       {n: float(seconds.get(n, 0.0)) for n in names} if timed else {},
                       {n: float(counts.get(n, 0)) for n in names} if timed else {}, losses)
    first = grads[names[0]]
    dtype = torch.float64 if losses is not None else first.dtype  # recorded losses are summed without rounding
    flat = torch.cat([grads[n].reshape(-1).to(dtype) for n in names])
    n_flat = flat.numel()
    parts = [torch.zeros_like(flat) if failed else flat]
    if timed:
        timing = [float(seconds.get(n, 0.0)) for n in names] + [float(counts.get(n, 0)) for n in names]
        timing_t = torch.tensor(timing, dtype=dtype, device=first.device)
        parts.append(torch.zeros_like(timing_t) if failed else timing_t)
    if losses is not None:
        values_t = losses.reshape(-1).to(first.device, dtype)
        parts.append(torch.zeros_like(values_t) if failed else values_t)
    parts.append(torch.tensor([float(queries), 1.0 if failed else 0.0], dtype=dtype, device=first.device))
    buf = torch.cat(parts)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    out, offset = {}, 0
    for n in names:
        numel = grads[n].numel()
        out[n] = buf[offset : offset + numel].view_as(grads[n]).to(grads[n].dtype)
        offset += numel
    sums_s: dict[str, float] = {}
    sums_c: dict[str, float] = {}
    if timed:
        values = buf[n_flat : n_flat + 2 * len(names)].tolist()
        sums_s = dict(zip(names, values[: len(names)], strict=True))
        sums_c = dict(zip(names, values[len(names) :], strict=True))
        offset += 2 * len(names)
    summed = None if losses is None else buf[offset : offset + losses.numel()].view_as(losses).to(losses.dtype)
    return Reduced(out, int(round(float(buf[-2]))), bool(buf[-1] > 0), sums_s, sums_c, summed)

