"""A scale-invariant problem without a network, to check the theory against real optimizers.

:func:`simulate_scale_invariant` integrates pure gradient noise projected orthogonal to each row of
a weight, with the real ``torch.optim`` classes; ``tests/test_theory.py`` compares every formula of
:mod:`lightning_sdm.theory` with it, and ``examples/validate_theory.py`` prints the table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_sdm._checks import check_integer, check_number
from lightning_sdm.functional import angular_update

__all__ = ["SimulationResult", "simulate_scale_invariant"]


@dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate_scale_invariant` measured.

    Attributes:
        angular_updates: ``[steps, rows]`` float64 angle of every row at every measured step
            (after the burn-in), in radians.
        norms: ``[burn_in + steps + 1, rows]`` float64 norm of every row, from the initial weight
            on.
        grad_sq_unit: ``E[|g~|^2]`` of the synthetic gradient (``dim - 1``), the ``L`` of
            :func:`~lightning_sdm.theory.equilibrium_weight_norm`.
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
    initial_norm: float | Sequence[float] = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    before_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
    invariance: Literal["row", "matrix"] = "row",
    correlation: float = 0.0,
    pull: float = 0.0,
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
    burn-in of a few relaxation times (:func:`lightning_sdm.theory.relaxation_time`).

    Args:
        make_optimizer: builds the optimizer from the list holding the single parameter.
        steps: measured steps (after the burn-in), >= 1.
        burn_in: steps run before measuring, >= 0.
        rows: independent invariant units.
        dim: elements per unit (the fan-in).
        initial_norm: initial norm of every row (random directions), or one per row: rows of
            different norms under one matrix-wide step size (Adafactor's relative step).
        seed: seed of the noise and of the initial directions.
        dtype: dtype of the parameter; float64 keeps the simulation clean.
        before_step: called as ``before_step(step, optimizer)`` before every step (0-based,
            burn-in included), e.g. to change the learning rate in the middle of a run.
        invariance: ``"row"``: each row is invariant on its own (BatchNorm after a layer);
            ``"matrix"``: only the whole matrix is (LayerNorm or RMSNorm after it): the noise is
            projected orthogonal to the whole weight and divided by its norm. The angles are
            still measured per row; Muon, which orthogonalises the whole matrix, is checked in
            both.
        correlation: in ``[0, 1)``: the noise is persistent, ``xi_t = c xi_{t-1} +
            sqrt(1 - c^2) n_t`` (a correlation time of ``1 / (1 - c)`` steps) instead of fresh
            each step; the projection and the ``1/|w|`` scaling stay, so the gradient is still
            exactly orthogonal to the weight.
        pull: ``>= 0``: adds a loss with a minimum, ``-pull * <w^, a>`` per row for a fixed
            random unit direction ``a`` of each row: a persistent gradient that holds the
            direction near ``a`` (real networks have both, a persistent part and noise).

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
        >>> from lightning_sdm.theory import equilibrium_weight_norm
        >>> start = equilibrium_weight_norm(0.1, 1e-2, grad_sq_unit=99.0)
        >>> result = simulate_scale_invariant(make, steps=200, rows=4, dim=100, initial_norm=start)
        >>> round(result.rms_angular_update / math.sqrt(2 * 0.1 * 1e-2), 2)
        1.0
    """
    check_integer("steps", steps, 1)
    check_integer("burn_in", burn_in, 0)
    check_integer("rows", rows, 1)
    check_integer("dim", dim, 2)  # a direction orthogonal to the weight
    check_integer("seed", seed, 0)
    norms_at_start = _initial_norms(initial_norm, rows)
    check_number("correlation", correlation, low=0.0, high=1.0, low_open=False)
    check_number("pull", pull, low=0.0, low_open=False)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"`dtype` must be a floating-point torch.dtype, got {dtype!r}.")
    if invariance not in ("row", "matrix"):
        raise ValueError(f"`invariance` must be 'row' or 'matrix', got {invariance!r}.")
    if not callable(make_optimizer):
        raise ValueError("`make_optimizer` must be a callable: parameters -> optimizer.")

    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(rows, dim, generator=generator, dtype=dtype)
    start *= torch.tensor(norms_at_start, dtype=dtype).unsqueeze(1) / start.norm(
        dim=1, keepdim=True
    )
    weight = torch.nn.Parameter(start)
    # The persistent parts draw from their own generator: the plain noise stays the same stream.
    extra = torch.Generator().manual_seed(seed + 1)
    target = torch.randn(rows, dim, generator=extra, dtype=dtype) if pull else None
    previous = torch.randn(rows, dim, generator=extra, dtype=dtype) if correlation else None
    optimizer = make_optimizer([weight])
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"`make_optimizer` must return a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )

    norms = torch.empty(burn_in + steps + 1, rows, dtype=torch.float64)
    angles = torch.empty(steps, rows, dtype=torch.float64)
    norms[0] = weight.detach().norm(dim=1).double()
    for step in range(burn_in + steps):
        if before_step is not None:
            before_step(step, optimizer)
        with torch.no_grad():
            noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
            raw = noise.to(weight.dtype)
            if previous is not None:  # AR(1): persistent noise of unit variance per element
                raw = previous = correlation * previous + math.sqrt(1 - correlation**2) * raw
            if target is not None:  # the gradient of -pull <w^, a>, before the projection
                raw = raw - pull * target / target.norm(dim=1, keepdim=True)
            weight.grad = _orthogonal(weight.detach(), raw, invariance == "matrix")
            prev = weight.detach().clone()
        optimizer.step()
        curr = weight.detach()
        norms[step + 1] = curr.norm(dim=1).double()
        if step >= burn_in:
            angles[step - burn_in] = angular_update(prev, curr, dim=0)
    return SimulationResult(angular_updates=angles, norms=norms, grad_sq_unit=float(dim - 1))


def _initial_norms(initial_norm: float | Sequence[float], rows: int) -> list[float]:
    """One positive, finite norm per row; ``ValueError`` naming ``initial_norm`` otherwise."""
    if isinstance(initial_norm, Sequence) and not isinstance(initial_norm, str):
        if len(initial_norm) != rows:
            raise ValueError(
                f"`initial_norm` must be one number or one per row ({rows}), got "
                f"{len(initial_norm)} numbers."
            )
        for value in initial_norm:
            check_number("initial_norm", value, low=0.0)
        return [float(value) for value in initial_norm]
    check_number("initial_norm", initial_norm, low=0.0)
    return [float(initial_norm)] * rows


def _orthogonal(weight: Tensor, noise: Tensor, whole: bool = False) -> Tensor:
    """Per row (or whole matrix): ``noise`` projected orthogonal to the weight, over its norm."""
    # float32 draws are ~5x faster than float64 ones and the noise needs no more precision; the
    # projection below runs in the weight's dtype, so <w, g> = 0 holds to that precision.
    dims = (0, 1) if whole else 1
    norm = weight.norm(dim=dims, keepdim=True)
    unit = weight / norm
    noise -= (noise * unit).sum(dim=dims, keepdim=True) * unit
    return noise / norm
