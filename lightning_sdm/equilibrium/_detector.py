"""Deciding, per unit, which regime the weights are in, and whether the quorum is in equilibrium.

The decision rests on statistics pooled over a horizon tied to the unit's relaxation time, not on
one noisy window, and on two witnesses:

* **the norm**. In equilibrium ``|w|`` is stationary; while it relaxes, the deviation of the
  angular update from its equilibrium value follows from the norm's trend alone: with ``|w|^p``
  relaxing exponentially in ``tau`` steps (``p = 4`` for SGD, ``2`` for decoupled weight decay,
  :func:`~lightning_sdm.theory.relaxation_time`) and the angle proportional to ``lr / |w|^(p/2)``,
  the ratio measured/equilibrium is ``1 + (p/2) tau d ln|w|/dt`` to first order. Under a moving LR
  the moving equilibrium has ``d ln|w|/dt = (d ln lr/dt) / p``, which is subtracted first. This
  witness does not depend on the predicted value being exact (AdamW's small fan-in layers, Lion)
  and the norm is measured exactly at every window, so it is the sharp one.
* **the ratio** measured / predicted mean square, ``rho``, pooled over the horizon with a standard
  error from the windows' scatter (corrected for their autocorrelation): its level, and its trend
  (a value that crosses the band on its way elsewhere is not an equilibrium).

Regimes (per unit, logged): ``relaxing`` (with an ETA), ``equilibrium``, ``tracking`` (the LR
moves slowly enough for the weights to follow: ratio within tolerance; or, at a constant LR,
the gradient statistics move the equilibrium (the norm swings) while the weights follow their
predicted trajectory and the level is within tolerance: in equilibrium; or, after an LR jump or
an action, the weights relax along their predicted trajectory: not in equilibrium before
theory's wait, but named with the expected and the measured lag), ``lagging`` (the LR moves
faster than the relaxation: the ratio is off by what the lag model ``rho = 1 + tau d ln lr/dt``
explains; the note says by how much), ``non_stationary`` (the ratio drifts or oscillates while the
norm does not explain it, e.g. a loss going to zero, Lobacheva et al. 2021; the period is reported
when it oscillates), ``no_prediction`` (stationarity of the measured angle and the norm only),
``frozen``, ``invalid`` (NaN weights), ``unknown`` (not enough windows yet).

Thresholds and why: with ``n`` windows whose ratios scatter by ``s`` the
pooled ratio has an error of about ``s / sqrt(n_eff)``; a unit enters equilibrium only when the
norm witness is inside ``tolerance`` and its margin (``confidence`` standard errors) no wider,
the ratio's trend not outside it by that margin (and
the level within the tolerance, or within twice it when the norm is steady: then the prediction
is off for the unit, while a level off the way the norm still moves is relaxation), and
leaves only when one of them is outside 1.25 times the tolerance by as many errors (hysteresis),
or the LR jumps. The horizon is one relaxation time (at least ``patience`` windows, at most 64).

Pure: the detector reads :class:`~lightning_sdm.records.UnitWindow` records and keeps plain state,
so it is tested without a Trainer. Its clock is each unit's ``optimizer_step``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from lightning_sdm import _messages
from lightning_sdm._checks import check_fraction, check_integer, check_number, check_record
from lightning_sdm.equilibrium._trends import (
    mean_with_error,
    oscillation,
    slope_with_error,
    t_quantile,
)
from lightning_sdm.records import Criterion, Regime, UnitWindow
from lightning_sdm.theory._predictions import lr_change_relaxation_steps

__all__ = ["EquilibriumDetector", "UnitEquilibrium"]

# Windows kept per unit for the pooled statistics (the horizon) and for the oscillation test.
_MAX_HORIZON_WINDOWS = 64
_HISTORY_WINDOWS = 96
# Horizon without a relaxation time (no prediction): this many windows.
_DEFAULT_HORIZON_WINDOWS = 8
# A change of ln(lr) between two windows larger than _JUMP, and than _JUMP_FACTOR times the
# recent changes, is a jump (a step schedule, an action): pooled statistics restart and the unit
# waits for relaxation. A smooth schedule accelerating towards lr = 0 is not one.
_JUMP = 0.1
_JUMP_FACTOR = 5.0
# The prediction moves (a schedule) when ln(lr) changes by more than this per relaxation time.
_MOVING = 0.05
# Beyond this many tolerances the prediction does not describe a stationary unit (AdamW's
# first layers settle ~5-10% low: see docs/reproduction.md).
_MISMATCH = 2.0
# A unit in equilibrium leaves when a test is outside this many tolerances (with confidence).
_EXIT = 1.25
# The ratio's trend over the horizon alone counts from this many windows on.
_SHORT_TREND_WINDOWS = 5

# Columns of a stored sample.
_T, _RHO, _MS, _N, _LOGNORM, _LOGTHEORY, _TAU, _POWER, _TRAJ = range(9)


@dataclass
class UnitEquilibrium:
    """Detector state of one unit (plain values, checkpointed).

    Attributes:
        regime: the current regime (:data:`~lightning_sdm.records.Regime`).
        in_equilibrium: ``regime`` is ``equilibrium``, or ``tracking`` (under a moving LR, or
            at a constant one with a moving target; not on the way to a new equilibrium after a
            jump or an action), or, without a prediction, the unit is stationary.
        criterion: ``"theory"`` or ``"stationary"`` (no prediction).
        reached_optimizer_step: optimizer step at which it last entered equilibrium.
        reached_global_step: the global step of that window.
        entries: how many times it entered equilibrium; ``exits``: how many times it left.
        ratio: pooled RMS ratio measured / predicted over the horizon (NaN without one).
        ratio_error: its standard error.
        norm_drift: the ratio deviation the norm's trend implies (0 in equilibrium).
        norm_drift_error: its standard error.
        lr_drift: ``tau d ln lr / dt`` (how fast the prediction moves against the relaxation).
        period: optimizer steps of an oscillation of the ratio (``non_stationary``), else NaN.
        note: one line explaining the regime.
        steps_to_equilibrium: estimated optimizer steps still needed (0 in equilibrium, NaN when
            unknown).
        relaxing_since: optimizer step since which it relaxes (to tell a slow approach from a
            target that keeps moving).
        segment_start: optimizer step of the last LR jump (older windows are another regime).
        relax_until: no decision before this optimizer step (an LR jump or an action).
        last_optimizer_step: optimizer step of the last window seen.
        samples: the windows of the horizon, ``[t, rho, mean square, steps, ln|w|,
            ln(theory^2), tau, p, rho to the trajectory]`` each.
        trail: ``[t, rho to the trajectory, steps]`` of the windows with a trajectory, across LR
            jumps (the trajectory follows a jump; the static prediction does not).
        history: ``[t, ratio, ln(theory^2)]`` of the last windows (oscillations, jumps).
    """

    regime: Regime = "unknown"
    in_equilibrium: bool = False
    criterion: Criterion = "theory"
    reached_optimizer_step: int | None = None
    reached_global_step: int | None = None
    entries: int = 0
    exits: int = 0
    ratio: float = math.nan
    ratio_error: float = math.nan
    norm_drift: float = math.nan
    norm_drift_error: float = math.nan
    lr_drift: float = 0.0
    period: float = math.nan
    note: str = ""
    steps_to_equilibrium: float = math.nan
    relaxing_since: int | None = None
    segment_start: int = 0
    relax_until: int = 0
    last_optimizer_step: int = 0
    samples: list[list[float]] = field(default_factory=list)
    history: list[list[float]] = field(default_factory=list)
    trail: list[list[float]] = field(default_factory=list)


class EquilibriumDetector:
    """Per-unit regimes from pooled window statistics; the quorum for equilibrium events.

    Args:
        tolerance: how far (relative) the angular update may still be from its equilibrium,
            as judged by the norm witness and the ratio's trend, in (0, 1).
        patience: windows of evidence needed before any decision (the horizon's minimum), >= 2.
            Not ``EarlyStopping``'s patience (checks without improvement before stopping): the
            windows over which the trends are fitted before a unit gets a verdict; a verdict
            rests on the slope of the norm and of the ratio, which one window cannot give, so
            ``patience=1`` is refused (with that reason).
        quorum: fraction of units that must be in equilibrium for :meth:`reached`, in (0, 1].
        confidence: standard errors of margin in the tests, > 0 (1.64: one-sided 95%).

    Example::

        >>> import random
        >>> from lightning_sdm.records import UnitWindow
        >>> rng = random.Random(0)
        >>> def window(step, value):
        ...     return UnitWindow("w", step, step, value, value, 0.01, value / 0.01, 2.0, 8, 0.1,
        ...                       time_scale=100.0, norm_exponent=0.25)
        >>> detector = EquilibriumDetector(tolerance=0.1, patience=3)
        >>> entered = [detector.update([window(50 * i, 0.01 * rng.uniform(0.95, 1.05))])
        ...            for i in range(1, 8)]
        >>> detector.state["w"].regime, detector.fraction(), detector.reached()
        ('equilibrium', 1.0, True)
    """

    #: The defaults, declared here only: the adapters' signatures read them.
    DEFAULT_TOLERANCE: ClassVar[float] = 0.1
    DEFAULT_PATIENCE: ClassVar[int] = 3
    DEFAULT_QUORUM: ClassVar[float] = 1.0

    def __init__(
        self,
        tolerance: float = DEFAULT_TOLERANCE,
        patience: int = DEFAULT_PATIENCE,
        quorum: float = DEFAULT_QUORUM,
        confidence: float = 1.64,
    ) -> None:
        check_fraction("tolerance", tolerance)
        if patience in (0, 1) and not isinstance(patience, bool):  # a plausible EarlyStopping habit
            raise ValueError(_messages.patience_too_short(patience))
        check_integer("patience", patience, 2)
        check_fraction("quorum", quorum, closed_high=True)
        check_number("confidence", confidence, low=0.0)
        self.tolerance = tolerance
        self.patience = int(patience)
        self.quorum = quorum
        self.confidence = confidence
        self.state: dict[str, UnitEquilibrium] = {}

    # ------------------------------------------------------------------ public API

    def update(self, windows: Sequence[UnitWindow]) -> list[str]:
        """Feed closed windows; returns the units that entered equilibrium with them.

        Raises:
            ValueError: if ``windows`` is not a sequence of
                :class:`~lightning_sdm.records.UnitWindow`.
        """
        windows = list(windows) if isinstance(windows, Iterable) else windows
        if not isinstance(windows, list) or not all(isinstance(w, UnitWindow) for w in windows):
            raise ValueError(
                "`windows` must be a list of lightning_sdm.UnitWindow (what "
                f"SphericalMonitor.pop_windows returns), got {windows!r:.80}."
            )
        entered = []
        for window in windows:
            unit = self.state.setdefault(window.unit, UnitEquilibrium())
            was = unit.in_equilibrium
            self._decide(unit, window)
            if unit.in_equilibrium and not was:
                unit.entries += 1
                unit.reached_optimizer_step = window.optimizer_step
                unit.reached_global_step = window.global_step
                entered.append(window.unit)
            elif was and not unit.in_equilibrium:
                unit.exits += 1
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

    def regimes(self) -> dict[str, int]:
        """How many units are in each regime."""
        counts: dict[str, int] = {}
        for unit in self.state.values():
            counts[unit.regime] = counts.get(unit.regime, 0) + 1
        return counts

    def steps_to_equilibrium(self) -> float:
        """Estimated steps until the quorum is in equilibrium (0 if it is, NaN if unknown).

        The estimate of the unit that closes the quorum: with the units sorted by their own
        estimate, the one at position ``ceil(quorum * units)``.
        """
        if not self.state:
            return math.nan
        estimates = sorted(u.steps_to_equilibrium for u in self.state.values())
        needed = max(math.ceil(self.quorum * len(estimates) - 1e-12), 1)
        return estimates[needed - 1]

    def restart(self, relax_steps: float = 0.0) -> None:
        """Forget equilibrium (an action moved the target); wait ``relax_steps`` optimizer steps.

        Counted per unit from its last window, on its own optimizer's clock.

        Raises:
            ValueError: for a ``relax_steps`` that is not a finite number >= 0.
        """
        check_number("relax_steps", relax_steps, low=0.0, low_open=False)
        for unit in self.state.values():
            if unit.in_equilibrium:
                unit.exits += 1
            unit.in_equilibrium = False
            unit.regime = "relaxing"
            unit.samples.clear()
            unit.segment_start = unit.last_optimizer_step
            unit.relax_until = max(
                unit.relax_until, unit.last_optimizer_step + math.ceil(relax_steps)
            )

    @property
    def settings(self) -> dict[str, Any]:
        """The constructor's arguments (they identify a callback's state, see ``state_key``)."""
        return {"tolerance": self.tolerance, "patience": self.patience, "quorum": self.quorum}

    def state_dict(self) -> dict[str, Any]:
        """Detector state, for checkpoints (plain types only)."""
        return {name: asdict(u) for name, u in self.state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (unknown keys are ignored).

        Raises:
            ValueError: for a damaged state (a mistyped field), naming the unit and the field;
                the detector is left as it was.
        """
        if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
            raise ValueError(
                f"The detector's state must map unit names to their states, got {state!r:.80}."
            )
        self.state = {
            name: UnitEquilibrium(
                **check_record(UnitEquilibrium, values, f"the detector's state of {name!r}")
            )
            for name, values in state.items()
        }

    # ------------------------------------------------------------------ the decision

    def _decide(self, unit: UnitEquilibrium, window: UnitWindow) -> None:
        t = window.optimizer_step
        tracking = unit.regime == "tracking"  # before this window (hysteresis)
        unit.last_optimizer_step = t
        if window.frozen:
            self._set(unit, "frozen", False, "no gradient: the unit does not move", math.nan)
            unit.samples.clear()
            unit.trail.clear()
            return
        finite = math.isfinite(window.angular_update) and math.isfinite(window.weight_norm)
        if not finite or window.weight_norm <= 0:
            self._set(unit, "invalid", False, "NaN/Inf or zero weights", math.nan)
            unit.samples.clear()
            unit.trail.clear()
            return
        theory = window.theory if window.theory is not None and window.theory > 0 else None
        unit.criterion = "theory" if theory is not None else "stationary"
        if window.theory == 0:  # lr = 0 (a schedule's end, an action): nothing moves
            unit.samples.clear()
            unit.trail.clear()
            unit.history = [*unit.history, [float(t), math.nan, math.nan]][-_HISTORY_WINDOWS:]
            self._set(unit, "no_prediction", False, "lr = 0: the weights do not move", math.nan)
            return
        # A time scale without a norm exponent: the angle does not depend on the norm
        # (Adafactor's relative steps), so it follows an LR change at once.
        relative = window.norm_exponent is None and window.time_scale is not None
        sample = _sample(window, theory)
        jump = self._jump(unit, sample, relative) if theory is not None else None
        ratio = math.sqrt(sample[_RHO]) if theory is not None else math.nan
        unit.history = [*unit.history, [float(t), ratio, sample[_LOGTHEORY]]][-_HISTORY_WINDOWS:]
        if jump is not None:
            unit.samples.clear()
        unit.samples.append(sample)
        horizon = self._horizon(unit, window)
        unit.samples = [s for s in unit.samples if s[_T] > t - horizon][-_MAX_HORIZON_WINDOWS:]
        if math.isfinite(sample[_TRAJ]):
            unit.trail.append([sample[_T], sample[_TRAJ], sample[_N]])
        # Two horizons of trajectory ratios: the pool is one horizon, but under a moving LR a
        # pool too imprecise to place may draw on the windows before it (_against_trajectory).
        unit.trail = [s for s in unit.trail if s[0] > t - 2 * horizon][-_MAX_HORIZON_WINDOWS:]
        if jump is not None:
            factor, wait = jump
            change = f"the LR jumped by {factor:.3g}x"
            if not self._in_transit(unit, sample, tracking, horizon, change):
                note = (
                    f"the LR jumped by {factor:.3g}x: the weights need ~{wait:.0f} steps to follow"
                )
                self._set(unit, "relaxing", False, note, wait)
            return
        if len(unit.samples) < self.patience:
            waiting = t < unit.relax_until
            if waiting and self._in_transit(unit, sample, tracking, horizon):
                return
            regime: Regime = "relaxing" if waiting else "unknown"
            note = "the weights relax after an LR change" if waiting else "not enough windows yet"
            eta = float(unit.relax_until - t) if waiting else math.nan
            self._set(unit, regime, False, note, eta)
            return
        if theory is None:
            self._without_prediction(unit, window)
        else:
            self._with_prediction(unit, horizon, relative)
        # An LR jump or an action: not in equilibrium before theory's wait; whether the weights
        # are on their way as predicted, the trajectory says.
        if t < unit.relax_until and not self._in_transit(unit, sample, tracking, horizon):
            note = "the weights relax after an LR change (theory's relaxation time)"
            self._set(unit, "relaxing", False, note, float(unit.relax_until - t))

    def _jump(
        self, unit: UnitEquilibrium, sample: list[float], relative: bool = False
    ) -> tuple[float, float] | None:
        """``(factor, wait)`` if the prediction jumped since the last window (a step schedule).

        ``relative``: the angle follows the prediction at once (no norm relaxes): no wait.
        """
        logs = [h[2] for h in unit.history if len(h) > 2 and math.isfinite(h[2])]
        if len(logs) < 3:  # too little history to tell a step from the start of a ramp (warm-up)
            return None
        change = sample[_LOGTHEORY] - logs[-1]
        recent = sorted(abs(b - a) for a, b in itertools.pairwise(logs[-5:]))
        typical = recent[len(recent) // 2] if recent else 0.0
        if abs(change) <= max(_JUMP, _JUMP_FACTOR * typical):
            return None
        if _smooth(unit.history, sample):  # a schedule's tail to 0: large in logs, not a jump
            return None
        tau = sample[_TAU]
        wait = 0.0
        if math.isfinite(tau) and not relative:
            wait = lr_change_relaxation_steps(math.exp(change), tau, self.tolerance)
        if wait == 0:  # the weights are still within tolerance of the new equilibrium
            return None
        unit.relax_until = max(unit.relax_until, int(sample[_T]) + math.ceil(wait))
        unit.relaxing_since = unit.segment_start = int(sample[_T])
        return math.exp(change), wait

    def _horizon(self, unit: UnitEquilibrium, window: UnitWindow) -> float:
        """Optimizer steps pooled: one relaxation time, within [patience, 64] windows."""
        times = [h[0] for h in unit.history[-self.patience - 1 :]]
        interval = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 1.0
        interval = max(interval, 1.0)
        tau = window.time_scale
        low = self.patience * interval
        if tau is None or not math.isfinite(tau):
            return _DEFAULT_HORIZON_WINDOWS * interval + 0.5
        return min(max(tau, low), _MAX_HORIZON_WINDOWS * interval) + 0.5

    def _with_prediction(
        self, unit: UnitEquilibrium, horizon: float, relative: bool = False
    ) -> None:
        """Judge the unit against its prediction; ``relative``: it follows the LR at once."""
        samples = unit.samples
        tol, z = self.tolerance, self.confidence
        t = samples[-1][_T]
        times = [s[_T] for s in samples]
        tau = samples[-1][_TAU]
        power = samples[-1][_POWER]
        if not math.isfinite(tau):
            tau = max(times[-1] - times[0], 1.0)
        rhos = [s[_RHO] for s in samples]
        rho, rho_error = mean_with_error(rhos, [s[_N] for s in samples])
        ratio = math.sqrt(max(rho, 0.0))
        ratio_error = rho_error / (2 * max(ratio, 1e-12))
        lr_slope, _, _ = slope_with_error(times, [s[_LOGTHEORY] for s in samples])
        norm_slope, norm_error, norm_dof = slope_with_error(times, [s[_LOGNORM] for s in samples])
        # The ratio's trend is noisier than the norm's: judged over a longer span of the record
        # (at least 12 windows, at most two horizons), with a Student-t margin.
        segment = [h for h in unit.history if h[0] >= unit.segment_start and math.isfinite(h[1])]
        span = max(2 * (t - times[0]), 0.0)
        trend_rows = [h for h in segment if h[0] > t - span]
        if len(trend_rows) < 12:
            trend_rows = segment[-12:]
        ratio_slope, ratio_slope_error, trend_dof = slope_with_error(
            [h[0] for h in trend_rows], [h[1] for h in trend_rows]
        )
        # ... and over the horizon alone, which sees a recent turn the longer span averages out.
        short = [h for h in segment if h[0] > times[0] - 0.5]
        short_slope, short_error, short_dof = slope_with_error(
            [h[0] for h in short], [h[1] for h in short]
        )
        # Ratio deviation implied by the norm (first order), after the moving equilibrium's drift.
        # The norm's drift against the equilibrium it moves to (|w*| ~ lr^(1/p)); with relative
        # steps the angle does not depend on the norm and no equilibrium norm follows the LR.
        follow = 0.0 if relative else lr_slope / power
        drift = (power / 2) * tau * (norm_slope - follow)
        drift_margin = t_quantile(z, norm_dof) * (power / 2) * tau * norm_error
        trend = tau * ratio_slope  # tau dR/dt
        trend_margin = t_quantile(z, trend_dof) * tau * ratio_slope_error
        short_trend = tau * short_slope
        short_margin = t_quantile(z, short_dof) * tau * short_error
        enough = len(short) >= _SHORT_TREND_WINDOWS  # fewer: the error of the error is too large
        if enough and abs(short_trend) - short_margin > abs(trend) - trend_margin:
            trend, trend_margin = short_trend, short_margin  # the stronger evidence counts
        lr_drift = tau * lr_slope
        # Relative steps follow the prediction at once: a moving LR moves nothing the angle
        # lags behind (and a jump inside the horizon is no rate per relaxation time).
        moving = abs(lr_drift) > _MOVING and not relative
        # The notes say how the LR moves now: the horizon's slope still holds a warm-up's rise
        # for a relaxation time after its peak. The prediction is exact, so its last step reads
        # the rate without noise.
        lr_now = lr_drift
        if len(samples) > 1 and times[-1] > times[-2]:
            rate = (samples[-1][_LOGTHEORY] - samples[-2][_LOGTHEORY]) / (times[-1] - times[-2])
            lr_now = tau * rate
        # Under a moving prediction the level now, not over the horizon, is what is compared.
        now = ratio
        if moving:
            rho_slope, _, _ = slope_with_error(times, rhos)
            t_mean = sum(times) / len(times)
            now = math.sqrt(max(rho + rho_slope * (t - t_mean), 0.0))
        level_margin = z * ratio_error
        unit.ratio, unit.ratio_error = now, ratio_error
        unit.norm_drift, unit.norm_drift_error, unit.lr_drift = drift, drift_margin / z, lr_drift
        unit.period = math.nan
        if moving and self._against_trajectory(unit, samples, now, lr_drift, lr_now):
            return
        # A constant LR with the norm's trend measured (a slope needs 3 windows of the segment):
        # where the witnesses see the target move, the trajectory may say the weights follow.
        settled = not moving and math.isfinite(drift_margin)
        if unit.in_equilibrium:  # hysteresis: leave only on clear evidence
            exit_at = _EXIT * tol
            leaving = (
                abs(drift) - drift_margin > exit_at
                or abs(trend) - trend_margin > exit_at
                or abs(now - 1) - level_margin > (exit_at if moving else _MISMATCH * tol)
            )
            if not leaving:
                regime: Regime = "tracking" if moving else "equilibrium"
                self._set(unit, regime, True, self._level_note(now, moving, lr_now), 0.0)
                return
            if settled and self._follows(unit, now, level_margin, staying=True, horizon=horizon):
                return
        else:
            # A level off the prediction is taken for the prediction's bias (up to _MISMATCH
            # tolerances) only when the norm does not explain it: a norm that still moves, and
            # the way that puts the angle where it is, says the unit relaxes (theory's
            # relaxation time may be short for a real network, so its drift reads low).
            relaxing = abs(drift) > drift_margin and (now - 1) * drift > 0
            stationary = (
                _placed(drift, drift_margin, tol)
                and abs(trend) - trend_margin <= tol
                and abs(now - 1) <= (tol if relaxing else _MISMATCH * tol)
            )
            if stationary and (not moving or abs(now - 1) + level_margin <= tol):
                entering: Regime = "tracking" if moving else "equilibrium"
                self._set(unit, entering, True, self._level_note(now, moving, lr_now), 0.0)
                unit.relaxing_since = None
                return
            if settled and self._follows(unit, now, level_margin, staying=False, horizon=horizon):
                unit.relaxing_since = None
                return
        # Off the prediction, to the side the lag predicts. Within the tolerance the ratio is not
        # off, whatever the norm does (a warm-up's ratio crosses 1 on its way up).
        if moving and (now - 1) * lr_slope > 0 and abs(now - 1) > tol:
            unit.relaxing_since = None
            self._set(unit, "lagging", False, _lag_note(lr_slope, tau, now), math.nan)
            return
        history = segment
        swing = oscillation([h[0] for h in history], [h[1] for h in history], band=tol / 2)
        if swing is not None and swing[1] > tol:
            unit.period = swing[0]
            note = (
                f"the ratio swings by +-{swing[1]:.0%} with a period of ~{swing[0]:.0f} "
                "steps: the gradient statistics are not stationary"
            )
            self._set(unit, "non_stationary", False, note, math.nan)
            return
        if unit.relaxing_since is None:
            unit.relaxing_since = int(t)
        if abs(drift) + drift_margin < 0.3 * abs(now - 1) and abs(now - 1) > tol:
            note = (
                f"the ratio ({now:.2f}) is off while the norm is steady: the gradient statistics "
                "change, or the prediction does not describe this unit"
            )
            self._set(unit, "non_stationary", False, note, math.nan)
            return
        deviation = max(abs(now - 1), abs(drift))
        if t - unit.relaxing_since > 2 * tau and not _shrinking(history, t, tau, tol):
            note = (
                f"the ratio ({now:.2f}) has not come closer to the prediction in "
                f"{t - unit.relaxing_since:.0f} steps ({(t - unit.relaxing_since) / tau:.1f} "
                "relaxation times): the gradient statistics change (e.g. a loss going to zero)"
            )
            self._set(unit, "non_stationary", False, note, math.nan)
            return
        eta = tau * math.log(max(deviation, tol) / tol) + self.patience
        note = f"pooled ratio {now:.2f}; the norm moves towards equilibrium"
        self._set(unit, "relaxing", False, note, eta)

    def _follows(
        self,
        unit: UnitEquilibrium,
        now: float,
        level_margin: float,
        staying: bool,
        horizon: float,
    ) -> bool:
        """Under a constant LR: at the prediction and on the trajectory, with a moving target?

        The gradient statistics are not still on a real network: AdamW's norms swing by
        +-10-15% with a period of a few relaxation times (the study's runs), so at a swing's
        flank the norm's drift and the ratio's trend read beyond the tolerance, although the
        angle is where theory puts it. The norm and trend witnesses ask whether the target is
        still; the trajectory, integrated from the measured update size, asks whether the
        weights follow it. When they do (ratio to the trajectory pooled over the horizon inside
        the band) and the level is within the tolerance of the static prediction (both placed,
        as for entering ``tracking`` under a moving LR; to stay, not clearly outside the
        hysteresis band), the angle is within the tolerance of its equilibrium as the detector
        promises: ``tracking``, in equilibrium, as under a slowly moving LR. Only where the
        norm's trend is measured (not right after a jump or an action, whose windows the
        witnesses do not yet hold: the trajectory's pool spans the jump). A unit still relaxing
        along its trajectory is not flagged before its level is inside the tolerance, and one
        that relaxes more slowly than theory's relaxation time is off its trajectory.
        Returns whether it decided.
        """
        rows = [s for s in unit.trail if s[0] > unit.last_optimizer_step - horizon]
        if len(rows) < self.patience:
            return False
        tol = self.tolerance
        ratio, error = _pooled_ratio(rows)
        if staying:
            level = abs(now - 1) - level_margin <= _EXIT * tol
        else:
            level = _placed(now - 1, level_margin, tol)
        inside = self._on_path(ratio, error, staying) and level
        if not inside:
            return False
        note = (
            f"pooled ratio {now:.3f}, at {ratio:.3f} of the predicted trajectory: the gradient "
            "statistics move the equilibrium (the norm is not still), the weights follow it"
        )
        self._set(unit, "tracking", True, note, 0.0)
        return True

    def _against_trajectory(
        self,
        unit: UnitEquilibrium,
        samples: Sequence[list[float]],
        now: float,
        lr_drift: float,
        lr_now: float,
    ) -> bool:
        """Under a moving LR: the verdict against the predicted trajectory, if there is one.

        The trajectory (:mod:`lightning_sdm.theory._trajectory`) says where the weights should be
        now, lag included. Within tolerance of it, pooled over the horizon (to enter, inside the
        band and placed there, see :func:`_placed_inside`; to leave, clearly outside it):
        ``tracking``. Off
        it, on the side of more lag than the schedule explains: ``lagging``, with the measured
        and the expected lag; off it on the other side: the gradient statistics change faster
        than the model follows (``non_stationary``).
        Returns whether it decided (``False``: too few windows with a trajectory).
        """
        rows = [s for s in samples if len(s) > _TRAJ and math.isfinite(s[_TRAJ])]
        if len(rows) < self.patience:
            return False
        tol = self.tolerance
        ratio, error = _pooled_ratio([[s[_T], s[_TRAJ], s[_N]] for s in rows])
        last = rows[-1]
        # Expected lag: trajectory / static at the last window; measured: that times the pooled
        # ratio to the trajectory.
        expected = math.sqrt(last[_RHO] / last[_TRAJ]) if last[_TRAJ] > 0 else 1.0
        measured = ratio * expected
        unit.relaxing_since = None
        # A unit enters on positive evidence (inside the band, with a margin no wider than it)
        # and leaves only on clear evidence (hysteresis). A pool too noisy to place (a tiny
        # model late in a schedule to zero) is not "tracking".
        staying = unit.in_equilibrium or unit.regime == "tracking"
        inside = self._on_path(ratio, error, staying)
        if not staying:
            # Inside the band but too imprecise to place (5 windows of 2 measured steps per
            # relaxation time under AdamW on the study's networks): the trajectory follows the
            # schedule, so its ratio need not be cut at one relaxation time; the windows since
            # the last jump, up to two horizons, decide. Only then: a longer pool always would
            # average over a real excursion (OneCycle's peak).
            longer = [s for s in unit.trail if s[0] > unit.segment_start]
            if not inside and abs(ratio - 1) <= tol and len(longer) > len(rows):
                ratio, error = _pooled_ratio(longer)
                measured = ratio * expected
                inside = self._on_path(ratio, error, False)
        if inside:
            note = (
                f"at {ratio:.3f} of the predicted trajectory (expected lag: {expected:.2f} of the "
                f"static prediction, measured {measured:.2f}; {_lr_motion(lr_now)})"
            )
            # The trajectory starts each window from the measured norm, so a unit still relaxing
            # from its initialisation follows it too, with a lag the schedule does not explain.
            # In equilibrium only once it has been there in this segment (or is within the
            # tolerance of the static prediction now): a lag the weights took from the static
            # equilibrium is the schedule's; one they never left is the initialisation's.
            reached = unit.reached_optimizer_step is not None and (
                unit.reached_optimizer_step >= unit.segment_start
            )
            # A lag is the schedule's only on the side the LR's motion leaves the weights behind
            # (above the static prediction under a rising LR, below it under a falling one).
            # Clearly beyond the tolerance on the other side, the weights relax along their
            # trajectory from a norm something else set (the update size moved the equilibrium
            # norm): not an equilibrium, however long the unit was in one (a probe: 1.22 under a
            # slowly falling LR stayed in it). Hysteresis: in equilibrium, it leaves when clearly
            # beyond _EXIT tolerances; out of it, it does not enter with its level beyond one.
            beyond = abs(measured - 1) > tol
            if unit.in_equilibrium:
                margin = self.confidence * error * expected
                beyond = abs(measured - 1) - margin > _EXIT * tol
            against = beyond and (measured - 1) * lr_drift < 0
            if (unit.in_equilibrium or reached) and against:
                note = _messages.lag_against_schedule(ratio, measured, _lr_motion(lr_now))
                self._set(unit, "tracking", False, note, math.nan)
            elif unit.in_equilibrium or reached or abs(measured - 1) <= tol:
                self._set(unit, "tracking", True, note, 0.0)
            else:
                note += (
                    "; not yet in equilibrium: it has not reached its equilibrium since the "
                    "start or the last LR jump (the lag is the initialisation's)"
                )
                self._set(unit, "tracking", False, note, math.nan)
            return True
        # Off the trajectory towards more lag: on the side the trajectory already lags (or, with
        # the trajectory at the static value, on the side the LR's motion leaves behind).
        side = expected - 1 if abs(expected - 1) > tol / 2 else lr_drift
        if (ratio - 1) * side > 0:
            note = (
                f"lags more than the schedule explains: measured {measured:.2f} of the static "
                f"prediction, expected {expected:.2f} (the trajectory; {ratio:.2f} of it)"
            )
            self._set(unit, "lagging", False, note, math.nan)
            return True
        note = (
            f"at {ratio:.2f} of the predicted trajectory, on the side it does not lag to "
            f"({measured:.2f} of the static prediction, expected {expected:.2f}): the gradient "
            "statistics change"
        )
        self._set(unit, "non_stationary", False, note, math.nan)
        return True

    def _in_transit(
        self,
        unit: UnitEquilibrium,
        sample: Sequence[float],
        tracking: bool,
        horizon: float,
        change: str = "an LR change",
    ) -> bool:
        """After an LR jump or an action, before theory's wait: on the predicted trajectory?

        At a constant LR the unit still relaxes to its new equilibrium, so it is not in
        equilibrium (no action may take it for one); but when the ratio to the trajectory,
        pooled over the horizon (across the jump: the trajectory follows the jump, the static
        prediction does not), is inside the band (placed there to enter, see
        :func:`_placed_inside`; clearly outside the hysteresis band to leave), the weights follow
        the path theory predicts: ``tracking``, with the expected and the measured lag, not in
        equilibrium.
        Returns whether it decided (``False``: too few windows, or off the trajectory: the
        static logic's ``relaxing`` stands).
        """
        rows = [s for s in unit.trail if s[0] > sample[_T] - horizon]
        if len(rows) < self.patience or not math.isfinite(sample[_TRAJ]) or sample[_TRAJ] <= 0:
            return False
        ratio, error = _pooled_ratio(rows)
        if not self._on_path(ratio, error, tracking):  # staying: tracking at the last window
            return False
        expected = math.sqrt(sample[_RHO] / sample[_TRAJ])
        t = sample[_T]
        wait = max(unit.relax_until - t, 0.0)
        note = (
            f"{change}: on its way, at {ratio:.3f} of the predicted trajectory "
            f"(expected lag: {expected:.2f} of the static prediction, measured "
            f"{ratio * expected:.2f}); equilibrium in ~{wait:.0f} steps"
        )
        unit.relaxing_since = None
        self._set(unit, "tracking", False, note, wait)
        return True

    def _on_path(self, ratio: float, error: float, staying: bool) -> bool:
        """Whether a pooled ratio to the trajectory is within the band (with hysteresis).

        To enter: inside the band and placed there (:func:`_placed_inside`); to stay: not
        clearly outside ``_EXIT`` times the tolerance.
        """
        tol, z = self.tolerance, self.confidence
        if staying:
            return abs(ratio - 1) - z * error <= _EXIT * tol
        return _placed_inside(ratio, error, tol, z)

    def _without_prediction(self, unit: UnitEquilibrium, window: UnitWindow) -> None:
        samples = unit.samples
        tol, z = self.tolerance, self.confidence
        times = [s[_T] for s in samples]
        span = max(times[-1] - times[0], 1.0)
        log_ms = [math.log(max(s[_MS], 1e-300)) for s in samples]
        ms_slope, ms_error, _ = slope_with_error(times, log_ms)
        norm_slope, norm_error, _ = slope_with_error(times, [s[_LOGNORM] for s in samples])
        # Relative changes over the horizon: half of ln(mean square) is ln(RMS).
        angle_change, angle_error = span * ms_slope / 2, span * ms_error / 2
        norm_change, norm_change_error = span * norm_slope, span * norm_error
        unit.ratio = unit.ratio_error = unit.period = math.nan
        unit.norm_drift, unit.norm_drift_error = norm_change, norm_change_error
        if unit.in_equilibrium:
            leaving = (
                abs(angle_change) - z * angle_error > 2 * tol
                or abs(norm_change) - z * norm_change_error > tol
            )
        else:
            leaving = not (
                abs(angle_change) + z * angle_error <= tol
                and abs(norm_change) + z * norm_change_error <= tol / 2
            )
        note = "no prediction: judged by the stationarity of the angle and the norm"
        self._set(unit, "no_prediction", not leaving, note, 0.0 if not leaving else math.nan)

    def _level_note(self, ratio: float, moving: bool = False, lr_drift: float = 0.0) -> str:
        if moving:
            return (
                f"at {ratio:.3f} of the moving prediction ({_lr_motion(lr_drift)}: the weights "
                "follow)"
            )
        if abs(ratio - 1) <= self.tolerance:
            return f"pooled ratio {ratio:.3f}, the norm steady"
        side = "below" if ratio < 1 else "above"
        return (
            f"stationary, {abs(ratio - 1):.0%} {side} the prediction (the norm is steady: the "
            "prediction is off for this unit)"
        )

    @staticmethod
    def _set(unit: UnitEquilibrium, regime: Regime, inside: bool, note: str, eta: float) -> None:
        unit.regime, unit.in_equilibrium, unit.note = regime, inside, note
        unit.steps_to_equilibrium = eta


def _sample(window: UnitWindow, theory: float | None) -> list[float]:
    mean_square = window.angular_update**2
    tau = window.time_scale if window.time_scale is not None else math.nan
    exponent = window.norm_exponent if window.norm_exponent else 0.25
    trajectory = window.trajectory if window.trajectory is not None and theory else None
    return [
        float(window.optimizer_step),
        mean_square / theory**2 if theory is not None else math.nan,
        mean_square,
        float(max(window.steps, 1)),
        math.log(window.weight_norm),
        math.log(theory**2) if theory is not None else math.nan,
        float(tau),
        1.0 / exponent,
        mean_square / trajectory**2 if trajectory else math.nan,
    ]


def _smooth(history: Sequence[Sequence[float]], sample: Sequence[float]) -> bool:
    """Whether the prediction's change is what its last three windows extrapolate to.

    Near the end of a linear-to-zero or cosine schedule ``ln lr`` falls by more per window
    than any threshold on its recent changes allows (0.13x in one window at the end of a
    linear decay), yet nothing jumped: the squared prediction (``~ lr``) lies on the parabola
    through its last three values, within a quarter of its last value. A step (x0.1 on a
    plateau or a ramp) is off it by most of its last value.

    Example::

        >>> ramp = [[t, 1.0, math.log(1 - t / 100)] for t in (60, 70, 80)]
        >>> _smooth(ramp, [90.0, 1.0, 1.0, 2, 0.0, math.log(0.1)])
        True
        >>> plateau = [[t, 1.0, math.log(0.5)] for t in (60, 70, 80)]
        >>> _smooth(plateau, [90.0, 1.0, 1.0, 2, 0.0, math.log(0.05)])
        False
    """
    points = [(h[0], math.exp(h[2])) for h in history if len(h) > 2 and math.isfinite(h[2])][-3:]
    if len(points) < 3 or len({t for t, _ in points}) < 3:
        return False
    t = sample[_T]
    expected = 0.0
    for i, (ti, xi) in enumerate(points):  # Lagrange: the parabola through the three points
        weight = 1.0
        for j, (tj, _) in enumerate(points):
            if j != i:
                weight *= (t - tj) / (ti - tj)
        expected += weight * xi
    last = points[-1][1]
    return abs(math.exp(sample[_LOGTHEORY]) - expected) <= 0.25 * last


def _pooled_ratio(rows: Sequence[Sequence[float]]) -> tuple[float, float]:
    """The RMS ratio pooled from ``[t, ratio of mean squares, steps]`` rows, and its error."""
    rho, rho_error = mean_with_error([r[1] for r in rows], [r[2] for r in rows])
    ratio = math.sqrt(max(rho, 0.0))
    return ratio, rho_error / (2 * max(ratio, 1e-12))


def _placed(deviation: float, margin: float, tol: float) -> bool:
    """Whether a pooled estimate is inside the band ``+-tol``, and precise enough to tell.

    The best estimate inside, with a confidence ``margin`` no wider than the band itself: an
    estimate that cannot tell inside from outside at the band's scale does not enter. Requiring
    the whole interval inside the band would ask windows of 2 measured steps (which scatter by
    +-20% each on real networks) for a pool of dozens of them, more than the relaxation time
    that bounds the horizon holds (AdamW on the study's networks: 5 windows).

    Example::

        >>> _placed(0.05, 0.05, 0.1), _placed(0.05, 0.13, 0.1), _placed(0.12, 0.01, 0.1)
        (True, False, False)
    """
    return abs(deviation) <= tol and margin <= tol


def _placed_inside(ratio: float, error: float, tol: float, z: float) -> bool:
    """:func:`_placed` for a pooled ratio with standard error ``error``, at ``z`` errors.

    Example::

        >>> _placed_inside(1.05, 0.03, 0.1, 1.64), _placed_inside(1.05, 0.08, 0.1, 1.64)
        (True, False)
    """
    return _placed(ratio - 1, z * error, tol)


def _lr_motion(lr_drift: float) -> str:
    """How fast the prediction's LR moves, with its direction, per relaxation time.

    ``lr_drift`` is ``tau d ln(lr) / dt`` (now: over the last window): a percentage while small,
    a factor once the LR changes by more than e per relaxation time (the end of a decay to zero).

    Example::

        >>> _lr_motion(-0.12)
        'the LR falls by 12% per relaxation time'
        >>> _lr_motion(0.3)
        'the LR rises by 30% per relaxation time'
        >>> _lr_motion(-11.95)
        'the LR falls by a factor of 1.55e+05 per relaxation time'
        >>> _lr_motion(0.0)
        'the LR stands still now'
    """
    if abs(lr_drift) < 0.005:
        return _messages.lr_motion("still", None, None)
    how = "falls" if lr_drift < 0 else "rises"
    if abs(lr_drift) <= 1:
        return _messages.lr_motion(how, abs(lr_drift), None)
    factor = math.exp(min(abs(lr_drift), 700.0))  # at lr -> 0 the drift has no bound
    return _messages.lr_motion(how, None, factor)


def _lag_note(lr_slope: float, tau: float, ratio: float) -> str:
    # The slope is the prediction's (ln of its square), not the LR's: under Adafactor's relative
    # steps the prediction falls as 1/sqrt(step) at a constant lr. Held at a steady rate g, the
    # ratio settles at sqrt(1 + tau g) (first order), which exists only for 1 + tau g > 0.
    how = "halves" if lr_slope < 0 else "doubles"
    every = 2 * math.log(2) / abs(lr_slope)
    steady = math.sqrt(1 + tau * lr_slope) if 1 + tau * lr_slope > 0 else None
    return _messages.lag_note(how, every, tau, ratio, steady)


def _shrinking(history: Sequence[Sequence[float]], t: float, tau: float, tol: float) -> bool:
    """Whether the unit comes closer to equilibrium, or is inside the tolerance.

    Over the last relaxation time against the one before, the excess ``x = 1 / ratio^2 - 1`` must
    shrink: a relaxation divides it by ``e`` per relaxation time, while far from equilibrium
    ``|ratio - 1|`` itself hardly moves.
    """

    def excess(ratio: float) -> float:
        return abs(1 / max(ratio, 1e-12) ** 2 - 1)

    recent = [h[1] for h in history if t - tau < h[0] <= t]
    before = [h[1] for h in history if t - 2 * tau < h[0] <= t - tau]
    if not recent or not before:
        return True
    if abs(sum(recent) / len(recent) - 1) <= tol:
        return True
    now = sum(excess(r) for r in recent) / len(recent)
    then = sum(excess(r) for r in before) / len(before)
    return now < 0.7 * then
