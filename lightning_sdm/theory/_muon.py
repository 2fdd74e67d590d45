"""Muon's equilibrium: the memory factor of its orthogonalised momentum, by shape.

``torch.optim.Muon`` updates a matrix ``W`` (``A x B``) by ``W <- (1 - lr wd) W - lr' O_t`` with
``O_t = NS(m_t)``, the Newton-Schulz "orthogonalisation" of its momentum ``m_t`` (heavy ball:
``m_t = buf_t``; Nesterov, torch's default: ``m_t = (1 - mu) g_t + mu buf_t``, with
``buf_t = mu buf_{t-1} + (1 - mu) g_t``), and ``lr' = lr * adjust(A, B)`` (``"original"``:
``sqrt(max(1, A/B))``; ``"match_rms_adamw"``: ``0.2 sqrt(max(A, B))``). Weight decay uses the
unadjusted ``lr``.

The balance. For a scale-invariant ``W`` the gradient is orthogonal to it, and so, to first order,
is every ``O_t``. Over many steps ``|W|^2`` loses ``2 lr wd |W|^2`` per step to weight decay and
gains the long-run variance rate ``V`` of the summed updates, ``lr'^2 V`` (the updates of nearby
steps are correlated through the momentum, so ``V`` counts their covariances, not only
``E|O|^2``). In equilibrium ``|W|^2 = lr'^2 V / (2 lr wd)``, and the RMS angle per step is::

    Delta^2 = lr'^2 E|O|^2 / |W|^2 = 2 lr wd R,        R = E|O|^2 / V.

``lr'`` cancels: the angle depends on ``adjust_lr_fn`` only through how long the norm takes to
get there (the norm itself scales with ``lr'``). ``R`` is the memory factor of the update
sequence. If ``NS`` were linear, ``O_t`` would be a fixed linear filter ``sum_k c_k g_{t-k}`` of
white noise and ``R = sum c_k^2 / (sum c_k)^2``::

    heavy ball:  c_k = (1 - mu) mu^k        R = (1 - mu) / (1 + mu)
    Nesterov:    c_0 = 1 - mu^2,
                 c_k = (1 - mu) mu^(k+1)    R = (1 - mu^2)^2 + mu^4 (1 - mu) / (1 + mu)

(the first is AdamW's ``(1 - beta1) / (1 + beta1)``, which has the same momentum filter.)
``NS`` is not linear: it maps a matrix to (nearly) its polar factor, which changes more slowly
than the momentum itself when the matrix is square (every direction of ``m_t`` is normalised
to about 1, so a small change of ``m_t`` in a weak direction moves ``O_t`` a lot less than its
share), and less so when ``A << B`` (the rows of a wide Gaussian matrix are almost orthogonal
already, ``NS`` is nearly a rescaling). So ``R`` depends on the aspect ratio ``min(A, B) /
max(A, B)`` and on ``mu``, ``nesterov``: :func:`muon_memory_factor` measures it by a Monte
Carlo of torch's own Newton-Schulz iteration (bfloat16, its coefficients) on Gaussian
gradients, batched over independent chains, with a proxy matrix of at most
:data:`PROXY_ROWS` rows and the same aspect ratio (the factor depends on the aspect, not the
size: 32x32 and 128x128 agreed to 0.1%). :data:`DEFAULT_TABLE` holds it for torch's default
Newton-Schulz settings on a grid of aspects and momenta (``studies/muon/tabulate.py`` writes
it); :func:`muon_memory_ratio` interpolates it.

Validation (``tests/theory/test_muon.py``, ``docs/muon.md``): ``torch.optim.Muon`` on a
scale-invariant matrix with Gaussian gradients (:func:`~lightning_sdm.theory.simulate_muon`),
square to 1:16, ``mu`` 0.5 to 0.95, Nesterov or not, each ``adjust_lr_fn``: measured/predicted
within 3%; the linear closed form reads up to 17% low for square matrices at ``mu = 0.95``.

Sources: K. Jordan et al., "Muon: an optimizer for hidden layers" (2024), for the update; the
balance is the random-walk argument of Wan et al. 2020 (SMD, arXiv:2006.08419) and Kosson et al.
2024 (arXiv:2305.17212) applied to Muon's update; the memory factor is derived here and measured
by the Monte Carlo above (published nowhere else in this form).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_NS",
    "DEFAULT_TABLE",
    "PROXY_ROWS",
    "linear_memory_factor",
    "muon_memory_factor",
    "muon_memory_ratio",
]

#: torch's default Newton-Schulz settings: (a, b, c) coefficients and the number of iterations.
DEFAULT_NS: tuple[tuple[float, float, float], int] = ((3.4445, -4.775, 2.0315), 5)

#: Rows of the Monte Carlo's proxy matrix (the short side); the long side keeps the aspect.
PROXY_ROWS = 32

# Grid of DEFAULT_TABLE: aspect = short side / long side, and momentum.
_ASPECTS = (1.0, 0.5, 0.25, 0.125, 0.0625)
_MOMENTA = (0.5, 0.8, 0.9, 0.95, 0.98)

#: ``R_MC / R_linear`` (:func:`muon_memory_factor` over :func:`linear_memory_factor`) for torch's
#: default Newton-Schulz settings, per ``(nesterov, aspect)`` a row over ``_MOMENTA``. Written by
#: ``studies/muon/tabulate.py`` (16 chains, 150 memory times per point); the tests recompute
#: points of it.
DEFAULT_TABLE: dict[tuple[bool, float], tuple[float, ...]] = {
    (True, 1.0): (1.1455, 1.3218, 1.3568, 1.3466, 1.3710),
    (True, 0.5): (1.0720, 1.1471, 1.1656, 1.1756, 1.1729),
    (True, 0.25): (1.0371, 1.0766, 1.0899, 1.0875, 1.0813),
    (True, 0.125): (1.0298, 1.0581, 1.0648, 1.0644, 1.0602),
    (True, 0.0625): (1.0223, 1.0486, 1.0500, 1.0493, 1.0492),
    (False, 1.0): (1.2402, 1.3211, 1.3252, 1.3169, 1.3490),
    (False, 0.5): (1.1149, 1.1353, 1.1447, 1.1576, 1.1616),
    (False, 0.25): (1.0561, 1.0694, 1.0794, 1.0784, 1.0764),
    (False, 0.125): (1.0448, 1.0529, 1.0572, 1.0579, 1.0568),
    (False, 0.0625): (1.0326, 1.0443, 1.0441, 1.0445, 1.0466),
}


def linear_memory_factor(momentum: float, nesterov: bool) -> float:
    """``R`` of a linear momentum filter: ``sum c_k^2 / (sum c_k)^2`` (see the module docstring).

    Example::

        >>> round(linear_memory_factor(0.9, nesterov=False), 6)
        0.052632
        >>> round(linear_memory_factor(0.9, nesterov=True), 6)
        0.070632
        >>> linear_memory_factor(0.0, nesterov=True)
        1.0
    """
    mu = momentum
    if nesterov:
        return (1 - mu**2) ** 2 + mu**4 * (1 - mu) / (1 + mu)
    return (1 - mu) / (1 + mu)


def _newton_schulz(
    matrices: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float = 1e-7
) -> Tensor:
    """Torch's ``_zeropower_via_newtonschulz`` over a batch of matrices (last two dimensions)."""
    a, b, c = coefficients
    x = matrices.bfloat16()
    transposed = matrices.size(-2) > matrices.size(-1)
    if transposed:
        x = x.transpose(-2, -1)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.transpose(-2, -1)
    return x.float()


def muon_memory_factor(
    aspect: float,
    momentum: float,
    nesterov: bool,
    *,
    ns_coefficients: tuple[float, float, float] = DEFAULT_NS[0],
    ns_steps: int = DEFAULT_NS[1],
    chains: int = 16,
    memory_times: int = 150,
    seed: int = 0,
) -> float:
    """Monte Carlo of ``R = E|O|^2 / V`` for Muon's update on Gaussian gradients.

    Runs ``chains`` independent momentum buffers fed with fresh standard Gaussian matrices of
    ``PROXY_ROWS x PROXY_ROWS / aspect`` entries, orthogonalises each step's update with torch's
    Newton-Schulz iteration (bfloat16), and compares the mean squared norm of one update with
    the squared norm of their sum over ``memory_times / (1 - momentum)`` steps (after a burn-in
    of 10 memory times). The bias of that long-run variance estimate is about
    ``1 / memory_times`` of the memory's own share.

    Args:
        aspect: ``min(A, B) / max(A, B)`` of the matrix, in ``(0, 1]``.
        momentum: Muon's ``momentum``, in ``[0, 1)``.
        nesterov: Muon's ``nesterov``.
        ns_coefficients: the Newton-Schulz coefficients.
        ns_steps: the Newton-Schulz iterations.
        chains: independent chains, batched.
        memory_times: length of the averaging, in momentum memory times ``1 / (1 - momentum)``.
        seed: seed of the Gaussian gradients.

    Returns:
        ``R``; 1 without momentum (independent updates).

    Example::

        >>> muon_memory_factor(1.0, 0.0, nesterov=True)
        1.0
    """
    if momentum == 0:
        return 1.0
    generator = torch.Generator().manual_seed(seed)
    short = PROXY_ROWS
    long = max(short, round(short / aspect))
    memory = 1.0 / (1.0 - momentum)
    burn, steps = int(10 * memory) + 5, int(memory_times * memory) + 200
    buf = torch.zeros(chains, short, long)
    total = torch.zeros_like(buf)
    squares = torch.zeros((), dtype=torch.float64)
    for t in range(burn + steps):
        grad = torch.randn(buf.shape, generator=generator)
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if nesterov else buf
        orthogonal = _newton_schulz(update, ns_coefficients, ns_steps)
        if t >= burn:
            total += orthogonal
            squares += orthogonal.double().square().sum()
    mean_square = squares.item() / (steps * chains)
    long_run_rate = total.double().square().sum().item() / (steps * chains)
    return mean_square / long_run_rate


def muon_memory_ratio(aspect: float, momentum: float, nesterov: bool) -> tuple[float, str]:
    """``R`` for torch's default Newton-Schulz settings, from :data:`DEFAULT_TABLE`.

    Interpolates the tabulated ``R_MC / R_linear`` linearly in ``log2(aspect)`` and in
    ``log(1 - momentum)`` (the memory time), with ``1`` at ``momentum = 0`` (independent updates
    are exactly linear); beyond the grid (an aspect under 1/16, a momentum over 0.98) the nearest
    edge is used and the note says so.

    Args:
        aspect: ``min(A, B) / max(A, B)``, in ``(0, 1]``.
        momentum: in ``[0, 1)``.
        nesterov: Nesterov momentum or heavy ball.

    Returns:
        ``(R, note)``; ``note`` is ``""`` inside the grid.

    Example::

        >>> r, note = muon_memory_ratio(1.0, 0.0, nesterov=True)
        >>> r, note
        (1.0, '')
    """
    note = []
    if aspect < _ASPECTS[-1]:
        note.append(f"aspect {aspect:.3g} < {_ASPECTS[-1]}: tabulated edge used")
    if momentum > _MOMENTA[-1]:
        note.append(f"momentum {momentum:.3g} > {_MOMENTA[-1]}: tabulated edge used")
    correction = _interpolated(
        max(aspect, _ASPECTS[-1]), min(momentum, _MOMENTA[-1]), bool(nesterov)
    )
    return correction * linear_memory_factor(momentum, nesterov), "; ".join(note)


@functools.lru_cache(maxsize=1024)
def _interpolated(aspect: float, momentum: float, nesterov: bool) -> float:
    if momentum <= 0:
        return 1.0
    x = -math.log2(aspect)
    xs = [-math.log2(a) for a in _ASPECTS]
    memory = -math.log(1 - momentum)
    # Momentum 0 is a grid point with correction 1 (independent updates): NS of white noise is
    # white noise whatever its nonlinearity.
    ys = [0.0] + [-math.log(1 - m) for m in _MOMENTA]

    def row(nest: bool, index: int) -> list[float]:
        return [1.0, *DEFAULT_TABLE[(nest, _ASPECTS[index])]]

    i = _bracket(xs, x)
    j = _bracket(ys, memory)
    fx = (x - xs[i]) / (xs[i + 1] - xs[i])
    fy = (memory - ys[j]) / (ys[j + 1] - ys[j])
    low, high = row(nesterov, i), row(nesterov, i + 1)
    at_low = low[j] + fy * (low[j + 1] - low[j])
    at_high = high[j] + fy * (high[j + 1] - high[j])
    return at_low + fx * (at_high - at_low)


def _bracket(grid: list[float], value: float) -> int:
    """Index ``i`` with ``grid[i] <= value <= grid[i + 1]`` (grid ascending, value inside)."""
    for i in range(len(grid) - 2):
        if value <= grid[i + 1]:
            return i
    return len(grid) - 2
