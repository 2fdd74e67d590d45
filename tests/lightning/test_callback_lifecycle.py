"""When the callback measures: the first step, several networks, a later fit, a short run."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.functional import angles_from_statistics, angular_update_statistics
from tests.helpers import BNNet, WeightRecorder, loader, noisy_classification_data, trainer

MEMBERS = {
    "net.0.weight": ("net.0.weight", "net.0.bias"),
    "net.3.weight": ("net.3.weight", "net.3.bias"),
}


def _rms_angle(snapshots: dict[int, dict[str, list[torch.Tensor]]], unit: str, steps) -> float:
    """RMS over ``steps`` of the angle between the weights before and after each step."""
    angles = []
    for step in steps:
        stats = angular_update_statistics(snapshots[step - 1][unit], snapshots[step][unit])
        angles.append(angles_from_statistics(stats.sum(dim=0)).item())
    return math.sqrt(sum(a * a for a in angles) / len(angles))


def _warnings_of(fit) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit()
    return [str(w.message) for w in caught if "SphericalDynamicsCallback" in str(w.message)]


@pytest.mark.parametrize("accumulate", [1, 2], ids=["every_batch", "accumulated"])
def test_the_first_optimizer_step_is_measured(tmp_path, accumulate: int) -> None:
    # Lightning runs the first forward (where the units are found) inside optimizer.step's
    # closure, after the step pre-hooks: the first step must still be measured. With gradient
    # accumulation the first forward is outside any step, and the real step is measured.
    torch.manual_seed(0)
    recorder = WeightRecorder(MEMBERS)
    callback = SphericalDynamicsCallback(every_n_steps=2, window=2)
    run = trainer(tmp_path, callbacks=[callback, recorder], accumulate_grad_batches=accumulate)
    run.fit(BNNet(), loader(noisy_classification_data(samples=128)))
    snapshots = {step: snaps for step, snaps in recorder.snapshots.items()}
    first = [record for record in callback.history if record.global_step == 2]
    assert {record.unit for record in first} == set(MEMBERS)
    for record in first:
        expected = _rms_angle(snapshots, record.unit, steps=(1, 2))
        assert record.angular_update == pytest.approx(expected, rel=1e-9)
    for record in callback.history:  # and every later window as well
        expected = _rms_angle(snapshots, record.unit, (record.global_step - 1, record.global_step))
        assert record.angular_update == pytest.approx(expected, rel=1e-9)


class TwoNetworks(pl.LightningModule):
    """GAN-style manual optimization: network A's forward, backward and step, then B's."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
        self.b = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for net, opt in ((self.a, opt_a), (self.b, opt_b)):
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(net(x), y))
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.a.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3),
            torch.optim.AdamW(self.b.parameters(), lr=1e-2, weight_decay=5e-2),
        ]


def test_a_network_whose_forward_comes_after_another_backward_is_traced_too(tmp_path) -> None:
    torch.manual_seed(1)
    members = {"a.0.weight": ("a.0.weight", "a.0.bias"), "b.0.weight": ("b.0.weight", "b.0.bias")}
    recorder = WeightRecorder(members)
    callback = SphericalDynamicsCallback(every_n_steps=2, window=2)
    run = trainer(tmp_path, callbacks=[callback, recorder])
    messages = _warnings_of(lambda: run.fit(TwoNetworks(), loader(noisy_classification_data())))
    assert not any("found no scale-invariant" in m for m in messages)
    assert callback.report is not None
    assert [unit.name for unit in callback.report.units] == ["a.0.weight", "b.0.weight"]
    assert callback.report.unused == ()
    # Both networks are measured from their first step on; B by AdamW's prediction.
    optimizer_steps = {
        unit: [r.optimizer_step for r in callback.history if r.unit == unit] for unit in members
    }
    assert optimizer_steps == {unit: [2, 4, 6, 8, 10, 12, 14, 16] for unit in members}
    # Lightning's global step counts both optimizers' steps: 2 per batch.
    snapshots = {step // 2: snaps for step, snaps in recorder.snapshots.items()}
    for record in callback.history:
        step = record.optimizer_step
        expected = _rms_angle(snapshots, record.unit, (step - 1, step))
        assert record.angular_update == pytest.approx(expected, rel=1e-9)
    theories = {r.unit: r.theory for r in callback.history}
    assert theories["a.0.weight"] == pytest.approx(math.sqrt(2 * 0.1 * 5e-3 / 1.9), rel=1e-12)
    assert theories["b.0.weight"] is not None and theories["b.0.weight"] > 0


def test_a_second_fit_keeps_measuring(tmp_path) -> None:
    torch.manual_seed(2)
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    module = BNNet()
    data = loader(noisy_classification_data())
    first = trainer(tmp_path, callbacks=[callback])
    first.fit(module, data)
    after_first = len(callback.history)
    assert after_first == 2 * 4
    # The same Trainer, continued for one more epoch.
    first.fit_loop.max_epochs = 2
    first.fit(module, data)
    assert len(callback.history) == 2 * after_first
    # A new Trainer: the monitor re-attaches to its optimizer; the counters continue.
    second = trainer(tmp_path / "second", callbacks=[callback])
    messages = _warnings_of(lambda: second.fit(module, data))
    assert len(callback.history) == 3 * after_first
    steps = [r.optimizer_step for r in callback.history if r.unit == "net.0.weight"]
    assert steps == list(range(4, 4 * 13, 4))
    assert callback.monitor is not None and callback.monitor.units == list(MEMBERS)
    assert not any("found no scale-invariant" in m for m in messages)


def test_a_run_too_short_for_a_window_says_so_once(tmp_path) -> None:
    callback = SphericalDynamicsCallback()  # every_n_steps follows log_every_n_steps
    run = pl.Trainer(
        fast_dev_run=True,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    messages = _warnings_of(lambda: run.fit(BNNet(), loader(noisy_classification_data())))
    short = [m for m in messages if "before the first window closed" in m]
    assert len(short) == 1
    assert "every_n_steps=50" in short[0] and "fast_dev_run" in short[0]
    assert callback.history == []


def test_another_monitor_on_the_trainer_does_not_spoil_the_trace(tmp_path) -> None:
    # The explicit callback snapshots the weights in the optimizer's step pre-hook, which runs
    # before the first forward while the automatic callback's trace is already listening.
    torch.manual_seed(3)
    module = BNNet()
    explicit = SphericalDynamicsCallback(
        params=[module.net[0], module.net[3]], every_n_steps=2, window=2, horizon=2
    )
    automatic = SphericalDynamicsCallback(every_n_steps=2, window=2)
    run = trainer(tmp_path, callbacks=[explicit, automatic])
    run.fit(module, loader(noisy_classification_data()))
    assert automatic.report is not None
    assert [unit.name for unit in automatic.report.units] == list(MEMBERS)
    steps = {(r.unit, r.global_step): r.angular_update for r in automatic.history}
    assert steps == {(r.unit, r.global_step): r.angular_update for r in explicit.history}


def _fit_epochs(tmp_path, callback, epochs: int, ckpt_path=None, save=None) -> pl.Trainer:
    torch.manual_seed(5)
    run = trainer(
        tmp_path / f"fit{epochs}{save is not None}", callbacks=[callback], max_epochs=epochs
    )
    run.fit(BNNet(), loader(noisy_classification_data(), shuffle=False), ckpt_path=ckpt_path)
    if save is not None:
        run.save_checkpoint(save)
    return run


def test_resume_mid_window_keeps_the_multi_step_horizon(tmp_path) -> None:
    # 16 steps per epoch; windows of 6 steps every 6 with 3-step horizon blocks: the checkpoint
    # at step 16 falls inside a window and inside a block.
    settings = {"every_n_steps": 6, "window": 6, "horizon": 3}
    full = SphericalDynamicsCallback(**settings)
    _fit_epochs(tmp_path, full, epochs=2)
    first = SphericalDynamicsCallback(**settings)
    _fit_epochs(tmp_path, first, epochs=1, save=tmp_path / "mid.ckpt")
    resumed = SphericalDynamicsCallback(**settings)
    _fit_epochs(tmp_path, resumed, epochs=2, ckpt_path=tmp_path / "mid.ckpt")
    pairs = list(zip(resumed.history, full.history, strict=True))
    assert [r.global_step for r, _ in pairs] == [6, 6, 12, 12, 18, 18, 24, 24, 30, 30]
    for mine, theirs in pairs:
        assert mine.horizon_angular_update == pytest.approx(theirs.horizon_angular_update, rel=1e-9)
        assert mine.angular_update == pytest.approx(theirs.angular_update, rel=1e-9)


def test_resume_with_other_settings_keeps_the_history_and_says_what_restarts(tmp_path) -> None:
    first = SphericalDynamicsCallback(every_n_steps=4, window=2)
    _fit_epochs(tmp_path, first, epochs=1, save=tmp_path / "mid.ckpt")
    assert len(first.history) == 8
    resumed = SphericalDynamicsCallback(every_n_steps=8, window=4)
    messages = _warnings_of(
        lambda: _fit_epochs(tmp_path, resumed, epochs=2, ckpt_path=tmp_path / "mid.ckpt")
    )
    adopted = [m for m in messages if "written with other settings" in m]
    assert len(adopted) == 1
    assert "every_n_steps 4 -> 8" in adopted[0] and "window 2 -> 4" in adopted[0]
    assert "kept the history" in adopted[0] and "restarted the open window" in adopted[0]
    # The first epoch's history is kept; the second epoch adds windows at the new interval.
    steps = [r.optimizer_step for r in resumed.history if r.unit == "net.0.weight"]
    assert steps == [4, 8, 12, 16, 24, 32]


def test_resume_with_a_changed_action_keeps_everything(tmp_path) -> None:
    first = SphericalDynamicsCallback(every_n_steps=4, window=2)
    _fit_epochs(tmp_path, first, epochs=1, save=tmp_path / "mid.ckpt")
    resumed = SphericalDynamicsCallback(every_n_steps=4, window=2, on_equilibrium="stop")
    messages = _warnings_of(
        lambda: _fit_epochs(tmp_path, resumed, epochs=2, ckpt_path=tmp_path / "mid.ckpt")
    )
    adopted = [m for m in messages if "written with other settings" in m]
    assert len(adopted) == 1 and "restarted" not in adopted[0]
    assert resumed.detector.state_dict() != {}
    steps = [r.optimizer_step for r in resumed.history if r.unit == "net.0.weight"]
    assert steps == list(range(4, 33, 4))


class TwoGroups(BNNet):
    """net.0 in group 0 (weight decay 5e-3), the rest in group 1 (weight decay 2e-2)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        first = list(self.net[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD(
            [{"params": first, "weight_decay": 5e-3}, {"params": rest, "weight_decay": 2e-2}],
            lr=0.1,
            momentum=0.9,
        )


class EditAt(pl.Callback):
    """Applies ``edit(trainer, pl_module)`` at the start of global step ``step``."""

    def __init__(self, step: int, edit) -> None:
        self.step, self.edit = step, edit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.edit(trainer, pl_module)


def _move_first_layer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    groups = trainer.optimizers[0].param_groups
    moving = groups[0]["params"]
    groups[0]["params"] = []
    groups[1]["params"] = [*moving, *groups[1]["params"]]


def _sgdm(lr: float, wd: float) -> float:
    return math.sqrt(2 * lr * wd / 1.9)


def test_a_weight_moved_to_another_group_follows_that_group(tmp_path) -> None:
    callback = SphericalDynamicsCallback(every_n_steps=4, window=4)
    run = trainer(tmp_path, callbacks=[callback, EditAt(8, _move_first_layer)])
    messages = _warnings_of(lambda: run.fit(TwoGroups(), loader(noisy_classification_data())))
    moved = [m for m in messages if "moved from param group 0 to param group 1" in m]
    assert len(moved) == 1 and "net.0.weight" in moved[0]
    theory = {r.global_step: r.theory for r in callback.history if r.unit == "net.0.weight"}
    assert theory[4] == theory[8] == pytest.approx(_sgdm(0.1, 5e-3), rel=1e-12)
    assert theory[12] == theory[16] == pytest.approx(_sgdm(0.1, 2e-2), rel=1e-12)


def _replace_optimizer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    new = torch.optim.SGD(pl_module.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    trainer.strategy.optimizers = [new]


def test_a_replaced_optimizer_is_followed(tmp_path) -> None:
    callback = SphericalDynamicsCallback(every_n_steps=4, window=4)
    run = trainer(tmp_path, callbacks=[callback, EditAt(8, _replace_optimizer)])
    messages = _warnings_of(lambda: run.fit(BNNet(), loader(noisy_classification_data())))
    assert sum("the optimizer was replaced" in m for m in messages) == 1
    records = [r for r in callback.history if r.unit == "net.0.weight"]
    assert [r.optimizer_step for r in records] == [4, 8, 12, 16]
    assert records[1].theory == pytest.approx(_sgdm(0.1, 5e-3), rel=1e-12)
    # The first step of the new optimizer (9) runs before the monitor sees it; the window that
    # closes at 12 measures steps 10-12, all with the new optimizer's prediction.
    assert records[2].theory == records[3].theory == pytest.approx(_sgdm(0.05, 5e-3), rel=1e-12)
    assert all(r.angular_update > 0 for r in records)


def _no_weight_decay(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    for group in trainer.optimizers[0].param_groups:
        group["weight_decay"] = 0.0


def test_a_prediction_that_vanishes_mid_run_is_reported_once(tmp_path) -> None:
    callback = SphericalDynamicsCallback(every_n_steps=4, window=4)
    run = trainer(tmp_path, callbacks=[callback, EditAt(8, _no_weight_decay)])
    messages = _warnings_of(lambda: run.fit(BNNet(), loader(noisy_classification_data())))
    lost = [m for m in messages if "no predicted equilibrium" in m]
    assert len(lost) == 1
    assert "net.0.weight, net.3.weight from global step 12 on" in lost[0]
    assert [r.theory is None for r in callback.history if r.unit == "net.0.weight"] == [
        False,
        False,
        True,
        True,
    ]


def _freeze_first_layer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    for param in pl_module.net[0].parameters():
        param.requires_grad_(False)
        param.grad = None


def test_a_unit_frozen_inside_a_window_is_not_labelled_frozen_for_it(tmp_path) -> None:
    # Frozen at the start of step 10 (optimizer step 11): the window of steps 9-12 moved on its
    # first two steps. It keeps its measured angle, without a prediction; the next is frozen.
    callback = SphericalDynamicsCallback(every_n_steps=4, window=4)
    run = trainer(tmp_path, callbacks=[callback, EditAt(10, _freeze_first_layer)])
    run.fit(BNNet(momentum=0.0), loader(noisy_classification_data()))
    records = {r.global_step: r for r in callback.history if r.unit == "net.0.weight"}
    assert not records[12].frozen and records[12].angular_update > 0
    assert records[12].theory is None
    assert records[16].frozen and records[16].angular_update == 0.0
