"""The ``lightning-sdm`` command.

``lightning-sdm report LOG_DIR -o report.png`` finds a run written with
:class:`~lightning_sdm.SphericalDynamicsCallback` under ``LOG_DIR`` (TensorBoard event files, a
CSVLogger ``metrics.csv`` or a W&B run directory, offline or synced, read from its files without
network; in subdirectories too; the newest run with ``sdm/`` keys unless ``--run`` names one),
draws the report figure (:func:`lightning_sdm.report.plot_run`), and prints per unit the last
measured RMS angular update, the prediction, their ratio and the equilibrium step.
``--summary FILE.md`` also writes that table as Markdown (GitHub-flavoured: unit names in
code spans, ``|`` escaped).

The figure has the panels of at most 24 units (the first ones; its ratio and norm panels show
every selected unit, and the table lists them all): a warning says so, and ``--units`` picks
others. ``--dpi`` is 10 to 1200, lowered further where the image would exceed 40 megapixels.

Errors (no such directory, no run, no ``sdm/`` keys, matplotlib missing, an output that would
overwrite an input or the other output) exit with code 2 and one ``lightning-sdm: error: ...``
line; warnings (skipped files or rows, a damaged event file) are one ``lightning-sdm: warning:``
line each on stderr. Everything printed that comes from the logs (unit names, paths) has its
control characters escaped, so a log cannot drive the terminal.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from lightning_sdm.report._plot import MAX_UNIT_PANELS, printable
from lightning_sdm.report._rundata import (
    RunData,
    RunDataError,
    RunLocation,
    find_runs,
    load_run,
    relative_path,
)

__all__ = ["format_summary", "main"]

PROG = "lightning-sdm"
ERROR_EXIT = 2
DPI_RANGE = (10, 1200)
# A name that needs nothing escaped in a Markdown link destination.
_PLAIN_PATH = re.compile(r"[\w./~+-]+")
# Characters with a meaning in Markdown text (escaped with a backslash in titles).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~&$])")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 on success, 2 on errors)."""
    if isinstance(argv, str):
        raise ValueError(
            f"`argv` must be a list of arguments, got the string {argv!r}: use "
            f"{argv.split()!r} (or shlex.split)."
        )
    parser = _parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exit_:  # --help, or a usage error (argparse printed why)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else ERROR_EXIT
    if args.command is None:
        parser.print_help(sys.stderr)
        return ERROR_EXIT
    error: str | None = None
    with warnings.catch_warnings(record=True) as caught:
        # Ours and the libraries' user-facing warnings (not their deprecations), one line each.
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", UserWarning)
        try:
            code = int(args.handler(args))
        except (RunDataError, ImportError, OSError) as err:
            code, error = ERROR_EXIT, str(err)
        except KeyboardInterrupt:
            code, error = 130, "interrupted"
        except Exception as err:  # never a traceback: name what failed instead
            code, error = ERROR_EXIT, f"unexpected {type(err).__name__}: {err} (please report it)"
    _print_warnings(caught)  # before the error: the error line is the last one
    if error is not None:
        _say("error", error)
    return code


def _say(kind: str, message: str) -> None:
    print(f"{PROG}: {kind}: {printable(message)}", file=sys.stderr)


def _print_warnings(caught: Iterable[warnings.WarningMessage]) -> None:
    seen: set[str] = set()
    for warning in caught:
        text = str(warning.message)
        if text not in seen:  # the scan runs twice (list, then load): once is enough
            seen.add(text)
            _say("warning", text)


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
            "Read a TensorBoard, CSV or W&B (offline or synced run directory, or its wandb/ "
            "parent; no network) log written with SphericalDynamicsCallback, "
            "save the report figure and print a per-unit summary. The figure has the panels of "
            f"at most {MAX_UNIT_PANELS} units (the first ones; its ratio and norm panels show "
            "all, and so does the table): --units picks which. Nothing is written over an "
            "input file, and -o and --summary must differ."
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
        "--units",
        nargs="+",
        metavar="PATTERN",
        help="only these units: exact names, else glob patterns (the figure draws the first "
        f"{MAX_UNIT_PANELS})",
    )
    report.add_argument(
        "--dpi",
        type=_dpi,
        default=100,
        help=f"figure resolution, {DPI_RANGE[0]} to {DPI_RANGE[1]} (lowered where the image "
        "would exceed 40 megapixels; default: %(default)s)",
    )
    report.add_argument("--list", action="store_true", help="list the runs found and exit")
    report.set_defaults(handler=_report)
    return parser


def _dpi(text: str) -> int:
    low, high = DPI_RANGE
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from {low} to {high} (dots per inch), got {text!r}"
        )
    return value


def _report(args: argparse.Namespace) -> int:
    log_dir = Path(args.log_dir)
    if not log_dir.exists():
        raise RunDataError(f"no such directory: {log_dir}")
    runs = find_runs(log_dir)
    if args.list:
        if not runs:
            raise RunDataError(
                f"no TensorBoard event files, metrics.csv or W&B run under {log_dir}"
            )
        for run in runs:
            print(printable(f"{run.kind:<12} {relative_path(run.path, log_dir)}"))
        return 0
    output = Path(args.output)
    summary = Path(args.summary) if args.summary else None
    _check_format(output)
    _check_outputs(output, summary, _inputs(log_dir, runs))
    data = load_run(log_dir, run=args.run)

    from lightning_sdm.report._plot import plot_run, select_units

    units = select_units(data, args.units)
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_run(data, units=units, path=output, dpi=args.dpi)
    print(printable(f"Run: {data.source} [{data.kind}]"))
    if len(runs) > 1 and args.run is None:
        print(
            printable(
                f"({len(runs)} runs under {log_dir}: this is the newest with sdm/ keys; "
                "--list shows them, --run picks one)"
            )
        )
    print(format_summary(data, units))
    print(printable(f"Figure: {output}"))
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        figure = os.path.relpath(output.resolve(), summary.resolve().parent)
        summary.write_text(format_summary(data, units, markdown=True, figure=figure))
        print(printable(f"Summary: {summary}"))
    return 0


def _inputs(log_dir: Path, runs: Sequence[RunLocation]) -> list[Path]:
    """Every file a run under ``log_dir`` is read from (and ``log_dir`` itself if a file)."""
    found = [log_dir] if log_dir.is_file() else []
    for run in runs:
        found += run.files or (run.path,)
    return found


def _check_outputs(output: Path, summary: Path | None, inputs: Sequence[Path]) -> None:
    """Refuse, before anything is written, an output over an input or over the other output.

    Paths are compared resolved (``..`` and symbolic links), and with ``os.path.samefile``
    where both exist (hard links).
    """
    outputs = [("-o", output)] + ([("--summary", summary)] if summary is not None else [])
    for option, path in outputs:
        for source in inputs:
            if _same_file(path, source):
                raise RunDataError(
                    f"{option} {path} is an input of the report ({source}): writing it would "
                    f"destroy the log; give {option} a new file name"
                )
    if summary is not None and _same_file(output, summary):
        raise RunDataError(
            f"--summary {summary} and -o {output} are the same file: give them different names"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return os.path.samefile(a, b)
    except (OSError, RuntimeError):  # one does not exist (yet), or a symbolic link loop
        return False


def format_summary(
    data: RunData,
    units: Sequence[str] | None = None,
    *,
    markdown: bool = False,
    figure: str | None = None,
) -> str:
    """The per-unit table of the last window (plain text, or Markdown with a title).

    Text from the log (unit names, the source) has its control characters escaped; in
    Markdown, a unit name is a code span whose fence it cannot close, with ``|`` escaped for
    GitHub-flavoured tables (see :func:`_code_span`).
    """
    rows = [s for s in data.summary() if units is None or s.unit in units]
    first, last = data.steps()
    header = ["unit", "measured", "theory", "ratio", "norm", "regime", "equilibrium"]
    table = [
        [
            printable(s.unit),
            _number(s.measured),
            _number(s.theory),
            _number(s.ratio, ".3f"),
            _number(s.weight_norm, ".4g"),
            (s.regime or "n/a").replace("_", " "),
            s.equilibrium.text,
        ]
        for s in rows
    ]
    # The radial balance, where it says more than the prediction (SGD's is the prediction).
    balanced = [s.balance is not None and s.balance != s.theory for s in rows]
    if any(balanced):
        header.insert(4, "balance")
        for row, s in zip(table, rows, strict=True):
            row.insert(4, _number(s.balance))
    fraction = data.equilibrium_fraction()
    footer = [
        f"Last window at step {last} (windows from step {first}). measured: RMS angular update "
        "over the window (rad/step); theory: predicted equilibrium; norm: weight norm; regime: "
        "the detector's verdict in the last window."
    ]
    if any(balanced):
        footer.append(
            "balance: the angle a settled norm gives with the update's measured radial part; "
            "balance / theory is the task's gradients' share of the ratio, measured / balance "
            "the share of a norm that has not settled (docs/muon.md)."
        )
    channel = [s.unit for s in rows if s.granularity == "channel"]
    if channel:
        footer.append(
            "Channel granularity: measured is the RMS over channels of the per-channel RMS."
        )
    if fraction is not None and len(fraction) and math.isfinite(fraction.last):
        footer.append(f"Units in equilibrium at the end: {fraction.last:.0%}.")
    if markdown:
        source = _MARKDOWN_SPECIAL.sub(r"\\\1", printable(data.source))
        lines = [f"# Spherical Motion Dynamics: {source}", ""]
        lines.append("| " + " | ".join(header) + " |")
        numbers = len(header) - 3
        lines.append("|" + "|".join(["---"] + ["---:"] * numbers + ["---", "---"]) + "|")
        for row in table:
            lines.append("| " + " | ".join([_code_span(row[0]), *row[1:]]) + " |")
        lines += ["", *footer]
        if figure:
            lines += ["", f"![SDM report]({_link(figure)})"]
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    aligned = [
        "  ".join(
            cell.ljust(widths[i]) if i == 0 or i >= len(header) - 2 else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in [header, *table]
    ]
    return "\n".join([*aligned, *footer])


def _code_span(text: str) -> str:
    r"""``text`` as a Markdown code span inside a table cell.

    The fence is one backtick longer than the longest run of backticks in ``text`` (so the
    name cannot close it), padded with a space where ``text`` starts or ends with a backtick
    or a space (CommonMark strips one); ``|`` is escaped, which GFM tables require even in code.

    Example::

        >>> print(_code_span("a|b`c"))
        ``a\|b`c``
    """
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def _link(path: str) -> str:
    """A Markdown link destination: as is when plain, else in ``<...>`` with ``<>`` escaped."""
    path = printable(path)
    if _PLAIN_PATH.fullmatch(path):
        return path
    return "<" + re.sub(r"([<>\\])", r"\\\1", path) + ">"


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
    """A table cell: ``n/a`` for no value (NaN), ``inf`` / ``-inf`` shown as such."""
    if value is None or math.isnan(value):
        return "n/a"
    return format(value, spec) if math.isfinite(value) else ("inf" if value > 0 else "-inf")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
