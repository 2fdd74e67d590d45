"""The radial balance: the angle a unit would turn by if its norm had settled, from its own steps.

Every prediction of :mod:`lightning_sdm.theory._predictions` is a norm balance: weight decay pulls
the norm in, the updates push it out, and a stationary norm fixes the angle. The a-priori value
assumes the update's radial part (its component along the weight) that white gradient noise
gives. A real network can differ in two ways, and the monitor tells them apart per unit:

* the radial part differs (a property of the task's gradients: the preconditioned gradient of
  AdamW leaks along the weight when its size differs between the weight's elements, as in a
  small-fan-in first convolution; Muon's orthogonalised momentum points more or less outward
  than on noise): then the norm settles elsewhere and the angle with it;
* the norm has not settled (it is still relaxing, or the equilibrium moves with the task).

The **radial balance** is the angle the norm balance gives with the update's radial part as
measured. ``measured / balance`` is the norm not having settled (1 once it has), and
``balance / a priori`` is the radial part's share of ``measured / a priori`` (1 on white noise).

Derivation (exact; decoupled weight decay: AdamW, Adam and RAdam with decoupled weight decay,
Muon, Lion). Each step decays the weight by ``lam = lr * wd`` (Muon's decay uses the unadjusted
``lr``; lion-pytorch's ``decoupled_weight_decay`` divides ``wd`` by the initial lr, which the
prediction's hyper-parameters already did) and subtracts the update::

    w_{t+1} = (1 - lam) w_t - Delta_t,     Delta_t = -(d_t + lam w_t),   d_t = w_{t+1} - w_t

The monitor already sums, per unit row and step in float64, ``A = |w_t|^2``, ``B = |d|^2`` and
``C = <d, w_t>``, so with no further pass over the weights::

    R = <w_t, Delta_t> = -(C + lam A),      U = |Delta_t|^2 = B + 2 lam C + lam^2 A

and, exactly, ``|w_{t+1}|^2 = (1 - lam)^2 A - 2 (1 - lam) R + U``. A norm that has settled over
the window's steps (``sum |w_{t+1}|^2 = sum |w_t|^2``) gives::

    sum U = sum lam (2 - lam) A + 2 sum (1 - lam) R

The radial part is scale-free as ``P = R / U`` (AdamW on white noise: ``P = -beta1 / (1 -
beta1)``, the momentum filter's: its radial component comes from the weight having turned under
the momentum's earlier terms, which scales as ``|Delta|^2 / |w|``, not with the norm). Holding
``P`` at its measured value, with ``p = sum (1 - lam) R / sum U`` and ``L = sum lam (2 - lam) A /
sum A``, the update's size in balance is::

    u = sum U / sum A = L / (1 - 2 p)             (no balance if 1 - 2 p <= 0)

and a step of that size with radial part ``R = P u |w|^2`` (``P = sum R / sum U``) turns the
weight by exactly::

    theta = atan2(sqrt(u - P^2 u^2), 1 - lam - P u)

(its component orthogonal to ``w_t`` over its component along it). Nothing is linearised: the
``lam^2`` terms, the ``(1 - lam)`` weights and the radial part of the step itself are kept; they
shift the angle by a fraction ``~ lam`` and ``~ P u`` (1e-3 at usual settings). Where the norm
has settled the balance equals the measured RMS angle to the window's own fluctuations (the RMS
of the steps' angles against the angle of their mean update size); where it has not,
``(measured / balance)^2 - 1`` is the norm's drift per step over ``L |w|^2``: its relative rate
of change against the decay's pull.

Precision: ``U`` is computed from ``B`` (of order ``theta^2 A``) and ``lam C``, ``lam^2 A`` (of
order ``theta^4 A``): no cancellation; ``R`` subtracts ``lam A`` from ``-C``, of the same order
(``C ~ -(lam - P theta^2) A`` with ``-P theta^2 ~ 20 lam``): a digit at most of float64's 16.
What limits it is the weights' own dtype: the optimizer rounds ``(1 - lam)`` and each element to
float32 (``6e-8`` relative), against a radial part of ``~ 2 lam``; below ``lam ~ 1e-6`` (or with
bfloat16 weights, whose rounding is ``4e-3`` of each element) the radial part is not resolved.

The monitor (``UnitWindow.balance``) takes ``p`` and ``P`` from the sums of the recent windows,
forgotten over 256 measured steps (:data:`lightning_sdm.monitor._monitor.RADIAL_MEMORY`): the
radial part does not move with the norm, but one window estimates it poorly and the balance is
convex in it. ``L`` and the decay are the window's own.

SGD (weight decay coupled, through the momentum) has no such split, and needs none: the radial
part is fixed a priori. With heavy-ball momentum ``mu`` and ``v_t = w_{t+1} - w_t = mu v_{t-1} -
lr (g_t + wd w_t)``, a gradient orthogonal to the weight it was computed at gives exactly
``<w_t, v_t> = mu (<w_{t-1}, v_{t-1}> + |v_{t-1}|^2) - lr wd |w_t|^2``, and with a settled norm
(``2 <w, v> + |v|^2 = 0``) ``|v|^2 / |w|^2 = 2 lr wd / (1 + mu)``: the a-priori prediction,
whatever the gradients' correlations (``lr (1 - dampening)`` with dampening; ``mu = 0`` without
momentum). So SGD's balance is its prediction, and all of its ``measured / predicted`` is the
norm (Nesterov's update mixes two momentum terms and is a priori only to the simulation's
0.1%). Adafactor's steps are relative to the weight: its angle needs no norm balance, and it
has none here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sdm.functional import DELTA_DOT, DELTA_SQ, PREV_SQ
from lightning_sdm.theory._predictions import Prediction

__all__ = [
    "NUM_SUMS",
    "balance_angle",
    "balance_kind",
    "decay_lost_to_rounding",
    "decoupled_decay",
    "window_sums",
]


def balance_kind(prediction: Prediction) -> str | None:
    """How a param group's radial balance is had: ``"measured"``, ``"a priori"`` or ``None``.

    ``"measured"``: decoupled weight decay (:func:`radial_balance` from the window's steps);
    ``"a priori"``: SGD, whose radial part the momentum and weight decay fix (the balance is the
    prediction); ``None``: no prediction, no weight decay, or steps relative to the weight
    (Adafactor).

    Example::

        >>> import torch
        >>> from lightning_sdm.theory import predict_param_group
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> [balance_kind(predict_param_group(o, o.param_groups[0])) for o in (
        ...     torch.optim.AdamW([w], weight_decay=0.1), torch.optim.SGD([w], lr=0.1,
        ...     weight_decay=1e-4), torch.optim.Adam([w], weight_decay=0.1))]
        ['measured', 'a priori', None]
    """
    if prediction.angular_update is None or not prediction.angular_update > 0:
        return None
    if prediction.family == "sgd":
        return "a priori"
    return "measured" if decoupled_decay(prediction) is not None else None


def decay_lost_to_rounding(prediction: Prediction, dtype: torch.dtype) -> float | None:
    """The decoupled decay per step if weights of ``dtype`` cannot hold it, else ``None``.

    ``w * (1 - lam)`` rounds back to ``w`` wherever ``lam |w|`` is under half the spacing of
    ``dtype`` at ``w``, i.e. for ``lam`` under ``eps/4`` to ``eps/2`` depending on where ``w``
    lies in its binade: below ``eps/2`` some or all elements are not decayed (bfloat16:
    ``eps/2 = 0.0039``; ``lr * wd = 1e-3`` leaves every element unchanged), the norm is not held
    and neither the prediction nor the radial balance describes the weight.

    Example::

        >>> import torch
        >>> from lightning_sdm.theory import predict_param_group
        >>> w = torch.nn.Parameter(torch.ones(4, 4))
        >>> opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=1.0)
        >>> prediction = predict_param_group(opt, opt.param_groups[0])
        >>> decay_lost_to_rounding(prediction, torch.bfloat16), decay_lost_to_rounding(
        ...     prediction, torch.float32)
        (0.001, None)
    """
    decay = decoupled_decay(prediction)
    if decay is None or not dtype.is_floating_point:
        return None
    return decay if decay < torch.finfo(dtype).eps / 2 else None


def decoupled_decay(prediction: Prediction) -> float | None:
    """The weight's decay per step, ``lam`` in ``w <- (1 - lam) w - Delta``, where decoupled.

    ``lr * weight_decay`` for AdamW (and Adam, RAdam with decoupled weight decay), Muon (the
    unadjusted lr) and Lion; ``None`` for coupled weight decay (SGD, Adam's L2), Adafactor, an
    unknown optimizer, or no decay.

    Example::

        >>> import torch
        >>> from lightning_sdm.theory import predict_param_group
        >>> w = torch.nn.Parameter(torch.ones(4, 4))
        >>> opt = torch.optim.Muon([w], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        >>> round(decoupled_decay(predict_param_group(opt, opt.param_groups[0])), 6)
        0.002
    """
    hyper = prediction.hyperparameters
    family = prediction.family
    decoupled = family in ("muon", "lion") or (
        family == "adam" and hyper.get("decoupled_weight_decay", 0.0) > 0
    )
    if not decoupled:
        return None
    decay = hyper.get("lr", 0.0) * hyper.get("weight_decay", 0.0)
    return decay if 0.0 < decay < 1.0 else None


#: Columns of :func:`window_sums`: ``sum (1 - lam) R``, ``sum U``, ``sum R`` (each over
#: ``sum A``, so that windows at different norms add), ``L = sum lam (2 - lam) A / sum A`` and the
#: mean decay ``sum lam A / sum A``.
NUM_SUMS = 5


def window_sums(statistics: Tensor, decays: Tensor) -> Tensor:
    """Per unit row, what the radial balance needs from a window's per-step statistics.

    Args:
        statistics: ``[steps, rows, 4]`` float64, the monitor's per-step sums (columns
            ``PREV_SQ``, ``DELTA_SQ``, ``DELTA_DOT`` of :mod:`lightning_sdm.functional`; summed
            over ranks or not: only ratios are taken).
        decays: ``[steps, rows]`` (or broadcastable), each step's :func:`decoupled_decay`.

    Returns:
        ``[rows, NUM_SUMS]`` float64: ``sum (1 - lam) R``, ``sum U`` and ``sum R`` over
        ``sum A``, then ``L`` and the mean decay (module docstring). Scale-free: the first three
        of several windows add (:func:`balance_angle` takes their ratios).
    """
    a = statistics[..., PREV_SQ]
    b = statistics[..., DELTA_SQ]
    c = statistics[..., DELTA_DOT]
    lam = decays.to(a).expand_as(a)
    radial = -(c + lam * a)  # R = <w, Delta>
    size = b + lam * (2 * c + lam * a)  # U = |Delta|^2, no cancellation (module docstring)
    total = a.sum(0)
    columns = [(1 - lam) * radial, size, radial, lam * (2 - lam) * a, lam * a]
    return torch.stack([column.sum(0) / total for column in columns], dim=-1)


def balance_angle(sums: Tensor) -> Tensor:
    """The radial balance angle per row from :func:`window_sums` (or their sum over windows).

    Returns:
        ``[rows]`` float64 angles (radians); NaN where a row has no balance (a zero weight, a
        radial part ``p >= 1/2`` that shrinks the norm at any update size, a NaN decay).

    Example::

        >>> import math, torch
        >>> # A step that turns a unit weight by 0.01 rad, its norm unchanged: in balance.
        >>> lam, theta = 1e-4, 0.01
        >>> w = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> d = torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64) - w
        >>> stats = torch.stack([w @ w, d @ d, d @ w, torch.tensor(1.0, dtype=torch.float64)])
        >>> sums = window_sums(stats.reshape(1, 1, 4), torch.full((1, 1), lam))  # 1 step, 1 row
        >>> round(balance_angle(sums).item() / theta, 9)
        1.0
    """
    weighted, size, radial, pull, decay = sums.unbind(-1)
    p = weighted / size
    u = pull / (1 - 2 * p)  # |Delta|^2 / |w|^2 in balance
    big_p = radial / size
    along = 1 - decay - big_p * u
    across = (u - big_p * big_p * u * u).clamp(min=0).sqrt()
    angle = torch.atan2(across, along)
    defined = (size > 0) & (1 - 2 * p > 0) & torch.isfinite(angle)
    return torch.where(defined, angle, torch.full_like(angle, float("nan")))
