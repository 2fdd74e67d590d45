"""Reading what :class:`~lightning_sdm.SphericalDynamicsCallback` recorded, from any source.

Three sources give the same :class:`RunData`:

* ``callback.history`` (in-process, the most complete: it knows when each unit was in
  equilibrium) through :func:`run_from_history`;
* a TensorBoard run directory (``events.out.tfevents.*``, read with TensorBoard's
  ``EventAccumulator``; every scalar is kept, no reservoir sampling) and
* a ``metrics.csv`` written by Lightning's ``CSVLogger``, both through :func:`load_run`, which also
  searches a log root for runs (:func:`find_runs`) and picks the newest one with ``sdm/`` keys.

Units logged with ``granularity="channel"`` carry ``/mean``, ``/std``, ... suffixes instead of one
value; their unit-level RMS angular update is recovered exactly as ``sqrt(mean^2 + std^2)`` (the
RMS over channels of the per-channel RMS, which is what ``history`` holds), and the unit-level
ratio as that RMS over the prediction. TensorBoard stores scalars as float32, so values read from
event files agree with the history to about 1e-7 relative; ``metrics.csv`` holds them exactly.

Logs hold only the overall ``sdm/equilibrium_fraction``, not which unit was in equilibrium: per
unit, :meth:`RunData.equilibrium` is exact for the history (and for a run with one unit), and
otherwise says what the fraction allows (never reached, or reached by all units by a step).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_sdm.records import REGIME_CODES, REGIMES, HistoryRecord, Keys

__all__ = [
    "EquilibriumInfo",
    "RunData",
    "RunDataError",
    "RunLocation",
    "Series",
    "UnitSummary",
    "find_runs",
    "load_run",
    "relative_path",
    "run_from_history",
    "select_run",
]

ANGULAR_UPDATE = Keys.ANGULAR_UPDATE
THEORY = Keys.THEORY
RATIO = Keys.RATIO
WEIGHT_NORM = Keys.WEIGHT_NORM
FRACTION = Keys.FRACTION
# Per-unit 0/1 equilibrium flags: built from ``history``; read from logs that carry them.
IN_EQUILIBRIUM = Keys.IN_EQUILIBRIUM
REGIME = Keys.REGIME

TENSORBOARD = "tensorboard"
CSV = "csv"
HISTORY = "history"

_EVENTS_PREFIX = "events.out.tfevents."
_METRICS_CSV = "metrics.csv"
# LearningRateMonitor logs ``lr-<Optimizer>[/pg<i>]`` and, optionally, momentum / weight decay.
_LR_KEY = re.compile(r"^lr-.*$")
_NOT_LR_SUFFIXES = ("-momentum", "-weight_decay")


class RunDataError(ValueError):
    """A run cannot be found or read, or holds no ``sdm/`` data (the message says which)."""


@dataclass(frozen=True)
class Series:
    """One scalar over training steps, in logging order."""

    steps: tuple[int, ...]
    values: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def last(self) -> float:
        """The last value (NaN for an empty series)."""
        return self.values[-1] if self.values else math.nan

    def items(self) -> Iterator[tuple[int, float]]:
        """``(step, value)`` pairs."""
        return zip(self.steps, self.values, strict=True)

    def finite(self) -> bool:
        """Whether any value is finite."""
        return any(math.isfinite(v) for v in self.values)


@dataclass(frozen=True)
class EquilibriumInfo:
    """When a unit was first in equilibrium, as far as the source tells.

    Attributes:
        step: first step at which the unit was in equilibrium (for ``exact=False``: a step by
            which it was); ``None`` when not reached or unknown.
        exact: the source records this unit's own status (history, per-unit flags, one unit).
        reached: ``True``/``False`` when known, ``None`` when the source cannot tell.
        at_end: whether the unit was in equilibrium in the last window (``None``: unknown).
        text: a short description for summaries: ``"step 40"``, ``"not reached"``, ...
    """

    step: int | None
    exact: bool
    reached: bool | None
    at_end: bool | None
    text: str


@dataclass(frozen=True)
class UnitSummary:
    """The last window of one unit."""

    unit: str
    step: int
    measured: float
    theory: float | None
    ratio: float | None
    weight_norm: float
    granularity: str
    equilibrium: EquilibriumInfo
    regime: str | None = None


@dataclass(frozen=True)
class RunLocation:
    """A run found on disk: a TensorBoard event directory or a ``metrics.csv``."""

    path: Path
    kind: str
    mtime: float

    @property
    def directory(self) -> Path:
        """The run's directory."""
        return self.path if self.kind == TENSORBOARD else self.path.parent


@dataclass
class RunData:
    """The SDM series of one run, with accessors per unit.

    Attributes:
        source: where it was read from (a path, or ``"callback.history"``).
        kind: ``"tensorboard"``, ``"csv"`` or ``"history"``.
        scalars: every series read, by logged key (derived unit-level series of channel units
            included, see the module docstring).
        units: the monitored units, in logging order.
        learning_rates: learning-rate series by label (``lr-SGD`` from ``LearningRateMonitor``,
            or ``lr`` from the history).
    """

    source: str
    kind: str
    scalars: dict[str, Series]
    units: list[str] = field(default_factory=list)
    learning_rates: dict[str, Series] = field(default_factory=dict)

    # -------------------------------------------------------------- per-unit series

    def granularity(self, unit: str) -> str:
        """``"channel"`` when the unit was logged with channel summaries, else ``"layer"``."""
        return "channel" if f"{ANGULAR_UPDATE}{unit}/mean" in self.scalars else "layer"

    def angular_update(self, unit: str) -> Series:
        """Measured RMS angular update per window (rad/step)."""
        return self.scalars[ANGULAR_UPDATE + unit]

    def theory(self, unit: str) -> Series | None:
        """Predicted equilibrium angular update per window, if logged."""
        return self.scalars.get(THEORY + unit)

    def ratio(self, unit: str) -> Series | None:
        """Measured / predicted per window, if logged."""
        return self.scalars.get(RATIO + unit)

    def weight_norm(self, unit: str) -> Series | None:
        """Norm of the unit per window, if logged."""
        return self.scalars.get(WEIGHT_NORM + unit)

    def channel_summary(self, unit: str, statistic: str) -> Series | None:
        """A channel statistic of the angular update (``"p10"``, ``"median"``, ...), if logged."""
        return self.scalars.get(f"{ANGULAR_UPDATE}{unit}/{statistic}")

    def equilibrium_fraction(self) -> Series | None:
        """Fraction of the units in equilibrium per window, if logged."""
        return self.scalars.get(FRACTION)

    def equilibrium_flags(self, unit: str) -> Series | None:
        """Per-window 0/1 equilibrium status of the unit, where the source records it."""
        return self.scalars.get(IN_EQUILIBRIUM + unit)

    def regimes(self, unit: str) -> list[tuple[int, str]]:
        """Per window, the detector's regime of the unit (empty where the source has none)."""
        codes = self.scalars.get(REGIME + unit)
        if codes is None:
            return []
        names = {float(code): name for name, code in REGIME_CODES.items()}
        return [(step, names.get(value, "unknown")) for step, value in codes.items()]

    def equilibrium(self, unit: str) -> EquilibriumInfo:
        """When ``unit`` was first in equilibrium (see :class:`EquilibriumInfo`)."""
        flags = self.equilibrium_flags(unit)
        if flags is None and len(self.units) == 1:
            flags = self.equilibrium_fraction()
        if flags is not None and len(flags):
            first = next((s for s, v in flags.items() if v >= 0.5), None)
            at_end = flags.last >= 0.5
            if first is None:
                return EquilibriumInfo(None, True, False, False, "not reached")
            text = f"step {first}" if at_end else f"step {first} (left it by the end)"
            return EquilibriumInfo(first, True, True, at_end, text)
        fraction = self.equilibrium_fraction()
        if fraction is None or not len(fraction):
            return EquilibriumInfo(None, False, None, None, "unknown (not logged)")
        if not any(v > 0 for v in fraction.values):
            return EquilibriumInfo(None, True, False, False, "not reached")
        every = next((s for s, v in fraction.items() if v >= 1 - 1e-9), None)
        end: bool | None = None  # a fraction strictly between 0 and 1 does not say which
        if fraction.last >= 1 - 1e-9 or fraction.last <= 0:
            end = fraction.last > 0
        if every is not None:
            left = ", none at the end" if end is False else ""
            return EquilibriumInfo(every, False, True, end, f"by step {every} (all units{left})")
        return EquilibriumInfo(
            None, False, None, end, "unknown (the log has the fraction of units only)"
        )

    # -------------------------------------------------------------- summaries

    def summary(self) -> list[UnitSummary]:
        """The last window of every unit, with its equilibrium status."""
        result = []
        for unit in self.units:
            measured = self.angular_update(unit)
            theory, ratio, norm = self.theory(unit), self.ratio(unit), self.weight_norm(unit)
            result.append(
                UnitSummary(
                    unit=unit,
                    step=measured.steps[-1] if len(measured) else -1,
                    measured=measured.last,
                    theory=_finite_or_none(theory.last if theory is not None else math.nan),
                    ratio=_finite_or_none(ratio.last if ratio is not None else math.nan),
                    weight_norm=norm.last if norm is not None else math.nan,
                    granularity=self.granularity(unit),
                    equilibrium=self.equilibrium(unit),
                    regime=regimes[-1][1] if (regimes := self.regimes(unit)) else None,
                )
            )
        return result

    def steps(self) -> tuple[int, int]:
        """First and last step with an SDM window."""
        steps = [s for unit in self.units for s in self.angular_update(unit).steps]
        return (min(steps), max(steps)) if steps else (0, 0)


# ------------------------------------------------------------------ sources


def run_from_history(
    history: Sequence[HistoryRecord | Mapping[str, Any]], source: str = "callback.history"
) -> RunData:
    """Build a :class:`RunData` from ``SphericalDynamicsCallback.history``.

    The series are on the global step (the clock of the logs).

    Args:
        history: the callback's ``history`` (:class:`~lightning_sdm.records.HistoryRecord`
            objects, or their ``as_dict()``).
        source: a label for figure titles.

    Raises:
        RunDataError: if the history is empty.

    Example::

        >>> entry = {"global_step": 10, "optimizer_step": 10, "unit": "net.0.weight",
        ...          "angular_update": 0.0195, "theory": 0.0205, "ratio": 0.951,
        ...          "weight_norm": 3.2, "lr": 0.1, "in_equilibrium": True}
        >>> later = {**entry, "global_step": 20, "optimizer_step": 20, "in_equilibrium": False}
        >>> run = run_from_history([entry, later])
        >>> run.units, run.angular_update("net.0.weight").steps
        (['net.0.weight'], (10, 20))
        >>> run.equilibrium("net.0.weight").text
        'step 10 (left it by the end)'
    """
    if not history:
        raise RunDataError(
            "The history is empty: no window closed (train for at least `every_n_steps` "
            "optimizer steps)."
        )
    columns: dict[str, tuple[list[int], list[float]]] = {}

    def add(key: str, step: int, value: Any) -> None:
        steps, values = columns.setdefault(key, ([], []))
        steps.append(step)
        values.append(math.nan if value is None else float(value))

    units: list[str] = []
    lrs: dict[str, tuple[list[int], list[float]]] = {}
    status: dict[str, bool] = {}
    for record in history:
        entry = record.as_dict() if isinstance(record, HistoryRecord) else record
        unit, step = str(entry["unit"]), int(entry["global_step"])
        if unit not in units:
            units.append(unit)
        add(ANGULAR_UPDATE + unit, step, entry.get("angular_update"))
        add(THEORY + unit, step, entry.get("theory"))
        add(RATIO + unit, step, entry.get("ratio"))
        add(WEIGHT_NORM + unit, step, entry.get("weight_norm"))
        for name, value in (entry.get("channels") or {}).items():
            add(f"{ANGULAR_UPDATE}{unit}/{name}", step, value)
        add(IN_EQUILIBRIUM + unit, step, bool(entry.get("in_equilibrium")))
        if entry.get("regime") in REGIMES:
            add(REGIME + unit, step, REGIME_CODES[entry["regime"]])
        lr_steps, lr_values = lrs.setdefault(unit, ([], []))
        lr_steps.append(step)
        lr_values.append(float(entry.get("lr", math.nan)))
        # All units of a window share its step: the fraction after the last unit of the step.
        status[unit] = bool(entry.get("in_equilibrium"))
        fraction_steps, fraction_values = columns.setdefault(FRACTION, ([], []))
        fraction = sum(status.values()) / len(status)
        if fraction_steps and fraction_steps[-1] == step:
            fraction_values[-1] = fraction
        else:
            fraction_steps.append(step)
            fraction_values.append(fraction)
    scalars = {key: Series(tuple(s), tuple(v)) for key, (s, v) in columns.items()}
    return RunData(
        source=source,
        kind=HISTORY,
        scalars=scalars,
        units=units,
        learning_rates=_history_learning_rates(lrs),
    )


def find_runs(root: str | os.PathLike[str]) -> list[RunLocation]:
    """Every run under ``root`` (itself included), newest first.

    A run is a directory with TensorBoard event files, or a ``metrics.csv``. ``root`` may also be
    one event file or one ``metrics.csv``.

    Raises:
        RunDataError: if ``root`` does not exist.
    """
    root_path = Path(root)
    if not root_path.exists():
        raise RunDataError(f"No such file or directory: {root_path}")
    if root_path.is_file():
        if root_path.name.startswith(_EVENTS_PREFIX):
            return [RunLocation(root_path.parent, TENSORBOARD, root_path.stat().st_mtime)]
        if root_path.suffix == ".csv":
            return [RunLocation(root_path, CSV, root_path.stat().st_mtime)]
        raise RunDataError(
            f"{root_path} is neither a TensorBoard event file nor a CSVLogger metrics.csv."
        )
    runs = []
    for directory, dirnames, filenames in os.walk(root_path):
        dirnames.sort()
        events = [name for name in filenames if name.startswith(_EVENTS_PREFIX)]
        if events:
            mtime = max(Path(directory, name).stat().st_mtime for name in events)
            runs.append(RunLocation(Path(directory), TENSORBOARD, mtime))
        if _METRICS_CSV in filenames:
            csv_path = Path(directory, _METRICS_CSV)
            runs.append(RunLocation(csv_path, CSV, csv_path.stat().st_mtime))
    runs.sort(key=lambda run: run.mtime, reverse=True)
    return runs


def load_run(path: str | os.PathLike[str] | RunLocation, run: str | None = None) -> RunData:
    """Read the SDM series of a run from a log directory, an event file or a ``metrics.csv``.

    Args:
        path: a run directory, a log root to search (subdirectories included), a TensorBoard
            event file, a ``metrics.csv``, or a :class:`RunLocation` from :func:`find_runs`.
        run: which run under a log root: a path relative to it, or a substring that matches one
            run's path. By default the newest run that holds ``sdm/`` keys.

    Raises:
        RunDataError: no such path, no run, an ambiguous ``run``, or no ``sdm/`` data.
        ImportError: TensorBoard event files without the ``tensorboard`` package.
    """
    if isinstance(path, RunLocation):
        return _read(path)
    candidates = find_runs(path)
    if not candidates:
        raise RunDataError(
            f"No TensorBoard event files (events.out.tfevents.*) or CSVLogger metrics.csv "
            f"under {path}."
        )
    if run is not None:
        return _read(select_run(candidates, path, run))
    empty: list[str] = []
    for candidate in candidates:
        data = _read(candidate, require_sdm=False)
        if data.units:
            return data
        empty.append(str(candidate.path))
    raise RunDataError(
        f"No sdm/ keys in the runs under {path} ({', '.join(empty)}): were they written with "
        "SphericalDynamicsCallback among the Trainer's callbacks, and did a window close "
        "(at least `every_n_steps` optimizer steps)?"
    )


def select_run(
    candidates: Sequence[RunLocation], root: str | os.PathLike[str], run: str
) -> RunLocation:
    """The candidate named by ``run`` (a path relative to ``root``, absolute, or a substring)."""
    root_path = Path(root)
    wanted = Path(run) if Path(run).is_absolute() else root_path / run
    for candidate in candidates:
        if wanted.resolve() in (candidate.path.resolve(), candidate.directory.resolve()):
            return candidate
    matches = [c for c in candidates if run in relative_path(c.path, root_path)]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(relative_path(c.path, root_path) for c in candidates)
    if not matches:
        raise RunDataError(f"No run {run!r} under {root_path}; runs found: {listing}.")
    raise RunDataError(f"{run!r} matches several runs under {root_path}: {listing}.")


def relative_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when it is inside it (``"."`` for ``root`` itself)."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------ readers


def _read(location: RunLocation, require_sdm: bool = True) -> RunData:
    if location.kind == TENSORBOARD:
        raw = _read_tensorboard(location.path)
    else:
        raw = _read_csv(location.path)
    data = _from_scalars(str(location.path), location.kind, raw)
    if require_sdm and not data.units:
        raise RunDataError(
            f"No sdm/ keys in {location.path}: was it written with SphericalDynamicsCallback "
            "among the Trainer's callbacks, and did a window close?"
        )
    return data


def _read_tensorboard(directory: Path) -> dict[str, Series]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import (
            SCALARS,
            EventAccumulator,
        )
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading TensorBoard event files needs the `tensorboard` package: "
            "pip install lightning-sdm[tensorboard]"
        ) from err
    # size_guidance 0: keep every event (the default keeps a 10,000-point random sample).
    accumulator = EventAccumulator(str(directory), size_guidance={SCALARS: 0})
    try:
        accumulator.Reload()
    except Exception as err:
        raise RunDataError(f"Cannot read the TensorBoard events in {directory}: {err}") from err
    scalars = {}
    for tag in accumulator.Tags().get("scalars", []):
        events = accumulator.Scalars(tag)
        scalars[tag] = Series(
            tuple(int(e.step) for e in events), tuple(float(e.value) for e in events)
        )
    return scalars


def _read_csv(path: Path) -> dict[str, Series]:
    columns: dict[str, tuple[list[int], list[float]]] = {}
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                step_text = row.get("step") or ""
                if not step_text:
                    continue
                step = int(float(step_text))
                for key, text in row.items():
                    if key in (None, "step") or text in (None, ""):
                        continue
                    steps, values = columns.setdefault(str(key), ([], []))
                    steps.append(step)
                    values.append(float(text))
    except (OSError, ValueError, csv.Error) as err:
        raise RunDataError(f"Cannot read {path}: {err}") from err
    return {key: Series(tuple(s), tuple(v)) for key, (s, v) in columns.items()}


def _from_scalars(source: str, kind: str, raw: Mapping[str, Series]) -> RunData:
    scalars = dict(raw)
    units: list[str] = []
    for key in raw:
        if not key.startswith(ANGULAR_UPDATE):
            continue
        unit = Keys.unit_of(key, ANGULAR_UPDATE)
        if unit not in units:
            units.append(unit)
    if kind == CSV:
        # CSVLogger sorts its columns by name: natural order puts layer2 before layer10.
        units.sort(key=_natural_key)
    for unit in units:
        if ANGULAR_UPDATE + unit in scalars:
            continue
        mean, std = (
            scalars.get(f"{ANGULAR_UPDATE}{unit}/mean"),
            scalars.get(f"{ANGULAR_UPDATE}{unit}/std"),
        )
        if mean is None or std is None:
            scalars[ANGULAR_UPDATE + unit] = scalars.get(
                f"{ANGULAR_UPDATE}{unit}/median", Series((), ())
            )
            continue
        # Population std over channels: mean^2 + std^2 is the mean square.
        rms = _combine(mean, std, lambda m, s: math.sqrt(m * m + s * s))
        scalars[ANGULAR_UPDATE + unit] = rms
        theory = scalars.get(THEORY + unit)
        if theory is not None:
            scalars[RATIO + unit] = _combine(rms, theory, _safe_ratio)
    lrs = {
        key: series
        for key, series in raw.items()
        if _LR_KEY.match(key) and not key.endswith(_NOT_LR_SUFFIXES)
    }
    return RunData(source=source, kind=kind, scalars=scalars, units=units, learning_rates=lrs)


def _history_learning_rates(lrs: Mapping[str, tuple[list[int], list[float]]]) -> dict[str, Series]:
    series = {unit: Series(tuple(s), tuple(v)) for unit, (s, v) in lrs.items()}
    distinct: dict[Series, list[str]] = {}
    for unit, values in series.items():
        distinct.setdefault(values, []).append(unit)
    if len(distinct) == 1:
        return {"lr": next(iter(distinct))}
    return {f"lr ({', '.join(units)})": values for values, units in distinct.items()}


def _combine(a: Series, b: Series, fn: Callable[[float, float], float]) -> Series:
    """``fn(a, b)`` at the steps both series have (each step's last value)."""
    other = dict(b.items())
    pairs = [(s, fn(v, other[s])) for s, v in a.items() if s in other]
    return Series(tuple(s for s, _ in pairs), tuple(v for _, v in pairs))


def _safe_ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(b) else math.nan


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _natural_key(text: str) -> list[Any]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text)]
