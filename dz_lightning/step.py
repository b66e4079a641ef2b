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
from dz_lightning.oracle import ModuleOracle
from dz_lightning.oracle_base import DelegatingOracle, Oracle

__all__ = ["RecordingOracle", "ReplayOracle", "StepPlan", "StepShare", "StepTiming"]


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


@dataclass(frozen=True)
class _Replay:
    """What an exact distributed RGE share needs for its replay: the recorded losses and the random state."""

    recorder: RecordingOracle
    generator_state: Tensor
    masks: Mapping[str, Tensor] | None


class StepShare:
    """This rank's share of one step's estimate, for :meth:`StepPlan.reduce` to combine over the ranks.

    Opaque: before the reduction its gradient may mean nothing (an exact distributed RGE share holds recorded losses;
    the gradient comes from replaying them), so post-processing belongs to the reduced estimate
    (:meth:`~dz_lightning.ZOModule.process_estimate`). :meth:`StepPlan.estimate` makes the plan's own shares;
    ``StepShare(estimate)`` makes one of an estimate whose ``grads`` are this rank's partial gradient (summed over the
    ranks: with ``world`` ranks that each compute the whole gradient, pass ``grads / world``).

    Args:
        estimate: this rank's partial estimate.

    Attributes:
        queries: oracle evaluations this rank spent on its share.
        loss: the loss at the unperturbed parameters on this rank.
    """

    __slots__ = ("_counts", "_estimate", "_expected", "_replay")

    def __init__(self, estimate: Estimate) -> None:
        if not isinstance(estimate, Estimate):
            raise TypeError(f"Expected `estimate` to be an Estimate, but got {type(estimate).__name__}.")
        self._estimate = estimate
        self._counts: dict[str, int] | None = None  # CGE: coordinates of each parameter on this rank
        self._expected: dict[str, int] | None = None  # CGE: coordinates of each parameter in the whole step
        self._replay: _Replay | None = None  # exact distributed RGE

    @property
    def queries(self) -> int:
        return self._estimate.queries

    @property
    def loss(self) -> float:
        return self._estimate.loss

    def __repr__(self) -> str:
        kind = "rge replay" if self._replay is not None else "cge split" if self._counts is not None else "partial"
        return f"StepShare({kind}, queries={self.queries}, loss={self.loss:.6g})"


class StepPlan:
    """A ZO step's estimate and reduction, for one process or any number of DDP ranks (see the module docstring).

    Call :meth:`estimate` (this rank's share), then :meth:`reduce` (every rank, once per step, also after a failed
    estimate, so that no rank waits forever in the collective). The plan keeps the CGE cost table across steps
    (:attr:`cost_table`, saved in checkpoints by the module); what one step carries from :meth:`estimate` to
    :meth:`reduce` is the :class:`StepShare` that :meth:`estimate` returns.

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

    def estimate(self, oracle: Oracle, params: Mapping[str, Tensor],
                 masks: Mapping[str, Tensor] | None = None) -> StepShare:
        """This rank's share of the step's estimate (with one process: the whole estimate), for :meth:`reduce`.

        Under DDP a CGE share covers this rank's coordinates; an RGE share records the losses of this rank's points
        (:meth:`reduce` all-reduces them and replays RGE from the same random state).
        """
        rank, world = distributed.rank_and_world()
        validate_masks(params, masks)
        if self.estimator == "rge":
            settings = self._rge_settings(masks)
            if world == 1:
                return StepShare(rge(oracle, params, generator=self.generator, **settings))
            recorder = RecordingOracle(oracle, rank, world, self._rge_points(), params_device(params))
            state = self.generator.get_state()
            share = StepShare(rge(recorder, params, generator=self.generator, **settings))
            share._replay = _Replay(recorder, state, masks)
            return share
        if world == 1:
            return StepShare(cge(oracle, params, mu=self.mu, masks=masks, difference=self.difference,
                                 nonfinite=self.nonfinite))
        if self.cost_table is None:
            prior = (distributed.query_costs(oracle.model, oracle.inputs) if isinstance(oracle, ModuleOracle)
                     else None)
            self.cost_table = CostTable(prior)
        index = {n: (mask_coordinates(masks[n]) if masks is not None and n in masks
                     else torch.arange(p.numel(), device=p.device)) for n, p in params.items()}
        coordinates = self.cost_table.split(index, rank, world)
        share = StepShare(cge(oracle, params, mu=self.mu, masks=masks, difference=self.difference,
                              nonfinite=self.nonfinite, coordinates=coordinates, timed=True))
        share._counts = {n: c.numel() for n, c in coordinates.items()}
        share._expected = {n: i.numel() for n, i in index.items()}
        return share

    def reduce(self, params: Mapping[str, Tensor], share: StepShare | None, error: BaseException | None = None,
               queries: int = 0) -> tuple[Estimate, StepTiming]:
        """Every rank: combine the shares into the step's estimate, identical on all ranks.

        Args:
            params: the estimated parameters.
            share: this rank's :meth:`estimate`, or a :class:`StepShare` of a partial estimate (its grads are summed
                over the ranks); ``None`` when this rank failed.
            error: this rank's exception, raised here after the collective.
            queries: evaluations this rank spent before failing (used only with ``error``).

        Returns:
            The full estimate (gradient, queries over all ranks, this rank's base loss) and the step's timing.

        Raises:
            TypeError: ``share`` is not a :class:`StepShare` (raised before the collective: a programming error).
            RankFailedError: another rank failed, or the ranks split the coordinates inconsistently.
            ValueError: the combined gradient is not finite.
        """
        if share is not None and not isinstance(share, StepShare):
            raise TypeError(f"Expected `share` to be a StepShare (from StepPlan.estimate, or StepShare(estimate) for a "
                            f"partial estimate), but got {type(share).__name__}.")
        _, world = distributed.rank_and_world()
        failed = error is not None or share is None
        replay = None if failed else share._replay
        grads = ({n: torch.zeros_like(p) for n, p in params.items()} if failed or replay is not None
                 else share._estimate.grads)
        losses = None
        if self.estimator == "rge" and world > 1:  # the same layout on every rank, whatever happened on it
            losses = (replay.recorder.payload() if replay is not None
                      else torch.zeros(self._rge_points(), dtype=torch.float64, device=params_device(params)))
        counts = share._counts if not failed and share._counts is not None else {}
        seconds = share._estimate.seconds if counts else {}
        start = time.perf_counter()
        reduced = distributed.all_reduce_step(grads, share.queries if not failed else queries, failed,
                                              seconds=seconds, counts=counts, losses=losses)
        timing = StepTiming(sum(seconds.values()), start, time.perf_counter())
        if error is not None:
            raise error
        if reduced.failed:
            raise RankFailedError("Another rank failed to estimate its share of the gradient (see its error); "
                                  "stopping all ranks.")
        return self._combine(params, share, reduced, world), timing

    def _combine(self, params: Mapping[str, Tensor], share: StepShare, reduced: distributed.Reduced,
                 world: int) -> Estimate:
        """The step's estimate from this rank's share and the all-reduced sums."""
        grads, est = reduced.grads, share._estimate
        if share._expected is not None and self.cost_table is not None:
            _check_split(reduced.counts, share._expected)
            self.cost_table.update(reduced.seconds, reduced.counts)
        if share._replay is not None:
            grads = self._replay(share._replay, params, reduced.losses)
        # one process: the collective returned the share's grads, which its estimator may already have checked
        checked = world == 1 and est.finite
        if not checked and grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()):
            raise ValueError("The estimated gradient is not finite; refusing to write it into the weights.")
        return Estimate(grads=grads, queries=reduced.queries, loss=est.loss, skipped=est.skipped)

    # -------------------------------------------------------------------------------------------- helpers
    def _rge_settings(self, masks: Mapping[str, Tensor] | None) -> dict:
        return {"q": self.q, "mu": self.mu, "distribution": self.distribution, "difference": self.difference,
                "masks": masks, "nonfinite": self.nonfinite}

    def _rge_points(self) -> int:
        """Perturbed points one RGE step evaluates."""
        return self.q * (2 if self.difference == "central" else 1)

    def _replay(self, replay: _Replay, params: Mapping[str, Tensor], losses: Tensor) -> dict[str, Tensor]:
        """RGE again over the same directions, answered from the all-reduced ``losses`` (the same sums as 1 rank)."""
        base = replay.recorder.base
        generator = torch.Generator()
        generator.set_state(replay.generator_state)
        oracle = ReplayOracle(base, losses.to(base.device, base.dtype), replay.recorder.memory_budget)
        return rge(oracle, params, generator=generator, **self._rge_settings(replay.masks)).grads


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
