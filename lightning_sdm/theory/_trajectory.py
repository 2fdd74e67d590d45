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
nothing fitted. ``G`` is the one data-dependent quantity: the scale-invariant size of the update
(SGD: ``|grad|^2 |w|^2`` with momentum's factor; AdamW: the update's squared RMS times the
fan-in). The monitor measures it at every window (the angle and the norm: ``G = angle^2 q /
lr^2``) and, from the measured norm, integrates ``q`` along the real per-step LR and weight decay
of the next window, so that it predicts that window's angle before seeing it.

Adam's second moment (``beta2``): the gradient of a scale-invariant weight scales as ``1/|w|``,
so ``v`` is an average over the last ``1/(1 - beta2)`` steps of ``G_grad / q`` (``p = 2``), and
the update's squared size is ``G (1/q_t) / u_t`` with ``u_t`` that average of ``1/q``
(``u = 1/q`` when the norm stands still). After an LR decay the norm shrinks faster than ``u``
follows and the update is larger than in equilibrium (up to 10-22% in the simulation); the
integration carries ``u`` (:attr:`TrajectoryConstants.memory`).

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


@dataclass(frozen=True)
class TrajectoryConstants:
    """The family's constants of the norm balance (see the module docstring).

    Attributes:
        decay: ``K``, the e-folding rate of ``q`` per unit of ``lr * weight_decay``.
        growth: ``B``, the growth of ``q`` per step per unit of ``lr^2 G``.
        power: ``p`` of ``q = |w|^p``.
        memory: Adam's ``beta2`` (the second moment's memory of ``1/q``); 0 for the families
            whose update size has no such memory.
    """

    decay: float
    growth: float
    power: float
    memory: float = 0.0


@dataclass
class TrajectoryState:
    """One unit's place on its trajectory (plain floats, checkpointed).

    Attributes:
        q: ``|w|^p`` at the end of the last window (measured).
        scale: ``G``, the update size the last window measured (NaN before the first window).
        memory: ``u``, Adam's second-moment average of ``1/q`` (NaN: none, or taken as ``1/q``).
    """

    q: float
    scale: float = math.nan
    memory: float = math.nan

    def as_list(self) -> list[float]:
        """``[q, scale, memory]``, for checkpoints."""
        return [self.q, self.scale, self.memory]


def trajectory_constants(prediction: Prediction) -> TrajectoryConstants | None:
    """``K``, ``B`` and ``p`` of a prediction's family; ``None`` without a norm balance.

    ``None`` for Adafactor (both rules, through :func:`equilibrium_norm_exponent`, which has
    none for it): its relative step turns the weight by ``rho_t`` times
    the update's RMS whatever the norm, so ``angle = lr sqrt(G / q)`` does not hold; fitted to
    its last window, the balance only echoed that window and the detector took a unit whose
    angle drifted away from the prediction for one that follows a moving equilibrium. The
    static prediction (per step, ``rho_t / sqrt(1 + a M)``) is what its angle is judged against.

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
    beta2 = hyper.get("beta2", 0.0) if prediction.family == "adam" else 0.0
    memory = beta2 if 0.0 < beta2 < 1.0 else 0.0
    return TrajectoryConstants(
        1.0 / (tau * lr * wd), 1.0 / (tau * value * value), 1 / exponent, memory
    )


def advance(
    q: float,
    scale: float,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    constants: TrajectoryConstants,
    memory: float = math.nan,
) -> tuple[float, list[float], float]:
    """Integrate ``q`` over steps: the final ``q``, each step's mean square per ``G``, the memory.

    ``scale`` (``G``) is held constant over the steps. The second value is, per step,
    ``f_t lr_t^2 / q_t`` (``q_t`` before the step; ``f_t = (1/q_t) / u_t`` Adam's second-moment
    factor, 1 without memory): times ``G``, the step's mean square angle. ``memory`` is ``u`` at
    the start (NaN: ``1/q``, the norm stood still) and the third value ``u`` at the end (NaN
    without memory).
    """
    beta = constants.memory
    if beta > 0 and not (math.isfinite(memory) and memory > 0):
        memory = 1.0 / q if q > 0 else math.nan
    terms = []
    for lr, wd in zip(lrs, weight_decays, strict=True):
        lr, wd = max(lr, 0.0), max(wd, 0.0)
        factor = 1.0
        if beta > 0 and q > 0:
            # v_t = beta2 v_(t-1) + (1 - beta2) g_t^2 with g_t^2 ~ 1/q_t; the step uses v_t.
            memory = beta * memory + (1.0 - beta) / q
            factor = 1.0 / (q * memory)
        terms.append(factor * lr * lr / q if q > 0 else math.inf)
        x = constants.decay * lr * wd
        keep = math.exp(-x)
        # (1 - e^-x) / x -> 1 without weight decay: the norm then only grows.
        gain = -math.expm1(-x) / x if x > 1e-12 else 1.0 - x / 2
        q = q * keep + factor * lr * lr * scale * constants.growth * gain
    return q, terms, (memory if beta > 0 else math.nan)


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

    The prediction starts from the norm measured at the end of the last window (exact: the
    model's own ``q`` would carry any mismatch of its norm balance for a relaxation time, which
    at a small LR is the rest of the run) and from the update size ``G`` that window measured:
    ``G`` of these networks moves by +-20% from one 20-step window to the next with a
    correlation of 0.55-0.65 between neighbours, so the last window's is a better guess of the
    next one's than a running mean, which lags it (``studies/trajectory``, ``docs/trajectory.md``).

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
    predicted = None
    if state is None or not (math.isfinite(state.q) and state.q > 0):
        if not usable:
            return None, None
        # Start on the measured norm; within this first window it is taken as constant, and
        # without a G yet nothing is predicted.
        scale = 0.0
        terms = [max(lr, 0.0) ** 2 / q_measured for lr in lrs]
        q_end, memory = q_measured, (1.0 / q_measured if constants.memory > 0 else math.nan)
    else:
        scale = state.scale if math.isfinite(state.scale) and state.scale > 0 else 0.0
        q_end, terms, memory = advance(state.q, scale, lrs, weight_decays, constants, state.memory)
    mean_terms = _measured_mean(terms, measured)
    if scale > 0 and math.isfinite(mean_terms):
        predicted = math.sqrt(scale * mean_terms)
    if not usable:
        # Nothing measured: the model carries on alone (its own q, the last G).
        return TrajectoryState(q_end, state.scale if state else math.nan, memory), predicted
    new = TrajectoryState(q_measured, math.nan, memory)
    if mean_terms > 0 and math.isfinite(mean_terms) and q_end > 0:
        # G of this window: the model's shape of lr^2 / q within the window, its level set by
        # the measured norm.
        new.scale = angle * angle / (mean_terms * q_end / q_measured)
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
    _, terms, _ = advance(q, 1.0, lrs, weight_decays, constants)
    return [math.sqrt(t) for t in terms]
