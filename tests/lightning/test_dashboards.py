"""Dashboards beyond scalars, read back from what the loggers wrote.

* W&B (offline run): the incremental table ``sdm/unit_windows`` (one row per unit and window,
  only the new rows in each upload) equals ``callback.history``; with ``alerts=True`` every
  equilibrium event is one ``run.alert`` with the event's message, titled with what happened
  (WARN when the LR changed).
* TensorBoard: one hparams experiment per run (read back by TensorBoard's own HParams plugin code),
  written at the start of fit with the module's own hyper-parameters and the theory's inputs, whose
  equilibrium metrics are scalars of the run holding the callback's values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm._messages import alert_title, describe_event
from lightning_sdm.actions._actions import DecayLR
from lightning_sdm.lightning import _loggers as integrations
from tests.helpers import BNNet, loader, noisy_classification_data, trainer
from tests.lightning.test_loggers import _wandb_records

# Strong weight decay and loose detector settings: events within a short CPU run (as in
# tests/lightning/test_callback_actions.py); the point is where they go, not the detection.
FAST = {"every_n_steps": 4, "window": 4, "tolerance": 0.3, "patience": 2}


def _fit(tmp_path, logger, **settings):
    torch.manual_seed(0)
    callback = SphericalDynamicsCallback(**FAST, **settings)
    run = trainer(tmp_path, logger=logger, callbacks=[callback], max_epochs=2, log_every_n_steps=4)
    run.fit(BNNet(weight_decay=0.05), loader(noisy_classification_data()))
    return run, callback


def test_wandb_window_table_and_alerts(tmp_path, wandb_offline):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), project="lightning-sdm-tests")
    action = DecayLR(factor=0.5, cooldown=8)
    run, callback = _fit(tmp_path, logger, alerts=True, on_equilibrium=action)
    assert callback.events, "the set-up must produce equilibrium events"
    run_dir = Path(logger.experiment.dir).parent
    wandb_offline.finish()

    # The incremental table: each upload holds only the rows of its windows; together, history.
    parts = sorted(
        (run_dir / "files" / "media" / "table" / "sdm").glob("unit_windows_*.table.json"),
        key=lambda path: int(path.name.split("_")[2]),
    )
    windows = sorted({record.global_step for record in callback.history})
    assert len(parts) == len(windows)
    rows = []
    for path, step in zip(parts, windows, strict=True):
        part = json.loads(path.read_text())
        assert part["columns"] == integrations.WINDOW_COLUMNS
        assert {row[0] for row in part["data"]} == {step}  # only the new rows
        rows += part["data"]
    expected = [
        [getattr(record, column) for column in integrations.WINDOW_COLUMNS]
        for record in callback.history
    ]
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        for got, value in zip(row, want, strict=True):
            if (isinstance(value, float) and math.isnan(value)) or value is None:
                assert got is None or (isinstance(got, float) and math.isnan(got))
            else:
                assert got == value

    # One alert per event, with the event's message; decays are warnings.
    records = _wandb_records(next(run_dir.glob("run-*.wandb")), until="exit")
    alerts = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    assert len(alerts) == len(callback.events)
    decays = 0
    for alert, event in zip(alerts, callback.events, strict=True):
        decays += event.new_lrs != event.old_lrs
        assert alert.text == describe_event(event, decays)
    # The title says what happened: the planned end-of-budget decay is no equilibrium.
    assert [a.title for a in alerts] == [alert_title(event, False) for event in callback.events]
    titles = {a.title for a in alerts}
    assert "lightning_sdm: equilibrium reached, LR decayed" in titles
    assert ("lightning_sdm: planned end-of-budget LR decay" in titles) == any(
        event.criterion == "budget" for event in callback.events
    )
    levels = ["WARN" if event.new_lrs != event.old_lrs else "INFO" for event in callback.events]
    assert [a.level for a in alerts] == levels
    assert "WARN" in levels  # at least one decay happened
    assert run.global_step == 2 * 16


def test_no_alerts_unless_asked(tmp_path, wandb_offline):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), project="lightning-sdm-tests")
    _, callback = _fit(tmp_path, logger)
    assert callback.events
    run_dir = Path(logger.experiment.dir).parent
    wandb_offline.finish()
    records = _wandb_records(next(run_dir.glob("run-*.wandb")), until="exit")
    assert not [r for r in records if r.WhichOneof("record_type") == "alert"]


def test_alerts_without_a_wandb_logger_are_reported_once(tmp_path):
    with pytest.warns(UserWarning, match="alerts=True.*no WandbLogger") as record:
        _, callback = _fit(tmp_path, False, alerts=True)
    assert callback.events  # events happened, and were printed, not alerted
    assert sum("no WandbLogger" in str(w.message) for w in record) == 1


def test_alerts_must_be_a_bool():
    with pytest.raises(ValueError, match="`alerts` must be True or False"):
        SphericalDynamicsCallback(alerts="yes")


def _tensorboard_experiment(root):
    """The HParams experiment as TensorBoard's own plugin builds it from ``root``, by run."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(root))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(root))
    plugin = backend_context.Context(base_plugin.TBContext(data_provider=provider))
    request = context.RequestContext()
    metadata = plugin.hparams_metadata(request, "")
    hparams = plugin.hparams_from_data_provider(request, "", 0)
    experiment = plugin.experiment_from_metadata(request, "", True, metadata, hparams)
    return metadata, experiment


def test_tensorboard_hparams_one_experiment_per_run(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    runs = []
    for _ in range(2):  # a second run beside the first, as `make demo` twice
        logger = TensorBoardLogger(tmp_path, name="tb")
        run, callback = _fit(tmp_path, logger)
        runs.append((logger, run, callback))
    # No run directory beside Lightning's: each run is one directory, one HParams row.
    metadata, experiment = _tensorboard_experiment(tmp_path)
    assert sorted(metadata) == ["tb/version_0", "tb/version_1"]
    assert not list(tmp_path.rglob(integrations.HPARAMS_RUN))
    # The table TensorBoard shows, whichever run's definition it picks: the module's columns
    # (save_hyperparameters) and ours, Lightning's hp_metric and ours.
    columns = {info.name for info in experiment.hparam_infos}
    assert {"lr", "weight_decay", "momentum", "optimizer", "hidden"} <= columns
    assert {"sdm/optimizer", "sdm/lr", "sdm/weight_decay", "sdm/momentum", "sdm/action"} <= columns
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert metrics == {"hp_metric", *integrations.HPARAMS_METRICS}
    for logger, run, callback in runs:
        accumulator = EventAccumulator(logger.log_dir)
        accumulator.Reload()
        content = accumulator.PluginTagToContent("hparams")
        read = plugin_data_pb2.HParamsPluginData.FromString
        first = read(content["_hparams_/experiment"]).experiment  # the one TensorBoard reads
        assert {info.name for info in first.hparam_infos} == columns
        hparams = read(content["_hparams_/session_start_info"]).session_start_info.hparams
        assert hparams["sdm/optimizer"].string_value == "SGD"
        assert hparams["sdm/lr"].number_value == pytest.approx(0.1)
        assert hparams["sdm/weight_decay"].number_value == pytest.approx(0.05)
        assert hparams["sdm/momentum"].number_value == pytest.approx(0.9)
        assert hparams["sdm/action"].string_value == "Warn()"
        assert hparams["weight_decay"].number_value == pytest.approx(0.05)  # the module's own
        assert hparams["hidden"].number_value == 32
        # The metrics' values: scalars of the run itself, at the end of fit.
        (fraction,) = accumulator.Scalars("sdm/hparams/equilibrium_fraction")
        assert fraction.step == run.global_step
        assert fraction.value == pytest.approx(callback.detector.fraction())
        last = {record.unit: record.ratio for record in callback.history}
        median = sorted(last.values())[len(last) // 2 - 1 : len(last) // 2 + 1]
        final_ratio = accumulator.Scalars("sdm/hparams/final_ratio")[-1].value
        assert final_ratio == pytest.approx(sum(median) / 2, rel=1e-6)
        steps = [state.reached_global_step for state in callback.detector.state.values()]
        if all(step is not None for step in steps):
            equilibrium = accumulator.Scalars("sdm/hparams/equilibrium_step")[-1].value
            assert equilibrium == max(steps)
        else:
            assert "sdm/hparams/equilibrium_step" not in accumulator.Tags()["scalars"]
    # The report command lists the two training runs.
    from lightning_sdm.report._rundata import find_runs

    found = sorted(run.path for run in find_runs(tmp_path))
    assert found == [Path(logger.log_dir) for logger, _, _ in runs]


def test_tensorboard_hparams_without_logged_module_hparams(tmp_path):
    """``save_hyperparameters(logger=False)``: the experiment holds our columns only."""
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    class Quiet(BNNet):
        def __init__(self) -> None:
            super().__init__(weight_decay=0.05)
            self.save_hyperparameters(logger=False)

    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="tb", prefix="pre", default_hp_metric=False)
    callback = SphericalDynamicsCallback(**FAST)
    run = trainer(tmp_path, logger=logger, callbacks=[callback], max_epochs=1, log_every_n_steps=4)
    run.fit(Quiet(), loader(noisy_classification_data()))
    _, experiment = _tensorboard_experiment(tmp_path)
    assert all(info.name.startswith("sdm/") for info in experiment.hparam_infos)
    metrics = {info.name.tag for info in experiment.metric_infos}  # the logger's prefix, as logged
    assert metrics == {f"pre-{key}" for key in integrations.HPARAMS_METRICS}


def test_the_report_reads_a_prefixed_logger_and_a_run_named_like_ours(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_sdm.report._cli import main
    from lightning_sdm.report._rundata import find_runs, load_run

    prefixed = TensorBoardLogger(tmp_path / "prefixed", name="tb", prefix="pre")
    _, callback = _fit(tmp_path, prefixed)
    data = load_run(tmp_path / "prefixed")  # keys logged as pre-sdm/...
    assert sorted(data.units) == sorted({record.unit for record in callback.history})
    assert main(["report", str(tmp_path / "prefixed"), "-o", str(tmp_path / "p.png")]) == 0
    # A user's own run called sdm_hparams (not inside a run directory) is a run like any other.
    named = TensorBoardLogger(tmp_path / "named", name="exp", version="sdm_hparams")
    _fit(tmp_path, named)
    (found,) = find_runs(tmp_path / "named")
    assert found.path == Path(named.log_dir)
    capsys.readouterr()
