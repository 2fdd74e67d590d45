"""The angular update a schedule leads to, step by step: the norm balance integrated over time.

The static prediction (:mod:`~lightning_sdm.theory._predictions`) is where a scale-invariant
weight ends up if the hyper-parameters stand still for several relaxation times. Under a schedule
they do not, and the weight follows a trajectory instead. Between equilibria the norm obeys a
simple balance (Wan et al. 2020, Sec. 3-4; J. Su, "Weight decay and learning rate: a
moving-average view", kexue.fm/archives/11404, 2025; Kosson et al. 2024 per optimizer family):
weight decay shrinks the squared norm by about ``2 lr_t wd_t`` of itself per step, the orthogonal
update grows it by ``lr_t^2`` times the squared update size. With ``q = |w|^p`` (``p = 4`` for
SGD, whose update shrinks as ``1/|w|``; ``p = 2`` for AdamW and Lion, whose update has a fixed
size per element) both terms are linear in ``q``::

    q_{t+1} = q_t exp(-x_t) + lr_t^2 G B (1 - exp(-x_t)) / x_t,    x_t = K lr_t wd_t
    angular update_t = lr_t sqrt(G / q_t)

``K`` (the decay of ``q`` per unit of ``lr * wd``: ``4 / (1 - momentum)`` for SGD, ``2`` for
decoupled weight decay) and ``B`` (the growth per unit of ``lr^2 G``) are the family's, read off
the static prediction and its relaxation time (:func:`relaxation_time` is ``1 / x``; the fixed
point is the static prediction), so the trajectory reduces to them under a constant LR and adds
nothing fitted. ``G`` is the one data-dependent constant: the scale-invariant size of the update
(SGD: ``|grad|^2 |w|^2`` with momentum's factor; AdamW: the update's squared RMS times the
fan-in). The monitor estimates it from what it measures at every window (the angle and the norm:
``G = angle^2 q / lr^2``) and integrates ``q`` itself along the real per-step LR and weight decay,
so that it predicts the angle of the next window, not repeats the last one.

Without ``G``, the same model runs relative to the equilibrium: :func:`angular_update_trajectory`
takes the ratio at which the weights start (1: in equilibrium) and returns the predicted angle of
every step of a schedule. Checked against :func:`~lightning_sdm.theory.simulate_scale_invariant`
under warm-up + cosine, OneCycle, WSD, step decays and linear-to-zero (``tests/theory``) and against
training measured at every step (``studies/trajectory``, ``docs/trajectory.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_sdm.theory._predictions import (
    Prediction,
    equilibrium_norm_exponent,
    relaxation_time,
)

__all__ = [
    "TrajectoryConstants",
    "TrajectoryState",
    "advance",
    "angular_update_trajectory",
    "observe",
    "trajectory_constants",
]

# How much of a new window's estimate of G enters the running one (in logs): the estimate of one
# window scatters by the sampling error of its RMS (5-20% for short windows of small layers).
_SCALE_WEIGHT = 1.0 / 3.0


@dataclass(frozen=True)
class TrajectoryConstants:
    """The family's constants of the norm balance (see the module docstring).

    Attributes:
        decay: ``K``, the e-folding rate of ``q`` per unit of ``lr * weight_decay``.
        growth: ``B``, the growth of ``q`` per step per unit of ``lr^2 G``.
        power: ``p`` of ``q = |w|^p``.
    """

    decay: float
    growth: float
    power: float


@dataclass
class TrajectoryState:
    """One unit's place on its trajectory (plain floats, checkpointed).

    Attributes:
        q: ``|w|^p`` the model predicts now.
        scale: ``G``, the running estimate of the update size (NaN before the first window).
    """

    q: float
    scale: float = math.nan

    def as_list(self) -> list[float]:
        """``[q, scale]``, for checkpoints."""
        return [self.q, self.scale]


def trajectory_constants(prediction: Prediction) -> TrajectoryConstants | None:
    """``K``, ``B`` and ``p`` of a prediction's family; ``None`` without an equilibrium.

    Read off the static prediction at the prediction's own hyper-parameters: ``K = 1 / (tau lr
    wd)`` and ``B = 1 / (tau Delta*^2)`` (``tau``: :func:`relaxation_time`), which hold at every
    LR since ``Delta*^2`` grows and ``tau`` shrinks as ``lr * wd`` for every family.

    Example::

        >>> import torch
        >>> from lightning_sdm.theory import predict_param_group
        >>> w = torch.nn.Parameter(torch.randn(8, 4))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4)
        >>> c = trajectory_constants(predict_param_group(opt, opt.param_groups[0]))
        >>> round(c.decay, 6), c.power
        (40.0, 4.0)
    """
    tau = relaxation_time(prediction)
    exponent = equilibrium_norm_exponent(prediction)
    value = prediction.angular_update
    hyper = prediction.hyperparameters
    lr, wd = hyper.get("lr", 0.0), hyper.get("weight_decay", 0.0)
    if tau is None or exponent is None or not value or not (lr > 0 and wd > 0):
        return None
    if not (math.isfinite(tau) and tau > 0):
        return None
    return TrajectoryConstants(1.0 / (tau * lr * wd), 1.0 / (tau * value * value), 1 / exponent)


def advance(
    q: float,
    scale: float,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    constants: TrajectoryConstants,
) -> tuple[float, list[float]]:
    """Integrate ``q`` over steps; returns the final ``q`` and ``lr_t^2 / q_t`` before each step.

    ``scale`` (``G``) is held constant over the steps. The angle of step ``t`` is
    ``sqrt(G lr_t^2 / q_t)``: the second value, times ``G``, is each step's mean square.
    """
    terms = []
    for lr, wd in zip(lrs, weight_decays, strict=True):
        lr, wd = max(lr, 0.0), max(wd, 0.0)
        terms.append(lr * lr / q if q > 0 else math.inf)
        x = constants.decay * lr * wd
        keep = math.exp(-x)
        # (1 - e^-x) / x -> 1 without weight decay: the norm then only grows.
        gain = -math.expm1(-x) / x if x > 1e-12 else 1.0 - x / 2
        q = q * keep + lr * lr * scale * constants.growth * gain
    return q, terms


def observe(
    state: TrajectoryState | None,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    measured: Sequence[bool],
    constants: TrajectoryConstants,
    angle: float,
    norm: float,
) -> tuple[TrajectoryState | None, float | None]:
    """One window: the predicted RMS angle over its measured steps, then the state updated.

    Args:
        state: the unit's state after the last window (``None``: this window starts it).
        lrs: LR of every optimizer step since the last window, in order.
        weight_decays: weight decay of the same steps.
        measured: which of these steps the window measured.
        constants: the family's (:func:`trajectory_constants`).
        angle: the window's measured RMS angular update.
        norm: the unit's norm at the window's end.

    Returns:
        The new state, and the prediction for this window made before seeing it (``None`` for
        the first window, or where nothing can be predicted).
    """
    usable = math.isfinite(angle) and angle > 0 and math.isfinite(norm) and norm > 0
    if not lrs or not any(measured):
        return state, None
    q_measured = norm**constants.power
    if state is None or not (math.isfinite(state.q) and state.q > 0):
        if not usable:
            return None, None
        # Start on the measured norm; within this first window it is taken as constant.
        state = TrajectoryState(q_measured)
        mean_terms = _measured_mean([lr * lr / q_measured for lr in lrs], measured)
        if mean_terms > 0 and math.isfinite(mean_terms):
            state.scale = angle * angle / mean_terms
        return state, None
    scale = state.scale if math.isfinite(state.scale) and state.scale > 0 else 0.0
    q_end, terms = advance(state.q, scale, lrs, weight_decays, constants)
    mean_terms = _measured_mean(terms, measured)
    predicted = math.sqrt(scale * mean_terms) if scale > 0 and math.isfinite(mean_terms) else None
    new = TrajectoryState(q_end, state.scale)
    if usable and mean_terms > 0 and math.isfinite(mean_terms) and q_end > 0:
        # G from this window: the model's shape of lr^2 / q within the window, its level set by
        # the measured norm (the norm is exact; the model's q only carries the schedule's memory).
        estimate = angle * angle / (mean_terms * q_end / q_measured)
        if scale > 0:
            log = math.log(scale) + _SCALE_WEIGHT * (math.log(estimate) - math.log(scale))
            new.scale = math.exp(log)
        else:
            new.scale = estimate
    return new, predicted


def _measured_mean(terms: Sequence[float], measured: Sequence[bool]) -> float:
    chosen = [t for t, m in zip(terms, measured, strict=True) if m]
    return sum(chosen) / len(chosen) if chosen else math.nan


def angular_update_trajectory(
    prediction: Prediction,
    lrs: Sequence[float],
    weight_decays: Sequence[float] | None = None,
    start: float = 1.0,
) -> list[float]:
    """Predicted RMS angular update at every step of a schedule, from a given start.

    The norm balance of the module docstring, relative to the equilibrium of the first step (the
    update size ``G`` cancels): the weights start where the angle is ``start`` times the static
    prediction at ``lrs[0]`` (1: in equilibrium; 3: far above it, e.g. right after
    initialisation with a small norm), and the norm follows the schedule from there.

    Args:
        prediction: the static prediction of the unit's param group at any LR and weight decay
            of the schedule (:func:`~lightning_sdm.theory.predict_param_group`); gives the family
            and its momentum factors.
        lrs: the LR of every step (> 0 at the first step).
        weight_decays: the weight decay of every step; by default the prediction's, constant.
        start: angle / static prediction at the first step (> 0).

    Returns:
        One predicted angle (radians per step) per step of ``lrs``.

    Raises:
        ValueError: for a prediction without an equilibrium, mismatched lengths, a first LR
            that is not positive, or a ``start`` that is not positive.

    Example::

        >>> import torch
        >>> from lightning_sdm.theory import predict_param_group
        >>> w = torch.nn.Parameter(torch.randn(8, 4))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=5e-3)
        >>> p = predict_param_group(opt, opt.param_groups[0])
        >>> path = angular_update_trajectory(p, [0.1] * 100 + [0.01] * 4000)  # 8 relaxation times
        >>> round(path[99] / p.angular_update, 3)  # in equilibrium before the drop
        1.0
        >>> round(path[100] / p.angular_update, 3)  # the angle falls by 10x at once ...
        0.1
        >>> round(path[-1] / (p.angular_update / 10**0.5), 2)  # ... and climbs to the new one
        1.0
    """
    constants = trajectory_constants(prediction)
    if constants is None:
        raise ValueError(
            f"`prediction` has no equilibrium to follow ({prediction.rule}: {prediction.reason})."
        )
    lrs = [float(v) for v in lrs]
    hyper = prediction.hyperparameters
    if weight_decays is None:
        weight_decays = [hyper["weight_decay"]] * len(lrs)
    weight_decays = [float(v) for v in weight_decays]
    if len(weight_decays) != len(lrs):
        raise ValueError(
            f"`weight_decays` must have one value per step of `lrs` ({len(lrs)}), got "
            f"{len(weight_decays)}."
        )
    if not lrs or not lrs[0] > 0 or not weight_decays[0] > 0:
        raise ValueError("`lrs` must start with a positive LR (and weight decay).")
    if not (isinstance(start, (int, float)) and math.isfinite(start) and start > 0):
        raise ValueError(f"`start` must be a positive ratio, got {start!r}.")
    # Units where G = 1: the static q at the first step is lr0^2 B / (K lr0 wd0); the angle there
    # is the static prediction, and ``start`` scales it by 1 / sqrt(q / q*).
    lr0, wd0 = lrs[0], weight_decays[0]
    q_static = lr0 * lr0 * constants.growth / (constants.decay * lr0 * wd0)
    q = q_static / (start * start)
    _, terms = advance(q, 1.0, lrs, weight_decays, constants)
    return [math.sqrt(t) for t in terms]
