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
    Lion                                sqrt(pi/2) sqrt(2 eta lam) sqrt(K)     Kosson et al., REQ
        K = (1 - b1)^2 + b1^2 (1 - b2) / (1 + b2)
    Adam with coupled L2 weight decay   none: depends on the gradient norm     REQ
    anything else                       none published: the angle is still measured

Sources: SMD = R. Wan, Z. Zhu, X. Zhang, J. Sun, "Spherical Motion Dynamics: Learning Dynamics of
Neural Network with Normalization, Weight Decay, and SGD", arXiv:2006.08419. Kosson et al. = A.
Kosson, B. Messmer, M. Jaggi, "Rotational Equilibrium: How Weight Decay Balances Learning Across
Neural Networks", ICML 2024, arXiv:2305.17212, with its official code github.com/epfml/REQ (REQ).
"Derived" formulas come from the same random-walk argument applied to PyTorch's exact update and
are published nowhere; they were checked against :func:`simulate_scale_invariant`.

Compare a prediction with the ROOT-MEAN-SQUARE of the measured per-step angle over a window, not
with its mean (the mean of a fluctuating angle is lower than its RMS).

How the predictions were validated: :func:`simulate_scale_invariant` integrates a scale-invariant
problem with no network (the gradient of each row is fresh Gaussian noise projected orthogonal to
the row and divided by its norm) with the real ``torch.optim`` classes, and measures the RMS angle
per row with :func:`lightning_sdm.functional.angular_update`. ``examples/validate_theory.py`` prints
the table; ``tests/test_theory.py`` asserts measured/predicted within 3% on the same grid (the
Lion deviations below are recorded as expected failures). Findings worth knowing:

* SGD, heavy ball, dampening and Nesterov: measured/predicted within 0.1%.
* AdamW (beta1 0.5 to 0.95), Adam with decoupled weight decay and AMSGrad: within 0.1%; RAdam
  with decoupled weight decay (beta2 = 0.99, rectifier ~1): 0.6%.
* Lion: REQ's formula linearises ``sign``. Measured/predicted was 1.001 for
  ``betas=(0.9, 0.99)`` at ``lr * wd = 2.5e-4`` (0.997 at 1e-4) and 0.975 for ``(0.95, 0.98)``
  (at ``lr * wd`` from 1e-4 to 5e-4), but 1.03 for ``(0.9, 0.99)`` at ``lr * wd = 1e-3`` and
  1.11 for ``(0.9, 0.999)`` at 2.5e-4 (the formula assumes ``lr * wd << 1 - beta2``), and 0.94
  for ``betas=(0.5, 0.9)`` (with a small ``beta1`` the part of the sign noise the momentum does
  not carry adds to the random walk, and the formula reads high).
* The norm relaxes twice as fast as the rate stated in SMD: see :func:`relaxation_steps`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_sdm.functional import angular_update

__all__ = [
    "Prediction",
    "predict_param_group",
    "explain_equilibrium",
    "equilibrium_angular_update",
    "relaxation_steps",
    "steps_to_equilibrium",
    "lr_decay_relaxation_steps",
    "equilibrium_weight_norm",
    "adamw_equilibrium_weight_norm",
    "SimulationResult",
    "simulate_scale_invariant",
]

_SMD = "Wan et al. 2020, Spherical Motion Dynamics (arXiv:2006.08419)"
_REQ = "Kosson et al. 2024, Rotational Equilibrium (arXiv:2305.17212)"

# LightningOptimizer (and similar wrappers) keep the real optimizer in `.optimizer`; a bound on the
# unwrapping depth guards against a wrapper that points to itself.
_MAX_UNWRAP = 16


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
    """

    angular_update: float | None
    optimizer: str
    rule: str
    reason: str
    source: str
    hyperparameters: dict[str, float] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        """Whether theory gives a value for this group."""
        return self.angular_update is not None


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
    optimizer = _unwrap(optimizer)
    family, name = _family(optimizer)
    if family is None:
        reason = f"no published equilibrium for {name}; {_MEASURED}"
        return _none(name, "unknown", reason, _basic_hyperparameters(group))
    if family == "overridden":
        reason = (
            f"{name} overrides the step() of a known optimizer; no published equilibrium for its "
            f"update; {_MEASURED}"
        )
        return _none(name, "unknown", reason, _basic_hyperparameters(group))
    try:
        hyper = _read_hyperparameters(family, optimizer, group)
    except KeyError as err:
        reason = f"{name} has no {err} hyper-parameter; no published equilibrium; {_MEASURED}"
        return _none(name, "unknown", reason, _basic_hyperparameters(group))
    except (TypeError, ValueError) as err:
        return _none(name, "invalid", f"unreadable hyper-parameters: {err}")
    invalid = _invalid_reason(hyper)
    if invalid is not None:
        return _none(name, "invalid", invalid, hyper)
    if hyper["lr"] == 0:
        reason = "lr = 0: the weights do not move"
        return Prediction(0.0, name, "zero_lr", reason, "trivial: no update", hyper)
    return _PREDICTORS[family](name, group, hyper)


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
    optimizer = _unwrap(optimizer)
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
# Norm dynamics of SGD


def relaxation_steps(lr: float, weight_decay: float, momentum: float = 0.0) -> float:
    """Time constant, in steps, of the norm dynamics under SGD: ``(1 - alpha) / (4 eta lam)``.

    The deviation ``|w_t|^4 - |w*|^4`` of a scale-invariant weight trained with ``torch.optim.SGD``
    (L2 weight decay ``lam``, heavy-ball momentum ``alpha``) decays as
    ``exp(-t / relaxation_steps)`` from any starting norm, and so does the deviation of ``|w_t|``
    itself once it is close to ``|w*|``. Reason: per step ``|w|^2`` loses ``2 eta lam |w|^2`` to
    weight decay and gains ``eta^2 |g|^2``, with ``|g|^2`` proportional to ``1/|w|^2``; so
    ``|w|^4`` follows a linear recursion with rate ``4 eta lam`` (``/(1-alpha)`` with momentum,
    whose buffer applies each term ``1/(1-alpha)`` times over).

    Checked with :func:`simulate_scale_invariant`: fitted time constants of ``|w|^4`` were within 5%
    of this value (momentum 0, 0.5, 0.9, dampening and Nesterov, starting at 0.3x and 3x the
    equilibrium norm), as long as the time is long against the momentum memory ``1/(1-alpha)``.
    Note that it is twice as fast as the rate ``(1 - 2 lam eta / (1 - alpha))^t`` stated in SMD's
    Thm 2, which is the decay of ``|w|^2`` under weight decay alone: the right description only far
    above equilibrium, where the gradient term is negligible.

    For dampening ``tau`` pass ``lr * (1 - tau)``. For AdamW and Lion (not covered here) the update
    size does not depend on the gradient scale and ``|w|^2`` relaxes on a time scale of about
    ``1/(2 eta lam)`` steps; in the simulation AdamW was up to ~30% slower than that when its second
    moment (memory ``1/(1-beta2)``) lags the changing gradient scale.

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
    :func:`relaxation_steps` (derived; checked against :func:`simulate_scale_invariant`, see the
    tests). Per invariant unit, so pass the norm of one unit (one output channel under BatchNorm).

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
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"`tolerance` must be in (0, 1), got {tolerance}.")
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


def lr_decay_relaxation_steps(
    decay_factor: float, lr: float, weight_decay: float, momentum: float = 0.0
) -> int:
    """SMD's estimate of the steps to the new equilibrium after dividing the learning rate by ``k``.

    ``ceil(log(k) (1 - alpha) / (2 lam eta))`` [SMD Cor. 3.1], with ``eta`` the learning rate
    AFTER the decay: the norm relaxes under the new learning rate (with the old one the estimate is
    ``k`` times too short). The new equilibrium norm is ``k^(-1/4)`` times the old one; until it is
    reached the angular update first drops by about ``k``, then climbs back to its new equilibrium,
    ``1/sqrt(k)`` times the old one.

    In the SGD simulation (``k = 10``) the norm got within 5% of the new equilibrium after about
    0.8 times this estimate: SMD's estimate corresponds to a tolerance of ~2%.
    :func:`steps_to_equilibrium` predicts the time for a given tolerance.

    Args:
        decay_factor: ``k >= 1``, the factor the learning rate was divided by.
        lr: the learning rate after the decay (> 0).
        weight_decay: L2 weight decay (> 0).
        momentum: heavy-ball momentum in ``[0, 1)``.

    Returns:
        Number of steps (0 for ``k = 1``).

    Raises:
        ValueError: if an argument is out of range.

    Example::

        >>> lr_decay_relaxation_steps(10, lr=0.01, weight_decay=1e-4, momentum=0.9)
        115130
    """
    if not (math.isfinite(decay_factor) and decay_factor >= 1.0):
        raise ValueError(f"`decay_factor` must be a finite number >= 1, got {decay_factor}.")
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay)
    _check_momentum(momentum)
    return math.ceil(math.log(decay_factor) * (1.0 - momentum) / (2.0 * weight_decay * lr))


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
    if not (math.isfinite(grad_sq_unit) and grad_sq_unit >= 0):
        raise ValueError(f"`grad_sq_unit` must be finite and >= 0, got {grad_sq_unit}.")
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
# Synthetic validation


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate_scale_invariant` measured.

    Attributes:
        angular_updates: ``[steps, rows]`` float64 angle of every row at every measured step
            (after the burn-in), in radians.
        norms: ``[burn_in + steps + 1, rows]`` float64 norm of every row, from the initial weight
            on.
        grad_sq_unit: ``E[|g~|^2]`` of the synthetic gradient (``dim - 1``), the ``L`` of
            :func:`equilibrium_weight_norm`.
    """

    angular_updates: Tensor
    norms: Tensor
    grad_sq_unit: float

    @property
    def rms_angular_update(self) -> float:
        """Root-mean-square of the measured angles over rows and steps (the quantity predicted)."""
        return float(self.angular_updates.square().mean().sqrt())


def simulate_scale_invariant(
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    *,
    steps: int,
    burn_in: int = 0,
    rows: int = 8,
    dim: int = 1000,
    initial_norm: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> SimulationResult:
    """Run an optimizer on a scale-invariant problem made of pure gradient noise, and measure it.

    The parameter is one ``[rows, dim]`` tensor; each row is an invariant unit, like an output
    channel followed by BatchNorm. At every step the gradient of a row ``w`` is
    ``(xi - <xi, w^> w^) / |w|`` with ``xi`` fresh standard Gaussian noise and ``w^ = w / |w|``:
    orthogonal to the row and scaling as ``1/|w|``, exactly what a scale-invariant loss with
    stationary gradient noise gives, and what the equilibrium theories assume. No network, no
    data: the optimizer's own dynamics only. Element-wise optimizers (Adam, Lion) never mix rows,
    so the rows are independent samples.

    Use it to check a prediction (see ``examples/validate_theory.py``), or to measure the
    equilibrium of an optimizer theory does not cover. Start near the equilibrium norm, or give a
    burn-in of a few relaxation times (:func:`relaxation_steps`; ``1/(2 lr wd)`` for AdamW/Lion).

    Args:
        make_optimizer: builds the optimizer from the list holding the single parameter.
        steps: measured steps (after the burn-in), >= 1.
        burn_in: steps run before measuring, >= 0.
        rows: independent invariant units.
        dim: elements per unit (the fan-in).
        initial_norm: initial norm of every row (random directions).
        seed: seed of the noise and of the initial directions.
        dtype: dtype of the parameter; float64 keeps the simulation clean.

    Speed: a step costs well under a millisecond for the default size with
    ``torch.set_num_threads(1)``; with several intra-op threads on a busy machine it was up to 8x
    slower (the tensors are too small to share).

    Returns:
        A :class:`SimulationResult`; memory is ``(burn_in + 2 steps) * rows * 8`` bytes.

    Raises:
        ValueError: if an argument is out of range.

    Example::

        >>> import math, torch
        >>> make = lambda params: torch.optim.SGD(params, lr=0.1, weight_decay=1e-2)
        >>> start = equilibrium_weight_norm(0.1, 1e-2, grad_sq_unit=99.0)
        >>> result = simulate_scale_invariant(make, steps=200, rows=4, dim=100, initial_norm=start)
        >>> round(result.rms_angular_update / math.sqrt(2 * 0.1 * 1e-2), 2)
        1.0
    """
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    if burn_in < 0:
        raise ValueError(f"`burn_in` must be >= 0, got {burn_in}.")
    if rows < 1:
        raise ValueError(f"`rows` must be >= 1, got {rows}.")
    if dim < 2:
        raise ValueError(f"`dim` must be >= 2 (a direction orthogonal to the weight), got {dim}.")
    _check_positive("initial_norm", initial_norm)

    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(rows, dim, generator=generator, dtype=dtype)
    start *= initial_norm / start.norm(dim=1, keepdim=True)
    weight = torch.nn.Parameter(start)
    optimizer = make_optimizer([weight])

    norms = torch.empty(burn_in + steps + 1, rows, dtype=torch.float64)
    angles = torch.empty(steps, rows, dtype=torch.float64)
    norms[0] = weight.detach().norm(dim=1).double()
    for step in range(burn_in + steps):
        with torch.no_grad():
            weight.grad = _orthogonal_noise(weight.detach(), generator)
            prev = weight.detach().clone()
        optimizer.step()
        curr = weight.detach()
        norms[step + 1] = curr.norm(dim=1).double()
        if step >= burn_in:
            angles[step - burn_in] = angular_update(prev, curr, dim=0)
    return SimulationResult(angular_updates=angles, norms=norms, grad_sq_unit=float(dim - 1))


def _orthogonal_noise(weight: Tensor, generator: torch.Generator) -> Tensor:
    """Per row: Gaussian noise projected orthogonal to the row, divided by the row's norm."""
    # float32 draws are ~5x faster than float64 ones and the noise needs no more precision; the
    # projection below runs in the weight's dtype, so <w, g> = 0 holds to that precision.
    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32).to(weight.dtype)
    norm = weight.norm(dim=1, keepdim=True)
    unit = weight / norm
    noise -= (noise * unit).sum(dim=1, keepdim=True) * unit
    return noise / norm


# --------------------------------------------------------------------------------------------
# Implementation: recognising the optimizer

_MEASURED = "the angular update is still measured"


def _unwrap(optimizer: Any) -> Any:
    """The innermost optimizer of wrappers that hold it in ``.optimizer`` (LightningOptimizer)."""
    for _ in range(_MAX_UNWRAP):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _known_classes() -> list[tuple[str, type]]:
    # Most derived first: recent torch makes AdamW a subclass of Adam.
    return [
        ("AdamW", torch.optim.AdamW),
        ("Adam", torch.optim.Adam),
        ("RAdam", torch.optim.RAdam),
        ("NAdam", torch.optim.NAdam),
        ("SGD", torch.optim.SGD),
    ]


def _step_function(cls: type) -> Any:
    # torch wraps `step` in a profiling hook (sometimes by assigning it on a subclass): compare the
    # innermost functions.
    return inspect.unwrap(cls.step)  # type: ignore[attr-defined]


def _family(optimizer: Any) -> tuple[str | None, str]:
    """(formula family or None or "overridden", class name) of an optimizer."""
    cls = type(optimizer)
    name = cls.__name__
    for family, known in _known_classes():
        if isinstance(optimizer, known):
            if _step_function(cls) is not _step_function(known):
                return "overridden", name
            return family, name
    if name == "Lion":
        return "Lion", name
    return None, name


def _as_float(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.detach().reshape(-1)[0].item()) if value.numel() == 1 else float("nan")
    return float(value)


def _read_hyperparameters(
    family: str, optimizer: Any, group: Mapping[str, Any]
) -> dict[str, float]:
    hyper = {"lr": _as_float(group["lr"]), "weight_decay": _as_float(group.get("weight_decay", 0))}
    if family == "SGD":
        hyper["momentum"] = _as_float(group.get("momentum", 0))
        hyper["dampening"] = _as_float(group.get("dampening", 0))
        hyper["nesterov"] = float(bool(group.get("nesterov", False)))
        return hyper
    beta1, beta2 = group["betas"]
    hyper["beta1"], hyper["beta2"] = _as_float(beta1), _as_float(beta2)
    if family in ("Adam", "AdamW", "RAdam"):
        # AdamW (a subclass of Adam in recent torch) decouples by definition; Adam and RAdam do
        # when the group says so (torch >= 2.5 for Adam).
        default = family == "AdamW"
        hyper["decoupled_weight_decay"] = float(bool(group.get("decoupled_weight_decay", default)))
    if family == "Lion" and getattr(optimizer, "decoupled_wd", False):
        # lion-pytorch's `decoupled_weight_decay=True` divides wd by the initial lr:
        # p *= 1 - lr * wd / init_lr.
        hyper["weight_decay"] /= _as_float(optimizer._init_lr)
    return hyper


def _basic_hyperparameters(group: Mapping[str, Any]) -> dict[str, float]:
    """The lr and weight_decay where readable, for the record of an unknown optimizer."""
    hyper = {}
    for key in ("lr", "weight_decay"):
        try:
            hyper[key] = _as_float(group[key])
        except (KeyError, TypeError, ValueError):
            continue
    return hyper


def _invalid_reason(hyper: Mapping[str, float]) -> str | None:
    for key, value in hyper.items():
        if not math.isfinite(value):
            return f"{key} = {value} is not finite: no equilibrium"
        if value < 0:
            return f"{key} = {value} is negative: no equilibrium"
    for key in ("momentum", "beta1", "beta2"):
        if hyper.get(key, 0.0) >= 1.0:
            return f"{key} = {hyper[key]} >= 1: no equilibrium"
    if hyper.get("dampening", 0.0) > 1.0:
        return f"dampening = {hyper['dampening']} > 1 reverses the updates: no equilibrium"
    return None


def _none(
    name: str, rule: str, reason: str, hyper: Mapping[str, float] | None = None, source: str = ""
) -> Prediction:
    return Prediction(None, name, rule, reason, source, dict(hyper or {}))


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
    "no beta2 dependence"
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
    k = (1 - beta1) ** 2 + beta1**2 * (1 - beta2) / (1 + beta2)
    value = math.sqrt(math.pi / 2) * math.sqrt(2 * lr * wd) * math.sqrt(k)
    reason = (
        f"sqrt(pi/2)*sqrt(2*lr*wd)*sqrt((1-b1)^2+b1^2*(1-b2)/(1+b2)) = sqrt(pi/2)*sqrt(2*"
        f"{_fmt(lr)}*{_fmt(wd)})*sqrt({_fmt(k)}) = {_fmt(value)} rad per step; linearises "
        "sign(): within 3% for betas (0.9, 0.99) or (0.95, 0.98) and lr*wd << 1-beta2; reads "
        "~6% high at betas (0.5, 0.9), ~3% low at lr*wd = 0.1*(1-beta2)"
    )
    return Prediction(value, name, "lion", reason, f"{_REQ}, REQ code lion_etar_func", hyper)


_PREDICTORS: dict[str, Callable[[str, Mapping[str, Any], dict[str, float]], Prediction]] = {
    "SGD": _predict_sgd,
    "Adam": _predict_adam,
    "AdamW": _predict_adam,
    "RAdam": _predict_radam,
    "NAdam": _predict_nadam,
    "Lion": _predict_lion,
}


# --------------------------------------------------------------------------------------------
# Implementation: argument checks


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")


def _check_momentum(momentum: float) -> None:
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}.")
