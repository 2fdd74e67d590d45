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

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PREV_SQ",
    "DELTA_SQ",
    "DELTA_DOT",
    "COVERAGE",
    "NUM_STATISTICS",
    "angular_update",
    "angular_update_statistics",
    "angles_from_statistics",
    "norms_from_statistics",
    "cosine_from_statistics",
    "num_units",
]

PREV_SQ, DELTA_SQ, DELTA_DOT, COVERAGE = 0, 1, 2, 3
NUM_STATISTICS = 4

# Elements upcast to float64 at once. Bounds the transient memory of one measurement to a few
# buffers of this size, whatever the size of the model (a larger tensor is processed on its own).
DEFAULT_CHUNK_NUMEL = 1 << 22

Dims = int | None | Sequence[int | None]


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
    stats = angular_update_statistics([prev], [curr], dim=dim)
    stats = _all_reduce_if_sharded(stats, prev)
    angles = angles_from_statistics(stats)
    return angles.reshape(()) if dim is None else angles


def angular_update_statistics(
    prev: Sequence[Tensor],
    curr: Sequence[Tensor],
    *,
    dim: Dims = None,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    curr_is_delta: bool = False,
) -> Tensor:
    """Sufficient statistics of the angular updates of many tensors, in one batched pass.

    The tensors are flattened into a few large float64 buffers (at most ``chunk_numel`` elements
    each, a single larger tensor on its own) and reduced per unit with one segmented sum per
    statistic, so the cost is a handful of kernels per chunk, not a loop of small ops per tensor.

    Args:
        prev: tensors before the update.
        curr: tensors after the update, pairwise the same shapes as ``prev``.
        dim: one value for all tensors, or one per tensor: ``None`` (tensor = one unit) or the
            dimension that indexes units (see the module docstring).
        chunk_numel: upper bound on the elements upcast to float64 at once.
        curr_is_delta: ``curr`` holds the step ``w_{t+1} - w_t`` itself (e.g. a gradient, to test
            ``<w, grad> = 0`` with :func:`cosine_from_statistics`) rather than ``w_{t+1}``.

    Returns:
        float64 tensor of shape ``[U, 4]`` with columns ``PREV_SQ``, ``DELTA_SQ``, ``DELTA_DOT``,
        ``COVERAGE``; rows are the units of the tensors in order. For a DTensor the rows cover
        the whole global tensor, but only the local shard is summed (rows held elsewhere are zero):
        sum the result over the ranks of the mesh to get the global statistics.

    Raises:
        ValueError: if the lists differ in length, a pair differs in shape, or a ``dim`` is out of
            range.

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
    prev, curr = list(prev), list(curr)
    if len(prev) != len(curr):
        raise ValueError(
            f"`prev` and `curr` must hold the same number of tensors, got {len(prev)} and "
            f"{len(curr)}."
        )
    if chunk_numel < 1:
        raise ValueError(f"`chunk_numel` must be a positive integer, got {chunk_numel}.")
    dims = _broadcast_dims(dim, len(prev))
    layouts = [_layout(p, c, d) for p, c, d in zip(prev, curr, dims, strict=True)]
    total_units = sum(layout.global_units for layout in layouts)
    if not layouts:
        return torch.zeros(0, NUM_STATISTICS, dtype=torch.float64)
    device = layouts[0].prev.device
    dtype = _accumulation_dtype(device)
    stats = torch.zeros(total_units, NUM_STATISTICS, dtype=dtype, device=device)
    unit_offset = 0
    for chunk in _chunks(layouts, chunk_numel):
        _accumulate_chunk(chunk, stats, unit_offset, curr_is_delta)
        unit_offset += sum(layout.global_units for layout in chunk)
    return stats


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
    return int(tensor.shape[_normalize_dim(dim, tensor.dim())])


# --------------------------------------------------------------------------------------------
# Implementation


@dataclass
class _Layout:
    """Where one tensor's local elements go: its unit rows and the length of each row."""

    prev: Tensor  # local values, unit-major and contiguous-able
    curr: Tensor
    global_units: int
    local_units: int
    local_unit_offset: int  # index of the first local unit among the tensor's global units
    row_length: int  # elements per local unit
    coverage: float  # fraction of each unit's elements held locally

    @property
    def numel(self) -> int:
        return self.local_units * self.row_length


def _broadcast_dims(dim: Dims, count: int) -> list[int | None]:
    if dim is None or isinstance(dim, int):
        return [dim] * count
    dims = list(dim)
    if len(dims) != count:
        raise ValueError(f"`dim` must be one value or one per tensor ({count}), got {len(dims)}.")
    return dims


def _normalize_dim(dim: int, ndim: int) -> int:
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise ValueError(f"`dim`={dim} is out of range for a tensor with {ndim} dimensions.")
    return dim % max(ndim, 1)


def _layout(prev: Tensor, curr: Tensor, dim: int | None) -> _Layout:
    if prev.shape != curr.shape:
        raise ValueError(
            "`prev` and `curr` must have the same shape, got "
            f"{tuple(prev.shape)} and {tuple(curr.shape)}."
        )
    if _is_dtensor(prev) != _is_dtensor(curr) or (
        _is_dtensor(prev)
        and (prev.placements != curr.placements or prev.device_mesh != curr.device_mesh)  # type: ignore[attr-defined]
    ):
        raise ValueError(
            "`prev` and `curr` must be laid out alike: both plain tensors, or DTensors with the "
            f"same mesh and placements; got {getattr(prev, 'placements', None)} and "
            f"{getattr(curr, 'placements', None)}."
        )
    global_shape = tuple(prev.shape)
    prev_local, curr_local, offset = _local_shard(prev), _local_shard(curr), _global_offset(prev)
    if dim is None:
        numel = max(_prod(global_shape), 1)
        local_numel = prev_local.numel()
        return _Layout(
            prev=prev_local.reshape(-1),
            curr=curr_local.reshape(-1),
            global_units=1,
            local_units=1,
            local_unit_offset=0,
            row_length=local_numel,
            coverage=local_numel / numel,
        )
    if prev.dim() == 0:
        raise ValueError("`dim` must be None for a 0-dimensional tensor.")
    d = _normalize_dim(dim, prev.dim())
    local_units = prev_local.shape[d]
    row_length = prev_local.numel() // local_units if local_units else 0
    global_row = max(_prod(global_shape) // max(global_shape[d], 1), 1)
    return _Layout(
        prev=prev_local.movedim(d, 0).reshape(-1),
        curr=curr_local.movedim(d, 0).reshape(-1),
        global_units=global_shape[d],
        local_units=local_units,
        local_unit_offset=offset[d] if offset else 0,
        row_length=row_length,
        coverage=row_length / global_row,
    )


def _prod(shape: Sequence[int]) -> int:
    result = 1
    for size in shape:
        result *= size
    return result


def _is_dtensor(tensor: Tensor) -> bool:
    return hasattr(tensor, "to_local") and hasattr(tensor, "placements")


def _local_shard(tensor: Tensor) -> Tensor:
    local = tensor.to_local() if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined]
    return local.detach()


def _global_offset(tensor: Tensor) -> tuple[int, ...] | None:
    if not _is_dtensor(tensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(
        tensor.shape,
        tensor.device_mesh,  # type: ignore[attr-defined]
        tensor.placements,  # type: ignore[attr-defined]
    )
    return tuple(int(o) for o in offset)


def _all_reduce_if_sharded(stats: Tensor, reference: Tensor) -> Tensor:
    """Sum statistics over the mesh of a DTensor (replicated ranks only rescale: harmless)."""
    if not _is_dtensor(reference):
        return stats
    import torch.distributed as dist

    mesh = reference.device_mesh  # type: ignore[attr-defined]
    for mesh_dim in range(mesh.ndim):
        dist.all_reduce(stats, group=mesh.get_group(mesh_dim))
    return stats


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; its float32 sums are the best that device offers.
    return torch.float32 if device.type == "mps" else torch.float64


def _chunks(layouts: list[_Layout], chunk_numel: int) -> list[list[_Layout]]:
    chunks: list[list[_Layout]] = []
    current: list[_Layout] = []
    size = 0
    for layout in layouts:
        if current and size + layout.numel > chunk_numel:
            chunks.append(current)
            current, size = [], 0
        current.append(layout)
        size += layout.numel
    if current:
        chunks.append(current)
    return chunks


def _accumulate_chunk(
    chunk: list[_Layout], stats: Tensor, unit_offset: int, curr_is_delta: bool
) -> None:
    """Fill the rows of ``stats`` for the tensors of one chunk (rows start at ``unit_offset``)."""
    dtype = stats.dtype
    prev = torch.cat([layout.prev for layout in chunk]).to(dtype)
    delta = torch.cat([layout.curr for layout in chunk]).to(dtype)
    if not curr_is_delta:
        delta.sub_(prev)  # exact: a float32 difference is representable in float64

    lengths = [layout.row_length for layout in chunk for _ in range(layout.local_units)]
    prev_sq = _segment_sum(prev * prev, lengths)
    delta_sq = _segment_sum(delta * delta, lengths)
    delta.mul_(prev)
    delta_dot = _segment_sum(delta, lengths)

    rows, coverage = _local_rows(chunk, unit_offset, stats.device)
    local = torch.stack([prev_sq, delta_sq, delta_dot, coverage.to(dtype)], dim=1)
    stats.index_copy_(0, rows, local)


def _local_rows(
    chunk: list[_Layout], unit_offset: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    rows: list[int] = []
    coverage: list[float] = []
    start = unit_offset
    for layout in chunk:
        first = start + layout.local_unit_offset
        rows.extend(range(first, first + layout.local_units))
        coverage.extend([layout.coverage] * layout.local_units)
        start += layout.global_units
    return (
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(coverage, dtype=torch.float64, device=device),
    )


def _segment_sum(values: Tensor, lengths: list[int]) -> Tensor:
    """Sum consecutive runs of ``values`` of the given lengths (one kernel)."""
    if not lengths:
        return values.new_zeros(0)
    first = lengths[0]
    if all(length == first for length in lengths):
        # Every unit has the same length (one tensor's rows, or whole tensors of one shape).
        return values.view(len(lengths), first).sum(dim=1)
    length_tensor = torch.tensor(lengths, dtype=torch.long, device=values.device)
    return torch.segment_reduce(values, "sum", lengths=length_tensor, unsafe=True)
