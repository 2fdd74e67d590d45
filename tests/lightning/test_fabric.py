"""The `lightning.fabric.callbacks_factory` plugin: LIGHTNING_SDM=1 gives every Fabric a monitor.

Real Fabric runs on CPU: the object Fabric loads from the entry point, the hooks Fabric itself
calls (`on_after_setup`, `on_after_optimizer_step`) and those the user calls (`fabric.call`), and
what was measured, checked against a monitor attached by hand and against angles computed here.
"""

import csv
import math
import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from lightning.fabric.utilities.registry import _load_external_callbacks
from torch import nn
from torch.optim.optimizer import _global_optimizer_pre_hooks, register_optimizer_step_pre_hook

from lightning_sdm import SphericalMonitor, UnitWindow
from lightning_sdm.invariance import find_scale_invariant_units
from lightning_sdm.lightning._plugin import (
    FabricSphericalDynamics,
    fabric_callback,
    fabric_callbacks_factory,
)
from tests.helpers import noisy_classification_data, sgdm_prediction
from tests.reference import reference_angle

GROUP = "lightning.fabric.callbacks_factory"
UNITS = {"0.weight": ("0.weight", "0.bias"), "3.weight": ("3.weight", "3.bias")}
THEORY = sgdm_prediction(0.1, 5e-3, 0.9)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("LIGHTNING_SDM")]:
        monkeypatch.delenv(name)


@pytest.fixture
def on(monkeypatch):
    monkeypatch.setenv("LIGHTNING_SDM", "1")
    monkeypatch.setenv("LIGHTNING_SDM_EVERY_N_STEPS", "2")
    monkeypatch.setenv("LIGHTNING_SDM_WINDOW", "2")


def _net(seed=0):
    """The layers of tests.helpers.BNNet, as a plain module (what Fabric users train)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.BatchNorm1d(32),
        nn.Linear(32, 4),
    )


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)


def _batches(steps, batch=32):
    data = noisy_classification_data(samples=steps * batch)
    return [
        (data.tensors[0][i : i + batch], data.tensors[1][i : i + batch])
        for i in range(0, steps * batch, batch)
    ]


def _unit_vectors(model):
    params = dict(model.named_parameters())
    return {
        unit: torch.cat([params[p].detach().flatten() for p in members]).clone()
        for unit, members in UNITS.items()
    }


def _train(fabric, model, optimizer, batches, record=None):
    model.train()
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        if record is not None:
            record.append(_unit_vectors(model.module))  # the module Fabric wraps


def _csv_rows(logger):
    logger.finalize("success")
    with (Path(logger.log_dir) / "metrics.csv").open() as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def test_the_fabric_entry_point_is_registered_and_loaded_by_fabric(monkeypatch):
    (entry,) = [e for e in entry_points(group=GROUP) if e.name == "lightning_sdm"]
    assert entry.value == "lightning_sdm.lightning:fabric_callbacks_factory"
    assert entry.load() is fabric_callbacks_factory
    # Fabric's own loader (what `Fabric.__init__` calls).
    assert [
        cb for cb in _load_external_callbacks(GROUP) if isinstance(cb, FabricSphericalDynamics)
    ] == []
    monkeypatch.setenv("LIGHTNING_SDM", "on")
    loaded = [
        cb for cb in _load_external_callbacks(GROUP) if isinstance(cb, FabricSphericalDynamics)
    ]
    assert len(loaded) == 1


@pytest.mark.parametrize("value", [None, "0", "off"])
def test_off_changes_nothing(monkeypatch, value):
    if value is not None:
        monkeypatch.setenv("LIGHTNING_SDM", value)
    monkeypatch.setenv("LIGHTNING_SDM_WINDOW", "not read while off")
    global_hooks = dict(_global_optimizer_pre_hooks)
    fabric = Fabric(accelerator="cpu", devices=1)
    assert fabric._callbacks == [] and fabric_callback(fabric) is None
    net = _net()
    model, optimizer = fabric.setup(net, _sgd(net))
    _train(fabric, model, optimizer, _batches(3))
    assert dict(_global_optimizer_pre_hooks) == global_hooks
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not optimizer.optimizer._optimizer_step_pre_hooks


def test_every_fabric_gets_a_monitor_that_measures_every_step(on, tmp_path, monkeypatch):
    global_hooks = dict(_global_optimizer_pre_hooks)
    logger = CSVLogger(tmp_path, name="csv")
    fabric = Fabric(accelerator="cpu", devices=1, loggers=logger)
    callback = fabric_callback(fabric)
    assert isinstance(callback, FabricSphericalDynamics)
    assert (callback.config.every_n_steps, callback.config.window) == (2, 2)

    net = _net()
    model, optimizer = fabric.setup(net, _sgd(net))
    assert callback.monitor is None  # the units come from the first training forward
    # An independent monitor, attached by hand as examples/fabric_example.py does.
    batches = _batches(8)
    report = find_scale_invariant_units(net, batches[0][0])
    by_hand = SphericalMonitor(net, optimizer.optimizer, report, every_n_steps=2, window=2).attach()
    before = [_unit_vectors(net)]
    _train(fabric, model, optimizer, batches, record=before)

    assert callback.report is not None and [u.name for u in callback.report.units] == list(UNITS)
    assert callback.monitor is not None and callback.monitor.units == list(UNITS)
    expected = by_hand.pop_windows()
    assert all(isinstance(w, UnitWindow) for w in expected)
    assert [(w.unit, w.global_step, w.steps) for w in expected] == [
        (unit, step, 2) for step in (2, 4, 6, 8) for unit in UNITS
    ]
    history = callback.history
    assert [(r.unit, r.global_step) for r in history] == [(w.unit, w.global_step) for w in expected]
    for record, window in zip(history, expected):
        assert record.angular_update == window.angular_update  # the first step is measured too
        assert record.weight_norm == window.weight_norm
        assert record.theory == pytest.approx(THEORY, rel=1e-12)
        assert record.invariance == "verified"
        # Against angles computed here, from the weights before and after each step.
        step, unit = record.global_step, record.unit
        angles = [reference_angle(before[s - 1][unit], before[s][unit]) for s in (step - 1, step)]
        assert record.angular_update == pytest.approx(
            math.sqrt(sum(a * a for a in angles) / 2), rel=1e-5
        )
        assert record.weight_norm == pytest.approx(
            before[step][unit].double().norm().item(), rel=1e-6
        )

    # Logged through Fabric's loggers, at the monitor's step count.
    rows = [row for row in _csv_rows(logger) if "sdm/angular_update_ratio" in row]
    assert [int(row["step"]) for row in rows] == [2, 4, 6, 8]
    for row, step in zip(rows, (2, 4, 6, 8)):
        for record in (r for r in history if r.global_step == step):
            assert row[f"sdm/angular_update/{record.unit}"] == pytest.approx(record.angular_update)
            assert row[f"sdm/angular_update_theory/{record.unit}"] == pytest.approx(THEORY)

    # Observing changed nothing: the same run without the plugin ends with the same weights.
    fabric.call("sdm_detach")
    by_hand.detach()
    assert dict(_global_optimizer_pre_hooks) == global_hooks
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not optimizer.optimizer._optimizer_step_pre_hooks
    monkeypatch.setenv("LIGHTNING_SDM", "0")
    plain = Fabric(accelerator="cpu", devices=1)
    other = _net()
    plain_model, plain_optimizer = plain.setup(other, _sgd(other))
    _train(plain, plain_model, plain_optimizer, batches)
    for (name, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


def test_only_the_model_an_optimizer_steps_is_monitored(on, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SDM_GRANULARITY", "channel")
    fabric = Fabric(accelerator="cpu", devices=1)
    callback = fabric_callback(fabric)
    teacher = fabric.setup(_net(seed=1))  # no optimizer: set up first, run in eval mode
    net = _net()
    model, optimizer = fabric.setup(net, _sgd(net))
    teacher.eval()
    for x, _ in _batches(4):
        with torch.no_grad():
            target = teacher(x).softmax(dim=1)
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
    assert callback.monitor is not None
    student = {id(p) for p in net.parameters()}
    assert all(
        id(t) in student for tensors in callback.monitor.unit_parameters().values() for t in tensors
    )
    assert not teacher._forward_pre_hooks and not teacher._forward_hooks  # given up
    assert callback.monitor.channel_units == list(UNITS)
    assert [(r.unit, r.global_step) for r in callback.history] == [
        (unit, step) for step in (2, 4) for unit in UNITS
    ]
    assert all(
        r.channels is not None and r.channels["p10"] <= r.channels["p90"] for r in callback.history
    )
    fabric.call("on_train_end")
    assert not optimizer.optimizer._optimizer_step_pre_hooks


@pytest.mark.parametrize("how", ["wrapped", "example"])
def test_sdm_attach_after_setup_module(on, how):
    fabric = Fabric(accelerator="cpu", devices=1)
    callback = fabric_callback(fabric)
    net = _net()
    model = fabric.setup_module(net)  # calls no hook
    optimizer = fabric.setup_optimizers(_sgd(net))
    batches = _batches(6)
    _train(fabric, model, optimizer, batches[:2])
    assert callback.monitor is None and callback.history == []
    if how == "wrapped":
        fabric.call("sdm_attach", model, fabric=fabric)
    else:
        fabric.call("sdm_attach", net, example=batches[0][0], fabric=fabric)
    _train(fabric, model, optimizer, batches[2:])
    assert callback.monitor is not None and callback.monitor.units == list(UNITS)
    assert [(r.unit, r.global_step) for r in callback.history] == [
        (unit, step) for step in (2, 4) for unit in UNITS
    ]
    with pytest.raises(ValueError, match="example="):
        fabric.call("sdm_attach", net)  # a bare module and nothing to find its units with
    fabric.call("sdm_detach")


def test_named_params_and_a_selection_that_matches_nothing(on, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SDM_PARAMS", "3.*")
    fabric = Fabric(accelerator="cpu", devices=1)
    net = _net()
    model, optimizer = fabric.setup(net, _sgd(net))
    _train(fabric, model, optimizer, _batches(2))
    callback = fabric_callback(fabric)
    assert callback.report is None and callback.monitor.units == ["3.weight"]
    assert [r.unit for r in callback.history] == ["3.weight"]
    fabric.call("sdm_detach")

    # A selection that matches nothing is reported; the training goes on.
    monkeypatch.setenv("LIGHTNING_SDM_PARAMS", "nothing.*")
    fabric = Fabric(accelerator="cpu", devices=1)
    net = _net()
    model, optimizer = fabric.setup(net, _sgd(net))
    # Another global step hook after the plugin's: standing down inside the step must not
    # change the hooks torch is iterating over.
    other = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: None)
    try:
        with pytest.warns(UserWarning, match="measuring could not start .*matches no parameter"):
            _train(fabric, model, optimizer, _batches(2))
    finally:
        other.remove()
    assert fabric_callback(fabric).monitor is None
    assert not optimizer.optimizer._optimizer_step_pre_hooks
    fabric.call("sdm_detach")


def test_settings_errors_and_trainer_only_actions(monkeypatch):
    monkeypatch.setenv("LIGHTNING_SDM", "1")
    monkeypatch.setenv("LIGHTNING_SDM_WINDOW", "0")
    with pytest.raises(ValueError, match=r"^LIGHTNING_SDM_WINDOW='0'"):
        Fabric(accelerator="cpu", devices=1)
    monkeypatch.delenv("LIGHTNING_SDM_WINDOW")
    monkeypatch.setenv("LIGHTNING_SDM_ON_EQUILIBRIUM", "stop")
    with pytest.warns(UserWarning, match="on_equilibrium='stop' needs a Trainer"):
        fabric = Fabric(accelerator="cpu", devices=1)
    callback = fabric_callback(fabric)
    assert callback.config.every_n_steps == 50 and callback.policy.action.name == "warn"
