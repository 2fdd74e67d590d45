"""Everything the package reads off a Trainer, in one place (duck-typed: tests pass stand-ins)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from lightning_sdm.advice._schedule import ScheduledLR

__all__ = [
    "budget_of",
    "lr_schedulers",
    "param_group_count",
    "param_groups",
    "steps_per_epoch",
    "trainer_schedules",
]


def budget_of(trainer: Any) -> int | None:
    """The training budget in global steps, if the Trainer knows it (finite); duck-typed.

    Example::

        >>> class Run:
        ...     estimated_stepping_batches = 880
        >>> budget_of(Run()), budget_of(object())
        (880, None)
    """
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # no Trainer, an iterable dataset without a length, ...
        return None
    return int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None


def trainer_schedules(trainer: Any) -> list[ScheduledLR]:
    """The Trainer's schedulers as it steps them (``lr_scheduler_configs``)."""
    return [
        ScheduledLR(config.scheduler, config.interval, config.frequency)
        for config in trainer.lr_scheduler_configs
    ]


def steps_per_epoch(trainer: Any) -> int | None:
    """Optimizer steps per epoch (one optimizer), if the Trainer knows its epoch length.

    Lightning also steps at the last batch of an epoch when the accumulation does not divide
    it: ``ceil``, not ``floor``.
    """
    batches = getattr(trainer, "num_training_batches", None)
    accumulate = max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)
    if not isinstance(batches, int) or batches <= 0:
        return None
    return max(math.ceil(batches / accumulate), 1)


def lr_schedulers(trainer: Any) -> list[Any]:
    """The Trainer's LR scheduler objects (what an action may scale)."""
    return [config.scheduler for config in trainer.lr_scheduler_configs]


def param_groups(trainer: Any) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
    """Every param group of every optimizer, keyed ``(optimizer index, group index)``."""
    for o, optimizer in enumerate(trainer.optimizers):
        for g, group in enumerate(optimizer.param_groups):
            yield (o, g), group


def param_group_count(trainer: Any) -> int:
    """How many param groups the Trainer's optimizers hold together."""
    return sum(len(optimizer.param_groups) for optimizer in trainer.optimizers)
