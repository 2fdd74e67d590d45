"""The records everything else exchanges, and the option types (logged keys: ``keys``).

This module is the schema of the package and imports neither torch nor Lightning, so the report
command, the run-data readers and the loggers can read it cheaply:

* :class:`UnitWindow`: what one unit did over one measurement window (the monitor's output);
* :class:`HistoryRecord`: one row of ``SphericalDynamicsCallback.history`` (a window with the
  detector's verdict, the invariance check and both clocks);
* :class:`EquilibriumEvent`: the quorum of units reached equilibrium, and what was done about it;
* ``Literal`` aliases for every option (``Granularity``, ``ActionName``, ...).

Two clocks, named everywhere (a bare "step" is ambiguous once there are several optimizers):

* ``optimizer_step``: optimizer steps taken by the optimizer that updates the unit. It is the
  clock of the physics: relaxation times and cooldowns are counted in it.
* ``global_step``: Lightning's ``trainer.global_step`` (the steps of all optimizers together, the
  x axis of every logger). Without a Trainer the monitor counts the steps of all its optimizers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from lightning_sdm._checks import check_record

__all__ = [
    "CHANNEL_SUMMARIES",
    "GRANULARITIES",
    "REGIMES",
    "ActionName",
    "Criterion",
    "EquilibriumEvent",
    "Granularity",
    "HistoryRecord",
    "Invariance",
    "Regime",
    "UnitSource",
    "UnitWindow",
]

#: ``"layer"``: one angle per unit (Wan et al. 2020); ``"channel"``: one per output channel
#: (Kosson et al. 2024), logged as summary statistics.
Granularity = Literal["layer", "channel"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
#: The built-in reactions to an equilibrium event (see :mod:`lightning_sdm.actions`).
ActionName = Literal["warn", "decay_lr", "stop"]
#: Outcome of the gradient-orthogonality cross-check of a unit.
Invariance = Literal["verified", "violated", "unverified"]
#: ``"theory"``: measured against the prediction; ``"stationary"``: no prediction exists;
#: ``"budget"`` (events only): the training budget, not equilibrium, triggered it.
Criterion = Literal["theory", "stationary", "budget"]
#: How a unit was found.
UnitSource = Literal["trace", "registration_order", "explicit"]
#: The detector's verdict per unit (see :mod:`lightning_sdm.equilibrium`).
Regime = Literal[
    "unknown",
    "relaxing",
    "equilibrium",
    "tracking",
    "lagging",
    "non_stationary",
    "no_prediction",
    "frozen",
    "invalid",
]
REGIMES: tuple[str, ...] = get_args(Regime)

#: Statistics over a unit's channels logged with ``granularity="channel"`` (key suffixes).
CHANNEL_SUMMARIES: tuple[str, ...] = ("mean", "std", "min", "p10", "median", "p90", "max")


@dataclass(frozen=True)
class UnitWindow:
    """What one unit did over one measurement window.

    Attributes:
        unit: the unit's name.
        optimizer_step: steps taken by the unit's optimizer when the window closed.
        global_step: the global clock when the window closed (see the module docstring).
        angular_update: RMS angular update (radians per step) over the window.
        last: angular update of the last step of the window.
        theory: predicted equilibrium (RMS over the window's learning rates), ``None`` when no
            prediction exists for the unit's optimizer/param group.
        ratio: ``angular_update / theory`` (``None`` without a prediction).
        weight_norm: norm of the unit (weight and bias together) at the end of the window.
        steps: number of measured steps in the window.
        lr: learning rate of the unit's param group at the last measured step.
        frozen: the unit had no gradient (frozen); its angle is 0 and it has no prediction.
        channels: with ``granularity="channel"``, summary statistics over the unit's channels of
            the per-channel RMS angular update (keys in :data:`CHANNEL_SUMMARIES`), else
            ``None`` (also for a unit that is invariant only as a whole, such as one followed by
            LayerNorm: it has no per-channel angle to summarise).
        channel_ratios: same summaries of per-channel ``angular_update / theory``.
        time_scale: e-folding time (optimizer steps) of the relaxation towards equilibrium under
            the current hyper-parameters (:func:`lightning_sdm.theory.relaxation_time`), ``None``
            where theory gives none.
        horizon_angular_update: with ``horizon=h > 1``, the RMS over the window of the angle
            between ``w_t`` and ``w_{t+h}`` (not the sum of the ``h`` one-step angles: angles on
            a sphere do not add, and a random walk covers only about ``sqrt(h)`` of them).
        norm_exponent: how the equilibrium norm scales with the LR
            (:func:`lightning_sdm.theory.equilibrium_norm_exponent`: 1/4 for SGD, 1/2 for AdamW),
            ``None`` without a prediction; the detector reads the norm's trend with it.
        trajectory: the RMS angular update the norm balance predicted for this window from the
            real per-step LR and weight decay since the unit's first window
            (:mod:`lightning_sdm.theory._trajectory`), made before the window was measured;
            ``None`` for the first window and without a prediction. Under a constant LR it
            tends to ``theory``; under a schedule it says where the weights should be now.
        balance: the radial balance (:mod:`lightning_sdm.theory._balance`): the RMS angle the
            norm balance gives with the update's radial part (its component along the weight)
            as measured over the window, for decoupled weight decay (AdamW, Muon, Lion); for
            SGD, whose radial part momentum and weight decay fix, the prediction itself;
            ``None`` without a prediction and for Adafactor. ``balance / theory`` is the share
            of ``ratio`` that the task's gradients make (1 on white noise), ``angular_update /
            balance`` the share of a norm that has not settled (1 once it has).
    """

    unit: str
    optimizer_step: int
    global_step: int
    angular_update: float
    last: float
    theory: float | None
    ratio: float | None
    weight_norm: float
    steps: int
    lr: float
    frozen: bool = False
    channels: dict[str, float] | None = None
    channel_ratios: dict[str, float] | None = None
    time_scale: float | None = None
    horizon_angular_update: float | None = None
    norm_exponent: float | None = None
    trajectory: float | None = None
    balance: float | None = None

    def __post_init__(self) -> None:
        # Built by the monitor, or by hand (plain PyTorch loops, tests): a wrong field fails
        # here, naming it, not later in the detector's arithmetic.
        check_record(UnitWindow, self.__dict__, "a UnitWindow")


@dataclass(frozen=True)
class HistoryRecord:
    """One unit in one logged window, as kept in ``SphericalDynamicsCallback.history``.

    ``pandas.DataFrame(callback.history)`` gives one column per field. The fields of
    :class:`UnitWindow`, plus:

    Attributes:
        in_equilibrium: the detector's verdict after this window.
        regime: the detector's regime (:data:`Regime`) and ``regime_note`` its explanation.
        equilibrium_criterion: what the verdict was based on (:data:`Criterion`).
        invariance: the gradient-orthogonality cross-check (:data:`Invariance`).
    """

    unit: str
    optimizer_step: int
    global_step: int
    angular_update: float
    theory: float | None
    ratio: float | None
    weight_norm: float
    lr: float
    in_equilibrium: bool
    regime: Regime = "unknown"
    regime_note: str = ""
    equilibrium_criterion: Criterion = "theory"
    invariance: Invariance = "unverified"
    frozen: bool = False
    channels: dict[str, float] | None = None
    channel_ratios: dict[str, float] | None = None
    time_scale: float | None = None
    horizon_angular_update: float | None = None
    trajectory: float | None = None
    balance: float | None = None

    @classmethod
    def from_window(
        cls,
        window: UnitWindow,
        *,
        in_equilibrium: bool,
        criterion: Criterion,
        invariance: Invariance,
        regime: Regime = "unknown",
        regime_note: str = "",
    ) -> HistoryRecord:
        """The record of ``window`` with the detector's verdict and the invariance check."""
        values = {f.name: getattr(window, f.name) for f in fields(cls) if hasattr(window, f.name)}
        return cls(
            **values,
            in_equilibrium=in_equilibrium,
            regime=regime,
            regime_note=regime_note,
            equilibrium_criterion=criterion,
            invariance=invariance,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain-type copy (checkpoints load with ``weights_only=True``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HistoryRecord:
        """Inverse of :meth:`as_dict`; unknown keys are ignored.

        Raises:
            ValueError: for a damaged record (a missing or mistyped field), naming it.
        """
        return cls(**check_record(cls, values, "a history record"))


@dataclass(frozen=True)
class EquilibriumEvent:
    """The monitored units reached equilibrium (the quorum of them did), and what was done.

    Attributes:
        global_step: the global clock when the event fired.
        units: the units in equilibrium.
        fraction: fraction of units in equilibrium.
        measured: RMS angular update per unit in equilibrium.
        predicted: prediction per unit (``None`` without one).
        criterion: ``"theory"`` or ``"stationary"`` (the latter if any unit used it), or
            ``"budget"`` for the planned final decay of :class:`~lightning_sdm.actions.DecayLR`.
        action: what was done (``"warn"``, ``"decay_lr"``, ``"stop"``, ``"callable"``, or
            ``"none"``: a decay was due but ``min_lr``/``max_decays`` forbade it).
        old_lrs: learning rates of the affected param groups before the action.
        new_lrs: and after it.
        cooldown: optimizer steps the detector waits before it may declare equilibrium again
            (the relaxation the action started; 0 when it changed nothing).
        note: why the action did what it did, when it is not obvious (a decay skipped because
            the budget leaves no time to relax, the planned final decay).
    """

    global_step: int
    units: tuple[str, ...]
    fraction: float
    measured: dict[str, float]
    predicted: dict[str, float | None]
    criterion: Criterion
    action: str = "warn"
    old_lrs: tuple[float, ...] = ()
    new_lrs: tuple[float, ...] = ()
    cooldown: int = 0
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain-type copy (for checkpoints and loggers)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EquilibriumEvent:
        """Inverse of :meth:`as_dict`; unknown keys are ignored.

        Raises:
            ValueError: for a damaged event (a missing or mistyped field), naming it.
        """
        kept = check_record(cls, values, "an equilibrium event")
        for key in ("units", "old_lrs", "new_lrs"):
            kept[key] = tuple(kept.get(key, ()))
        return cls(**kept)
