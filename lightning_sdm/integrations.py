"""Logger-specific views of the callback's results (TensorBoard layouts, W&B metrics and tables).

Every Lightning logger already receives the ``sdm/...`` scalars through ``log_metrics``; this
module adds what particular loggers can do beyond scalars. Each function inspects
``trainer.loggers`` and acts on the loggers it knows, on rank zero only; unknown loggers are left
alone, and a failure in an integration is reported once and never interrupts training.

TensorBoard (:class:`~lightning.pytorch.loggers.TensorBoardLogger`), when monitoring starts: a
custom-scalars layout (the "Custom Scalars" dashboard) with

* category ``SDM per unit``: one chart per unit with the measured angular update and the
  prediction (with ``granularity="channel"``: the channels' median, 10th and 90th percentiles and
  the prediction);
* category ``SDM overview``: every unit's ratio measured / predicted with the median ratio, and
  every unit's weight norm.

Weights & Biases (:class:`~lightning.pytorch.loggers.WandbLogger`):

* when monitoring starts: ``define_metric("sdm/*", step_metric="trainer/global_step")``, and the
  theory's inputs in the run config under ``sdm`` (the callback's settings, and per unit the
  optimizer, rule, hyper-parameters, prediction and source);
* at the end of fit: run-summary entries per unit, ``sdm/summary/<unit>/equilibrium_step``
  (-1: never reached), ``final_ratio``, ``final_angular_update``, ``final_theory`` and
  ``final_weight_norm`` (the last window's values; ratio and theory are left out where theory
  gives no prediction), plus ``sdm/summary/equilibrium_fraction``; and a table ``sdm/units`` with
  one row per unit (NaN where there is no value).
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

if TYPE_CHECKING:
    from lightning_sdm.callback import SphericalDynamicsCallback

__all__ = [
    "TABLE_COLUMNS",
    "on_monitoring_finished",
    "on_monitoring_started",
    "tensorboard_layout",
]

#: Columns of the W&B table ``sdm/units``.
TABLE_COLUMNS = [
    "unit",
    "optimizer",
    "rule",
    "lr",
    "weight_decay",
    "final_angular_update",
    "final_theory",
    "final_ratio",
    "final_weight_norm",
    "in_equilibrium",
    "equilibrium_step",
    "invariance",
]

# Percentiles shown per unit with granularity="channel" (keys of `CHANNEL_SUMMARIES`).
_CHANNEL_LINES = ("median", "p10", "p90")
# Which integrations already reported a failure, per callback (each is reported once).
_WARNED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()

_F = TypeVar("_F", bound=Callable[..., None])


def on_monitoring_started(trainer: pl.Trainer, callback: SphericalDynamicsCallback) -> None:
    """Called once the monitored units are known (first training step)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            _tensorboard_layout(logger, callback)
        elif isinstance(logger, WandbLogger):
            _wandb_start(logger, callback)


def on_monitoring_finished(trainer: pl.Trainer, callback: SphericalDynamicsCallback) -> None:
    """Called at the end of fit with the complete history."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            _wandb_finish(logger, callback, trainer.global_step)


def tensorboard_layout(
    units: list[str], granularity: str = "layer", prefix: str = ""
) -> dict[str, dict[str, list[Any]]]:
    r"""The custom-scalars layout for ``units`` (the argument of ``add_custom_scalars``).

    Tags are anchored, escaped regular expressions, so ``net.1.weight`` never matches
    ``net.11.weight``.

    Example::

        >>> layout = tensorboard_layout(["net.0.weight"])
        >>> kind, tags = layout["SDM per unit"]["net.0.weight: angular update (rad/step)"]
        >>> kind, tags[0]
        ('Multiline', '^sdm/angular_update/net\\.0\\.weight$')
        >>> sorted(layout["SDM overview"])
        ['angular update / theory', 'weight norm']
    """

    def tag(key: str) -> str:
        return f"^{re.escape(prefix + key)}$"

    per_unit: dict[str, list[Any]] = {}
    ratios, norms = [], []
    for unit in units:
        if granularity == "channel":
            lines = [tag(f"sdm/angular_update/{unit}/{key}") for key in _CHANNEL_LINES]
            ratios.append(tag(f"sdm/angular_update_ratio/{unit}/median"))
            title = f"{unit}: angular update, channels' median/p10/p90 (rad/step)"
        else:
            lines = [tag(f"sdm/angular_update/{unit}")]
            ratios.append(tag(f"sdm/angular_update_ratio/{unit}"))
            title = f"{unit}: angular update (rad/step)"
        per_unit[title] = ["Multiline", [*lines, tag(f"sdm/angular_update_theory/{unit}")]]
        norms.append(tag(f"sdm/weight_norm/{unit}"))
    overview = {
        "angular update / theory": ["Multiline", [*ratios, tag("sdm/angular_update_ratio")]],
        "weight norm": ["Multiline", norms],
    }
    return {"SDM per unit": per_unit, "SDM overview": overview}


# ---------------------------------------------------------------------- internals


def _guarded(what: str) -> Callable[[_F], _F]:
    """Turn any exception of an integration into one warning per callback; never re-raise."""

    def decorate(function: _F) -> _F:
        @wraps(function)
        def wrapper(logger: Logger, callback: Any, *args: Any) -> None:
            try:
                function(logger, callback, *args)
            except Exception as error:
                warned = _WARNED.setdefault(callback, set())
                if what not in warned:
                    warned.add(what)
                    rank_zero_warn(
                        f"SphericalDynamicsCallback: the {what} failed and was skipped "
                        f"({type(error).__name__}: {error}). The scalars are still logged and "
                        "training continues."
                    )

        return wrapper  # type: ignore[return-value]

    return decorate


def _prefix(logger: Logger) -> str:
    """The prefix a logger puts before every key (``LOGGER_JOIN_CHAR``-joined), if any."""
    prefix = getattr(logger, "_prefix", "") or ""
    return f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}" if prefix else ""


@_guarded("TensorBoard custom-scalars layout")
def _tensorboard_layout(logger: TensorBoardLogger, callback: SphericalDynamicsCallback) -> None:
    assert callback.monitor is not None
    writer = logger.experiment
    # A writer accepts one layout: a second fit on the same logger keeps the first one.
    if getattr(writer, "_lightning_sdm_layout", False):
        return
    layout = tensorboard_layout(callback.monitor.units, callback.granularity, _prefix(logger))
    writer.add_custom_scalars(layout)
    writer._lightning_sdm_layout = True


@_guarded("Weights & Biases set-up (define_metric, run config)")
def _wandb_start(logger: WandbLogger, callback: SphericalDynamicsCallback) -> None:
    assert callback.monitor is not None
    run = logger.experiment
    synced = bool(getattr(logger, "_wandb_init", {}).get("sync_tensorboard"))
    step_metric = "global_step" if synced else "trainer/global_step"
    run.define_metric(f"{_prefix(logger)}sdm/*", step_metric=step_metric, step_sync=True)
    units = {}
    for name, prediction in callback.monitor.predictions().items():
        units[name] = {
            "optimizer": prediction.optimizer,
            "rule": prediction.rule,
            **prediction.hyperparameters,
            "prediction": prediction.angular_update,
            "reason": prediction.reason,
            "source": prediction.source,
        }
    settings = {
        "granularity": callback.granularity,
        "every_n_steps": callback.every_n_steps,
        "window": callback.window,
        "tolerance": callback.detector.tolerance,
        "patience": callback.detector.patience,
        "quorum": callback.detector.quorum,
    }
    run.config.update({"sdm": {**settings, "units": units}}, allow_val_change=True)


@_guarded("Weights & Biases summary and table")
def _wandb_finish(logger: WandbLogger, callback: SphericalDynamicsCallback, step: int) -> None:
    assert callback.monitor is not None
    last: dict[str, dict[str, Any]] = {}
    for entry in callback.history:
        last[entry["unit"]] = entry
    predictions = callback.monitor.predictions()
    run, prefix = logger.experiment, _prefix(logger)
    rows = []
    for unit in callback.monitor.units:
        entry = last.get(unit, {})
        state = callback.detector.state.get(unit)
        reached = state.reached_step if state is not None else None
        equilibrium_step = -1 if reached is None else int(reached)
        final = {
            "equilibrium_step": equilibrium_step,
            "final_ratio": _number(entry.get("ratio")),
            "final_angular_update": _number(entry.get("angular_update")),
            "final_theory": _number(entry.get("theory")),
            "final_weight_norm": _number(entry.get("weight_norm")),
        }
        for key, value in final.items():
            if math.isfinite(value):  # no prediction (or NaN weights): no summary entry
                run.summary[f"{prefix}sdm/summary/{unit}/{key}"] = value
        prediction = predictions[unit]
        rows.append(
            [
                unit,
                prediction.optimizer,
                prediction.rule,
                _number(entry.get("lr", prediction.hyperparameters.get("lr"))),
                _number(prediction.hyperparameters.get("weight_decay")),
                final["final_angular_update"],
                final["final_theory"],
                final["final_ratio"],
                final["final_weight_norm"],
                bool(state is not None and state.in_equilibrium),
                equilibrium_step,
                str(entry.get("invariance", "unverified")),
            ]
        )
    run.summary[f"{prefix}sdm/summary/equilibrium_fraction"] = callback.detector.fraction()
    logger.log_table(key="sdm/units", columns=list(TABLE_COLUMNS), data=rows, step=step)


def _number(value: Any) -> float:
    """A float for a summary or table cell; ``None`` (no value) becomes NaN."""
    return math.nan if value is None else float(value)
