"""What theory predicts for the angular update of scale-invariant weights, and how fast.

A weight followed by a normalization layer is scale-invariant: its gradient is orthogonal to it
and shrinks as ``1/|w|``. Weight decay pulls the norm in, the orthogonal updates push it out, and
the two balance: in that equilibrium the weight turns by a fixed root-mean-square angle per step
that depends only on hyper-parameters. The predictions here, per optimizer (``eta`` = lr,
``lam`` = weight decay)::

    SGD                                 sqrt(2 eta lam)                        SMD Thm 1/3
    SGD, heavy-ball momentum alpha      sqrt(2 eta lam / (1 + alpha))          SMD Thm 3, Eq. 14
    SGD, dampening tau                  eta -> eta (1 - tau) in the above      derived
    SGD, Nesterov mu                    sqrt(2 eta lam (1+2mu-2mu^3)/(1+mu))   derived, in no paper
    AdamW (and Adam with decoupled wd)  sqrt(2 eta lam (1 - b1) / (1 + b1))    Kosson et al., REQ
    RAdam with decoupled weight decay   as AdamW, once its rectifier is ~1      derived
    Lion                                sqrt(2 eta lam / S), radial-corrected  derived (REQ balance)
        S = 1 + 2 sum_k (1 - eta lam)^k (2/pi) arcsin(r_k), r_k the momentum's autocorrelation
    Adam with coupled L2 weight decay   none: depends on the gradient norm     REQ
    anything else                       none published: the angle is still measured

Sources: SMD = R. Wan, Z. Zhu, X. Zhang, J. Sun, "Spherical Motion Dynamics: Learning Dynamics of
Neural Network with Normalization, Weight Decay, and SGD", arXiv:2006.08419. Kosson et al. = A.
Kosson, B. Messmer, M. Jaggi, "Rotational Equilibrium: How Weight Decay Balances Learning Across
Neural Networks", ICML 2024, arXiv:2305.17212, with its official code github.com/epfml/REQ (REQ).
"Derived" formulas come from the same random-walk argument applied to PyTorch's exact update and
are published nowhere; they were checked against
:func:`lightning_sdm.theory.simulate_scale_invariant`.

Compare a prediction with the ROOT-MEAN-SQUARE of the measured per-step angle over a window, not
with its mean (the mean of a fluctuating angle is lower than its RMS).

How the predictions were validated: :func:`~lightning_sdm.theory.simulate_scale_invariant`
integrates a scale-invariant problem with no network (the gradient of each row is fresh Gaussian
noise projected orthogonal to the row and divided by its norm) with the real ``torch.optim``
classes, and measures the RMS angle per row with :func:`lightning_sdm.functional.angular_update`.
``examples/validate_theory.py`` prints the table; ``tests/test_theory.py`` asserts
measured/predicted within 3% on the same grid (the Lion deviations below are recorded as expected
failures). Findings worth knowing:

* SGD, heavy ball, dampening and Nesterov: measured/predicted within 0.1%.
* AdamW (beta1 0.5 to 0.95), Adam with decoupled weight decay and AMSGrad: within 0.1%; RAdam
  with decoupled weight decay (beta2 = 0.99, rectifier ~1): 0.6%.
* Lion: REQ's formula ``sqrt(pi/2) sqrt(2 eta lam K)``, ``K = (1-b1)^2 + b1^2 (1-b2)/(1+b2)``,
  linearises ``sign``: it read 0.94 at betas (0.5, 0.9), 1.03 at (0.9, 0.99) with
  ``lr * wd = 1e-3`` and 1.11 at (0.9, 0.999). The sign's autocorrelation by the arcsine law,
  summed over the lags the weight remembers (:mod:`lightning_sdm.theory._lion`), is within 0.5%
  on the grid (betas 0 to 0.99, ``beta2`` 0.9 to 0.999) and within 2% up to
  ``lr * wd = 0.2`` (``1 - beta2`` and beyond, once settled), where REQ's formula is 15-40% off;
  1.10 at ``lr * wd = 0.5``.
* The norm relaxes twice as fast as the rate stated in SMD: see :func:`relaxation_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lightning_sdm._checks import check_fraction, check_number
from lightning_sdm.theory._lion import lion_equilibrium, lion_filter_variance
from lightning_sdm.theory._muon import linear_memory_factor, muon_memory_ratio
from lightning_sdm.theory._optimizers import (
    Family,
    basic_hyperparameters,
    family_of,
    has_param_groups,
    invalid_reason,
    read_hyperparameters,
    recognise,
    unwrap,
)

__all__ = [
    "Prediction",
    "for_shape",
    "predict_param_group",
    "explain_equilibrium",
    "equilibrium_angular_update",
    "relaxation_time",
    "relaxation_steps",
    "decoupled_relaxation_steps",
    "lr_change_relaxation_steps",
    "equilibrium_norm_exponent",
    "steps_to_equilibrium",
    "equilibrium_weight_norm",
    "adamw_equilibrium_weight_norm",
]

_SMD = "Wan et al. 2020, Spherical Motion Dynamics (arXiv:2006.08419)"
_REQ = "Kosson et al. 2024, Rotational Equilibrium (arXiv:2305.17212)"


@dataclass(frozen=True)
class Prediction:
    """The predicted equilibrium angular update of one parameter group, with its justification.

    Attributes:
        angular_update: predicted RMS angle per step in equilibrium (radians), or ``None`` where
            theory gives no value.
        optimizer: the optimizer's class name, e.g. ``"SGD"``.
        rule: short name of the formula used (``"sgd_heavy_ball"``, ``"adamw"``, ...), or of the
            reason there is none (``"no_weight_decay"``, ``"adam_coupled_l2"``, ``"unknown"``).
        reason: the formula with its numbers, or why there is no prediction.
        source: where the formula comes from (paper and equation), or ``"derived: ..."``.
        hyperparameters: the values the prediction read from the parameter group.
        family: the kind of dynamics (``"sgd"``, ``"adam"``, ``"lion"``; ``None`` for an
            optimizer theory does not know). Everything that depends on it (relaxation time,
            rescaling) reads it from here.
    """

    angular_update: float | None
    optimizer: str
    rule: str
    reason: str
    source: str
    hyperparameters: dict[str, float] = field(default_factory=dict)
    family: Family | None = None

    @property
    def available(self) -> bool:
        """Whether theory gives a value for this group."""
        return self.angular_update is not None

    def as_dict(self) -> dict[str, Any]:
        """Plain values for run configs: optimizer, rule, hyper-parameters, value, reasons."""
        return {
            "optimizer": self.optimizer,
            "rule": self.rule,
            **self.hyperparameters,
            "prediction": self.angular_update,
            "reason": self.reason,
            "source": self.source,
        }


def predict_param_group(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> Prediction:
    """Predict the equilibrium angular update of one parameter group from its current values.

    Only the hyper-parameters matter (not the data, the model or the current weights): the formulas
    are listed in the module docstring. Never raises on odd values (a scheduler may set anything):
    a negative or non-finite hyper-parameter gives ``None`` with the reason.

    Args:
        optimizer: the optimizer owning ``group``; a Lightning ``LightningOptimizer`` is unwrapped.
            Its class selects the formula.
        group: one of ``optimizer.param_groups`` (``lr`` may be a tensor).

    Returns:
        The :class:`Prediction`; ``angular_update`` is ``None`` where theory gives no value, and
        ``0.0`` for ``lr == 0`` (nothing moves).

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.randn(8, 4))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4)
        >>> p = predict_param_group(opt, opt.param_groups[0])
        >>> p.rule, round(p.angular_update, 6)
        ('sgd_heavy_ball', 0.007255)
        >>> p.reason
        'sqrt(2*lr*wd/(1+momentum)) = sqrt(2*0.1*0.0005/(1+0.9)) = 0.00725476 rad per step'
    """
    optimizer = unwrap(optimizer)
    key, name = recognise(optimizer)
    if key is None:
        reason = f"no published equilibrium for {name}; {_MEASURED}"
        return _none(name, "unknown", reason, basic_hyperparameters(group))
    if key == "overridden":
        reason = (
            f"{name} overrides the step() of a known optimizer; no published equilibrium for its "
            f"update; {_MEASURED}"
        )
        return _none(name, "unknown", reason, basic_hyperparameters(group))
    family = family_of(key)
    try:
        hyper = read_hyperparameters(key, optimizer, group)
    except KeyError as err:
        reason = f"{name} has no {err} hyper-parameter; no published equilibrium; {_MEASURED}"
        return _none(name, "unknown", reason, basic_hyperparameters(group))
    except (TypeError, ValueError) as err:
        return _none(name, "invalid", f"unreadable hyper-parameters: {err}", family=family)
    invalid = invalid_reason(hyper)
    if invalid is not None:
        return _none(name, "invalid", invalid, hyper, family=family)
    if hyper["lr"] == 0:
        reason = "lr = 0: the weights do not move"
        return Prediction(0.0, name, "zero_lr", reason, "trivial: no update", hyper, family)
    prediction = _PREDICTORS[key](name, group, hyper)
    return replace(prediction, family=family)


def explain_equilibrium(optimizer: torch.optim.Optimizer) -> list[Prediction]:
    """One :class:`Prediction` per parameter group of ``optimizer`` (``LightningOptimizer`` too).

    Example::

        >>> import torch
        >>> a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}],
        ...                         lr=1e-3, weight_decay=0.05)
        >>> [(p.rule, p.available) for p in explain_equilibrium(opt)]
        [('adamw', True), ('no_weight_decay', False)]
    """
    optimizer = _check_optimizer(optimizer)
    return [predict_param_group(optimizer, group) for group in optimizer.param_groups]


def equilibrium_angular_update(optimizer: torch.optim.Optimizer) -> list[float | None]:
    """Predicted equilibrium RMS angle per step (radians) of each parameter group; ``None`` if none.

    Read from the groups' current hyper-parameters, so call it again after a scheduler step.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.randn(8, 4))
        >>> opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.1, betas=(0.9, 0.999))
        >>> [round(x, 6) for x in equilibrium_angular_update(opt)]
        [0.003244]
        >>> equilibrium_angular_update(torch.optim.Adam([w], weight_decay=0.1))
        [None]
    """
    return [prediction.angular_update for prediction in explain_equilibrium(optimizer)]


# --------------------------------------------------------------------------------------------
# Norm dynamics: time constants, relaxation after an LR change, equilibrium norms


def relaxation_steps(lr: float, weight_decay: float, momentum: float = 0.0) -> float:
    """Time constant, in steps, of the norm dynamics under SGD: ``(1 - alpha) / (4 eta lam)``.

    The deviation ``|w_t|^4 - |w*|^4`` of a scale-invariant weight trained with ``torch.optim.SGD``
    (L2 weight decay ``lam``, heavy-ball momentum ``alpha``) decays as
    ``exp(-t / relaxation_steps)`` from any starting norm, and so does the deviation of ``|w_t|``
    itself once it is close to ``|w*|``. Reason: per step ``|w|^2`` loses ``2 eta lam |w|^2`` to
    weight decay and gains ``eta^2 |g|^2``, with ``|g|^2`` proportional to ``1/|w|^2``; so
    ``|w|^4`` follows a linear recursion with rate ``4 eta lam`` (``/(1-alpha)`` with momentum,
    whose buffer applies each term ``1/(1-alpha)`` times over).

    Checked with :func:`~lightning_sdm.theory.simulate_scale_invariant`: fitted time constants
    of ``|w|^4`` were within 5%
    of this value (momentum 0, 0.5, 0.9, dampening and Nesterov, starting at 0.3x and 3x the
    equilibrium norm), as long as the time is long against the momentum memory ``1/(1-alpha)``.
    Note that it is twice as fast as the rate ``(1 - 2 lam eta / (1 - alpha))^t`` stated in SMD's
    Thm 2, which is the decay of ``|w|^2`` under weight decay alone: the right description only far
    above equilibrium, where the gradient term is negligible.

    For dampening ``tau`` pass ``lr * (1 - tau)``. For AdamW and Lion see
    :func:`decoupled_relaxation_steps`; :func:`relaxation_time` picks the right one.

    Args:
        lr: learning rate ``eta`` (> 0).
        weight_decay: L2 weight decay ``lam`` (> 0).
        momentum: heavy-ball momentum ``alpha`` in ``[0, 1)``.

    Returns:
        The e-folding time in steps.

    Raises:
        ValueError: if an argument is out of range.

    Example::

        >>> round(relaxation_steps(0.1, 1e-4, momentum=0.9))
        2500
    """
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay)
    _check_momentum(momentum)
    return (1.0 - momentum) / (4.0 * lr * weight_decay)


def steps_to_equilibrium(
    current_norm: float,
    equilibrium_norm: float,
    lr: float,
    weight_decay: float,
    momentum: float = 0.0,
    tolerance: float = 0.05,
) -> float:
    """Predicted SGD steps until the weight norm is within ``tolerance`` (relative) of equilibrium.

    Uses the geometric decay of ``|w|^4 - |w*|^4`` with the time constant of
    :func:`relaxation_steps` (derived; checked against the simulation, see the tests). Per
    invariant unit, so pass the norm of one unit (one output channel under BatchNorm).

    Args:
        current_norm: norm of the weight now (> 0).
        equilibrium_norm: its equilibrium norm (> 0), e.g. from :func:`equilibrium_weight_norm`.
        lr: learning rate (> 0).
        weight_decay: L2 weight decay (> 0).
        momentum: heavy-ball momentum in ``[0, 1)``.
        tolerance: relative band around ``equilibrium_norm``, in ``(0, 1)``.

    Returns:
        Steps (fractional), ``0.0`` if the norm is already inside the band.

    Raises:
        ValueError: if an argument is out of range.

    Example::

        >>> round(steps_to_equilibrium(2.0, 1.0, lr=0.1, weight_decay=1e-3))
        10607
        >>> steps_to_equilibrium(1.01, 1.0, lr=0.1, weight_decay=1e-3)
        0.0
    """
    _check_positive("current_norm", current_norm)
    _check_positive("equilibrium_norm", equilibrium_norm)
    check_fraction("tolerance", tolerance)
    tau = relaxation_steps(lr, weight_decay, momentum)
    ratio = (current_norm / equilibrium_norm) ** 4  # |w|^4 / |w*|^4
    if ratio > 1.0:
        band = (1.0 + tolerance) ** 4 - 1.0
        excess = ratio - 1.0
    else:
        band = 1.0 - (1.0 - tolerance) ** 4
        excess = 1.0 - ratio
    if excess <= band:
        return 0.0
    return tau * math.log(excess / band)


def decoupled_relaxation_steps(lr: float, weight_decay: float) -> float:
    """Time constant, in steps, of the norm under decoupled weight decay: ``1 / (2 eta lam)``.

    AdamW, Adam/RAdam with ``decoupled_weight_decay=True`` and Lion take steps whose size does not
    depend on the gradient scale (per element about ``eta``, orthogonal to the weight on average),
    and shrink the weight by ``1 - eta lam`` per step. So ``|w|^2`` follows the linear recursion
    ``|w|^2 <- (1 - 2 eta lam) |w|^2 + const`` and its deviation from equilibrium decays as
    ``exp(-t / (1 / (2 eta lam)))`` (Kosson et al. 2024 use the same time scale). In the
    simulation AdamW was up to ~30% slower than that when its second moment (memory
    ``1/(1-beta2)``) lags a changing gradient scale.

    Args:
        lr: learning rate ``eta`` (> 0).
        weight_decay: decoupled weight decay ``lam`` (> 0).

    Returns:
        The e-folding time of ``|w|^2`` in steps.

    Raises:
        ValueError: if an argument is out of range.

    Example::

        >>> decoupled_relaxation_steps(1e-3, 0.1)
        5000.0
    """
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay)
    return 1.0 / (2.0 * lr * weight_decay)


def equilibrium_norm_exponent(prediction: Prediction) -> float | None:
    """How the equilibrium norm scales with the LR: ``|w*|`` is proportional to ``lr**exponent``.

    ``1/4`` for SGD (SMD Thm 2: ``|w*|^4`` is proportional to ``eta``), ``1/2`` for decoupled
    weight decay (Kosson et al. 2024: ``|w*|^2 = eta C / (2 lam)`` for AdamW; Lion's sign steps
    have the same form). It is also ``1/p`` for the power ``|w|^p`` whose deviation from
    equilibrium relaxes exponentially (:func:`relaxation_time`). ``None`` without a prediction.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> [equilibrium_norm_exponent(p) for p in explain_equilibrium(
        ...     torch.optim.SGD([w], lr=0.1, weight_decay=1e-4))]
        [0.25]
    """
    _check_prediction(prediction)
    if prediction.angular_update is None or prediction.family is None:
        return None
    if prediction.family == "adafactor":
        # Steps relative to the weight (both rules, by family: a restored prediction keeps only
        # that): the angle does not depend on the norm, so no norm equilibrium sets it and
        # rescaling the norm moves nothing.
        return None
    return 0.25 if prediction.family == "sgd" else 0.5


def relaxation_time(prediction: Prediction) -> float | None:
    """E-folding time, in optimizer steps, of the approach to equilibrium of one param group.

    SGD: :func:`relaxation_steps` (with ``lr (1 - dampening)``); decoupled weight decay (AdamW):
    :func:`decoupled_relaxation_steps`; Lion: that plus its momentum's memory ``1 / (1 - beta2)``
    (the sign correlation that sets the norm builds over that memory, and while the norm moves the
    momentum weighs the ``1/|w|``-sized gradients of the past unevenly; in the simulation, from
    half the equilibrium norm, ``|w|^2`` reached ``1/e`` of its deviation after 0.76-0.96 of this
    time (from twice, 0.22-0.92), with an overshoot when ``lr wd`` nears ``1 - beta2``; see
    ``_lion``). ``None`` where there is no prediction, no weight decay or a zero learning rate
    (nothing relaxes).

    Adafactor (both rules, with or without weight decay): the second moment's memory
    ``M = step^0.8`` (``1 - beta2_t = step^beta2_decay``), read at the prediction's step. Its
    steps are relative to the weight, so the angle is ``rho_t`` times the update's RMS from the
    first step, whatever the norm: no norm relaxes towards it, and an LR change moves ``rho_t``
    at once. What lags is the update's RMS ``g / sqrt(v)``: after the gradient scale changes
    (the norm moves, an action rescales the weight) ``v`` forgets its old level as
    ``exp(-t / M)``. In the simulation (weights doubled at step 1000, ``lr = 0.01``) the excess
    ``v / v* - 1`` fell to ``1/e`` after 243 steps (``wd = 0.01``) and 275 (``wd = 0``) against
    ``M = 251``; AdamW's ``1 / (2 lr wd)`` would say 5,000. Where weight decay wins
    (``adafactor_shrinking``) the norm shrinks towards ``eps2`` for ``2 ln(RMS / eps2) / |a|``
    steps, but the angle the prediction names holds along the way: that is how long the
    prediction lasts (its reason), not how long it takes to reach.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-4)
        >>> round(relaxation_time(explain_equilibrium(opt)[0]))
        2500
    """
    exponent = equilibrium_norm_exponent(prediction)
    hyper = prediction.hyperparameters
    lr, weight_decay = hyper.get("lr", 0.0), hyper.get("weight_decay", 0.0)
    if prediction.family == "adafactor" and prediction.angular_update and lr > 0:
        return _adafactor_memory(hyper)
    if exponent is None or not lr > 0 or not weight_decay > 0:
        return None
    if prediction.family == "sgd":
        effective_lr = lr * (1.0 - hyper.get("dampening", 0.0))
        momentum = hyper.get("momentum", 0.0)
        if not effective_lr > 0 or not 0.0 <= momentum < 1.0:
            return None
        return relaxation_steps(effective_lr, weight_decay, momentum)
    if prediction.family == "lion":
        return decoupled_relaxation_steps(lr, weight_decay) + 1.0 / (1.0 - hyper["beta2"])
    return decoupled_relaxation_steps(lr, weight_decay)


def lr_change_relaxation_steps(
    lr_ratio: float, time_constant: float, tolerance: float = 0.05
) -> float:
    """Steps until the angular update is back near its prediction after an LR change.

    The LR is multiplied by ``lr_ratio`` (a decay by ``k``: ``lr_ratio = 1/k``); "near" is
    within ``tolerance`` (relative).

    Derivation (the norm dynamics of :func:`relaxation_time`): write ``q = |w|^p`` with ``p = 4``
    for SGD and ``p = 2`` for decoupled weight decay. ``q - q*`` decays as ``exp(-t / tau)`` with
    ``tau = time_constant`` (under the new LR), the equilibrium ``q*`` is proportional to the LR,
    and the angular update is proportional to ``lr / q**(1/2)`` (SGD: the step ``eta |g|``, with
    ``|g|`` proportional to ``1/|w|``, over ``|w|``; AdamW: ``eta sqrt(C) / |w|``). Right after
    the change the weights still sit at the old equilibrium, ``q = q*_new / lr_ratio``, so with
    ``x = q / q*_new - 1``::

        measured / predicted = (1 + x) ** -0.5,    x(t) = (1 / lr_ratio - 1) exp(-t / tau)

    (after a decay by ``k`` the ratio reads ``1/sqrt(k)`` at once and climbs back). It is within
    ``tolerance`` once ``|x| <= band``, ``band = (1 - tolerance)**-2 - 1`` for a decay and
    ``1 - (1 + tolerance)**-2`` for an increase, that is after::

        tau * ln(|1 / lr_ratio - 1| / band)   steps (0 if already inside).

    SMD's Cor. 3.1 gives ``ceil(ln(k) (1 - alpha) / (2 lam eta))``, i.e. ``2 tau ln k`` with SGD's
    ``tau``: the same as this function at ``tolerance ~ (k - 1) / (2 k^2)`` (4.5% for ``k = 10``).
    Both are counted with the LR after the change (with the old LR the estimate is ``k`` times too
    short). ``tests/test_theory.py`` checks this against :mod:`lightning_sdm.theory` for SGD
    with momentum and AdamW, decays and increases.

    Args:
        lr_ratio: new LR / old LR (> 0).
        time_constant: ``tau`` under the new hyper-parameters (:func:`relaxation_time`), > 0.
        tolerance: relative band around the new prediction, in ``(0, 1)``.

    Returns:
        Steps (fractional); 0 when the change is too small to leave the band.

    Raises:
        ValueError: if an argument is out of range.

    Example::

        >>> tau = relaxation_steps(0.01, 1e-4, momentum=0.9)  # ImageNet ResNet-50 after /10
        >>> round(lr_change_relaxation_steps(0.1, tau))
        110564
        >>> lr_change_relaxation_steps(1.02, tau)
        0.0
    """
    _check_positive("lr_ratio", lr_ratio)
    _check_positive("time_constant", time_constant)
    if not (isinstance(tolerance, (int, float)) and 0.0 < tolerance < 1.0):
        raise ValueError(f"`tolerance` must be in (0, 1), got {tolerance!r}.")
    start = 1.0 / lr_ratio - 1.0
    band = (1.0 - tolerance) ** -2 - 1.0 if start > 0 else 1.0 - (1.0 + tolerance) ** -2
    if abs(start) <= band:
        return 0.0
    return time_constant * math.log(abs(start) / band)


def equilibrium_weight_norm(
    lr: float, weight_decay: float, grad_sq_unit: float, momentum: float = 0.0
) -> float:
    """Equilibrium norm of a scale-invariant weight under SGD [SMD Thm 2].

    ``|w*|^4 = L eta / (lam (1 - alpha) (2 - lam eta / (1 + alpha)))`` with ``L = E[|g~|^2]``, the
    mean squared norm of the gradient with respect to the unit-norm weight, i.e.
    ``|grad|^2 * |w|^2`` (scale-invariant). For dampening ``tau`` pass ``lr * (1 - tau)``; Nesterov
    momentum gives the same norm to leading order. Matched the simulated norm to better than 1%.

    Args:
        lr: learning rate (> 0).
        weight_decay: L2 weight decay (> 0).
        grad_sq_unit: ``L``, mean of ``|grad|^2 * |w|^2`` (>= 0).
        momentum: heavy-ball momentum in ``[0, 1)``.

    Returns:
        ``|w*|``, per invariant unit.

    Raises:
        ValueError: if an argument is out of range.

    Example::

        >>> round(equilibrium_weight_norm(0.1, 1e-3, grad_sq_unit=1.0, momentum=0.9), 4)
        4.7287
    """
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay)
    check_number("grad_sq_unit", grad_sq_unit, low=0.0, low_open=False)
    _check_momentum(momentum)
    shrink = 2.0 - weight_decay * lr / (1.0 + momentum)
    if shrink <= 0:
        raise ValueError(
            f"lr * weight_decay = {lr * weight_decay} is too large for an equilibrium "
            "(SMD Thm 2 needs lam * eta < 2 (1 + alpha))."
        )
    fourth = grad_sq_unit * lr / (weight_decay * (1.0 - momentum) * shrink)
    return fourth**0.25


def adamw_equilibrium_weight_norm(lr: float, weight_decay: float, fan_in: float) -> float:
    """Equilibrium norm of one neuron's weights under AdamW: ``sqrt(eta C / (2 lam))``.

    Source: Kosson et al. 2024 (arXiv:2305.17212).

    ``C`` is the number of elements of the invariant unit (the fan-in of a neuron). Holds when
    the Adam update has RMS ~1 per element (gradient noise dominates) and does not depend on
    ``beta1`` or the gradient scale. In the simulation the norm settled 0.5% below this value for
    ``beta2 = 0.999`` and 1% below for ``beta2 = 0.99``: the normalized update has an RMS slightly
    under 1, since each squared gradient is part of its own second moment. (The angular update
    is unaffected: it depends only on the ratio of update size to norm.)

    Args:
        lr: learning rate (> 0).
        weight_decay: decoupled weight decay (> 0).
        fan_in: ``C``, elements per unit (> 0).

    Returns:
        ``|w*|`` per unit.

    Raises:
        ValueError: if an argument is out of range.

    Example::

        >>> adamw_equilibrium_weight_norm(1e-3, 0.1, fan_in=800)
        2.0
    """
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay)
    _check_positive("fan_in", fan_in)
    return math.sqrt(lr * fan_in / (2.0 * weight_decay))


# --------------------------------------------------------------------------------------------
# Implementation: predictions

_MEASURED = "the angular update is still measured"


def _none(
    name: str,
    rule: str,
    reason: str,
    hyper: Mapping[str, float] | None = None,
    source: str = "",
    family: Family | None = None,
) -> Prediction:
    return Prediction(None, name, rule, reason, source, dict(hyper or {}), family)


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _no_weight_decay(name: str, hyper: Mapping[str, float]) -> Prediction:
    return _none(
        name,
        "no_weight_decay",
        "weight_decay = 0: the norm of a scale-invariant weight grows without bound and the "
        "angular update keeps shrinking; no equilibrium",
        hyper,
    )


# --------------------------------------------------------------------------------------------
# Implementation: the formulas


def _predict_sgd(name: str, group: Mapping[str, Any], hyper: dict[str, float]) -> Prediction:
    lr, wd = hyper["lr"], hyper["weight_decay"]
    alpha, tau, nesterov = hyper["momentum"], hyper["dampening"], hyper["nesterov"] > 0
    if wd == 0:
        return _no_weight_decay(name, hyper)
    if alpha == 0:
        value = math.sqrt(2 * lr * wd)
        reason = f"sqrt(2*lr*wd) = sqrt(2*{_fmt(lr)}*{_fmt(wd)}) = {_fmt(value)} rad per step"
        return Prediction(value, name, "sgd", reason, f"{_SMD}, Thm 1/3 with alpha = 0", hyper)
    if nesterov:
        # Derived: torch's Nesterov update is g + mu * buf. Summing the weights of one gradient
        # over all later steps (c_0 = 1 + mu, c_k = mu^(k+1)) in the random-walk balance gives
        # Delta^2 = 2 lr wd * sum(c_k^2) / sum(c_k) = 2 lr wd (1 + 2mu - 2mu^3) / (1 + mu).
        factor = (1 + 2 * alpha - 2 * alpha**3) / (1 + alpha)
        value = math.sqrt(2 * lr * wd * factor)
        reason = (
            f"sqrt(2*lr*wd*(1+2mu-2mu^3)/(1+mu)) = sqrt(2*{_fmt(lr)}*{_fmt(wd)}*"
            f"{_fmt(factor)}) = {_fmt(value)} rad per step"
        )
        source = (
            "derived (in no paper): heavy-ball balance of SMD Thm 3 applied to torch's Nesterov "
            "update; matched by simulate_scale_invariant to 0.1%"
        )
        return Prediction(value, name, "sgd_nesterov", reason, source, hyper)
    if tau != 0:
        # torch scales the whole buffer input (gradient + wd * w) by 1 - dampening after the first
        # step: exactly heavy ball with lr * (1 - dampening).
        eff = lr * (1 - tau)
        value = math.sqrt(2 * eff * wd / (1 + alpha))
        reason = (
            f"sqrt(2*lr*(1-dampening)*wd/(1+momentum)) = sqrt(2*{_fmt(lr)}*(1-{_fmt(tau)})*"
            f"{_fmt(wd)}/(1+{_fmt(alpha)})) = {_fmt(value)} rad per step"
        )
        source = (
            f"derived: {_SMD}, Thm 3 / Eq. 14 with lr*(1 - dampening); matched by "
            "simulate_scale_invariant to 0.1%"
        )
        return Prediction(value, name, "sgd_dampening", reason, source, hyper)
    value = math.sqrt(2 * lr * wd / (1 + alpha))
    reason = (
        f"sqrt(2*lr*wd/(1+momentum)) = sqrt(2*{_fmt(lr)}*{_fmt(wd)}/(1+{_fmt(alpha)})) = "
        f"{_fmt(value)} rad per step"
    )
    source = f"{_SMD}, Thm 3 / Eq. 14; {_REQ}, REQ code sgdm_etar_func"
    return Prediction(value, name, "sgd_heavy_ball", reason, source, hyper)


def _adamw_value(hyper: Mapping[str, float]) -> tuple[float, str]:
    lr, wd, beta1 = hyper["lr"], hyper["weight_decay"], hyper["beta1"]
    value = math.sqrt(2 * lr * wd * (1 - beta1) / (1 + beta1))
    formula = (
        f"sqrt(2*lr*wd*(1-beta1)/(1+beta1)) = sqrt(2*{_fmt(lr)}*{_fmt(wd)}*(1-{_fmt(beta1)})/"
        f"(1+{_fmt(beta1)})) = {_fmt(value)} rad per step"
    )
    return value, formula


_ADAMW_SCOPE = (
    "; per neuron, when the Adam update has RMS ~1 per element (noise-dominated gradients); "
    "no beta2 dependence; where g/sqrt(v) is not orthogonal to the weight (a gradient whose size "
    "differs across the unit's elements, as in a small-fan-in first layer) the norm settles "
    "larger and the angle reads lower (0.91 on a fan-in-9 first convolution, docs/muon.md); "
    "the monitor's radial balance (sdm/angular_update_balance) measures that share per unit"
)


def _predict_adam(name: str, group: Mapping[str, Any], hyper: dict[str, float]) -> Prediction:
    if hyper["weight_decay"] == 0:
        return _no_weight_decay(name, hyper)
    if not hyper["decoupled_weight_decay"]:
        return _none(
            name,
            "adam_coupled_l2",
            "Adam with L2 (coupled) weight decay: the equilibrium depends on the gradient norm, "
            "no hyper-parameter-only value (use AdamW or decoupled_weight_decay=True)",
            hyper,
            f"{_REQ}, REQ rotational_wrapper.py (no etar_func for Adam)",
        )
    value, formula = _adamw_value(hyper)
    source = f"{_REQ}, REQ code adamw_etar_func"
    if group.get("amsgrad", False):
        reason = formula + _ADAMW_SCOPE + "; approximate for amsgrad (max(v) taken as constant)"
        return Prediction(value, name, "adamw_amsgrad", reason, source, hyper)
    return Prediction(value, name, "adamw", formula + _ADAMW_SCOPE, source, hyper)


def _predict_radam(name: str, group: Mapping[str, Any], hyper: dict[str, float]) -> Prediction:
    if hyper["weight_decay"] == 0:
        return _no_weight_decay(name, hyper)
    if not hyper["decoupled_weight_decay"]:
        return _none(
            name,
            "adam_coupled_l2",
            "RAdam with L2 (coupled) weight decay: the equilibrium depends on the gradient norm, "
            "no hyper-parameter-only value",
            hyper,
        )
    value, formula = _adamw_value(hyper)
    reason = (
        formula + _ADAMW_SCOPE + "; asymptotic: once RAdam's variance rectifier is ~1, after "
        "several 1/(1-beta2) steps (lower before)"
    )
    source = (
        f"derived: {_REQ}, REQ adamw_etar_func, since RAdam with decoupled weight decay becomes "
        "AdamW once its rectifier is 1; matched by simulate_scale_invariant"
    )
    return Prediction(value, name, "radam_decoupled", reason, source, hyper)


def _predict_nadam(name: str, group: Mapping[str, Any], hyper: dict[str, float]) -> Prediction:
    if hyper["weight_decay"] == 0:
        return _no_weight_decay(name, hyper)
    return _none(
        name,
        "unknown",
        "no published equilibrium for NAdam (its momentum coefficient follows a schedule over "
        f"tens of thousands of steps); {_MEASURED}",
        hyper,
    )


def _predict_lion(name: str, group: Mapping[str, Any], hyper: dict[str, float]) -> Prediction:
    lr, wd, beta1, beta2 = hyper["lr"], hyper["weight_decay"], hyper["beta1"], hyper["beta2"]
    if wd == 0:
        return _no_weight_decay(name, hyper)
    if group.get("caution", False):
        return _none(
            name, "unknown", f"no published equilibrium for cautious Lion; {_MEASURED}", hyper
        )
    if not lr * wd < 1:
        return _none(name, "unknown", f"lr*wd = {_fmt(lr * wd)} >= 1 leaves no equilibrium", hyper)
    value, _, s = lion_equilibrium(lr, wd, beta1, beta2)
    k = lion_filter_variance(beta1, beta2)
    req = math.sqrt(math.pi / 2) * math.sqrt(2 * lr * wd) * math.sqrt(k)
    reason = (
        f"sqrt((1-q^2)/S * (1-(1-q^2)(S-1)^2/(4 q^2 S))) with q = 1-lr*wd = {_fmt(1 - lr * wd)} "
        f"and S = {_fmt(s)}, the sign autocorrelation summed over lags (arcsine law on the "
        f"momentum's Gaussian filter of the noise) = {_fmt(value)} rad per step (REQ's "
        f"linearised sqrt(pi/2)*sqrt(2*lr*wd*K) = {_fmt(req)}); within 2% of the simulation "
        f"for betas 0-0.99 and lr*wd up to {_fmt(_LION_LR_WD_CHECKED)} (20 times 1-beta2 "
        f"included); on real networks a guide only: {_LION_REAL_NETWORKS}"
    )
    if lr * wd > _LION_LR_WD_CHECKED:
        # Measured: 1.018 of the prediction at lr*wd = 0.2, 1.098 at 0.5 (betas (0.9, 0.99)).
        reason += (
            f"; this group's lr*wd = {_fmt(lr * wd)} is beyond {_fmt(_LION_LR_WD_CHECKED)}, "
            "where the simulated angle reads above the prediction (by 2% at 0.2, 10% at 0.5)"
        )
    return Prediction(value, name, "lion", reason, _LION_SOURCE, hyper)


# The largest lr*wd at which Lion's prediction was checked within 2% of the simulation.
_LION_LR_WD_CHECKED = 0.2


_LION_SOURCE = (
    f"derived: {_REQ}'s norm balance (REQ code lion_etar_func) with the sign's autocorrelation "
    "instead of a linearised sign (lightning_sdm.theory._lion)"
)
_LION_REAL_NETWORKS = (
    "per layer on BatchNorm ResNets (generated gratings and digits, 20% label noise, "
    "studies/lion/measure.py) 1.02-1.21x at betas (0.9, 0.99), 0.94-1.04x at (0.5, 0.9) but "
    "0.70-0.85x on the last conv and a shortcut (their gradient's sign persists), 1.02-1.40x "
    "at (0.9, 0.999) with lr*wd = 1-beta2, whose norms had not settled after 10 times "
    "1/(2*lr*wd), and 0.57-0.67x with clean labels (loss -> 0): real gradients' signs are "
    "less correlated than white noise's (the curvature pushes back) or more (a persistent "
    "signal), which no hyper-parameter formula holds"
)


_MUON_SOURCE = (
    "derived: SMD/REQ's random-walk balance applied to torch's Muon update (Jordan et al. 2024); "
    "memory factor R by a Monte Carlo of its Newton-Schulz iteration (lightning_sdm.theory._muon)"
    "; matched by simulate_muon within 3%"
)


def _predict_muon(name: str, group: Mapping[str, Any], hyper: dict[str, float]) -> Prediction:
    lr, wd, mu = hyper["lr"], hyper["weight_decay"], hyper["momentum"]
    if wd == 0:
        return _no_weight_decay(name, hyper)
    nesterov = hyper["nesterov"] > 0
    r = linear_memory_factor(mu, nesterov)
    value = math.sqrt(2 * lr * wd * r)
    kind = "Nesterov" if nesterov else "heavy ball"
    reason = (
        f"sqrt(2*lr*wd*R) = sqrt(2*{_fmt(lr)}*{_fmt(wd)}*{_fmt(r)}) = {_fmt(value)} rad per "
        f"step, R = {_fmt(r)} for {kind} momentum {_fmt(mu)} and a wide matrix; per matrix R "
        "grows with its aspect ratio (up to ~1.37x for a square one), adjust_lr_fn cancels"
    )
    return Prediction(value, name, "muon", reason, _MUON_SOURCE, hyper)


def for_shape(
    prediction: Prediction,
    shape: Sequence[int],
    *,
    relative_norm: float | None = None,
    weight_rms: float | None = None,
) -> Prediction:
    """The prediction for one matrix of ``shape`` updated under ``prediction``'s param group.

    Muon's equilibrium depends on the shape (its update orthogonalises the whole matrix, see
    :mod:`lightning_sdm.theory._muon`); a unit that is part of a matrix (its rows under BatchNorm,
    a head under QK-norm) takes the matrix's. Adafactor's depends on the unit's norm against its
    matrix's: its step ``rho_t * RMS(W)`` is one for the whole matrix, so a row ``w_i`` turns by
    ``rho_t * RMS(u) * f`` with ``f = sqrt(cols) * RMS(W) / |w_i|`` (``1 / relative_norm``): rows
    with a norm above the matrix's row RMS turn less. ``log |w_i|^2`` then grows by
    ``a_i = rho_t^2 f^2 - 2 lr wd`` per step, and the second moment (per row through Adafactor's
    row factor) lags by ``1 / sqrt(1 + a_i M)`` as for the whole matrix, so the row's angle is
    ``rho_t f / sqrt(1 + max(a_i, 0) M)`` (in the simulation with row norms spread 4x: 0.997-1.009
    of it per row, against 0.61-1.95 for the matrix's value). Every other prediction is
    returned as it is.

    Args:
        prediction: from :func:`predict_param_group`.
        shape: the shape of the parameter the optimizer updates (Muon's are 2-D).
        relative_norm: for a unit that is part of a matrix, its norm over the root mean square
            of the norms of the matrix's units (``|w_i| / (sqrt(cols) RMS(W))``, 1 for a whole
            matrix or equal rows); only Adafactor reads it.
        weight_rms: the unit's RMS (its norm over the square root of its size), where known:
            a shrinking Adafactor weight's reason then says in how many steps it reaches the
            ``eps2`` floor (``2 ln(RMS / eps2) / |a|``) instead of the formula alone.

    Returns:
        The prediction, with Muon's memory factor for this aspect ratio, or Adafactor's value
        for this unit's norm.

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.randn(64, 64))
        >>> opt = torch.optim.Muon([w], lr=0.02, weight_decay=0.1, momentum=0.95)
        >>> wide = predict_param_group(opt, opt.param_groups[0])
        >>> square = for_shape(wide, (64, 64))
        >>> round(wide.angular_update, 5), round(square.angular_update, 5)
        (0.01103, 0.01279)
    """
    _check_prediction(prediction)
    if weight_rms is not None:
        check_number("weight_rms", weight_rms, low=0.0)
        if prediction.rule == "adafactor_shrinking":
            hyper = prediction.hyperparameters
            reason = prediction.reason.replace(
                _floor_text(hyper, None), _floor_text(hyper, weight_rms)
            )
            prediction = replace(prediction, reason=reason)
    if relative_norm is not None:
        check_number("relative_norm", relative_norm, low=0.0)
        if prediction.family == "adafactor" and prediction.angular_update:
            return _adafactor_for_unit(prediction, relative_norm)
    hyper = prediction.hyperparameters
    # By family, not rule: a prediction restored from a checkpoint keeps its family and
    # hyper-parameters only.
    if prediction.family != "muon" or not prediction.angular_update or len(shape) < 2:
        return prediction
    rows, cols = int(shape[0]), int(math.prod(shape[1:]))
    if rows <= 0 or cols <= 0:
        return prediction
    aspect = min(rows, cols) / max(rows, cols)
    mu, nesterov = hyper["momentum"], hyper["nesterov"] > 0
    if not hyper.get("default_newton_schulz", 1.0):
        reason = prediction.reason + (
            "; the shape correction is tabulated for torch's default Newton-Schulz settings "
            "only: this wide-matrix value may read up to ~15% low for a square matrix"
        )
        return replace(prediction, reason=reason)
    r, note = muon_memory_ratio(aspect, mu, nesterov)
    lr, wd = hyper["lr"], hyper["weight_decay"]
    value = math.sqrt(2 * lr * wd * r)
    reason = (
        f"sqrt(2*lr*wd*R) = sqrt(2*{_fmt(lr)}*{_fmt(wd)}*{_fmt(r)}) = {_fmt(value)} rad per "
        f"step, R for a {rows}x{cols} matrix ({'Nesterov' if nesterov else 'heavy ball'} "
        f"momentum {_fmt(mu)}){'; ' + note if note else ''}; adjust_lr_fn cancels"
    )
    return replace(prediction, angular_update=value, reason=reason)


def _adafactor_floor_steps(hyper: Mapping[str, float], weight_rms: float) -> float:
    """Steps until a shrinking Adafactor weight of RMS ``weight_rms`` reaches the ``eps2`` floor.

    ``log |W|^2`` changes by ``a = rho_t^2 - 2 lr wd`` per step, so ``log RMS`` by ``a / 2``:
    ``2 ln(RMS / eps2) / |a|`` (0 at or below the floor; ``inf`` where ``a >= 0``). In the
    simulation (``lr = 0.01``, ``wd = 0.5``, RMS 0.1) the floor was reached at step 929 against
    930 (``tests/theory/test_muon.py``).
    """
    lr, wd, step = hyper["lr"], hyper["weight_decay"], hyper.get("step", 1.0)
    rho = min(lr, 1.0 / math.sqrt(max(step, 1.0)))
    growth = rho**2 - 2 * lr * wd
    if growth >= 0:
        return math.inf
    return 2 * max(math.log(weight_rms / hyper["eps2"]), 0.0) / -growth


def _floor_text(hyper: Mapping[str, float], weight_rms: float | None) -> str:
    """How far the ``eps2`` floor is: the formula, evaluated where the weight's RMS is known."""
    lr, wd, step = hyper["lr"], hyper["weight_decay"], hyper.get("step", 1.0)
    rho = min(lr, 1.0 / math.sqrt(max(step, 1.0)))
    rate = _fmt(2 * lr * wd - rho**2)
    if weight_rms is None:
        return f"2*ln(RMS/eps2)/{rate} steps"
    steps = _adafactor_floor_steps(hyper, weight_rms)
    if steps == 0:
        return f"this unit's RMS {_fmt(weight_rms)} is there already"
    return (
        f"2*ln(RMS/eps2)/{rate} = 2*ln({_fmt(weight_rms)}/{_fmt(hyper['eps2'])})/{rate} = "
        f"{steps:,.0f} steps at this unit's RMS"
    )


def _adafactor_memory(hyper: Mapping[str, float]) -> float:
    """Adafactor's second-moment memory ``M = step^0.8`` at the prediction's step (>= 1)."""
    return max(hyper.get("step", 1.0), 1.0) ** hyper.get("memory_exponent", 0.8)


def _adafactor_for_unit(prediction: Prediction, relative_norm: float) -> Prediction:
    # The matrix-wide step turns a unit of relative norm x by rho_t/x times its update's RMS;
    # its own log-norm growth a_i = (rho_t/x)^2 - 2 lr wd sets the second moment's lag.
    hyper = prediction.hyperparameters
    lr, wd, step = hyper["lr"], hyper["weight_decay"], hyper["step"]
    rho = min(lr, 1.0 / math.sqrt(step))
    memory = step ** hyper["memory_exponent"]
    turn = rho / relative_norm
    growth = turn**2 - 2 * lr * wd
    value = turn / math.sqrt(1.0 + max(growth, 0.0) * memory)
    reason = prediction.reason + (
        f"; this unit's norm is {_fmt(relative_norm)} times its matrix's row RMS: the one "
        f"matrix-wide step turns it by rho_t/{_fmt(relative_norm)} = {_fmt(turn)}, its "
        f"second moment lags by 1/sqrt(1+{_fmt(max(growth, 0.0))}*M): {_fmt(value)} rad per step"
    )
    return replace(prediction, angular_update=value, reason=reason)


def _predict_adafactor(name: str, group: Mapping[str, Any], hyper: dict[str, float]) -> Prediction:
    # torch's Adafactor steps by alpha = max(eps2, RMS(W)) * rho_t along the normalised update
    # g / sqrt(v) clipped to RMS d, rho_t = min(lr, 1/sqrt(step)), and decays by 1 - lr*wd. Above
    # the eps2 floor the step is relative to the weight: it turns by rho_t * RMS(update) at once,
    # and log|W|^2 grows by a = rho_t^2 - 2 lr wd per step. The gradient of an invariant weight
    # scales as 1/|W|, so the second moment v, an average over the last M = step^-beta2_decay
    # steps, reads the larger gradients of a smaller past weight: g^2 / v ~ 1 / (1 + a M) (the
    # exponential average of exp(a k), smoothed). If a < 0 the norm shrinks to the floor, where
    # the step size is fixed and the AdamW balance without momentum gives sqrt(2 lr wd).
    lr, wd, d, step = hyper["lr"], hyper["weight_decay"], hyper["d"], hyper["step"]
    rho = min(lr, 1.0 / math.sqrt(step))
    memory = step ** hyper["memory_exponent"]
    growth = rho**2 - 2 * lr * wd
    if growth >= 0:
        size = min(d, 1.0, 1.0 / math.sqrt(1.0 + growth * memory))
        value = rho * size
        reason = (
            f"rho_t/sqrt(1+a*M) = {_fmt(rho)}/sqrt(1+{_fmt(growth)}*{_fmt(memory)}) = "
            f"{_fmt(value)} rad per step, rho_t = min(lr, 1/sqrt(step)){_rho_course(lr, step)}, "
            "a = rho_t^2 - 2*lr*wd "
            "the growth of log|W|^2 per step, M = step^0.8 the second moment's memory: steps "
            "relative to the weight's RMS turn it by rho_t times the update's RMS, which the "
            "second moment of a growing weight's shrinking gradients keeps under 1; for "
            f"noise-dominated gradients: {_ADAFACTOR_REAL_NETWORKS}"
        )
        return Prediction(value, name, "adafactor_relative", reason, _ADAFACTOR_SOURCE, hyper)
    # Weight decay wins: the weight shrinks (its gradients grow, the second moment lags, the
    # update is clipped at RMS d) and turns by rho_t * min(1, d) per step until its RMS reaches
    # eps2, 2 ln(RMS / eps2) / |a| steps away (log RMS falls by |a|/2 per step; tens of thousands
    # from a usual init); there the step
    # size is fixed and the AdamW balance without momentum gives sqrt(2 lr wd).
    value = rho * min(1.0, d)
    floor = math.sqrt(2 * lr * wd)
    reason = (
        f"rho_t*min(1, d) = {_fmt(value)} rad per step, rho_t = min(lr, 1/sqrt(step))"
        f"{_rho_course(lr, step)}: weight "
        f"decay (2*lr*wd = {_fmt(2 * lr * wd)} > rho_t^2 = {_fmt(rho**2)}) shrinks the weight, "
        "whose relative steps turn it by rho_t; once its RMS is down to eps2 = "
        f"{_fmt(hyper['eps2'])} ({_floor_text(hyper, None)}) the steps stop shrinking "
        f"and the angle rises to sqrt(2*lr*wd) = {_fmt(floor)}, which this value does not "
        f"follow; {_ADAFACTOR_REAL_NETWORKS}"
    )
    return Prediction(value, name, "adafactor_shrinking", reason, _ADAFACTOR_SOURCE, hyper)


def _rho_course(lr: float, step: float) -> str:
    """Where ``rho_t = min(lr, 1/sqrt(step))`` goes from here: the prediction moves with it.

    Example::

        >>> _rho_course(0.1, 1.0), _rho_course(0.1, 400.0)
        (' (lr until step 100, then falling as 1/sqrt(step): half of it by step 400)', ' (falling as 1/sqrt(step) since step 100: half of it by step 1,600)')
    """  # noqa: E501
    if not lr > 0:
        return ""
    crossover = 1.0 / (lr * lr)
    if step < crossover:
        return (
            f" (lr until step {crossover:,.0f}, then falling as 1/sqrt(step): half of it by "
            f"step {4 * crossover:,.0f})"
        )
    return (
        f" (falling as 1/sqrt(step) since step {crossover:,.0f}: half of it by step "
        f"{4 * step:,.0f})"
    )


# Measured by studies/muon/adafactor.py (docs/muon.md, "Adafactor"): the update's RMS after
# clipping, the one factor of measured / predicted that was not 1 within 1.1%.
_ADAFACTOR_REAL_NETWORKS = (
    "on real networks (studies/muon/measure.py and adafactor.py) measured / predicted was "
    "0.90-0.96 with dense or noisy inputs (a teacher-student regression under BatchNorm or "
    "LayerNorm, a BatchNorm convnet on noisy generated images) and 0.44-0.68 on digits, whose "
    "loss reaches 0, with or "
    "without weight decay; the whole gap is the update's RMS after clipping at d, set by how "
    "intermittent the gradients are (on digits the RMS per step spans 0.03-62 and is clipped on "
    "9-25% of steps), which neither the hyper-parameters nor the optimizer's state hold: an "
    "upper bound there"
)


_ADAFACTOR_SOURCE = (
    "derived from torch.optim.Adafactor's update (Shazeer & Stern 2018 with torch's relative "
    "step and eps2 floor); matched by simulate_scale_invariant"
)


_PREDICTORS: dict[str, Callable[[str, Mapping[str, Any], dict[str, float]], Prediction]] = {
    "SGD": _predict_sgd,
    "Adam": _predict_adam,
    "AdamW": _predict_adam,
    "RAdam": _predict_radam,
    "NAdam": _predict_nadam,
    "Lion": _predict_lion,
    "Muon": _predict_muon,
    "Adafactor": _predict_adafactor,
}


# --------------------------------------------------------------------------------------------
# Implementation: argument checks


def _check_positive(name: str, value: float) -> None:
    check_number(name, value, low=0.0)


def _check_momentum(momentum: float) -> None:
    check_number("momentum", momentum, low=0.0, high=1.0, low_open=False)


def _check_optimizer(optimizer: Any) -> Any:
    """The unwrapped optimizer; ``ValueError`` for anything without param groups."""
    if not has_param_groups(optimizer):
        raise ValueError(
            "`optimizer` must be a torch.optim.Optimizer (or a LightningOptimizer), got "
            f"{type(optimizer).__name__}."
        )
    return unwrap(optimizer)


def _check_prediction(prediction: Any) -> None:
    if not isinstance(prediction, Prediction):
        raise ValueError(
            f"`prediction` must be a Prediction (from predict_param_group or "
            f"explain_equilibrium), got {type(prediction).__name__}."
        )
