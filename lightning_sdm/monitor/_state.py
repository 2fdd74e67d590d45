"""The monitor's checkpoint state, checked before any of it is applied.

A state comes back from a checkpoint that may be damaged or older: a wrong entry must fail when
it is read, naming it, not at the first optimizer step after a resume.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_sdm._engine import NUM_STATISTICS

__all__ = ["check_monitor_state"]

_STATUSES = ("verified", "violated", "unverified")


def check_monitor_state(state: Any) -> None:
    """Raise ``ValueError`` naming the first entry of ``state`` that is not as saved.

    Example::

        >>> check_monitor_state({"steps_done": [4], "verified_steps": 3})
        >>> check_monitor_state({"steps_done": ["abc"]})
        Traceback (most recent call last):
        ...
        ValueError: the monitor's state: `steps_done` holds 'abc', not a count of steps.
    """
    where = "the monitor's state"
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} is a {type(state).__name__}, not a mapping.")
    for key in ("optimizer_indices", "steps_done"):
        for value in _sequence(state, key, where):
            if not _count(value):
                raise ValueError(f"{where}: `{key}` holds {value!r}, not a count of steps.")
    for key in ("window_statistics", "horizon_statistics"):
        for value in _sequence(state, key, where):
            shaped = isinstance(value, Tensor) and value.dim() == 3
            if not shaped or value.shape[-1] != NUM_STATISTICS or not value.is_floating_point():
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"{where}: `{key}` holds {shape}, not [steps, units, {NUM_STATISTICS}] "
                    "floating-point statistics."
                )
    for anchor in _sequence(state, "anchors", where):
        if anchor is not None and not (
            isinstance(anchor, (list, tuple)) and all(isinstance(t, Tensor) for t in anchor)
        ):
            raise ValueError(f"{where}: `anchors` holds {type(anchor).__name__}, not tensors.")
    for window in _sequence(state, "window_predictions", where):
        steps = window if isinstance(window, (list, tuple)) else [None]
        for step in steps:
            entries = step if isinstance(step, (list, tuple)) else [None]
            for saved in entries:
                if not _prediction(saved):
                    raise ValueError(
                        f"{where}: `window_predictions` holds {saved!r:.60}, not "
                        "(angular update, hyper-parameters, family)."
                    )
    for schedule in _sequence(state, "window_schedules", where):
        for entry in schedule if isinstance(schedule, (list, tuple)) else [None]:
            if not _schedule_entry(entry):
                raise ValueError(
                    f"{where}: `window_schedules` holds {entry!r:.60}, not "
                    "(measured, lrs, weight decays)."
                )
    for name, value in _mapping(state, "trajectories", where).items():
        if not _numbers(value, (2, 3)):  # (q, G) before Adam's memory was carried
            raise ValueError(
                f"{where}: `trajectories` of {name!r} is {value!r:.60}, not (q, G, memory)."
            )
    for name, rows in _mapping(state, "radial", where).items():
        if not (isinstance(rows, (list, tuple)) and all(_numbers(row, (3,)) for row in rows)):
            raise ValueError(
                f"{where}: `radial` of {name!r} is {rows!r:.60}, not rows of 3 radial sums."
            )
    if "verified_steps" in state and not _count(state["verified_steps"]):
        raise ValueError(f"{where}: `verified_steps` is {state['verified_steps']!r}.")
    for name, value in _mapping(state, "invariance", where).items():
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and value[0] in _STATUSES
        if not ok or not _real(value[1]):
            raise ValueError(
                f"{where}: `invariance` of {name!r} is {value!r:.60}, not (status, cosine)."
            )


def _sequence(state: Mapping[str, Any], key: str, where: str) -> Sequence[Any]:
    value = state.get(key, [])
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: `{key}` is a {type(value).__name__}, not a list.")
    return value


def _mapping(state: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = state.get(key, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: `{key}` is a {type(value).__name__}.")
    return value


def _numbers(value: Any, sizes: tuple[int, ...]) -> bool:
    """A list or tuple of one of ``sizes`` real numbers (NaN included)."""
    return isinstance(value, (list, tuple)) and len(value) in sizes and all(map(_number, value))


def _count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 0


def _number(value: Any) -> bool:
    """A real number (NaN included: an unknown LR or update size), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return _number(value) and math.isfinite(value)


def _schedule_entry(entry: Any) -> bool:
    if not isinstance(entry, (list, tuple)) or len(entry) != 3 or not isinstance(entry[0], bool):
        return False
    return all(
        isinstance(values, (list, tuple)) and all(_number(v) for v in values)
        for values in entry[1:]
    )


def _prediction(saved: Any) -> bool:
    if not isinstance(saved, (list, tuple)) or len(saved) != 3:
        return False
    value, hyper, family = saved
    return (
        (value is None or (_real(value) and value >= 0))
        and isinstance(hyper, Mapping)
        and all(isinstance(k, str) and isinstance(v, numbers.Real) for k, v in hyper.items())
        and (family is None or isinstance(family, str))
    )
