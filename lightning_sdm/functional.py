"""Exact angular updates between weight tensors, and the sufficient statistics behind them.

The angle between two weights that differ by one optimizer step is tiny (1e-4..1e-2 rad), and the
textbook ``arccos(cosine_similarity)`` in float32 cannot resolve it: ``1 - cos`` is below float32
resolution for every angle under ~3e-4 rad. This module never forms the cosine. For each unit it
accumulates, in float64, three sums over the elements of the unit::

    prev_sq   = |w_t|^2
    delta_sq  = |w_{t+1} - w_t|^2     (exact difference: float32 values upcast to float64)
    delta_dot = <w_{t+1} - w_t, w_t>

and takes the angle from the component of ``w_{t+1}`` along ``w_t`` and the component orthogonal
to it::

    along      = (prev_sq + delta_dot) / |w_t|
    orthogonal = sqrt(delta_sq - delta_dot^2 / prev_sq)
    angle      = atan2(orthogonal, along)

``delta_sq`` and ``delta_dot`` are small numbers computed directly from the (exact) difference, so
the subtraction that remains loses nothing that matters, and ``atan2`` is well conditioned over
the whole range ``[0, pi]``. All three statistics are plain sums over elements: for a sharded tensor
each rank sums its own shard and one all-reduce of the ``[units, 4]`` statistics gives the exact
global angle. The fourth column, ``coverage``, is the fraction of the unit's elements held
locally; summed over ranks it counts how many times each element was seen (1 for a sharded
tensor, the world size for a replicated one), which turns the summed statistics back into norms.

Conventions:
    ``dim=None`` makes the whole tensor one unit. ``dim=k`` gives one unit per index along dimension
    ``k`` and reduces over all other dimensions, as ``torch.nn.utils.weight_norm(dim=k)`` does: for
    a ``Linear``/``Conv`` weight of shape ``[out, in, ...]``, ``dim=0`` is one angle per output
    channel (per neuron).

    Units whose previous or current weight is all zeros, or that contain NaN or Inf, have no
    defined angle: their angle is NaN. Nothing here raises on such values, so a monitor built on it
    never interrupts training.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_sdm._checks import check_bool
from lightning_sdm._engine import (
    ACCELERATOR_CHUNK_NUMEL,
    COVERAGE,
    DEFAULT_CHUNK_NUMEL,
    DELTA_DOT,
    DELTA_SQ,
    NUM_STATISTICS,
    PREV_SQ,
    Dims,
    Workspace,
    all_reduce_if_sharded,
    check_arguments,
    compute,
    is_dtensor,
    normalize_dim,
    plan_for,
)

__all__ = [
    "PREV_SQ",
    "DELTA_SQ",
    "DELTA_DOT",
    "COVERAGE",
    "NUM_STATISTICS",
    "DEFAULT_CHUNK_NUMEL",
    "ACCELERATOR_CHUNK_NUMEL",
    "angular_update",
    "angular_update_statistics",
    "angles_from_statistics",
    "norms_from_statistics",
    "cosine_from_statistics",
    "num_units",
]


def angular_update(prev: Tensor, curr: Tensor, *, dim: int | None = None) -> Tensor:
    """Angle in radians between ``prev`` and ``curr``, exact down to float32 rounding of the inputs.

    Args:
        prev: the weight before the update (any floating dtype, any shape; may be a DTensor).
        curr: the weight after the update, same shape as ``prev``.
        dim: ``None`` for one angle over the whole tensor, or the dimension that indexes the units
            (``dim=0``: one angle per output channel of a ``Linear``/``Conv`` weight).

    Returns:
        A float64 tensor: a scalar for ``dim=None``, else of shape ``[prev.shape[dim]]``. Units
        with a zero, NaN or Inf weight give NaN.

    Raises:
        ValueError: if the shapes differ or ``dim`` is out of range.

    Example::

        >>> import math, torch
        >>> w = torch.tensor([1.0, 0.0])
        >>> v = torch.tensor([math.cos(1e-5), math.sin(1e-5)])
        >>> round(angular_update(w, v).item() / 1e-5, 5)
        1.0
        >>> angular_update(torch.eye(2), torch.tensor([[0.0, 1.0], [0.0, 2.0]]), dim=0)
        tensor([1.5708, 0.0000], dtype=torch.float64)
    """
    for name, value in (("prev", prev), ("curr", curr)):
        if not isinstance(value, Tensor):
            raise ValueError(
                f"`{name}` must be a tensor, got {type(value).__name__} (for several tensors: "
                "angular_update_statistics)."
            )
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral)):
        raise ValueError(f"`dim` must be None or an int, got {dim!r}.")
    prev, curr = _in_range(prev, curr)
    stats = angular_update_statistics([prev], [curr], dim=None if dim is None else int(dim))
    stats = all_reduce_if_sharded(stats, prev)
    angles = angles_from_statistics(stats)
    return angles.reshape(()) if dim is None else angles


def angular_update_statistics(
    prev: Sequence[Tensor],
    curr: Sequence[Tensor],
    *,
    dim: Dims = None,
    chunk_numel: int | None = None,
    curr_is_delta: bool = False,
) -> Tensor:
    """Sufficient statistics of the angular updates of many tensors, in one batched pass.

    The tensors are copied, unit after unit, into a float64 work buffer of at most
    ``chunk_numel`` elements (a larger tensor is processed in parts) and reduced per block of
    elements by one batched matrix product per chunk, so the cost is a handful of kernels per
    chunk, not a loop of small ops per tensor. The layout is cached per list of shapes.

    Args:
        prev: tensors before the update.
        curr: tensors after the update, pairwise the same shapes as ``prev``.
        dim: one value for all tensors, or one per tensor: ``None`` (tensor = one unit) or the
            dimension that indexes units (see the module docstring).
        chunk_numel: upper bound on the elements upcast to float64 at once; ``None``: the
            device's (2^17 on CPU, where the buffer stays in cache; 2^21 on accelerators, where
            each chunk costs kernel launches).
        curr_is_delta: ``curr`` holds the step ``w_{t+1} - w_t`` itself (e.g. a gradient, to test
            ``<w, grad> = 0`` with :func:`cosine_from_statistics`) rather than ``w_{t+1}``.

    Returns:
        float64 tensor of shape ``[U, 4]`` with columns ``PREV_SQ``, ``DELTA_SQ``, ``DELTA_DOT``,
        ``COVERAGE``; rows are the units of the tensors in order. For a DTensor the rows cover
        the whole global tensor, but only the local shard is summed (rows held elsewhere are zero;
        a ``Replicate()`` copy away from coordinate 0 of its mesh dimension adds zeros too): sum
        the result over the ranks of the mesh to get the global statistics, each element once.

    Raises:
        ValueError: if the lists differ in length, a pair differs in shape, a ``dim`` is out of
            range, or a DTensor has a ``Partial()`` placement.

    Example::

        >>> import torch
        >>> prev = [torch.ones(3, 2), torch.ones(4)]
        >>> curr = [2 * torch.ones(3, 2), torch.ones(4)]
        >>> angular_update_statistics(prev, curr, dim=[0, None])
        tensor([[2., 2., 2., 1.],
                [2., 2., 2., 1.],
                [2., 2., 2., 1.],
                [4., 0., 0., 1.]], dtype=torch.float64)
    """
    check_bool("curr_is_delta", curr_is_delta)
    prev, curr, geometries = check_arguments(prev, curr, dim, chunk_numel)
    if not geometries:
        return torch.zeros(0, NUM_STATISTICS, dtype=torch.float64)
    plan = plan_for(geometries, chunk_numel, prev[0].device)
    return compute(plan, Workspace(plan), prev, curr, curr_is_delta)


def _in_range(prev: Tensor, curr: Tensor) -> tuple[Tensor, Tensor]:
    """Both tensors times one power of two that brings their largest entry near 1.

    Angles do not depend on a common scale, and a power of two changes no mantissa: this only
    keeps the float64 sums of squares finite and normal for entries near 1e+-200 (their squares
    would overflow to Inf or underflow to 0). Weights in training never need it; it costs one
    extra pass, so the monitor does not take it. DTensors are left as they are (their maximum
    would take a collective).
    """
    plain = prev.dtype == curr.dtype == torch.float64 and not is_dtensor(prev)
    if not plain or prev.numel() == 0 or prev.shape != curr.shape:
        return prev, curr  # nothing to scale (float32 cannot reach 1e+-200), or an error later
    largest = torch.maximum(prev.detach().abs().amax(), curr.detach().abs().amax()).double()
    if not bool(torch.isfinite(largest)) or float(largest) == 0.0:
        return prev, curr
    exponent = int(torch.frexp(largest).exponent)
    if -400 < exponent < 400:  # sums of up to 2^200 such squares stay finite and normal
        return prev, curr
    scale = 2.0**-exponent
    return prev.double() * scale, curr.double() * scale


def angles_from_statistics(stats: Tensor) -> Tensor:
    """Angles (radians, in ``[0, pi]``) from statistics of shape ``[..., 4]``; NaN where undefined.

    Invariant to scaling all statistics by one factor, so statistics summed over replicated ranks
    give the same angle as one rank's.
    """
    prev_sq, delta_sq, delta_dot = stats[..., PREV_SQ], stats[..., DELTA_SQ], stats[..., DELTA_DOT]
    prev_norm = prev_sq.sqrt()
    along = (prev_sq + delta_dot) / prev_norm
    orthogonal_sq = (delta_sq - delta_dot * delta_dot / prev_sq).clamp(min=0.0)
    angle = torch.atan2(orthogonal_sq.sqrt(), along)
    curr_sq = along * along + orthogonal_sq
    defined = (prev_sq > 0) & (curr_sq > 0) & torch.isfinite(curr_sq) & torch.isfinite(prev_sq)
    return torch.where(defined, angle, torch.full_like(angle, float("nan")))


def norms_from_statistics(stats: Tensor) -> tuple[Tensor, Tensor]:
    """Norms ``(|w_t|, |w_{t+1}|)`` per unit from (possibly rank-summed) statistics ``[..., 4]``."""
    coverage = stats[..., COVERAGE]
    prev_sq = stats[..., PREV_SQ] / coverage
    curr_sq = (stats[..., PREV_SQ] + 2 * stats[..., DELTA_DOT] + stats[..., DELTA_SQ]) / coverage
    return prev_sq.clamp(min=0).sqrt(), curr_sq.clamp(min=0).sqrt()


def cosine_from_statistics(stats: Tensor) -> Tensor:
    """``cos(w_t, w_{t+1} - w_t)`` per unit: with ``curr = prev + grad`` this is ``cos(w, grad)``.

    For a scale-invariant unit the loss gradient is orthogonal to the weight, so this is ~0.
    """
    denom = (stats[..., PREV_SQ] * stats[..., DELTA_SQ]).sqrt()
    return stats[..., DELTA_DOT] / denom


def num_units(tensor: Tensor, dim: int | None) -> int:
    """How many units ``tensor`` holds under the ``dim`` convention of this module."""
    if dim is None:
        return 1
    return int(tensor.shape[normalize_dim(dim, tensor.dim())])
