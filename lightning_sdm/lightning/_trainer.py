"""Everything the package reads off a Trainer, in one place (duck-typed: tests pass stand-ins)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from lightning_sdm.advice._schedule import ScheduledLR

__all__ = [
    "accumulation",
    "batches_per_epoch",
    "budget_of",
    "logged_hparams",
    "manual_optimization",
    "optimizer_budget",
    "stepping_optimizers",
    "lr_schedulers",
    "param_group_count",
    "param_groups",
    "step_scheduler_monitors",
    "steps_per_epoch",
    "trainer_schedules",
]


def logged_hparams(trainer: Any) -> dict[str, Any]:
    """The hyper-parameters Lightning logs at the start of fit (``loggers/utilities.py``).

    The module's and the datamodule's ``hparams_initial``, each only where it logs them
    (``save_hyperparameters(logger=False)`` keeps them out), without LightningCLI's
    ``_class_path``. A conflict between the two is Lightning's to report, right after.

    Example::

        >>> from types import SimpleNamespace as Namespace
        >>> module = Namespace(_log_hyperparams=True, hparams_initial={"lr": 0.1})
        >>> data = Namespace(_log_hyperparams=True, hparams_initial={"batch_size": 32})
        >>> logged_hparams(Namespace(lightning_module=module, datamodule=data))
        {'lr': 0.1, 'batch_size': 32}
        >>> logged_hparams(Namespace(lightning_module=module, datamodule=None))
        {'lr': 0.1}
    """
    hparams: dict[str, Any] = {}
    for owner in (trainer.lightning_module, getattr(trainer, "datamodule", None)):
        if owner is not None and getattr(owner, "_log_hyperparams", False):
            hparams.update(owner.hparams_initial)
    hparams.pop("_class_path", None)
    return hparams


def budget_of(trainer: Any) -> int | None:
    """The training budget in global steps (Lightning's clock), if known and finite.

    Lightning's global step counts the steps of every optimizer: under manual optimization
    with several optimizers that each step once per batch (a GAN), it is that many times the
    number of batches. See :func:`optimizer_budget`.

    Example::

        >>> class Run:
        ...     estimated_stepping_batches = 880
        >>> budget_of(Run()), budget_of(object())
        (880, None)
    """
    per_optimizer = optimizer_budget(trainer)
    return None if per_optimizer is None else per_optimizer * stepping_optimizers(trainer)


def optimizer_budget(trainer: Any) -> int | None:
    """The budget of each optimizer in its own steps, if known, finite and not 0.

    ``estimated_stepping_batches`` counts batches (one optimizer step each), capped by
    ``max_steps``, which counts global steps: with ``n`` optimizers stepping once per batch,
    ``max_steps`` allows ``ceil(max_steps / n)`` steps of each (Lightning ends after the batch
    that reaches it).

    Example::

        >>> class Gan:  # 10 epochs of 4 batches, max_steps=60, two optimizers (manual)
        ...     estimated_stepping_batches, max_steps = 40, 60
        ...     optimizers = ["generator", "discriminator"]
        ...     class lightning_module:
        ...         automatic_optimization = False
        >>> optimizer_budget(Gan()), budget_of(Gan())
        (30, 60)
    """
    total = _stepping_batches(trainer)
    if total is None:
        return None
    shared = _max_steps_shared(trainer)
    if shared is not None:
        # Lightning stops after the batch at which the global step reaches max_steps: every
        # optimizer has stepped in that batch (61 global steps of 2 optimizers: 31 batches).
        max_steps, count = shared
        total = min(int(total), math.ceil(max_steps / count))
    # No step at all (max_steps=0, no batch): no budget to advise on, as when it is unknown.
    return int(total) if total >= 1 else None


def shared_max_steps(trainer: Any) -> int | None:
    """``max_steps`` where it ends the run and several optimizers share it, else ``None``.

    Under manual optimization with several optimizers Lightning's ``max_steps`` counts the
    global step, the steps of all optimizers together: an optimizer that steps less often
    leaves the others more of it, so each one's budget depends on how often each steps.

    Example::

        >>> class Gan:  # 10 epochs of 10 batches, max_steps=61, two optimizers (manual)
        ...     estimated_stepping_batches, max_steps = 100, 61
        ...     optimizers = ["generator", "discriminator"]
        ...     class lightning_module:
        ...         automatic_optimization = False
        >>> shared_max_steps(Gan())
        61
    """
    shared = _max_steps_shared(trainer)
    if shared is None:
        return None
    max_steps, count = shared
    total = _stepping_batches(trainer)
    if total is not None and total <= max_steps / count:
        return None  # the epochs end the run first: every batch counts for each optimizer
    return max_steps


def _stepping_batches(trainer: Any) -> float | None:
    """``estimated_stepping_batches`` where known and finite, else ``None``."""
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # no Trainer, an iterable dataset without a length, ...
        return None
    return total if isinstance(total, (int, float)) and math.isfinite(total) else None


def _max_steps_shared(trainer: Any) -> tuple[int, int] | None:
    """``(max_steps, optimizers)`` where a ``max_steps`` is set and several optimizers share it."""
    count, max_steps = stepping_optimizers(trainer), getattr(trainer, "max_steps", -1)
    if count < 2 or not isinstance(max_steps, int) or max_steps < 0:
        return None
    return max_steps, count


def stepping_optimizers(trainer: Any) -> int:
    """Optimizer steps per batch: every optimizer under manual optimization, else one.

    Lightning's automatic optimization takes one optimizer; a manual loop with several steps
    each of them once per batch in the usual case (a GAN), which is assumed here.
    """
    optimizers = list(getattr(trainer, "optimizers", None) or [])
    return len(optimizers) if manual_optimization(trainer) and len(optimizers) > 1 else 1


def manual_optimization(trainer: Any) -> bool:
    """Whether ``training_step`` steps the optimizers and schedulers itself.

    Then how often each steps is unknown before step 1 (Lightning steps no scheduler).
    """
    module = getattr(trainer, "lightning_module", None)
    return module is not None and not getattr(module, "automatic_optimization", True)


def trainer_schedules(trainer: Any) -> list[ScheduledLR]:
    """The Trainer's schedulers as it steps them (``lr_scheduler_configs``).

    A step-interval frequency counts the batches of the epoch (Lightning's ``batch_idx + 1``),
    not the optimizer steps: under gradient accumulation the two differ.
    """
    return [
        ScheduledLR(
            config.scheduler,
            config.interval,
            config.frequency,
            accumulate=accumulation(trainer),
            batches_per_epoch=batches_per_epoch(trainer),
        )
        for config in trainer.lr_scheduler_configs
    ]


def steps_per_epoch(trainer: Any) -> int | None:
    """Optimizer steps per epoch (one optimizer), if the Trainer knows its epoch length.

    Lightning also steps at the last batch of an epoch when the accumulation does not divide
    it: ``ceil``, not ``floor``.
    """
    batches = batches_per_epoch(trainer)
    if batches is None:
        return None
    return max(math.ceil(batches / accumulation(trainer)), 1)


def batches_per_epoch(trainer: Any) -> int | None:
    """``num_training_batches`` where known and finite (an int >= 1), else ``None``."""
    batches = getattr(trainer, "num_training_batches", None)
    return batches if isinstance(batches, int) and batches > 0 else None


def accumulation(trainer: Any) -> int:
    """Batches per optimizer step (``accumulate_grad_batches``)."""
    return max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)


def step_scheduler_monitors(trainer: Any, prefix: str = "") -> list[tuple[str, int]]:
    """``(monitored key, frequency)`` of the step schedulers following a key from ``prefix``."""
    return [
        (config.monitor, config.frequency)
        for config in trainer.lr_scheduler_configs
        if config.interval == "step" and config.monitor and config.monitor.startswith(prefix)
    ]


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
