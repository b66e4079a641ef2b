"""The rule registry of the graph engine: one entry per rule and predicate, looked up by precedence."""

from __future__ import annotations

import pytest

import dz_lightning.reuse.rules  # noqa: F401 - registers the rules
from dz_lightning.reuse.selection import RULES, register


def test_rules_are_ordered_by_unique_precedence_with_the_generic_rule_last():
    precedences = [r.precedence for r in RULES]
    assert precedences == sorted(precedences) and len(set(precedences)) == len(precedences)
    assert RULES[-1].name == "generic_rule" and RULES[-1].accepts == {"chan", "full", "parts", "start"}
    assert RULES[-1].returns == {"tensor", "tuple"}


def test_the_self_check_reruns_exactly_the_rules_that_call_user_code():
    assert {r.name for r in RULES if r.user_code} == {
        "generic_rule", "vmap_linear_rule", "elementwise_rule", "elementwise_channel_rule", "flat_rule", "linear_rule",
        "flat_module_rule"}


def test_a_taken_precedence_or_an_unknown_kind_is_refused():
    before = list(RULES)
    with pytest.raises(ValueError, match="Precedence 10 of my_rule is taken by param_rule"):
        @register(precedence=10, accepts={"full"}, gives="full")
        def my_rule(ctx, i, states, q):  # pragma: no cover - never registered
            raise AssertionError
    with pytest.raises(ValueError, match="`accepts`.*'diagonal'"):
        register(precedence=11, accepts={"diagonal"}, gives="full")
    assert RULES == before
