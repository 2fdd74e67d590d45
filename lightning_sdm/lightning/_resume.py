"""Resuming from a checkpoint written by a callback with other settings.

Lightning finds a callback's state by its ``state_key``, which holds every setting (so that two
callbacks that differ in any of them can share a Trainer). Resuming with, say, a longer window
would then drop the whole history with only Lightning's generic "callbacks used to create the
checkpoint" warning. Instead, the one unclaimed state of this callback class is adopted, keeping
what stays valid under the new settings, and the user is told what was kept and what restarts:

* always: the history, the events and the action's state (the LR decays already made), the
  monitor's step counters and invariance checks;
* with the same units (``params``, ``granularity``): the units, not traced again;
* with the same windows (``every_n_steps``, ``window``, ``horizon``, and the units): the open
  window;
* with the same windows and detection (``tolerance``, ``patience``, ``quorum``): the detector.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["adopt_state"]

_UNITS = ("params", "granularity")
_WINDOWS = ("every_n_steps", "window", "horizon")
_DETECTION = ("tolerance", "patience", "quorum")
_COUNTERS = ("steps_done", "optimizer_indices", "verified_steps", "invariance")


def adopt_state(
    states: dict[Any, Any],
    own_key: str,
    settings: Mapping[str, Any],
    class_names: Iterable[str],
    claimed: Iterable[Any],
) -> str | None:
    """Put the part of another settings' state that is still valid under ``own_key``.

    Args:
        states: the checkpoint's ``"callbacks"`` entry (updated in place: Lightning then passes
            the adopted state to the callback's ``load_state_dict``).
        own_key: this callback's state key.
        settings: this callback's settings (the arguments of its state key).
        class_names: class names whose states qualify (this class and its bases).
        claimed: the state keys of the Trainer's callbacks (their states are theirs).

    Returns:
        What was kept and what restarts, for the user; ``None`` when the checkpoint has this
        callback's own state, or not exactly one unclaimed state of a qualifying class.
    """
    if own_key in states:
        return None
    names, taken = set(class_names), set(claimed)
    candidates = [
        key
        for key in states
        if isinstance(key, str) and key not in taken and key.split("{", 1)[0] in names
    ]
    if len(candidates) != 1:
        return None
    key = candidates[0]
    saved = _settings_of(key)
    state = dict(states[key])
    changed = [name for name in settings if saved.get(name, settings[name]) != settings[name]]
    same_units = not set(changed) & set(_UNITS)
    same_windows = same_units and not set(changed) & set(_WINDOWS)
    monitor = state.get("monitor") or {}
    if not same_windows:
        state["monitor"] = {k: v for k, v in monitor.items() if k in _COUNTERS}
    if not same_units:
        state["units"] = None
    if not (same_windows and not set(changed) & set(_DETECTION)):
        state["detector"] = {}
    kept = ["the history", "the events", "the step counters"]
    kept += ["the units"] * same_units + ["the open window"] * same_windows
    restarted = ["the units (found again)"] * (not same_units)
    restarted += ["the open window"] * (not same_windows)
    restarted += ["the detector's evidence"] * (state["detector"] == {})
    differences = ", ".join(
        f"{name} {saved.get(name, '?')!r} -> {settings[name]!r}" for name in changed
    )
    message = (
        "SphericalDynamicsCallback: the checkpoint's state was written with other settings "
        f"({differences or 'unknown differences'}); kept {', '.join(kept)}"
        + (f"; restarted {', '.join(restarted)}." if restarted else ".")
    )
    states[own_key] = state
    return message


def _settings_of(key: str) -> dict[str, Any]:
    """The settings in a state key (``Class{'name': value, ...}``); empty if unreadable."""
    try:
        value = ast.literal_eval(key[key.index("{") :])
    except (ValueError, SyntaxError):
        return {}
    return value if isinstance(value, dict) else {}
