"""Reading what :class:`~lightning_sdm.SphericalDynamicsCallback` recorded, from any source.

Four sources give the same :class:`RunData`:

* ``callback.history`` (in-process, the most complete: it knows when each unit was in
  equilibrium) through :func:`run_from_history`;
* a TensorBoard run directory (``events.out.tfevents.*``, read with TensorBoard's
  ``EventAccumulator``; every scalar is kept, no reservoir sampling) and
* a ``metrics.csv`` written by Lightning's ``CSVLogger`` and
* a Weights & Biases run directory, offline or synced (its ``run-<id>.wandb`` transaction log,
  read from the file with the ``wandb`` package's protobuf classes, no network: see
  ``_wandb``), all three through :func:`load_run`, which also searches a log root (a ``wandb/``
  directory included) for runs (:func:`find_runs`) and picks the newest one with ``sdm/`` keys.

Units logged with ``granularity="channel"`` carry ``/mean``, ``/std``, ... suffixes instead of one
value; their unit-level RMS angular update is recovered exactly as ``sqrt(mean^2 + std^2)`` (the
RMS over channels of the per-channel RMS, which is what ``history`` holds), and the unit-level
ratio as that RMS over the prediction. TensorBoard stores scalars as float32, so values read from
event files agree with the history to about 1e-7 relative; ``metrics.csv`` and W&B hold them
exactly.

Logs hold only the overall ``sdm/equilibrium_fraction``, not which unit was in equilibrium: per
unit, :meth:`RunData.equilibrium` is exact for the history (and for a run with one unit), and
otherwise says what the fraction allows (never reached, or reached by all units by a step).

Logs are read defensively (a :class:`RunDataWarning` says what was skipped): only regular files
are opened; ``metrics.csv`` is parsed in blocks into arrays (by pandas' C parser for large files,
when installed), without rows whose ``step`` is not a whole number from 0 to 2^53; a damaged event
file (TensorBoard's reader stops silently at a bad record) is reported with the step it ends at.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import math
import os
import re
import stat
import warnings
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from lightning_sdm.keys import HPARAMS_RUN, REGIME_CODES, Keys
from lightning_sdm.records import REGIMES, HistoryRecord

__all__ = [
    "EquilibriumInfo",
    "RunData",
    "RunDataError",
    "RunDataWarning",
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
WANDB = "wandb"
HISTORY = "history"

_REGIME_NAMES = {float(code): name for name, code in REGIME_CODES.items()}
_EVENTS_PREFIX = "events.out.tfevents."
_METRICS_CSV = "metrics.csv"
# A W&B run's transaction log, and the history file of runs from wandb releases before 0.18.
_WANDB_LOG = re.compile(r"run-.+\.wandb")
_WANDB_HISTORY = "wandb-history.jsonl"
# LearningRateMonitor logs ``lr-<Optimizer>[/pg<i>]`` and, optionally, momentum / weight decay.
_LR_KEY = re.compile(r"^lr-.*$")
_NOT_LR_SUFFIXES = ("-momentum", "-weight_decay")
# A CSVLogger line is a few KB even with thousands of units: a longer one is not a metrics log.
_MAX_LINE = 8 << 20
_BLOCK = 4 << 20  # metrics.csv is parsed in blocks of whole lines of about this size
_PANDAS_FROM = 16 << 20  # pandas' C parser (when installed) for files from this size
_MAX_STEP = 2**53  # steps are stored as float in the file: beyond this they are not exact
# A cell that parses to -0.0: the fast parser uses -0 to stand for logged NaN (see _parse_fast).
_NEGATIVE_ZERO = re.compile(rb"-(?:0+\.?0*|\.0+)(?:[eE][-+]?[0-9]+)?(?=[,\r\n]|\Z)")
# What a path that is not a regular file is, by the first letter of `ls -l` (stat.filemode).
_FILE_TYPES = {"d": "a directory", "p": "a FIFO", "c": "a character device", "s": "a socket"}


class RunDataError(ValueError):
    """A run cannot be found or read, or holds no ``sdm/`` data (the message says which)."""


class RunDataWarning(UserWarning):
    """Part of a log was skipped or is damaged; what was readable is used (the message says)."""


@dataclass(frozen=True)
class Series:
    """One scalar over training steps, in logging order.

    ``steps`` and ``values`` are ``array("q")`` and ``array("d")`` (sequences given are converted):
    16 MB per 2,000,000 values, not the 70 MB of tuples. Read-only: series may share their steps.
    """

    steps: Sequence[int] | np.ndarray
    values: Sequence[float] | np.ndarray

    def __post_init__(self) -> None:
        for name, typecode, dtype in (("steps", "q", np.int64), ("values", "d", np.float64)):
            data = getattr(self, name)
            if not (isinstance(data, array) and data.typecode == typecode):
                # Through numpy: 2,000,000 values one by one into an array take a second.
                object.__setattr__(self, name, array(typecode, np.asarray(data, dtype).tobytes()))
        if len(self.steps) != len(self.values):
            raise ValueError(f"{len(self.steps)} steps but {len(self.values)} values")

    def __len__(self) -> int:
        return len(self.steps)

    def __hash__(self) -> int:  # by the steps: NaN values hash by identity
        return hash((len(self.steps), tuple(self.steps[:4]), tuple(self.steps[-4:])))

    @property
    def last(self) -> float:
        """The last value (NaN for an empty series)."""
        return self.values[-1] if len(self.values) else math.nan

    def items(self) -> Iterator[tuple[int, float]]:
        """``(step, value)`` pairs."""
        return zip(self.steps, self.values, strict=True)

    def finite(self) -> bool:
        """Whether any value is finite."""
        return bool(np.isfinite(np.asarray(self.values)).any())


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
    #: The radial balance of the last window (``None`` where not logged or NaN).
    balance: float | None = None


@dataclass(frozen=True)
class RunLocation:
    """A run found on disk: a TensorBoard event directory, a ``metrics.csv`` or a W&B run."""

    path: Path
    kind: str
    mtime: float
    #: The files read: the event files, the ``metrics.csv`` or the W&B run's log (empty: listed
    #: when read).
    files: tuple[Path, ...] = ()

    @property
    def directory(self) -> Path:
        """The run's directory."""
        return self.path if self.kind in (TENSORBOARD, WANDB) else self.path.parent


@dataclass
class RunData:
    """The SDM series of one run, with accessors per unit.

    Attributes:
        source: where it was read from (a path, or ``"callback.history"``).
        kind: ``"tensorboard"``, ``"csv"``, ``"wandb"`` or ``"history"``.
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

    def trajectory(self, unit: str) -> Series | None:
        """The angle the norm balance predicted per window under the real schedule, if logged."""
        return self.scalars.get(Keys.TRAJECTORY + unit)

    def balance(self, unit: str) -> Series | None:
        """The radial balance per window (the angle a settled norm gives), if logged."""
        return self.scalars.get(Keys.BALANCE + unit)

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
        return [(s, _REGIME_NAMES.get(v, "unknown")) for s, v in codes.items()] if codes else []

    def equilibrium(self, unit: str) -> EquilibriumInfo:
        """When ``unit`` was first in equilibrium (see :class:`EquilibriumInfo`)."""
        flags = self.equilibrium_flags(unit)
        if flags is None and len(self.units) == 1:
            flags = self.equilibrium_fraction()
        if flags is not None and len(flags):
            first = _first_step(flags, np.asarray(flags.values) >= 0.5)
            at_end = flags.last >= 0.5
            if first is None:
                return EquilibriumInfo(None, True, False, False, "not reached")
            text = f"step {first}" if at_end else f"step {first} (left it by the end)"
            return EquilibriumInfo(first, True, True, at_end, text)
        fraction = self.equilibrium_fraction()
        if fraction is None or not len(fraction):
            return EquilibriumInfo(None, False, None, None, "unknown (not logged)")
        if not (np.asarray(fraction.values) > 0).any():
            return EquilibriumInfo(None, True, False, False, "not reached")
        every = _first_step(fraction, np.asarray(fraction.values) >= 1 - 1e-9)
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
            codes = self.scalars.get(REGIME + unit)
            result.append(
                UnitSummary(
                    unit=unit,
                    step=measured.steps[-1] if len(measured) else -1,
                    measured=measured.last,
                    # NaN (no value) is None; an infinite value is shown as such.
                    theory=None if theory is None or math.isnan(theory.last) else theory.last,
                    ratio=None if ratio is None or math.isnan(ratio.last) else ratio.last,
                    weight_norm=norm.last if norm is not None else math.nan,
                    granularity=self.granularity(unit),
                    equilibrium=self.equilibrium(unit),
                    regime=_REGIME_NAMES.get(codes.last, "unknown") if codes else None,
                    balance=_last(self.balance(unit)),
                )
            )
        return result

    def steps(self) -> tuple[int, int]:
        """First and last step with an SDM window."""
        steps = [np.asarray(s.steps) for u in self.units if len(s := self.angular_update(u))]
        return (int(min(map(np.min, steps))), int(max(map(np.max, steps)))) if steps else (0, 0)


def _last(series: Series | None) -> float | None:
    """The last value of a series, ``None`` where there is none or it is NaN."""
    return None if series is None or not len(series) or math.isnan(series.last) else series.last


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
        >>> run.units, list(run.angular_update("net.0.weight").steps)
        (['net.0.weight'], [10, 20])
        >>> run.equilibrium("net.0.weight").text
        'step 10 (left it by the end)'
    """
    if not history:
        raise RunDataError(
            "The history is empty: no window closed (train for at least `every_n_steps` "
            "optimizer steps)."
        )
    columns: dict[str, tuple[list[int], list[float]]] = {}

    def add(key: str, step: int, value: Any, into: dict | None = None) -> None:
        steps, values = (columns if into is None else into).setdefault(key, ([], []))
        steps.append(step)
        values.append(math.nan if value is None else float(value))

    units: list[str] = []
    lrs: dict[str, tuple[list[int], list[float]]] = {}
    status: dict[str, bool] = {}
    for index, record in enumerate(history):
        try:  # a dict is read as a record, with its fields checked (a damaged history)
            checked = (
                record if isinstance(record, HistoryRecord) else HistoryRecord.from_dict(record)
            )
        except ValueError as error:
            raise RunDataError(f"history entry {index} cannot be read: {error}") from None
        entry = checked.as_dict()
        unit, step = str(entry["unit"]), int(entry["global_step"])
        if unit not in units:
            units.append(unit)
        add(ANGULAR_UPDATE + unit, step, entry.get("angular_update"))
        add(THEORY + unit, step, entry.get("theory"))
        add(Keys.TRAJECTORY + unit, step, entry.get("trajectory"))
        add(Keys.BALANCE + unit, step, entry.get("balance"))
        add(RATIO + unit, step, entry.get("ratio"))
        add(WEIGHT_NORM + unit, step, entry.get("weight_norm"))
        for name, value in (entry.get("channels") or {}).items():
            add(f"{ANGULAR_UPDATE}{unit}/{name}", step, value)
        add(IN_EQUILIBRIUM + unit, step, bool(entry.get("in_equilibrium")))
        if entry.get("regime") in REGIMES:
            add(REGIME + unit, step, REGIME_CODES[entry["regime"]])
        add(unit, step, entry.get("lr"), into=lrs)
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

    A run is a directory with TensorBoard event files (not a run's ``sdm_hparams``, the callback's
    HParams session), a ``metrics.csv``, or a W&B run directory (with its ``run-<id>.wandb``
    transaction log; or, from ``wandb`` releases before 0.18, ``files/wandb-history.jsonl``);
    ``root`` may be one such file. Given a ``wandb/`` directory, its runs are listed (its
    ``latest-run`` link is not followed: the run is listed once), a resumed run once, with the
    logs of all its directories. Files named like run files that
    are not regular files (FIFOs, devices, broken links) are skipped with a warning.

    Raises:
        RunDataError: if ``root`` does not exist, or is a file but not a regular one.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise RunDataError(
            f"A run is read from a path (str or os.PathLike), got {type(root).__name__}."
        )
    root_path = Path(root)
    if not root_path.exists():
        raise RunDataError(f"No such file or directory: {root_path}")
    if not root_path.is_dir():
        info, what = _stat_regular(root_path)
        event_file = root_path.name.startswith(_EVENTS_PREFIX)
        wandb_file = _is_wandb_file(root_path)
        if info is None or not (event_file or wandb_file or root_path.suffix == ".csv"):
            what = f"{what}, not a regular file" if info is None else "not a run's file"
            raise RunDataError(
                f"{root_path} is {what}: give a log directory, a TensorBoard event file, a "
                "CSVLogger metrics.csv or a W&B run-<id>.wandb."
            )
        kind, path = (CSV, root_path)
        if event_file:
            kind, path = TENSORBOARD, root_path.parent
        elif wandb_file:  # the run directory (wandb-history.jsonl is in its files/)
            kind, path = WANDB, root_path.parent
            path = path.parent if root_path.name == _WANDB_HISTORY else path
        return [RunLocation(path, kind, info.st_mtime, (root_path,))]
    runs = []
    wandb_runs: set[Path] = set()  # W&B run directories with a transaction log
    for directory, dirnames, filenames in os.walk(root_path):
        events, tables, logs = [], [], []
        for name in sorted(filenames):
            wandb_file = _is_wandb_file(Path(directory, name))
            if name != _METRICS_CSV and not name.startswith(_EVENTS_PREFIX) and not wandb_file:
                continue  # other files, broken links included, are none of our business
            path = Path(directory, name)
            info, what = _stat_regular(path)
            if info is None:
                text = f"skipping {path}: it is {what}, not a regular file"
                warnings.warn(text, RunDataWarning, stacklevel=2)
            elif name == _METRICS_CSV:
                tables.append(RunLocation(path, CSV, info.st_mtime, (path,)))
            elif wandb_file:
                logs.append((path, info.st_mtime))
            else:
                events.append((path, info.st_mtime))
        if logs and logs[0][0].name == _WANDB_HISTORY:  # an old client's run: not if it has a log
            run_dir = Path(directory).parent
            if run_dir not in wandb_runs:
                runs.append(RunLocation(run_dir, WANDB, logs[0][1], (logs[0][0],)))
        elif logs:
            wandb_runs.add(Path(directory))
            files = tuple(path for path, _ in logs)
            runs.append(RunLocation(Path(directory), WANDB, max(m for _, m in logs), files))
        dirnames[:] = sorted(d for d in dirnames if not (events and d == HPARAMS_RUN))  # ours
        if events:
            files = tuple(path for path, _ in events)
            runs.append(RunLocation(Path(directory), TENSORBOARD, max(m for _, m in events), files))
        runs += tables
    runs = _join_resumed(runs)
    runs.sort(key=lambda run: run.mtime, reverse=True)
    return runs


def _join_resumed(runs: list[RunLocation]) -> list[RunLocation]:
    """One location per W&B run: a resumed run writes a directory per resumption.

    They sit side by side (``wandb/run-<time>-<id>/run-<id>.wandb``, same ``<id>``): joined into
    the newest directory's location, their logs in the order they were written.
    """
    groups: dict[tuple[Path, str], list[RunLocation]] = {}
    kept: list[RunLocation] = []
    for run in runs:
        if run.kind == WANDB and len(run.files) == 1 and run.files[0].name != _WANDB_HISTORY:
            groups.setdefault((run.path.parent, run.files[0].name), []).append(run)
        else:
            kept.append(run)
    for parts in groups.values():
        parts.sort(key=lambda run: (run.mtime, run.path.name))
        files = tuple(run.files[0] for run in parts)
        kept.append(RunLocation(parts[-1].path, WANDB, parts[-1].mtime, files))
    return kept


def load_run(path: str | os.PathLike[str] | RunLocation, run: str | None = None) -> RunData:
    """Read the SDM series of a run from a log directory, an event file, a ``metrics.csv`` or W&B.

    Args:
        path: a run directory (a W&B one included), a log root to search (subdirectories
            included: a ``wandb/`` directory too), a TensorBoard event file, a ``metrics.csv``, a
            W&B ``run-<id>.wandb``, or a :class:`RunLocation` from :func:`find_runs`.
        run: which run under a log root: a path relative to it, or a substring that matches one
            run's path. By default the newest run that holds ``sdm/`` keys.

    Raises:
        RunDataError: no such path, no run, an ambiguous ``run``, or no ``sdm/`` data.
        ImportError: TensorBoard event files without the ``tensorboard`` package, or a W&B run
            without the ``wandb`` package (whose protobuf classes decode its log).
    """
    if isinstance(path, RunLocation):
        return _read(path)
    candidates = find_runs(path)
    if not candidates:
        raise RunDataError(
            f"No TensorBoard event files (events.out.tfevents.*), CSVLogger metrics.csv or W&B "
            f"run (run-<id>.wandb) under {path}."
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
    if location.kind == WANDB:
        raw = _read_wandb(location)
    elif location.kind == TENSORBOARD:
        raw = _read_tensorboard(location)
    else:
        raw = _read_csv(location.path)
    data = _from_scalars(str(location.path), location.kind, raw)
    if require_sdm and not data.units:
        raise RunDataError(
            f"No sdm/ keys in {location.path}: was it written with SphericalDynamicsCallback "
            "among the Trainer's callbacks, and did a window close?"
        )
    return data


def _is_wandb_file(path: Path) -> bool:
    """A W&B run's transaction log, or an old client's ``files/wandb-history.jsonl``."""
    if path.name == _WANDB_HISTORY:
        return path.parent.name == "files"
    return _WANDB_LOG.fullmatch(path.name) is not None


def _read_wandb(location: RunLocation) -> dict[str, Series]:
    # Imported here: the module is only needed, like the `wandb` package it uses, for W&B runs.
    from lightning_sdm.report._wandb import read_wandb

    files = location.files or tuple(sorted(location.path.glob("run-*.wandb")))
    parts: dict[str, list[Series]] = {}
    for path in files:
        for key, series in read_wandb(path).items():
            parts.setdefault(key, []).append(series)
    merged = {}
    for key, pieces in parts.items():
        if len(pieces) == 1:
            merged[key] = pieces[0]
            continue
        # A resumed run (one log per resumption, in the order written): in step order, the
        # later of two values of a step last (a resumption from an earlier checkpoint logs
        # steps again), as for a metrics.csv.
        steps = np.concatenate([np.asarray(piece.steps) for piece in pieces])
        values = np.concatenate([np.asarray(piece.values) for piece in pieces])
        order = np.argsort(steps, kind="stable")
        merged[key] = Series(steps[order], values[order])
    return merged


def _stat_regular(path: Path) -> tuple[os.stat_result | None, str]:
    """``os.stat`` of a regular file (links followed), else ``None`` and what the path is."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None, "a broken symbolic link" if os.path.islink(path) else "missing"
    except OSError as err:
        return None, f"unreadable ({err.strerror or err})"
    if stat.S_ISREG(info.st_mode):
        return info, ""
    what = _FILE_TYPES.get(stat.filemode(info.st_mode)[0], "a device or special file")
    return None, f"{what} (via a link to {os.path.realpath(path)})" if path.is_symlink() else what


def _open_regular(path: Path) -> IO[bytes]:
    """Open a regular file; FIFOs and devices are refused unopened (a FIFO would block)."""
    info, what = _stat_regular(path)
    if info is None:
        raise RunDataError(f"Cannot read {path}: it is {what}, not a regular file.")
    # O_NONBLOCK: should the path become a FIFO after the check, opening it does not hang.
    return os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")


def _read_tensorboard(location: RunLocation) -> dict[str, Series]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading TensorBoard event files needs the `tensorboard` package: "
            "pip install lightning-sdm[tensorboard]"
        ) from err
    files = location.files or tuple(sorted(location.path.glob(_EVENTS_PREFIX + "*")))
    merged: dict[str, tuple[array[int], array[float]]] = {}
    # One file at a time (in name order, as TensorBoard does): only regular files are opened,
    # and damage is told per file.
    for path in (f for f in files if _stat_regular(f)[0] is not None):
        # size_guidance 0: keep every event (the default keeps a 10,000-point random sample).
        accumulator = EventAccumulator(str(path), size_guidance={SCALARS: 0})
        losses, ends = _reload(accumulator, path), []
        for tag in accumulator.Tags().get("scalars", []):
            steps, values = merged.setdefault(tag, (array("q"), array("d")))
            events = accumulator.Scalars(tag)
            steps.extend(e.step for e in events)
            values.extend(e.value for e in events)
            ends += [e.step for e in events[-1:]]
        if losses:
            what = "a record fails its checksum" if "crc" in str(losses[0]).lower() else "truncated"
            end = f"its data end at step {max(ends)}" if ends else "no step is readable"
            text = f"{path}: the event file is damaged ({what}): {end}; the report shows the rest"
            warnings.warn(text, RunDataWarning, stacklevel=3)
    return {tag: Series(steps, values) for tag, (steps, values) in merged.items()}


def _reload(accumulator: Any, path: Path) -> list[Exception]:
    """``accumulator.Reload()``, and the read errors TensorBoard's loader swallowed.

    At a truncated record or a failed checksum it logs a ``DataLossError`` at DEBUG and stops
    reading the file, which would look like a shorter run: a filter on its logger catches it.
    """
    logger = logging.getLogger("tensorboard")
    threshold, level, found = logger.getEffectiveLevel(), logger.level, list[Exception]()

    def catch(record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        found.extend(a for a in args if isinstance(a, Exception) and "DataLoss" in type(a).__name__)
        return record.levelno >= threshold  # what the user's logging set-up lets through

    logger.addFilter(catch)
    logger.setLevel(logging.DEBUG)
    try:
        accumulator.Reload()
    except Exception as err:
        raise RunDataError(f"Cannot read the TensorBoard events in {path}: {err}") from err
    finally:
        logger.setLevel(level)
        logger.removeFilter(catch)
    return found


def _read_csv(path: Path) -> dict[str, Series]:
    table: _Columns | None = None
    try:
        with _open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            use_pandas = size >= _PANDAS_FROM and importlib.util.find_spec("pandas") is not None
            line = 1
            while block := handle.read(_BLOCK):  # parsed in blocks of whole lines
                tail = handle.readline(_MAX_LINE)
                if len(tail) >= _MAX_LINE and not tail.endswith(b"\n"):
                    long = line + block.count(b"\n")
                    raise RunDataError(
                        f"Cannot read {path}: line {long} is longer than {_MAX_LINE >> 20} MiB, "
                        "so it is not a CSVLogger metrics.csv."
                    )
                whole = tail.endswith(b"\n") or (not tail and block.endswith(b"\n"))
                block += tail if whole else tail + b"\n"  # the file's last line may have no end
                if table is None:
                    header, _, block = block.partition(b"\n")
                    names = next(csv.reader([header.decode("utf-8-sig")]), [])
                    if "step" not in names:
                        return {}
                    table, line = _Columns(names, path, use_pandas), 2
                line += table.add(block, line)
    except RunDataError:
        raise
    except (OSError, ValueError, csv.Error) as err:  # ValueError: a cell that is not a number
        raise RunDataError(f"Cannot read {path}: {err}") from err
    return table.series() if table is not None else {}


class _Columns:
    """The columns of a ``metrics.csv``, built block by block into arrays.

    Rows without a step are dropped (``CSVLogger`` writes none), rows whose step is not a whole
    number from 0 to 2^53 are counted too. Columns present in every row share one steps array.
    """

    def __init__(self, header: list[str], path: Path, use_pandas: bool) -> None:
        self.header, self.path, self.use_pandas = header, path, use_pandas
        self.step_column = len(header) - 1 - header[::-1].index("step")
        self.steps: array[int] = array("q")
        self.values: list[array[float]] = [array("d") for _ in header]
        self.present: dict[int, array[int]] = {}  # per column, row by row: has it a value
        self.skipped, self.first_skipped = 0, ""
        self.others = [column for column in range(len(header)) if column != self.step_column]

    def add(self, block: bytes, line: int) -> int:
        """Parse a block of whole lines from line number ``line``; returns its number of lines."""
        if not (rows := block.count(b"\n")):
            return 0
        parsed = _parse_fast(block, rows, len(self.header), line) if self.use_pandas else None
        matrix, missing, lines = parsed or _parse_rows(block, len(self.header), line)
        step, have = matrix[:, self.step_column], ~missing[:, self.step_column]
        with np.errstate(invalid="ignore"):
            ok = have & (step >= 0) & (step <= _MAX_STEP) & (np.floor(step) == step)
        if (bad := have & ~ok).any():
            first = int(np.argmax(bad))
            self.skipped += int(bad.sum())
            self.first_skipped = self.first_skipped or f"{step[first]:g} on line {lines[first]}"
        _extend(self.steps, step[ok].astype(np.int64))
        for column in self.others:
            kept = ~missing[ok, column]
            _extend(self.present.setdefault(column, array("b")), kept.view(np.int8))
            _extend(self.values[column], matrix[ok, column][kept])
        return rows

    def series(self) -> dict[str, Series]:
        """Every column with a value, by name (a later column of the same name wins)."""
        if self.skipped:
            text = f"{self.path}: {self.skipped} rows whose step is not a whole number from 0 "
            text += f"to 2^53 (first: {self.first_skipped})"
            if not len(self.steps):
                raise RunDataError(f"No usable row in {text}: is it a CSVLogger metrics.csv?")
            warnings.warn(f"skipped {text}", RunDataWarning, stacklevel=3)
        names = [self.header[column] for column in self.others]
        twice = sorted({name for name in names if names.count(name) > 1 and name})
        if twice:
            warnings.warn(
                f"{self.path}: the column(s) {twice} appear more than once; the last one of each "
                "is read",
                RunDataWarning,
                stacklevel=3,
            )
        steps_all = np.asarray(self.steps)
        # CSVLogger writes rows in step order; a resume from an earlier checkpoint appends steps
        # again. Read in step order (stable: the later of two rows of a step stays last).
        order = (
            None
            if np.all(steps_all[1:] >= steps_all[:-1])
            else np.argsort(steps_all, kind="stable")
        )
        result = {}
        for column in self.others:
            if column not in self.present:  # no row at all (a header only: killed before a flush)
                continue
            values, present = self.values[column], np.asarray(self.present.pop(column), bool)
            if not len(values):
                continue
            if order is None:
                steps = self.steps if present.all() else steps_all[present]
                result[self.header[column]] = Series(steps, values)
                continue
            # Values of this column, in the rows where it is present; reorder those rows.
            rows = np.flatnonzero(present)
            kept = np.argsort(steps_all[rows], kind="stable")
            result[self.header[column]] = Series(
                steps_all[rows][kept], np.asarray(values, np.float64)[kept]
            )
        return result


def _extend(target: array[Any], data: np.ndarray) -> None:
    target.frombytes(np.ascontiguousarray(data).data.cast("B"))


def _parse_fast(block: bytes, rows: int, columns: int, line: int) -> tuple[np.ndarray, ...] | None:
    """Values, missing-cell mask and line numbers of a block, with pandas' C parser, or ``None``.

    Empty cells come back as NaN, so logged ``nan`` cells are first written as ``-0``. ``None`` (the
    row-by-row parser takes over) for quotes, blank or long lines, a ``-0`` cell, or non-numbers.
    """
    import pandas as pd

    nans = b"n" in block or b"N" in block  # nan / inf cells
    if b'"' in block or (nans and _NEGATIVE_ZERO.search(block)):
        return None
    text = block.replace(b"nan", b"-0") if nans else block
    try:
        frame = pd.read_csv(io.BytesIO(text), header=None, dtype=np.float64, engine="c",
                            keep_default_na=False, na_values=[""])  # fmt: skip
    except ValueError:  # pandas' ParserError included
        return None
    # Blank lines are skipped and a long first line widens the frame: the shape tells.
    if frame.shape != (rows, columns):
        return None
    matrix = frame.to_numpy(np.float64, copy=True)
    missing = np.isnan(matrix)
    if nans:
        matrix[(matrix == 0) & np.signbit(matrix)] = math.nan
    return matrix, missing, np.arange(line, line + rows)


def _parse_rows(block: bytes, width: int, line: int) -> tuple[np.ndarray, ...]:
    """Values, missing-cell mask and line numbers of a block, row by row with the csv module.

    As ``csv.DictReader`` reads: blank lines skipped, a short row's missing cells empty, extra ones
    ignored. A cell that is not a number raises ``ValueError``.
    """
    cells: list[str] = []
    lines: list[int] = []
    reader = csv.reader(io.StringIO(block.decode("utf-8"), newline=""))
    for row in reader:
        if row:
            lines.append(line + reader.line_num - 1)
            cells += (row + [""] * width)[:width]
    values = np.fromiter((float(cell) if cell else 0.0 for cell in cells), np.float64, len(cells))
    missing = np.fromiter((not cell for cell in cells), bool, len(cells))
    return values.reshape(-1, width), missing.reshape(-1, width), np.array(lines, np.int64)


def _from_scalars(source: str, kind: str, raw: Mapping[str, Series]) -> RunData:
    raw = {plain: raw[key] for key, plain in Keys.without_logger_prefix(raw).items()}
    scalars = dict(raw)
    units: list[str] = []
    for key in raw:
        if not key.startswith(ANGULAR_UPDATE):
            continue
        unit = Keys.unit_of(key, ANGULAR_UPDATE)
        if unit not in units:
            units.append(unit)
    if kind in (CSV, WANDB):
        # CSVLogger sorts its columns by name, W&B's rows hold no order: natural order puts
        # layer2 before layer10.
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
        rms = _combine(mean, std, lambda m, s: np.sqrt(m * m + s * s))
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
    distinct: dict[bytes, tuple[Series, list[str]]] = {}
    for unit, (steps, values) in lrs.items():
        series = Series(steps, values)
        # By bytes: equal NaN learning rates (none logged) are one series, not one per unit.
        key = np.asarray(series.steps).tobytes() + np.asarray(series.values).tobytes()
        distinct.setdefault(key, (series, []))[1].append(unit)
    if len(distinct) == 1:
        return {"lr": next(iter(distinct.values()))[0]}
    return {f"lr ({', '.join(units)})": series for series, units in distinct.values()}


def _combine(a: Series, b: Series, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Series:
    """``fn(a, b)`` at the steps both series have (``b``'s last value at each step)."""
    sa, sb, va, vb = (np.asarray(x) for x in (a.steps, b.steps, a.values, b.values))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if sa.shape == sb.shape and (sa == sb).all() and (np.diff(sb) > 0).all():
            return Series(a.steps, fn(va, vb))  # the usual case: one row per window, shared
        order = np.argsort(sb, kind="stable")
        last = order[np.r_[sb[order][1:] != sb[order][:-1], True]] if len(sb) else order
        pos = np.searchsorted(sb[last], sa).clip(0, max(len(last) - 1, 0))
        found = (sb[last][pos] == sa) if len(last) else np.zeros(len(sa), bool)
        return Series(sa[found], fn(va[found], vb[last[pos[found]]]))


def _safe_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where((b != 0) & np.isfinite(b), a / b, math.nan)


def _first_step(series: Series, hits: np.ndarray) -> int | None:
    index = np.flatnonzero(hits)
    return int(series.steps[index[0]]) if index.size else None


def _natural_key(text: str) -> list[Any]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text)]
