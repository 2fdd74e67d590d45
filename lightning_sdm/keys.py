"""The ``sdm/...`` keys every logger receives, and the metric dicts of windows and events.

Torch-free like :mod:`lightning_sdm.records`, so that the report command reads logs with the same
names the callback writes them with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from lightning_sdm.records import (
    CHANNEL_SUMMARIES,
    REGIMES,
    EquilibriumEvent,
    Regime,
    UnitWindow,
)

__all__ = [
    "HPARAMS_RUN",
    "REGIME_CODES",
    "SUMMARY_KEYS",
    "Keys",
    "event_metrics",
    "summary_metrics",
    "window_metrics",
]


#: The TensorBoard run (a subdirectory of the logger's directory) that holds the callback's
#: hparams session at the end of fit; ``lightning-sdm report`` does not list it as a run.
HPARAMS_RUN = "sdm_hparams"


class Keys:
    """The logged keys. Per-unit keys end with ``/<unit>`` (and ``/<summary>`` per channel)."""

    PREFIX = "sdm/"
    ANGULAR_UPDATE = "sdm/angular_update/"
    THEORY = "sdm/angular_update_theory/"
    #: Per unit: the angle the norm balance predicts for now under the real schedule.
    TRAJECTORY = "sdm/angular_update_trajectory/"
    RATIO = "sdm/angular_update_ratio/"
    WEIGHT_NORM = "sdm/weight_norm/"
    IN_EQUILIBRIUM = "sdm/in_equilibrium/"
    #: Per unit: the regime's code in :data:`REGIME_CODES`.
    REGIME = "sdm/regime/"
    #: Per regime: how many units are in it (``sdm/regime_count/<regime>``).
    REGIME_COUNT = "sdm/regime_count/"
    HORIZON = "sdm/angular_update_horizon/"
    MEDIAN_RATIO = "sdm/angular_update_ratio"
    FRACTION = "sdm/equilibrium_fraction"
    STEPS_TO_EQUILIBRIUM = "sdm/steps_to_equilibrium"
    LR_DECAYS = "sdm/lr_decays"
    EVENT_STEP = "sdm/equilibrium_event_step"
    LR_AFTER_EVENT = "sdm/lr_after_event"
    #: Shown in the progress bar (the median ratio).
    PROGRESS_BAR = "sdm_ratio"

    @staticmethod
    def without_logger_prefix(keys: Iterable[str], join: str = "-") -> dict[str, str]:
        """Logged key -> the key without a logger's ``prefix`` (``"pre-sdm/..."``: ``"sdm/..."``).

        Lightning loggers put ``prefix + join`` before every key. Only when no ``sdm/`` key is
        unprefixed and one prefix covers them; it is then taken off every key that has it.

        Example::

            >>> Keys.without_logger_prefix(["run-sdm/angular_update/w", "run-loss"])
            {'run-sdm/angular_update/w': 'sdm/angular_update/w', 'run-loss': 'loss'}
        """
        keys = list(keys)
        marker = join + Keys.PREFIX
        if any(key.startswith(Keys.PREFIX) for key in keys):
            return {key: key for key in keys}
        prefixes = {key.split(marker, 1)[0] for key in keys if marker in key}
        if len(prefixes) != 1:
            return {key: key for key in keys}
        head = prefixes.pop() + join
        return {key: key[len(head) :] if key.startswith(head) else key for key in keys}

    @staticmethod
    def unit_of(key: str, prefix: str) -> str:
        """The unit of a per-unit key under ``prefix``, without a channel-summary suffix."""
        rest = key[len(prefix) :]
        head, _, tail = rest.rpartition("/")
        return head if head and tail in CHANNEL_SUMMARIES else rest


#: Numeric codes of the regimes for scalar loggers (``sdm/regime/<unit>``).
REGIME_CODES: dict[str, int] = {name: code for code, name in enumerate(REGIMES)}


def window_metrics(
    window: UnitWindow, in_equilibrium: bool, regime: Regime | None = None
) -> dict[str, float]:
    """The per-unit ``sdm/...`` scalars of one window (NaN where there is no value).

    Example::

        >>> window = UnitWindow("net.0.weight", 40, 40, 0.02, 0.02, 0.025, 0.8, 3.1, 8, 0.1)
        >>> sorted(window_metrics(window, in_equilibrium=False).items())  # doctest: +NORMALIZE_WHITESPACE
        [('sdm/angular_update/net.0.weight', 0.02), ('sdm/angular_update_ratio/net.0.weight', 0.8),
         ('sdm/angular_update_theory/net.0.weight', 0.025),
         ('sdm/angular_update_trajectory/net.0.weight', nan), ('sdm/in_equilibrium/net.0.weight', 0.0),
         ('sdm/weight_norm/net.0.weight', 3.1)]
    """  # noqa: E501
    name = window.unit
    theory = window.theory if window.theory is not None else math.nan
    ratio = window.ratio if window.ratio is not None else math.nan
    metrics = {f"{Keys.WEIGHT_NORM}{name}": window.weight_norm}
    if window.channels is None:
        metrics[f"{Keys.ANGULAR_UPDATE}{name}"] = window.angular_update
        metrics[f"{Keys.RATIO}{name}"] = ratio
    else:
        for key, value in window.channels.items():
            metrics[f"{Keys.ANGULAR_UPDATE}{name}/{key}"] = value
        for key, value in (window.channel_ratios or {}).items():
            metrics[f"{Keys.RATIO}{name}/{key}"] = value
    metrics[f"{Keys.THEORY}{name}"] = theory
    trajectory = window.trajectory
    metrics[f"{Keys.TRAJECTORY}{name}"] = trajectory if trajectory is not None else math.nan
    if window.horizon_angular_update is not None:
        metrics[f"{Keys.HORIZON}{name}"] = window.horizon_angular_update
    metrics[f"{Keys.IN_EQUILIBRIUM}{name}"] = float(in_equilibrium)
    if regime is not None:
        metrics[f"{Keys.REGIME}{name}"] = float(REGIME_CODES[regime])
    return metrics


#: The run-level keys also put in ``trainer.callback_metrics`` (so ``EarlyStopping``,
#: ``ModelCheckpoint`` and ``ReduceLROnPlateau`` can monitor them), regime counts included.
SUMMARY_KEYS: tuple[str, ...] = (
    Keys.MEDIAN_RATIO,
    Keys.FRACTION,
    Keys.STEPS_TO_EQUILIBRIUM,
    *(f"{Keys.REGIME_COUNT}{regime}" for regime in REGIMES),
)


def summary_metrics(
    windows: Sequence[UnitWindow],
    fraction: float,
    steps_to_equilibrium: float,
    regimes: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """The run-level scalars of a batch of windows: median ratio, equilibrium fraction, ETA.

    With ``regimes``, also how many units are in each regime (every regime, zeros included, so
    that charts stay aligned).
    """
    ratios = sorted(w.ratio for w in windows if w.ratio is not None and math.isfinite(w.ratio))
    middle = len(ratios) // 2
    median = (
        math.nan
        if not ratios
        else ratios[middle]
        if len(ratios) % 2
        else (ratios[middle - 1] + ratios[middle]) / 2
    )
    metrics = {
        Keys.MEDIAN_RATIO: median,
        Keys.FRACTION: fraction,
        Keys.STEPS_TO_EQUILIBRIUM: steps_to_equilibrium,
    }
    if regimes is not None:
        for regime in REGIMES:
            metrics[f"{Keys.REGIME_COUNT}{regime}"] = float(regimes.get(regime, 0))
    return metrics


def event_metrics(event: EquilibriumEvent, decays: int | None) -> dict[str, float]:
    """The scalars logged with an equilibrium event (``decays``: LR decays so far, if any)."""
    metrics = {Keys.EVENT_STEP: float(event.global_step)}
    if decays is not None:
        metrics[Keys.LR_DECAYS] = float(decays)
    if event.new_lrs:
        metrics[Keys.LR_AFTER_EVENT] = event.new_lrs[0]
    return metrics
