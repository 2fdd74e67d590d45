"""The monitor in plain PyTorch loops, without a Trainer: accumulation, skipped AMP steps, resume,
param groups that change under it.

Every angle is checked against an independent recorder: a wrapper around ``optimizer.step`` that
copies the weights before and after each step that really ran, and measures the angle in extended
precision (:func:`tests.reference.reference_angle`), then forms the RMS over the window's
measured steps itself.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_sdm import SphericalMonitor, Unit
from lightning_sdm.config import MonitorConfig
from tests.reference import reference_angle

UNITS = [Unit("0.weight", ("0.weight", "0.bias")), Unit("3.weight", ("3.weight",))]


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 32, bias=False),
        nn.LayerNorm(32),
        nn.ReLU(),
        nn.Linear(32, 3),
    )


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 12, generator=generator), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(n)
    ]


class Recorder:
    """The angle of every unit at every optimizer step that really ran (the monitor's oracle)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.steps = model, []
        params = dict(model.named_parameters())
        self.units = {u.name: [params[p] for p in u.params] for u in UNITS}
        step = optimizer.step

        def recorded_step(*args, **kwargs):
            before = {
                n: torch.cat([t.detach().flatten().clone() for t in ts])
                for n, ts in self.units.items()
            }
            versions = [p._version for ts in self.units.values() for p in ts]
            result = step(*args, **kwargs)
            if [p._version for ts in self.units.values() for p in ts] != versions:
                after = {
                    n: torch.cat([t.detach().flatten() for t in ts]) for n, ts in self.units.items()
                }
                self.steps.append({n: reference_angle(before[n], after[n]) for n in self.units})
            return result

        optimizer.step = recorded_step  # wraps the bound method: the hooks still run inside it

    def window_rms(self, config: MonitorConfig, end: int) -> dict[str, float]:
        """RMS per unit over the measured steps of the interval that closes at step ``end``."""
        every = config.every_n_steps
        assert every is not None
        indices = [i for i in range(end - every, end) if config.is_measured(i)]
        return {
            name: math.sqrt(sum(self.steps[i][name] ** 2 for i in indices) / len(indices))
            for name in self.units
        }


def _check_against(recorder: Recorder, windows, config: MonitorConfig) -> None:
    assert windows
    for window in windows:
        expected = recorder.window_rms(config, window.optimizer_step)[window.unit]
        assert window.angular_update == pytest.approx(expected, rel=1e-9, abs=1e-15)


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def test_gradient_accumulation_counts_optimizer_steps_not_batches():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-3)
    recorder = Recorder(model, optimizer)
    config = MonitorConfig(every_n_steps=5, window=3)
    monitor = SphericalMonitor(model, optimizer, UNITS, config).attach()
    accumulate, windows = 4, []
    for index, batch in enumerate(_batches(4 * 20)):
        (_loss(model, batch) / accumulate).backward()
        if (index + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
            windows += monitor.pop_windows()
    monitor.detach()
    assert len(recorder.steps) == 20
    assert [w.optimizer_step for w in windows if w.unit == "0.weight"] == [5, 10, 15, 20]
    assert all(w.steps == 3 for w in windows)
    _check_against(recorder, windows, config)


def test_steps_the_grad_scaler_skips_are_not_measured_nor_counted():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-3)
    recorder = Recorder(model, optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    config = MonitorConfig(every_n_steps=4, window=4)
    monitor = SphericalMonitor(model, optimizer, UNITS, config).attach()
    skipped, windows = 0, []
    for index, batch in enumerate(_batches(30)):
        optimizer.zero_grad()
        scaler.scale(_loss(model, batch)).backward()
        if index % 7 == 3:  # an overflow: the scaler skips this step
            model[0].weight.grad[0, 0] = math.inf
            skipped += 1
        scaler.step(optimizer)
        scaler.update()
        windows += monitor.pop_windows()
    monitor.detach()
    assert skipped == 4 and len(recorder.steps) == 30 - skipped
    ends = [w.optimizer_step for w in windows if w.unit == "3.weight"]
    assert ends == [4, 8, 12, 16, 20, 24]
    _check_against(recorder, windows, config)
    assert all(math.isfinite(w.angular_update) for w in windows)


def _train(model, optimizer, monitor, batches):
    windows = []
    for batch in batches:
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()
        windows += monitor.pop_windows()
    return windows


@pytest.mark.parametrize("stop_at", [13, 17, 20])  # inside a window, at its start, at its end
def test_resume_from_a_state_dict_gives_the_windows_of_an_uninterrupted_run(stop_at):
    config = MonitorConfig(every_n_steps=10, window=6, horizon=2)
    batches = _batches(30)

    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    monitor = SphericalMonitor(model, optimizer, UNITS, config).attach()
    straight = _train(model, optimizer, monitor, batches)

    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    monitor = SphericalMonitor(model, optimizer, UNITS, config).attach()
    first = _train(model, optimizer, monitor, batches[:stop_at])
    checkpoint = copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "monitor": monitor.state_dict(),
        }
    )
    monitor.detach()
    del model, optimizer, monitor

    model = _model(seed=123)  # other initial weights: everything comes from the checkpoint
    model.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    optimizer.load_state_dict(checkpoint["optimizer"])
    monitor = SphericalMonitor(model, optimizer, UNITS, config)
    monitor.load_state_dict(checkpoint["monitor"])
    monitor.attach()
    resumed = first + _train(model, optimizer, monitor, batches[stop_at:])

    assert [(w.unit, w.optimizer_step) for w in resumed] == [
        (w.unit, w.optimizer_step) for w in straight
    ]
    for a, b in zip(resumed, straight):
        assert a.angular_update == b.angular_update  # bit-identical
        assert a.horizon_angular_update == b.horizon_angular_update
        assert a.weight_norm == b.weight_norm


def test_a_unit_moved_to_another_param_group_follows_its_new_group():
    model = _model()
    first = [model[0].weight, model[0].bias, model[3].weight]
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    optimizer = torch.optim.SGD(
        [{"params": first, "weight_decay": 5e-3}, {"params": rest, "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
    )
    config = MonitorConfig(every_n_steps=5, window=5)
    monitor = SphericalMonitor(model, optimizer, UNITS, config).attach()
    recorder = Recorder(model, optimizer)
    windows = _train(model, optimizer, monitor, _batches(5))
    before = {w.unit: w for w in windows}
    assert before["3.weight"].theory == pytest.approx(math.sqrt(2 * 0.1 * 5e-3 / 1.9))

    # Move 3.weight into a new group with another LR and weight decay (as a user's code might).
    optimizer.param_groups[0]["params"] = [model[0].weight, model[0].bias]
    optimizer.add_param_group({"params": [model[3].weight], "lr": 0.05, "weight_decay": 2e-2})
    windows = _train(model, optimizer, monitor, _batches(10, seed=2))
    monitor.detach()
    assert monitor.moved == {"3.weight": (0, 2)}
    after = [w for w in windows if w.unit == "3.weight"]
    # The window open at the move keeps the group it started with; the next follows group 2.
    assert after[-1].lr == 0.05
    assert after[-1].theory == pytest.approx(math.sqrt(2 * 0.05 * 2e-2 / 1.9))
    assert monitor.parameter_groups()["3.weight"] == (optimizer, 2)
    assert monitor.parameter_groups()["0.weight"] == (optimizer, 0)
    _check_against(recorder, windows, config)


def test_manual_steps_of_two_optimizers_each_count_their_own_steps():
    model = _model()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    second = torch.optim.AdamW(
        [p for i, m in enumerate(model) if i != 0 for p in m.parameters()],
        lr=1e-2,
        weight_decay=0.1,
    )
    config = MonitorConfig(every_n_steps=4, window=2)
    monitor = SphericalMonitor(model, [first, second], UNITS, config).attach()
    windows = []
    for index, batch in enumerate(_batches(24)):
        first.zero_grad()
        second.zero_grad()
        _loss(model, batch).backward()
        first.step()
        if index % 2 == 0:  # the second optimizer steps every other batch
            second.step()
        windows += monitor.pop_windows()
    monitor.detach()
    assert [w.optimizer_step for w in windows if w.unit == "0.weight"] == [4, 8, 12, 16, 20, 24]
    assert [w.optimizer_step for w in windows if w.unit == "3.weight"] == [4, 8, 12]
    # Without a global clock given, the monitor counts the steps of all its optimizers.
    assert windows[-1].global_step == 24 + 12


def test_channel_groups_are_measured_per_block_of_rows():
    """A q projection under per-head QK-norm: one angle per head (a block of head_dim rows)."""
    torch.manual_seed(0)
    heads, head_dim = 4, 8
    weight = nn.Parameter(torch.randn(heads * head_dim, 16))
    model = nn.Module()
    model.weight = weight
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-3)
    unit = Unit("weight", ("weight",), channel_group=head_dim)
    config = MonitorConfig(every_n_steps=3, window=3, granularity="channel")
    monitor = SphericalMonitor(model, optimizer, [unit], config).attach()
    before, angles = weight.detach().clone(), []
    for _ in range(3):
        weight.grad = torch.randn_like(weight)
        previous = weight.detach().clone()
        optimizer.step()
        angles.append(
            [
                reference_angle(
                    previous[h * head_dim : (h + 1) * head_dim],
                    weight.detach()[h * head_dim : (h + 1) * head_dim],
                )
                for h in range(heads)
            ]
        )
    (window,) = monitor.pop_windows()
    monitor.detach()
    per_head = [math.sqrt(sum(step[h] ** 2 for step in angles) / 3) for h in range(heads)]
    assert window.channels is not None
    assert window.channels["max"] == pytest.approx(max(per_head), rel=1e-9)
    assert window.channels["min"] == pytest.approx(min(per_head), rel=1e-9)
    assert window.channels["mean"] == pytest.approx(sum(per_head) / heads, rel=1e-9)
    assert not torch.equal(before, weight.detach())
    with pytest.raises(ValueError, match="does not divide"):
        SphericalMonitor(model, optimizer, [Unit("weight", ("weight",), channel_group=5)], config)
