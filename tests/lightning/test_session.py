"""The window pipeline both adapters share, driven without a Trainer or Fabric.

The session gets a real monitor (its units, param groups and predictions) and windows built the
way the monitor builds them, for a unit that sits at its predicted equilibrium: the detector
reaches it after a few windows, and the policy's action runs on the real optimizer.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from lightning_sdm import SphericalMonitor, Unit
from lightning_sdm.actions import DecayLR, EquilibriumPolicy, Stop, Warn, as_action
from lightning_sdm.config import MonitorConfig
from lightning_sdm.equilibrium import EquilibriumDetector
from lightning_sdm.keys import REGIME_CODES, SUMMARY_KEYS, Keys
from lightning_sdm.lightning._session import Host, Session
from lightning_sdm.records import UnitWindow

EVERY = 50


def _setup(action, lr=0.1):
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    config = MonitorConfig(every_n_steps=EVERY, window=2)
    monitor = SphericalMonitor(model, optimizer, [Unit("0.weight", ("0.weight",))], config)
    session = Session(config, EquilibriumDetector(), EquilibriumPolicy(action))
    return session, monitor, optimizer


def _windows(monitor, count, seed=0):
    """Windows at the monitor's prediction, with 2% noise, as the monitor would close them."""
    prediction = monitor.predictions()["0.weight"]
    theory = prediction.angular_update
    rng = random.Random(seed)
    for index in range(1, count + 1):
        value = theory * rng.uniform(0.98, 1.02)
        yield UnitWindow(
            "0.weight",
            EVERY * index,
            EVERY * index,
            value,
            value,
            theory,
            value / theory,
            3.0,
            2,
            0.1,
            time_scale=100.0,
            norm_exponent=0.25,
        )


class Logged:
    def __init__(self):
        self.calls: list[dict[str, float]] = []
        self.stops = 0

    def host(self, step, **kwargs):
        return Host(global_step=step, log=self.calls.append, request_stop=self.stop, **kwargs)

    def stop(self):
        self.stops += 1


def test_windows_reach_history_and_log_with_every_key():
    session, monitor, _ = _setup(Warn())
    out = Logged()
    window = next(_windows(monitor, 1))
    session.windows(monitor, [window], out.host(window.global_step))
    (record,) = session.history
    assert (record.unit, record.optimizer_step, record.angular_update) == (
        "0.weight",
        EVERY,
        window.angular_update,
    )
    assert record.invariance == "unverified"  # the monitor never stepped: nothing checked
    (metrics,) = out.calls
    assert metrics[f"{Keys.ANGULAR_UPDATE}0.weight"] == window.angular_update
    assert metrics[f"{Keys.RATIO}0.weight"] == window.ratio
    # The summary log level: the run-level keys, the regime counts only with "detailed".
    counts = {key for key in SUMMARY_KEYS if key.startswith(Keys.REGIME_COUNT)}
    assert set(SUMMARY_KEYS) - counts <= set(metrics) and not counts & set(metrics)
    assert metrics[f"{Keys.REGIME}0.weight"] == REGIME_CODES[record.regime]
    assert not session.events
    session.log_level = "detailed"  # the regimes seen so far are counted
    window = list(_windows(monitor, 2))[-1]
    session.windows(monitor, [window], out.host(window.global_step))
    assert {key for key in out.calls[-1] if key.startswith(Keys.REGIME_COUNT)} == {
        f"{Keys.REGIME_COUNT}{regime}" for regime in session.regimes_seen
    }


def test_an_event_at_equilibrium_runs_the_action_on_the_real_optimizer():
    session, monitor, optimizer = _setup(DecayLR(factor=0.5, final_phase=None))
    out = Logged()
    for window in _windows(monitor, 12):
        session.windows(monitor, [window], out.host(window.global_step))
        if session.events:
            break
    (event,) = session.events
    assert event.action == "decay_lr" and event.criterion == "theory"
    assert event.old_lrs == (0.1,) and event.new_lrs == (0.05,)
    assert optimizer.param_groups[0]["lr"] == 0.05
    assert out.calls[-1][Keys.LR_AFTER_EVENT] == 0.05
    assert out.calls[-1][Keys.EVENT_STEP] == event.global_step
    assert out.stops == 0


def test_stop_asks_the_host_and_a_host_that_cannot_stop_is_left_alone():
    session, monitor, _ = _setup(Stop())
    out = Logged()
    for window in _windows(monitor, 12):
        session.windows(monitor, [window], out.host(window.global_step))
    assert len(session.events) == 1 and out.stops == 1

    session, monitor, _ = _setup(Stop())
    calls: list[dict[str, float]] = []
    for window in _windows(monitor, 12):  # Fabric: the loop is the user's
        session.windows(monitor, [window], Host(global_step=window.global_step, log=calls.append))
    assert len(session.events) == 1 and calls


def test_a_failing_action_still_logs_the_windows_then_raises():
    def broken(trainer, pl_module, event):
        raise KeyError("boom")

    session, monitor, _ = _setup(as_action(broken))  # as the callback wraps a callable
    out = Logged()
    with pytest.raises(RuntimeError, match=r"on_equilibrium callable .*broken raised"):
        for window in _windows(monitor, 12):
            session.windows(monitor, [window], out.host(window.global_step))
    assert out.calls and f"{Keys.ANGULAR_UPDATE}0.weight" in out.calls[-1]
    assert len(session.events) == 1  # recorded before the action ran


def test_the_budget_deadline_falls_between_windows():
    session, monitor, optimizer = _setup(DecayLR(factor=0.1, final_phase=0.25))
    out = Logged()
    session.between_windows(monitor, out.host(70, total_steps=100))
    assert not session.events and not out.calls
    session.between_windows(monitor, out.host(75, total_steps=100))
    (event,) = session.events
    assert event.criterion == "budget" and optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert out.calls == [
        {Keys.EVENT_STEP: 75.0, Keys.LR_DECAYS: 1.0, Keys.LR_AFTER_EVENT: event.new_lrs[0]}
    ]


def test_state_dict_round_trip():
    session, monitor, _ = _setup(DecayLR(factor=0.5, final_phase=None))
    out = Logged()
    for window in _windows(monitor, 12):
        session.windows(monitor, [window], out.host(window.global_step))
    state = session.state_dict()
    other, _, _ = _setup(DecayLR(factor=0.5, final_phase=None))
    other.load_state_dict(state)
    assert other.history == session.history
    assert other.events == session.events
    assert other.policy.action.decays == session.policy.action.decays == 1
    assert other.state_dict() == state
