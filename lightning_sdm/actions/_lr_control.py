"""Learning-rate decays that cooperate with LR schedulers, and SMD's weight-rescaling trick.

A decay by ``factor`` multiplies the *whole remaining schedule* of the affected param groups:
the group's ``lr`` and every quantity a scheduler recomputes it from (``base_lrs``, OneCycleLR's
``initial_lr``/``max_lr``/``min_lr``, CyclicLR's ``max_lrs``, CosineAnnealing's ``eta_min``), so the
LR at every later step is ``factor`` times what the user's schedule alone would give. Schedulers
whose state cannot be scaled that way are refused with a clear error (see
:func:`check_schedulers_supported`).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim import lr_scheduler as schedulers
from torch.optim.lr_scheduler import LRScheduler

from lightning_sdm._checks import check_fraction, check_number

__all__ = [
    "check_schedulers_supported",
    "decay_param_groups",
    "rescale_for_lr_decay",
]

# Schedulers whose next LR is computed from the group's current ``lr`` (chainable) or from
# ``base_lrs``: scaling both keeps the schedule consistent.
_SCALE_LR_AND_BASE = (
    schedulers.StepLR,
    schedulers.MultiStepLR,
    schedulers.ExponentialLR,
    schedulers.MultiplicativeLR,
    schedulers.LambdaLR,
    schedulers.ConstantLR,
    schedulers.LinearLR,
    schedulers.PolynomialLR,
    schedulers.CosineAnnealingLR,
    schedulers.CosineAnnealingWarmRestarts,
    schedulers.CyclicLR,
    schedulers.OneCycleLR,
)
_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "base_lr")


def check_schedulers_supported(scheduler_list: Iterable[Any]) -> None:
    """Raise ``ValueError`` for a scheduler an automatic decay cannot scale consistently."""
    if isinstance(scheduler_list, (LRScheduler, str)) or not isinstance(scheduler_list, Iterable):
        raise ValueError(
            "`scheduler_list` must be a list of LR schedulers (or empty), got "
            f"{type(scheduler_list).__name__}: pass [scheduler]."
        )
    for scheduler in _flatten(scheduler_list):
        if isinstance(scheduler, (*_SCALE_LR_AND_BASE, schedulers.ReduceLROnPlateau)):
            continue
        raise ValueError(
            f"on_equilibrium='decay_lr' cannot scale the state of {type(scheduler).__name__} "
            "consistently. Supported: StepLR, MultiStepLR, ExponentialLR, MultiplicativeLR, "
            "LambdaLR, ConstantLR, LinearLR, PolynomialLR, CosineAnnealingLR, "
            "CosineAnnealingWarmRestarts, CyclicLR, OneCycleLR, ReduceLROnPlateau, and "
            "SequentialLR/ChainedScheduler of them. Use on_equilibrium='warn' or a callable."
        )


def decay_param_groups(
    optimizer: Optimizer,
    group_indices: Sequence[int],
    factor: float,
    min_lr: float,
    scheduler_list: Iterable[Any] = (),
) -> list[tuple[float, float]]:
    """Multiply the LR schedule of some param groups by ``factor``, never below ``min_lr``.

    Args:
        optimizer: the optimizer whose groups are decayed.
        group_indices: indices into ``optimizer.param_groups``.
        factor: the LR multiplier, in (0, 1).
        min_lr: no LR goes below it, >= 0.
        scheduler_list: the LR schedulers, scaled along (``check_schedulers_supported``).

    Returns:
        ``(old_lr, new_lr)`` per group index, in order. A group already at or below ``min_lr``
        is left unchanged.

    Raises:
        ValueError: for an argument out of range (the message names it).
    """
    _check_optimizer(optimizer)
    check_fraction("factor", factor)
    check_number("min_lr", min_lr, low=0.0, low_open=False)
    count = len(optimizer.param_groups)
    if not isinstance(group_indices, (list, tuple, range)):
        raise ValueError(
            f"`group_indices` must be a list of param group indices, got {group_indices!r}."
        )
    if len(set(group_indices)) != len(group_indices):
        raise ValueError(f"`group_indices` names a group twice: {list(group_indices)}.")
    if isinstance(scheduler_list, LRScheduler) or not isinstance(scheduler_list, Iterable):
        raise ValueError(
            "`scheduler_list` must be a list of LR schedulers (or empty), got "
            f"{type(scheduler_list).__name__}: pass [scheduler]."
        )
    for index in group_indices:
        integral = isinstance(index, numbers.Integral) and not isinstance(index, bool)
        if not integral or not 0 <= int(index) < count:
            raise ValueError(
                f"`group_indices` holds {index!r}; the optimizer has {count} param group(s): "
                f"use indices in [0, {count - 1}]."
            )
        lr = optimizer.param_groups[index]["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float, torch.Tensor)):
            raise ValueError(
                f"param group {index} has lr={lr!r}, not a number: it cannot be decayed."
            )
    changes = []
    related = [s for s in _flatten(scheduler_list) if getattr(s, "optimizer", None) is optimizer]
    for index in group_indices:
        group = optimizer.param_groups[index]
        old = float(group["lr"])
        new = max(old * factor, min_lr)
        if new >= old:
            changes.append((old, old))
            continue
        scale = new / old
        for key in _GROUP_KEYS:
            if key in group and isinstance(group[key], (int, float, torch.Tensor)):
                _scale_in_place(group, key, scale)
        for scheduler in related:
            _scale_scheduler(scheduler, index, scale, len(optimizer.param_groups))
        changes.append((old, float(group["lr"])))
    return changes


def rescale_for_lr_decay(
    optimizer: Optimizer,
    units: Iterable[Sequence[torch.Tensor]],
    decay: float,
    exponent: float,
) -> float:
    """Move scale-invariant units to their new equilibrium norm at an LR decay by ``decay``.

    SMD's trick (Wan et al. 2020, Sec. 4, Fig. 3): after the LR is divided by ``k`` the equilibrium
    norm is ``k**-exponent`` times the old one, with ``exponent`` from
    :func:`lightning_sdm.theory.equilibrium_norm_exponent` (1/4 for SGD, 1/2 for AdamW); dividing
    the invariant weights by ``k**exponent`` at the moment of the decay leaves the loss unchanged
    and lands on it at once.

    The optimizer state is moved along so that the next steps are those of a run that had been at
    the rescaled point all along (derived from the scale invariance: gradients scale as ``1/c``
    when weights scale as ``c``): SGD momentum buffers keep their radial part (weight decay,
    scales like ``w``) times ``c`` and their tangential part (gradients) times ``1/c``; Adam's
    first moment is multiplied by ``1/c`` and its second moments by ``1/c^2``.

    Args:
        optimizer: the optimizer updating the units.
        units: each unit's parameters (a weight, and the bias before its norm).
        decay: ``k > 1``, the factor the LR was divided by.
        exponent: how the equilibrium norm scales with the LR.

    Returns:
        The factor ``c`` the weights were multiplied by.

    Raises:
        ValueError: for an argument out of range (the message names it); nothing is changed.
    """
    _check_optimizer(optimizer)
    check_number("decay", decay, low=0.0)
    check_number("exponent", exponent, low=0.0, high=1.0, low_open=False, high_open=False)
    if isinstance(units, torch.Tensor) or not isinstance(units, Iterable):
        raise ValueError(
            "`units` must be a list with each unit's parameters (a list of tensors each), got "
            f"{type(units).__name__}."
        )
    units = [params if isinstance(params, torch.Tensor) else list(params) for params in units]
    for params in units:
        if isinstance(params, torch.Tensor) or not params:
            bad = True  # a bare tensor would be read row by row
        else:
            bad = not all(isinstance(p, torch.Tensor) for p in params)
        if bad:
            raise ValueError(
                "`units` must hold each unit's parameters as a sequence of tensors (a weight, "
                f"and the bias before its norm), got {params!r}."
            )
    scale = decay**-exponent
    with torch.no_grad():
        for params in units:
            _rescale_unit(optimizer, list(params), scale)
    return scale


# ---------------------------------------------------------------------- internals


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        raise ValueError(
            f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )


def _flatten(scheduler_list: Iterable[Any]) -> list[Any]:
    flat = []
    for scheduler in scheduler_list:
        inner = getattr(scheduler, "_schedulers", None)
        if isinstance(scheduler, (schedulers.SequentialLR, schedulers.ChainedScheduler)) and inner:
            flat.extend(_flatten(inner))
        else:
            flat.append(scheduler)
    return flat


def _scale_in_place(container: Any, key: Any, scale: float) -> None:
    value = container[key]
    if isinstance(value, torch.Tensor):
        value.mul_(scale)
    else:
        container[key] = value * scale


def _scale_scheduler(scheduler: Any, index: int, scale: float, groups: int) -> None:
    for attribute in ("base_lrs", "_last_lr", "max_lrs", "min_lrs_cyclic"):
        values = getattr(scheduler, attribute, None)
        if isinstance(values, list) and len(values) == groups:
            _scale_in_place(values, index, scale)
    eta_min = getattr(scheduler, "eta_min", None)
    if isinstance(eta_min, (int, float)) and eta_min != 0:
        if groups != 1:
            raise ValueError(
                f"{type(scheduler).__name__}(eta_min={eta_min}) is shared by {groups} param "
                "groups and cannot be scaled for one of them: use eta_min=0 or one param group."
            )
        scheduler.eta_min = eta_min * scale


def _rescale_unit(optimizer: Optimizer, params: list[torch.Tensor], scale: float) -> None:
    # Radial coefficient of the momentum buffer along the whole unit (weight and bias together),
    # computed once, before any buffer is changed.
    pairs = _unit_buffers(optimizer, params)
    norm_sq = float(sum(p.detach().double().square().sum() for p in params))
    radial = float(sum((b.double() * w.double()).sum() for b, w in pairs)) if pairs else 0.0
    coefficient = radial / norm_sq if norm_sq > 0 else 0.0
    for p in params:
        state = optimizer.state.get(p, {})
        buffer = state.get("momentum_buffer")
        if isinstance(buffer, torch.Tensor):
            # The radial part behaves like the weight (weight decay), the rest like a gradient.
            along = coefficient * p.detach()
            buffer.sub_(along).div_(scale).add_(along, alpha=scale)
        for key, power in (("exp_avg", -1), ("exp_avg_sq", -2), ("max_exp_avg_sq", -2)):
            if isinstance(state.get(key), torch.Tensor):
                state[key].mul_(scale**power)
    for p in params:
        p.mul_(scale)


def _unit_buffers(
    optimizer: Optimizer, params: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = []
    for p in params:
        buffer = optimizer.state.get(p, {}).get("momentum_buffer")
        if isinstance(buffer, torch.Tensor):
            pairs.append((buffer, p.detach()))
    return pairs
