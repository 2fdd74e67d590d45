"""The logged keys: what every logger receives, and how the report finds units in them again."""

from __future__ import annotations

import math

import pytest

from lightning_sdm.keys import (
    REGIME_CODES,
    SUMMARY_KEYS,
    Keys,
    event_metrics,
    summary_metrics,
    window_metrics,
)
from lightning_sdm.records import CHANNEL_SUMMARIES, REGIMES, EquilibriumEvent, UnitWindow


def _window(unit="w", **changes) -> UnitWindow:
    values = dict(theory=0.025, ratio=0.8)
    values.update(changes)
    theory, ratio = values.pop("theory"), values.pop("ratio")
    return UnitWindow(unit, 40, 40, 0.02, 0.02, theory, ratio, 3.1, 8, 0.1, **values)


def test_channel_windows_get_one_key_per_summary_and_the_report_finds_the_unit():
    channels = dict.fromkeys(CHANNEL_SUMMARIES, 0.02)
    window = _window("net.0.weight", channels=channels, channel_ratios=dict(channels))
    metrics = window_metrics(window, in_equilibrium=True, regime="lagging")
    per_channel = [k for k in metrics if k.startswith(Keys.ANGULAR_UPDATE)]
    assert len(per_channel) == len(CHANNEL_SUMMARIES)
    assert f"{Keys.ANGULAR_UPDATE}net.0.weight" not in metrics  # no whole-unit angle
    assert {Keys.unit_of(k, Keys.ANGULAR_UPDATE) for k in per_channel} == {"net.0.weight"}
    assert metrics[f"{Keys.REGIME}net.0.weight"] == REGIME_CODES["lagging"]
    assert metrics[f"{Keys.IN_EQUILIBRIUM}net.0.weight"] == 1.0
    # A unit whose own name ends like a summary is still itself without a suffix.
    assert Keys.unit_of(f"{Keys.RATIO}blocks.max", Keys.RATIO) == "blocks.max"


def test_no_prediction_is_nan_not_missing():
    metrics = window_metrics(_window(theory=None, ratio=None), in_equilibrium=False)
    assert math.isnan(metrics[f"{Keys.THEORY}w"]) and math.isnan(metrics[f"{Keys.RATIO}w"])


@pytest.mark.parametrize(
    ("ratios", "median"),
    [([0.8, 1.2, 1.0], 1.0), ([0.8, 1.2], 1.0), ([0.9, None, math.nan], 0.9), ([None], math.nan)],
)
def test_the_median_ratio_skips_units_without_one(ratios, median):
    windows = [_window(f"u{i}", ratio=r) for i, r in enumerate(ratios)]
    metrics = summary_metrics(windows, fraction=0.5, steps_to_equilibrium=10.0, regimes={})
    assert metrics[Keys.MEDIAN_RATIO] == pytest.approx(median, nan_ok=True)
    # No regime counted: no count logged (the caller passes the regimes seen so far).
    assert set(metrics) == set(SUMMARY_KEYS) - {f"{Keys.REGIME_COUNT}{r}" for r in REGIMES}
    seen = summary_metrics(windows, 0.5, 10.0, regimes={"relaxing": 0, "equilibrium": 2})
    assert {k: v for k, v in seen.items() if k.startswith(Keys.REGIME_COUNT)} == {
        f"{Keys.REGIME_COUNT}relaxing": 0.0,
        f"{Keys.REGIME_COUNT}equilibrium": 2.0,
    }


def test_event_metrics():
    event = EquilibriumEvent(300, ("w",), 1.0, {}, {}, "theory", new_lrs=(0.01,), old_lrs=(0.1,))
    assert event_metrics(event, decays=2) == {
        Keys.EVENT_STEP: 300.0,
        Keys.LR_DECAYS: 2.0,
        Keys.LR_AFTER_EVENT: 0.01,
    }
    assert event_metrics(event, decays=None).keys() == {Keys.EVENT_STEP, Keys.LR_AFTER_EVENT}


def test_a_logger_prefix_comes_off_only_when_it_is_unambiguous():
    assert Keys.without_logger_prefix(["a-sdm/x", "b-sdm/y"]) == {
        "a-sdm/x": "a-sdm/x",
        "b-sdm/y": "b-sdm/y",
    }
    assert Keys.without_logger_prefix(["sdm/x", "a-sdm/y"])["a-sdm/y"] == "a-sdm/y"
    assert Keys.without_logger_prefix(["run/sdm/x"], join="/") == {"run/sdm/x": "sdm/x"}
