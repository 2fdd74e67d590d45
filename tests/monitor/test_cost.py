"""The monitor times itself: host time in its hooks against the step time, and says when the
schedule costs more than 1% of a CPU run's steps (once, with a schedule that would fit).

No assertion here reads the machine's clock (CI shares a busy 2-core machine): the monitor's clock
is a hand clock that moves only by what the model's "compute" adds and by a fixed amount per read
(the hooks' own time). Checked against an outside reading of the same clock (a callback at each
batch start), and the suggested schedules against the linear cost model they come from (the next
larger window, or the next smaller interval, would not fit).
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.monitor._cost import CostMeter, schedule_within
from tests.helpers import BNNet, loader, noisy_classification_data, trainer

COST_TEXT = "of the step time in this run"


class HandClock:
    """Seconds that pass only when told: ``compute`` by the model, ``per_read`` at each read."""

    def __init__(self, per_read: float) -> None:
        self.now = 0.0
        self.per_read = per_read

    def __call__(self) -> float:
        self.now += self.per_read
        return self.now


class BatchClock(pl.Callback):
    """When each training batch starts (before its first optimizer's step pre-hook), read
    without moving the clock."""

    def __init__(self, clock: HandClock) -> None:
        self.clock = clock
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(self.clock.now)


class Compute(BNNet):
    """Each training step's compute, which the monitor does not see, moves the clock."""

    def __init__(self, clock: HandClock, seconds: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock, self.seconds = clock, seconds

    def training_step(self, batch, batch_idx):
        self.clock.now += self.seconds
        return super().training_step(batch, batch_idx)


@pytest.fixture(autouse=True)
def _package_log(sdm_log):
    """The cost note is a record of the package's logger (see tests/conftest.py)."""
    return sdm_log


def _fit(tmp_path, module, caplog, clock, monkeypatch, steps=12, **settings):
    monkeypatch.setattr(CostMeter, "clock", staticmethod(clock))
    callback = SphericalDynamicsCallback(**settings)
    outside = BatchClock(clock)
    run = trainer(tmp_path, callbacks=[callback, outside], max_steps=steps, log_every_n_steps=4)
    with caplog.at_level(logging.INFO, logger="lightning_sdm"):
        run.fit(module, loader(noisy_classification_data(samples=384)))
    notices = [r.getMessage() for r in caplog.records if COST_TEXT in r.getMessage()]
    return callback, outside, notices


def test_an_expensive_schedule_is_reported_once_with_schedules_that_fit(
    tmp_path, caplog, monkeypatch
):
    # Every step measured, hooks as slow as the step's own compute: far above 1%.
    clock = HandClock(per_read=1e-3)
    model = Compute(clock, seconds=2e-3)
    callback, clock, notices = _fit(
        tmp_path, model, caplog, clock, monkeypatch, every_n_steps=4, window=4
    )
    meter = callback.monitor.cost
    assert meter.ready and meter.fraction > 0.05, meter.fraction
    (notice,) = notices
    assert "measuring 4 of every 4 optimizer steps" in notice and "on the CPU" in notice
    # The meter's step period (its share added back) agrees with an outside clock over the
    # same steps: it runs from the pre-hook of step 5 (after the first window) to that of 12.
    assert meter.steps == 8
    outside = (clock.starts[11] - clock.starts[4]) / 7  # batches 5 to 12 start
    inside = meter.step_seconds + meter.hook_seconds / (meter.steps - 1)
    assert inside == pytest.approx(outside, rel=1e-9)
    # The notice's figures are the first steady interval's; its suggestions are the largest
    # window / smallest interval that fit the linear cost model.
    assert meter.steady is not None
    fraction, per_measured, per_step = meter.steady
    assert f"costs {fraction:.1%} of the step time" in notice
    window, every = schedule_within(0.01, 4, 4, per_measured, per_step)
    assert f"`every_n_steps={every}`" in notice

    def cost(w: int, e: int) -> float:
        return w * per_measured / (e * per_step)

    assert cost(4, every) <= 0.01 < cost(4, every - 1)
    if window is None:  # not even one measured step in 4 fits: no window is offered
        assert "`window=" not in notice and cost(1, 4) > 0.01
    else:
        assert f"`window={window}`" in notice
        assert cost(window, 4) <= 0.01 < cost(window + 1, 4)


class TwoNetworks(Compute):
    """Manual optimization, two optimizers stepped in every batch (GAN-style)."""

    def __init__(self, clock: HandClock) -> None:
        super().__init__(clock, seconds=0.01, hidden=512)
        self.automatic_optimization = False
        self.other = torch.nn.Sequential(
            torch.nn.Linear(16, 512), torch.nn.BatchNorm1d(512), torch.nn.Linear(512, 4)
        )

    def training_step(self, batch, batch_idx):
        self.clock.now += self.seconds
        first, second = self.optimizers()
        x, y = batch
        for optimizer, net in ((first, self.net), (second, self.other)):
            optimizer.zero_grad()
            self.manual_backward(torch.nn.functional.cross_entropy(net(x), y))
            optimizer.step()

    def configure_optimizers(self):
        first = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
        second = torch.optim.SGD(self.other.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
        return first, second


def test_two_optimizers_share_one_steady_interval(tmp_path, caplog, monkeypatch):
    # 24 global steps: 12 batches, 12 steps of each optimizer, windows at 4, 8 and 12.
    clock = HandClock(per_read=1e-4)
    callback, clock, _ = _fit(
        tmp_path, TwoNetworks(clock), caplog, clock, monkeypatch, 24, every_n_steps=4, window=4
    )
    meter = callback.monitor.cost
    assert meter.ready and meter.steady is not None
    # The interval is made of whole batches, from the start of batch 5 (after the first
    # window) to that of batch 9 (after the second): two optimizer steps per batch, so a batch
    # is two steps plus the monitor's share, as the outside clock says over the same batches.
    fraction, _, per_step = meter.steady
    batch = (clock.starts[8] - clock.starts[4]) / 4
    assert 2 * per_step * (1 + fraction) == pytest.approx(batch, rel=1e-9)


def test_a_cheap_schedule_says_nothing(tmp_path, caplog, monkeypatch):
    clock = HandClock(per_read=1e-6)
    model = Compute(clock, seconds=0.4)  # steps dominated by compute the monitor does not see
    callback, _, notices = _fit(
        tmp_path, model, caplog, clock, monkeypatch, every_n_steps=4, window=1
    )
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
    assert not meter.ready  # kept at the next step's start: whole periods only
    meter.step()
    assert meter.ready and meter.steady is not None
    assert meter.steady[1] == pytest.approx(0.001)  # per measured step
    meter.add(0.5, measured=True)
    meter.step()
    assert meter.steady[1] == pytest.approx(0.001)  # kept as it was
