"""The console: routine events in the ``lightning_sdm`` log, warnings only for what needs acting on.

* A healthy fit: INFO lines only (the units found, the prediction, notes, the summary table at the
  end of fit, with the history's last values); no Python warning from the package, so that
  ``-W error`` (warnings as errors) trains through an advisory note.
* ``verbose=False``: the same records at DEBUG; ``verbose`` is validated at construction.
* The BNNet head (a Linear into the loss) is said to reach the loss, not a non-homogeneous op.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.lightning._fabric import FabricSphericalDynamics
from lightning_sdm.lightning._plugin import settings_from_env
from tests.helpers import BNNet, loader, noisy_classification_data, trainer


def _fit(tmp_path, **settings):
    torch.manual_seed(0)
    # wd 5e-3: its EMA timescale is longer than the run, an advisory note (the default BNNet).
    callback = SphericalDynamicsCallback(**{"every_n_steps": 4, "window": 4, **settings})
    run = trainer(tmp_path, callbacks=[callback], max_epochs=2, log_every_n_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as `python -W error`: any warning would stop the fit
        warnings.filterwarnings("ignore", module="lightning.*")  # Lightning's own (workers, ...)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        run.fit(BNNet(), loader(noisy_classification_data()))
    return run, callback


def test_a_healthy_fit_logs_its_events_and_raises_no_warning(tmp_path, sdm_log):
    run, callback = _fit(tmp_path)
    assert run.global_step == 32 and callback.history  # -W error did not stop it
    records = [r for r in sdm_log.records if r.name == "lightning_sdm"]
    info = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert not [r for r in records if r.levelno >= logging.WARNING]
    found = next(line for line in info if "scale-invariant units" in line)
    assert "2 scale-invariant units (trace): net.0.weight, net.3.weight" in found
    # The head reaches the loss (cross_entropy): not called a non-homogeneous operation.
    assert "1 reaches the loss" in found and "non-homogeneous" not in found
    assert any("predicted equilibrium: SGD optimizer 0 group 0: 0.0" in line for line in info)
    assert any("note:" in line and "EMA timescale" in line for line in info)
    # The summary table at the end of fit: the last window of each unit.
    (summary,) = [line for line in info if "end of fit" in line]
    lines = summary.splitlines()
    assert lines[0].endswith(
        f"global step 32: {callback.detector.fraction():.0%} of the units in equilibrium"
    )
    last = {record.unit: record for record in callback.history}
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert sorted(rows) == sorted(last)
    for unit, record in last.items():
        assert float(rows[unit][1]) == pytest.approx(record.angular_update, rel=5e-3)
        assert float(rows[unit][3]) == pytest.approx(record.ratio, abs=5e-3)
        state = callback.detector.state[unit]
        step = state.reached_global_step
        if step is None:
            assert rows[unit][4:] == ["not", "reached"]
        elif state.in_equilibrium:
            assert rows[unit][4:] == ["since", "step", str(step)]
        else:  # left it before the end: said so, with when it entered
            assert rows[unit][4:] == ["left", "it", "(entered", "at", "step", f"{step})"]
    # Each routine event once: one summary, one discovery line, one prediction line.
    assert sum("predicted equilibrium" in line for line in info) == 1
    assert math.isfinite(callback.detector.fraction())


def test_verbose_false_moves_the_routine_events_to_debug(tmp_path, sdm_log):
    _fit(tmp_path, verbose=False)
    records = [r for r in sdm_log.records if r.name == "lightning_sdm"]
    assert records and all(r.levelno == logging.DEBUG for r in records)
    assert any("end of fit" in r.getMessage() for r in records)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_verbose_must_be_a_bool(value):
    with pytest.raises(ValueError, match="`verbose` must be True or False"):
        SphericalDynamicsCallback(verbose=value)
    with pytest.raises(ValueError, match="`verbose` must be True or False"):
        FabricSphericalDynamics(verbose=value)


def test_the_plugin_reads_verbose():
    assert settings_from_env({"LIGHTNING_SDM_VERBOSE": "off"}) == {"verbose": False}
    assert settings_from_env({"LIGHTNING_SDM_VERBOSE": "1"}) == {"verbose": True}
    with pytest.raises(ValueError, match="LIGHTNING_SDM_VERBOSE='loud' is invalid"):
        settings_from_env({"LIGHTNING_SDM_VERBOSE": "loud"})


def test_a_window_longer_than_the_interval_is_said_once(tmp_path, sdm_log):
    _, callback = _fit(tmp_path, window=10)  # every_n_steps=4
    assert callback.config.window == 4
    said = [
        r.getMessage() for r in sdm_log.records if "is longer than every_n_steps" in r.getMessage()
    ]
    assert said == [
        "[lightning_sdm] window=10 is longer than every_n_steps=4: a window is the last steps of "
        "its interval, so every step is measured (window=4)."
    ]


@pytest.mark.parametrize("patience", [0, 1])
def test_patience_below_two_is_refused_with_the_reason(patience):
    with pytest.raises(ValueError, match=r"`patience` must be an integer >= 2.*not EarlyStopping"):
        SphericalDynamicsCallback(patience=patience)


class _LNNet(BNNet):
    """BNNet with its second norm a LayerNorm: that unit is invariant only as a whole."""

    def __init__(self) -> None:
        super().__init__()
        self.net[5] = torch.nn.LayerNorm(self.hparams.hidden)


def test_channel_granularity_says_once_which_units_are_measured_whole(tmp_path, sdm_log):
    torch.manual_seed(0)
    callback = SphericalDynamicsCallback(granularity="channel", every_n_steps=4, window=4)
    run = trainer(tmp_path, callbacks=[callback], max_epochs=1, log_every_n_steps=4)
    run.fit(_LNNet(), loader(noisy_classification_data()))
    assert callback.monitor.channel_units == ["net.0.weight"]  # BatchNorm: per channel
    said = [r.getMessage() for r in sdm_log.records if 'granularity="channel"' in r.getMessage()]
    assert len(said) == 1 and "net.3.weight are invariant only as a whole" in said[0], said
    assert "net.0.weight" not in said[0]
