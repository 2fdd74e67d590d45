"""Logger integrations: TensorBoard layout, W&B metrics/config/summary/table, several loggers.

Every test runs a real short fit and reads back what the logger wrote (event files, the W&B
offline run directory, metrics.csv).
"""

import itertools
import json
import math
import os
import re
import statistics
import struct
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.lightning import _loggers as integrations
from tests.helpers import (
    BNNet,
    loader,
    noisy_classification_data,
    read_csv_metrics,
    sgdm_prediction,
    trainer,
)

UNITS = ["net.0.weight", "net.3.weight"]
STEPS = [2, 4, 6, 8]  # 256 samples / 32 = 8 optimizer steps, a window closes every 2
THEORY = sgdm_prediction(0.1, 5e-3, 0.9)


@pytest.fixture(autouse=True)
def _no_plugin(monkeypatch):
    for name in [n for n in os.environ if n.startswith("LIGHTNING_SDM")]:
        monkeypatch.delenv(name)


def _fit(tmp_path, logger, granularity="layer", module=None):
    torch.manual_seed(0)
    callback = SphericalDynamicsCallback(every_n_steps=2, window=2, granularity=granularity)
    run = trainer(tmp_path, logger=logger, callbacks=[callback], log_every_n_steps=2)
    run.fit(module or BNNet(), loader(noisy_classification_data(samples=256)))
    assert run.global_step == 8
    return run, callback


def _expected_scalars(callback):
    """tag -> {step: value}, from `callback.history` (per-unit keys, as the callback logs them)."""
    expected: dict[str, dict[int, float]] = {}
    for entry in callback.history:
        unit, step = entry.unit, entry.global_step
        expected.setdefault(f"sdm/weight_norm/{unit}", {})[step] = entry.weight_norm
        expected.setdefault(f"sdm/angular_update_theory/{unit}", {})[step] = entry.theory
        if entry.channels is None:
            expected.setdefault(f"sdm/angular_update/{unit}", {})[step] = entry.angular_update
            expected.setdefault(f"sdm/angular_update_ratio/{unit}", {})[step] = entry.ratio
        else:
            for key, value in entry.channels.items():
                expected.setdefault(f"sdm/angular_update/{unit}/{key}", {})[step] = value
    by_step: dict[int, list[float]] = {}
    for entry in callback.history:  # the ratio the unit's chart shows (channels: their median)
        shown = entry.ratio if entry.channel_ratios is None else entry.channel_ratios["median"]
        by_step.setdefault(entry.global_step, []).append(shown)
    expected["sdm/angular_update_ratio"] = {s: statistics.median(r) for s, r in by_step.items()}
    return expected


def _read_tensorboard(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    scalars = {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()["scalars"]
    }
    # The layout is a summary of the custom_scalars plugin (empty plugin content) whose tensor
    # holds the serialized Layout, which is what TensorBoard's custom-scalars plugin reads.
    content = accumulator.PluginTagToContent("custom_scalars")
    assert list(content) == ["custom_scalars__config__"]
    events = accumulator.Tensors("custom_scalars__config__")
    assert len(events) == 1, "the layout must be written exactly once"
    layout = layout_pb2.Layout()
    layout.ParseFromString(events[0].tensor_proto.string_val[0])
    charts = {
        category.title: {chart.title: _chart(chart) for chart in category.chart}
        for category in layout.category
    }
    return scalars, charts


def _chart(chart):
    """A multiline chart: its tag regexes; a margin chart: ("Margin", [(value, lower, upper)])."""
    kind = chart.WhichOneof("content")
    if kind == "margin":
        return ("Margin", [(s.value, s.lower, s.upper) for s in chart.margin.series])
    assert kind == "multiline", kind
    return list(chart.multiline.tag)


def _resolve(patterns, tags):
    """The tags each chart regex selects, as TensorBoard does (`re.match`)."""
    return [sorted(t for t in tags if re.match(p, t)) for p in patterns]


def test_tensorboard_scalars_and_layout(tmp_path):
    pytest.importorskip("tensorboard")
    logger = TensorBoardLogger(tmp_path, name="tb")
    _, callback = _fit(tmp_path, logger)
    scalars, charts = _read_tensorboard(logger.log_dir)

    expected = _expected_scalars(callback)
    for tag, values in expected.items():
        assert sorted(scalars[tag]) == STEPS, tag
        for step, value in values.items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)
    for unit in UNITS:
        assert scalars[f"sdm/angular_update_theory/{unit}"][8] == pytest.approx(THEORY, rel=1e-6)
    assert len(scalars["sdm/equilibrium_fraction"]) == len(STEPS)

    assert list(charts) == ["SDM per unit", "SDM overview"]
    per_unit = charts["SDM per unit"]
    assert list(per_unit) == [
        title
        for unit in UNITS
        for title in (
            f"{unit}: measured / predicted, band 1 ± tolerance",
            f"{unit}: angular update and prediction (rad/step)",
        )
    ]
    tags = list(scalars)
    band = ("sdm/tolerance_band/lower", "sdm/tolerance_band/upper")
    tolerance = callback.detector.tolerance
    for unit in UNITS:
        # First the ratio inside the detector's band: one line, a shaded band, told apart.
        kind, series = per_unit[f"{unit}: measured / predicted, band 1 ± tolerance"]
        assert (kind, series) == ("Margin", [(f"sdm/angular_update_ratio/{unit}", *band)])
        patterns = per_unit[f"{unit}: angular update and prediction (rad/step)"]
        assert _resolve(patterns, tags) == [
            [f"sdm/angular_update/{unit}"],
            [f"sdm/angular_update_theory/{unit}"],
        ]
    for key, value in zip(band, (1 - tolerance, 1 + tolerance), strict=True):
        assert sorted(scalars[key]) == STEPS
        assert list(scalars[key].values()) == pytest.approx([value] * len(STEPS))
    overview = charts["SDM overview"]
    assert _resolve(overview["angular update / theory"], tags) == [
        [f"sdm/angular_update_ratio/{UNITS[0]}"],
        [f"sdm/angular_update_ratio/{UNITS[1]}"],
        ["sdm/angular_update_ratio"],
    ]
    assert _resolve(overview["weight norm"], tags) == [[f"sdm/weight_norm/{u}"] for u in UNITS]

    # The advice is a text summary, written once, equal to what the callback printed.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logger.log_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    (event,) = accumulator.Tensors("sdm/advice/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert callback.advice is not None
    assert [line.strip() for line in text.splitlines()] == [
        line.strip() for line in callback.advice.text().splitlines()
    ]
    assert "tau (at peak lr)" in text and ", ".join(UNITS) in text
    # The full detection report, every rejected parameter with its reason (the console has
    # the short summary).
    (event,) = accumulator.Tensors("sdm/detection/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert callback.report is not None
    assert [line.strip() for line in text.splitlines()] == [
        line.strip() for line in callback.report.summary().splitlines()
    ]
    for rejected in callback.report.rejected:
        assert f"{rejected.name}: {rejected.reason}" in text

    # The regimes, as a text table whenever one changed (not as smoothed numeric codes).
    texts = accumulator.Tensors("sdm/regimes/text_summary")
    assert texts and "sdm/regime/net.0.weight" not in scalars
    previous = None
    for event in texts:
        records = [r for r in callback.history if r.global_step == event.step]
        regimes = {r.unit: r.regime for r in records}
        assert regimes != previous  # written on a change only
        previous = regimes
        text = event.tensor_proto.string_val[0].decode()
        assert text.splitlines()[0] == "| unit | regime | why |"
        for record in records:
            assert f"| {record.unit} | {record.regime.replace('_', ' ')} |" in text
    changes = 1 + sum(
        {r.unit: r.regime for r in callback.history if r.global_step == step}
        != {r.unit: r.regime for r in callback.history if r.global_step == before}
        for before, step in itertools.pairwise(STEPS)
    )
    assert len(texts) == changes

    # A second fit on the same logger (and writer) keeps the one layout.
    _fit(tmp_path, logger)
    _, charts_again = _read_tensorboard(logger.log_dir)
    assert charts_again == charts


def test_csv_and_tensorboard_together_channel_granularity(tmp_path):
    pytest.importorskip("tensorboard")
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    run, callback = _fit(tmp_path, loggers, granularity="channel")
    assert run.logger is loggers[0]
    rows = [row for row in read_csv_metrics(run) if "sdm/angular_update_ratio" in row]
    csv_scalars: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("sdm/"):
                csv_scalars.setdefault(key, {})[int(row["step"])] = value
    tb_scalars, charts = _read_tensorboard(loggers[1].log_dir)
    # The hparams metrics are TensorBoard's own (the HParams experiment's columns).
    tb_sdm = {
        tag: values
        for tag, values in tb_scalars.items()
        if tag.startswith("sdm/") and not tag.startswith("sdm/hparams/")
    }

    # Both loggers got the same keys at the same steps, with the same values.
    assert set(csv_scalars) == set(tb_sdm)
    for tag, values in csv_scalars.items():
        assert sorted(values) == STEPS, tag
        assert [tb_sdm[tag][s] for s in STEPS] == pytest.approx(
            [values[s] for s in STEPS], rel=1e-6, nan_ok=True
        )
    for tag, values in _expected_scalars(callback).items():
        assert [csv_scalars[tag][s] for s in STEPS] == pytest.approx(
            [values[s] for s in STEPS], rel=1e-12
        )
    summaries = ("mean", "std", "min", "p10", "median", "p90", "max")
    for unit in UNITS:
        for key in summaries:
            assert f"sdm/angular_update/{unit}/{key}" in csv_scalars
            assert f"sdm/angular_update_ratio/{unit}/{key}" in csv_scalars

    # Channel layout, per unit: the channels' median ratio in the tolerance band, a margin chart
    # (the channels' median between p10 and p90) and the median with the prediction; in the
    # overview, the channels' median ratios, and their median (what the lines beside it show).
    tags = list(tb_scalars)
    per_unit = charts["SDM per unit"]
    assert list(per_unit) == [
        title
        for unit in UNITS
        for title in (
            f"{unit}: channels' median of measured / predicted, band 1 ± tolerance",
            f"{unit}: angular update, channels' median and p10-p90 band (rad/step)",
            f"{unit}: channels' median angular update and prediction (rad/step)",
        )
    ]
    for unit in UNITS:
        band = f"{unit}: angular update, channels' median and p10-p90 band (rad/step)"
        kind, series = per_unit[band]
        # Margin tags are exact tag names (not regexes) of scalars that were logged.
        value, lower, upper = keys = (
            f"sdm/angular_update/{unit}/median",
            f"sdm/angular_update/{unit}/p10",
            f"sdm/angular_update/{unit}/p90",
        )
        assert (kind, series) == ("Margin", [keys])
        assert all(sorted(tb_scalars[key]) == STEPS for key in keys)
        for step in STEPS:  # the band holds the value
            assert tb_scalars[lower][step] <= tb_scalars[value][step] <= tb_scalars[upper][step]
        patterns = per_unit[f"{unit}: channels' median angular update and prediction (rad/step)"]
        assert _resolve(patterns, tags) == [
            [f"sdm/angular_update/{unit}/median"],
            [f"sdm/angular_update_theory/{unit}"],
        ]
    assert _resolve(charts["SDM overview"]["angular update / theory"], tags) == [
        [f"sdm/angular_update_ratio/{UNITS[0]}/median"],
        [f"sdm/angular_update_ratio/{UNITS[1]}/median"],
        ["sdm/angular_update_ratio"],
    ]
    for step in STEPS:
        medians = [tb_scalars[f"sdm/angular_update_ratio/{unit}/median"][step] for unit in UNITS]
        assert tb_scalars["sdm/angular_update_ratio"][step] == pytest.approx(
            statistics.median(medians), rel=1e-6
        )


def test_a_failing_integration_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")

    def broken(*args, **kwargs):
        raise RuntimeError("layout exploded")

    monkeypatch.setattr(integrations, "tensorboard_layout", broken)
    loggers = [TensorBoardLogger(tmp_path, name="a"), TensorBoardLogger(tmp_path, name="b")]
    with pytest.warns(UserWarning, match="custom-scalars layout failed") as record:
        _, callback = _fit(tmp_path, loggers)
    failures = [w for w in record if "layout exploded" in str(w.message)]
    assert len(failures) == 1  # two loggers failed, one warning
    assert len(callback.history) == 2 * len(STEPS)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(loggers[1].log_dir)
    accumulator.Reload()
    assert "sdm/angular_update_ratio" in accumulator.Tags()["scalars"]
    assert "custom_scalars__config__" not in accumulator.Tags()["tensors"]  # no layout
    with pytest.raises(KeyError, match="custom_scalars"):
        accumulator.PluginTagToContent("custom_scalars")
    # The other integrations of that logger still ran: the advice text is there.
    assert "sdm/advice/text_summary" in accumulator.Tags()["tensors"]


def test_tensorboard_layout_anchors_and_escapes():
    layout = integrations.tensorboard_layout(["net.1.weight"], prefix="run-")
    charts = layout["SDM per unit"]
    (measured, theory) = charts["net.1.weight: angular update and prediction (rad/step)"][1]
    assert re.match(measured, "run-sdm/angular_update/net.1.weight")
    for other in ("run-sdm/angular_update/net.11.weight", "run-sdm/angular_update/netx1.weight"):
        assert not re.match(measured, other)
    assert not re.match(measured, "run-sdm/angular_update/net.1.weight/median")
    assert re.match(theory, "run-sdm/angular_update_theory/net.1.weight")


def test_tensorboard_margin_chart_tags_are_exact_names_with_the_prefix():
    layout = integrations.tensorboard_layout(
        ["net.1.weight", "net.2.weight"], channel_units=["net.1.weight"], prefix="run-"
    )
    per_unit = layout["SDM per unit"]
    band = "net.1.weight: angular update, channels' median and p10-p90 band (rad/step)"
    assert per_unit[band] == [
        "Margin",
        [f"run-sdm/angular_update/net.1.weight/{key}" for key in ("median", "p10", "p90")],
    ]
    # The unit logged whole keeps its one chart; and torch writes the layout as given.
    assert [title for title in per_unit if title.startswith("net.2.weight")] == [
        "net.2.weight: measured / predicted, band 1 ± tolerance",
        "net.2.weight: angular update and prediction (rad/step)",
    ]
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard.summary import custom_scalars

    (value,) = custom_scalars(layout).value
    from tensorboard.plugins.custom_scalar import layout_pb2

    parsed = layout_pb2.Layout()
    parsed.ParseFromString(value.tensor.string_val[0])
    (series,) = parsed.category[0].chart[1].margin.series
    assert (series.value, series.lower, series.upper) == tuple(
        f"run-sdm/angular_update/net.1.weight/{key}" for key in ("median", "p10", "p90")
    )


# ---------------------------------------------------------------------- Weights & Biases


def _wandb_records(path: Path, until: str, timeout: float = 30.0):
    """Records of a `.wandb` file, once it holds an `until` record.

    `wandb.finish()` can return before the service has flushed the file: poll for its last record.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = _parse_wandb_file(path.read_bytes())
        if any(r.WhichOneof("record_type") == until for r in records):
            return records
        assert time.monotonic() < deadline, f"no {until!r} record in {path} after {timeout} s"
        time.sleep(0.2)


def _parse_wandb_file(data: bytes):
    """A `.wandb` file: a LevelDB-style log of protobuf `Record`s in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B"
    position, block, pending, records = 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # block trailer
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 or position + 7 + length > len(data):  # zero padding, or still being written
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


class TwoGroupNet(BNNet):
    """`net.3` in a param group without weight decay: theory has no prediction for it."""

    def configure_optimizers(self):
        second = list(self.net[3].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in second)]
        groups = [{"params": rest}, {"params": second, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-3)


def test_wandb_offline_run(tmp_path, wandb_offline):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), project="lightning-sdm-tests")
    with pytest.warns(UserWarning, match="no predicted equilibrium for net.3.weight"):
        run, callback = _fit(tmp_path, logger, module=TwoGroupNet())
    experiment = logger.experiment
    with_theory, without = UNITS

    # Run config: the callback's settings and, per unit, what the theory used.
    config = experiment.config["sdm"]
    assert (config["granularity"], config["every_n_steps"], config["window"]) == ("layer", 2, 2)
    assert (config["tolerance"], config["patience"], config["quorum"]) == (0.1, 3, 1.0)
    assert set(config["units"]) == set(UNITS)
    entry = config["units"][with_theory]
    assert (entry["optimizer"], entry["rule"]) == ("SGD", "sgd_heavy_ball")
    assert (entry["lr"], entry["weight_decay"], entry["momentum"]) == (0.1, 5e-3, 0.9)
    assert entry["prediction"] == pytest.approx(THEORY, rel=1e-12)
    assert "Spherical Motion Dynamics" in entry["source"]
    advice = config["advice"]
    assert [sorted(group["units"]) for group in advice["groups"]] == [[with_theory], [without]]
    assert advice["groups"][0]["prediction"] == pytest.approx(THEORY, rel=1e-12)
    assert advice["groups"][1]["prediction"] is None  # no weight decay: nothing predicted
    entry = config["units"][without]
    assert (entry["rule"], entry["weight_decay"], entry["prediction"]) == (
        "no_weight_decay",
        0.0,
        None,
    )

    # Run summary: the last window per unit; ratio and theory only where there is a prediction.
    last = {record.unit: record for record in callback.history}
    summary = experiment.summary
    # The unit without prediction may pass the stationarity test (3 steady windows) or not;
    # the one with a prediction is 3-4x above it.
    states = callback.detector.state
    reached = {
        u: -1 if states[u].reached_global_step is None else states[u].reached_global_step
        for u in UNITS
    }
    in_equilibrium = {unit: states[unit].in_equilibrium for unit in UNITS}
    assert reached[with_theory] == -1 and reached[without] in (-1, 8)
    fraction = callback.detector.fraction()
    for unit in UNITS:
        assert summary[f"sdm/summary/{unit}/equilibrium_step"] == reached[unit]
        assert summary[f"sdm/summary/{unit}/final_angular_update"] == last[unit].angular_update
        assert summary[f"sdm/summary/{unit}/final_weight_norm"] == last[unit].weight_norm
        # The ordinary scalars are there too.
        assert summary[f"sdm/angular_update/{unit}"] == last[unit].angular_update
    assert summary[f"sdm/summary/{with_theory}/final_ratio"] == last[with_theory].ratio
    assert summary[f"sdm/summary/{with_theory}/final_theory"] == pytest.approx(THEORY, rel=1e-12)
    assert last[without].ratio is None
    summary_keys = set(summary.keys())  # `in` on a wandb Summary does not look at keys
    assert f"sdm/summary/{with_theory}/final_ratio" in summary_keys
    assert f"sdm/summary/{without}/final_ratio" not in summary_keys
    assert f"sdm/summary/{without}/final_theory" not in summary_keys
    assert summary["sdm/summary/equilibrium_fraction"] == fraction
    assert summary["trainer/global_step"] == 8

    # A unit that reached equilibrium reports its step (a second table is logged).
    state = callback.detector.state[with_theory]
    state.reached_global_step, state.in_equilibrium = 6, True
    callback.on_train_end(run, run.lightning_module)
    assert summary[f"sdm/summary/{with_theory}/equilibrium_step"] == 6
    assert summary[f"sdm/summary/{without}/equilibrium_step"] == reached[without]

    run_dir = Path(experiment.dir).parent
    wandb_offline.finish()

    # The offline run directory: the run file and the tables' media files.
    (run_file,) = run_dir.glob("run-*.wandb")
    assert run_file.stat().st_size > 0
    paths = sorted((run_dir / "files" / "media" / "table" / "sdm").glob("units_*.table.json"))
    assert len(paths) == 2  # end of fit, and the call above
    tables = [json.loads(path.read_text()) for path in paths]
    for table in tables:
        assert table["columns"] == integrations.TABLE_COLUMNS
    column = integrations.TABLE_COLUMNS.index("equilibrium_step")
    table, again = sorted(tables, key=lambda t: t["data"][0][column])
    assert [row[column] for row in again["data"]] == [6, reached[without]]
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert list(rows) == UNITS
    for unit in UNITS:
        row = rows[unit]
        assert (row["optimizer"], row["lr"]) == ("SGD", 0.1)
        assert row["final_angular_update"] == last[unit].angular_update
        assert row["final_weight_norm"] == last[unit].weight_norm
        assert (row["in_equilibrium"], row["equilibrium_step"]) == (
            in_equilibrium[unit],
            reached[unit],
        )
        assert row["invariance"] == "verified"
    assert (rows[with_theory]["rule"], rows[with_theory]["weight_decay"]) == (
        "sgd_heavy_ball",
        5e-3,
    )
    assert rows[with_theory]["final_ratio"] == last[with_theory].ratio
    assert rows[with_theory]["final_theory"] == pytest.approx(THEORY, rel=1e-12)
    assert (rows[without]["rule"], rows[without]["weight_decay"]) == ("no_weight_decay", 0.0)
    assert math.isnan(rows[without]["final_ratio"]) and math.isnan(rows[without]["final_theory"])

    # Read the run file back: define_metric, config, summary and the table went through.
    records = _wandb_records(run_file, until="exit")
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "sdm/*" and m.step_metric == "trainer/global_step" for m in metrics)
    config_items = {
        item.key: item.value_json
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    units = json.loads(config_items["sdm"])["units"]
    detection = json.loads(config_items["sdm"])["detection_text"]
    assert detection == callback.report.summary()
    assert all(name in detection for name in UNITS)
    assert (units[with_theory]["rule"], units[without]["rule"]) == (
        "sgd_heavy_ball",
        "no_weight_decay",
    )
    summary_items = {
        item.key: item.value_json
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    assert json.loads(summary_items[f"sdm/summary/{with_theory}/equilibrium_step"]) == 6
    assert json.loads(summary_items[f"sdm/summary/{without}/equilibrium_step"]) == reached[without]
    assert math.isclose(
        json.loads(summary_items[f"sdm/summary/{with_theory}/final_ratio"]),
        last[with_theory].ratio,
    )
    history_keys = {
        item.key or "/".join(item.nested_key)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }
    assert {"sdm/units/_type", f"sdm/angular_update/{with_theory}", "trainer/global_step"} <= (
        history_keys
    )
