"""Argument checks shared by every constructor: each error names the argument and what it takes."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_fraction", "check_integer", "check_number"]


def check_integer(name: str, value: Any, minimum: int, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int ``>= minimum``.

    ``bool`` is refused although it is an ``int`` subclass: ``window=True`` is a mistake.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        suffix = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be {what}{suffix}, got {value!r}.")


def check_number(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = True,
    high_open: bool = True,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite real number in range."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars too
    number = float(value) if real else math.nan
    ok = (
        real
        and math.isfinite(number)
        and (number > low if low_open else number >= low)
        and (number < high if high_open else number <= high)
    )
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(
            f"`{name}` must be a number in {left}{low:g}, {high:g}{right}, got {value!r}."
        )


def check_fraction(name: str, value: Any, *, closed_high: bool = False) -> None:
    """``value`` in ``(0, 1)`` (or ``(0, 1]``)."""
    check_number(name, value, low=0.0, high=1.0, high_open=not closed_high)
