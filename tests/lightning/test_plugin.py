"""The `lightning.pytorch.callbacks_factory` plugin: LIGHTNING_SDM=1 adds the callback."""

import os
from importlib.metadata import entry_points

import lightning.pytorch as pl
import pytest
import torch

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.lightning._plugin import EnvSphericalDynamicsCallback, callbacks_factory
from tests.helpers import BNNet, loader, noisy_classification_data, read_csv_metrics, trainer


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("LIGHTNING_SDM")]:
        monkeypatch.delenv(name)


def _monitors(run):
    return [cb for cb in run.callbacks if isinstance(cb, SphericalDynamicsCallback)]


def test_the_entry_point_is_registered():
    (entry,) = [
        e
        for e in entry_points(group="lightning.pytorch.callbacks_factory")
        if e.name == "lightning_sdm"
    ]
    assert entry.value == "lightning_sdm.lightning:callbacks_factory"
    assert entry.load() is callbacks_factory


def test_trainer_and_fabric_each_get_their_own_object(monkeypatch, tmp_path):
    from lightning.fabric import Fabric

    from lightning_sdm.lightning._plugin import FabricSphericalDynamics, fabric_callback

    monkeypatch.setenv("LIGHTNING_SDM", "1")
    run = pl.Trainer(default_root_dir=tmp_path, logger=False)
    assert [type(cb) for cb in run.callbacks if "lightning_sdm" in type(cb).__module__] == [
        EnvSphericalDynamicsCallback
    ]
    fabric = Fabric(accelerator="cpu", devices=1)
    assert [type(cb) for cb in fabric._callbacks] == [FabricSphericalDynamics]
    assert fabric_callback(fabric) is fabric._callbacks[0]


@pytest.mark.parametrize("value", [None, "", "0", "false", "No", "off"])
def test_off_adds_nothing(monkeypatch, tmp_path, value):
    if value is not None:
        monkeypatch.setenv("LIGHTNING_SDM", value)
    monkeypatch.setenv("LIGHTNING_SDM_WINDOW", "not read while off")
    assert callbacks_factory() == []
    assert _monitors(pl.Trainer(default_root_dir=tmp_path, logger=False)) == []


def test_on_every_trainer_gets_one_configured_callback(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_SDM", "1")
    monkeypatch.setenv("LIGHTNING_SDM_GRANULARITY", "channel")
    monkeypatch.setenv("LIGHTNING_SDM_EVERY_N_STEPS", "3")
    monkeypatch.setenv("LIGHTNING_SDM_WINDOW", "2")
    monkeypatch.setenv("LIGHTNING_SDM_PARAMS", " net.0.*, re:net\\.3\\.(weight|bias) ")
    monkeypatch.setenv("LIGHTNING_SDM_TOLERANCE", "0.2")
    monkeypatch.setenv("LIGHTNING_SDM_PATIENCE", "4")
    monkeypatch.setenv("LIGHTNING_SDM_ON_EQUILIBRIUM", "stop")
    (callback,) = _monitors(pl.Trainer(default_root_dir=tmp_path, logger=False))
    assert isinstance(callback, EnvSphericalDynamicsCallback)
    assert (callback.config.granularity, callback.config.every_n_steps, callback.config.window) == (
        "channel",
        3,
        2,
    )
    assert callback.params == ["net.0.*", "re:net\\.3\\.(weight|bias)"]
    assert (callback.detector.tolerance, callback.detector.patience) == (0.2, 4)
    assert callback.on_equilibrium.name == "stop"

    # A Trainer built with no SDM code at all measures and logs.
    for name in (
        "LIGHTNING_SDM_TOLERANCE",
        "LIGHTNING_SDM_PATIENCE",
        "LIGHTNING_SDM_ON_EQUILIBRIUM",
    ):
        monkeypatch.delenv(name)
    monkeypatch.setenv("LIGHTNING_SDM", " Yes ")
    torch.manual_seed(0)
    run = trainer(tmp_path, max_steps=6)
    (callback,) = _monitors(run)
    run.fit(BNNet(), loader(noisy_classification_data(samples=192)))
    assert callback.monitor is not None
    assert callback.monitor.units == ["net.0.weight", "net.3.weight"]
    rows = [row for row in read_csv_metrics(run) if "sdm/angular_update_ratio" in row]
    assert [row["step"] for row in rows] == [3, 6]
    assert "sdm/angular_update/net.3.weight/median" in rows[-1]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LIGHTNING_SDM", "maybe"),
        ("LIGHTNING_SDM_WINDOW", "0"),
        ("LIGHTNING_SDM_WINDOW", "abc"),
        ("LIGHTNING_SDM_EVERY_N_STEPS", "-5"),
        ("LIGHTNING_SDM_EVERY_N_STEPS", "2.5"),
        ("LIGHTNING_SDM_GRANULARITY", "pixel"),
        ("LIGHTNING_SDM_PARAMS", " , "),
        ("LIGHTNING_SDM_TOLERANCE", "2"),
        ("LIGHTNING_SDM_PATIENCE", "0"),
        ("LIGHTNING_SDM_ON_EQUILIBRIUM", "explode"),
    ],
)
def test_bad_values_name_the_variable(monkeypatch, tmp_path, variable, value):
    monkeypatch.setenv("LIGHTNING_SDM", "on")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=f"^{variable}={value!r}"):
        pl.Trainer(default_root_dir=tmp_path, logger=False)


def test_unknown_variables_are_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_SDM", "true")
    monkeypatch.setenv("LIGHTNING_SDM_EVERY_N_STEP", "5")  # typo
    with pytest.warns(UserWarning, match="LIGHTNING_SDM_EVERY_N_STEP;"):
        run = pl.Trainer(default_root_dir=tmp_path, logger=False)
    (callback,) = _monitors(run)
    assert callback.config.every_n_steps is None


class ModuleWithCallback(BNNet):
    def configure_callbacks(self):
        return [SphericalDynamicsCallback(every_n_steps=2, window=2)]


@pytest.mark.parametrize("where", ["trainer", "configure_callbacks"])
def test_an_explicit_callback_wins(monkeypatch, tmp_path, where):
    # Two plain callbacks are refused by Lightning (one state_key): why the plugin has its own.
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        pl.Trainer(
            callbacks=[SphericalDynamicsCallback(), SphericalDynamicsCallback()], logger=False
        )

    monkeypatch.setenv("LIGHTNING_SDM", "1")
    monkeypatch.setenv("LIGHTNING_SDM_EVERY_N_STEPS", "3")
    if where == "trainer":
        explicit = SphericalDynamicsCallback(every_n_steps=2, window=2)
        run = trainer(tmp_path, callbacks=[explicit], max_steps=4)
        module = BNNet()
    else:
        run = trainer(tmp_path, max_steps=4)
        module = ModuleWithCallback()
    (plugin,) = [cb for cb in run.callbacks if isinstance(cb, EnvSphericalDynamicsCallback)]
    torch.manual_seed(0)
    run.fit(module, loader(noisy_classification_data(samples=128)))
    (callback,) = _monitors(run)
    assert callback is not plugin and type(callback) is SphericalDynamicsCallback
    if where == "trainer":
        assert callback is explicit
    assert [record.global_step for record in callback.history] == [2, 2, 4, 4]
    assert plugin.monitor is None and plugin.history == []
    rows = [row for row in read_csv_metrics(run) if "sdm/angular_update_ratio" in row]
    assert [row["step"] for row in rows] == [2, 4]  # one callback logged
