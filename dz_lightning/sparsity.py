"""Pruning-at-initialization scores (GraSP, ZO-GraSP), layer-wise pruning ratios and sparse gradient masks.

DeepZero's recipe: score the randomly initialized network with GraSP computed from loss queries only, prune
globally at the target sparsity, keep only the resulting layer-wise pruning ratios (LPRs), then train the dense
model while CGE estimates a random subset of each layer's coordinates at its LPR, redrawn every few epochs.
Masks are plain bool tensors (no ``torch.nn.utils.prune``: it renames parameters and breaks checkpoints).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dz_lightning.estimators import direction_chunk, loss_difference
from dz_lightning.oracle_base import DelegatingOracle, NonFiniteLossError, Oracle
from dz_lightning.query import frozen_batchnorm_stats
from dz_lightning.validation import check_positive_float, check_positive_int

__all__ = [
    "RestrictedOracle",
    "check_sparsity",
    "class_balanced_sample",
    "draw_masks",
    "grasp_scores",
    "layerwise_ratios",
    "mask_gradients",
    "per_tensor_rge",
    "prunable_among",
    "prunable_parameters",
    "random_ratios",
    "realized_density",
    "uniform_ratios",
    "zo_grasp_scores",
]

_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def check_sparsity(sparsity: float) -> None:
    """Raise ``ValueError`` unless ``sparsity`` is a number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"Expected argument `sparsity` to be a float in [0, 1), but got {sparsity!r}.")


def prunable_parameters(model: nn.Module, extra_dense: Iterable[str] = ()) -> list[str]:
    """Names of the conv/linear weights of ``model``: the parameters that get masks.

    Everything else (BatchNorm weights and biases, all biases) is estimated densely, as in the paper.

    Args:
        model: the network.
        extra_dense: further parameter names to keep dense (e.g. the classifier's weight).

    Raises:
        ValueError: the model has no prunable layer.
    """
    dense = set(extra_dense)
    names = [f"{mod_name}.weight" if mod_name else "weight" for mod_name, mod in model.named_modules()
             if isinstance(mod, _PRUNABLE) and mod.weight is not None and mod.weight.requires_grad]
    names = [n for n in names if n not in dense]
    if not names:
        raise ValueError(f"{type(model).__name__} has no prunable layer (Conv1d/2d/3d or Linear weight) to mask.")
    return names


def prunable_among(module: nn.Module, params: Mapping[str, Tensor], extra_dense: Iterable[str] = ()) -> list[str]:
    """Names in ``params`` of the conv/linear weights found anywhere inside ``module``, matched by identity.

    The names are those of ``params`` (for example a LightningModule's ``zo_parameters()``), whatever attribute
    holds the network (``self.model``, ``self.net``, ...) and whatever prefix the names carry; a weight that is not
    among ``params`` is left out. Order: ``module.named_modules()``.

    Args:
        module: the object that owns the network (e.g. the LightningModule).
        params: name -> parameter tensor, the coordinates the estimator perturbs.
        extra_dense: further names (keys of ``params``) to keep dense.

    Raises:
        ValueError: none of ``params`` is a conv/linear weight of ``module``.
    """
    name_of = {id(p): n for n, p in params.items()}
    dense = set(extra_dense)
    names: list[str] = []
    for mod in module.modules():
        weight = getattr(mod, "weight", None) if isinstance(mod, _PRUNABLE) else None
        name = name_of.get(id(weight)) if weight is not None and weight.requires_grad else None
        if name is not None and name not in dense and name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"{type(module).__name__} has no prunable layer (Conv1d/2d/3d or Linear weight) among the "
                         f"{len(params)} parameters given ({sorted(params)[:5]}...).")
    return names


def class_balanced_sample(batches: Iterable[Any], per_class: int = 25,
                          num_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """Up to ``per_class`` examples of every class, taken in order from ``(inputs, targets)`` batches.

    Args:
        batches: e.g. a DataLoader yielding ``(x (B, ...), y (B,))``.
        per_class: examples kept per class.
        num_classes: stop early once every one of these classes is full; ``None`` reads all batches.

    Returns:
        ``(inputs (N, ...), targets (N,))`` grouped by class.
    """
    check_positive_int("per_class", per_class)
    xs: dict[int, list[Tensor]] = {}
    for batch in batches:
        x, y = batch[0], batch[1]
        for xi, yi in zip(x, y.tolist(), strict=True):
            bucket = xs.setdefault(int(yi), [])
            if len(bucket) < per_class:
                bucket.append(xi)
        if num_classes is not None and len(xs) >= num_classes and all(len(v) >= per_class for v in xs.values()):
            break
    if not xs:
        raise ValueError("The data yielded no examples to score the network with.")
    labels = sorted(xs)
    inputs = torch.stack([x for c in labels for x in xs[c]])
    targets = torch.tensor([c for c in labels for _ in xs[c]], device=inputs.device)
    return inputs, targets


def grasp_scores(model: nn.Module, loss_fn: Any, inputs: Tensor, targets: Tensor,
                 names: list[str] | None = None, temperature: float = 200.0) -> dict[str, Tensor]:
    r"""First-order GraSP scores :math:`-\theta \odot Hg` with autograd (FO only: reference and comparison).

    :math:`g = \nabla \ell(\theta)` and :math:`Hg = \nabla_\theta (g^\top \mathrm{sg}(g))`, with the loss taken
    at ``model(inputs) / temperature`` (softened logits, as in GraSP and DeepZero's code, whose reference uses 200).
    BatchNorm running statistics are not updated.

    Args:
        model: the network.
        loss_fn: ``loss_fn(outputs, targets) -> 0-d``.
        inputs: ``(N, ...)``.
        targets: ``(N,)``.
        names: parameters to score; default :func:`prunable_parameters`.
        temperature: the outputs (logits) are divided by it before ``loss_fn``; 1 scores the plain loss.
    """
    check_positive_float("temperature", temperature)
    names = names or prunable_parameters(model)
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    with torch.enable_grad(), frozen_batchnorm_stats(model):
        loss = loss_fn(model(inputs) / temperature, targets)
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        gdotg = sum((g * g.detach()).sum() for g in grads)
        hg = torch.autograd.grad(gdotg, weights)
    return {n: (-w.detach() * h).detach() for n, w, h in zip(names, weights, hg, strict=True)}


def per_tensor_rge(oracle: Oracle, params: Mapping[str, Tensor], q: int = 192, mu: float = 5e-3,
                   generator: torch.Generator | None = None, chunk: int = 64) -> tuple[dict[str, Tensor], int]:
    r"""DeepZero's RGE for ZO-GraSP: directions normalized per tensor and scaled by ``mu``, no dimension factor.

    For every direction :math:`k` and tensor :math:`l`, :math:`v_{k,l} = \mu\, z_{k,l} / \lVert z_{k,l}\rVert`
    with :math:`z \sim \mathcal N(0, I)`; all tensors move together and

    .. math:: \hat g = \frac{1}{q} \sum_{k=1}^{q} \frac{f(\theta + v_k) - f(\theta)}{\mu} v_k .

    Its expectation is :math:`\mu\, \mathrm{diag}(1 / n_l)\, \nabla f` to first order (:math:`n_l`: the size of
    tensor :math:`l`): a per-layer rescaling of the gradient, which is what ZO-GraSP's layer-wise ratios are made of.

    Args:
        oracle: the loss oracle (it must accept points that vary every entry of ``params``).
        params: name -> value of the perturbed tensors.
        q: directions.
        mu: step; also the length of each tensor's share of a direction.
        generator: CPU generator of the directions.
        chunk: most directions evaluated per batched oracle call; fewer when ``oracle.memory_budget`` cannot hold
            them (:func:`~dz_lightning.estimators.direction_chunk`).

    Returns:
        ``(estimate, queries)``: name -> tensor of ``params[name]``'s shape, and the ``q + 1`` queries spent.

    Raises:
        NonFiniteLossError: a loss was not finite.
    """
    check_positive_int("q", q)
    check_positive_float("mu", mu)
    start = oracle.queries
    f0 = oracle.loss(params)
    grads = {n: torch.zeros_like(v) for n, v in params.items()}
    chunk = direction_chunk(oracle, params, chunk, 5)  # z, mu * z, v, the point, the forward's copy
    bad = (~torch.isfinite(f0)).to(torch.int64)  # non-finite losses, read once at the end (0 when all is well)
    for begin in range(0, q, chunk):
        k = min(chunk, q - begin)
        dirs = {}
        for name, value in params.items():
            z = torch.randn((k, *value.shape), generator=generator, dtype=value.dtype)
            norm = z.reshape(k, -1).norm(dim=1).reshape(k, *([1] * value.dim()))
            dirs[name] = (mu * z / (norm + 1e-8)).to(value.device)
        plus = oracle.losses(params, {n: params[n].detach().unsqueeze(0) + v for n, v in dirs.items()})
        coeff = loss_difference(plus, f0) / mu
        bad = bad + (~torch.isfinite(coeff)).sum().to(bad.device)
        for name, v in dirs.items():
            grads[name] += torch.tensordot(coeff.to(v.device, v.dtype), v, dims=1) / q
    if int(bad):  # the call's one host read
        raise NonFiniteLossError("ZO-GraSP's RGE got a non-finite loss; lower `mu` or check the model and data.")
    return grads, oracle.queries - start


def zo_grasp_scores(oracle: Oracle, params: Mapping[str, Tensor], names: list[str], q: int = 192,
                    mu: float = 5e-3, generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], int]:
    r"""ZO-GraSP scores from loss queries only, as DeepZero's code computes them.

    With :func:`per_tensor_rge` over the weights in ``names`` (``q`` directions normalized per tensor, step ``mu``):
    :math:`g_0 = \hat\nabla \ell(\theta)`, :math:`g_1 = \hat\nabla \ell(\theta + \mu g_0)` with fresh
    directions, :math:`Hg \approx (g_1 - g_0) / \mu` and score :math:`= -\theta \odot Hg`. Only the layer-wise
    ratios of a global prune of these scores are used (:func:`layerwise_ratios`).

    Returns:
        ``(scores, queries)``: ``2 (q + 1)`` queries.
    """
    check_positive_int("q", q)
    check_positive_float("mu", mu)
    sub = {n: params[n].detach() for n in names}
    restricted = RestrictedOracle(oracle, params)
    start = oracle.queries
    g0, _ = per_tensor_rge(restricted, sub, q=q, mu=mu, generator=generator)
    shifted = {n: sub[n] + mu * g0[n] for n in names}
    g1, _ = per_tensor_rge(restricted, shifted, q=q, mu=mu, generator=generator)
    scores = {n: -sub[n] * (g1[n] - g0[n]) / mu for n in names}
    return scores, oracle.queries - start


class RestrictedOracle(DelegatingOracle):
    """An oracle over a subset of the parameters: the others stay at ``fixed``.

    Args:
        oracle: the oracle over all parameters.
        fixed: name -> value of every parameter; the names a call passes override these.
    """

    def __init__(self, oracle: Oracle, fixed: Mapping[str, Tensor]) -> None:
        super().__init__(oracle)
        self.fixed = fixed

    def _inner_params(self, params: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        return {**self.fixed, **params}


def layerwise_ratios(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, float]:
    """Layer-wise pruning ratios of one global unstructured prune keeping the largest ``|score|``.

    A layer whose scores are all zero cannot be ranked: GraSP's score ``-theta * Hg`` is zero for a layer initialized
    at zero (a SOL corrector's output layer), and a global prune would take all of it, freezing the layer for good.
    Such a layer gets the global ratio ``sparsity`` instead (one warning names it); the other layers share one global
    prune at ``sparsity``, so the overall density is the same.

    Args:
        scores: name -> scores, any shapes.
        sparsity: fraction of all scored entries pruned, in [0, 1).

    Returns:
        name -> fraction of that layer pruned.
    """
    check_sparsity(sparsity)
    flat = {name: s.detach().abs().reshape(-1).float().cpu() for name, s in scores.items()}
    unscored = [name for name, s in flat.items() if s.numel() and not bool(s.any())]
    ranked = [name for name in flat if name not in unscored]
    if unscored:
        warnings.warn(f"GraSP cannot score {unscored} (all scores zero, e.g. a layer initialized at zero): "
                      f"{'they get' if len(unscored) > 1 else 'it gets'} the global ratio {sparsity} instead of "
                      "being pruned whole.", stacklevel=2)
    ratios = dict.fromkeys(unscored, float(sparsity))
    if ranked:
        joined = torch.cat([flat[name] for name in ranked])
        n_keep = round((1 - sparsity) * joined.numel())
        keep = torch.zeros(joined.numel(), dtype=torch.bool)
        keep[torch.argsort(joined, descending=True, stable=True)[:n_keep]] = True
        offset = 0
        for name in ranked:
            kept = int(keep[offset : offset + flat[name].numel()].sum())
            ratios[name] = 1.0 - kept / flat[name].numel()
            offset += flat[name].numel()
    return {name: ratios[name] for name in scores}


def random_ratios(params: Mapping[str, Tensor], names: list[str], sparsity: float,
                  generator: torch.Generator | None = None) -> dict[str, float]:
    """LPRs of a global prune of random scores (ablation): every layer ends near ``sparsity``, with noise."""
    scores = {n: torch.rand(params[n].shape, generator=generator) for n in names}
    return layerwise_ratios(scores, sparsity)


def uniform_ratios(names: list[str], sparsity: float) -> dict[str, float]:
    """Every layer pruned at exactly ``sparsity`` (ablation)."""
    check_sparsity(sparsity)
    return {n: float(sparsity) for n in names}


def draw_masks(params: Mapping[str, Tensor], ratios: Mapping[str, float],
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Random per-layer gradient masks at the given pruning ratios.

    Layer ``name`` keeps exactly ``round((1 - ratios[name]) * numel)`` coordinates, drawn uniformly from a
    seeded generator. Parameters not in ``ratios`` get no mask (estimated densely).

    Returns:
        name -> bool tensor of the parameter's shape, on its device.
    """
    masks = {}
    for name, ratio in ratios.items():
        if name not in params:
            raise ValueError(f"`ratios` names {name!r}, which is not a parameter; valid names: {sorted(params)}.")
        if not 0 <= ratio <= 1:
            raise ValueError(f"Expected the ratio of {name!r} to be in [0, 1], but got {ratio!r}.")
        p = params[name]
        keep = round((1 - ratio) * p.numel())
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        mask[torch.randperm(p.numel(), generator=generator)[:keep]] = True
        masks[name] = mask.reshape(p.shape).to(p.device)
    return masks


def realized_density(masks: Mapping[str, Tensor]) -> float:
    """Fraction of the masked layers' coordinates that are estimated."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def mask_gradients(params: dict[str, Tensor], masks: dict[str, Tensor] | None) -> None:
    """Zero the gradient of every masked-out coordinate, in place: a first-order step restricted to the coordinates
    that sparse CGE would estimate (``masks``: name of ``params`` -> bool mask; unmasked parameters keep theirs)."""
    for name, mask in (masks or {}).items():
        grad = params[name].grad
        if grad is not None:
            grad.mul_(mask.to(grad.dtype))
