"""Argument checks shared by the engine, the tasks and the callbacks, with messages that name the value."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice", "check_positive_float", "check_positive_int"]


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Expected argument `{name}` to be one of {valid}, but got {value!r}.")


def check_positive_float(name: str, value: Any, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0 (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        extra = " or None" if allow_none else ""
        raise ValueError(f"Expected argument `{name}` to be a finite number > 0{extra}, but got {value!r}.")


def check_positive_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= ``minimum`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"Expected argument `{name}` to be an int >= {minimum}{extra}, but got {value!r}.")
