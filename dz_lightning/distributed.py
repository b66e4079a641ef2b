"""Forward parallelization: split one step's coordinates across ranks, then sum the partial gradients.

Every rank holds the same parameters, the same batch and the same masks. Each takes a cost-balanced,
contiguous share of the step's coordinates, estimates those, and a single ``all_reduce`` (sum) of one flat
buffer gives every rank the full gradient. The buffer also carries a failure flag and the query count, so a
rank whose oracle failed makes *every* rank raise after the same collective instead of hanging.
All functions return early when no process group exists, so one code path serves one process and DDP.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["RankFailedError", "all_reduce_estimate", "query_costs", "rank_and_world", "split_coordinates"]


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

    Args:
        model: the network.
        inputs: a batch ``(B, ...)`` (only shapes matter).
    """
    from dz_lightning.reuse import flatten_ops, get_stages

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
        costs: name -> relative cost of one query perturbing that parameter (e.g. the fraction of the
            forward it recomputes with feature reuse).

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
    counts = torch.tensor([index[n].numel() for n in names], dtype=torch.float64)
    unit = torch.tensor([float(costs.get(n, 1.0)) if costs else 1.0 for n in names], dtype=torch.float64)
    total = float((counts * unit).sum())
    if total == 0:
        return {n: index[n][:0] for n in names}
    lo_cost, hi_cost = total * rank / world_size, total * (rank + 1) / world_size
    out: dict[str, Tensor] = {}
    start_cost = 0.0
    for n, cnt, c in zip(names, counts.tolist(), unit.tolist(), strict=True):
        cnt = int(cnt)
        # coordinate j of this parameter occupies [start_cost + j c, start_cost + (j+1) c); it belongs to the
        # rank whose interval contains its midpoint.
        j_lo = max(0, min(cnt, int(torch.ceil(torch.tensor((lo_cost - start_cost) / c - 0.5)).item())))
        j_hi = max(0, min(cnt, int(torch.ceil(torch.tensor((hi_cost - start_cost) / c - 0.5)).item())))
        if rank == world_size - 1:
            j_hi = cnt
        out[n] = index[n][j_lo:j_hi]
        start_cost += cnt * c
    return out


def all_reduce_estimate(
    grads: Mapping[str, Tensor], queries: int, failed: bool
) -> tuple[dict[str, Tensor], int, bool]:
    """Sum partial gradients, query counts and failure flags over all ranks in one collective.

    Args:
        grads: this rank's partial gradient (zero outside its share).
        queries: oracle evaluations spent on this rank.
        failed: whether this rank failed (its grads are then ignored by everyone).

    Returns:
        ``(grads, total_queries, any_failed)``, identical on every rank.
    """
    _, world = rank_and_world()
    if world == 1:
        return dict(grads), queries, failed
    names = list(grads)
    first = grads[names[0]]
    flat = torch.cat([grads[n].reshape(-1).to(first.dtype) for n in names])
    extra = torch.tensor([float(queries), 1.0 if failed else 0.0], dtype=first.dtype, device=first.device)
    buf = torch.cat([torch.zeros_like(flat) if failed else flat, extra])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    out, offset = {}, 0
    for n in names:
        numel = grads[n].numel()
        out[n] = buf[offset : offset + numel].view_as(grads[n]).to(grads[n].dtype)
        offset += numel
    return out, int(round(float(buf[-2]))), bool(buf[-1] > 0)
