"""The ``lightning-sdm`` command.

``lightning-sdm report LOG_DIR -o report.png`` finds a run written with
:class:`~lightning_sdm.SphericalDynamicsCallback` under ``LOG_DIR`` (TensorBoard event files or a
CSVLogger ``metrics.csv``, in subdirectories too; the newest run with ``sdm/`` keys unless
``--run`` names one), draws the report figure (:func:`lightning_sdm.plot.plot_run`), and prints
per unit the last measured RMS angular update, the prediction, their ratio and the equilibrium
step. ``--summary FILE.md`` also writes that table as Markdown. Errors (no such directory, no
run, no ``sdm/`` keys, matplotlib missing) exit with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_sdm.rundata import RunData, RunDataError, find_runs, load_run, relative_path

__all__ = ["format_summary", "main"]

PROG = "lightning-sdm"
ERROR_EXIT = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 on success, 2 on errors)."""
    parser = _parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exit_:  # --help, or a usage error (argparse printed why)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else ERROR_EXIT
    if args.command is None:
        parser.print_help(sys.stderr)
        return ERROR_EXIT
    try:
        return int(args.handler(args))
    except (RunDataError, ImportError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return ERROR_EXIT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Spherical Motion Dynamics tools for runs logged with lightning_sdm.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="draw the figure and print the per-unit summary of a logged run",
        description=(
            "Read a TensorBoard or CSV log directory written with SphericalDynamicsCallback, "
            "save the report figure and print a per-unit summary."
        ),
    )
    report.add_argument("log_dir", help="log directory (searched recursively), or a run's file")
    report.add_argument(
        "-o",
        "--output",
        default="sdm_report.png",
        help="figure file; the suffix sets the format (default: %(default)s)",
    )
    report.add_argument(
        "--run",
        help="which run under LOG_DIR: its path relative to LOG_DIR, or a unique substring "
        "(default: the newest run with sdm/ keys)",
    )
    report.add_argument("--summary", help="also write the summary as Markdown to this file")
    report.add_argument(
        "--units", nargs="+", metavar="PATTERN", help="only these units (names or glob patterns)"
    )
    report.add_argument("--dpi", type=int, default=100, help="figure resolution")
    report.add_argument("--list", action="store_true", help="list the runs found and exit")
    report.set_defaults(handler=_report)
    return parser


def _report(args: argparse.Namespace) -> int:
    log_dir = Path(args.log_dir)
    if not log_dir.exists():
        raise RunDataError(f"no such directory: {log_dir}")
    runs = find_runs(log_dir)
    if args.list:
        if not runs:
            raise RunDataError(f"no TensorBoard event files or metrics.csv under {log_dir}")
        for run in runs:
            print(f"{run.kind:<12} {relative_path(run.path, log_dir)}")
        return 0
    output = Path(args.output)
    _check_format(output)
    data = load_run(log_dir, run=args.run)

    from lightning_sdm.plot import plot_run, select_units

    units = select_units(data, args.units)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_run(data, units=units, path=output, dpi=args.dpi)
    print(f"Run: {data.source} [{data.kind}]")
    if len(runs) > 1 and args.run is None:
        print(
            f"({len(runs)} runs under {log_dir}: this is the newest with sdm/ keys; "
            "--list shows them, --run picks one)"
        )
    print(format_summary(data, units))
    print(f"Figure: {output}")
    if args.summary:
        summary = Path(args.summary)
        summary.parent.mkdir(parents=True, exist_ok=True)
        figure = os.path.relpath(output.resolve(), summary.resolve().parent)
        summary.write_text(format_summary(data, units, markdown=True, figure=figure))
        print(f"Summary: {summary}")
    return 0


def format_summary(
    data: RunData,
    units: Sequence[str] | None = None,
    *,
    markdown: bool = False,
    figure: str | None = None,
) -> str:
    """The per-unit table of the last window (plain text, or Markdown with a title)."""
    rows = [s for s in data.summary() if units is None or s.unit in units]
    first, last = data.steps()
    header = ["unit", "measured", "theory", "ratio", "norm", "regime", "equilibrium"]
    table = [
        [
            s.unit,
            _number(s.measured),
            _number(s.theory),
            _number(s.ratio, ".3f"),
            _number(s.weight_norm, ".4g"),
            (s.regime or "n/a").replace("_", " "),
            s.equilibrium.text,
        ]
        for s in rows
    ]
    fraction = data.equilibrium_fraction()
    footer = [
        f"Last window at step {last} (windows from step {first}). measured: RMS angular update "
        "over the window (rad/step); theory: predicted equilibrium; norm: weight norm; regime: "
        "the detector's verdict in the last window."
    ]
    channel = [s.unit for s in rows if s.granularity == "channel"]
    if channel:
        footer.append(
            "Channel granularity: measured is the RMS over channels of the per-channel RMS."
        )
    if fraction is not None and len(fraction):
        footer.append(f"Units in equilibrium at the end: {fraction.last:.0%}.")
    if markdown:
        lines = [f"# Spherical Motion Dynamics: {data.source}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * 4 + ["---", "---"]) + "|")
        for row in table:
            lines.append("| " + " | ".join([f"`{row[0]}`", *row[1:]]) + " |")
        lines += ["", *footer]
        if figure:
            lines += ["", f"![SDM report]({figure})"]
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    aligned = [
        "  ".join(
            cell.ljust(widths[i]) if i in (0, 5, 6) else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in [header, *table]
    ]
    return "\n".join([*aligned, *footer])


def _check_format(output: Path) -> None:
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as err:
        raise ImportError("Plotting needs matplotlib: pip install lightning-sdm[plot]") from err
    supported = FigureCanvasBase.get_supported_filetypes()
    suffix = output.suffix.lstrip(".").lower()
    if suffix not in supported:
        raise RunDataError(
            f"cannot write {output}: use one of the suffixes {', '.join(sorted(supported))}"
        )


def _number(value: float | None, spec: str = ".4e") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(value, spec)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
