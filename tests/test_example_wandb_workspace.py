"""``examples/wandb_workspace.py``: the W&B view built with ``wandb-workspaces``, not saved.

Runs the script as a user would (``--dry-run``: no account, no network) on a local run, and
checks that its panels name the keys the callback logs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_sdm.keys import Keys
from lightning_sdm.lightning import _loggers as integrations

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "wandb_workspace.py"
COMMAND = [sys.executable, str(SCRIPT), "--dry-run"]
UNITS = ["net.0.weight", "net.10.weight", "net.2.weight"]


def test_the_workspace_shows_what_the_callback_logs(tmp_path: Path):
    pytest.importorskip("wandb_workspaces")
    run = tmp_path / "logs" / "version_0"
    run.mkdir(parents=True)
    header = ["step", *(f"{Keys.ANGULAR_UPDATE}{unit}" for unit in UNITS)]
    (run / "metrics.csv").write_text(",".join(header) + "\n10,0.02,0.03,0.04\n")

    result = subprocess.run(
        [*COMMAND, "--entity", "me", "--project", "sdm", "--from-run", str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    view = json.loads(result.stdout)
    assert (view["entity"], view["project"], view["x_axis"]) == ("me", "sdm", "trainer/global_step")
    overview, per_unit, tables = view["sections"].values()
    assert [panel.get("y") for panel in overview if "y" in panel] == [
        [Keys.MEDIAN_RATIO, Keys.TOLERANCE_LOWER, Keys.TOLERANCE_UPPER],
        [Keys.FRACTION],
    ]
    assert {panel.get("metric_regex") for panel in overview} >= {
        "sdm/angular_update_ratio/.+",
        "sdm/weight_norm/.+",
    }
    # Per unit (natural order, as the report reads them): the live plot and the end-of-fit chart
    # whose table is the one the callback logs.
    assert len(per_unit) == 2 * len(UNITS)
    for unit, (live, chart) in zip(
        ["net.0.weight", "net.2.weight", "net.10.weight"], zip(per_unit[::2], per_unit[1::2])
    ):
        assert live["y"] == [f"{Keys.ANGULAR_UPDATE}{unit}", f"{Keys.THEORY}{unit}"]
        assert chart["chart_name"] == "wandb/lineseries/v0"
        table = f"{integrations._CHARTS}{unit}_table"  # wandb.plot.line_series' table key
        assert chart["query"] == {"summaryTable": {"tableKey": table}}
    media, units_table, windows_table = tables
    assert media["media_keys"] == [integrations._REPORT_IMAGE]
    assert units_table["table_name"] == "sdm/units"
    assert windows_table["table_name"] == f"{Keys.PREFIX}unit_windows"


def test_without_wandb_workspaces_it_says_what_to_install(tmp_path: Path):
    probe = (
        "import sys; sys.modules['wandb_workspaces'] = None; "
        f"sys.argv = ['x', '--entity', 'e', '--project', 'p', '--units', 'w']; "
        f"exec(open({str(SCRIPT)!r}).read())"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2
    assert "pip install lightning-sdm[workspace]" in result.stderr
