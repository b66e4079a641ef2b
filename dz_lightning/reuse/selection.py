"""Which propagation rule runs at which node: a registry of rules, looked up by precedence.

Every rule of :mod:`dz_lightning.reuse.rules` is registered with :func:`register` beside its function, as a
:class:`Rule`: its predicate on the node (a :class:`Site`), the state kinds it accepts from its inputs, the kind it
gives, its precedence and whether it calls the user's code. :func:`select` runs once per parameter and node when the
engine is built: the rule of highest precedence (lowest number) that accepts the site's kinds and whose predicate
holds. ``generic_rule`` accepts every site, with the lowest precedence.

State kinds: ``"chan"`` (one channel per query), ``"full"`` (a whole difference), ``"parts"`` (a tuple of
differences), and ``"start"`` for a node where the perturbation starts (it reads the perturbed parameter).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from dz_lightning.reuse.graph import Node, Ref

__all__ = ["RULES", "Change", "Rule", "Site", "is_tensors", "register", "select"]

STATE_KINDS = frozenset({"chan", "full", "parts", "start"})


@dataclasses.dataclass
class Site:
    """A node as the selection sees it: its inputs' state kinds and the cached values.

    Attributes:
        node: the node.
        changed: input node -> the kind of its state, for the inputs that carry changes.
        values: every node's cached value (the node's own at ``node_index``).
        node_index: the node's index.
        local: the local name of the perturbed parameter when the perturbation starts here, else ``None``.
    """

    node: Node
    changed: Mapping[int, str]
    values: Sequence[Any]
    node_index: int
    local: str | None = None

    @property
    def value(self) -> Any:
        return self.values[self.node_index]

    @property
    def kinds(self) -> frozenset[str]:
        """The state kinds that reach the node (``"start"`` included where the perturbation starts)."""
        return frozenset(self.changed.values()) | ({"start"} if self.local is not None else set())

    @property
    def key(self) -> Any:
        """What a function or method node computes (its target); ``None`` for other nodes."""
        return self.node.target if self.node.kind in ("function", "method") else None

    @property
    def refs(self) -> list[int]:
        """The inputs whose values are tensors, in argument order."""
        return [j for j in self.node.refs() if isinstance(self.values[j], Tensor)]

    @property
    def input_kind(self) -> str:
        """The kind of the first tensor input's state (of the one changed input if the first carries none)."""
        refs = self.refs
        return self.changed[refs[0]] if refs and refs[0] in self.changed else next(iter(self.changed.values()))

    def changes_first(self) -> bool:
        """The first argument is a node whose state carries a change, and the only tensor input."""
        a = self.node.args[0] if self.node.args else None
        return len(self.refs) == 1 and isinstance(a, Ref) and a.index in self.changed

    def one_module_input(self) -> bool:
        """A module node with one tensor input, which carries the only change."""
        return self.node.kind == "module" and len(self.changed) == 1 and len(self.refs) == 1

    def shapes_match(self) -> bool:
        """Every changed input has the node's output shape."""
        return all(self.values[j].shape == self.value.shape for j in self.changed)


Change = tuple[Tensor, Tensor | None]


@dataclasses.dataclass(frozen=True)
class Rule:
    """A propagation rule and when it applies.

    Attributes:
        name: the rule's name, as :meth:`~dz_lightning.reuse.engine.GraphEngine.rules` reports it.
        apply: ``apply(ctx, i, states, query) -> Change``: node ``i``'s change from its inputs' states.
        match: the predicate on the :class:`Site`.
        accepts: the state kinds the rule takes from its inputs (a site's kinds must all be among them).
        gives: the kind of the state it returns; ``"same"``: the kind of its input's state.
        precedence: lower runs first where several rules match; unique.
        user_code: whether it calls the node's own code (the engine's self-check runs every such node once).
        returns: what the nodes it applies to return: ``"tensor"`` and/or ``"tuple"`` (a tuple of tensors).
    """

    name: str
    apply: Callable[..., Change]
    match: Callable[[Site], bool]
    accepts: frozenset[str]
    gives: str
    precedence: int
    user_code: bool = False
    returns: frozenset[str] = frozenset({"tensor"})


RULES: list[Rule] = []  # in order of precedence


def register(*, precedence: int, accepts: set[str] | frozenset[str], gives: str,
             match: Callable[[Site], bool] = lambda site: True, user_code: bool = False,
             returns: tuple[str, ...] = ("tensor",)) -> Callable[[Callable[..., Change]], Callable[..., Change]]:
    """A decorator that registers the rule function it decorates (several times for several predicates).

    Raises:
        ValueError: ``precedence`` is taken, or ``accepts`` / ``gives`` name an unknown state kind.
    """
    if not set(accepts) <= STATE_KINDS or gives not in STATE_KINDS - {"start"} | {"same"}:
        raise ValueError(f"Expected `accepts` within {sorted(STATE_KINDS)} and `gives` one of chan, full, parts, "
                         f"same, but got {sorted(accepts)} and {gives!r}.")

    def add(apply: Callable[..., Change]) -> Callable[..., Change]:
        taken = {r.precedence: r.name for r in RULES}
        if precedence in taken:
            raise ValueError(f"Precedence {precedence} of {apply.__name__} is taken by {taken[precedence]}.")
        rule = Rule(apply.__name__, apply, match, frozenset(accepts), gives, precedence, user_code, frozenset(returns))
        RULES.insert(bisect.bisect([r.precedence for r in RULES], precedence), rule)
        return apply

    return add


def select(site: Site) -> tuple[Rule, str]:
    """The rule of ``site`` and the kind of the state it gives (``"parts"`` for a node returning a tuple)."""
    tuples = is_tensors(site.value)
    kinds, returns = site.kinds, "tuple" if tuples else "tensor"
    rule = next(r for r in RULES if returns in r.returns and kinds <= r.accepts and r.match(site))
    if tuples:
        return rule, "parts"
    return rule, site.input_kind if rule.gives == "same" else rule.gives


def is_tensors(value: Any) -> bool:
    """A tuple of tensors (``None`` allowed, as ``nn.MultiheadAttention``'s weights when not asked for)."""
    return (isinstance(value, (tuple, list)) and any(isinstance(v, Tensor) for v in value)
            and all(isinstance(v, Tensor) or v is None for v in value))
