"""The W&B views the package creates at the end of fit, read back from an offline run.

Per unit a ``wandb.plot.line_series`` chart of the measured angular update, the prediction and
its tolerance band; one chart of every unit's ratio with the band ``1 -+ tolerance``; the report
figure as a ``wandb.Image``. The chart tables (``files/media/table``), the chart definitions (the
run config's ``_wandb/visualize``) and the image are read from the run directory and compared
with ``callback.history``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_sdm import _messages
from lightning_sdm.lightning import _loggers as integrations
from lightning_sdm.report._rundata import load_run
from tests.lightning.test_loggers import UNITS, _fit, _wandb_records

TOLERANCE = 0.1  # the callback's default, used by _fit


def _lines(table_path: Path) -> dict[str, tuple[list[int], list[float]]]:
    table = json.loads(table_path.read_text())
    assert table["columns"] == ["step", "lineKey", "lineVal"]
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for step, key, value in table["data"]:
        steps, values = lines.setdefault(key, ([], []))
        steps.append(step)
        values.append(value)
    return lines


def test_charts_and_report_figure_at_the_end_of_fit(tmp_path, wandb_offline, monkeypatch):
    pytest.importorskip("matplotlib")
    from lightning.pytorch.loggers import WandbLogger
    from matplotlib.image import imread

    monkeypatch.setattr(integrations, "MAX_CHARTS", 1)  # the first unit only gets a chart
    logger = WandbLogger(save_dir=str(tmp_path), project="lightning-sdm-tests")
    run, callback = _fit(tmp_path, logger)
    run_dir = Path(logger.experiment.dir).parent
    wandb_offline.finish()
    records = _wandb_records(next(run_dir.glob("run-*.wandb")), until="exit")
    media = run_dir / "files" / "media"
    history = {unit: [r for r in callback.history if r.unit == unit] for unit in UNITS}

    # The unit's chart: measured, predicted and the band, as the history holds them.
    (table,) = (media / "table" / "sdm" / "charts").glob(f"{UNITS[0]}_table_*.table.json")
    lines = _lines(table)
    rows = history[UNITS[0]]
    steps = [r.global_step for r in rows]
    assert list(lines) == ["measured", "predicted", "predicted -10%", "predicted +10%"]
    assert lines["measured"] == (steps, [r.angular_update for r in rows])
    assert lines["predicted"] == (steps, [r.theory for r in rows])
    for label, factor in (("predicted -10%", 1 - TOLERANCE), ("predicted +10%", 1 + TOLERANCE)):
        assert lines[label][0] == steps
        assert lines[label][1] == pytest.approx([r.theory * factor for r in rows], rel=1e-12)
    # Beyond MAX_CHARTS units: no chart of their own; every unit is in the ratio chart.
    assert not list((media / "table" / "sdm" / "charts").glob(f"{UNITS[1]}_table_*"))
    (table,) = (media / "table" / "sdm" / "charts").glob("ratio_table_*.table.json")
    ratio = _lines(table)
    assert list(ratio) == [*UNITS, "1 -10%", "1 +10%"]
    for unit in UNITS:
        assert ratio[unit] == (
            [r.global_step for r in history[unit]],
            [r.ratio for r in history[unit]],
        )
    assert ratio["1 +10%"] == (steps, [1 + TOLERANCE] * len(steps))

    # The chart definitions: W&B's line-series panel on those tables, titled per unit.
    config = {
        tuple(item.nested_key): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
        if list(item.nested_key[:2]) == ["_wandb", "visualize"]
    }
    assert set(config) == {
        ("_wandb", "visualize", f"sdm/charts/{name}") for name in (UNITS[0], "ratio")
    }
    panel = config["_wandb", "visualize", f"sdm/charts/{UNITS[0]}"]["panel_config"]
    assert panel["panelDefId"] == "wandb/lineseries/v0"
    assert panel["stringSettings"] == {
        "title": _messages.wandb_unit_chart_title(UNITS[0]),
        "xname": "global step",
    }
    assert f'"sdm/charts/{UNITS[0]}_table"' in json.dumps(panel["userQuery"])
    assert UNITS[0] in panel["stringSettings"]["title"]

    # The report figure, with a caption that says which step and units it shows.
    (image,) = (media / "images" / "sdm").glob("report_*.png")
    pixels = imread(image)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 400 and pixels[..., :3].std() > 0.01
    items = {
        tuple(item.nested_key): item.value_json
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
        if item.nested_key[:1] == ["sdm/report"]
    }
    assert json.loads(items["sdm/report", "_type"]) == "image-file"
    caption = json.loads(items["sdm/report", "caption"])
    assert caption.startswith(f"lightning_sdm report at global step {run.global_step} (2 units")

    # The report command still reads the run: the charts' nested keys are not scalars.
    data = load_run(run_dir)
    assert data.units == UNITS
    assert list(data.angular_update(UNITS[0]).values) == [r.angular_update for r in rows]
