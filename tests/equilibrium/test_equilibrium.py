"""The equilibrium detector, pure: windows in, regimes out.

Most streams come from the real ``SphericalMonitor`` on the synthetic scale-invariant problem of
``tests/synthetic.py``, whose physics is known: the noise-free ratio measured/predicted of a run
that starts at ``start`` times the equilibrium norm is ``model_ratio(...)``, so "the unit is
still relaxing" and "the unit is in equilibrium" are decided independently of the detector.
"""

import dataclasses
import math
import random
import re

import pytest

from lightning_sdm.equilibrium._detector import EquilibriumDetector
from lightning_sdm.records import UnitWindow
from lightning_sdm.theory._predictions import lr_change_relaxation_steps, relaxation_steps
from tests import synthetic

TAU = relaxation_steps(0.1, 1e-3, 0.9)  # 250 steps: the default synthetic SGD run


def window(step, value, theory=0.01, unit="w", time_scale=200.0, frozen=False, norm=1.0):
    ratio = value / theory if theory else None
    return UnitWindow(
        unit=unit,
        optimizer_step=step,
        global_step=step,
        angular_update=value,
        last=value,
        theory=theory,
        ratio=ratio,
        weight_norm=norm,
        steps=8,
        lr=0.1,
        frozen=frozen,
        time_scale=time_scale,
        norm_exponent=0.25,
    )


def _regimes(windows, **kwargs):
    """The detector after the stream, and per window (window, regime, a copy of the state)."""
    detector = EquilibriumDetector(**kwargs)
    out = []
    for w in windows:
        detector.update([w])
        state = detector.state[w.unit]
        out.append((w, state.regime, dataclasses.replace(state)))
    return detector, out


# ------------------------------------------------------------------------ stationary runs


def test_a_stationary_run_is_in_equilibrium_and_stays():
    windows = synthetic.windows(steps=6000, start=1.0)
    detector, out = _regimes(windows)
    flags = [regime == "equilibrium" for _, regime, _ in out]
    patience = detector.patience
    assert all(flags[patience:]), [r for _, r, _ in out if r != "equilibrium"]
    assert detector.state["w"].exits == 0 and detector.state["w"].entries == 1


@pytest.mark.parametrize(("start", "side"), [(0.3, "below"), (3.0, "above")])
def test_approach_from_below_or_above_is_relaxing_until_the_physics_says_equilibrium(start, side):
    """Never flagged while the model ratio is still off by more than the tolerance; flagged
    within one relaxation time (plus the windows of evidence) of the moment it is inside."""
    windows = synthetic.windows(steps=4000, start=start)
    detector, out = _regimes(windows, tolerance=0.1)
    inside = next(
        w.optimizer_step
        for w in windows
        if abs(synthetic.model_ratio("sgd", start, TAU, w.optimizer_step) - 1) <= 0.1
    )
    flagged = [w.optimizer_step for w, _, state in out if state.in_equilibrium]
    for step in flagged:  # the noise-free deviation at every flagged window
        deviation = abs(synthetic.model_ratio("sgd", start, TAU, step) - 1)
        assert deviation <= 0.1 + 0.03, (side, step, deviation)
    assert flagged and flagged[0] <= inside + TAU + detector.patience * 50
    early = [regime for w, regime, _ in out if detector.patience * 50 < w.optimizer_step < inside]
    assert early and set(early) == {"relaxing"}, set(early)
    assert detector.state["w"].exits == 0
    assert all(flagged[0] <= step for step in flagged)


@pytest.mark.parametrize("seed", range(6))
def test_a_norm_still_rising_towards_its_plateau_is_not_equilibrium(seed):
    """Issue 20's digits example, small: SGD (tau = 25 steps), a window every step, the first
    conv relaxing from below more slowly than theory's relaxation time (here 3x: its norm still
    rises while the angle reads ~1.16x the prediction). Read with theory's tau, the norm's trend
    understates the deviation, and the old detector took the level for the prediction's bias
    (allowed up to 2 tolerances) and declared equilibrium at ~1.16x; DecayLR fired there. A level
    off the way the norm still moves is relaxation: no equilibrium before it is inside the
    tolerance."""
    rng = random.Random(seed)
    tau, theory, out = 25.0, 0.02, []
    detector = EquilibriumDetector(tolerance=0.1)
    for t in range(1, 301):
        q = 1 - 0.5 * math.exp(-t / (3 * tau))  # |w|^4 over its plateau, from 0.5
        model = q**-0.5  # the noise-free ratio measured / predicted (angle ~ 1 / |w|^2)
        value = theory * model * math.exp(rng.gauss(0, 0.15))
        detector.update([window(t, value, theory=theory, time_scale=tau, norm=q**0.25)])
        out.append((model, detector.state["w"].in_equilibrium))
    flagged = [model for model, inside in out if inside]
    assert flagged and max(flagged) <= 1.1 + 0.03, max(flagged)
    assert out[-1][1]  # and it does get there


def test_a_noisy_norm_at_equilibrium_is_placed_inside_with_few_windows():
    """The study's AdamW runs: a relaxation time of 100 steps holds 5 windows of 2 measured steps
    each; the angle sits at 0.98 of its prediction (+-15% per window) and the norm scatters by
    3% per window around its plateau. The norm witness's best estimate is inside the band with
    a margin no wider than it: in equilibrium. It used to need the whole margin inside the band,
    which 5 windows (3 degrees of freedom) rarely give: 92% of the settled windows, 77% at worst.
    """
    fractions = []
    for seed in range(16):
        rng = random.Random(seed)
        detector, flags = EquilibriumDetector(), []
        for i in range(1, 41):
            value = 0.01 * 0.98 * math.exp(rng.gauss(0, 0.15))
            w = dataclasses.replace(
                window(20 * i, value, time_scale=100.0, norm=math.exp(rng.gauss(0, 0.03))),
                steps=2,
                norm_exponent=0.5,
            )
            detector.update([w])
            flags.append(detector.state["w"].in_equilibrium)
        fractions.append(sum(flags[10:]) / len(flags[10:]))
    assert sum(fractions) / len(fractions) >= 0.95, fractions


def _adamw_swing(seed, swing, start=1.0, tau=100.0, period=300.0, every=20, windows=60):
    """An AdamW-like unit (p = 2) whose gradient statistics swing: its equilibrium ``|w|^2``
    goes as ``1 + swing sin(2 pi t / period)`` and ``|w|^2`` relaxes towards it in ``tau`` steps
    (integrated every step, from ``start``). The noise-free ratio measured / static prediction
    is ``|w|_eq / |w|`` (the angle ~ update / ``|w|``); the trajectory, built from the measured
    update size and norm, predicts it (within 2%); each window of 2 steps scatters by 15%.
    Yields ``(window, noise-free ratio)``."""
    rng, q, theory = random.Random(seed), start, 0.01
    for i in range(1, windows + 1):
        for step in range(every * (i - 1), every * i):
            target = 1 + swing * math.sin(2 * math.pi * step / period)
            q += (target - q) / tau
        model = math.sqrt(target / q)
        value = theory * model * math.exp(rng.gauss(0, 0.15))
        w = dataclasses.replace(
            window(every * i, value, theory=theory, time_scale=tau, norm=math.sqrt(q)),
            steps=2,
            norm_exponent=0.5,
            trajectory=theory * model * math.exp(rng.gauss(0, 0.02)),
        )
        yield w, model


def test_a_norm_swinging_around_its_equilibrium_on_its_trajectory_is_flagged():
    """The study's AdamW runs at a constant LR: the norm swings by +-5-15% with a period of ~3
    relaxation times (the gradient statistics move the equilibrium), the angle +-12% around
    the prediction, at it on average. At a swing's flank the norm's drift and the ratio's trend
    are beyond the tolerance, so neither witness says "still"; but the weights follow the
    trajectory and the level is within the tolerance: flagged (``tracking``, in equilibrium).
    The old detector flagged 81% of the windows after the first 10 (58% at worst); here >= 95%.
    A unit relaxing from half its equilibrium along its trajectory is still not flagged before
    its level is inside the tolerance."""
    fractions = []
    for seed in range(16):
        detector, flags = EquilibriumDetector(), []
        for w, _ in _adamw_swing(seed, swing=0.3):
            detector.update([w])
            flags.append(detector.state["w"].in_equilibrium)
        fractions.append(sum(flags[10:]) / len(flags[10:]))
    assert sum(fractions) / len(fractions) >= 0.95, fractions
    for seed in range(16):
        detector, flagged = EquilibriumDetector(), []
        for w, model in _adamw_swing(seed, swing=0.0, start=0.5):
            detector.update([w])
            if detector.state["w"].in_equilibrium:
                flagged.append(model)
        assert flagged and max(flagged) <= 1.1 + 0.03, (seed, max(flagged))


def test_relaxing_carries_an_eta_that_shrinks():
    windows = synthetic.windows(steps=2000, start=3.0)
    _, out = _regimes(windows)
    etas = [s.steps_to_equilibrium for _, regime, s in out if regime == "relaxing"]
    assert len(etas) > 5 and all(e > 0 for e in etas)
    assert etas[-1] < etas[0] / 2


def test_noisy_windows_of_a_flat_norm_do_not_flicker():
    """Ratios scattering by +-15% per window around 1, norm flat: one entry, no exit."""
    rng = random.Random(0)
    windows = [window(50 * i, 0.01 * (1 + rng.gauss(0, 0.08))) for i in range(1, 200)]
    detector, out = _regimes(windows)
    state = detector.state["w"]
    assert (state.entries, state.exits) == (1, 0)
    assert sum(s.in_equilibrium for _, _, s in out) >= len(out) - detector.patience


def test_a_ratio_sweeping_through_one_is_not_equilibrium():
    """Non-stationary: the ratio passes 1 on its way from 0.3 to 1.4 (and back), norm flat."""
    sweep = [0.3 + 0.09 * i for i in range(13)] + [1.4 - 0.09 * i for i in range(13)]
    _, out = _regimes([window(50 * (i + 1), 0.01 * r) for i, r in enumerate(sweep)])
    assert not any(s.in_equilibrium for _, _, s in out)


def test_oscillating_gradient_noise_is_non_stationary_with_its_period():
    period = 800
    windows = synthetic.windows(
        steps=6000, noise_at=lambda t: 1 + 0.5 * math.sin(2 * math.pi * t / period)
    )
    _, out = _regimes(windows)
    late = [(regime, s.period) for w, regime, s in out if w.optimizer_step > 3000]
    assert {regime for regime, _ in late} == {"non_stationary"}
    measured = [p for _, p in late if math.isfinite(p)]
    assert measured and all(abs(p / period - 1) < 0.2 for p in measured)
    assert not any(s.in_equilibrium for w, _, s in out if w.optimizer_step > 1000)


def test_vanishing_gradient_noise_is_non_stationary():
    """A loss going to zero: the target keeps moving, the ratio never comes back."""
    windows = synthetic.windows(steps=4000, noise_at=lambda t: math.exp(-t / 1500))
    detector, out = _regimes(windows)
    late = {regime for w, regime, _ in out if w.optimizer_step > 2000}
    assert late == {"non_stationary"}
    assert "loss going to zero" in detector.state["w"].note


def test_adamw_relaxes_then_equilibrium():
    windows = synthetic.windows(kind="adamw", lr=1e-3, wd=0.5, steps=5000, start=2.0)
    _, out = _regimes(windows)
    regimes = [regime for _, regime, _ in out]
    assert "relaxing" in regimes[:10]
    assert regimes[-10:] == ["equilibrium"] * 10


# ------------------------------------------------------------------------ LR schedules

T = 4000


def _schedule_regimes(lr_at, steps=T):
    windows = synthetic.windows(steps=steps, lr_at=lr_at)
    _, out = _regimes(windows)
    return [(w.optimizer_step, regime, state.note) for w, regime, state in out]


def _between(rows, low, high):
    return {regime for step, regime, _ in rows if low <= step < high}


def _expected_lags(rows, low, high):
    """The expected lags (trajectory / static) the tracking notes state between two steps."""
    found = [re.search(r"expected lag: ([0-9.]+)", note) for s, _, note in rows if low <= s < high]
    return [float(m.group(1)) for m in found if m]


def test_per_step_cosine_tracks_its_trajectory_with_the_lag_it_predicts():
    rows = _schedule_regimes(lambda t: 0.1 * 0.5 * (1 + math.cos(math.pi * t / T)))
    assert _between(rows, 1000, 2000) <= {"tracking", "equilibrium"}
    # Late, the weights lag the static prediction, as the trajectory predicts: tracking, with
    # the expected lag named (it grows as the LR collapses towards 0).
    assert _between(rows, 3200, T) == {"tracking"}
    lags = _expected_lags(rows, 3200, T)
    assert lags and all(lag < 0.9 for lag in lags) and lags[-1] < lags[0]


def test_one_cycle_lags_in_the_warm_up_and_at_the_end():
    def one_cycle(t):
        if t < 0.3 * T:
            return 0.1 * (0.04 + 0.96 * t / (0.3 * T))
        return 0.1 * 0.5 * (1 + math.cos(math.pi * (t - 0.3 * T) / (0.7 * T)))

    rows = _schedule_regimes(one_cycle)
    # The weights start at the norm of lr = 0.1 while the warm-up starts at 0.004, then fall
    # behind the warm-up, and behind the end: all as the trajectory predicts.
    assert _between(rows, 200, 0.3 * T) <= {"tracking", "equilibrium"}
    assert max(abs(lag - 1) for lag in _expected_lags(rows, 200, 0.3 * T)) > 0.3
    assert _between(rows, 0.4 * T, 0.55 * T) <= {"tracking", "equilibrium"}
    assert _between(rows, 0.85 * T, T) == {"tracking"}
    assert max(_expected_lags(rows, 0.85 * T, T)) < 0.9


def test_linear_to_zero_ends_without_a_prediction_and_without_a_crash():
    rows = _schedule_regimes(lambda t: 0.1 * max(0.0, 1 - t / (0.9 * T)))
    assert _between(rows, 500, 1500) <= {"tracking", "equilibrium"}
    assert _between(rows, 0.7 * T, 0.9 * T) == {"tracking"}
    assert min(_expected_lags(rows, 0.7 * T, 0.9 * T)) < 0.9
    assert _between(rows, 0.92 * T, T) == {"no_prediction"}
    assert rows[-1][2] == "lr = 0: the weights do not move"


def test_warmup_stable_decay():
    def wsd(t):
        if t < 0.1 * T:
            return 0.1 * t / (0.1 * T) + 1e-4
        return 0.1 if t < 0.8 * T else 0.1 * (T - t) / (0.2 * T)

    rows = _schedule_regimes(wsd)
    assert _between(rows, 0.3 * T, 0.8 * T) == {"equilibrium"}
    assert _between(rows, 0.85 * T, T) == {"tracking"}
    assert min(_expected_lags(rows, 0.85 * T, T)) < 0.9


def test_off_the_trajectory_is_lagging_with_the_measured_and_the_expected_lag():
    """The LR falls; the trajectory expects 0.9 of the static value, the weights stay at 0.6."""
    detector = EquilibriumDetector()
    for i in range(1, 16):
        theory = 0.01 * math.exp(-i / 10)  # ln(lr) falls by 0.2 per window: moving
        w = dataclasses.replace(
            window(50 * i, 0.6 * theory, theory=theory, time_scale=100.0),
            trajectory=0.9 * theory,
        )
        detector.update([w])
    state = detector.state["w"]
    assert state.regime == "lagging" and not state.in_equilibrium
    assert "measured 0.60" in state.note and "expected 0.90" in state.note


def test_a_pool_too_noisy_to_place_is_not_tracking():
    """Found by a probe on a tiny model under a per-step cosine: the angle scatters by a factor
    of 3 from window to window around its trajectory. Not significantly outside the band is not
    inside it: such a unit must not enter ``tracking``, which counts as equilibrium (it stayed
    there while single windows read 0.2 of the trajectory)."""
    detector = EquilibriumDetector()
    scatter = [1.6, 0.3, 1.5, 0.4, 1.6, 0.3, 1.4, 0.5, 1.6, 0.3, 1.5, 0.4, 1.6, 0.3, 1.5]
    for i, noise in enumerate(scatter, start=1):
        theory = 0.01 * math.exp(-i / 10)  # the LR falls: moving
        w = dataclasses.replace(
            window(50 * i, noise * 0.9 * theory, theory=theory, time_scale=100.0),
            trajectory=0.9 * theory,
        )
        detector.update([w])
        state = detector.state["w"]
        assert state.regime != "tracking" and not state.in_equilibrium, (i, state.note)


def _falling_lr_regimes(seed, level, noise=0.15, time_scale=200.0):
    """A falling LR, windows of 2 measured steps scattering by ``noise`` (log-normal) around
    ``level`` times the trajectory (itself 0.9 of the static prediction); the regimes."""
    rng = random.Random(seed)
    detector, regimes = EquilibriumDetector(), []
    for i in range(1, 61):
        theory = 0.01 * math.exp(-20 * i / 1000)  # ln(lr) falls by 0.02 per window
        value = level * 0.9 * theory * math.exp(rng.gauss(0, noise))
        w = dataclasses.replace(
            window(20 * i, value, theory=theory, time_scale=time_scale),
            trajectory=0.9 * theory,
            steps=2,
        )
        detector.update([w])
        regimes.append(detector.state["w"].regime)
    return regimes[15:]  # after the first relaxation time


@pytest.mark.parametrize("seed", range(5))
def test_noisy_windows_on_their_trajectory_are_tracking(seed):
    """The study's real networks: 2 measured steps per window scatter by +-15-20%, and AdamW
    settles a few percent under its prediction. A unit at 0.95 of its trajectory is inside the
    band, and ten windows per relaxation time place it there; it used to need the whole
    confidence interval inside the band, and stayed out for whole runs (recall 19-73%)."""
    regimes = _falling_lr_regimes(seed, level=0.95)
    assert regimes.count("tracking") >= 0.9 * len(regimes), regimes
    for level in (0.75, 1.3):  # off the trajectory: never tracking
        assert "tracking" not in _falling_lr_regimes(seed, level=level)


def test_a_short_relaxation_time_draws_on_the_windows_before_the_horizon():
    """The study's AdamW on the generated task under warm-up + cosine: 5 windows of 2 measured
    steps per relaxation time, each +-25%: the one-horizon pool is inside the band but its
    margin wider than it, so a unit on its trajectory was not placed there (the study: recall
    72%). The trajectory follows the schedule, so the windows since the last jump (up to two
    horizons) may decide then. Measured over 8 seeds at 0.95 of the trajectory: 71% of the
    windows tracking before, 84% now; off the trajectory (0.75, 1.3) 1-2% either way."""

    def tracking(level: float) -> float:
        fractions = []
        for seed in range(8):
            regimes = _falling_lr_regimes(seed, level=level, noise=0.25, time_scale=100.0)
            fractions.append(regimes.count("tracking") / len(regimes))
        return sum(fractions) / len(fractions)

    assert tracking(0.95) >= 0.8
    assert tracking(0.75) <= 0.05 and tracking(1.3) <= 0.05


def test_a_step_decay_is_tracked_on_its_trajectory_but_not_in_equilibrium_before_the_wait():
    """After a 10x step the weights relax for longer than the rest of the run: at a constant LR
    that is no equilibrium (no action may take it for one), but they follow the trajectory, so
    the windows say ``tracking`` with the lag theory expects (the angle drops ~3x at the jump and
    recovers as the norm shrinks), not a bare ``relaxing``."""
    windows = synthetic.windows(steps=3000, lr_at=lambda t: 0.1 if t < 1500 else 0.01)
    _, out = _regimes(windows)
    rows = [(w.optimizer_step, regime, state.note) for w, regime, state in out]
    assert _between(rows, 500, 1500) == {"equilibrium"}
    wait = lr_change_relaxation_steps(0.1, relaxation_steps(0.01, 1e-3, 0.9), 0.1)
    assert wait > 1500  # the weights need longer than the rest of the run
    after = [(w, regime, state) for w, regime, state in out if w.optimizer_step > 1500]
    assert not any(state.in_equilibrium for _, _, state in after)
    assert {regime for _, regime, _ in after} == {"tracking"}
    assert "jumped by 0.1x" in after[0][2].note
    lags = _expected_lags(rows, 1500, 3000)
    assert lags[0] < 0.5 and lags[-1] > lags[0]  # the norm shrinks: the lag closes
    for w, _, state in after:  # the measured lag is the measured ratio to the static value
        measured = float(re.search(r"measured ([0-9.]+)", state.note).group(1))
        assert measured == pytest.approx(w.angular_update / w.theory, abs=0.1)


def test_after_a_jump_off_the_trajectory_is_relaxing():
    """A unit that does not follow its trajectory after a jump keeps theory's wait."""
    detector = EquilibriumDetector()
    for i in range(1, 25):
        theory = 0.01 if i <= 10 else 0.001  # a 10x step at window 11
        measured = theory * (1.0 if i <= 10 else 1.6)  # off its trajectory after the step
        w = dataclasses.replace(
            window(50 * i, measured, theory=theory, time_scale=100.0 if i <= 10 else 1000.0),
            trajectory=theory if i <= 10 else 0.5 * theory,
        )
        detector.update([w])
        state = detector.state["w"]
        if i > 13:
            assert state.regime == "relaxing" and not state.in_equilibrium, (i, state.note)


def test_lr_zero_in_the_middle_and_back():
    rows = _schedule_regimes(lambda t: 0.0 if 1000 <= t < 1500 else 0.1, steps=3000)
    assert _between(rows, 1050, 1500) == {"no_prediction"}
    assert _between(rows, 2500, 3000) == {"equilibrium"}


# ------------------------------------------------------------------------ other units


def test_without_prediction_stationarity_is_the_criterion():
    rng = random.Random(1)
    values = [0.05, 0.03, 0.02] + [0.015 * (1 + rng.gauss(0, 0.03)) for _ in range(20)]
    detector, out = _regimes(
        [window(10 * (i + 1), v, theory=None, time_scale=None) for i, v in enumerate(values)]
    )
    state = detector.state["w"]
    assert state.criterion == "stationary" and state.regime == "no_prediction"
    assert state.in_equilibrium
    assert not out[2][2].in_equilibrium  # still falling at the third window


def test_quorum_and_frozen_and_nan_units():
    detector = EquilibriumDetector(tolerance=0.1, patience=2, quorum=0.5)
    for step in (10, 20, 30):
        detector.update([window(step, 0.01, unit="a"), window(step, math.nan, unit="b")])
    assert detector.fraction() == 0.5 and detector.reached()
    assert detector.state["b"].regime == "invalid"
    strict = EquilibriumDetector(tolerance=0.1, patience=2, quorum=1.0)
    for step in (10, 20, 30):
        strict.update([window(step, 0.01, unit="a"), window(step, 0.0, unit="b", frozen=True)])
    assert not strict.reached()
    assert strict.state["b"].regime == "frozen"
    assert strict.regimes() == {"equilibrium": 1, "frozen": 1}


def test_restart_waits_on_each_units_own_clock():
    detector = EquilibriumDetector(patience=2)
    for step in (100, 200, 300):
        detector.update([window(step, 0.01, unit="a"), window(step // 2, 0.01, unit="b")])
    detector.restart(relax_steps=500)
    assert detector.state["a"].relax_until == 300 + 500
    assert detector.state["b"].relax_until == 150 + 500
    assert not detector.reached()


def test_state_dict_round_trip_gives_the_same_decisions():
    windows = synthetic.windows(steps=2500, start=2.0)
    reference = EquilibriumDetector()
    resumed = EquilibriumDetector()
    decisions = [reference.update([w]) for w in windows]
    for w in windows[:20]:
        resumed.update([w])
    restored = EquilibriumDetector()
    restored.load_state_dict(resumed.state_dict())
    replay = [restored.update([w]) for w in windows[20:]]
    assert replay == decisions[20:]
    assert restored.state_dict() == reference.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tolerance": 0}, "`tolerance`"),
        ({"tolerance": "0.1"}, "`tolerance`"),
        ({"patience": 1}, "`patience`"),
        ({"patience": True}, "`patience`"),
        ({"quorum": 0}, "`quorum`"),
        ({"confidence": -1.0}, "`confidence`"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EquilibriumDetector(**kwargs)


def test_the_lag_note_speaks_of_the_prediction_not_the_lr() -> None:
    # Adafactor's relative step falls as 1/sqrt(step) at a constant lr: the note must name what
    # falls. A prediction that halves every 100 steps has ln(theory^2) falling by 2 ln 2 per 100.
    from lightning_sdm.equilibrium._detector import _lag_note

    note = _lag_note(-2 * math.log(2) / 100, tau=400.0, ratio=0.7)
    assert note.startswith("the predicted angle halves every 100 steps"), note
    assert "lr" not in note.split(":")[0]


def test_a_unit_relaxing_from_its_initialisation_under_a_moving_lr_is_not_in_equilibrium():
    """Found by a probe: AdamW, an LR falling by 5-10% over the run, a unit at 0.5 of its static
    prediction 0.15 relaxation times after the start. The trajectory starts each window from the
    measured norm, so it follows the unit and reads a lag of 0.5: `tracking` counted as
    equilibrium, and `on_equilibrium="stop"` ended the fit at step 50. The lag is the
    initialisation's, not the schedule's: tracking, but not in equilibrium until the unit has
    been at its equilibrium. A unit that has been there keeps its schedule's lag as equilibrium."""

    def run(level: float) -> list[tuple[str, bool]]:
        rng = random.Random(0)
        detector, out = EquilibriumDetector(), []
        for i in range(1, 41):
            theory = 0.01 * (1 - 0.1 * i / 40) ** 0.5  # lr falls by 10% over the run
            value = level * theory * math.exp(rng.gauss(0, 0.05))
            w = dataclasses.replace(
                window(10 * i, value, theory=theory, time_scale=333.0),
                trajectory=level * theory,
                steps=2,
            )
            detector.update([w])
            state = detector.state["w"]
            out.append((state.regime, state.in_equilibrium))
        return out

    far = run(0.5)
    assert any(regime == "tracking" for regime, _ in far)
    assert not any(inside for _, inside in far), far
    near = run(0.97)
    assert sum(inside for _, inside in near[10:]) >= 0.9 * len(near[10:]), near


def test_the_tail_of_a_linear_decay_to_zero_is_not_an_lr_jump():
    """Found by a probe: at the last windows of a linear decay to zero ln(lr) falls by more per
    window (0.13x at the end) than the jump threshold allows, and the detector said "the LR
    jumped", left equilibrium and printed hundreds of thousands of steps to wait. The squared
    prediction (~ lr) is on the line its last windows draw: no jump. A real x0.1 step is one."""
    detector, notes = EquilibriumDetector(), []
    for i in range(1, 31):
        theory = 0.01 * math.sqrt(1 - (10 * i - 1) / 300)  # lr falls linearly to ~0 at step 300
        w = dataclasses.replace(
            window(10 * i, 0.9 * theory, theory=theory, time_scale=50.0),
            trajectory=0.9 * theory,
            steps=2,
        )
        detector.update([w])
        notes.append(detector.state["w"].note)
    assert not any("jumped" in note for note in notes), notes
    assert detector.state["w"].regime == "tracking"
    step = EquilibriumDetector()
    for i in range(1, 31):
        theory = 0.01 * (1.0 if i <= 20 else math.sqrt(0.1))
        step.update([window(10 * i, theory, theory=theory, time_scale=50.0)])
        if i == 21:
            assert "jumped by 0.1x" in step.state["w"].note


def test_the_tracking_note_gives_the_lr_direction_and_a_factor_when_large() -> None:
    # A probe read "the LR changes by 1195% per relaxation time" just after a warm-up, with no
    # direction; at the end of a decay to zero the drift has no bound (it must not overflow).
    from lightning_sdm.equilibrium._detector import _lr_motion

    assert _lr_motion(-0.2) == "the LR falls by 20% per relaxation time"
    assert _lr_motion(2.0).startswith("the LR rises by a factor of 7.39")
    assert "factor" in _lr_motion(-1e6)


def test_a_ratio_within_tolerance_in_a_warm_up_is_not_lagging() -> None:
    """Found by a probe: early in a warm-up, before the trajectory has enough windows, a unit at
    1.01 of its prediction was `lagging` with "steady lag: 5.12": the norm had not followed the
    rising LR, but the angle is where theory puts it. `lagging` says the ratio is off by the
    lag; within the tolerance it is not, whatever the norm does."""
    rng = random.Random(0)
    detector, out = EquilibriumDetector(), []
    for i in range(1, 12):
        theory = 0.01 * math.sqrt(i / 30)  # a linear warm-up: theory^2 ~ lr
        value = 1.01 * theory * math.exp(rng.gauss(0, 0.03))
        w = dataclasses.replace(
            window(20 * i, value, theory=theory, norm=math.exp(0.01 * i)), steps=2
        )
        detector.update([w])
        out.append((detector.state["w"].regime, detector.state["w"].note))
    assert not [note for regime, note in out if regime == "lagging"], out
    # Off by the lag, it is `lagging`, and the note says what the steady lag is.
    detector = EquilibriumDetector()
    for i in range(1, 12):
        theory = 0.01 * math.sqrt(i / 30)
        detector.update([dataclasses.replace(window(20 * i, 1.5 * theory, theory=theory), steps=2)])
    state = detector.state["w"]
    assert state.regime == "lagging" and "at this rate held steady" in state.note, state.note


def test_the_tracking_note_gives_the_lr_motion_now_not_the_horizons() -> None:
    """Found by a probe: just after a warm-up the note's LR rate was the slope over the horizon,
    which still holds the rise: "the LR rises" while it falls. The rate is the last window's."""
    detector, notes = EquilibriumDetector(), []
    for i in range(1, 31):
        t = 20 * i
        lr = t / 200 if t <= 200 else 0.5 * (1 + math.cos(math.pi * (t - 200) / 2000))
        theory = 0.01 * math.sqrt(lr)
        w = dataclasses.replace(
            window(t, theory, theory=theory, time_scale=200.0), trajectory=theory, steps=2
        )
        detector.update([w])
        notes.append((t, detector.state["w"].regime, detector.state["w"].note))
    after_peak = [note for t, regime, note in notes if 220 <= t <= 400 and regime == "tracking"]
    assert after_peak and not any("rises" in note for note in after_peak), notes
    # At a cosine's top the LR stands still; then it falls.
    assert "the LR stands still now" in after_peak[0] and "the LR falls" in after_peak[-1], notes


def _slowly_falling(level: float, trajectory_level: float, seed: int) -> list:
    """A unit in equilibrium under an LR falling by 30% over 1,200 steps (tau 200: 7% per
    relaxation time), at ``level`` of the static prediction from window 21 on, with its
    trajectory at ``trajectory_level`` of it (2 measured steps per window: 10% scatter)."""
    rng = random.Random(seed)
    detector, out = EquilibriumDetector(), []
    for i in range(1, 61):
        theory = 0.01 * math.sqrt(1 - 0.3 * 20 * i / 1200)
        now, path = (1.0, 1.0) if i <= 20 else (level, trajectory_level)
        value = now * theory * math.exp(rng.gauss(0, 0.1))
        w = dataclasses.replace(
            window(20 * i, value, theory=theory), trajectory=path * theory, steps=2
        )
        detector.update([w])
        state = detector.state["w"]
        out.append((state.regime, state.in_equilibrium, state.note))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_above_the_prediction_under_a_falling_lr_is_no_lag_of_the_schedule(seed) -> None:
    """Found by a probe: a unit at 1.22 of its prediction under a slowly falling LR stayed in
    equilibrium. Its trajectory (from the measured norm) follows it, so the ratio to it is ~1,
    and a unit once in equilibrium kept the trajectory's lag as the schedule's. A falling LR
    leaves the weights below the static prediction, never above: `tracking` (the weights follow
    their trajectory back), not in equilibrium, and the note says why."""
    out = _slowly_falling(1.22, 1.22, seed)
    assert all(inside for _, inside, _ in out[10:20])
    late = out[30:]
    assert all(regime == "tracking" and not inside for regime, inside, _ in late), late
    assert "a lag the schedule does not give" in late[-1][2]
    # Below it, by as much: the lag a falling LR gives, which the trajectory expects: kept.
    assert all(inside for _, inside, _ in _slowly_falling(0.85, 0.85, seed)[30:])


@pytest.mark.parametrize("seed", range(3))
def test_off_the_trajectory_on_the_side_a_falling_lr_does_not_lag_to_is_not_lagging(seed):
    """A falling LR leaves the weights below their static prediction. A unit 22% above its
    trajectory (at the static value) was called `lagging` ("lags more than the schedule
    explains"): the side was read from -lr_drift. It is `non_stationary`; 22% below, `lagging`."""
    above = _slowly_falling(1.22, 1.0, seed)[35:]
    assert all(regime == "non_stationary" for regime, _, _ in above), above
    below = _slowly_falling(0.78, 1.0, seed)[35:]
    assert all(regime == "lagging" for regime, _, _ in below), below


def test_lions_norm_hump_is_relaxation_and_its_equilibrium_holds() -> None:
    """A probe read Lion's equilibrium as called at the top of a norm hump. Lion's norm, from
    below, overshoots (its sign steps stay correlated while the norm moves, see
    ``theory/_lion.py``): here from 0.3x it rises to ~1.5x its equilibrium norm, then falls back.
    At the hump's top the angle is ~0.65 of the prediction: relaxing, not equilibrium. The unit
    enters on the way down, with the angle within 4% of the prediction and the norm still
    falling by ~4%: the angle is where the detector promises, and stays within the tolerance
    (measured on the real monitor and Lion; tau = 350 steps)."""
    import torch

    from lightning_sdm.monitor import SphericalMonitor
    from lightning_sdm.theory.check_grid import Lion
    from lightning_sdm.units import Unit

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 256, generator=generator, dtype=torch.float64)
    # Rows at 0.3x the equilibrium norm sqrt(lr d / (2 wd)) (to the leading order).
    weight *= 0.3 * math.sqrt(1e-3 * 256 / 4.0) / weight.norm(dim=1, keepdim=True)
    module = synthetic.Holder(weight)
    optimizer = Lion(module.parameters(), lr=1e-3, weight_decay=2.0, betas=(0.9, 0.99))
    monitor = SphericalMonitor(
        module, optimizer, [Unit("w", ("weight",))], every_n_steps=50, verify_steps=0
    ).attach()
    detector, out = EquilibriumDetector(), []
    for _ in range(2500):
        module.weight.grad = synthetic.orthogonal_noise(module.weight.detach(), generator)
        optimizer.step()
        for w in monitor.pop_windows():
            detector.update([w])
            state = detector.state["w"]
            out.append((w.weight_norm, w.angular_update / w.theory, state.in_equilibrium))
    monitor.detach()
    norms = [norm for norm, _, _ in out]
    top = norms.index(max(norms))
    assert max(norms) > 1.3 * norms[-1] and 0 < top < len(out) // 2
    assert not any(inside for _, _, inside in out[max(top - 2, 0) : top + 3]), out[top]
    assert out[top][1] < 0.8
    entered = next(i for i, (_, _, inside) in enumerate(out) if inside)
    assert entered > top and norms[entered] > norms[-1] * 1.02  # the norm still falls there
    assert all(abs(ratio - 1) <= 0.1 for _, ratio, _ in out[entered:])
    assert all(inside for _, _, inside in out[entered:])


def _relative_windows(steps, lr_at, level=lambda t: 1.0, time_scale=60.0, seed=0):
    """Adafactor-like windows: the angle is ``rho_t`` (times a level) whatever the norm, and
    follows the LR at once; a relaxation time (the second moment's memory) but no norm exponent."""
    rng = random.Random(seed)
    out = []
    for t in range(20, steps + 1, 20):
        theory = 0.01 * lr_at(t) / lr_at(0)
        value = theory * level(t) * (1 + 0.02 * rng.gauss(0, 1))
        out.append(
            dataclasses.replace(
                window(t, value, theory=theory, time_scale=time_scale, norm=2.0 + 1e-4 * t),
                norm_exponent=None,
            )
        )
    return out


def test_relative_steps_follow_an_lr_jump_at_once():
    """Adafactor's step turns the weight by rho_t whatever its norm: after a 10x LR step a unit
    already at its new prediction is in equilibrium again within the detector's patience, where
    a norm-balance family (the same windows with a norm exponent) waits theory's relaxation."""
    windows = _relative_windows(2000, lambda t: 1.0 if t < 1000 else 0.1)
    _, out = _regimes(windows)
    after = [(w.optimizer_step, regime) for w, regime, _ in out if w.optimizer_step > 1000]
    assert all(regime == "equilibrium" for step, regime in after if step >= 1100), after
    assert not any(regime == "relaxing" for _, regime in after), after
    # Nor is the jump inside the horizon read as a rate (a probe saw "the LR falls by a factor
    # of 3.95e+11 per relaxation time").
    assert not any("per relaxation time" in state.note for _, _, state in out), out[-1][2].note
    norm_balance = [dataclasses.replace(w, norm_exponent=0.5) for w in windows]
    _, out = _regimes(norm_balance)
    waited = [regime for w, regime, _ in out if 1000 < w.optimizer_step <= 1400]
    assert "relaxing" in waited  # the same stream under AdamW's physics waits


def test_relative_steps_below_a_falling_prediction_are_not_lagging():
    """No lag model for relative steps: 30% below a slowly falling prediction is off it (beyond
    the two tolerances a steady level may be off by), not the lag a norm-balance family shows."""
    windows = _relative_windows(3000, lambda t: math.exp(-t / 1500), level=lambda t: 0.7)
    _, out = _regimes(windows)
    late = [(regime, state.in_equilibrium) for w, regime, state in out if w.optimizer_step > 600]
    assert not any(regime == "lagging" for regime, _ in late), late
    assert not any(inside for _, inside in late), late
