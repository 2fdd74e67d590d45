"""Which tensors of which optimizer the monitor reads, laid out once: the watches.

A watch holds everything about the units one optimizer updates: their tensors in order, how their
rows map to units (per channel or whole), the cached layout of the batched statistics, the step
count and the snapshot. Built once when the monitor is made; a unit moved to another param group
only changes its ``group_index``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_sdm import _messages
from lightning_sdm._engine import BatchedStatistics, check_placements, reshard_fsdp
from lightning_sdm.config import Engine
from lightning_sdm.metric import AngularUpdate
from lightning_sdm.monitor._fused import statistics_engine
from lightning_sdm.records import Granularity, Invariance
from lightning_sdm.theory._predictions import Prediction
from lightning_sdm.theory._trajectory import TrajectoryState
from lightning_sdm.units import Unit

__all__ = ["build_watches", "param_groups", "unit_tensor_rows"]


@dataclass
class _Unit:
    spec: Unit
    tensors: list[nn.Parameter]
    group_index: int
    rows: slice  # rows of this unit in the optimizer watch's statistics
    per_channel: bool  # summarised over its channels (granularity "channel", channel-invariant)
    invariance: Invariance = "unverified"
    max_abs_cosine: float = 0.0
    # Where the norm balance puts the unit on its trajectory (None before its first window).
    trajectory: TrajectoryState | None = None
    # The unit's RMS at its last window (from the measured norm: no extra sync; NaN before one).
    weight_rms: float = math.nan


@dataclass
class _OptimizerWatch:
    """Everything about the units updated by one optimizer."""

    optimizer: Optimizer
    units: list[_Unit]
    tensors: list[nn.Parameter]
    dims: list[int | None]
    row_to_unit_row: Tensor
    num_rows: int
    metric: AngularUpdate
    statistics: BatchedStatistics  # cached layout and work buffer of the per-step statistics
    tensor_statistics: BatchedStatistics  # one row per tensor: the orthogonality check's
    member_counts: Tensor  # tensors per unit row (their coverages are averaged)
    rows_are_units: bool  # one tensor row per unit row, in order: no summing needed
    steps_done: int = 0
    snapshot: list[Tensor] | None = None
    anchor: list[Tensor] | None = None  # start of the current multi-step (horizon) block
    horizon_metric: AngularUpdate = field(default_factory=AngularUpdate)  # (set by _make_watch)
    # The radial part's sums over the recent windows, [unit rows, 3] on the host, NaN for rows
    # without a measured balance (lightning_sdm.theory._balance; pooled by the monitor).
    radial: Tensor | None = None
    predictions: list[list[Prediction]] = field(default_factory=list)
    # Every optimizer step since the last window: (measured, lr per group, weight decay per
    # group), host floats read from the param groups (the trajectory integrates them).
    schedule: list[tuple[bool, tuple[float, ...], tuple[float, ...]]] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)
    measuring: bool = False
    provisional: bool = False  # snapshot taken outside the hooks (see catch_running_step)
    optimizer_index: int = 0  # position among the optimizers given to the monitor
    # Per-tensor rows of the gradient-orthogonality checks of the open window, not yet summed
    # over ranks: they travel with the window's statistics in its one collective.
    pending_checks: list[Tensor] = field(default_factory=list)

    @property
    def unit_rows(self) -> int:
        return self.units[-1].rows.stop if self.units else 0

    def free_buffers(self, keep_anchor: bool = False) -> None:
        """Drop the snapshot, the work buffer's memory and (unless ``keep_anchor``) the anchor."""
        self.snapshot = None
        if not keep_anchor:
            self.anchor = None
        self.statistics.release()
        self.tensor_statistics.release()


def param_groups(optimizer: Optimizer) -> dict[int, int]:
    """Parameter id -> index of its param group."""
    return {
        id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]
    }


def build_watches(
    module: nn.Module,
    optimizers: list[Optimizer],
    specs: Sequence[Unit],
    granularity: Granularity,
    group: Any | None,
    engine: Engine = "eager",
) -> tuple[list[_OptimizerWatch], dict[str, str]]:
    """One watch per optimizer that updates some of ``specs``; and the units none updates (why).

    Raises:
        ValueError: for a unit whose parameters the module lacks, or cannot be measured.
    """
    reshard_fsdp(module)
    skipped: dict[str, str] = {}
    named = dict(module.named_parameters())
    group_of = [param_groups(opt) for opt in optimizers]
    assigned: list[list[tuple[Unit, list[nn.Parameter], int]]] = [[] for _ in optimizers]
    for spec in specs:
        missing = [name for name in spec.params if name not in named]
        if missing:
            raise ValueError(
                f"Unit {spec.name!r} names parameters the module does not have: {missing}. "
                "Use names from `module.named_parameters()`."
            )
        tensors = [named[name] for name in spec.params]
        _check_unit_tensors(spec, tensors)
        if granularity == "channel" and spec.channel_invariant:
            _check_channel_rows(spec, tensors)
        owner = _owning_optimizer(tensors, group_of)
        if owner is None:
            spread = sum(any(id(t) in groups for t in tensors) for groups in group_of)
            # Parts in different optimizers step at different moments with their own rules:
            # the unit has no one update to measure. Said here, with the fix, and only here
            # (the param-group audit leaves such a unit to this message).
            skipped[spec.name] = (
                _messages.SPLIT_ACROSS_OPTIMIZERS if spread > 1 else "not updated by one optimizer"
            )
            continue
        assigned[owner[0]].append((spec, tensors, owner[1]))
    watches = [
        _make_watch(index, opt, entries, granularity, group, engine)
        for index, (opt, entries) in enumerate(zip(optimizers, assigned, strict=True))
        if entries
    ]
    return watches, skipped


def _check_unit_tensors(spec: Unit, tensors: list[nn.Parameter]) -> None:
    """Errors a user can fix, named, before any step (not a crash inside the optimizer hook)."""
    for name, tensor in zip(spec.params, tensors, strict=True):
        if tensor.is_complex() or not tensor.is_floating_point():
            raise ValueError(
                f"Unit {spec.name!r}: parameter {name!r} is {tensor.dtype}; angular updates are "
                "defined for real floating-point tensors. Leave it out of `params`."
            )
        check_placements(tensor, f"Unit {spec.name!r}: parameter {name!r}")
    ndim = tensors[0].dim()
    if not -max(ndim, 1) <= spec.channel_dim < max(ndim, 1):
        raise ValueError(
            f"Unit {spec.name!r}: `channel_dim`={spec.channel_dim} is out of range for its weight "
            f"of shape {tuple(tensors[0].shape)}; use a dimension in [0, {max(ndim, 1) - 1}]."
        )


def _check_channel_rows(spec: Unit, tensors: list[nn.Parameter]) -> None:
    """Per channel, a unit's other tensors (its bias) index the weight's channels on dim 0."""
    channels = tensors[0].shape[spec.channel_dim] if tensors[0].dim() else 1
    if channels % spec.channel_group:
        raise ValueError(
            f"Unit {spec.name!r}: `channel_group`={spec.channel_group} does not divide its "
            f"{channels} channels."
        )
    for name, tensor in zip(spec.params[1:], tensors[1:], strict=True):
        rows = tensor.shape[0] if tensor.dim() else 1
        if rows != channels:
            raise ValueError(
                f"Unit {spec.name!r}: with granularity='channel', {name!r} must index the "
                f"weight's {channels} channels along its first dimension (as a bias does), but "
                f"it has {rows}. Use granularity='layer', or Unit(..., channel_invariant=False)."
            )


def _owning_optimizer(
    tensors: list[nn.Parameter], group_of: list[dict[int, int]]
) -> tuple[int, int] | None:
    for index, groups in enumerate(group_of):
        found = {groups.get(id(t)) for t in tensors}
        if None not in found:  # one optimizer; split across its groups: the weight's group
            return index, groups[id(tensors[0])]  # (the usual no-decay group for biases)
    return None


def _make_watch(
    optimizer_index: int,
    optimizer: Optimizer,
    entries: list[tuple[Unit, list[nn.Parameter], int]],
    granularity: Granularity,
    group: Any | None,
    engine: Engine,
) -> _OptimizerWatch:
    units: list[_Unit] = []
    tensors: list[nn.Parameter] = []
    dims: list[int | None] = []
    row_map: list[Tensor] = []
    row = 0
    for spec, unit_tensors, group_index in entries:
        # A unit invariant only as a whole (LayerNorm) has no per-channel angle: one row.
        per_channel = granularity == "channel" and spec.channel_invariant
        width = unit_tensors[0].shape[spec.channel_dim] if per_channel else 1
        # A row per channel, or per block of `channel_group` channels (an attention head).
        channels = width // spec.channel_group if per_channel else 1
        for position, tensor in enumerate(unit_tensors):
            tensors.append(tensor)
            if per_channel:
                # The weight's output channels, and the bias's elements, map to the same rows.
                dims.append(spec.channel_dim if position == 0 else 0)
                row_map.append(row + torch.arange(width) // spec.channel_group)
            else:
                dims.append(None)
                row_map.append(torch.tensor([row]))
        rows = slice(row, row + channels)
        units.append(_Unit(spec, unit_tensors, group_index, rows, per_channel))
        row += channels
    row_to_unit_row = torch.cat(row_map)
    statistics = statistics_engine(dims, engine)
    # Whole-tensor units already have one row per tensor: the check shares their layout (the
    # check's sums, of a gradient, always run eagerly: three measured steps of a run).
    whole = all(d is None for d in dims)
    return _OptimizerWatch(
        optimizer=optimizer,
        units=units,
        tensors=tensors,
        dims=dims,
        row_to_unit_row=row_to_unit_row,
        num_rows=row,
        # Not synchronised by torchmetrics: the monitor sums a window's statistics itself, all
        # of them in one collective (SphericalMonitor._reduce_window).
        metric=AngularUpdate(process_group=group, sync_on_compute=False),
        horizon_metric=AngularUpdate(process_group=group, sync_on_compute=False),
        statistics=statistics,
        tensor_statistics=statistics if whole else BatchedStatistics([None] * len(dims)),
        member_counts=torch.bincount(row_to_unit_row, minlength=row).to(torch.float64),
        rows_are_units=torch.equal(row_to_unit_row, torch.arange(row)),
        optimizer_index=optimizer_index,
    )


def unit_tensor_rows(units: list[_Unit]) -> list[slice]:
    """Rows of the per-tensor (``dim=None``) statistics that belong to each unit."""
    slices, start = [], 0
    for unit in units:
        slices.append(slice(start, start + len(unit.tensors)))
        start += len(unit.tensors)
    return slices
