"""What the hyper-parameters and the LR schedule will do to the scale-invariant weights, in advance.

From the optimizer's param groups and the schedule alone (no data, no step taken), per param
group holding monitored units (every value at each step as the schedulers set it: the LR, and
the momentum, Adam's betas or the weight decay where a scheduler changes them, as OneCycleLR
cycles the momentum against the LR):

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
  tolerance per relaxation time;
* per phase, from the norm balance of :mod:`lightning_sdm.theory._trajectory` integrated over the
  whole sampled schedule (no rule of thumb): the step from which the angle is within the
  detector's tolerance of its equilibrium at the step's LR, and the step from which it lags
  again. The ratio to the equilibrium does not depend on the update size, which is unknown before
  step 1, but the start does: the reference starts from the initial norm at the equilibrium of the
  first phase's peak LR, and the catch-up is also given from a first angle ``start_factor`` x
  above and below it;
* the units still beyond tolerance at the end of the budget (the last LR phase shorter than its
  relaxation, an annealing schedule), by how much and how many steps at the final LR would close
  the gap.

:func:`advise` computes it; :class:`Advice` holds it as data (:meth:`Advice.as_dict`) and as
text (:meth:`Advice.table`, :meth:`Advice.warnings`).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_sdm import _messages
from lightning_sdm._checks import check_fraction, check_integer, check_number
from lightning_sdm.advice._schedule import (
    LRTrajectory,
    ScheduledLR,
    _value_at,
    sample_learning_rates,
)
from lightning_sdm.equilibrium._detector import EquilibriumDetector
from lightning_sdm.theory._optimizers import check_optimizers, unwrap
from lightning_sdm.theory._predictions import (
    Prediction,
    for_shape,
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
# The detector's default band, for the advice's "within tolerance" (the callback passes its own).
_DEFAULT_TOLERANCE = EquilibriumDetector.DEFAULT_TOLERANCE
# Before step 1 the update size is unknown, and with it where the initial norm stands against its
# equilibrium: the advice states a start this many times above and below (a typical He/Xavier
# initialisation against a weight decay of 1e-4 to 1e-1 lands within about that, either way).
_START_FACTOR = 3.0
# Without a budget, the schedule is sampled (and shown) over this many optimizer steps.
_UNKNOWN_HORIZON = 20_000


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
            (:func:`~lightning_sdm.theory.angular_update_trajectory`), from the initial norm at
            the equilibrium of the first phase's peak LR: 1 when the weights have caught up,
            below 1 while they lag a decay, above while they lag a rise; ``None`` without a
            prediction.
        within: the first step of the phase at which that trajectory is within the tolerance of
            the equilibrium at the step's LR (``None``: not within this phase, or no prediction).
        leaves: the first step after ``within`` at which it is beyond the tolerance again (the
            weights lag a falling LR), ``None`` if it stays within to the phase's end.
        within_off: ``within`` from a start ``Advice.start_factor`` x above and below the
            equilibrium (the update size, hence the start, is unknown before step 1).
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
    within: int | None = None
    leaves: int | None = None
    within_off: tuple[int | None, int | None] = (None, None)

    @property
    def length(self) -> int:
        """Optimizer steps in the phase."""
        return self.end - self.start


@dataclass(frozen=True)
class GroupAdvice:
    """The advice for one param group that holds monitored units, or for several alike.

    Param groups with the same optimizer class, the same settings and the same sampled LR
    schedule get the same advice: they share one (``places`` lists them all, ``optimizer_index``
    and ``group_index`` name the first).
    """

    optimizer_index: int
    group_index: int
    units: tuple[str, ...]
    prediction: Prediction  # at the peak LR of the schedule
    ema_timescale: float | None  # 1 / (lr wd) in steps, at the peak LR
    steps_per_epoch: int | None
    phases: tuple[Phase, ...]
    notes: tuple[str, ...]  # actionable lines, most important first
    # At the last step with LR > 0, the trajectory's angle over the equilibrium at that LR (from
    # the reference start; ``end_ratio_off``: the lowest and highest from a start off by the
    # stated factor), ``None`` without a prediction.
    end_ratio: float | None = None
    end_ratio_off: tuple[float, float] | None = None
    # Every (optimizer index, group index) this advice covers (empty: the one named above).
    places: tuple[tuple[int, int], ...] = ()
    # Where the equilibrium depends on the matrix's shape (Muon), per shape: the rows x columns
    # it is predicted for, the angular update at the peak LR and its units; else empty.
    by_shape: tuple[tuple[tuple[int, int], float | None, tuple[str, ...]], ...] = ()

    @property
    def where(self) -> str:
        """``"optimizer 0 group 1"``, ``"optimizer 0 groups 0, 2 + optimizer 1 group 0"``."""
        places = self.places or ((self.optimizer_index, self.group_index),)
        by_optimizer: dict[int, list[int]] = {}
        for optimizer, group in places:
            by_optimizer.setdefault(optimizer, []).append(group)
        return " + ".join(
            f"optimizer {o} group{'s' if len(g) > 1 else ''} {', '.join(map(str, g))}"
            for o, g in by_optimizer.items()
        )

    @property
    def label(self) -> str:
        """``"SGD, optimizer 0 group 1 (net.0.weight, ...)"``."""
        shown = ", ".join(self.units[:3]) + (", ..." if len(self.units) > 3 else "")
        return f"{self.prediction.optimizer}, {self.where} ({shown})"


@dataclass(frozen=True)
class Advice:
    """Per param group: what the hyper-parameters predict and where the schedule does not fit."""

    groups: tuple[GroupAdvice, ...]
    total_steps: int | None
    note: str = ""
    tolerance: float = _DEFAULT_TOLERANCE  # of the angle to its equilibrium (the detector's)
    start_factor: float = _START_FACTOR  # the stated offset of the initial angle (both ways)

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
            if group.by_shape:
                lines.append(_messages.advice_by_shape(group.by_shape))
            modelled = any(p.expected_ratio is not None for p in group.phases)
            verdicts = [_verdict(phase, epoch) for phase in group.phases]
            angles = [_angle_cell(phase.angular_update, group) for phase in group.phases]
            angle_width = max(len("angle/step"), *(len(a) for a in angles))
            # Columns as wide as their widest cell: a three-point LR range or a relaxation time
            # of millions of steps ran into the next column.
            lrs = [_lr_range(phase) for phase in group.phases]
            lr_width = max(21, *(len(cell) for cell in lrs))
            taus = [
                _steps(p.relaxation_time, epoch) if p.relaxation_time else "n/a"
                for p in group.phases
            ]
            tau_width = max(29, *(len(cell) for cell in taus))
            # The jump's catch-up is to within 5% (SMD Cor. 3.1's reading), whatever the
            # detector's tolerance in the next column: the header says which.
            settles = _messages.advice_settles_header(_NEAR)
            width = max(len(settles), *(len(v) for v in verdicts)) if modelled else 0
            header = (
                f"  {'phase':<5}  {'steps':<17} {'lr':<{lr_width}} {'angle/step':<{angle_width}} "
                f"{'tau (at peak lr)':<{tau_width}} {settles:<{width}}"
            )
            if modelled:
                header += "  " + _messages.advice_within_header(self.tolerance)
            lines.append(header.rstrip())
            rows = zip(group.phases, lrs, angles, taus, verdicts, strict=True)
            for number, (phase, lr, angle, tau, verdict) in enumerate(rows, 1):
                line = (
                    f"  {number:<5}  {phase.start:>7,}-{phase.end:<9,} {lr:<{lr_width}} "
                    f"{angle:<{angle_width}} {tau:<{tau_width}} {verdict:<{width}}"
                )
                if modelled:
                    line += "  " + _messages.advice_within_cell(
                        phase.within, phase.leaves, phase.within_off, self.start_factor
                    )
                lines.append(line.rstrip())
            if modelled:
                first = group.phases[0]
                lines.append(
                    _messages.advice_start_line(
                        self.start_factor, self.tolerance, first.within_off, first.relaxation_time
                    )
                )
                lines.append(
                    _messages.advice_expected_ratios([p.expected_ratio for p in group.phases])
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
            "tolerance": self.tolerance,
            "start_factor": self.start_factor,
            "groups": [
                {
                    "optimizer_index": g.optimizer_index,
                    "group_index": g.group_index,
                    "places": [list(place) for place in g.places],
                    "by_shape": [
                        {"shape": list(shape), "angular_update": value, "units": list(names)}
                        for shape, value, names in g.by_shape
                    ],
                    "units": list(g.units),
                    "prediction": g.prediction.angular_update,
                    "rule": g.prediction.rule,
                    "ema_timescale": g.ema_timescale,
                    "steps_per_epoch": g.steps_per_epoch,
                    "phases": [asdict(p) for p in g.phases],
                    "end_ratio": g.end_ratio,
                    "end_ratio_off": list(g.end_ratio_off) if g.end_ratio_off else None,
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
    *,
    tolerance: float = _DEFAULT_TOLERANCE,
    start_factor: float = _START_FACTOR,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Advice:
    """What each param group holding ``units`` will do over the budget.

    Args:
        optimizers: the optimizers (read only).
        units: unit name -> (optimizer index, param group index).
        total_steps: optimizer steps in the budget, >= 1 (``None``: unknown; the schedule is
            shown over its first 20,000 steps, without the checks at the budget's end). 0 is
            refused, not read as unknown: a budget of no steps has nothing to advise on.
        steps_per_epoch: optimizer steps per epoch, to show epochs and sample epoch schedulers.
        schedulers: the schedulers as the Trainer steps them; each is sampled on a copy.
        tolerance: how far (relative) the angle may be from its equilibrium to count as within
            it (the detector's ``tolerance``), in (0, 1).
        start_factor: the stated offset of the first angle from its equilibrium, >= 1: the
            update size is unknown before step 1, so the catch-up from initialisation is given
            from a start this many times above and below (besides one at the equilibrium).
        shapes: unit name -> the shape of the matrix its optimizer updates (its weight's), for
            the optimizers whose equilibrium depends on it (Muon): the advice then gives the
            angular update per shape beside the group's (``GroupAdvice.by_shape``).

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
    _check_shapes(shapes)
    total_steps = None if total_steps is None else int(total_steps)  # a numpy integer too
    check_fraction("tolerance", tolerance)
    check_number("start_factor", start_factor, low=1.0, low_open=False)
    schedulers = list(schedulers) if isinstance(schedulers, (list, tuple)) else schedulers
    if not isinstance(schedulers, list) or not all(isinstance(s, ScheduledLR) for s in schedulers):
        raise ValueError(
            "`schedulers` must be a list of lightning_sdm.advice.ScheduledLR (a scheduler with "
            "its interval and frequency, as the Trainer steps it), got "
            f"{schedulers!r:.80}: wrap each, e.g. ScheduledLR(scheduler, interval='step')."
        )
    by_group: dict[tuple[int, int], list[str]] = {}
    for name, where in units.items():
        by_group.setdefault(where, []).append(name)
    notes: list[str] = []
    trajectories: dict[int, LRTrajectory] = {}
    # Groups alike (the same optimizer class, settings and sampled schedule) share one advice.
    alike: dict[Hashable, list[tuple[int, int]]] = {}
    for opt_index, group_index in sorted(by_group):
        optimizer = unwrap(optimizers[opt_index])
        if opt_index not in trajectories:
            own = [
                s
                for s in schedulers
                if unwrap(getattr(s.scheduler, "optimizer", None)) is optimizer
            ]
            steps = total_steps if total_steps is not None else _UNKNOWN_HORIZON
            trajectory = sample_learning_rates(optimizer, own, steps, steps_per_epoch)
            trajectories[opt_index] = trajectory
            if trajectory.note and trajectory.note not in notes:
                notes.append(trajectory.note)
        trajectory = trajectories[opt_index]
        key = (
            _settings(optimizer, optimizer.param_groups[group_index]),
            trajectory.changes[group_index],
            trajectory.settings[group_index] if trajectory.settings else (),
            trajectory.total_steps,
        )
        alike.setdefault(key, []).append((opt_index, group_index))
    groups = []
    for places in alike.values():
        opt_index, group_index = places[0]
        optimizer = unwrap(optimizers[opt_index])
        sampled = trajectories[opt_index]
        advice = _group_advice(
            optimizer,
            opt_index,
            group_index,
            _Scheduled(
                optimizer.param_groups[group_index],
                sampled.settings[group_index] if sampled.settings else (),
            ),
            tuple(name for place in places for name in by_group[place]),
            sampled.changes[group_index],
            trajectories[opt_index].total_steps if total_steps is not None else None,
            trajectories[opt_index].total_steps,
            steps_per_epoch,
            tolerance,
            float(start_factor),
        )
        names = advice.units
        by_shape = _by_shape(advice.prediction, names, shapes) if shapes else ()
        groups.append(replace(advice, places=tuple(places), by_shape=by_shape))
    if total_steps is None:
        shown = max(t.total_steps for t in trajectories.values()) if trajectories else 0
        notes.append(_messages.advice_unknown_budget(shown, steps_per_epoch))
    return Advice(tuple(groups), total_steps, "; ".join(notes), tolerance, float(start_factor))


def _by_shape(
    prediction: Prediction, names: Sequence[str], shapes: Mapping[str, Sequence[int]]
) -> tuple[tuple[tuple[int, int], float | None, tuple[str, ...]], ...]:
    """Per matrix shape (rows x columns), the prediction and its units, where shapes matter."""
    found: dict[tuple[tuple[int, int], float | None], list[str]] = {}
    for name in names:
        if name not in shapes:
            continue
        shape = tuple(int(n) for n in shapes[name])
        value = for_shape(prediction, shape).angular_update
        rows = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (math.prod(shape), 1)
        found.setdefault((rows, value), []).append(name)
    if all(value == prediction.angular_update for _, value in found):
        return ()  # no optimizer but Muon's depends on the shape
    return tuple((rows, value, tuple(units)) for (rows, value), units in found.items())


def _settings(optimizer: Optimizer, group: Mapping[str, Any]) -> Hashable:
    """What makes two param groups' advice the same: the optimizer class, every setting.

    All of the group's values but its parameters and its name (a label, e.g. for a
    LearningRateMonitor), in plain hashable form: a tensor LR by its values.
    """

    def plain(value: Any) -> Hashable:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.detach().flatten().tolist()))
        if isinstance(value, (list, tuple)):
            return tuple(plain(v) for v in value)
        try:
            hash(value)
        except TypeError:
            return ("unhashable", repr(value))
        return value

    items = sorted((k, plain(v)) for k, v in group.items() if k not in ("params", "name"))
    return (type(optimizer), tuple(items))


@dataclass(frozen=True)
class _Scheduled:
    """A param group and the other values its schedulers change (momentum, betas, decay).

    OneCycleLR cycles the momentum (SGD) or Adam's beta1 against the LR: at the peak LR the
    momentum is its lowest, and the equilibrium and relaxation time there are those of that
    momentum, not of the value the live group holds before step 1.
    """

    group: Mapping[str, Any]
    settings: tuple[tuple[int, tuple[tuple[str, Any], ...]], ...] = ()

    def at(self, step: int, lr: float) -> dict[str, Any]:
        """The group's values at optimizer step ``step``, with the LR ``lr``."""
        return {**self.group, **dict(_value_at(self.settings, step, ())), "lr": lr}


def _group_advice(
    optimizer: Optimizer,
    opt_index: int,
    group_index: int,
    group: _Scheduled,
    names: tuple[str, ...],
    changes: Sequence[tuple[int, float]],
    total_steps: int | None,
    sampled: int,
    steps_per_epoch: int | None,
    tolerance: float,
    start_factor: float,
) -> GroupAdvice:
    peak_lr = max(lr for _, lr in changes)
    peak_step = next(step for step, lr in changes if lr == peak_lr)
    prediction = predict_param_group(optimizer, group.at(peak_step, peak_lr))
    wd = prediction.hyperparameters.get("weight_decay", 0.0)
    ema = 1.0 / (peak_lr * wd) if peak_lr > 0 and wd > 0 and prediction.available else None
    phases = _phases(optimizer, group, changes, sampled)
    if total_steps is None and phases:  # the last phase goes on past what was sampled
        phases[-1] = replace(phases[-1], fits=None)
    runs = _runs(optimizer, group, changes, peak_lr)
    phases, ends = _with_trajectories(runs, phases, tolerance, start_factor)
    notes = [
        _phase_note(phase, previous, wd, steps_per_epoch)
        for previous, phase in itertools.pairwise(phases)
        if phase.lr_start < previous.lr_end and phase.lr_start >= _TAIL * peak_lr
    ]
    notes = [n for n in notes if n]
    notes += _lag_notes(phases, steps_per_epoch, tolerance)
    # Adafactor's relative steps scale with the weight: 1/(lr wd) is not how long it remembers
    # its initialisation (its time scale is the second moment's memory), so no advice on it.
    if ema is not None and prediction.family != "adafactor":
        notes += _timescale_notes(ema, total_steps, steps_per_epoch)
    end_ratio, spread, note = _end_of_budget(
        optimizer, group, names, ends, total_steps, tolerance, start_factor, peak_lr
    )
    notes += [note] if note else []
    return GroupAdvice(
        opt_index,
        group_index,
        names,
        prediction,
        ema,
        steps_per_epoch,
        tuple(phases),
        tuple(notes),
        end_ratio,
        spread,
    )


def _end_of_budget(
    optimizer: Optimizer,
    group: _Scheduled,
    names: Sequence[str],
    courses: Sequence[_Course],
    total_steps: int | None,
    tolerance: float,
    factor: float,
    peak_lr: float,
) -> tuple[float | None, tuple[float, float] | None, str]:
    """The trajectory's ratio at the budget's last step with LR > 0, and the warning if lagging.

    The ratio from the reference start, its spread over all starts, and a note when it is beyond
    ``tolerance`` (only with a known budget: without one the schedule's end is not the run's).
    """
    finals = [course.final for course in courses if course.final is not None]
    if not finals or courses[0].final is None:
        return None, None, ""
    step, lr, ratio, _ = courses[0].final
    spread = (min(f[2] for f in finals), max(f[2] for f in finals))
    if total_steps is None or abs(ratio - 1) <= tolerance:
        return ratio, spread, ""
    tau = _relaxation_time(predict_param_group(optimizer, group.at(step, lr)))
    note = _messages.advice_lagging_at_end(
        names, step, lr, ratio, spread, tolerance, courses[0].catch_up, tau,
        lr < _TAIL * peak_lr, factor,
    )  # fmt: skip
    return ratio, spread, note


def _runs(
    optimizer: Optimizer,
    group: _Scheduled,
    changes: Sequence[tuple[int, float]],
    peak_lr: float,
) -> list[tuple[int, float, float, float]] | None:
    """The schedule as runs of one LR and one set of values: ``(first step, lr, x / lr, q* / lr)``.

    ``x / lr = K wd`` and ``q* / lr = G B / (K wd)`` of the norm balance, from the run's own
    momentum, betas and weight decay: a scheduler that cycles the momentum changes all three.
    ``G`` is in units of the gradient's noise, the same in every run (:func:`_update_variance`).
    ``None`` where a run has no equilibrium (no weight decay, a family without one).
    """
    if not peak_lr > 0:
        return None
    known: dict[Hashable, tuple[float, float] | None] = {}
    runs = []
    settings = list(group.settings) or [(0, ())]
    steps = sorted({step for step, _ in changes} | {step for step, _ in settings})
    lr_index = set_index = 0  # both lists are sorted by step: walk them alongside
    for step in steps:
        while lr_index + 1 < len(changes) and changes[lr_index + 1][0] <= step:
            lr_index += 1
        while set_index + 1 < len(settings) and settings[set_index + 1][0] <= step:
            set_index += 1
        key = settings[set_index][1]
        if key not in known:
            values = {**group.group, **dict(key), "lr": peak_lr}
            prediction = predict_param_group(optimizer, values)
            constants = trajectory_constants(prediction)
            wd = prediction.hyperparameters.get("weight_decay", 0.0)
            known[key] = (
                None
                if constants is None or not wd > 0
                else (
                    constants.decay * wd,
                    _update_variance(prediction) * constants.growth / (constants.decay * wd),
                )
            )
        known_values = known[key]
        if known_values is None:
            return None
        runs.append((step, changes[lr_index][1], *known_values))
    return runs


def _update_variance(prediction: Prediction) -> float:
    """The update's squared size per unit of gradient noise, from the momentum's weights.

    ``G`` of the norm balance is the mean square of one step's update; a gradient enters the
    steps after it with weights ``c_k`` (heavy ball: ``(1 - dampening) m^k``; Nesterov:
    ``1 + m`` then ``m^(k+1)``; Adam's first moment: ``(1 - beta1) beta1^k``), so white gradient
    noise gives one step ``sum(c_k^2)`` of it. The growth ``G B`` does not depend on it (every
    gradient is added once in full): only under a schedule that changes the momentum between
    runs does it matter, and there it does, by 2.8x between OneCycleLR's 0.95 and 0.85. Other
    families: 1 (their update's size does not follow the momentum).
    """
    hyper = prediction.hyperparameters
    if prediction.family == "sgd":
        m, dampening = hyper.get("momentum", 0.0), hyper.get("dampening", 0.0)
        if not 0 <= m < 1:
            return 1.0
        if hyper.get("nesterov", 0.0) > 0:
            return (1 + m) ** 2 + m**4 / (1 - m * m)
        return (1 - dampening) ** 2 / (1 - m * m)
    if prediction.family == "adam":
        beta1 = hyper.get("beta1", 0.0)
        return (1 - beta1) / (1 + beta1) if 0 <= beta1 < 1 else 1.0
    return 1.0


def _with_trajectories(
    runs: Sequence[tuple[int, float, float, float]] | None,
    phases: Sequence[Phase],
    tolerance: float,
    factor: float,
) -> tuple[list[Phase], list[_Course]]:
    """Each phase with its trajectory's ratio and catch-up steps; the courses (reference first).

    Three starts: the initial norm at the equilibrium of the first phase's peak LR, and the
    first angle ``factor`` x above and below it.
    """
    if runs is None or not phases or not phases[0].lr_peak > 0:
        return list(phases), []
    courses = [_follow(phases, runs, start, tolerance) for start in (1.0, factor, 1.0 / factor)]
    reference, above, below = courses
    out = [
        replace(
            phase,
            expected_ratio=reference.end_ratios[i],
            within=reference.within[i],
            leaves=reference.leaves[i],
            within_off=(above.within[i], below.within[i]),
        )
        for i, phase in enumerate(phases)
    ]
    return out, courses


@dataclass(frozen=True)
class _Course:
    """One start's trajectory over the phases (the norm balance, see :func:`_follow`)."""

    end_ratios: tuple[float | None, ...]  # at each phase's last step
    within: tuple[int | None, ...]  # first step of each phase within tolerance
    leaves: tuple[int | None, ...]  # first step after that beyond it again
    final: tuple[int, float, float, float] | None  # last step with lr > 0: step, lr, ratio, q/q*
    catch_up: float | None  # steps still needed at the final LR to get within tolerance


def _follow(
    phases: Sequence[Phase],
    runs: Sequence[tuple[int, float, float, float]],
    start: float,
    tolerance: float,
) -> _Course:
    """The norm balance integrated over the run-length encoded schedule, from ``start``.

    ``start``: the first angle over the equilibrium at the first phase's peak LR, with the
    initial norm (1: the initial norm is that equilibrium's; 3: it is smaller, the angle 3x
    larger). Units where ``G = 1`` (the ratio to the equilibrium does not depend on ``G``), so
    ``q* = lr B / (K wd)`` at every LR. Over a run of one LR ``q`` relaxes to ``q*`` in closed
    form, ``q* + (q0 - q*) exp(-n K lr wd)``, the exact sum of
    :func:`~lightning_sdm.theory._trajectory.advance`'s steps; its distance to ``q*`` only
    shrinks, so the steps within tolerance of a run are a suffix of it, found in closed form
    too: a step schedule of a million steps costs one term per change. ``K``, ``B`` and the
    weight decay are each run's own (:func:`_runs`).
    """
    low = 1.0 / (1.0 + tolerance) ** 2  # q / q* where the angle is (1 + tol) x the equilibrium
    high = 1.0 / (1.0 - tolerance) ** 2 if tolerance < 1 else math.inf
    first = phases[0]
    # The reference start: the equilibrium of the first phase's peak LR, with that step's values.
    per_lr = next(
        (r[3] for r in runs if first.start <= r[0] < first.end and r[1] == first.lr_peak),
        runs[0][3],
    )
    q = first.lr_peak * per_lr / (start * start)
    bounds = [run[0] for run in runs] + [phases[-1].end]
    end_ratios, within, leaves = [], [], []
    # (q at its start, its start, its last step, lr, q*/lr, x/lr) of the last run with lr > 0
    last_run: tuple[float, int, int, float, float, float] | None = None
    index = 0
    for phase in phases:
        entered = left = None
        ratio = None
        position = phase.start
        while position < phase.end:
            while bounds[index + 1] <= position:
                index += 1
            _, lr, rate, per_lr = runs[index]
            stop = min(bounds[index + 1], phase.end)
            if lr > 0:
                x = lr * rate
                target = lr * per_lr
                relative = q / target
                if entered is None:
                    need = math.ceil(_steps_to_band(relative, x, low, high) - 1e-9)
                    if need < stop - position:
                        entered = position + need
                elif left is None and not low <= relative <= high:
                    left = position  # within tolerance before this run, not at its start
                last_run = (q, position, stop - 1, lr, per_lr, rate)
                q = _relaxed(q, target, stop - position, x)
                ratio = -1.0  # computed below, once per phase
            elif stop == phase.end:
                ratio = None  # no LR at the phase's end: no angle to compare
            position = stop
        if ratio is not None and last_run is not None:
            ratio = _ratio_at(last_run)
        end_ratios.append(ratio)
        within.append(entered)
        leaves.append(left)
    final = catch_up = None
    if last_run is not None:
        ratio = _ratio_at(last_run)
        _, _, step, lr, _, rate = last_run
        relative = 1.0 / (ratio * ratio)
        final = (step, lr, ratio, relative)
        if not low <= relative <= high:
            catch_up = _steps_to_band(relative, lr * rate, low, high)
    return _Course(tuple(end_ratios), tuple(within), tuple(leaves), final, catch_up)


def _ratio_at(run: tuple[float, int, int, float, float, float]) -> float:
    """The angle over the equilibrium at a run's last step: ``sqrt(q* / q)`` there."""
    q, start, last, lr, per_lr, rate = run
    target = lr * per_lr
    return math.sqrt(target / _relaxed(q, target, last - start, lr * rate))


def _relaxed(q: float, target: float, steps: int, x: float) -> float:
    """``q`` after ``steps`` at one LR: it relaxes to ``target`` by ``exp(-x)`` per step."""
    return target + (q - target) * math.exp(-steps * x)


def _steps_to_band(relative: float, x: float, low: float, high: float) -> float:
    """Steps until ``q / q*`` is within ``[low, high]`` from ``relative`` (0: already)."""
    bound = low if relative < low else high if relative > high else relative
    if bound == relative:
        return 0.0
    return math.log((relative - 1.0) / (bound - 1.0)) / x


def _phases(
    optimizer: Optimizer,
    group: _Scheduled,
    changes: Sequence[tuple[int, float]],
    end_of_run: int,
) -> list[Phase]:
    """Split the trajectory at LR jumps; evaluate the theory in each phase."""
    # A jump at the run's last step (OneCycleLR's final drop to its floor) would make a phase
    # of one step, which says nothing: that step stays in the phase before it.
    jumps = [
        changes[i][0]
        for i in range(1, len(changes))
        if _is_jump(changes, i) and changes[i][0] < end_of_run - 1
    ]
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
    group: _Scheduled,
    changes: Sequence[tuple[int, float]],
    start: int,
    end: int,
    previous: Phase | None,
) -> Phase:
    lr_start, lr_end = _lr_at(changes, start), _lr_at(changes, end - 1)
    lr_peak = max([lr for step, lr in changes if start <= step < end] + [lr_start])
    peak_step = next((step for step, lr in changes if start <= step < end and lr == lr_peak), start)
    # At the peak's own momentum and betas (OneCycleLR's lowest), not the group's at step 0.
    prediction = predict_param_group(optimizer, group.at(peak_step, lr_peak))
    relative = prediction.family == "adafactor"
    needed = smd = None
    tau_start = _relaxation_time(
        _at_step(predict_param_group(optimizer, group.at(start, lr_start)), start)
    )
    if previous is not None and tau_start is not None and previous.lr_end > 0 and lr_start > 0:
        ratio = lr_start / previous.lr_end
        # Adafactor's relative step follows the LR at once: no norm has to relax.
        needed = 0.0 if relative else lr_change_relaxation_steps(ratio, tau_start, _NEAR)
        if prediction.family == "sgd" and ratio < 1:
            smd = 2.0 * tau_start * math.log(1.0 / ratio)  # SMD Cor. 3.1: ln(k) (1-a)/(2 wd lr)
    tau_peak = _relaxation_time(_at_step(prediction, start))
    onset = None
    if tau_peak is not None and not relative:  # tau ~ 1/lr (SGD and decoupled decay alike)
        inside = [(step, lr) for step, lr in changes if start <= step < end]
        onset = _lag_onset(inside, tau_peak * lr_peak)
    fits = None if needed is None else needed <= end - start
    tail = previous is not None and lr_start < _TAIL * peak_of(changes)
    return Phase(
        start, end, lr_start, lr_end, lr_peak, prediction.angular_update, tau_peak, needed, smd,
        fits, onset, tail,
    )  # fmt: skip


def _at_step(prediction: Prediction, start: int) -> Prediction:
    """Adafactor's prediction read at a phase's first step: its memory ``M = step^0.8`` grows."""
    hyper = prediction.hyperparameters
    if prediction.family != "adafactor" or hyper.get("step", 1.0) >= start + 1:
        return prediction
    return replace(prediction, hyperparameters={**hyper, "step": float(start + 1)})


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


def _lag_notes(phases: Sequence[Phase], epoch: int | None, tolerance: float) -> list[str]:
    """Where the weights stop following a falling LR (once per group: the first such place)."""
    for phase in phases:
        if phase.lag_onset is not None and not phase.tail:
            return [
                f"from about step {phase.lag_onset:,} on, the LR falls by more than 10% per "
                "relaxation time: the weights no longer follow it, and the angular update lags "
                "its prediction (regime 'lagging'; the annealing a decaying schedule relies on)."
                + _messages.advice_lag_model(phase.within, phase.leaves, tolerance)
            ]
    return []


def _timescale_notes(ema: float, total_steps: int | None, epoch: int | None) -> list[str]:
    if epoch and ema < epoch:
        return [
            f"EMA timescale 1/(lr*wd) = {_steps(ema, epoch)}, under one epoch: the weight decay "
            "is very strong (the weights forget everything older than a fraction of an epoch)."
        ]
    if total_steps is not None and ema > total_steps:
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
    return float(_value_at(changes, step, changes[0][1]))


def _steps(steps: float, epoch: int | None) -> str:
    return f"{steps:,.0f} steps" + (f" ({steps / epoch:,.1f} epochs)" if epoch else "")


def _lr_range(phase: Phase) -> str:
    if phase.lr_start == phase.lr_end == phase.lr_peak:
        return f"{phase.lr_start:.4g}"
    peak = "" if phase.lr_peak in (phase.lr_start, phase.lr_end) else f" > {phase.lr_peak:.3g}"
    return f"{phase.lr_start:.3g}{peak} > {phase.lr_end:.3g}"


def _angle_cell(value: float | None, group: GroupAdvice) -> str:
    """A phase's predicted angle; over the group's matrix shapes where it depends on them.

    Muon's value scales with the shape's memory factor ``sqrt(R)`` at every LR, so each shape's
    angle in a phase is the phase's wide-matrix value times the shape's ratio at the peak.
    """
    base = group.prediction.angular_update
    shaped = [v for _, v, _ in group.by_shape if v is not None]
    if value is None or not shaped or not base:
        return _value(value)
    low, high = value * min(shaped) / base, value * max(shaped) / base
    return _value(low) if f"{low:.4g}" == f"{high:.4g}" else f"{low:.4g}-{high:.4g}"


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


def _check_shapes(shapes: Any) -> None:
    if shapes is None:
        return
    ok = isinstance(shapes, Mapping) and all(
        isinstance(shape, (tuple, list, torch.Size))
        and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in shape)
        for shape in shapes.values()
    )
    if not ok:
        raise ValueError(_messages.advice_bad_shapes(shapes))


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
    integral = isinstance(total_steps, numbers.Integral) and not isinstance(total_steps, bool)
    if total_steps is not None and not (integral and int(total_steps) >= 1):
        raise ValueError(_messages.advice_bad_total_steps(total_steps))
    check_integer("steps_per_epoch", steps_per_epoch, 1, allow_none=True)
