"""Logger-specific views of the callback's results (TensorBoard layouts, W&B metrics and tables).

Every Lightning logger already receives the ``sdm/...`` scalars through ``log_metrics``; this
module adds what particular loggers can do beyond scalars. Each function receives the loggers and
plain values (unit names, settings, per-unit results), never the callback, acts on the loggers it
knows and leaves the others alone; the caller calls it on rank zero only. A failure in an
integration is reported once and never interrupts training.

TensorBoard (:class:`~lightning.pytorch.loggers.TensorBoardLogger`), when monitoring starts: a
custom-scalars layout (the "Custom Scalars" dashboard) with

* category ``SDM per unit``: one chart per unit with the measured angular update and the
  prediction; with ``granularity="channel"``, two per unit: a margin chart of the channels'
  median with their 10th-90th percentile band, and the channels' median with the prediction;
* category ``SDM overview``: every unit's ratio measured / predicted with the median ratio, and
  every unit's weight norm.

Weights & Biases (:class:`~lightning.pytorch.loggers.WandbLogger`):

* when monitoring starts: ``define_metric("sdm/*", step_metric=<the logger's step key>)`` (see
  :func:`wandb_step_key`: ``trainer/global_step`` for Lightning's own logger), and the theory's
  inputs in the run config under ``sdm`` (the callback's settings, and per unit the optimizer,
  rule, hyper-parameters, prediction and source);
* at the end of fit: run-summary entries per unit, ``sdm/summary/<unit>/equilibrium_step``
  (-1: never reached), ``final_ratio``, ``final_angular_update``, ``final_theory`` and
  ``final_weight_norm`` (the last window's values; ratio and theory are left out where theory
  gives no prediction), plus ``sdm/summary/equilibrium_fraction``; and a table ``sdm/units`` with
  one row per unit (NaN where there is no value);
* at every logged window: the rows of an incremental table ``sdm/unit_windows`` (one row per
  unit and window, :data:`WINDOW_COLUMNS`; W&B uploads only the new rows);
* at the end of fit, charts: per unit (the first :data:`MAX_CHARTS`), ``sdm/charts/<unit>``,
  a ``wandb.plot.line_series`` of the measured angular update, the prediction and the
  prediction's tolerance band (``prediction * (1 -+ tolerance)``) over the global step, each line
  with its own colour and legend entry; and ``sdm/charts/ratio``, every unit's ratio measured /
  predicted with the band ``1 -+ tolerance``. The report figure of
  :func:`lightning_sdm.report.plot_run` as a ``wandb.Image`` under ``sdm/report`` (with
  matplotlib installed; its first 24 units);
* with ``alerts=True`` on the callback: ``run.alert`` at each equilibrium event, titled with what
  happened (:func:`~lightning_sdm._messages.alert_title`: equilibrium reached, the LR decayed,
  training stopped, or the planned end-of-budget decay), the event's message as text; level WARN
  when the LR changed or training stopped, else INFO.

TensorBoard, the "HParams" dashboard: one experiment per run, in the run itself. At the start
of fit (:func:`on_fit_started`, from the callback's ``on_fit_start``, which Lightning calls just
before its own ``log_hyperparams``), the experiment definition and the session: the module's and
datamodule's hyper-parameters as Lightning writes them (flattened, sanitised), the theory's inputs
of the first optimizer's first param group with weight decay (``sdm/optimizer``, ``sdm/lr``,
``sdm/weight_decay``, ``sdm/momentum``) and the action (``sdm/action``); as metrics
``hp_metric`` (when the logger has ``default_hp_metric``) and :data:`HPARAMS_METRICS`.
TensorBoard keeps the first experiment and session of a run (Lightning's, written right after,
is ignored), so the table is the same after a restart and each run has one row. At the end of
fit, the metrics' values are scalars of the run: ``sdm/hparams/equilibrium_step`` (the step the
last unit reached equilibrium; absent if one never did), ``sdm/hparams/equilibrium_fraction``
and ``sdm/hparams/final_ratio`` (median over the units): runs compare by when they
equilibrated. (Earlier versions wrote the session in a run of its own, :data:`HPARAMS_RUN`;
``lightning-sdm report`` still skips it.)
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from functools import wraps
from typing import Any, TypeVar

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_sdm import _messages
from lightning_sdm.equilibrium._detector import UnitEquilibrium
from lightning_sdm.keys import HPARAMS_RUN, Keys
from lightning_sdm.records import HistoryRecord
from lightning_sdm.theory._predictions import Prediction, predict_param_group

__all__ = [
    "HPARAMS_METRICS",
    "HPARAMS_RUN",
    "MAX_CHARTS",
    "TABLE_COLUMNS",
    "WINDOW_COLUMNS",
    "WANDB_STEP_KEY_ATTRIBUTES",
    "UnitResult",
    "on_monitoring_finished",
    "fit_hparams",
    "on_equilibrium_event",
    "on_fit_started",
    "on_monitoring_started",
    "on_windows_logged",
    "regimes_markdown",
    "tensorboard_layout",
    "unit_results",
    "wandb_chart_series",
    "wandb_step_key",
]


@dataclass(frozen=True)
class UnitResult:
    """The final figures of one unit, for run summaries and tables (NaN where there is none).

    Attributes:
        equilibrium_step: global step at which the unit entered equilibrium (-1: never).
    """

    unit: str
    optimizer: str
    rule: str
    lr: float
    weight_decay: float
    final_angular_update: float
    final_theory: float
    final_ratio: float
    final_weight_norm: float
    in_equilibrium: bool
    equilibrium_step: int
    invariance: str


#: Columns of the W&B table ``sdm/units``.
TABLE_COLUMNS = [f.name for f in fields(UnitResult)]
#: Columns of the incremental W&B table ``sdm/unit_windows`` (fields of ``HistoryRecord``).
WINDOW_COLUMNS = [
    "global_step",
    "unit",
    "angular_update",
    "theory",
    "ratio",
    "weight_norm",
    "lr",
    "in_equilibrium",
    "regime",
]


def unit_results(
    history: Sequence[HistoryRecord],
    predictions: Mapping[str, Prediction],
    states: Mapping[str, UnitEquilibrium],
) -> list[UnitResult]:
    """The final figures per unit: its last history record, prediction and detector verdict.

    Args:
        history: the callback's history (the last record of each unit is used).
        predictions: the current prediction per unit (the units, in order).
        states: the detector's state per unit.
    """
    last = {record.unit: record for record in history}
    results = []
    for name, prediction in predictions.items():
        record = last.get(name)
        state = states.get(name)
        step = state.reached_global_step if state is not None else None
        results.append(
            UnitResult(
                unit=name,
                optimizer=prediction.optimizer,
                rule=prediction.rule,
                lr=_number(record.lr if record else prediction.hyperparameters.get("lr")),
                weight_decay=_number(prediction.hyperparameters.get("weight_decay")),
                final_angular_update=_number(record.angular_update if record else None),
                final_theory=_number(record.theory if record else None),
                final_ratio=_number(record.ratio if record else None),
                final_weight_norm=_number(record.weight_norm if record else None),
                in_equilibrium=bool(state is not None and state.in_equilibrium),
                equilibrium_step=-1 if step is None else int(step),
                invariance=record.invariance if record else "unverified",
            )
        )
    return results


# The margin chart of a unit with granularity="channel": value, lower and upper bound (keys of
# `CHANNEL_SUMMARIES`).
_CHANNEL_MARGIN = ("median", "p10", "p90")
#: Per-unit W&B charts at most (the first units): beyond, a workspace is a wall of panels, and
#: the table ``sdm/unit_windows`` holds every unit for views of one's own.
MAX_CHARTS = 24
# W&B keys of the charts and the report figure.
_CHARTS = f"{Keys.PREFIX}charts/"
_REPORT_IMAGE = f"{Keys.PREFIX}report"
#: Where a WandbLogger may name the key it logs the step under (checked in this order).
WANDB_STEP_KEY_ATTRIBUTES = ("step_key", "_step_key", "step_metric", "_step_metric")
#: The metrics of the TensorBoard hparams experiment (scalars logged at the end of fit).
HPARAMS_METRICS = (
    f"{Keys.PREFIX}hparams/equilibrium_step",
    f"{Keys.PREFIX}hparams/equilibrium_fraction",
    f"{Keys.PREFIX}hparams/final_ratio",
)
# SummaryWriters that already hold an hparams experiment (TensorBoard reads the first).
_HPARAMS_WRITTEN: weakref.WeakSet[Any] = weakref.WeakSet()
# The regimes each SummaryWriter's last `sdm/regimes` text showed, by unit.
_REGIMES_SHOWN: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()
# SummaryWriters that already hold a layout (a writer accepts one: a second fit keeps the first).
_LAYOUT_WRITTEN: weakref.WeakSet[Any] = weakref.WeakSet()
# The incremental table of each W&B run (rows are added to it, and it is logged again).
_WINDOW_TABLES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

_F = TypeVar("_F", bound=Callable[..., None])


def fit_hparams(optimizers: Sequence[Any], action: str) -> dict[str, Any]:
    """The ``sdm/`` columns of the hparams experiment, known at the start of fit.

    The units are found on the first batch, after the experiment must be written; the theory's
    inputs are read from the first optimizer's first param group with weight decay (where the
    normalised weights of a usual set-up sit), else its first group.

    Example::

        >>> import torch
        >>> w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
        >>> sgd = torch.optim.SGD([{"params": [b], "weight_decay": 0.0}, {"params": [w]}],
        ...                       lr=0.1, momentum=0.9, weight_decay=5e-4)
        >>> fit_hparams([sgd], "'warn'")  # doctest: +NORMALIZE_WHITESPACE
        {'sdm/action': "'warn'", 'sdm/optimizer': 'SGD', 'sdm/lr': 0.1, 'sdm/weight_decay': 0.0005,
         'sdm/momentum': 0.9}
    """
    columns: dict[str, Any] = {f"{Keys.PREFIX}action": action}
    if not optimizers or not optimizers[0].param_groups:
        return columns
    optimizer = optimizers[0]
    groups = optimizer.param_groups
    group = next((g for g in groups if _number(g.get("weight_decay")) > 0), groups[0])
    prediction = predict_param_group(optimizer, group)
    hyper = prediction.hyperparameters
    columns[f"{Keys.PREFIX}optimizer"] = prediction.optimizer
    for name in ("lr", "weight_decay", "momentum"):
        if name in hyper and math.isfinite(hyper[name]):
            columns[f"{Keys.PREFIX}{name}"] = float(hyper[name])
    return columns


def on_fit_started(
    loggers: Iterable[Logger],
    *,
    hparams: Mapping[str, Any],
    optimizers: Sequence[Any],
    action: str,
    warned: set[str],
) -> None:
    """At the start of fit, before Lightning logs the hyper-parameters: the hparams experiment.

    Args:
        loggers: the Trainer's loggers (call on rank zero).
        hparams: the hyper-parameters Lightning is about to log (the module's and the
            datamodule's ``hparams_initial``).
        optimizers: the Trainer's optimizers (the ``sdm/`` columns, :func:`fit_hparams`).
        action: the equilibrium action's ``repr`` (the column ``sdm/action``).
        warned: the integrations that already reported a failure (updated).
    """
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            _tensorboard_experiment(logger, warned, hparams, optimizers, action)


def on_monitoring_started(
    loggers: Iterable[Logger],
    *,
    units: Sequence[str],
    channel_units: Sequence[str] = (),
    settings: Mapping[str, Any],
    predictions: Mapping[str, Mapping[str, Any]],
    warned: set[str],
    advice: Mapping[str, Any] | None = None,
    texts: Mapping[str, str] | None = None,
    alerts: bool = False,
) -> None:
    """Once the monitored units are known: TensorBoard layout, W&B step axis and config.

    Args:
        loggers: the Trainer's loggers (call on rank zero).
        units: the monitored units, in order.
        channel_units: those logged with channel summaries.
        settings: the callback's settings (for the W&B config).
        predictions: per unit, the theory's inputs and value (plain values).
        warned: the integrations that already reported a failure (updated).
        advice: what theory predicts for these settings (:meth:`Advice.as_dict
            <lightning_sdm.advice.Advice.as_dict>`): in the W&B config under ``sdm/advice``.
        texts: reports as text, by name: ``"advice"`` (the advice table and warnings) and
            ``"detection"`` (the full unit-detection report, which the console only
            summarises). TensorBoard texts ``sdm/<name>``; in the W&B config as
            ``sdm/<name>_text``. Empty texts are skipped.
        alerts: W&B alerts were asked for; without a ``WandbLogger`` that is said once.
    """
    texts = {name: text for name, text in (texts or {}).items() if text}
    loggers = list(loggers)
    if alerts and "alerts" not in warned and not any(isinstance(x, WandbLogger) for x in loggers):
        warned.add("alerts")  # once, however often monitoring (re)starts
        rank_zero_warn(_messages.alerts_without_wandb())
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            _tensorboard_layout(logger, warned, units, channel_units)
            for name, text in texts.items():
                _tensorboard_text(logger, warned, name, text)
        elif isinstance(logger, WandbLogger):
            _wandb_start(logger, warned, settings, predictions, advice, texts)


def on_windows_logged(
    loggers: Iterable[Logger],
    *,
    records: Sequence[HistoryRecord],
    global_step: int,
    warned: set[str],
) -> None:
    """After each batch of windows: the W&B table's new rows, TensorBoard's regimes as text.

    The rows of the W&B table ``sdm/unit_windows``; the TensorBoard text ``sdm/regimes`` when a
    unit's regime changed (a table: unit, regime, why).
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger) and records:
            _wandb_windows(logger, warned, records, global_step)
        elif isinstance(logger, TensorBoardLogger) and records:
            _tensorboard_regimes(logger, warned, records, global_step)


def on_equilibrium_event(
    loggers: Iterable[Logger],
    *,
    message: str,
    changed: bool,
    alerts: bool,
    warned: set[str],
    title: str = "lightning_sdm: equilibrium",
) -> None:
    """An equilibrium event: a W&B alert if ``alerts`` (WARN if it ``changed`` the run).

    ``title`` says what happened (:func:`~lightning_sdm._messages.alert_title`).
    """
    if not alerts:
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _wandb_alert(logger, warned, title, message, changed)


def on_monitoring_finished(
    loggers: Iterable[Logger],
    *,
    results: Sequence[UnitResult],
    fraction: float,
    global_step: int,
    warned: set[str],
    predictions: Mapping[str, Mapping[str, Any]] | None = None,
    history: Sequence[HistoryRecord] = (),
    tolerance: float | None = None,
) -> None:
    """At the end of fit: W&B summary, per-unit table, charts and figure; TensorBoard hparams.

    ``history`` (the callback's) feeds the W&B charts and figure; ``tolerance`` (the
    detector's) draws the band around the prediction.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _wandb_finish(logger, warned, results, fraction, global_step)
            if history:
                _wandb_charts(logger, warned, history, tolerance, global_step)
                _wandb_report_figure(logger, warned, history, global_step)
        elif isinstance(logger, TensorBoardLogger) and results:
            _tensorboard_hparams(logger, warned, results, fraction, global_step)


def hparams_metrics(results: Sequence[UnitResult], fraction: float) -> dict[str, float]:
    """The metrics of the TensorBoard hparams session (see the module docstring).

    Example::

        >>> nan = float("nan")
        >>> row = dict(optimizer="SGD", rule="sgd", lr=0.1, weight_decay=5e-4, final_angular_update=0.02,
        ...            final_theory=0.02, final_weight_norm=3.0, in_equilibrium=True, invariance="verified")
        >>> results = [UnitResult(unit="a", final_ratio=0.98, equilibrium_step=400, **row),
        ...            UnitResult(unit="b", final_ratio=1.02, equilibrium_step=700, **row)]
        >>> hparams_metrics(results, 1.0)
        {'sdm/hparams/equilibrium_fraction': 1.0, 'sdm/hparams/final_ratio': 1.0, 'sdm/hparams/equilibrium_step': 700.0}
    """  # noqa: E501
    ratios = sorted(r.final_ratio for r in results if math.isfinite(r.final_ratio))
    metrics = {
        f"{Keys.PREFIX}hparams/equilibrium_fraction": float(fraction),
        f"{Keys.PREFIX}hparams/final_ratio": _median(ratios),
    }
    steps = [r.equilibrium_step for r in results]
    if steps and min(steps) >= 0:  # every unit reached equilibrium: when the last one did
        metrics[f"{Keys.PREFIX}hparams/equilibrium_step"] = float(max(steps))
    return {key: value for key, value in metrics.items() if math.isfinite(value)}


def tensorboard_layout(
    units: Sequence[str], channel_units: Sequence[str] = (), prefix: str = ""
) -> dict[str, dict[str, list[Any]]]:
    r"""The custom-scalars layout for ``units`` (the argument of ``add_custom_scalars``).

    Per unit, first a ``Margin`` chart: the ratio measured / predicted inside the tolerance band
    (``sdm/tolerance_band/lower`` and ``upper``); a margin chart draws one line and shades its
    band, so the prediction (the band around 1) cannot be mistaken for the measurement. Then a
    multiline chart of the angular update and the prediction. A unit in ``channel_units`` charts
    the channels' median ratio, and gets a second margin chart: the channels' median angular
    update between their 10th and 90th percentiles. Margin charts take exact tag names;
    multiline charts anchored, escaped regular expressions, so ``net.1.weight`` never matches
    ``net.11.weight``.

    Example::

        >>> layout = tensorboard_layout(["net.0.weight"])
        >>> ratio, lines = layout["SDM per unit"].values()
        >>> ratio  # doctest: +NORMALIZE_WHITESPACE
        ['Margin', ['sdm/angular_update_ratio/net.0.weight', 'sdm/tolerance_band/lower',
                    'sdm/tolerance_band/upper']]
        >>> lines[0], lines[1][0]
        ('Multiline', '^sdm/angular_update/net\\.0\\.weight$')
        >>> sorted(layout["SDM overview"])
        ['angular update / theory', 'weight norm']
        >>> layout = tensorboard_layout(["net.0.weight"], channel_units=["net.0.weight"])
        >>> ratio, spread, median = layout["SDM per unit"].values()
        >>> ratio[1][0]
        'sdm/angular_update_ratio/net.0.weight/median'
        >>> spread  # doctest: +NORMALIZE_WHITESPACE
        ['Margin', ['sdm/angular_update/net.0.weight/median',
                    'sdm/angular_update/net.0.weight/p10', 'sdm/angular_update/net.0.weight/p90']]
        >>> median[0]
        'Multiline'
    """

    def tag(key: str) -> str:
        return f"^{re.escape(prefix + key)}$"

    band = [f"{prefix}{Keys.TOLERANCE_LOWER}", f"{prefix}{Keys.TOLERANCE_UPPER}"]
    per_unit: dict[str, list[Any]] = {}
    ratios, norms = [], []
    by_channel = set(channel_units)
    for unit in units:
        theory = tag(f"{Keys.THEORY}{unit}")
        # First, the chart read at a glance: measured / predicted inside the band the detector
        # accepts (a margin chart: one line, its band shaded; no smoothing bends it).
        if unit in by_channel:
            ratio = f"{Keys.RATIO}{unit}/median"
            per_unit[f"{unit}: channels' median of measured / predicted, band 1 ± tolerance"] = [
                "Margin",
                [prefix + ratio, *band],
            ]
            spread = [f"{prefix}{Keys.ANGULAR_UPDATE}{unit}/{key}" for key in _CHANNEL_MARGIN]
            per_unit[f"{unit}: angular update, channels' median and p10-p90 band (rad/step)"] = [
                "Margin",
                spread,
            ]
            per_unit[f"{unit}: channels' median angular update and prediction (rad/step)"] = [
                "Multiline",
                [tag(f"{Keys.ANGULAR_UPDATE}{unit}/median"), theory],
            ]
        else:
            ratio = f"{Keys.RATIO}{unit}"
            per_unit[f"{unit}: measured / predicted, band 1 ± tolerance"] = [
                "Margin",
                [prefix + ratio, *band],
            ]
            per_unit[f"{unit}: angular update and prediction (rad/step)"] = [
                "Multiline",
                [tag(f"{Keys.ANGULAR_UPDATE}{unit}"), theory],
            ]
        ratios.append(tag(ratio))
        norms.append(tag(f"{Keys.WEIGHT_NORM}{unit}"))
    overview = {
        "angular update / theory": ["Multiline", [*ratios, tag(Keys.MEDIAN_RATIO)]],
        "weight norm": ["Multiline", norms],
    }
    return {"SDM per unit": per_unit, "SDM overview": overview}


def log_metrics(
    loggers: Iterable[Logger], metrics: Mapping[str, float], step: int, warned: set[str]
) -> None:
    """``logger.log_metrics(metrics, step)`` on every logger, each on its own.

    A logger that raises (its directory deleted, a full disk, a W&B run already finished) is
    reported once, with what is lost, and tried again at the next window: the other loggers, the
    ``history`` and the training go on. A monitor must never turn a logging fault into a lost run.
    """
    for index, logger in enumerate(loggers):
        try:
            logger.log_metrics(dict(metrics), step=step)
        except Exception as error:
            key = f"log_metrics:{index}"
            if key not in warned:
                warned.add(key)
                rank_zero_warn(_messages.logger_failed(type(logger).__name__, step, error))


# ---------------------------------------------------------------------- internals


def _guarded(what: str) -> Callable[[_F], _F]:
    """Turn any exception of an integration into one warning per owner; never re-raise."""

    def decorate(function: _F) -> _F:
        @wraps(function)
        def wrapper(logger: Logger, warned: set[str], *args: Any) -> None:
            try:
                function(logger, warned, *args)
            except Exception as error:
                if what not in warned:
                    warned.add(what)
                    rank_zero_warn(_messages.logger_extra_failed(what, error))

        return wrapper  # type: ignore[return-value]

    return decorate


def _prefix(logger: Logger) -> str:
    """The prefix a logger puts before every key (``LOGGER_JOIN_CHAR``-joined), if any.

    Lightning keeps it in the private ``_prefix`` (no public accessor); read here only.
    """
    prefix = getattr(logger, "_prefix", "") or ""
    return f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}" if prefix else ""


@_guarded("TensorBoard custom-scalars layout")
def _tensorboard_layout(
    logger: TensorBoardLogger,
    warned: set[str],
    units: Sequence[str],
    channel_units: Sequence[str],
) -> None:
    writer = logger.experiment
    if writer in _LAYOUT_WRITTEN:
        return
    writer.add_custom_scalars(tensorboard_layout(units, channel_units, _prefix(logger)))
    _LAYOUT_WRITTEN.add(writer)


@_guarded("TensorBoard text (advice, detection report)")
def _tensorboard_text(logger: TensorBoardLogger, warned: set[str], name: str, text: str) -> None:
    # Markdown: indented by four spaces, the table keeps its columns.
    body = "\n".join("    " + line for line in text.splitlines())
    logger.experiment.add_text(f"{_prefix(logger)}{Keys.PREFIX}{name}", body, global_step=0)


@_guarded("TensorBoard text (regimes)")
def _tensorboard_regimes(
    logger: TensorBoardLogger, warned: set[str], records: Sequence[HistoryRecord], global_step: int
) -> None:
    writer = logger.experiment
    shown = _REGIMES_SHOWN.setdefault(writer, {})
    now = {record.unit: record.regime or "unknown" for record in records}
    if all(shown.get(unit) == regime for unit, regime in now.items()):
        return
    shown.update(now)
    writer.add_text(
        f"{_prefix(logger)}{Keys.PREFIX}regimes", regimes_markdown(records), global_step=global_step
    )


def regimes_markdown(records: Sequence[HistoryRecord]) -> str:
    """The units' regimes as a Markdown table (TensorBoard's Text tab renders it).

    Example::

        >>> from types import SimpleNamespace as Record
        >>> record = Record(unit="net.0.weight", regime="non_stationary",
        ...                 regime_note="ratio trend +3%/tau")
        >>> print(regimes_markdown([record]))
        | unit | regime | why |
        |---|---|---|
        | net.0.weight | non stationary | ratio trend +3%/tau |
    """
    lines = ["| unit | regime | why |", "|---|---|---|"]
    for record in records:
        regime = (record.regime or "unknown").replace("_", " ")
        note = (record.regime_note or "").replace("|", "/")
        lines.append(f"| {record.unit} | {regime} | {note} |")
    return "\n".join(lines)


def wandb_step_key(logger: Logger) -> str:
    """The key a WandbLogger logs the step under, the x axis of the ``sdm/*`` metrics.

    Read from the logger: the first of :data:`WANDB_STEP_KEY_ATTRIBUTES` that holds a non-empty
    string (a subclass, or a Lightning release that makes the key configurable). Otherwise
    Lightning's own (2.2 to 2.6 at least; ``lightning/pytorch/loggers/wandb.py``), which has no
    such setting: ``log_metrics`` adds ``"trainer/global_step": step`` and ``experiment``
    defines it as the axis of ``*``, except with ``sync_tensorboard=True``, where no step key is
    logged and the axis is TensorBoard's ``global_step``.

    Example::

        >>> from types import SimpleNamespace
        >>> wandb_step_key(SimpleNamespace(_wandb_init={}))
        'trainer/global_step'
        >>> wandb_step_key(SimpleNamespace(_wandb_init={"sync_tensorboard": True}))
        'global_step'
        >>> wandb_step_key(SimpleNamespace(_wandb_init={}, _step_key="step"))
        'step'
    """
    for name in WANDB_STEP_KEY_ATTRIBUTES:
        key = getattr(logger, name, None)
        if isinstance(key, str) and key:
            return key
    synced = bool((getattr(logger, "_wandb_init", None) or {}).get("sync_tensorboard"))
    return "global_step" if synced else "trainer/global_step"


@_guarded("Weights & Biases set-up (define_metric, run config)")
def _wandb_start(
    logger: WandbLogger,
    warned: set[str],
    settings: Mapping[str, Any],
    predictions: Mapping[str, Mapping[str, Any]],
    advice: Mapping[str, Any] | None = None,
    texts: Mapping[str, str] | None = None,
) -> None:
    run = logger.experiment
    step_metric = wandb_step_key(logger)
    run.define_metric(f"{_prefix(logger)}{Keys.PREFIX}*", step_metric=step_metric, step_sync=True)
    config = {"sdm": {**settings, "units": {unit: dict(p) for unit, p in predictions.items()}}}
    if advice is not None:
        config["sdm"]["advice"] = dict(advice)
    for name, text in (texts or {}).items():
        config["sdm"][f"{name}_text"] = text
    run.config.update(config, allow_val_change=True)


@_guarded("Weights & Biases summary and table")
def _wandb_finish(
    logger: WandbLogger,
    warned: set[str],
    results: Sequence[UnitResult],
    fraction: float,
    global_step: int,
) -> None:
    run, prefix = logger.experiment, _prefix(logger)
    for result in results:
        final = {
            "equilibrium_step": result.equilibrium_step,
            "final_ratio": result.final_ratio,
            "final_angular_update": result.final_angular_update,
            "final_theory": result.final_theory,
            "final_weight_norm": result.final_weight_norm,
        }
        for key, value in final.items():
            if math.isfinite(value):  # no prediction (or NaN weights): no summary entry
                run.summary[f"{prefix}sdm/summary/{result.unit}/{key}"] = value
    run.summary[f"{prefix}sdm/summary/equilibrium_fraction"] = fraction
    rows = [list(astuple(result)) for result in results]
    logger.log_table(key="sdm/units", columns=list(TABLE_COLUMNS), data=rows, step=global_step)


@_guarded("Weights & Biases window table")
def _wandb_windows(
    logger: WandbLogger, warned: set[str], records: Sequence[HistoryRecord], global_step: int
) -> None:
    import wandb

    run = logger.experiment
    table = _WINDOW_TABLES.get(run)
    if table is None:
        columns: list[str | int] = list(WINDOW_COLUMNS)
        table = _WINDOW_TABLES[run] = wandb.Table(columns=columns, log_mode="INCREMENTAL")
    for record in records:
        table.add_data(*(_cell(getattr(record, column)) for column in WINDOW_COLUMNS))
    # Through the logger: its prefix and its step key, like the scalars of the same windows.
    logger.log_metrics({f"{Keys.PREFIX}unit_windows": table}, step=global_step)  # type: ignore[dict-item]


@_guarded("Weights & Biases alert")
def _wandb_alert(
    logger: WandbLogger, warned: set[str], title: str, message: str, changed: bool
) -> None:
    from wandb import AlertLevel  # type: ignore[attr-defined]

    level = AlertLevel.WARN if changed else AlertLevel.INFO
    # wait_duration 0: every event alerts (W&B would otherwise drop repeats within a minute).
    logger.experiment.alert(title=title, text=message, level=level, wait_duration=0)


def wandb_chart_series(
    history: Sequence[HistoryRecord], tolerance: float | None
) -> tuple[dict[str, dict[str, tuple[list[int], list[float]]]], dict[str, tuple[list, list]]]:
    """The lines of the W&B charts: per unit, and of the ratio chart, ``{label: (xs, ys)}``.

    Per unit: ``measured``, ``predicted`` and, with a ``tolerance``, ``predicted -<tol>`` and
    ``predicted +<tol>`` (windows without a prediction are left out of those); the ratio chart:
    one line per unit and the band ``1 -<tol>``, ``1 +<tol>`` over the steps of the windows.

    Example::

        >>> from lightning_sdm.records import HistoryRecord
        >>> rows = [HistoryRecord(global_step=s, optimizer_step=s, unit="w", angular_update=a,
        ...                       theory=0.02, ratio=a / 0.02, weight_norm=1.0, lr=0.1,
        ...                       in_equilibrium=False) for s, a in ((10, 0.03), (20, 0.021))]
        >>> units, ratio = wandb_chart_series(rows, 0.1)
        >>> units["w"]["measured"]
        ([10, 20], [0.03, 0.021])
        >>> sorted(units["w"])
        ['measured', 'predicted', 'predicted +10%', 'predicted -10%']
        >>> sorted(ratio)
        ['1 +10%', '1 -10%', 'w']
    """
    units: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    ratio: dict[str, tuple[list, list]] = {}
    steps: list[int] = []
    band = _messages.percent(tolerance) if tolerance is not None else ""
    for record in history:
        lines = units.setdefault(record.unit, {"measured": ([], []), "predicted": ([], [])})
        _add_point(lines["measured"], record.global_step, record.angular_update)
        if record.theory is not None:
            _add_point(lines["predicted"], record.global_step, record.theory)
            if tolerance is not None:
                for sign, factor in (("-", 1 - tolerance), ("+", 1 + tolerance)):
                    line = lines.setdefault(f"predicted {sign}{band}", ([], []))
                    _add_point(line, record.global_step, record.theory * factor)
        if record.ratio is not None:
            _add_point(ratio.setdefault(record.unit, ([], [])), record.global_step, record.ratio)
        if not steps or steps[-1] != record.global_step:
            steps.append(record.global_step)
    if tolerance is not None and ratio:
        for sign, level in (("-", 1 - tolerance), ("+", 1 + tolerance)):
            ratio[f"1 {sign}{band}"] = (list(steps), [level] * len(steps))
    return units, ratio


def _add_point(line: tuple[list, list], step: int, value: float) -> None:
    line[0].append(step)
    line[1].append(float(value))


@_guarded("Weights & Biases charts")
def _wandb_charts(
    logger: WandbLogger,
    warned: set[str],
    history: Sequence[HistoryRecord],
    tolerance: float | None,
    global_step: int,
) -> None:
    import wandb

    def chart(lines: Mapping[str, tuple[list, list]], title: str) -> Any:
        return wandb.plot.line_series(
            xs=[xs for xs, _ in lines.values()],
            ys=[ys for _, ys in lines.values()],
            keys=list(lines),
            title=title,
            xname="global step",
        )

    units, ratio = wandb_chart_series(history, tolerance)
    charts: dict[str, Any] = {}
    for unit, lines in list(units.items())[:MAX_CHARTS]:
        drawn = {label: line for label, line in lines.items() if line[0]}
        charts[f"{_CHARTS}{unit}"] = chart(drawn, _messages.wandb_unit_chart_title(unit))
    if ratio:
        charts[f"{_CHARTS}ratio"] = chart(ratio, _messages.wandb_ratio_chart_title(tolerance))
    # Through the logger, like the scalars: its prefix and its step key.
    logger.log_metrics(charts, step=global_step)


@_guarded("Weights & Biases report figure")
def _wandb_report_figure(
    logger: WandbLogger, warned: set[str], history: Sequence[HistoryRecord], global_step: int
) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # the figure is optional: [plot]
        return
    import tempfile
    import warnings

    import wandb

    from lightning_sdm.report import plot_run, run_from_history
    from lightning_sdm.report._plot import MAX_UNIT_PANELS

    data = run_from_history(history, source="lightning_sdm")
    with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "only the first 24 units": the caption says it
        path = f"{directory}/sdm_report.png"
        plot_run(data, path=path, dpi=80)
        shown = min(len(data.units), MAX_UNIT_PANELS)
        caption = _messages.report_figure_caption(shown, len(data.units), global_step)
        # wandb.Image copies the file into the run when logged, before the directory goes.
        image = wandb.Image(path, caption=caption)
        logger.log_metrics({_REPORT_IMAGE: image}, step=global_step)  # type: ignore[dict-item]


@_guarded("TensorBoard hparams experiment")
def _tensorboard_experiment(
    logger: TensorBoardLogger,
    warned: set[str],
    hparams: Mapping[str, Any],
    optimizers: Sequence[Any],
    action: str,
) -> None:
    writer = logger.experiment
    if writer in _HPARAMS_WRITTEN:  # a second fit into the same run: TensorBoard reads the first
        return
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    # Flattened and sanitised as Lightning writes its own session (nested dicts as a/b, numpy
    # scalars as numbers), so a column is named and typed as without the callback.
    flat = logger._sanitize_params(_flatten_dict(_convert_params(dict(hparams))))
    params = {key: _hparam_value(value) for key, value in flat.items()}
    prefix = _prefix(logger)
    metrics = dict.fromkeys((prefix + key for key in HPARAMS_METRICS), 0.0)
    if getattr(logger, "_default_hp_metric", False):  # the column Lightning's session defines
        metrics[f"{prefix}hp_metric"] = -1.0
    file_writer = writer._get_file_writer()
    # Inside the guard: an optimizer the theory cannot read never stops a fit.
    columns = fit_hparams(optimizers, action)
    for summary in hparams_summaries({**params, **columns}, metrics):
        file_writer.add_summary(summary)
    file_writer.flush()
    _HPARAMS_WRITTEN.add(writer)


@_guarded("TensorBoard hparams metrics")
def _tensorboard_hparams(
    logger: TensorBoardLogger,
    warned: set[str],
    results: Sequence[UnitResult],
    fraction: float,
    global_step: int,
) -> None:
    # Scalars of the run: the metric columns of the experiment written at the start.
    logger.log_metrics(hparams_metrics(results, fraction), step=global_step)


def _hparam_value(value: Any) -> Any:
    """What ``add_hparams`` accepts: numbers, strings and booleans as they are, else text.

    A one-element tensor becomes its number, as Lightning's session shows it.
    """
    if hasattr(value, "numel") and value.numel() == 1:
        return value.item()
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def _cell(value: Any) -> Any:
    """A table cell: ``None`` (no prediction) becomes NaN so the column keeps one type."""
    return math.nan if value is None else value


def _median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def _number(value: Any) -> float:
    """A float for a summary or table cell; ``None`` (no value) becomes NaN."""
    return math.nan if value is None else float(value)
