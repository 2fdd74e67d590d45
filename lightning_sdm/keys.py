"""The ``sdm/...`` keys every logger receives, and the metric dicts of windows and events.

Torch-free like :mod:`lightning_sdm.records`, so that the report command reads logs with the same
names the callback writes them with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, get_args

from lightning_sdm.records import (
    CHANNEL_SUMMARIES,
    REGIMES,
    EquilibriumEvent,
    Regime,
    UnitWindow,
)

__all__ = [
    "HPARAMS_RUN",
    "LOG_LEVELS",
    "LogLevel",
    "REGIME_CODES",
    "SUMMARY_KEYS",
    "Keys",
    "event_metrics",
    "summary_metrics",
    "window_metrics",
]


#: The TensorBoard run (a subdirectory of the logger's directory) in which earlier versions
#: wrote the callback's hparams session; ``lightning-sdm report`` still does not list it as a run.
#: The session is now in the run itself (see :mod:`lightning_sdm.lightning._loggers`).
HPARAMS_RUN = "sdm_hparams"


#: How much every window logs: ``"summary"`` (the per-unit angular update, prediction, ratio,
#: weight norm, equilibrium flag and regime code, the run-level median ratio, equilibrium fraction
#: and time to equilibrium, the tolerance band) or ``"detailed"`` (also the number of units per
#: regime, for the regimes seen in the run).
LogLevel = Literal["summary", "detailed"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)


class Keys:
    """The logged keys. Per-unit keys end with ``/<unit>`` (and ``/<summary>`` per channel)."""

    PREFIX = "sdm/"
    ANGULAR_UPDATE = "sdm/angular_update/"
    THEORY = "sdm/angular_update_theory/"
    #: Per unit: the angle the norm balance predicts for now under the real schedule.
    TRAJECTORY = "sdm/angular_update_trajectory/"
    #: Per unit: the radial balance, the angle the norm balance gives with the update's measured
    #: radial part (``UnitWindow.balance``); ``balance / theory`` is the gradients' share of the
    #: ratio, ``angular_update / balance`` the share of a norm that has not settled.
    BALANCE = "sdm/angular_update_balance/"
    RATIO = "sdm/angular_update_ratio/"
    WEIGHT_NORM = "sdm/weight_norm/"
    IN_EQUILIBRIUM = "sdm/in_equilibrium/"
    #: ``1 - tolerance`` and ``1 + tolerance``: the band the ratio settles in at equilibrium (the
    #: bounds of the ratio's margin chart in TensorBoard's Custom Scalars).
    TOLERANCE_LOWER = "sdm/tolerance_band/lower"
    TOLERANCE_UPPER = "sdm/tolerance_band/upper"
    #: Per unit: the regime's code in :data:`REGIME_CODES` (what ``lightning-sdm report`` reads;
    #: TensorBoard also gets the regimes as the text ``sdm/regimes``).
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
        [('sdm/angular_update/net.0.weight', 0.02),
         ('sdm/angular_update_balance/net.0.weight', nan),
         ('sdm/angular_update_ratio/net.0.weight', 0.8),
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
    balance = window.balance
    metrics[f"{Keys.BALANCE}{name}"] = balance if balance is not None else math.nan
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

    The median is over the ratio each unit's chart shows: with channel summaries, the channels'
    median (the overview then agrees with the per-unit lines). With ``regimes``, also how many
    units are in each regime given (zeros included: the caller passes the regimes seen so far,
    so that a chart, once started, stays aligned).

    Example::

        >>> from lightning_sdm.records import UnitWindow
        >>> channels = UnitWindow("c", 8, 8, 0.02, 0.02, 0.025, 0.8, 3.1, 8, 0.1,
        ...                       channel_ratios={"median": 0.6})
        >>> layer = UnitWindow("l", 8, 8, 0.02, 0.02, 0.025, 1.0, 3.1, 8, 0.1)
        >>> summary_metrics([channels, layer], 0.5, 10.0, {"relaxing": 2})[Keys.MEDIAN_RATIO]
        0.8
    """
    shown = [(w.channel_ratios or {}).get("median", w.ratio) for w in windows]
    ratios = sorted(r for r in shown if r is not None and math.isfinite(r))
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
            if regime in regimes:
                metrics[f"{Keys.REGIME_COUNT}{regime}"] = float(regimes[regime])
    return metrics


def event_metrics(event: EquilibriumEvent, decays: int | None) -> dict[str, float]:
    """The scalars logged with an equilibrium event (``decays``: LR decays so far, if any)."""
    metrics = {Keys.EVENT_STEP: float(event.global_step)}
    if decays is not None:
        metrics[Keys.LR_DECAYS] = float(decays)
    if event.new_lrs:
        metrics[Keys.LR_AFTER_EVENT] = event.new_lrs[0]
    return metrics
