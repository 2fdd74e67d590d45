"""The schema: records survive checkpoints (plain types, older and newer fields) and name clocks."""

from __future__ import annotations

from dataclasses import asdict

import torch

from lightning_sdm.records import REGIMES, EquilibriumEvent, HistoryRecord, UnitWindow


def _window(**changes) -> UnitWindow:
    values = dict(
        unit="net.0.weight",
        optimizer_step=40,
        global_step=80,
        angular_update=0.02,
        last=0.021,
        theory=0.025,
        ratio=0.8,
        weight_norm=3.1,
        steps=8,
        lr=0.1,
    )
    return UnitWindow(**{**values, **changes})


def test_a_history_record_keeps_both_clocks_and_the_verdict():
    window = _window(channels={"median": 0.02}, channel_ratios={"median": 0.8}, time_scale=120.0)
    record = HistoryRecord.from_window(
        window, in_equilibrium=True, criterion="theory", invariance="verified", regime="equilibrium"
    )
    assert (record.optimizer_step, record.global_step) == (40, 80)
    assert (record.in_equilibrium, record.regime, record.invariance) == (
        True,
        "equilibrium",
        "verified",
    )
    assert record.channels == {"median": 0.02} and record.time_scale == 120.0
    assert not hasattr(record, "last")  # window-only fields stay with the window


def test_records_round_trip_through_a_weights_only_checkpoint(tmp_path):
    window = _window(theory=None, ratio=None)
    record = HistoryRecord.from_window(
        window, in_equilibrium=False, criterion="stationary", invariance="unverified"
    )
    event = EquilibriumEvent(
        300, ("w", "v"), 1.0, {"w": 0.01}, {"w": None}, "theory", "decay_lr", (0.1,), (0.01,), 50
    )
    path = tmp_path / "state.pt"
    torch.save({"history": [record.as_dict()], "event": event.as_dict()}, path)
    loaded = torch.load(path, weights_only=True)
    assert HistoryRecord.from_dict(loaded["history"][0]) == record
    assert EquilibriumEvent.from_dict(loaded["event"]) == event


def test_from_dict_reads_older_and_newer_states():
    newer = {**asdict(_window()), "in_equilibrium": True, "a_field_from_the_future": 1}
    record = HistoryRecord.from_dict(newer)
    assert record.regime == "unknown" and record.in_equilibrium
    older_event = {
        "global_step": 5,
        "units": ["w"],
        "fraction": 1.0,
        "measured": {},
        "predicted": {},
        "criterion": "theory",
    }
    event = EquilibriumEvent.from_dict(older_event)
    assert event.units == ("w",) and event.old_lrs == () and event.note == ""


def test_the_regimes_are_the_detectors_words():
    assert REGIMES[0] == "unknown"
    assert {"equilibrium", "relaxing", "tracking", "lagging", "no_prediction"} <= set(REGIMES)
