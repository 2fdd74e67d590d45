"""Lion's equilibrium: the norm balance of sign steps, with the sign's own autocorrelation.

Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675) steps
``w <- (1 - eta lam) w - eta u`` with ``u_t = sign(c_t)``, ``c_t = b1 m_{t-1} + (1 - b1) g_t`` and
``m_t = b2 m_{t-1} + (1 - b2) g_t``. Derivation (published nowhere; checked against
:func:`~lightning_sdm.theory.simulate_scale_invariant` over a grid of betas and ``eta lam``, and
on real BatchNorm networks, see ``docs/validation.md``):

1. ``|u|^2 = d`` exactly (``d`` elements, each +-1), whatever the gradient scale: Lion is
   scale-free, and the ``1/|w|`` of a scale-invariant weight's gradient drops out of ``u``.
2. With white gradient noise, ``c`` is a linear filter of it: ``c_t = sum_j h_j g_{t-j}``,
   ``h_0 = 1 - b1``, ``h_j = b1 (1 - b2) b2^(j-1)``. Its variance is
   ``K = (1-b1)^2 + b1^2 (1-b2)/(1+b2)`` (REQ's constant) and its autocorrelation at lag
   ``k >= 1`` is ``r_k = A b2^(k-1)`` with ``A = b1 (1 - b2) ((1 - b1) + b1 b2 / (1 + b2)) / K``.
   Per element ``c`` is Gaussian, so ``sign(c)`` has autocorrelation ``rho_k = (2/pi) arcsin(r_k)``
   (the arcsine law), and ``<u_t, u_{t-k}> = d rho_k``.
3. ``w_t = -eta sum_k q^k u_{t-1-k}`` (once the start has decayed; ``q = 1 - eta lam``), so
   ``<w_t, u_t> = -eta d (S - 1) / (2 q)`` with ``S = 1 + 2 sum_{k>=1} q^k rho_k``, and
   ``|w_{t+1}|^2 = q^2 |w_t|^2 + eta^2 d S``: in equilibrium ``|w*|^2 = eta^2 d S / (1 - q^2)``.
4. The angle is the part of the step orthogonal to ``w``: ``theta0 = eta sqrt(d) / |w*|`` times
   ``sqrt(1 - theta0^2 (S - 1)^2 / (4 q^2))`` (``u``'s radial part, large when the signs stay
   correlated over the ``1/(eta lam)`` steps the weight remembers). So
   ``theta^2 = (1 - q^2) / S * (1 - theta0^2 (S - 1)^2 / (4 q^2))``, ``theta0^2 = (1 - q^2) / S``.

REQ's ``(pi/2) 2 eta lam K`` is the limit where every ``r_k`` is small (``arcsin r ~ r``), the
sum over lags runs to infinity (``eta lam << 1 - b2``) and ``S >> 1``: there ``S ~ 1 - 2/pi +
(2/pi) / K``. It reads 6% high at betas (0.5, 0.9) (the ``1 - 2/pi`` of the sign's own noise), and
the simulation read 1.11-1.39x it at (0.9, 0.999) (``q^k`` cuts the sum before ``b2^k`` does).

The norm: given ``S``, ``|w|^2`` follows a linear recursion and relaxes exponentially with time
constant ``1 / (1 - q^2) ~ 1 / (2 eta lam)``, once the momentum has filled (``~1/(1 - b2)``
steps). But ``m`` averages gradients of size ``1/|w|``: while the norm moves, older gradients
weigh more (a growing norm) or less (a shrinking one) than in equilibrium, so ``S`` follows the
norm's own motion; when ``eta lam`` is not much smaller than ``1 - b2`` the norm overshoots (from
0.3x the equilibrium norm at betas (0.9, 0.999), ``eta lam = 5e-4``: ``|w|^2`` 2x its equilibrium
after three time constants) before it settles. Hence Lion's relaxation time
(:func:`~lightning_sdm.theory.relaxation_time`) is ``1 / (2 eta lam) + 1 / (1 - b2)``. The norm
approaches exponentially, not linearly: the shrinking ``eta lam |w|^2`` per step is proportional
to ``|w|^2``, while the sign steps add a fixed ``eta^2 d S``.

On real networks the gradient is not white noise: a step along ``u`` changes the next gradient
(the loss's curvature pushes back), so successive signs are less correlated than the arcsine law
of white noise says, ``S`` is smaller and the angle larger; a persistent signal does the
opposite. On small BatchNorm ResNets with 20% label noise (``studies/lion/measure.py``) the
measured ``S`` was 0.7-1.0 of this one at betas (0.9, 0.99) (measured/predicted 1.02-1.21 per
layer), but 1.8-2.4x on the last conv at (0.5, 0.9) (0.70-0.78): a property of the task, which
no hyper-parameter formula holds (``docs/validation.md``).
"""

from __future__ import annotations

import math

__all__ = ["lion_equilibrium", "lion_filter_variance", "lion_sign_correlation"]

# Below this correlation arcsin(x) = x + x^3/6 to 1e-13 (the next term, 3x^5/40, is ~1e-16):
# the rest of the sum over lags is geometric and summed in closed form.
_SERIES_BELOW = 1e-3


def lion_filter_variance(beta1: float, beta2: float) -> float:
    """``K = (1-b1)^2 + b1^2 (1-b2)/(1+b2)``: the variance of ``c`` per unit gradient variance.

    REQ's constant (step 2 of the derivation).

    Example::

        >>> round(lion_filter_variance(0.9, 0.99), 6)
        0.01407
    """
    return (1 - beta1) ** 2 + beta1**2 * (1 - beta2) / (1 + beta2)


def lion_sign_correlation(beta1: float, beta2: float, lr_wd: float) -> float:
    """``S = 1 + 2 sum_{k>=1} (1 - lr wd)^k (2/pi) arcsin(r_k)`` of the module's derivation.

    ``S`` is ``|w*|^2 (1 - q^2) / (eta^2 d)``: 1 for uncorrelated signs, up to
    ``(2 - lr wd) / (lr wd)`` for signs that never change.

    Args:
        beta1: Lion's interpolation coefficient ``b1`` in ``[0, 1)``.
        beta2: Lion's momentum coefficient ``b2`` in ``[0, 1)``.
        lr_wd: ``eta lam`` in ``(0, 1)``.

    Returns:
        The sign correlation sum ``S >= 1``.

    Example::

        >>> round(lion_sign_correlation(0.0, 0.99, 1e-3), 6)  # c = g: signs are independent
        1.0
        >>> round(lion_sign_correlation(0.9, 0.99, 1e-4), 1)  # near 1 - 2/pi + (2/pi)/K = 45.6
        45.5
    """
    k_var = lion_filter_variance(beta1, beta2)
    x = beta1 * (1 - beta2) * ((1 - beta1) + beta1 * beta2 / (1 + beta2)) / k_var  # r_1
    q = 1.0 - lr_wd
    weight, total = q, 0.0
    # x falls by beta2 per lag and the weight by q: at most log(1e-3)/log(beta2) terms (6900 for
    # beta2 = 0.999), or until the weight is negligible.
    while x > _SERIES_BELOW and weight > 1e-16:
        total += weight * math.asin(x)
        x *= beta2
        weight *= q
    total += weight * (x / (1 - q * beta2) + x**3 / 6 / (1 - q * beta2**3))
    return 1.0 + 4.0 / math.pi * total


def lion_equilibrium(
    lr: float, weight_decay: float, beta1: float, beta2: float
) -> tuple[float, float, float]:
    """Lion's equilibrium: RMS angle per step, ``|w*| / sqrt(d)`` and the sign correlation ``S``.

    Args:
        lr: learning rate ``eta`` (> 0).
        weight_decay: decoupled weight decay ``lam`` (> 0, ``eta lam < 1``).
        beta1: interpolation coefficient in ``[0, 1)``.
        beta2: momentum coefficient in ``[0, 1)``.

    Returns:
        ``(angle, norm_per_sqrt_fan_in, S)``: the angle in radians per step, the equilibrium
        norm divided by ``sqrt(d)`` (``eta sqrt(S / (1 - q^2))``), and ``S``.

    Example::

        >>> angle, norm, s = lion_equilibrium(1e-3, 0.5, 0.5, 0.9)
        >>> round(angle, 4), round(norm, 4)  # REQ's formula: 0.0203
        (0.019, 0.0527)
    """
    lr_wd = lr * weight_decay
    s = lion_sign_correlation(beta1, beta2, lr_wd)
    q = 1.0 - lr_wd
    decay = 1.0 - q * q
    theta0_sq = decay / s
    radial = theta0_sq * (s - 1.0) ** 2 / (4.0 * q * q)  # <u, w^>^2 / d, at most 1
    angle = math.sqrt(theta0_sq * max(0.0, 1.0 - radial))
    return angle, lr * math.sqrt(s / decay), s
