"""One training step as an engine object: this rank's share of the estimate, one collective, the full gradient.

:class:`StepPlan` is the part of :class:`~dz_lightning.ZOModule`'s step between the oracle and the optimizer, in
plain torch. It has two shapes, chosen by the estimator:

* **coordinate share (CGE)**: the step's coordinates (the masked-in ones) are cut into one contiguous,
  cost-balanced share per rank by a :class:`~dz_lightning.distributed.CostTable`; each rank estimates its share
  with its queries timed per parameter; one all-reduce sums the partial gradients, query counts and timings; every
  rank checks that each coordinate was evaluated exactly once and feeds the summed timings into its table.
* **direction share (RGE)**: every rank draws all directions but evaluates a round-robin share of the points
  (:class:`RecordingOracle`); one all-reduce sums the recorded losses; every rank replays RGE from the same random
  state answered from them (:class:`ReplayOracle`), so the estimate is summed in the single process's order.

With one process both shapes are the plain estimator and the collective returns its inputs: one code path.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dz_lightning import distributed
from dz_lightning.distributed import CostTable, RankFailedError
from dz_lightning.estimators import Estimate, cge, mask_coordinates, params_device, rge, validate_masks
from dz_lightning.oracle import DelegatingOracle, ModuleOracle, Oracle

__all__ = ["RecordingOracle", "ReplayOracle", "StepPlan", "StepTiming"]


@dataclass
class StepTiming:
    """Where this rank's step went (wall seconds, ``time.perf_counter`` stamps).

    Attributes:
        coordinates: seconds this rank spent on its share of the CGE coordinates (0 with one process or RGE).
        reduce_start: when the step's collective started.
        reduce_end: when it ended (``reduce_end - reduce_start``: mostly waiting for the slowest rank).
    """

    coordinates: float
    reduce_start: float
    reduce_end: float


@dataclass
class _Pending:
    """What :meth:`StepPlan.estimate` leaves for :meth:`StepPlan.reduce` within one step."""

    estimate: Estimate
    counts: dict[str, int] | None = None  # CGE: coordinates of each parameter on this rank
    expected: dict[str, int] | None = None  # CGE: coordinates of each parameter in the whole step
    recorder: RecordingOracle | None = None  # RGE: this rank's recorded losses
    generator_state: Tensor | None = None  # RGE: the random state to replay from
    masks: Mapping[str, Tensor] | None = None  # RGE: the masks the directions were drawn with


class StepPlan:
    """A ZO step's estimate and reduction, for one process or any number of DDP ranks (see the module docstring).

    Call :meth:`estimate` (this rank's share), then :meth:`reduce` (every rank, once per step, also after a failed
    estimate, so that no rank waits forever in the collective). The plan keeps the CGE cost table across steps
    (:attr:`cost_table`, saved in checkpoints by the module) and the step in flight between the two calls.

    Args:
        estimator: ``"cge"`` or ``"rge"``.
        mu: finite-difference step.
        q: RGE directions.
        difference: ``"forward"`` or ``"central"``.
        distribution: RGE directions, ``"sphere"`` or ``"gaussian"``.
        nonfinite: ``"raise"`` or ``"skip"`` non-finite perturbed losses.
        generator: CPU generator of the RGE directions (its state is the caller's to save).

    Attributes:
        cost_table: seconds per coordinate for the DDP CGE split; ``None`` until the first DDP step (it starts from
            :func:`~dz_lightning.distributed.query_costs` of a :class:`~dz_lightning.ModuleOracle`'s model).
    """

    def __init__(self, estimator: Literal["cge", "rge"], *, mu: float, q: int, difference: str, distribution: str,
                 nonfinite: str, generator: torch.Generator) -> None:
        self.estimator, self.mu, self.q = estimator, mu, q
        self.difference, self.distribution, self.nonfinite = difference, distribution, nonfinite
        self.generator = generator
        self.cost_table: CostTable | None = None
        self._pending: _Pending | None = None

    def estimate(self, oracle: Oracle, params: Mapping[str, Tensor],
                 masks: Mapping[str, Tensor] | None = None) -> Estimate:
        """This rank's share of the step's estimate (with one process: the whole estimate).

        Under DDP a CGE share is zero outside this rank's coordinates; an RGE share's ``grads`` are meaningless (its
        losses are recorded for :meth:`reduce`, which replays the estimate). Return it unchanged to :meth:`reduce`.
        """
        self._pending = None
        rank, world = distributed.rank_and_world()
        validate_masks(params, masks)
        if self.estimator == "rge":
            settings = self._rge_settings(masks)
            if world == 1:
                return rge(oracle, params, generator=self.generator, **settings)
            recorder = RecordingOracle(oracle, rank, world, self._rge_points(), params_device(params))
            state = self.generator.get_state()
            est = rge(recorder, params, generator=self.generator, **settings)
            self._pending = _Pending(est, recorder=recorder, generator_state=state, masks=masks)
            return est
        if world == 1:
            return cge(oracle, params, mu=self.mu, masks=masks, difference=self.difference, nonfinite=self.nonfinite)
        if self.cost_table is None:
            prior = (distributed.query_costs(oracle.model, oracle.inputs) if isinstance(oracle, ModuleOracle)
                     else None)
            self.cost_table = CostTable(prior)
        index = {n: (mask_coordinates(masks[n]) if masks is not None and n in masks
                     else torch.arange(p.numel(), device=p.device)) for n, p in params.items()}
        coordinates = self.cost_table.split(index, rank, world)
        est = cge(oracle, params, mu=self.mu, masks=masks, difference=self.difference, nonfinite=self.nonfinite,
                  coordinates=coordinates, timed=True)
        self._pending = _Pending(est, counts={n: c.numel() for n, c in coordinates.items()},
                                 expected={n: i.numel() for n, i in index.items()})
        return est

    def reduce(self, params: Mapping[str, Tensor], share: Estimate | None, error: BaseException | None = None,
               queries: int = 0) -> tuple[Estimate, StepTiming]:
        """Every rank: combine the shares into the step's estimate, identical on all ranks.

        Args:
            params: the estimated parameters.
            share: this rank's :meth:`estimate`, or any partial estimate (a subclass's own ``estimate``: its grads
                are summed over the ranks); ``None`` when this rank failed.
            error: this rank's exception, raised here after the collective.
            queries: evaluations this rank spent before failing (used only with ``error``).

        Returns:
            The full estimate (gradient, queries over all ranks, this rank's base loss) and the step's timing.

        Raises:
            RankFailedError: another rank failed, or the ranks split the coordinates inconsistently.
            ValueError: the combined gradient is not finite.
        """
        pending, self._pending = self._pending, None  # the pending share holds the oracle and its cached activations
        _, world = distributed.rank_and_world()
        failed = error is not None or share is None
        grads = ({n: torch.zeros_like(p) for n, p in params.items()} if failed or self._replays(pending, share)
                 else share.grads)
        losses = None
        if self.estimator == "rge" and world > 1:  # the same layout on every rank, whatever happened on it
            losses = (pending.recorder.payload() if not failed and self._replays(pending, share)
                      else torch.zeros(self._rge_points(), dtype=torch.float64, device=params_device(params)))
        counts = pending.counts if pending is not None and pending.counts is not None and not failed else {}
        seconds = pending.estimate.seconds if counts else {}
        start = time.perf_counter()
        reduced = distributed.all_reduce_step(grads, share.queries if not failed else queries, failed,
                                              seconds=seconds, counts=counts, losses=losses)
        timing = StepTiming(sum(seconds.values()), start, time.perf_counter())
        if error is not None:
            raise error
        if reduced.failed:
            raise RankFailedError("Another rank failed to estimate its share of the gradient (see its error); "
                                  "stopping all ranks.")
        grads = reduced.grads
        if pending is not None and pending.expected is not None and self.cost_table is not None:
            _check_split(reduced.counts, pending.expected)
            self.cost_table.update(reduced.seconds, reduced.counts)
        if self._replays(pending, share):
            grads = self._replay(pending, params, reduced.losses)
        # one process: the collective returned the share's grads, which its estimator may already have checked
        checked = world == 1 and share.finite
        if not checked and grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()):
            raise ValueError("The estimated gradient is not finite; refusing to write it into the weights.")
        return Estimate(grads=grads, queries=reduced.queries, loss=share.loss, skipped=share.skipped), timing

    # -------------------------------------------------------------------------------------------- helpers
    def _rge_settings(self, masks: Mapping[str, Tensor] | None) -> dict:
        return {"q": self.q, "mu": self.mu, "distribution": self.distribution, "difference": self.difference,
                "masks": masks, "nonfinite": self.nonfinite}

    def _rge_points(self) -> int:
        """Perturbed points one RGE step evaluates."""
        return self.q * (2 if self.difference == "central" else 1)

    @staticmethod
    def _replays(pending: _Pending | None, share: Estimate | None) -> bool:
        """Whether this step is exact distributed RGE: the share is the recorder's own estimate, unchanged."""
        return pending is not None and pending.recorder is not None and share is pending.estimate

    def _replay(self, pending: _Pending, params: Mapping[str, Tensor], losses: Tensor) -> dict[str, Tensor]:
        """RGE again over the same directions, answered from the all-reduced ``losses`` (the same sums as 1 rank)."""
        base = pending.recorder.base
        generator = torch.Generator()
        generator.set_state(pending.generator_state)
        replay = ReplayOracle(base, losses.to(base.device, base.dtype), pending.recorder.memory_budget)
        return rge(replay, params, generator=generator, **self._rge_settings(pending.masks)).grads


def _check_split(counts: Mapping[str, float], expected: Mapping[str, int]) -> None:
    """Every coordinate evaluated by exactly one rank, judged from all-reduced counts (same verdict on all ranks)."""
    wrong = {n: (counts.get(n, 0.0), e) for n, e in expected.items()
             if e < 2**24 and abs(counts.get(n, 0.0) - e) > 0.5}
    if wrong:
        raise RankFailedError(
            "The ranks split the coordinates inconsistently (parameter: (evaluated, expected)): "
            f"{dict(list(wrong.items())[:5])}. Every rank must see the same batch, masks and cost table."
        )


class RecordingOracle(DelegatingOracle):
    """First pass of an exact distributed RGE step: evaluate a round-robin share of the points, record the losses.

    Point ``g`` of the step (counted over every ``losses`` call, in order) is evaluated on rank ``g % world_size``;
    the wrapper answers 0 for the others, so the estimate computed through it is meaningless. What counts is
    :meth:`payload`: ``(n_points,)`` float64 losses, zero outside this rank's share. Summed over the ranks (exactly:
    every entry has one non-zero term), it holds every loss of the step, and each rank replays the estimator through
    a :class:`ReplayOracle` with the same random state. The estimate is then built in the same order as on one
    process, so it matches one process bit for bit whenever each loss does. ``queries`` counts only the points this
    rank evaluated (and the base point).

    Args:
        oracle: the real oracle.
        rank: this rank.
        world_size: number of ranks.
        n_points: perturbed points the estimator will ask for this step (``q``, or ``2q`` for central differences).
        device: where the payload lives (the parameters' device, so NCCL can reduce it).
    """

    def __init__(self, oracle: Oracle, rank: int, world_size: int, n_points: int,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(oracle)
        self.rank, self.world_size, self.n_points = rank, world_size, n_points
        self.base: Tensor | None = None
        self._values = torch.zeros(n_points, dtype=torch.float64, device=device)
        self._cursor = 0

    def loss(self, params: Mapping[str, Tensor]) -> Tensor:
        self.base = super().loss(params)
        return self.base

    def _delegate_losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        k = next(iter(varied.values())).shape[0]
        start = self._cursor
        if start + k > self.n_points:
            raise RuntimeError(f"The estimator asked for more than the expected {self.n_points} perturbed points.")
        self._cursor += k
        mine = ((torch.arange(start, start + k) % self.world_size) == self.rank).nonzero().reshape(-1)
        ref = self.base if self.base is not None else torch.zeros(())
        out = torch.zeros(k, dtype=ref.dtype, device=ref.device)
        if mine.numel():
            values = self.inner.losses(params, {n: v[mine.to(v.device)] for n, v in varied.items()}).reshape(-1)
            out = out.to(values.dtype)
            out[mine.to(out.device)] = values.to(out.device)
            self._values[(start + mine).to(self._values.device)] = values.to(self._values.device, torch.float64)
        return out

    def payload(self) -> Tensor:
        """This rank's losses at their positions, zeros elsewhere: ``(n_points,)`` float64."""
        if self._cursor != self.n_points:
            raise RuntimeError(f"The estimator asked for {self._cursor} perturbed points, expected {self.n_points}.")
        return self._values


class ReplayOracle(Oracle):
    """Second pass of an exact distributed RGE step: answer the estimator's queries from all-reduced losses.

    It evaluates nothing, so its ``queries`` stay 0.

    Args:
        base: the loss at the unperturbed point (every rank evaluated it).
        values: every perturbed point's loss, in the order the estimator asks for them.
        memory_budget: the recorded oracle's budget, so that the estimator chunks (and draws) its directions as it
            did when recording.
    """

    def __init__(self, base: Tensor, values: Tensor, memory_budget: int | None = None) -> None:
        super().__init__()
        self.base, self.values, self.memory_budget = base, values, memory_budget
        self._cursor = 0

    def _evaluations(self, points: int) -> int:
        return 0  # answered from memory

    def _loss(self, params: Mapping[str, Tensor]) -> Tensor:
        return self.base

    def _losses(self, params: Mapping[str, Tensor], varied: Mapping[str, Tensor]) -> Tensor:
        k = next(iter(varied.values())).shape[0]
        out = self.values[self._cursor : self._cursor + k]
        if out.numel() != k:
            raise RuntimeError("The estimator asked for more points on replay than were recorded.")
        self._cursor += k
        return out
