"""What the hyper-parameters and the LR schedule will do to the scale-invariant weights, in advance.

From the optimizer's param groups and the schedule alone (no data, no step taken), per param
group holding monitored units:

* the predicted equilibrium angular update (:mod:`lightning_sdm.theory`) and the relaxation time
  ``tau`` (e-folding time of ``|w|^p``; SGD: ``(1 - momentum) / (4 lr wd)``, AdamW:
  ``1 / (2 lr wd)``), in steps and epochs;
* the EMA timescale ``1 / (lr wd)`` of Wang & Aitchison (2024, "How to set AdamW's weight decay
  as you scale model and dataset size"): the weights are an exponential moving average of the
  updates over about that many steps. Shorter than an epoch: the weight decay is very strong;
  longer than the run: the weights never forget their initialisation;
* per phase of the schedule (a phase ends where the LR jumps by 25% or more): whether the weights
  can re-equilibrate within it. After a jump by ``k`` the angular update needs
  :func:`~lightning_sdm.theory.lr_change_relaxation_steps` to get within 5% of the new
  prediction (SMD Cor. 3.1: ``ln(k) (1 - momentum) / (2 wd lr)``, printed beside it); a phase
  shorter than that ends out of equilibrium, and the advice says by how much and what would fit
  (SMD's rescaling at the decay, a larger weight decay, a longer phase). Inside a phase whose LR
  moves smoothly (cosine, warm-up), the weights lag when the LR changes by more than the
  tolerance per relaxation time.

:func:`advise` computes it; :class:`Advice` holds it as data (:meth:`Advice.as_dict`) and as
text (:meth:`Advice.table`, :meth:`Advice.warnings`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch.optim import Optimizer

from lightning_sdm._checks import check_integer
from lightning_sdm.advice._schedule import ScheduledLR, sample_learning_rates
from lightning_sdm.theory._optimizers import check_optimizers, unwrap
from lightning_sdm.theory._predictions import (
    Prediction,
    lr_change_relaxation_steps,
    predict_param_group,
)
from lightning_sdm.theory._predictions import relaxation_time as _relaxation_time
from lightning_sdm.theory._trajectory import trajectory_constants

__all__ = ["Advice", "GroupAdvice", "Phase", "advise"]

# A phase ends where the LR jumps by at least this factor between two steps, and by far more
# than on the steps around it (a warm-up ramp changes the LR by a large factor at its start too,
# but smoothly).
_JUMP = 1.25
_ISOLATED = 5.0
# Decays below this fraction of the peak LR are the annealing tail, not a phase to re-equilibrate.
_TAIL = 0.01
# "Near equilibrium": within this relative distance of the prediction.
_NEAR = 0.05


@dataclass(frozen=True)
class Phase:
    """A stretch of the schedule without LR jumps.

    Attributes:
        start: first optimizer step; ``end``: one past the last.
        lr_start: LR at ``start``; ``lr_end``: at ``end - 1``; ``lr_peak``: the largest in it.
        angular_update: predicted equilibrium at ``lr_peak`` (``None``: no prediction).
        relaxation_time: ``tau`` at ``lr_peak`` (steps), ``None`` without one.
        needed: steps to get within 5% of the prediction after the jump into this phase (``None``
            for the first phase, whose start depends on the initialisation, or without ``tau``).
        smd_steps: SMD Cor. 3.1 for that jump (SGD only), for comparison.
        fits: whether ``needed`` fits in the phase (``None`` when ``needed`` is).
        lag_onset: inside the phase, the first step from which the LR falls by more than 10%
            per relaxation time (the weights no longer follow it), ``None`` if it never does.
        tail: the phase starts below 1% of the peak LR (the annealing tail).
        expected_ratio: at the phase's last step, the angular update the norm balance predicts
            along the whole sampled schedule, over the equilibrium at that step's LR
            (:func:`~lightning_sdm.theory.angular_update_trajectory`, starting in equilibrium at
            step 0): 1 when the weights have caught up, below 1 while they lag a decay, above
            while they lag a rise; ``None`` without a prediction.
    """

    start: int
    end: int
    lr_start: float
    lr_end: float
    lr_peak: float
    angular_update: float | None
    relaxation_time: float | None
    needed: float | None
    smd_steps: float | None
    fits: bool | None
    lag_onset: int | None
    tail: bool
    expected_ratio: float | None = None

    @property
    def length(self) -> int:
        """Optimizer steps in the phase."""
        return self.end - self.start


@dataclass(frozen=True)
class GroupAdvice:
    """The advice for one param group that holds monitored units."""

    optimizer_index: int
    group_index: int
    units: tuple[str, ...]
    prediction: Prediction  # at the peak LR of the schedule
    ema_timescale: float | None  # 1 / (lr wd) in steps, at the peak LR
    steps_per_epoch: int | None
    phases: tuple[Phase, ...]
    notes: tuple[str, ...]  # actionable lines, most important first

    @property
    def label(self) -> str:
        """``"SGD, optimizer 0 group 1 (net.0.weight, ...)"``."""
        shown = ", ".join(self.units[:3]) + (", ..." if len(self.units) > 3 else "")
        where = f"optimizer {self.optimizer_index} group {self.group_index}"
        return f"{self.prediction.optimizer}, {where} ({shown})"


@dataclass(frozen=True)
class Advice:
    """Per param group: what the hyper-parameters predict and where the schedule does not fit."""

    groups: tuple[GroupAdvice, ...]
    total_steps: int | None
    note: str = ""

    def warnings(self) -> list[str]:
        """The actionable lines of every group (empty when everything fits)."""
        return [f"{group.label}: {note}" for group in self.groups for note in group.notes]

    def table(self) -> str:
        """A compact text table: one block per group, one line per phase."""
        lines = []
        for group in self.groups:
            epoch = group.steps_per_epoch
            lines.append(f"{group.label}:")
            if group.ema_timescale is not None:
                lines.append(
                    f"  at the peak LR: {group.prediction.reason}; EMA timescale 1/(lr*wd): "
                    f"{_steps(group.ema_timescale, epoch)}"
                )
            lines.append(
                "  phase  steps              lr                    angle/step  tau (at peak lr)"
                "              re-equilibrates"
            )
            for number, phase in enumerate(group.phases, 1):
                tau = phase.relaxation_time
                lines.append(
                    f"  {number:<5}  {phase.start:>7,}-{phase.end:<9,} {_lr_range(phase):<21} "
                    f"{_value(phase.angular_update):<11} "
                    f"{_steps(tau, epoch) if tau else 'n/a':<29} {_verdict(phase, epoch)}"
                )
            ratios = [p.expected_ratio for p in group.phases]
            if any(r is not None for r in ratios):
                lines.append(
                    "  expected angle / equilibrium at each phase's end (the norm balance along "
                    "this schedule, from equilibrium): "
                    + ", ".join("n/a" if r is None else f"{r:.2g}" for r in ratios)
                )
        if self.note:
            lines.append(f"Note: {self.note}")
        return "\n".join(lines)

    def text(self) -> str:
        """The table, then the actionable lines."""
        warnings = self.warnings()
        return self.table() + ("\n\n" + "\n".join(f"! {w}" for w in warnings) if warnings else "")

    def as_dict(self) -> dict[str, Any]:
        """Plain values (for run configs and summaries)."""
        return {
            "total_steps": self.total_steps,
            "note": self.note,
            "groups": [
                {
                    "optimizer_index": g.optimizer_index,
                    "group_index": g.group_index,
                    "units": list(g.units),
                    "prediction": g.prediction.angular_update,
                    "rule": g.prediction.rule,
                    "ema_timescale": g.ema_timescale,
                    "steps_per_epoch": g.steps_per_epoch,
                    "phases": [asdict(p) for p in g.phases],
                    "notes": list(g.notes),
                }
                for g in self.groups
            ],
        }


def advise(
    optimizers: Sequence[Optimizer],
    units: Mapping[str, tuple[int, int]],
    total_steps: int | None,
    steps_per_epoch: int | None = None,
    schedulers: Sequence[ScheduledLR] = (),
) -> Advice:
    """What each param group holding ``units`` will do over the budget.

    Args:
        optimizers: the optimizers (read only).
        units: unit name -> (optimizer index, param group index).
        total_steps: optimizer steps in the budget (``None``: unknown; one phase, no budget
            checks).
        steps_per_epoch: optimizer steps per epoch, to show epochs and sample epoch schedulers.
        schedulers: the schedulers as the Trainer steps them; each is sampled on a copy.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(8, 8))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-4)
        >>> sched = torch.optim.lr_scheduler.MultiStepLR(opt, [30, 60], gamma=0.1)
        >>> advice = advise([opt], {"conv": (0, 0)}, 90 * 5005, 5005, [ScheduledLR(sched)])
        >>> [round(p.relaxation_time) for p in advice.groups[0].phases]
        [2500, 25000, 250000]
        >>> print(advice.warnings()[0])  # doctest: +NORMALIZE_WHITESPACE
        SGD, optimizer 0 group 0 (conv): after the LR jump at step 300,300 (0.01 -> 0.001) the
        angular update needs 1,105,635 steps (220.9 epochs) to get within 5% of its new
        equilibrium (SMD Cor. 3.1: 1,151,293 steps), and the phase has 150,150 steps (30.0
        epochs): it ends 7.4x short. To fit: rescale the invariant weights at the jump
        (DecayLR(rescale_weights=True), or lightning_sdm.actions.rescale_for_lr_decay), or a
        weight decay 7.4x larger (0.00074), or a phase of 1,105,635 steps.
    """
    _check_advise_arguments(optimizers, units, total_steps, steps_per_epoch)
    by_group: dict[tuple[int, int], list[str]] = {}
    for name, where in units.items():
        by_group.setdefault(where, []).append(name)
    notes = []
    groups = []
    for (opt_index, group_index), names in sorted(by_group.items()):
        optimizer = unwrap(optimizers[opt_index])
        own = [
            s for s in schedulers if unwrap(getattr(s.scheduler, "optimizer", None)) is optimizer
        ]
        steps = total_steps if total_steps else 1
        trajectory = sample_learning_rates(optimizer, own, steps, steps_per_epoch)
        if trajectory.note and trajectory.note not in notes:
            notes.append(trajectory.note)
        group = optimizer.param_groups[group_index]
        groups.append(
            _group_advice(
                optimizer,
                opt_index,
                group_index,
                group,
                tuple(names),
                trajectory.changes[group_index],
                trajectory.total_steps if total_steps else None,
                steps_per_epoch,
            )
        )
    return Advice(tuple(groups), total_steps, "; ".join(notes))


def _group_advice(
    optimizer: Optimizer,
    opt_index: int,
    group_index: int,
    group: Mapping[str, Any],
    names: tuple[str, ...],
    changes: Sequence[tuple[int, float]],
    total_steps: int | None,
    steps_per_epoch: int | None,
) -> GroupAdvice:
    peak_lr = max(lr for _, lr in changes)
    prediction = predict_param_group(optimizer, {**group, "lr": peak_lr})
    wd = prediction.hyperparameters.get("weight_decay", 0.0)
    ema = 1.0 / (peak_lr * wd) if peak_lr > 0 and wd > 0 and prediction.available else None
    phases = _phases(optimizer, group, changes, total_steps)
    phases = _with_expected_ratios(prediction, phases, changes)
    notes = [
        _phase_note(phase, previous, wd, steps_per_epoch)
        for previous, phase in itertools.pairwise(phases)
        if phase.lr_start < previous.lr_end and phase.lr_start >= _TAIL * peak_lr
    ]
    notes = [n for n in notes if n]
    notes += _lag_notes(phases, steps_per_epoch)
    if ema is not None:
        notes += _timescale_notes(ema, total_steps, steps_per_epoch)
    return GroupAdvice(
        opt_index,
        group_index,
        names,
        prediction,
        ema,
        steps_per_epoch,
        tuple(phases),
        tuple(notes),
    )


def _with_expected_ratios(
    prediction: Prediction, phases: Sequence[Phase], changes: Sequence[tuple[int, float]]
) -> list[Phase]:
    """Each phase with the trajectory's ratio to the equilibrium at its last step.

    The norm balance of :mod:`lightning_sdm.theory._trajectory` integrated over the run-length
    encoded schedule: over a run of one LR the relaxation of ``q`` is exact in closed form, so a
    step schedule of a million steps costs one term per change.
    """
    constants = trajectory_constants(prediction)
    wd = prediction.hyperparameters.get("weight_decay", 0.0)
    first = changes[0][1] if changes else 0.0
    if constants is None or not first > 0 or not wd > 0:
        return list(phases)
    # Units where G = 1, starting in equilibrium at the first LR (see angular_update_trajectory).
    q = first * constants.growth / (constants.decay * wd)
    bounds = [step for step, _ in changes]
    out = []
    position, index = 0, 0
    for phase in phases:
        last = phase.end - 1
        while position < last:
            while index + 1 < len(bounds) and bounds[index + 1] <= position:
                index += 1
            lr = changes[index][1]
            run_end = bounds[index + 1] if index + 1 < len(bounds) else last
            n = max(min(run_end, last) - position, 1)
            x = constants.decay * max(lr, 0.0) * wd
            target = lr * constants.growth / (constants.decay * wd) if lr > 0 else 0.0
            q = target + (q - target) * math.exp(-n * x)
            position += n
        lr_last = _lr_at(changes, last)  # once per phase
        ratio = None
        if lr_last > 0 and q > 0:
            # angle^2 = lr^2 / q against the equilibrium's lr^2 / q*: ratio = sqrt(q* / q).
            ratio = math.sqrt(lr_last * constants.growth / (constants.decay * wd) / q)
        out.append(replace(phase, expected_ratio=ratio))
    return out


def _phases(
    optimizer: Optimizer,
    group: Mapping[str, Any],
    changes: Sequence[tuple[int, float]],
    total_steps: int | None,
) -> list[Phase]:
    """Split the trajectory at LR jumps; evaluate the theory in each phase."""
    end_of_run = total_steps if total_steps else changes[-1][0] + 1
    jumps = [changes[i][0] for i in range(1, len(changes)) if _is_jump(changes, i)]
    # Below 1% of the peak LR the schedule anneals: one tail phase, not one per step down.
    peak = max(lr for _, lr in changes)
    tail = [step for step in jumps if _lr_at(changes, step) < _TAIL * peak]
    bounds = [0, *(step for step in jumps if step not in tail[1:]), end_of_run]
    phases: list[Phase] = []
    for start, end in itertools.pairwise(bounds):
        phases.append(_phase(optimizer, group, changes, start, end, phases[-1] if phases else None))
    return phases


def _phase(
    optimizer: Optimizer,
    group: Mapping[str, Any],
    changes: Sequence[tuple[int, float]],
    start: int,
    end: int,
    previous: Phase | None,
) -> Phase:
    def tau_at(lr: float) -> float | None:
        return _relaxation_time(predict_param_group(optimizer, {**group, "lr": lr}))

    lr_start, lr_end = _lr_at(changes, start), _lr_at(changes, end - 1)
    lr_peak = max([lr for step, lr in changes if start <= step < end] + [lr_start])
    prediction = predict_param_group(optimizer, {**group, "lr": lr_peak})
    needed = smd = None
    tau_start = tau_at(lr_start)
    if previous is not None and tau_start is not None and previous.lr_end > 0 and lr_start > 0:
        ratio = lr_start / previous.lr_end
        needed = lr_change_relaxation_steps(ratio, tau_start, _NEAR)
        if prediction.family == "sgd" and ratio < 1:
            smd = 2.0 * tau_start * math.log(1.0 / ratio)  # SMD Cor. 3.1: ln(k) (1-a)/(2 wd lr)
    tau_peak = _relaxation_time(prediction)
    onset = None
    if tau_peak is not None:  # tau is proportional to 1/lr (SGD and decoupled decay alike)
        inside = [(step, lr) for step, lr in changes if start <= step < end]
        onset = _lag_onset(inside, tau_peak * lr_peak)
    fits = None if needed is None else needed <= end - start
    tail = previous is not None and lr_start < _TAIL * peak_of(changes)
    return Phase(
        start, end, lr_start, lr_end, lr_peak, prediction.angular_update, tau_peak, needed, smd,
        fits, onset, tail,
    )  # fmt: skip


def peak_of(changes: Sequence[tuple[int, float]]) -> float:
    """The largest LR of a trajectory."""
    return max(lr for _, lr in changes)


def _lag_onset(inside: Sequence[tuple[int, float]], tau_times_lr: float) -> int | None:
    """The first step where the LR falls by more than 10% per relaxation time."""
    for (step, lr), (next_step, next_lr) in itertools.pairwise(inside):
        if next_lr <= 0:
            return next_step
        if next_lr < lr:
            rate = math.log(lr / next_lr) / (next_step - step)
            if rate * tau_times_lr / next_lr > 0.1:
                return step
    return None


def _phase_note(phase: Phase, previous: Phase, wd: float, epoch: int | None) -> str:
    if phase.fits is not False or phase.needed is None:
        return ""
    short = phase.needed / max(phase.length, 1)
    smd = f" (SMD Cor. 3.1: {phase.smd_steps:,.0f} steps)" if phase.smd_steps else ""
    return (
        f"after the LR jump at step {phase.start:,} ({previous.lr_end:.3g} -> "
        f"{phase.lr_start:.3g}) the angular update needs {_steps(phase.needed, epoch)} "
        f"to get within 5% of its new equilibrium{smd}, and the phase has "
        f"{_steps(phase.length, epoch)}: it ends {short:.1f}x short. To fit: rescale the "
        "invariant weights at the jump (DecayLR(rescale_weights=True), or "
        "lightning_sdm.actions.rescale_for_lr_decay), or a weight decay "
        f"{short:.1f}x larger ({wd * short:.2g}), or a phase of {phase.needed:,.0f} steps."
    )


def _lag_notes(phases: Sequence[Phase], epoch: int | None) -> list[str]:
    """Where the weights stop following a falling LR (once per group: the first such place)."""
    for phase in phases:
        if phase.lag_onset is not None and not phase.tail:
            return [
                f"from about step {phase.lag_onset:,} on, the LR falls by more than 10% per "
                "relaxation time: the weights no longer follow it, and the angular update lags "
                "its prediction (regime 'lagging'; the annealing a decaying schedule relies on)."
            ]
    return []


def _timescale_notes(ema: float, total_steps: int | None, epoch: int | None) -> list[str]:
    if epoch and ema < epoch:
        return [
            f"EMA timescale 1/(lr*wd) = {_steps(ema, epoch)}, under one epoch: the weight decay "
            "is very strong (the weights forget everything older than a fraction of an epoch)."
        ]
    if total_steps and ema > total_steps:
        return [
            f"EMA timescale 1/(lr*wd) = {_steps(ema, epoch)}, longer than the whole run "
            f"({_steps(total_steps, epoch)}): the weights never forget their initialisation; "
            "a larger weight decay or LR shortens it."
        ]
    return []


def _is_jump(changes: Sequence[tuple[int, float]], index: int) -> bool:
    """Whether the change at ``changes[index]`` is a jump.

    Large, and isolated: the LR moves far less on the neighbouring steps.
    """

    def size(i: int) -> float:
        before, after = changes[i - 1][1], changes[i][1]
        if before <= 0 or after <= 0:
            return math.inf if before != after else 0.0
        return abs(math.log(after / before))

    step = changes[index][0]
    neighbours = [
        size(i)
        for i in (index - 1, index + 1)
        if 0 < i < len(changes) and abs(changes[i][0] - step) == 1
    ]
    here = size(index)
    return here >= math.log(_JUMP) and all(here >= _ISOLATED * n for n in neighbours)


def _lr_at(changes: Sequence[tuple[int, float]], step: int) -> float:
    value = changes[0][1]
    for start, lr in changes:
        if start > step:
            break
        value = lr
    return value


def _steps(steps: float, epoch: int | None) -> str:
    return f"{steps:,.0f} steps" + (f" ({steps / epoch:.1f} epochs)" if epoch else "")


def _lr_range(phase: Phase) -> str:
    if phase.lr_start == phase.lr_end == phase.lr_peak:
        return f"{phase.lr_start:.4g}"
    peak = "" if phase.lr_peak in (phase.lr_start, phase.lr_end) else f" > {phase.lr_peak:.3g}"
    return f"{phase.lr_start:.3g}{peak} > {phase.lr_end:.3g}"


def _value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _verdict(phase: Phase, epoch: int | None) -> str:
    if phase.tail:
        return "annealing tail (below 1% of the peak LR)"
    if phase.needed is None:
        return "from initialisation (a few tau)" if phase.start == 0 else "n/a"
    if phase.fits:
        return f"yes, in {_steps(phase.needed, epoch)}"
    return f"NO: needs {_steps(phase.needed, epoch)}"


def _check_advise_arguments(
    optimizers: Any, units: Any, total_steps: Any, steps_per_epoch: Any
) -> None:
    """Errors naming the argument, before any schedule is sampled."""
    check_optimizers(optimizers)
    if not isinstance(units, Mapping):
        raise ValueError(
            "`units` must map each unit to (optimizer index, param group index), got "
            f"{type(units).__name__}."
        )
    for name, where in units.items():
        ok = (
            isinstance(where, tuple)
            and len(where) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in where)
        )
        if not ok or not 0 <= where[0] < len(optimizers):
            raise ValueError(
                f"`units`: {name!r} -> {where!r} is not (optimizer index, group index) of the "
                f"{len(optimizers)} optimizer(s)."
            )
        groups = unwrap(optimizers[where[0]]).param_groups
        if not 0 <= where[1] < len(groups):
            raise ValueError(
                f"`units`: {name!r} names param group {where[1]} of optimizer {where[0]}, which "
                f"has {len(groups)}."
            )
    check_integer("total_steps", total_steps, 0, allow_none=True)
    check_integer("steps_per_epoch", steps_per_epoch, 1, allow_none=True)
