"""Deciding, per unit and overall, whether the angular update has reached its equilibrium.

Pure: the detector reads :class:`~lightning_sdm.records.UnitWindow` records and keeps plain state,
so it is tested without a Trainer. Its physics clock is each unit's ``optimizer_step``; the
``global_step`` of a window is only recorded (for messages and logs).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_sdm.records import Criterion, UnitWindow
from lightning_sdm.theory import lr_change_relaxation_steps

__all__ = ["EquilibriumDetector", "UnitEquilibrium"]

# A relative change of the prediction larger than this between two windows is a change of the
# target (an LR schedule step), after which the unit must relax again before it can count.
_TARGET_CHANGE = 0.02


@dataclass
class UnitEquilibrium:
    """Detector state of one unit.

    Attributes:
        consecutive: consecutive windows that met the criterion.
        in_equilibrium: the unit is in equilibrium now.
        reached_optimizer_step: optimizer step at which it last entered equilibrium (``None``:
            not yet).
        reached_global_step: the global step of that window.
        criterion: ``"theory"`` (measured RMS within tolerance of the prediction, no trend) or
            ``"stationary"`` (no prediction exists: the measured RMS stopped changing).
        recent: the last windows' RMS values (for the trend test).
        recent_steps: the optimizer steps of those windows.
        theory: the prediction of the last window (to notice a moved target).
        last_optimizer_step: optimizer step of the last window seen.
        relax_until: no window before this optimizer step counts (the target moved: theory's
            relaxation time after an LR change,
            :func:`~lightning_sdm.theory.lr_change_relaxation_steps`).
        steps_to_equilibrium: the last estimate of the steps still needed (0 in equilibrium,
            NaN when it cannot be estimated).
    """

    consecutive: int = 0
    in_equilibrium: bool = False
    reached_optimizer_step: int | None = None
    reached_global_step: int | None = None
    criterion: Criterion = "theory"
    recent: list[float] = field(default_factory=list)
    recent_steps: list[int] = field(default_factory=list)
    theory: float | None = None
    last_optimizer_step: int = 0
    relax_until: int = 0
    steps_to_equilibrium: float = math.nan


class EquilibriumDetector:
    """Windowed-RMS equilibrium test with a relative tolerance, a patience and a trend test.

    A unit is in equilibrium when, for ``patience`` consecutive windows, its RMS angular update is
    within ``tolerance`` (relative) of the prediction **and** shows no trend: the relative change
    between the first and the last of those windows is also below ``tolerance``. A ratio that
    crosses 1 once on its way elsewhere (a loss that goes to zero, Lobacheva et al. 2021)
    therefore does not count. Without a prediction (weight decay 0, Adam with L2 ...) only the
    trend test is used and :attr:`UnitEquilibrium.criterion` says ``"stationary"``.

    The prediction follows the current learning rate. When it moves between two windows (an LR
    schedule step), the unit's count restarts and windows before the theory's relaxation time
    (:func:`~lightning_sdm.theory.lr_change_relaxation_steps` at ``tolerance``) do not count.
    Frozen units and
    NaN values are never in equilibrium. Overall equilibrium is reached when at least ``quorum``
    of the units are.

    Args:
        tolerance: relative tolerance, in (0, 1).
        patience: consecutive windows required, >= 1.
        quorum: fraction of units that must be in equilibrium for :meth:`reached`, in (0, 1].

    Example::

        >>> from lightning_sdm.records import UnitWindow
        >>> detector = EquilibriumDetector(tolerance=0.1, patience=2)
        >>> def window(step, value):
        ...     return UnitWindow("w", step, step, value, value, 0.01, value / 0.01, 1.0, 8, 0.1)
        >>> detector.update([window(50, 0.02)]), detector.update([window(100, 0.0101)])
        ([], [])
        >>> detector.update([window(150, 0.0099)])
        ['w']
        >>> detector.state["w"].reached_optimizer_step, detector.fraction(), detector.reached()
        (150, 1.0, True)
    """

    def __init__(self, tolerance: float = 0.1, patience: int = 3, quorum: float = 1.0) -> None:
        if not 0 < tolerance < 1:
            raise ValueError(f"`tolerance` must be in (0, 1), got {tolerance!r}.")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be a positive integer, got {patience!r}.")
        if not 0 < quorum <= 1:
            raise ValueError(f"`quorum` must be in (0, 1], got {quorum!r}.")
        self.tolerance = tolerance
        self.patience = patience
        self.quorum = quorum
        self.state: dict[str, UnitEquilibrium] = {}

    def update(self, windows: Sequence[UnitWindow]) -> list[str]:
        """Feed closed windows; returns the units that entered equilibrium with them."""
        entered = []
        for window in windows:
            unit = self.state.setdefault(window.unit, UnitEquilibrium())
            unit.last_optimizer_step = window.optimizer_step
            self._follow_target(unit, window)
            if self._meets_criterion(unit, window):
                unit.consecutive += 1
            else:
                unit.consecutive = 0
            now = unit.consecutive >= self.patience
            if now and not unit.in_equilibrium:
                unit.reached_optimizer_step = window.optimizer_step
                unit.reached_global_step = window.global_step
                entered.append(window.unit)
            unit.in_equilibrium = now
            unit.steps_to_equilibrium = self._steps_remaining(unit, window)
        return entered

    def fraction(self) -> float:
        """Fraction of the units seen so far that are in equilibrium (NaN before any window)."""
        if not self.state:
            return math.nan
        return sum(u.in_equilibrium for u in self.state.values()) / len(self.state)

    def reached(self) -> bool:
        """Whether at least ``quorum`` of the units are in equilibrium."""
        fraction = self.fraction()
        return math.isfinite(fraction) and fraction >= self.quorum - 1e-12

    def steps_to_equilibrium(self) -> float:
        """Estimated steps until the quorum is in equilibrium (0 if it is, NaN if unknown).

        The estimate of the unit that closes the quorum: with the units sorted by their own
        estimate, the one at position ``ceil(quorum * units)``.
        """
        if not self.state:
            return math.nan
        estimates = sorted(u.steps_to_equilibrium for u in self.state.values())
        needed = max(math.ceil(self.quorum * len(estimates) - 1e-12), 1)
        value = estimates[needed - 1]
        return value if not math.isnan(value) else math.nan

    def restart(self, relax_steps: float = 0.0) -> None:
        """Forget equilibrium (an action moved the target); wait ``relax_steps`` optimizer steps.

        Counted per unit from its last window, on its own optimizer's clock.
        """
        for unit in self.state.values():
            unit.consecutive = 0
            unit.in_equilibrium = False
            unit.recent.clear()
            unit.recent_steps.clear()
            wait = unit.last_optimizer_step + math.ceil(relax_steps)
            unit.relax_until = max(unit.relax_until, wait)

    def state_dict(self) -> dict[str, Any]:
        """Detector state, for checkpoints (plain types only)."""
        return {name: asdict(u) for name, u in self.state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.state = {name: UnitEquilibrium(**dict(values)) for name, values in state.items()}

    # ------------------------------------------------------------------ internals

    def _follow_target(self, unit: UnitEquilibrium, window: UnitWindow) -> None:
        previous, unit.theory = unit.theory, window.theory
        if previous is None or window.theory is None or previous <= 0 or window.theory <= 0:
            return
        change = window.theory / previous
        if abs(change - 1.0) <= _TARGET_CHANGE:
            return
        unit.consecutive = 0
        unit.recent.clear()
        unit.recent_steps.clear()
        if window.time_scale is not None:
            # The prediction scales as sqrt(lr): the LR was multiplied by change**2.
            wait = lr_change_relaxation_steps(change**2, window.time_scale, self.tolerance)
            unit.relax_until = max(unit.relax_until, window.optimizer_step + math.ceil(wait))

    def _meets_criterion(self, unit: UnitEquilibrium, window: UnitWindow) -> bool:
        value = window.angular_update
        if window.frozen or not math.isfinite(value):
            unit.recent.clear()
            unit.recent_steps.clear()
            return False
        unit.recent = [*unit.recent, value][-self.patience :]
        unit.recent_steps = [*unit.recent_steps, window.optimizer_step][-self.patience :]
        if window.optimizer_step < unit.relax_until:
            return False
        # The trend is judged over the current run of passing windows plus this one.
        run = unit.recent[-(unit.consecutive + 1) :]
        stationary = _relative_change(run[0], run[-1]) <= self.tolerance
        if window.theory is None or window.ratio is None:
            unit.criterion = "stationary"
            # A trend needs a span to be judged over: compare with the window before.
            previous = unit.recent[-2:]
            return (
                len(previous) == 2
                and stationary
                and (_relative_change(previous[0], previous[1]) <= self.tolerance)
            )
        unit.criterion = "theory"
        return abs(window.ratio - 1.0) <= self.tolerance and stationary

    def _steps_remaining(self, unit: UnitEquilibrium, window: UnitWindow) -> float:
        """Theory's relaxation time scale, refined by the measured approach rate when usable."""
        if unit.in_equilibrium:
            return 0.0
        interval = _typical_interval(unit.recent_steps)
        windows_left = max(self.patience - unit.consecutive, 0) * interval
        waiting = max(unit.relax_until - window.optimizer_step, 0)
        if window.ratio is None or not math.isfinite(window.ratio):
            return float(max(windows_left, waiting)) if unit.criterion == "stationary" else math.nan
        deviation = abs(window.ratio - 1.0)
        if deviation <= self.tolerance:
            return float(max(windows_left, waiting))
        tau = _measured_time_constant(unit, window.theory) or window.time_scale
        if tau is None:
            return math.nan
        return max(tau * math.log(deviation / self.tolerance), float(windows_left), float(waiting))


def _relative_change(first: float, last: float) -> float:
    scale = max(abs(first), abs(last))
    return 0.0 if scale == 0 else abs(last - first) / scale


def _typical_interval(steps: list[int]) -> int:
    if len(steps) < 2:
        return 0
    return int(statistics.median(b - a for a, b in itertools.pairwise(steps)))


def _measured_time_constant(unit: UnitEquilibrium, theory: float | None) -> float | None:
    """E-folding time of ``|ratio - 1|`` over the recent windows, if it is clearly shrinking."""
    if theory is None or len(unit.recent) < 3:
        return None
    first, last = abs(unit.recent[0] / theory - 1.0), abs(unit.recent[-1] / theory - 1.0)
    span = unit.recent_steps[-1] - unit.recent_steps[0]
    if span <= 0 or first <= 0 or last <= 0 or last >= 0.8 * first:
        return None  # not converging, or too noisy to tell: fall back on theory
    return span / math.log(first / last)
