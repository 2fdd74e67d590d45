"""Figures of a run's Spherical Motion Dynamics, in the spirit of Wan et al. (2020).

:func:`plot_run` draws, for a run read with :mod:`lightning_sdm.rundata` (a log directory, a
``metrics.csv``, or ``callback.history``), one panel per scale-invariant unit with the measured RMS
angular update against the predicted equilibrium (log scale; with ``granularity="channel"`` the
10th-90th percentile band of the channels), then the ratios of all units, their weight norms, the
learning rate (when logged) and the fraction of units in equilibrium. The first step at which a
unit was in equilibrium is marked by a vertical line, and where the source records the detector's
regimes (``callback.history``, or logs with ``sdm/regime/<unit>``) each unit's panel is shaded by
regime (equilibrium, tracking, relaxing, lagging, non-stationary, no prediction). The panel
functions (:func:`plot_unit`, :func:`plot_ratios`, ...) draw into any Matplotlib ``Axes`` for custom
layouts.

Matplotlib is an optional dependency (``pip install lightning-sdm[plot]``). Figures are built
with :class:`matplotlib.figure.Figure` directly, not through ``pyplot``: nothing is shown and no
global figure state is touched, so it works headless and in threads; in a notebook, display the
returned figure.

Example::

    from lightning_sdm.plot import plot_run

    fig = plot_run(callback.history, path="report.png")      # in-process
    fig = plot_run("lightning_logs/", path="report.png")       # newest run under a log root
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_sdm.rundata import (
    RunData,
    RunDataError,
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


def unit_title(unit: str) -> str:
    """Title of a unit's panel."""
    return f"angular update: {unit}"


def plot_run(
    run: RunData | str | os.PathLike[str] | Sequence[Mapping[str, Any]] | Any,
    *,
    units: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    ncols: int = 2,
    dpi: int = 100,
) -> Figure:
    """Draw the report figure of a run, and save it when ``path`` is given.

    Args:
        run: a :class:`~lightning_sdm.rundata.RunData`, a log directory / event file /
            ``metrics.csv`` (read with :func:`~lightning_sdm.rundata.load_run`), a callback's
            ``history`` list, or the callback itself.
        units: the units to draw a panel for (names or glob patterns); all by default. The
            overview panels always show these units only.
        path: where to save the figure (the format follows the suffix, e.g. ``.png``, ``.pdf``).
        title: the figure title (default: the run's source).
        ncols: panels per row.
        dpi: resolution of the saved figure.

    Returns:
        The Matplotlib figure. Its axes are, in order: one per unit (titled
        :func:`unit_title`), :data:`RATIO_TITLE`, :data:`WEIGHT_NORM_TITLE`, then
        :data:`LEARNING_RATE_TITLE` if a learning rate was logged and :data:`EQUILIBRIUM_TITLE`
        if the equilibrium fraction was.

    Raises:
        ImportError: without matplotlib.
        RunDataError: a source that cannot be read, or ``units`` that match no unit.
    """
    figure_class = _figure_class()
    data = as_run(run)
    selected = select_units(data, units)
    panels: list[tuple[str, Any]] = [
        (unit_title(unit), lambda ax, unit=unit: plot_unit(ax, data, unit)) for unit in selected
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
    figure.suptitle(title if title is not None else f"Spherical Motion Dynamics: {data.source}")
    if path is not None:
        figure.savefig(os.fspath(path), dpi=dpi)
    return figure


def as_run(run: RunData | str | os.PathLike[str] | Sequence[Mapping[str, Any]] | Any) -> RunData:
    """Turn any accepted source into :class:`~lightning_sdm.rundata.RunData`."""
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
    """The run's units matching ``units`` (names or glob patterns), in the run's order."""
    if units is None:
        return list(run.units)
    selected = [u for u in run.units if any(fnmatch.fnmatchcase(u, p) for p in units)]
    if not selected:
        raise RunDataError(f"No unit matches {list(units)}; the run has {run.units}.")
    return selected


# ------------------------------------------------------------------ panels


def plot_unit(ax: Axes, run: RunData, unit: str) -> None:
    """Measured RMS angular update vs the prediction for one unit, equilibrium marked."""
    color = _unit_color(run, unit)
    if run.granularity(unit) == "channel":
        low, high = run.channel_summary(unit, "p10"), run.channel_summary(unit, "p90")
        if low is not None and high is not None and len(low) == len(high):
            ax.fill_between(
                low.steps, low.values, high.values, color=color, alpha=0.2, lw=0,
                label="channels p10-p90",
            )  # fmt: skip
    measured = run.angular_update(unit)
    _line(ax, measured, color=color, label="measured (RMS)")
    theory = run.theory(unit)
    if theory is not None and theory.finite():
        finite = {v for v in theory.values if math.isfinite(v)}
        label = f"theory = {finite.pop():.3g}" if len(finite) == 1 else "theory"
        _line(ax, theory, color="black", linestyle="--", label=label, marker=None)
    regimes = run.regimes(unit)
    if regimes:
        shaded: set[str] = set()
        for start, end, regime in _regime_spans(regimes):
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
            _line(ax, ratio, color=_unit_color(run, unit), label=unit)
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
            _line(ax, norm, color=_unit_color(run, unit), label=unit)
            drawn = True
    _finish(ax, WEIGHT_NORM_TITLE, "|w|")
    if drawn:
        _unit_legend(ax, len(shown))


def plot_learning_rates(ax: Axes, run: RunData) -> None:
    """Every learning-rate series of the run (``LearningRateMonitor`` keys or the history's)."""
    shown = {label: values for label, values in run.learning_rates.items() if values.finite()}
    series = list(shown.values())
    for index, (label, values) in enumerate(shown.items()):
        _line(ax, values, color=f"C{index % 10}", label=label)
    _log_scale_if_positive(ax, *series)
    _finish(ax, LEARNING_RATE_TITLE, "lr")
    if series:
        ax.legend(fontsize="small")


def plot_equilibrium_fraction(ax: Axes, run: RunData) -> None:
    """Fraction of units in equilibrium; the first step at which all were is marked."""
    fraction = run.equilibrium_fraction()
    if fraction is not None and len(fraction):
        ax.step(fraction.steps, fraction.values, where="post", color=_EQUILIBRIUM_COLOR)
        every = next((s for s, v in fraction.items() if v >= 1 - 1e-9), None)
        if every is not None:
            ax.axvline(every, color="black", linestyle=":", label=f"all units (step {every})")
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
    ax.plot(series.steps, series.values, **kwargs)


def _log_scale_if_positive(ax: Axes, *series: Series | None) -> None:
    values = [v for s in series if s is not None for v in s.values]
    if any(math.isfinite(v) and v > 0 for v in values):
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


def _regime_spans(regimes: Sequence[tuple[int, str]]) -> list[tuple[int, int, str]]:
    """Runs of equal regimes as ``(start, end, regime)``; each window covers up to the next."""
    spans: list[tuple[int, int, str]] = []
    for index, (step, regime) in enumerate(regimes):
        end = regimes[index + 1][0] if index + 1 < len(regimes) else step
        if spans and spans[-1][2] == regime:
            spans[-1] = (spans[-1][0], end, regime)
        else:
            previous = regimes[index - 1][0] if index else step
            spans.append((previous, end, regime))
    return spans


def _spans(flags: Series) -> list[tuple[int, int]]:
    """Step intervals over which the 0/1 ``flags`` are 1 (to the next 0, or the last step)."""
    spans, start = [], None
    for step, value in flags.items():
        if value >= 0.5 and start is None:
            start = step
        elif value < 0.5 and start is not None:
            spans.append((start, step))
            start = None
    if start is not None:
        spans.append((start, flags.steps[-1]))
    return spans


def _unit_color(run: RunData, unit: str) -> str:
    index = run.units.index(unit) if unit in run.units else 0
    return f"C{index % 10}"
