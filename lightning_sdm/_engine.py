"""The batched engine behind :mod:`lightning_sdm.functional`: layout, work buffers, kernels.

Private machinery; the public functions and the conventions are documented in
:mod:`lightning_sdm.functional`.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor

# Columns of the statistics (see lightning_sdm.functional).
PREV_SQ, DELTA_SQ, DELTA_DOT, COVERAGE = 0, 1, 2, 3
NUM_STATISTICS = 4

# Elements upcast to float64 at once: the work buffer of one measurement holds two float64 values
# per element, whatever the size of the model (a larger tensor is processed in parts).
# On CPU: 2 MiB, small enough to stay in the cache between the copies and the products of a chunk.
DEFAULT_CHUNK_NUMEL = 1 << 17
# On accelerators: 32 MiB. A GPU has no such cache to fit and pays per kernel launch instead: a
# chunk costs ~5 launches, so 2^17-element chunks made ~400 launches per 1e7 elements; 2^21 make
# ~25. The buffer never exceeds the monitored elements (two float64 rows of at most their count).
ACCELERATOR_CHUNK_NUMEL = 1 << 21


def chunk_numel_for(device: torch.device) -> int:
    """The chunk size for ``device``: cache-sized on CPU, launch-saving on accelerators.

    Example::

        >>> chunk_numel_for(torch.device("cpu")), chunk_numel_for(torch.device("cuda", 0))
        (131072, 2097152)
    """
    return DEFAULT_CHUNK_NUMEL if device.type == "cpu" else ACCELERATOR_CHUNK_NUMEL


Dims = int | None | Sequence[int | None]

# --------------------------------------------------------------------------------------------
# How one measurement runs
#
# How one measurement runs (see ``_Plan`` and ``_compute``): the units' elements are laid out,
# unit after unit, in a float64 work buffer of at most ``chunk_numel`` elements per chunk, each
# unit padded with zeros to a whole number of blocks of ``block`` elements. Per chunk: one
# ``_foreach_copy_`` upcasts ``w_t`` into the buffer, one more ``w_{t+1}``, one ``sub_`` forms
# the exact difference, and one batched matrix product of every block's ``[2, block]`` matrix
# ``(w_t, delta)`` with its transpose gives the block's three sums (``|w_t|^2``, ``|delta|^2``,
# ``<delta, w_t>``) at once, without materialising any product. Block sums are added per unit
# with one segmented sum at the end. The layout (pieces, views, index tensors) depends only on
# the tensors' shapes and is cached; the buffer is small enough to stay in the CPU's cache and is
# reused for every chunk, so a measurement allocates nothing proportional to the model.


class _Geometry(NamedTuple):
    """How one tensor's local elements map onto unit rows (hashable: part of the plan key)."""

    shape: tuple[int, ...]  # local shape
    dim: int | None  # normalised unit dimension (None: the whole tensor is one unit)
    global_units: int
    local_units: int
    local_unit_offset: int  # index of the first local unit among the tensor's global units
    row_length: int  # elements per local unit
    coverage: float  # fraction of each unit's elements held locally


class _Piece(NamedTuple):
    """A box of one tensor placed in a chunk: whole rows, or a block-aligned part of one row."""

    tensor: int
    offset: int  # first element in the chunk's buffer
    unit: int  # first local unit
    units: int
    row_stride: int  # padded row length in the buffer (a multiple of the block size)
    elements: tuple[int, int] | None  # (start, stop) inside the row, or None for whole rows
    whole: bool  # the piece is the entire tensor (its source is used as is)


class _Chunk(NamedTuple):
    pieces: tuple[_Piece, ...]
    numel: int  # elements of the buffer used, a multiple of the block size
    first_block: int
    padded: bool  # some elements of the used buffer are padding (zeroed before the copies)
    views: tuple[tuple[list[int], list[int], int], ...]  # size, stride, offset of each piece
    whole_tensors: tuple[int, ...] | None  # the tensors, when every piece is a whole tensor


# Relative cost per buffer element of the batched block products for each block size (CPU,
# measured: short blocks make many tiny matrix products). Used to choose the block size.
_BLOCK_COST = {512: 1.0, 256: 1.1, 128: 1.35, 64: 3.5, 32: 3.5, 16: 3.5, 8: 3.5}
_PLAN_CACHE_SIZE = 16


class _Plan:
    """The cached layout of one measurement: chunks, pieces and the index tensors of the rows."""

    def __init__(
        self,
        geometries: tuple[_Geometry, ...],
        chunk_numel: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.geometries = geometries
        self.device = device
        self.dtype = dtype
        self.block = _choose_block(geometries, chunk_numel)
        self.capacity = max(chunk_numel // self.block, 1) * self.block
        self.total_units = sum(g.global_units for g in geometries)
        self.chunks, row_blocks = self._pack()
        self.total_blocks = sum(row_blocks)
        self.local_rows = len(row_blocks)
        self.buffer_numel = max((chunk.numel for chunk in self.chunks), default=0)
        self.needs_flat = {
            piece.tensor for chunk in self.chunks for piece in chunk.pieces if piece.elements
        }
        counts = set(row_blocks)
        # Equal block counts per row (one block per row, or whole tensors of one shape): the
        # per-row sums are a reshape and a sum; else one segmented sum over the blocks.
        self.blocks_per_row = counts.pop() if len(counts) == 1 and 0 not in counts else None
        self.row_block_counts = torch.tensor(row_blocks, dtype=torch.long, device=device)
        rows: list[int] = []
        coverage: list[float] = []
        start = 0
        for geometry in geometries:
            first = start + geometry.local_unit_offset
            rows.extend(range(first, first + geometry.local_units))
            coverage.extend([geometry.coverage] * geometry.local_units)
            start += geometry.global_units
        self.coverage = torch.tensor(coverage, dtype=dtype, device=device).reshape(-1, 1)
        # Local rows are usually the global rows in order (plain tensors): no scatter needed.
        self.rows = (
            None
            if rows == list(range(self.total_units))
            else torch.tensor(rows, dtype=torch.long, device=device)
        )
        # Entries (0, 0), (1, 1), (0, 1) of each block's Gram matrix: |w|^2, |delta|^2, <delta, w>.
        self.gram_entries = torch.tensor([0, 3, 1], dtype=torch.long, device=device)

    def _pack(self) -> tuple[list[_Chunk], list[int]]:
        block, capacity = self.block, self.capacity
        chunks: list[_Chunk] = []
        row_blocks: list[int] = []
        pieces: list[_Piece] = []
        used = real = blocks_before = 0

        def flush() -> None:
            nonlocal pieces, used, real, blocks_before
            if pieces:
                views = tuple(_destination(self.geometries[p.tensor], p) for p in pieces)
                whole = tuple(p.tensor for p in pieces) if all(p.whole for p in pieces) else None
                chunks.append(
                    _Chunk(tuple(pieces), used, blocks_before, used != real, views, whole)
                )
                blocks_before += used // block
            pieces, used, real = [], 0, 0

        for index, geometry in enumerate(self.geometries):
            units, length = geometry.local_units, geometry.row_length
            if units == 0:
                continue
            if length == 0:
                row_blocks.extend([0] * units)
                continue
            stride = -(-length // block) * block
            if stride <= capacity:
                unit = 0
                while unit < units:
                    count = min(units - unit, (capacity - used) // stride)
                    if count == 0:
                        flush()
                        continue
                    whole = unit == 0 and count == units
                    pieces.append(_Piece(index, used, unit, count, stride, None, whole))
                    used += count * stride
                    real += count * length
                    row_blocks.extend([stride // block] * count)
                    unit += count
                continue
            for unit in range(units):  # a row longer than a chunk: block-aligned parts of it
                start = blocks_in_row = 0
                while start < length:
                    if used == capacity:
                        flush()
                    stop = min(length, start + capacity - used)
                    blocks = -(-(stop - start) // block)
                    pieces.append(_Piece(index, used, unit, 1, stride, (start, stop), False))
                    used += blocks * block
                    real += stop - start
                    blocks_in_row += blocks
                    start = stop
                row_blocks.append(blocks_in_row)
        flush()
        return chunks, row_blocks


# Devices whose storages can be freed and allocated again under live views (what FSDP does with
# its unsharded parameters: ``torch.distributed.utils._free_storage``).
_RESIZABLE_DEVICES = ("cpu", "cuda")


class Workspace:
    """The float64 work buffer of a plan and its views (destination of every piece's copy).

    The views are built once (their Python cost is ~5% of a measurement); the memory under them
    exists only inside :meth:`allocated`: between two measured steps the monitor holds its
    snapshot and nothing else. Outside that context the views must not be touched (their
    storage is empty). Devices other than CPU and CUDA keep the memory.
    """

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        numel = plan.buffer_numel
        # Uninitialised: a chunk's copies fill every element it uses (padding is zeroed first).
        self.buffer = torch.empty(2, numel, dtype=plan.dtype, device=plan.device)
        self.gram = torch.empty(plan.total_blocks, 2, 2, dtype=plan.dtype, device=plan.device)
        self.views = [self._chunk_views(chunk) for chunk in plan.chunks]
        self._bytes = [t.untyped_storage().nbytes() for t in (self.buffer, self.gram)]
        self._releasable = plan.device.type in _RESIZABLE_DEVICES  # freed after the first use

    @property
    def held_bytes(self) -> int:
        """Bytes allocated now (0 between measurements where the device allows it)."""
        return sum(t.untyped_storage().nbytes() for t in (self.buffer, self.gram))

    @property
    def peak_bytes(self) -> int:
        """Bytes allocated while a measurement runs."""
        return sum(self._bytes)

    @contextmanager
    def allocated(self) -> Iterator[Workspace]:
        """The buffer's memory for the duration of one measurement."""
        try:
            for tensor, nbytes in zip((self.buffer, self.gram), self._bytes, strict=True):
                storage = tensor.untyped_storage()
                if storage.nbytes() != nbytes:
                    storage.resize_(nbytes)
            yield self
        finally:
            self._free()

    def _free(self) -> None:
        if self._releasable:
            for tensor in (self.buffer, self.gram):
                tensor.untyped_storage().resize_(0)

    def _chunk_views(self, chunk: _Chunk) -> _ChunkViews:
        buffer, numel = self.buffer, self.plan.buffer_numel
        # One strided view per piece and buffer row, straight from the plan's geometry.
        prev_views = [
            buffer.as_strided(size, stride, offset) for size, stride, offset in chunk.views
        ]
        delta_views = [
            buffer.as_strided(size, stride, numel + offset) for size, stride, offset in chunk.views
        ]
        used = buffer[:, : chunk.numel]
        blocks = chunk.numel // self.plan.block
        # [blocks, 2, block]: row 0 of each block matrix in buffer row 0 (w_t), row 1 in row 1.
        matrices = used.view(2, blocks, self.plan.block).transpose(0, 1)
        gram = self.gram[chunk.first_block : chunk.first_block + blocks]
        return _ChunkViews(
            prev_views, delta_views, used, used[0], used[1], matrices, matrices.mT, gram
        )


class _ChunkViews(NamedTuple):
    prev: list[Tensor]  # destination of each piece's w_t
    delta: list[Tensor]  # destination of each piece's w_{t+1}, then of the difference
    used: Tensor  # [2, numel]: both rows of the part of the buffer this chunk uses
    used_prev: Tensor
    used_delta: Tensor
    matrices: Tensor  # [blocks, 2, block]
    matrices_t: Tensor  # [blocks, block, 2]
    gram: Tensor  # [blocks, 2, 2]: this chunk's rows of the workspace's Gram matrices


def _piece_sources(
    plan: _Plan, chunk: _Chunk, tensors: Sequence[Tensor], flat: dict[int, Tensor]
) -> list[Tensor]:
    """The parts of ``tensors`` that the pieces of ``chunk`` copy (views, no copies)."""
    if chunk.whole_tensors is not None:  # the usual case: whole tensors, used as they are
        return [tensors[index] for index in chunk.whole_tensors]
    result = []
    for piece in chunk.pieces:
        tensor = tensors[piece.tensor]
        if piece.whole:
            result.append(tensor)
            continue
        geometry = plan.geometries[piece.tensor]
        if piece.elements is None:
            assert geometry.dim is not None
            result.append(tensor.narrow(geometry.dim, piece.unit, piece.units))
            continue
        start = piece.unit * geometry.row_length
        result.append(flat[piece.tensor][start + piece.elements[0] : start + piece.elements[1]])
    return result


def _destination(geometry: _Geometry, piece: _Piece) -> tuple[list[int], list[int], int]:
    """Size, stride and offset in the buffer of the view a piece is copied into."""
    if piece.elements is not None:
        return [piece.elements[1] - piece.elements[0]], [1], piece.offset
    if geometry.dim is None:
        return list(geometry.shape), _contiguous_strides(geometry.shape), piece.offset
    # Units of the piece one after the other, ``row_stride`` apart; inside a unit the other
    # dimensions in row-major order. The view has the shape of the source's units.
    d = geometry.dim
    rest = [size for axis, size in enumerate(geometry.shape) if axis != d]
    rest_strides = _contiguous_strides(rest)
    size = list(geometry.shape)
    size[d] = piece.units
    stride = [*rest_strides[:d], piece.row_stride, *rest_strides[d:]]
    return size, stride, piece.offset


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


def _choose_block(geometries: Sequence[_Geometry], chunk_numel: int) -> int:
    """Block size with the least estimated cost (padding against short matrix products)."""
    best, best_cost = 1, math.inf
    for block, cost in _BLOCK_COST.items():
        if block > chunk_numel:
            continue
        padded = sum(g.local_units * -(-g.row_length // block) * block for g in geometries)
        if padded * cost < best_cost:
            best, best_cost = block, padded * cost
    return best


_plans: OrderedDict[tuple[object, ...], _Plan] = OrderedDict()


def plan_for(
    geometries: tuple[_Geometry, ...], chunk_numel: int | None, device: torch.device
) -> _Plan:
    """The cached plan; ``chunk_numel=None`` takes the device's (:func:`chunk_numel_for`)."""
    chunk_numel = chunk_numel_for(device) if chunk_numel is None else chunk_numel
    key = (geometries, chunk_numel, device)
    plan = _plans.get(key)
    if plan is None:
        plan = _Plan(geometries, chunk_numel, device, _accumulation_dtype(device))
        _plans[key] = plan
        if len(_plans) > _PLAN_CACHE_SIZE:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(key)
    return plan


def check_arguments(
    prev: Sequence[Tensor], curr: Sequence[Tensor], dim: Dims, chunk_numel: int | None
) -> tuple[list[Tensor], list[Tensor], tuple[_Geometry, ...]]:
    """Validate the inputs; return the local tensors and their geometries."""
    lists = []
    for name, value in (("prev", prev), ("curr", curr)):
        # Any iterable of tensors (model.parameters(), a ParameterList); not one tensor, whose
        # rows would be read as tensors.
        items = None
        if not isinstance(value, (torch.Tensor, str)) and isinstance(value, Iterable):
            items = list(value)
        if items is None or not all(isinstance(t, torch.Tensor) for t in items):
            raise ValueError(
                f"`{name}` must be a sequence of tensors (one entry per tensor), got "
                f"{type(value).__name__}: pass [tensor], or use angular_update(prev, curr) for "
                "a single tensor."
            )
        lists.append(items)
    prev, curr = lists
    if len(prev) != len(curr):
        raise ValueError(
            f"`prev` and `curr` must hold the same number of tensors, got {len(prev)} and "
            f"{len(curr)}."
        )
    if chunk_numel is not None and (
        isinstance(chunk_numel, bool) or not isinstance(chunk_numel, int) or chunk_numel < 1
    ):
        raise ValueError(
            f"`chunk_numel` must be a positive integer or None (per device), got {chunk_numel!r}."
        )
    dims = _broadcast_dims(dim, len(prev))
    geometries = tuple(_geometry(p, c, d) for p, c, d in zip(prev, curr, dims, strict=True))
    if any(is_dtensor(p) for p in prev):
        prev, curr = [local_shard(p) for p in prev], [local_shard(c) for c in curr]
    return prev, curr, geometries


def compute(
    plan: _Plan,
    workspace: Workspace,
    prev: Sequence[Tensor],
    curr: Sequence[Tensor],
    curr_is_delta: bool,
) -> Tensor:
    """The ``[units, 4]`` statistics of plain (local) tensors laid out as ``plan`` says."""
    with torch.no_grad(), workspace.allocated():
        flat_prev = {t: _unit_major(prev[t], plan.geometries[t]) for t in plan.needs_flat}
        flat_curr = {t: _unit_major(curr[t], plan.geometries[t]) for t in plan.needs_flat}
        for chunk, views in zip(plan.chunks, workspace.views, strict=True):
            if chunk.padded:
                views.used.zero_()
            torch._foreach_copy_(views.prev, _piece_sources(plan, chunk, prev, flat_prev))
            torch._foreach_copy_(views.delta, _piece_sources(plan, chunk, curr, flat_curr))
            if not curr_is_delta:
                # Exact: the difference of two float32 values is representable in float64.
                views.used_delta.sub_(views.used_prev)
            torch.bmm(views.matrices, views.matrices_t, out=views.gram)
        block_sums = workspace.gram.view(-1, 4).index_select(1, plan.gram_entries)
    if plan.blocks_per_row is not None:
        sums = block_sums.view(plan.local_rows, plan.blocks_per_row, 3).sum(dim=1)
    elif plan.total_blocks:
        sums = torch.segment_reduce(
            block_sums, "sum", lengths=plan.row_block_counts, axis=0, unsafe=True
        )
    else:
        sums = block_sums.new_zeros(plan.local_rows, 3)
    local = torch.cat([sums, plan.coverage], dim=1)
    if plan.rows is None:
        return local
    stats = local.new_zeros(plan.total_units, NUM_STATISTICS)
    return stats.index_copy_(0, plan.rows, local)


def _unit_major(tensor: Tensor, geometry: _Geometry) -> Tensor:
    """The tensor's elements, unit after unit, as one flat tensor (a view when contiguous)."""
    if geometry.dim is not None and geometry.dim != 0:
        tensor = tensor.movedim(geometry.dim, 0)
    return tensor.reshape(-1)


class BatchedStatistics:
    """Statistics of a fixed list of tensors, computed again and again (the monitor's hot path).

    Keeps the plan and the work buffer between calls; :meth:`release` frees the buffer. A call
    checks only that the shapes and the device are unchanged before reusing them.
    ``chunk_numel=None`` (the default) sizes the chunks for the tensors' device.
    """

    def __init__(self, dims: Sequence[int | None], chunk_numel: int | None = None):
        self.dims = list(dims)
        self.chunk_numel = chunk_numel
        self._plan: _Plan | None = None
        self._workspace: Workspace | None = None
        self._shapes: list[torch.Size] | None = None  # local shapes, for DTensors
        self._sharded = False  # the tensors include DTensors (their local tensors are read)
        #: Seconds spent compiling: none here (see lightning_sdm.monitor._fused).
        self.compile_seconds = 0.0

    def __call__(
        self,
        prev: Sequence[Tensor],
        curr: Sequence[Tensor],
        *,
        curr_is_delta: bool = False,
    ) -> Tensor:
        """The ``[units, 4]`` statistics of one step (see :mod:`lightning_sdm.functional`)."""
        plan = self._plan
        # DTensors: a geometry depends on the placements, fixed for the monitor's tensors, and
        # on the local shapes, checked here like a plain tensor's (the full check costs ~0.2 ms
        # per DTensor: 70 ms per step for 200 of them).
        sources = (prev, curr)
        if self._sharded:
            prev, curr = [_local(t) for t in prev], [_local(t) for t in curr]
        if (
            plan is None
            or not curr
            or curr[0].device != plan.device
            or [t.shape for t in curr] != self._shapes
            or [t.shape for t in prev] != self._shapes
        ):
            prev, curr, geometries = check_arguments(*sources, self.dims, self.chunk_numel)
            if not geometries:
                return torch.zeros(0, NUM_STATISTICS, dtype=torch.float64)
            plan = plan_for(geometries, self.chunk_numel, curr[0].device)
            if plan is not self._plan:
                self._plan, self._workspace = plan, None
            self._sharded = any(is_dtensor(t) for t in sources[1])
            self._shapes = [t.shape for t in curr]
        if self._workspace is None:
            self._workspace = Workspace(plan)
        return compute(plan, self._workspace, prev, curr, curr_is_delta)

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the work buffers held now (between measurements: 0 on CPU and CUDA)."""
        return 0 if self._workspace is None else self._workspace.held_bytes

    @property
    def peak_workspace_bytes(self) -> int:
        """Bytes of the work buffers while a measurement runs."""
        return 0 if self._workspace is None else self._workspace.peak_bytes

    def __getstate__(self) -> dict[str, object]:
        # The work buffer's views do not survive pickling as views (torch.save, deepcopy,
        # spawned processes): the copy builds its own buffer at its first call.
        return {**self.__dict__, "_workspace": None}

    def release(self) -> None:
        """Free the work buffer's memory (the plan, a few index tensors, is kept).

        On CPU and CUDA the buffer holds no memory between calls anyway; its views are kept, so
        that the next window does not build them again.
        """
        if self._workspace is not None and self._workspace.held_bytes:
            self._workspace = None


def _broadcast_dims(dim: Dims, count: int) -> list[int | None]:
    if dim is None or _is_index(dim):
        return [None if dim is None else int(dim)] * count  # type: ignore[arg-type]
    if not isinstance(dim, (list, tuple)) or not all(d is None or _is_index(d) for d in dim):
        raise ValueError(
            f"`dim` must be None, an int, or one of them per tensor, got {dim!r} (a bool is not "
            "a dimension)."
        )
    dims = [None if d is None else int(d) for d in dim]
    if len(dims) != count:
        raise ValueError(f"`dim` must be one value or one per tensor ({count}), got {len(dims)}.")
    return dims


def _is_index(value: Any) -> bool:
    """An integer, numpy's included; not a bool (``dim=True`` is a mistake, not dimension 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def normalize_dim(dim: int, ndim: int) -> int:
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise ValueError(f"`dim`={dim} is out of range for a tensor with {ndim} dimensions.")
    return dim % max(ndim, 1)


def _geometry(prev: Tensor, curr: Tensor, dim: int | None) -> _Geometry:
    for tensor in (prev, curr):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"`prev` and `curr` must hold tensors, got {type(tensor).__name__}.")
        if tensor.is_complex() or not tensor.is_floating_point():
            raise ValueError(
                f"angular updates are defined for real floating-point tensors, got {tensor.dtype} "
                "(a complex tensor would silently lose its imaginary part)."
            )
    if prev.shape != curr.shape:
        raise ValueError(
            "`prev` and `curr` must have the same shape, got "
            f"{tuple(prev.shape)} and {tuple(curr.shape)}."
        )
    if is_dtensor(prev) != is_dtensor(curr) or (
        is_dtensor(prev)
        and (prev.placements != curr.placements or prev.device_mesh != curr.device_mesh)  # type: ignore[attr-defined]
    ):
        raise ValueError(
            "`prev` and `curr` must be laid out alike: both plain tensors, or DTensors with the "
            f"same mesh and placements; got {getattr(prev, 'placements', None)} and "
            f"{getattr(curr, 'placements', None)}."
        )
    global_shape = tuple(prev.shape)
    local_shape = tuple(local_shard(prev).shape) if is_dtensor(prev) else global_shape
    # A replica of another rank's shard (Replicate() on a mesh dimension, away from its first
    # coordinate) adds nothing: each element is summed once over the mesh, exactly.
    holds = not is_dtensor(prev) or holds_for_sum(prev)
    if dim is None:
        numel = max(_prod(global_shape), 1)
        local_numel = _prod(local_shape)
        if not holds:
            return _Geometry(local_shape, None, 1, 0, 0, local_numel, 0.0)
        return _Geometry(local_shape, None, 1, 1, 0, local_numel, local_numel / numel)
    if prev.dim() == 0:
        raise ValueError("`dim` must be None for a 0-dimensional tensor.")
    d = normalize_dim(dim, prev.dim())
    offset = _global_offset(prev)
    local_units = local_shape[d] if holds else 0
    row_length = _prod(local_shape) // local_units if local_units else 0
    global_row = max(_prod(global_shape) // max(global_shape[d], 1), 1)
    return _Geometry(
        shape=local_shape,
        dim=d,
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


def is_dtensor(tensor: Tensor) -> bool:
    return hasattr(tensor, "to_local") and hasattr(tensor, "placements")


def _local(tensor: Tensor) -> Tensor:
    """A DTensor's local tensor without ``to_local()``'s autograd node (for reading only)."""
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, Tensor) else local_shard(tensor)


def local_shard(tensor: Tensor) -> Tensor:
    local = tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]
    return local.detach()


def check_placements(tensor: Tensor, where: str) -> None:
    """Refuse a DTensor with a ``Partial`` placement (its local values are partial sums).

    Raises:
        ValueError: naming ``where`` and the fix.
    """
    placements = getattr(tensor, "placements", ())
    if any(placement.is_partial() for placement in placements):
        from lightning_sdm import _messages

        raise ValueError(_messages.partial_placement(where, str(tuple(placements))))


def holds_for_sum(tensor: Tensor) -> bool:
    """Whether this rank's shard of a DTensor counts in the sum over ranks.

    Generic over placements: ``Shard(d)`` (``_StridedShard`` included) splits the elements, so
    every shard counts; ``Replicate()`` copies them, so only the ranks at coordinate 0 of that
    mesh dimension count. The local shard is one box of the global tensor for any combination
    (DCP's contract; :func:`_global_offset` places it). A rank outside the mesh holds nothing.
    """
    check_placements(tensor, "a monitored tensor")
    coordinate = tensor.device_mesh.get_coordinate()  # type: ignore[attr-defined]
    if coordinate is None:
        return False
    placements = tensor.placements  # type: ignore[attr-defined]
    return all(c == 0 for c, p in zip(coordinate, placements, strict=True) if p.is_replicate())


def _global_offset(tensor: Tensor) -> tuple[int, ...] | None:
    if not is_dtensor(tensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(
        tensor.shape,
        tensor.device_mesh,  # type: ignore[attr-defined]
        tensor.placements,  # type: ignore[attr-defined]
    )
    return tuple(int(o) for o in offset)


def all_reduce_if_sharded(stats: Tensor, reference: Tensor) -> Tensor:
    """Sum statistics over the mesh of a DTensor (replicas add zeros: :func:`holds_for_sum`)."""
    if not is_dtensor(reference):
        return stats
    import torch.distributed as dist

    mesh = reference.device_mesh  # type: ignore[attr-defined]
    for mesh_dim in range(mesh.ndim):
        dist.all_reduce(stats, group=mesh.get_group(mesh_dim))
    return stats


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; its float32 sums are the best that device offers.
    return torch.float32 if device.type == "mps" else torch.float64


def copy_into(buffers: list[Tensor] | None, sources: list[Tensor]) -> list[Tensor]:
    """Copy ``sources`` into reusable ``buffers`` (allocated on first use)."""
    if buffers is None:
        return [source.clone() for source in sources]
    # DTensor has no sharding rule for _foreach_copy_: copy the local shards (views) instead.
    torch._foreach_copy_([local_shard(b) for b in buffers], [local_shard(s) for s in sources])
    return buffers


def reshard_fsdp(module: torch.nn.Module) -> None:
    """Put FSDP2 modules back in their sharded state before reading their parameters.

    Between forward and backward FSDP2 keeps the root module's unsharded parameters registered;
    ``named_parameters()`` would then return tensors the optimizer does not hold. Backward
    gathers them again, so resharding here changes nothing for training.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return
    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()
