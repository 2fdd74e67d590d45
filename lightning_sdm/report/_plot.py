"""Figures of a run's Spherical Motion Dynamics, in the spirit of Wan et al. (2020).

:func:`plot_run` draws, for a run read with :mod:`lightning_sdm.report` (a log directory, a
``metrics.csv``, or ``callback.history``), one panel per scale-invariant unit with the measured RMS
angular update against the predicted equilibrium (log scale; with ``granularity="channel"`` the
10th-90th percentile band of the channels), then the ratios of all units, their weight norms, the
learning rate (when logged) and the fraction of units in equilibrium. The first step at which a
unit was in equilibrium is marked by a vertical line, and where the source records the detector's
regimes (``callback.history``, or logs with ``sdm/regime/<unit>``) each unit's panel is shaded by
regime (equilibrium, tracking, relaxing, lagging, non-stationary, no prediction). The panel
functions (:func:`plot_unit`, :func:`plot_ratios`, ...) draw into any Matplotlib ``Axes`` for custom
layouts.

A figure stays readable and bounded whatever the log holds: at most 24 unit panels (by default;
the overview panels still show every selected unit, and a warning says how to pick others), at
most 40 megapixels (a higher ``dpi`` is lowered, with a warning), series of millions of points
thinned to their envelope, non-finite or absurd values (beyond 1e100) left out of the drawing, and
names from the log drawn literally (``$`` is not mathtext, control characters are escaped).

Matplotlib is an optional dependency (``pip install lightning-sdm[plot]``). Figures are built
with :class:`matplotlib.figure.Figure` directly, not through ``pyplot``: nothing is shown and no
global figure state is touched, so it works headless and in threads; in a notebook, display the
returned figure.

Example::

    from lightning_sdm.report import plot_run

    fig = plot_run(callback.history, path="report.png")      # in-process
    fig = plot_run("lightning_logs/", path="report.png")       # newest run under a log root
"""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_sdm._checks import check_integer, check_number
from lightning_sdm.keys import REGIME_CODES, Keys
from lightning_sdm.report._rundata import (
    RunData,
    RunDataError,
    RunDataWarning,
    Series,
    load_run,
    run_from_history,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "EQUILIBRIUM_TITLE",
    "LEARNING_RATE_TITLE",
    "RATIO_TITLE",
    "WEIGHT_NORM_TITLE",
    "load_run",
    "plot_equilibrium_fraction",
    "plot_learning_rates",
    "plot_ratios",
    "plot_run",
    "plot_unit",
    "plot_weight_norms",
    "printable",
    "unit_title",
]

RATIO_TITLE = "measured / theory"
WEIGHT_NORM_TITLE = "weight norm"
LEARNING_RATE_TITLE = "learning rate"
EQUILIBRIUM_TITLE = "units in equilibrium"

_INSTALL_HINT = "Plotting needs matplotlib: pip install lightning-sdm[plot]"
_MARKER_BELOW = 40  # draw point markers on series shorter than this
_LEGEND_INSIDE = 4  # multi-unit panels: a normal legend up to this many units, then a small one
_LEGEND_UNITS = 16  # and none beyond this many (the unit panels have the same colors)
_EQUILIBRIUM_COLOR = "tab:green"
MAX_UNIT_PANELS = 24  # beyond this many units, a figure is too tall to read (and to render)
_MAX_PIXELS = 40_000_000  # per saved figure (160 MB of RGBA while rendering)
_MAX_SIDE = 16_384  # pixels; Agg refuses 65,536
_MAX_POINTS = 2000  # per drawn line: longer series are thinned to their envelope
_MAX_SPANS = 2000  # windows sampled for the shading of long runs
_MAX_DRAWN = 1e100  # larger magnitudes (and smaller non-zero ones) are not drawn


def printable(text: object) -> str:
    r"""``text`` with control and other non-printable characters shown as escapes.

    Unit names and paths come from log files: printed raw, an ANSI or OSC sequence in them would
    drive the terminal, and a newline would forge output lines.

    Example::

        >>> printable("net.\x1b[31mred")
        'net.\\x1b[31mred'
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def literal(text: object) -> str:
    r"""``text`` as Matplotlib draws it literally: escaped as :func:`printable`, ``$`` not mathtext.

    Example::

        >>> literal(r"$\frac{$")
        '\\$\\frac{\\$'
    """
    return printable(text).replace("$", r"\$")


def unit_title(unit: str) -> str:
    """Title of a unit's panel (as drawn: see :func:`literal`)."""
    return f"angular update: {literal(unit)}"


def plot_run(
    run: RunData | str | os.PathLike[str] | Sequence[Mapping[str, Any]] | Any,
    *,
    units: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    ncols: int = 2,
    dpi: int = 100,
    max_unit_panels: int | None = MAX_UNIT_PANELS,
) -> Figure:
    """Draw the report figure of a run, and save it when ``path`` is given.

    Args:
        run: a :class:`~lightning_sdm.report.RunData`, a log directory / event file /
            ``metrics.csv`` (read with :func:`~lightning_sdm.report.load_run`), a callback's
            ``history`` list, or the callback itself.
        units: the units to draw a panel for (names or glob patterns); all by default. The
            overview panels always show these units only.
        path: where to save the figure (the format follows the suffix, e.g. ``.png``, ``.pdf``).
        title: the figure title (default: the run's source, drawn literally); Matplotlib parses
            ``$...$`` in a title given here as mathtext.
        ncols: panels per row.
        dpi: resolution of the saved figure, lowered (with a warning) to keep it within 40
            megapixels and 16,384 pixels a side.
        max_unit_panels: at most this many unit panels, for the first units selected (``None``:
            no limit); with more, a :class:`~lightning_sdm.report.RunDataWarning` says so.

    Returns:
        The Matplotlib figure. Its axes are, in order: one per unit (titled
        :func:`unit_title`), :data:`RATIO_TITLE`, :data:`WEIGHT_NORM_TITLE`, then
        :data:`LEARNING_RATE_TITLE` if a learning rate was logged and :data:`EQUILIBRIUM_TITLE`
        if the equilibrium fraction was.

    Raises:
        ImportError: without matplotlib.
        RunDataError: a source that cannot be read, or ``units`` that match no unit.
        ValueError: for ``ncols``, ``dpi`` or ``max_unit_panels`` out of range (named).
    """
    check_integer("ncols", ncols, 1)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`path` must be a file name (str or os.PathLike), got {path!r}.")
    if path is not None and os.path.isdir(path):  # matplotlib would write `<path>.png` beside it
        raise ValueError(
            f"`path` {os.fspath(path)!r} is a directory: give a file name ending in .png, .pdf, "
            ".svg, ..."
        )
    check_number("dpi", dpi, low=0.0)
    check_integer("max_unit_panels", max_unit_panels, 1, allow_none=True)
    ncols = int(ncols)
    figure_class = _figure_class()
    data = as_run(run)
    selected = select_units(data, units)
    drawn = selected if max_unit_panels is None else selected[:max_unit_panels]
    if len(drawn) < len(selected):
        warnings.warn(
            f"{len(selected)} units: the figure has the panels of the first {len(drawn)} (its "
            f"ratio and norm panels show all {len(selected)}); choose which with --units NAME "
            "or PATTERN (units=[...] in Python)",
            RunDataWarning,
            stacklevel=2,
        )
    panels: list[tuple[str, Any]] = [
        (unit_title(unit), lambda ax, unit=unit: plot_unit(ax, data, unit)) for unit in drawn
    ]
    panels.append((RATIO_TITLE, lambda ax: plot_ratios(ax, data, selected)))
    panels.append((WEIGHT_NORM_TITLE, lambda ax: plot_weight_norms(ax, data, selected)))
    if any(series.finite() for series in data.learning_rates.values()):
        panels.append((LEARNING_RATE_TITLE, lambda ax: plot_learning_rates(ax, data)))
    fraction = data.equilibrium_fraction()
    if fraction is not None and len(fraction):
        panels.append((EQUILIBRIUM_TITLE, lambda ax: plot_equilibrium_fraction(ax, data)))

    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    figure = figure_class(figsize=(6.0 * ncols, 3.4 * nrows), layout="constrained")
    for index, (_, draw) in enumerate(panels):
        draw(figure.add_subplot(nrows, ncols, index + 1))
    figure.suptitle(
        title if title is not None else f"Spherical Motion Dynamics: {literal(data.source)}"
    )
    if path is not None:
        figure.savefig(os.fspath(path), dpi=_capped_dpi(figure, dpi))
    return figure


def _capped_dpi(figure: Figure, dpi: float) -> float:
    """``dpi``, lowered with a warning where the image would exceed the pixel limits."""
    if not dpi > 0:
        raise ValueError(f"dpi must be positive, got {dpi}")
    width, height = figure.get_size_inches()
    capped = min(dpi, _MAX_SIDE / max(width, height), math.sqrt(_MAX_PIXELS / (width * height)))
    if capped < dpi:
        warnings.warn(
            f"dpi {dpi:g} would make a {width * dpi:.0f}x{height * dpi:.0f} px image: saved at "
            f"{capped:.0f} dpi ({width * capped:.0f}x{height * capped:.0f} px, the most drawn)",
            RunDataWarning,
            stacklevel=3,
        )
    return dpi if capped >= dpi else math.floor(capped)


def as_run(run: RunData | str | os.PathLike[str] | Sequence[Mapping[str, Any]] | Any) -> RunData:
    """Turn any accepted source into :class:`~lightning_sdm.report.RunData`."""
    if isinstance(run, RunData):
        return run
    if isinstance(run, (str, os.PathLike)):
        return load_run(run)
    history = getattr(run, "history", run)  # the callback itself
    if isinstance(history, Sequence):
        return run_from_history(history)
    raise TypeError(
        "Expected RunData, a log path, a SphericalDynamicsCallback or its `history`, got "
        f"{type(run).__name__}."
    )


def select_units(run: RunData, units: Sequence[str] | None) -> list[str]:
    """The run's units matching ``units`` (names or glob patterns), in the run's order.

    A pattern that is a unit's name selects that unit only: ``blocks[0].weight`` is a name,
    not the glob that matches ``blocks0.weight``.
    """
    if units is None:
        return list(run.units)
    if isinstance(units, str):  # one name or pattern, not its characters
        units = [units]
    if not isinstance(units, Sequence) or not all(isinstance(u, str) for u in units):
        raise RunDataError(f"`units` must be unit names or glob patterns, got {units!r}.")
    names = set(units) & set(run.units)
    globs = [p for p in units if p not in names]
    selected = [u for u in run.units if u in names or any(fnmatch.fnmatchcase(u, p) for p in globs)]
    if not selected:
        raise RunDataError(f"No unit matches {list(units)}; the run has {run.units}.")
    return selected


# ------------------------------------------------------------------ panels


def plot_unit(ax: Axes, run: RunData, unit: str) -> None:
    """Measured RMS angular update vs the prediction for one unit, equilibrium marked."""
    color = _unit_color(run, unit)
    if run.granularity(unit) == "channel":
        low, high = run.channel_summary(unit, "p10"), run.channel_summary(unit, "p90")
        if low is not None and high is not None and len(low) == len(high) and len(low):
            keep = np.union1d(_envelope(low.values), _envelope(high.values))
            (steps, lows), highs = _drawable(low, keep), _drawable(high, keep)[1]
            ax.fill_between(
                steps, lows, highs, color=color, alpha=0.2, lw=0, label="channels p10-p90"
            )
    measured = run.angular_update(unit)
    _line(ax, measured, color=color, label="measured (RMS)")
    theory = run.theory(unit)
    if theory is not None and theory.finite():
        values = np.asarray(theory.values)
        finite = np.isfinite(values)
        low = np.min(values, where=finite, initial=math.inf)
        constant = low == np.max(values, where=finite, initial=-math.inf)
        label = f"theory = {low:.3g}" if constant else "theory"
        _line(ax, theory, color="black", linestyle="--", label=label, marker=None)
    trajectory = run.trajectory(unit)
    if trajectory is not None and trajectory.finite():
        # Where the schedule should have the weights now (lag included); on the static value
        # under a constant LR.
        _line(ax, trajectory, color="gray", linestyle="-.", label="trajectory", marker=None)
    balance = run.balance(unit)
    if balance is not None and balance.finite() and not _same(balance, theory):
        # Where a settled norm would put the angle with the update's measured radial part: the
        # gap to the theory line is the task's gradients, the gap to the measured one the norm.
        # (Not drawn where it is the theory line itself: SGD's radial part is fixed a priori.)
        _line(ax, balance, color="gray", linestyle=":", label="radial balance", marker=None)
    codes = run.scalars.get(Keys.REGIME + unit)
    if codes is not None and len(codes):
        shaded: set[str] = set()
        for start, end, regime in _regime_spans(codes):
            shade = _REGIME_COLORS.get(regime)
            if shade is None:
                continue
            name = None if regime in shaded else regime.replace("_", " ")
            shaded.add(regime)
            ax.axvspan(start, end, color=shade, alpha=0.12, lw=0, label=name)
    else:
        flags = run.equilibrium_flags(unit)
        for start, end in _spans(flags) if flags is not None else []:
            ax.axvspan(start, end, color=_EQUILIBRIUM_COLOR, alpha=0.1, lw=0)
    info = run.equilibrium(unit)
    if info.step is not None:
        label = f"equilibrium (step {info.step})" if info.exact else info.text
        ax.axvline(info.step, color=_EQUILIBRIUM_COLOR, linestyle=":", label=label)
    _log_scale_if_positive(ax, measured, theory)
    _finish(ax, unit_title(unit), "rad / step")
    ax.legend(fontsize="small")


def plot_ratios(ax: Axes, run: RunData, units: Sequence[str] | None = None) -> None:
    """Measured / predicted for every unit, against the line at 1."""
    shown = list(run.units if units is None else units)
    drawn = []
    for unit in shown:
        ratio = run.ratio(unit)
        if ratio is not None and ratio.finite():
            _line(ax, ratio, color=_unit_color(run, unit), label=literal(unit))
            drawn.append(ratio)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    _log_scale_if_positive(ax, *drawn)
    _finish(ax, RATIO_TITLE, "ratio")
    if drawn:
        _unit_legend(ax, len(shown))


def plot_weight_norms(ax: Axes, run: RunData, units: Sequence[str] | None = None) -> None:
    """Norm of every unit over steps (it settles at equilibrium too)."""
    shown = list(run.units if units is None else units)
    drawn = False
    for unit in shown:
        norm = run.weight_norm(unit)
        if norm is not None and len(norm):
            _line(ax, norm, color=_unit_color(run, unit), label=literal(unit))
            drawn = True
    _finish(ax, WEIGHT_NORM_TITLE, "|w|")
    if drawn:
        _unit_legend(ax, len(shown))


def plot_learning_rates(ax: Axes, run: RunData) -> None:
    """Every learning-rate series of the run (``LearningRateMonitor`` keys or the history's)."""
    shown = {label: values for label, values in run.learning_rates.items() if values.finite()}
    series = list(shown.values())
    for index, (label, values) in enumerate(shown.items()):
        _line(ax, values, color=f"C{index % 10}", label=literal(label))
    _log_scale_if_positive(ax, *series)
    _finish(ax, LEARNING_RATE_TITLE, "lr")
    if series:
        ax.legend(fontsize="small")


def plot_equilibrium_fraction(ax: Axes, run: RunData) -> None:
    """Fraction of units in equilibrium; the first step at which all were is marked."""
    fraction = run.equilibrium_fraction()
    if fraction is not None and len(fraction):
        ax.step(*_drawable(fraction), where="post", color=_EQUILIBRIUM_COLOR)
        every = np.flatnonzero(np.asarray(fraction.values) >= 1 - 1e-9)
        if every.size:
            step = int(fraction.steps[every[0]])
            ax.axvline(step, color="black", linestyle=":", label=f"all units (step {step})")
            ax.legend(fontsize="small")
    ax.set_ylim(-0.05, 1.05)
    _finish(ax, EQUILIBRIUM_TITLE, "fraction")


# ------------------------------------------------------------------ helpers


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return Figure


def _finish(ax: Axes, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _unit_legend(ax: Axes, count: int) -> None:
    if count <= _LEGEND_INSIDE:
        ax.legend(fontsize="small")
    elif count <= _LEGEND_UNITS:
        ax.legend(fontsize="x-small", ncols=2, framealpha=0.6)


def _line(ax: Axes, series: Series, **kwargs: Any) -> None:
    kwargs.setdefault("marker", "." if len(series) < _MARKER_BELOW else None)
    ax.plot(*_drawable(series), **kwargs)


def _drawable(series: Series, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The steps and values to draw: at ``keep`` (by default the :func:`_envelope`), cleaned."""
    keep = _envelope(series.values) if keep is None else keep
    return np.asarray(series.steps)[keep], _clean(np.asarray(series.values)[keep])


def _clean(values: np.ndarray) -> np.ndarray:
    """A copy with non-finite and absurd values as NaN (gaps in the line).

    Values such as -1e308 and 1e308 on one axis make Matplotlib's axis limits overflow.
    """
    values = np.array(values, np.float64)
    size = np.abs(values)
    with np.errstate(invalid="ignore"):
        values[~((size <= _MAX_DRAWN) & ((size >= 1 / _MAX_DRAWN) | (values == 0)))] = np.nan
    return values


def _envelope(series_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices that keep the shape of a long series: each bucket's minimum and maximum.

    A panel is a few hundred pixels wide: millions of points draw the same picture, slowly (and
    Matplotlib's legend placement scans every one). Done a few hundred buckets at a time, so
    that a long series is not copied whole.
    """
    values = np.asarray(series_values)
    count = len(values)
    if count <= _MAX_POINTS:
        return np.arange(count)
    width = -(-count // (_MAX_POINTS // 2))
    parts = [np.array([0, count - 1])]
    for start in range(0, count, 256 * width):
        chunk = _clean(values[start : start + 256 * width])
        buckets = np.concatenate([chunk, np.full(-len(chunk) % width, np.nan)]).reshape(-1, width)
        blank = np.isnan(buckets)  # an all-NaN bucket keeps one NaN: the gap stays
        base = start + np.arange(len(buckets)) * width
        parts.append(base + np.where(blank, np.inf, buckets).argmin(axis=1))
        parts.append(base + np.where(blank, -np.inf, buckets).argmax(axis=1))
    keep = np.unique(np.concatenate(parts))
    return keep[keep < count]


def _log_scale_if_positive(ax: Axes, *series: Series | None) -> None:
    drawable = (1 / _MAX_DRAWN, _MAX_DRAWN)  # the positive values _clean keeps
    values = [np.asarray(s.values) for s in series if s is not None]
    if any(((v >= drawable[0]) & (v <= drawable[1])).any() for v in values):
        from matplotlib.ticker import LogFormatter

        class PlainLogFormatter(LogFormatter):
            """Label the ticks LogFormatter labels, as plain numbers (0.02, not 2x10^-2)."""

            def __call__(self, x: float, pos: int | None = None) -> str:
                return f"{x:.3g}" if super().__call__(x, pos) else ""

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PlainLogFormatter())
        ax.yaxis.set_minor_formatter(
            PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5))
        )


# Background of a unit panel per regime (regimes without a color are not shaded).
_REGIME_COLORS = {
    "equilibrium": "tab:green",
    "tracking": "tab:olive",
    "relaxing": "tab:orange",
    "lagging": "tab:purple",
    "non_stationary": "tab:red",
    "no_prediction": "tab:gray",
}


def _sampled(series: Series) -> tuple[np.ndarray, np.ndarray]:
    """At most ``_MAX_SPANS`` evenly spaced windows, so that shading stays a few rectangles."""
    steps, values = np.asarray(series.steps), np.asarray(series.values)
    if len(steps) > _MAX_SPANS:
        index = np.linspace(0, len(steps) - 1, _MAX_SPANS).astype(np.int64)
        steps, values = steps[index], values[index]
    return steps, values


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of each run of equal values."""
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    return np.r_[0, change], np.r_[change - 1, len(values) - 1]


def _same(series: Series, other: Series | None) -> bool:
    """Whether two series hold the same values at the same steps (NaN equal to NaN)."""
    if other is None or len(series) != len(other):
        return False
    a, b = np.asarray(series.values, dtype=float), np.asarray(other.values, dtype=float)
    return bool(np.array_equal(a, b, equal_nan=True)) and list(series.steps) == list(other.steps)


def _regime_spans(codes: Series) -> list[tuple[int, int, str]]:
    """Runs of equal regimes as ``(start, end, regime)``; each window covers up to the next."""
    steps, values = _sampled(codes)
    if not len(steps):
        return []
    names = {float(code): name for name, code in REGIME_CODES.items()}
    first, last = _runs(values)
    starts, ends = steps[np.maximum(first - 1, 0)], steps[np.minimum(last + 1, len(steps) - 1)]
    return [
        (int(a), int(b), names.get(float(values[i]), "unknown"))
        for a, b, i in zip(starts, ends, first, strict=True)
    ]


def _spans(flags: Series) -> list[tuple[int, int]]:
    """Step intervals over which the 0/1 ``flags`` are 1 (to the next 0, or the last step)."""
    steps, values = _sampled(flags)
    if not len(steps):
        return []
    on = values >= 0.5
    first, last = _runs(on)
    return [
        (int(steps[a]), int(steps[min(b + 1, len(steps) - 1)]))
        for a, b in zip(first, last, strict=True)
        if on[a]
    ]


def _unit_color(run: RunData, unit: str) -> str:
    index = run.units.index(unit) if unit in run.units else 0
    return f"C{index % 10}"
