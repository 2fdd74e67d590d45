"""A ready W&B workspace for runs logged with SphericalDynamicsCallback (``wandb-workspaces``).

Builds, with W&B's maintained ``wandb-workspaces`` package (``pip install
lightning-sdm[workspace]``), a saved view of a project with three sections:

* **SDM overview**: the median ratio measured / predicted (``sdm/angular_update_ratio``) inside
  the detector's tolerance band (``sdm/tolerance_band/lower`` and ``upper``), every
  unit's ratio, the fraction of units in equilibrium, every weight norm (log y);
* **SDM per unit**: per unit, a live line plot of the measured angular update beside its
  prediction (while training), and the end-of-fit chart ``sdm/charts/<unit>`` the callback logs
  (measured, predicted and the tolerance band, one colour each);
* **SDM tables and report**: the report figure (``sdm/report``), the per-unit table
  ``sdm/units`` and the window table ``sdm/unit_windows``.

The x axis is the step key the callback defines for ``sdm/*`` (``trainer/global_step`` with
Lightning's ``WandbLogger``; ``--step-key`` for another). The units are read from a local run
(``--from-run``: a run directory, ``wandb/``, or any log ``lightning-sdm report`` reads; no
network), or given with ``--units``.

Usage::

    # look at the view without saving it (no W&B account needed):
    python examples/wandb_workspace.py --entity me --project sdm --from-run wandb/ --dry-run
    # save it to the project (needs `wandb login`); prints the view's URL:
    python examples/wandb_workspace.py --entity me --project sdm --from-run wandb/

Open the URL and, in the W&B UI, "Save as default" makes it the project's view for every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from lightning_sdm.keys import Keys

# The keys and panel id the callback logs (lightning_sdm/lightning/_loggers.py).
CHARTS = f"{Keys.PREFIX}charts/"
REPORT_IMAGE = f"{Keys.PREFIX}report"
LINE_SERIES = "wandb/lineseries/v0"
# Panel fields left at their defaults, not worth printing.
_UNSET: list[Any] = [None, [], {}, "", [None, None], (None, None)]


def _regex(prefix: str) -> str:
    """A W&B metric regex for every key under ``prefix`` (every unit, as many as there are)."""
    return prefix.replace(".", r"\.") + ".+"


def build_workspace(
    entity: str,
    project: str,
    units: Sequence[str],
    *,
    step_key: str = "trainer/global_step",
    name: str = "Spherical Motion Dynamics",
) -> Any:
    """The workspace (a ``wandb_workspaces.workspaces.Workspace``, not saved yet)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    overview = ws.Section(
        name="SDM overview",
        is_open=True,
        panels=[
            wr.LinePlot(
                title="angular update / prediction: median over the units, tolerance band",
                x=step_key,
                y=[Keys.MEDIAN_RATIO, Keys.TOLERANCE_LOWER, Keys.TOLERANCE_UPPER],
            ),
            wr.LinePlot(
                title="angular update / prediction, every unit",
                x=step_key,
                metric_regex=_regex(Keys.RATIO),
            ),
            wr.LinePlot(
                title="fraction of the units in equilibrium", x=step_key, y=[Keys.FRACTION]
            ),
            wr.LinePlot(
                title="weight norm, every unit",
                x=step_key,
                metric_regex=_regex(Keys.WEIGHT_NORM),
                log_y=True,
            ),
        ],
    )
    per_unit: list[Any] = []
    for unit in units:
        per_unit.append(
            wr.LinePlot(
                title=f"{unit}: measured and predicted angular update (rad/step)",
                x=step_key,
                y=[f"{Keys.ANGULAR_UPDATE}{unit}", f"{Keys.THEORY}{unit}"],
            )
        )
        per_unit.append(
            wr.CustomChart(
                query={"summaryTable": {"tableKey": f"{CHARTS}{unit}_table"}},
                chart_name=LINE_SERIES,
                chart_fields={"step": "step", "lineKey": "lineKey", "lineVal": "lineVal"},
                chart_strings={"title": f"{unit} at the end of fit", "xname": step_key},
            )
        )
    tables = ws.Section(
        name="SDM tables and report",
        is_open=True,
        panels=[
            wr.MediaBrowser(title="report figure", media_keys=[REPORT_IMAGE]),
            wr.WeavePanelSummaryTable(table_name=f"{Keys.PREFIX}units"),
            wr.WeavePanelSummaryTable(table_name=f"{Keys.PREFIX}unit_windows"),
        ],
    )
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[overview, ws.Section(name="SDM per unit", is_open=True, panels=per_unit), tables],
        settings=ws.WorkspaceSettings(x_axis=step_key, smoothing_type="none"),
    )


def units_of_run(path: str) -> list[str]:
    """The monitored units of a local run (any log ``lightning-sdm report`` reads)."""
    from lightning_sdm.report import load_run

    return load_run(path).units


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entity", required=True, help="W&B entity (user or team)")
    parser.add_argument("--project", required=True, help="W&B project")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-run", help="a local run (directory or log) to read the units from")
    source.add_argument("--units", nargs="+", help="the monitored units, by name")
    parser.add_argument("--step-key", default="trainer/global_step", help="x axis (%(default)s)")
    parser.add_argument("--name", default="Spherical Motion Dynamics", help="the view's name")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the view's sections and panels as JSON instead of saving it",
    )
    args = parser.parse_args(argv)
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        print("This needs wandb-workspaces: pip install lightning-sdm[workspace]", file=sys.stderr)
        return 2
    units = args.units or units_of_run(args.from_run)
    workspace = build_workspace(
        args.entity, args.project, units, step_key=args.step_key, name=args.name
    )
    if args.dry_run:
        print(json.dumps(describe(workspace), indent=2, default=_plain))
        return 0
    workspace.save()
    print(f"Saved the view {args.name!r}: {workspace.url}")
    return 0


def describe(workspace: Any) -> dict[str, Any]:
    """The sections and panels of a workspace, as plain values (what ``--dry-run`` prints)."""
    sections = {}
    for section in workspace.sections:
        panels = []
        for panel in section.panels:
            fields = {
                key: value
                for key, value in vars(panel).items()
                if not key.startswith("_") and value not in _UNSET
            }
            panels.append({"type": type(panel).__name__, **fields})
        sections[section.name] = panels
    return {
        "entity": workspace.entity,
        "project": workspace.project,
        "name": workspace.name,
        "x_axis": workspace.settings.x_axis,
        "sections": sections,
    }


def _plain(value: Any) -> Any:
    """A panel's nested settings (its layout, ...) as their public fields."""
    return {key: item for key, item in vars(value).items() if not key.startswith("_")}


if __name__ == "__main__":
    raise SystemExit(main())
