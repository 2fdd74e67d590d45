"""Deciding, per unit and overall, whether the angular update has reached its equilibrium."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_sdm.monitor import UnitWindow

__all__ = ["EquilibriumDetector", "UnitEquilibrium"]


@dataclass
class UnitEquilibrium:
    """Detector state of one unit.

    Attributes:
        consecutive: consecutive windows that met the criterion.
        in_equilibrium: the unit is in equilibrium now.
        reached_step: step at which it last entered equilibrium (``None``: not yet).
        criterion: ``"theory"`` (measured RMS within tolerance of the prediction) or
            ``"stationary"`` (no prediction exists: the measured RMS stopped changing).
        recent: the last windows' RMS values (for the stationarity test).
    """

    consecutive: int = 0
    in_equilibrium: bool = False
    reached_step: int | None = None
    criterion: str = "theory"
    recent: list[float] = field(default_factory=list)


class EquilibriumDetector:
    """Windowed-RMS equilibrium test with a relative tolerance and a patience.

    A unit is in equilibrium when, for ``patience`` consecutive windows, its RMS angular update is
    within ``tolerance`` (relative) of the prediction **and** the RMS shows no trend: the relative
    change between the first and the last of those windows is also below ``tolerance``. A ratio
    that crosses 1 once on its way elsewhere (a loss that goes to zero, Lobacheva et al. 2021)
    therefore does not count. Without a prediction (weight decay 0, Adam with L2 ...) only the
    stationarity part is used, and :attr:`UnitEquilibrium.criterion` says so. Frozen units and
    units with NaN values are never in equilibrium.

    Args:
        tolerance: relative tolerance, in (0, 1).
        patience: consecutive windows required, >= 1.

    Example::

        >>> from lightning_sdm.monitor import UnitWindow
        >>> detector = EquilibriumDetector(tolerance=0.1, patience=2)
        >>> def window(step, value):
        ...     return UnitWindow("w", step, value, value, 0.01, value / 0.01, 1.0, 8, 0.1)
        >>> detector.update([window(50, 0.02)]), detector.update([window(100, 0.0101)])
        ([], [])
        >>> detector.update([window(150, 0.0099)])
        ['w']
        >>> detector.state["w"].reached_step, detector.fraction()
        (150, 1.0)
    """

    def __init__(self, tolerance: float = 0.1, patience: int = 3) -> None:
        if not 0 < tolerance < 1:
            raise ValueError(f"`tolerance` must be in (0, 1), got {tolerance!r}.")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be a positive integer, got {patience!r}.")
        self.tolerance = tolerance
        self.patience = patience
        self.state: dict[str, UnitEquilibrium] = {}

    def update(self, windows: Sequence[UnitWindow]) -> list[str]:
        """Feed closed windows; returns the units that entered equilibrium with them."""
        entered = []
        for window in windows:
            unit = self.state.setdefault(window.unit, UnitEquilibrium())
            if self._meets_criterion(unit, window):
                unit.consecutive += 1
            else:
                unit.consecutive = 0
            now = unit.consecutive >= self.patience
            if now and not unit.in_equilibrium:
                unit.reached_step = window.step
                entered.append(window.unit)
            unit.in_equilibrium = now
        return entered

    def fraction(self) -> float:
        """Fraction of the units seen so far that are in equilibrium (NaN before any window)."""
        if not self.state:
            return math.nan
        return sum(u.in_equilibrium for u in self.state.values()) / len(self.state)

    def state_dict(self) -> dict[str, Any]:
        """Detector state, for checkpoints."""
        return {
            name: {
                "consecutive": u.consecutive,
                "in_equilibrium": u.in_equilibrium,
                "reached_step": u.reached_step,
                "criterion": u.criterion,
                "recent": list(u.recent),
            }
            for name, u in self.state.items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.state = {name: UnitEquilibrium(**dict(values)) for name, values in state.items()}

    def _meets_criterion(self, unit: UnitEquilibrium, window: UnitWindow) -> bool:
        value = window.angular_update
        if window.frozen or not math.isfinite(value):
            unit.recent.clear()
            return False
        unit.recent = [*unit.recent, value][-self.patience :]
        stationary = _relative_change(unit.recent[0], unit.recent[-1]) <= self.tolerance
        if window.theory is None or window.ratio is None:
            unit.criterion = "stationary"
            # Stationarity needs a span to be judged over: at least two windows.
            return len(unit.recent) >= min(2, self.patience) and stationary
        unit.criterion = "theory"
        return abs(window.ratio - 1.0) <= self.tolerance and stationary


def _relative_change(first: float, last: float) -> float:
    scale = max(abs(first), abs(last))
    return 0.0 if scale == 0 else abs(last - first) / scale
