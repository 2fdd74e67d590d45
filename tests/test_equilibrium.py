import math
import random

import pytest

from lightning_sdm.equilibrium import EquilibriumDetector
from lightning_sdm.records import UnitWindow
from lightning_sdm.theory import lr_change_relaxation_steps


def window(step, value, theory=0.01, unit="w", time_scale=200.0, frozen=False):
    ratio = value / theory if theory is not None else None
    return UnitWindow(
        unit=unit,
        optimizer_step=step,
        global_step=step,
        angular_update=value,
        last=value,
        theory=theory,
        ratio=ratio,
        weight_norm=1.0,
        steps=8,
        lr=0.1,
        frozen=frozen,
        time_scale=time_scale,
    )


def test_noisy_equilibrium_is_detected():
    rng = random.Random(0)
    detector = EquilibriumDetector(tolerance=0.1, patience=3)
    reached_at = None
    for i in range(1, 30):
        value = 0.01 * (1 + rng.uniform(-0.04, 0.04))
        if detector.update([window(50 * i, value)]):
            reached_at = 50 * i
    assert reached_at == 150
    assert detector.state["w"].in_equilibrium
    assert detector.state["w"].steps_to_equilibrium == 0.0


def test_a_ratio_sweeping_through_one_is_not_equilibrium():
    """Non-stationary regime: the ratio passes 1 on its way from 0.3 to 1.4 (and back)."""
    detector = EquilibriumDetector(tolerance=0.1, patience=3)
    sweep = [0.3 + 0.09 * i for i in range(13)] + [1.4 - 0.09 * i for i in range(13)]
    for i, ratio in enumerate(sweep):
        assert detector.update([window(50 * (i + 1), 0.01 * ratio)]) == []
    assert not detector.state["w"].in_equilibrium
    assert detector.fraction() == 0.0


def test_oscillation_around_one_with_large_amplitude_is_rejected():
    detector = EquilibriumDetector(tolerance=0.1, patience=3)
    for i in range(40):
        ratio = 1 + 0.5 * math.sin(i)
        detector.update([window(50 * (i + 1), 0.01 * ratio)])
        assert not detector.state["w"].in_equilibrium


def test_moved_target_restarts_and_waits_for_relaxation():
    detector = EquilibriumDetector(tolerance=0.1, patience=2)
    for i in range(1, 4):
        detector.update([window(100 * i, 0.01)])
    assert detector.state["w"].in_equilibrium
    # The LR is divided by 10: the prediction drops by sqrt(10). The measured value happens to be
    # right at the new prediction at once, but theory says the weights need time to relax.
    new = 0.01 / math.sqrt(10)
    detector.update([window(400, new, theory=new)])
    state = detector.state["w"]
    assert not state.in_equilibrium
    wait = lr_change_relaxation_steps(0.1, 200.0, tolerance=0.1)
    assert wait > math.log(10) * 200  # from 1/sqrt(10) to within 10%: more than one e-fold
    assert state.relax_until == 400 + math.ceil(wait)
    step = 500
    while step < state.relax_until:
        detector.update([window(step, new, theory=new)])
        assert not detector.state["w"].in_equilibrium
        step += 100
    detector.update([window(step, new, theory=new)])
    detector.update([window(step + 100, new, theory=new)])
    assert detector.state["w"].in_equilibrium
    assert detector.state["w"].reached_optimizer_step == step + 100


def test_without_prediction_stationarity_is_the_criterion():
    detector = EquilibriumDetector(tolerance=0.05, patience=2)
    values = [0.05, 0.03, 0.02, 0.0151, 0.015, 0.0149, 0.0150]
    entered = [
        detector.update([window(10 * (i + 1), v, theory=None)]) for i, v in enumerate(values)
    ]
    first = next(i for i, e in enumerate(entered) if e)
    assert values[first - 1] == pytest.approx(0.015, rel=0.01)
    assert detector.state["w"].criterion == "stationary"


def test_quorum_and_frozen_and_nan_units():
    detector = EquilibriumDetector(tolerance=0.1, patience=1, quorum=0.5)
    detector.update([window(10, 0.01, unit="a"), window(10, 0.02, unit="b")])
    detector.update([window(20, 0.01, unit="a"), window(20, 0.02, unit="b")])
    assert detector.fraction() == 0.5 and detector.reached()
    strict = EquilibriumDetector(tolerance=0.1, patience=1, quorum=1.0)
    strict.update([window(10, 0.01, unit="a"), window(10, math.nan, unit="b")])
    strict.update([window(20, 0.01, unit="a"), window(20, 0.01, unit="b", frozen=True)])
    assert not strict.reached()
    assert not strict.state["b"].in_equilibrium


def test_steps_to_equilibrium_follows_theory_then_the_measured_trend():
    detector = EquilibriumDetector(tolerance=0.1, patience=3)
    detector.update([window(100, 0.02, time_scale=300.0)])  # ratio 2: deviation 1 vs tol 0.1
    assert detector.steps_to_equilibrium() == pytest.approx(300 * math.log(10), rel=1e-9)
    # Deviation halves every 100 steps: the measured time constant is 100 / ln 2.
    detector = EquilibriumDetector(tolerance=0.01, patience=3)
    for i, deviation in enumerate([0.8, 0.4, 0.2]):
        detector.update([window(100 * (i + 1), 0.01 * (1 + deviation), time_scale=1000.0)])
    expected = 100 / math.log(2) * math.log(0.2 / 0.01)
    assert detector.steps_to_equilibrium() == pytest.approx(expected, rel=1e-9)
    # Never less than the patience windows still needed.
    detector = EquilibriumDetector(tolerance=0.1, patience=3)
    for i, deviation in enumerate([0.8, 0.4, 0.2]):
        detector.update([window(100 * (i + 1), 0.01 * (1 + deviation), time_scale=1000.0)])
    assert detector.steps_to_equilibrium() == 300


def test_state_dict_round_trip_gives_the_same_decisions():
    values = [0.02, 0.012, 0.0101, 0.0099, 0.01, 0.0102, 0.0098]
    reference = EquilibriumDetector(patience=2)
    resumed = EquilibriumDetector(patience=2)
    decisions = []
    for i, value in enumerate(values):
        decisions.append(reference.update([window(10 * (i + 1), value)]))
    for i, value in enumerate(values[:3]):
        resumed.update([window(10 * (i + 1), value)])
    restored = EquilibriumDetector(patience=2)
    restored.load_state_dict(resumed.state_dict())
    replay = [restored.update([window(10 * (i + 4), v)]) for i, v in enumerate(values[3:])]
    assert replay == decisions[3:]
    assert restored.state_dict() == reference.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tolerance": 0}, "`tolerance`"),
        ({"patience": 0}, "`patience`"),
        ({"quorum": 0}, "`quorum`"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EquilibriumDetector(**kwargs)
