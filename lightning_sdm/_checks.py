"""Argument checks shared by every constructor: each error names the argument and what it takes."""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["check_bool", "check_fraction", "check_integer", "check_number", "check_record"]


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is ``True`` or ``False``.

    A switch given as ``1`` or ``"yes"`` is a mistake, not a truth value to interpret.
    """
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_integer(name: str, value: Any, minimum: int, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer ``>= minimum``.

    Numpy integers count (callers store ``int(value)``). ``bool`` is refused although it is an
    ``int`` subclass: ``window=True`` is a mistake.
    """
    if value is None and allow_none:
        return
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not integral or value < minimum:
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


def check_record(cls: type, values: Any, what: str) -> dict[str, Any]:
    """The fields of dataclass ``cls`` found in ``values``, each checked against its annotation.

    For states read back from checkpoints: unknown keys are ignored (a newer version's), a
    missing field without a default or a value of the wrong type raises ``ValueError`` naming
    ``what`` and the field, instead of failing later, far from the checkpoint.

    Example::

        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Point:
        ...     x: float
        ...     label: str = ""
        >>> check_record(Point, {"x": 1, "extra": 0}, "a point")
        {'x': 1}
        >>> check_record(Point, {"x": "1"}, "a point")
        Traceback (most recent call last):
        ...
        ValueError: a point: `x` is '1', not float.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{what} is a {type(values).__name__}, not a mapping of its fields.")
    hints = _hints(cls)
    kept = {}
    for item in dataclasses.fields(cls):
        if item.name not in values:
            required = (
                item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
            )
            if required:
                raise ValueError(f"{what} has no `{item.name}`.")
            continue
        value = values[item.name]
        if not _matches(value, hints[item.name]):
            hint = getattr(hints[item.name], "__name__", None) or str(hints[item.name])
            raise ValueError(f"{what}: `{item.name}` is {value!r}, not {hint}.")
        kept[item.name] = value
    return kept


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the (simple) annotation ``hint``."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, Sequence, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_matches, value, args))
        return all(_matches(item, args[0]) for item in value) if args else True
    if origin in (dict, Mapping, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            return False
        key, item = args if args else (Any, Any)
        return all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True
