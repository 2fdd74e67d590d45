"""MonitorConfig: every measurement setting validated once, with a message naming the fix."""

from __future__ import annotations

import pytest

from lightning_sdm.config import DEFAULT_EVERY_N_STEPS, MonitorConfig


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"granularity": "row"}, "`granularity` must be one of"),
        ({"window": 0}, "`window`"),
        ({"window": True}, "`window`"),
        ({"every_n_steps": 0}, "`every_n_steps`"),
        ({"horizon": 0}, "`horizon`"),
        ({"window": 4, "horizon": 5}, "`horizon`"),
        ({"verify_steps": -1}, "`verify_steps`"),
        ({"orthogonality_tolerance": float("nan")}, "`orthogonality_tolerance`"),
        ({"sync_timeout": 0.5}, "`sync_timeout`"),
    ],
)
def test_bad_settings_name_the_argument(settings, message):
    with pytest.raises(ValueError, match=message):
        MonitorConfig(**settings)


def test_a_window_longer_than_its_interval_is_cut_to_it():
    assert MonitorConfig(every_n_steps=5, window=8).window == 5
    assert MonitorConfig(every_n_steps=None, window=8).resolve(20).window == 8
    assert MonitorConfig(every_n_steps=None, window=8).resolve(4).window == 4


def test_the_measured_steps_are_the_last_of_each_interval():
    config = MonitorConfig(every_n_steps=5, window=2)
    assert [i for i in range(15) if config.is_measured(i)] == [3, 4, 8, 9, 13, 14]
    assert [config.position_in_window(i) for i in (3, 4, 8)] == [0, 1, 0]


def test_defaults_and_the_checkpoint_key():
    config = MonitorConfig()
    assert config.every_n_steps == DEFAULT_EVERY_N_STEPS and config.resolved
    assert not MonitorConfig(every_n_steps=None).resolved
    # sync_timeout is how long to wait, not what is measured: it does not key a checkpoint.
    assert "sync_timeout" not in config.key() and config.key()["window"] == config.window
