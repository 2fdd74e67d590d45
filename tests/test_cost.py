"""The monitor times itself: host time in its hooks against the step time, and says when the
schedule costs more than 1% of a CPU run's steps (once, with a schedule that would fit).

Checked against an outside clock (a callback timing the batches), and the suggested schedules
against the linear cost model they come from (the next larger window, or the next smaller
interval, would not fit).
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time

import lightning.pytorch as pl
import pytest

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm._cost import CostMeter, schedule_within
from tests.helpers import BNNet, loader, noisy_classification_data, trainer

COST_TEXT = "of the step time in this run"


class BatchClock(pl.Callback):
    """Wall time between the ends of consecutive training batches (one optimizer step each)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())


class Slow(BNNet):
    """Steps dominated by compute the monitor does not see (a sleep stands in for it)."""

    def training_step(self, batch, batch_idx):
        time.sleep(0.25)
        return super().training_step(batch, batch_idx)


def _fit(tmp_path, module, caplog, **settings):
    callback = SphericalDynamicsCallback(**settings)
    clock = BatchClock()
    run = trainer(tmp_path, callbacks=[callback, clock], max_steps=12, log_every_n_steps=4)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        run.fit(module, loader(noisy_classification_data(samples=384)))
    notices = [r.getMessage() for r in caplog.records if COST_TEXT in r.getMessage()]
    return callback, clock, notices


def test_an_expensive_schedule_is_reported_once_with_schedules_that_fit(tmp_path, caplog):
    # 1.1M monitored weights, measured on every step, with a cheap step: far above 1%.
    callback, clock, notices = _fit(tmp_path, BNNet(hidden=1024), caplog, every_n_steps=4, window=4)
    meter = callback.monitor.cost
    assert meter.ready and meter.fraction > 0.05, meter.fraction
    (notice,) = notices
    assert "measuring 4 of every 4 optimizer steps" in notice and "on the CPU" in notice
    # The meter's step period (its share added back) agrees with an outside clock over the
    # same steps: it runs from the pre-hook of step 5 (after the first window) to that of 12.
    assert meter.steps == 8
    periods = [b - a for a, b in itertools.pairwise(clock.ends[4:])]  # batches 5 to 12
    inside = meter.step_seconds + meter.hook_seconds / (meter.steps - 1)
    assert inside == pytest.approx(statistics.mean(periods), rel=0.15)
    # The notice's figures are the first steady interval's; its suggestions are the largest
    # window / smallest interval that fit the linear cost model.
    assert meter.steady is not None
    fraction, per_measured, per_step = meter.steady
    assert f"costs {fraction:.1%} of the step time" in notice
    window, every = schedule_within(0.01, 4, 4, per_measured, per_step)
    assert f"`window={window}`" in notice and f"`every_n_steps={every}`" in notice

    def cost(w: int, e: int) -> float:
        return w * per_measured / (e * per_step)

    assert cost(4, every) <= 0.01 < cost(4, every - 1)
    assert window == 1 or cost(window, 4) <= 0.01 < cost(window + 1, 4)


def test_a_cheap_schedule_says_nothing(tmp_path, caplog):
    callback, _, notices = _fit(tmp_path, Slow(), caplog, every_n_steps=4, window=2)
    meter = callback.monitor.cost
    assert meter.ready and meter.fraction < 0.01, meter.fraction
    assert notices == []


def test_the_meter_leaves_the_first_window_out():
    meter = CostMeter()
    meter.step()
    meter.add(5.0, measured=True)  # the first window: tracing, first allocations
    meter.step()
    meter.window_closed()
    assert (meter.hook_seconds, meter.measured_steps, meter.steps) == (0.0, 0, 0)
    assert not meter.ready
    for _ in range(3):
        meter.add(0.001, measured=True)
        meter.step()
    meter.window_closed()
    assert meter.ready and meter.steady is not None
    assert meter.steady[1] == pytest.approx(0.001)  # per measured step
    meter.add(0.5, measured=True)
    meter.step()
    assert meter.steady[1] == pytest.approx(0.001)  # kept as it was
