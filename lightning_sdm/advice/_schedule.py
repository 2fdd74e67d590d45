"""The learning rates a scheduler will give, sampled ahead on a stand-in optimizer.

The live optimizer and scheduler are never stepped: the scheduler is deep-copied with its
optimizer replaced by a :class:`_StandIn` (the same param-group values and defaults, one scalar
parameter per group), so sampling costs neither memory nor a change of the user's state.
"""

from __future__ import annotations

import bisect
import copy
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["LRTrajectory", "ScheduledLR", "sample_learning_rates"]

#: At most this many scheduler steps are simulated (per-step schedules of very long runs are
#: sampled up to there; the trajectory says so).
MAX_SCHEDULER_STEPS = 200_000


@dataclass(frozen=True)
class ScheduledLR:
    """A scheduler as the Trainer steps it: every ``frequency`` steps or epochs.

    A step-interval ``frequency`` counts optimizer steps. Lightning counts it in batches of the
    epoch instead: it steps the scheduler after an optimizer step whose batch index in the epoch
    (plus one) is a multiple of ``frequency``. With ``accumulate`` batches per optimizer step
    (the Trainer's ``accumulate_grad_batches``) and ``batches_per_epoch`` given, it is sampled
    that way: ``frequency=2`` under ``accumulate=2`` steps it after every optimizer step, and the
    count starts again at each epoch (the last batch of an epoch steps the optimizer too).
    """

    scheduler: Any
    interval: str = "epoch"  # "step" | "epoch"
    frequency: int = 1
    accumulate: int = 1  # batches per optimizer step, as Lightning counts a step frequency
    batches_per_epoch: int | None = None  # where Lightning's batch count starts again


@dataclass(frozen=True)
class LRTrajectory:
    """Per param group, the learning rate of each optimizer step, run-length encoded.

    Attributes:
        changes: per group, ``(first step, lr)`` for every step where the LR changes (the first
            entry is step 0).
        total_steps: the optimizer steps covered.
        note: what could not be sampled (a ReduceLROnPlateau, a cap), else ``""``.
        settings: per group, ``(first step, ((key, value), ...))`` for every step where one of
            the other hyper-parameters a scheduler changes (OneCycleLR's ``momentum`` or
            ``betas``, a ``weight_decay``) changes, with the values of those keys from that step
            on (the first entry is step 0); empty when no scheduler changes any but the LR.
    """

    changes: tuple[tuple[tuple[int, float], ...], ...]
    total_steps: int
    note: str = ""
    settings: tuple[tuple[tuple[int, tuple[tuple[str, Any], ...]], ...], ...] = ()

    def settings_at(self, group: int, step: int) -> dict[str, Any]:
        """The scheduled values other than the LR of ``group`` at optimizer step ``step``."""
        if not self.settings:
            return {}
        return dict(_value_at(self.settings[group], step, ()))

    def lr_at(self, group: int, step: int) -> float:
        """The LR of ``group`` at optimizer step ``step``."""
        return float(_value_at(self.changes[group], step, self.changes[group][0][1]))


def _value_at(runs: Sequence[tuple[int, Any]], step: int, default: Any) -> Any:
    """The value of the run that covers ``step`` (runs sorted by their first step)."""
    index = bisect.bisect_right([start for start, _ in runs], step) - 1
    return runs[index][1] if index >= 0 else default


class _StandIn(Optimizer):
    """An optimizer with the live one's param-group values and nothing else."""

    def __init__(self, optimizer: Optimizer) -> None:
        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "params": [torch.zeros(1)]}
            for group in optimizer.param_groups
        ]
        super().__init__(groups, dict(optimizer.defaults))


def sample_learning_rates(
    optimizer: Optimizer,
    schedulers: Sequence[ScheduledLR],
    total_steps: int,
    steps_per_epoch: int | None,
) -> LRTrajectory:
    """The LR of every param group at every optimizer step of the budget.

    Args:
        optimizer: the live optimizer (read, never changed).
        schedulers: its schedulers, as the Trainer steps them.
        total_steps: optimizer steps in the budget.
        steps_per_epoch: optimizer steps per epoch (needed for epoch-interval schedulers).

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
        >>> trajectory = sample_learning_rates(opt, [ScheduledLR(sched, "epoch")], 60, 10)
        >>> [(step, round(lr, 6)) for step, lr in trajectory.changes[0]]
        [(0, 0.1), (20, 0.01), (40, 0.001)]
        >>> opt.param_groups[0]["lr"], sched.last_epoch  # the live ones did not move
        (0.1, 0)
        >>> cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=20)
        >>> trajectory = sample_learning_rates(opt, [ScheduledLR(cycle, "step")], 20, None)
        >>> peak = max(trajectory.changes[0], key=lambda change: change[1])[0]
        >>> trajectory.settings_at(0, 0), trajectory.settings_at(0, peak)  # momentum cycles too
        ({'momentum': 0.95}, {'momentum': 0.85})
    """
    stand_in = _StandIn(optimizer)
    copies, notes = [], []
    for entry in schedulers:
        if _needs_a_metric(entry.scheduler):
            notes.append(f"{type(entry.scheduler).__name__} follows a metric: not sampled")
            continue
        if entry.interval == "epoch" and not steps_per_epoch:
            notes.append(f"{type(entry.scheduler).__name__}: epoch length unknown, not sampled")
            continue
        clone = copy.deepcopy(entry.scheduler, {id(optimizer): stand_in})
        copies.append((clone, _due(entry, steps_per_epoch)))
    steps = total_steps
    scheduler_steps = sum(math.ceil(total_steps / period) for _, (_, period) in copies)
    if scheduler_steps > MAX_SCHEDULER_STEPS:
        steps = int(total_steps * MAX_SCHEDULER_STEPS / scheduler_steps)
        notes.append(f"sampled for the first {steps} of {total_steps} steps")
    changes: list[list[tuple[int, float]]] = [[(0, _lr(group))] for group in stand_in.param_groups]
    # The other values as they stand at step 0 and at every step a scheduler changes one.
    settings: list[list[tuple[int, dict[str, Any]]]] = [
        [(0, _others(group))] for group in stand_in.param_groups
    ]
    # Per step only the raw values are compared (a tuple, no conversion): most steps change none.
    keys = [
        operator.itemgetter(*[k for k in group if k not in _BOOKKEEPING], "params")
        for group in stand_in.param_groups
    ]
    raws = [read(group) for group, read in zip(stand_in.param_groups, keys, strict=True)]
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": a copy
        warnings.simplefilter("ignore")
        for step in range(1, steps):
            stepped = False
            for clone, (due, _) in copies:
                if due(step):
                    try:
                        clone.step()
                    except Exception as error:  # e.g. OneCycleLR past its total_steps
                        notes.append(
                            f"{type(clone).__name__} raised at step {step} ({error}): "
                            "sampled up to there"
                        )
                        return _trajectory(changes, settings, step, notes)
                    stepped = True
            if stepped:
                for index, group in enumerate(stand_in.param_groups):
                    lr = _lr(group)
                    if lr != changes[index][-1][1]:
                        changes[index].append((step, lr))
                    raw = keys[index](group)
                    if _differ(raw, raws[index]):
                        raws[index] = raw
                        others = _others(group)
                        if others != settings[index][-1][1]:
                            settings[index].append((step, others))
    return _trajectory(changes, settings, steps, notes)


def _due(entry: ScheduledLR, steps_per_epoch: int | None) -> tuple[Callable[[int], bool], int]:
    """Whether the scheduler steps before optimizer step ``step``; its mean period, in steps."""
    frequency = max(1, int(entry.frequency))
    if entry.interval == "epoch" and steps_per_epoch:
        period = frequency * steps_per_epoch
        return (lambda step: step % period == 0), period
    accumulate = max(1, int(entry.accumulate))
    batches = entry.batches_per_epoch
    if accumulate == 1 and not batches:  # optimizer steps (and Lightning's count without both)
        return (lambda step: step % frequency == 0), frequency

    def lightning(step: int) -> bool:
        # After optimizer step ``step - 1``: the batch that ended it, counted in its epoch.
        done = step - 1
        if batches:
            per_epoch = math.ceil(batches / accumulate)
            return min((done % per_epoch + 1) * accumulate, batches) % frequency == 0
        return (done + 1) * accumulate % frequency == 0

    return lightning, max(1, frequency // math.gcd(frequency, accumulate))


def _trajectory(
    changes: list[list[tuple[int, float]]],
    settings: list[list[tuple[int, dict[str, Any]]]],
    steps: int,
    notes: list[str],
) -> LRTrajectory:
    """Keeps, of the other values, only the keys that change: the rest is the live group's."""
    kept = []
    for runs in settings:
        moving = sorted(
            {key for _, values in runs for key in values if values[key] != runs[0][1][key]}
        )
        kept.append(
            tuple((step, tuple((key, values[key]) for key in moving)) for step, values in runs)
            if moving
            else ()
        )
    return LRTrajectory(
        tuple(tuple(c) for c in changes),
        steps,
        "; ".join(notes),
        tuple(kept) if any(kept) else (),
    )


def _lr(group: dict[str, Any]) -> float:
    value = group["lr"]
    return float(value.item() if isinstance(value, torch.Tensor) else value)


# Kept by the schedulers for their own use, not read by any optimizer step.
_BOOKKEEPING = frozenset(
    {"params", "lr", "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "name"}
)


def _differ(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    try:
        return bool(a != b)
    except RuntimeError:  # a tensor value: compared as plain values instead
        return True


def _others(group: dict[str, Any]) -> dict[str, Any]:
    """The group's plain values besides the LR (tensors as floats, tuples kept)."""

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return float(value.item()) if value.numel() == 1 else tuple(value.flatten().tolist())
        if isinstance(value, (tuple, list)):
            return tuple(plain(v) for v in value)
        return value

    return {key: plain(value) for key, value in group.items() if key not in _BOOKKEEPING}


def _needs_a_metric(scheduler: Any) -> bool:
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
