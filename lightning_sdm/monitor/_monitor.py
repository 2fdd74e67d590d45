"""The measuring core: angular updates of chosen units at real optimizer steps, Trainer or not.

:class:`SphericalMonitor` hooks into optimizers (``register_step_pre_hook`` /
``register_step_post_hook``): it snapshots the monitored weights just before a step that is due to
be measured, and accumulates the step's sufficient statistics just after it. Steps the optimizer
does not take (a grad-scaler skip under AMP) fire neither hook and are never measured. Every
``every_n_steps`` optimizer steps it closes a window covering the last ``window`` steps and makes a
:class:`~lightning_sdm.records.UnitWindow` per unit available from
:meth:`SphericalMonitor.pop_windows`.

The Lightning callback is an adapter over this class; Fabric and plain PyTorch loops use it
directly (see ``examples/``). The settings live in :class:`~lightning_sdm.config.MonitorConfig`,
the units are :class:`~lightning_sdm.units.Unit`, and the prediction of every window comes from
:mod:`lightning_sdm.theory`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_sdm._compile import outside_compile
from lightning_sdm._engine import (
    COVERAGE,
    copy_into,
    is_dtensor,
    local_shard,
)
from lightning_sdm.config import MonitorConfig
from lightning_sdm.functional import cosine_from_statistics
from lightning_sdm.monitor._cost import CostMeter
from lightning_sdm.monitor._state import check_monitor_state
from lightning_sdm.monitor._sync import (
    RanksOutOfStepError,
    all_agree,
    monitor_group,
    reduce_window,
    run_collective,
)
from lightning_sdm.monitor._watch import (
    _OptimizerWatch,
    _Unit,
    build_watches,
    param_groups,
    unit_tensor_rows,
)
from lightning_sdm.records import CHANNEL_SUMMARIES, Granularity, Invariance, UnitWindow
from lightning_sdm.theory._balance import (
    balance_angle,
    balance_kind,
    decay_lost_to_rounding,
    decoupled_decay,
    window_sums,
)
from lightning_sdm.theory._predictions import (
    Prediction,
    equilibrium_norm_exponent,
    explain_equilibrium,
    for_shape,
    relaxation_time,
)
from lightning_sdm.theory._trajectory import TrajectoryState, observe, trajectory_constants
from lightning_sdm.units import Unit

__all__ = ["SphericalMonitor"]


class _HasUnits(Protocol):
    """An :class:`~lightning_sdm.invariance.InvarianceReport` (or anything with ``units``)."""

    @property
    def units(self) -> Sequence[Unit]: ...


class SphericalMonitor:
    """Measure the angular updates of scale-invariant units at the optimizer's real steps.

    Args:
        module: the model owning the parameters named in ``units``.
        optimizers: the optimizer(s) updating them. A unit's parameters must all belong to one
            optimizer param group; units whose parameters no optimizer updates are skipped (see
            :attr:`skipped`).
        units: the units to monitor (:class:`~lightning_sdm.units.Unit`), or an
            :class:`~lightning_sdm.invariance.InvarianceReport` (its units).
        config: the settings (:class:`~lightning_sdm.config.MonitorConfig`); or pass its fields
            as keyword arguments (``every_n_steps=10, window=5``).
        sync_on_compute: reduce statistics over processes when a window closes (needed for
            sharded parameters; harmless for replicated ones).
        **settings: fields of :class:`~lightning_sdm.config.MonitorConfig`, when ``config`` is
            not given.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_sdm import SphericalMonitor, Unit
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        >>> monitor = SphericalMonitor(model, opt, [Unit("0.weight", ("0.weight", "0.bias"))],
        ...                            every_n_steps=5, window=5).attach()
        >>> for _ in range(10):
        ...     opt.zero_grad()
        ...     model(torch.randn(32, 8)).square().mean().backward()
        ...     opt.step()
        >>> [(w.unit, w.optimizer_step, w.steps) for w in monitor.pop_windows()]
        [('0.weight', 5, 5), ('0.weight', 10, 5)]
        >>> monitor.detach()
    """

    def __init__(
        self,
        module: nn.Module,
        optimizers: Optimizer | Sequence[Optimizer],
        units: Sequence[Unit] | _HasUnits,
        config: MonitorConfig | None = None,
        *,
        sync_on_compute: bool = True,
        **settings: Any,
    ) -> None:
        if config is not None and settings:
            raise ValueError(
                f"Pass either `config` or its fields ({', '.join(settings)}), not both."
            )
        if config is not None and not isinstance(config, MonitorConfig):
            raise ValueError(f"`config` must be a MonitorConfig, got {type(config).__name__}.")
        if not isinstance(module, nn.Module):
            raise ValueError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
        config = config if config is not None else MonitorConfig(**settings)
        if not config.resolved:
            raise ValueError("`every_n_steps` must be set (None is resolved by the callback).")
        if isinstance(units, (str, Unit)) or not (
            hasattr(units, "units") or isinstance(units, Iterable)
        ):
            raise ValueError(
                "`units` must be a list of lightning_sdm.Unit or an InvarianceReport, got "
                f"{type(units).__name__}."
            )
        given: Any = units.units if hasattr(units, "units") else units
        unit_list: list[Unit] = list(given)
        bad = [u for u in unit_list if not isinstance(u, Unit)]
        if bad:
            raise ValueError(
                f"`units` must hold lightning_sdm.Unit objects, got {type(bad[0]).__name__}."
            )
        _check_distinct(unit_list)
        self.config = config
        self.sync_on_compute = sync_on_compute
        # Units moved to another param group while monitored: name -> (old, new) group index.
        self.moved: dict[str, tuple[int, int]] = {}
        self._windows: list[UnitWindow] = []
        self._measured_steps = 0
        # The monitor's own process group (see lightning_sdm.monitor); None in one process.
        self._group = monitor_group(config.sync_timeout)
        self.stopped: str | None = None  # why monitoring stopped (ranks out of step), if it did
        self.cost = CostMeter()  # hook time against step time (see lightning_sdm.monitor)
        iterable = isinstance(optimizers, Iterable) and not isinstance(optimizers, str)
        optimizer_list = (
            [optimizers]
            if isinstance(optimizers, Optimizer)
            else list(optimizers)
            if iterable
            else None
        )
        if optimizer_list is None or not all(isinstance(o, Optimizer) for o in optimizer_list):
            raise ValueError(
                "`optimizers` must be a torch.optim.Optimizer or a list of them, got "
                f"{type(optimizers).__name__}."
            )
        optimizer_list = list(optimizer_list)
        self._watches, self.skipped = build_watches(
            module, optimizer_list, unit_list, config.granularity, self._group, config.engine
        )

    # ---------------------------------------------------------------- public API

    @property
    def granularity(self) -> Granularity:
        """``"layer"`` or ``"channel"`` (from :attr:`config`)."""
        return self.config.granularity

    @property
    def units(self) -> list[str]:
        """Names of the monitored units, in order."""
        return [unit.spec.name for watch in self._watches for unit in watch.units]

    @property
    def unit_specs(self) -> list[Unit]:
        """The monitored units as given (names and parameters), in order."""
        return [unit.spec for watch in self._watches for unit in watch.units]

    @property
    def channel_units(self) -> list[str]:
        """The units summarised per channel (``granularity="channel"`` and channel-invariant)."""
        return [u.spec.name for watch in self._watches for u in watch.units if u.per_channel]

    @property
    def invariance(self) -> dict[str, tuple[Invariance, float]]:
        """Per unit: ``("verified" | "violated" | "unverified", max |cos(w, grad)| seen)``."""
        return {
            unit.spec.name: (unit.invariance, unit.max_abs_cosine)
            for watch in self._watches
            for unit in watch.units
        }

    def predictions(self) -> dict[str, Prediction]:
        """The theory's current prediction for each unit's param group."""
        result = {}
        for watch in self._watches:
            groups = explain_equilibrium(watch.optimizer)
            for unit in watch.units:
                # The last window's RMS, where there was one: Adafactor's shrinking weight then
                # says in how many steps it reaches the eps2 floor.
                rms = unit.weight_rms if math.isfinite(unit.weight_rms) else None
                result[unit.spec.name] = for_shape(
                    groups[unit.group_index], unit.tensors[0].shape, weight_rms=rms
                )
        return result

    def parameter_groups(self) -> dict[str, tuple[Optimizer, int]]:
        """Per unit: the optimizer and the index of the param group that update it."""
        return {
            unit.spec.name: (watch.optimizer, unit.group_index)
            for watch in self._watches
            for unit in watch.units
        }

    def unit_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Per unit: its parameters (the weight, and the bias before the norm if any)."""
        return {unit.spec.name: unit.tensors for watch in self._watches for unit in watch.units}

    def attach(self) -> SphericalMonitor:
        """Register the optimizer step hooks; returns ``self``."""
        for watch in self._watches:
            if watch.handles:
                continue
            watch.handles = [
                watch.optimizer.register_step_pre_hook(_bind(self._before_step, watch)),
                watch.optimizer.register_step_post_hook(_bind(self._after_step, watch)),
            ]
        return self

    def replaced_by(self, optimizers: Sequence[Optimizer]) -> bool:
        """Whether a watched optimizer is no longer among ``optimizers`` (it was replaced)."""
        current = {id(optimizer) for optimizer in optimizers}
        return any(id(watch.optimizer) not in current for watch in self._watches)

    def catch_running_step(self) -> None:
        """Measure a step whose pre-hook ran before :meth:`attach` (attached from its closure).

        Lightning's automatic optimization runs the forward and backward inside
        ``optimizer.step(closure)``, after the step pre-hooks: a monitor attached there would
        miss that step. The weights cannot have changed since the pre-hook, so a snapshot now is
        the one the hook would have taken. It is provisional: if no step was running (gradient
        accumulation, manual optimization), the next pre-hook replaces it.
        """
        for watch in self._watches:
            if watch.handles and not watch.measuring and self.config.is_measured(watch.steps_done):
                self._before_step(watch)
                watch.provisional = True

    def detach(self) -> None:
        """Remove the hooks and free any snapshot."""
        for watch in self._watches:
            for handle in watch.handles:
                handle.remove()
            watch.handles = []
            watch.free_buffers(keep_anchor=True)  # the open horizon block, for a checkpoint
            if watch.provisional:  # a snapshot for a step that never ran
                watch.predictions.pop()
                watch.provisional = watch.measuring = False

    def pop_windows(self, global_step: int | None = None) -> list[UnitWindow]:
        """Windows closed since the last call, oldest first.

        Args:
            global_step: the caller's global clock, stamped on the windows (the callback passes
                ``trainer.global_step``); by default the monitor's count of the steps of all its
                optimizers when each window closed.
        """
        windows, self._windows = self._windows, []
        if global_step is not None:
            windows = [replace(window, global_step=global_step) for window in windows]
        return windows

    def state_dict(self) -> dict[str, Any]:
        """Step counters and the open window, so that a resumed run measures the same values.

        Plain Python and tensor types only (checkpoints load with ``weights_only=True``).
        """
        return {
            "optimizer_indices": [watch.optimizer_index for watch in self._watches],
            "steps_done": [watch.steps_done for watch in self._watches],
            "window_statistics": [watch.metric.step_statistics.cpu() for watch in self._watches],
            "horizon_statistics": [
                watch.horizon_metric.step_statistics.cpu() for watch in self._watches
            ],
            "anchors": [_saved_anchor(watch) for watch in self._watches],
            "window_predictions": [
                [
                    [(p.angular_update, dict(p.hyperparameters), p.family) for p in step]
                    for step in w.predictions
                ]
                for w in self._watches
            ],
            "window_schedules": [
                [[measured, list(lrs), list(wds)] for measured, lrs, wds in w.schedule]
                for w in self._watches
            ],
            "trajectories": {
                unit.spec.name: unit.trajectory.as_list()
                for watch in self._watches
                for unit in watch.units
                if unit.trajectory is not None
            },
            "radial": {
                unit.spec.name: watch.radial[unit.rows].tolist()
                for watch in self._watches
                for unit in watch.units
                if watch.radial is not None
            },
            "verified_steps": self._measured_steps,
            "invariance": {
                unit.spec.name: (unit.invariance, unit.max_abs_cosine)
                for watch in self._watches
                for unit in watch.units
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (missing entries are left at their start).

        Entries are matched by optimizer (``optimizer_indices``), so a monitor with more units
        (a network found later) takes over the counters of the one it replaces; an open window
        whose units changed restarts.

        Raises:
            ValueError: for a damaged state (checked whole before any of it is applied).
        """
        check_monitor_state(state)
        saved_indices = list(state.get("optimizer_indices", range(len(self._watches))))
        for watch in self._watches:
            watch.metric.reset()
            watch.horizon_metric.reset()
            watch.free_buffers()
            watch.predictions = []
            watch.pending_checks = []
            watch.schedule = []
            watch.measuring = watch.provisional = False
            if watch.optimizer_index not in saved_indices:
                continue
            index = saved_indices.index(watch.optimizer_index)
            if index < len(state.get("steps_done", [])):
                watch.steps_done = int(state["steps_done"][index])
            schedules = state.get("window_schedules", [])
            if index < len(schedules):
                watch.schedule = [
                    (bool(m), tuple(map(float, lrs)), tuple(map(float, wds)))
                    for m, lrs, wds in schedules[index]
                ]
            statistics = state.get("window_statistics", [])
            predictions = state.get("window_predictions", [])
            if index >= len(statistics) or not statistics[index].numel():
                continue
            if statistics[index].shape[1] != watch.unit_rows or index >= len(predictions):
                continue  # other units than when saved: this window restarts
            for step in statistics[index]:
                watch.metric.update(statistics=step)
            watch.predictions = [
                [_restored_prediction(*saved) for saved in step] for step in predictions[index]
            ]
            self._restore_horizon(watch, state, index)
        self._measured_steps = int(state.get("verified_steps", self._measured_steps))
        trajectories = state.get("trajectories", {})
        radial = state.get("radial", {})
        for watch in self._watches:
            pool = torch.full((watch.num_rows, 3), math.nan, dtype=torch.float64)
            for unit in watch.units:
                saved_path = trajectories.get(unit.spec.name)
                unit.trajectory = None if saved_path is None else TrajectoryState(*saved_path)
                saved_sums = radial.get(unit.spec.name)
                if saved_sums and len(saved_sums) == unit.rows.stop - unit.rows.start:
                    pool[unit.rows] = torch.tensor(saved_sums, dtype=torch.float64)
                if unit.spec.name in state.get("invariance", {}):
                    status, cosine = state["invariance"][unit.spec.name]
                    unit.invariance, unit.max_abs_cosine = status, float(cosine)
            watch.radial = pool if bool(torch.isfinite(pool).any()) else None

    def _restore_horizon(
        self, watch: _OptimizerWatch, state: Mapping[str, Any], index: int
    ) -> None:
        """The open multi-step block: its statistics and the weights at its start."""
        horizon_statistics = state.get("horizon_statistics", [])
        if index < len(horizon_statistics):
            for step in horizon_statistics[index]:
                watch.horizon_metric.update(statistics=step)
        anchors = state.get("anchors", [])
        saved = anchors[index] if index < len(anchors) else None
        shapes = [tuple(local_shard(t).shape) for t in watch.tensors]
        if saved is None or [tuple(a.shape) for a in saved] != shapes:
            return
        with torch.no_grad():
            watch.anchor = copy_into(None, [t.detach() for t in watch.tensors])
            for buffer, value in zip(watch.anchor, saved, strict=True):
                local_shard(buffer).copy_(value)

    # ---------------------------------------------------------------- hooks
    # The hooks run on every optimizer step. On a step that is not measured they only read and
    # increment a counter: no tensor op, no allocation, no host-device synchronisation.

    def _before_step(self, watch: _OptimizerWatch) -> None:
        if self.stopped is not None:
            return
        self.cost.step(watch is self._watches[0])  # pre-hook to pre-hook: one whole period
        if watch.provisional:  # the real pre-hook: the snapshot taken for it is replaced
            watch.provisional = False
            watch.predictions.pop()
        watch.measuring = self.config.is_measured(watch.steps_done)
        watch.schedule.append(_schedule_entry(watch.optimizer, watch.measuring))
        if watch.measuring:
            start = self.cost.clock()
            self._take_snapshot(watch)
            self.cost.add(self.cost.clock() - start, measured=False)

    def _after_step(self, watch: _OptimizerWatch) -> None:
        if self.stopped is not None:
            return
        watch.provisional = False
        start, measured = self.cost.clock(), watch.measuring and watch.snapshot is not None
        try:
            if measured:
                self._measure(watch)
            watch.measuring = False
            watch.steps_done += 1
            every = self.config.every_n_steps
            assert every is not None
            closes = watch.steps_done % every == 0 and bool(watch.predictions)
            if closes:
                where = f"the window closing at optimizer step {watch.steps_done}"
                with torch.no_grad():
                    self._collective(lambda: self._close_window(watch, where), where)
            if measured or closes:
                self.cost.add(self.cost.clock() - start, measured)
            if closes and watch is self._watches[0]:
                self.cost.window_closed()
        except RanksOutOfStepError as err:
            self._stop(err)

    def agree(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (``flag`` itself in one process).

        On the monitor's own process group, so that a decision taken at a window's end can
        only meet the other ranks' decision (see :mod:`lightning_sdm.monitor`); ``False`` once
        monitoring has stopped, or if the ranks cannot agree in time (monitoring stops then).
        """
        if self.stopped is not None or self._group is None:
            return self.stopped is None and bool(flag)
        # On the weights' device: an NCCL group reduces CUDA tensors only.
        device = next((w.tensors[0].device for w in self._watches if w.tensors), None)
        try:
            return self._collective(
                lambda: all_agree(flag, self._group, device), "an equilibrium decision"
            )
        except RanksOutOfStepError as err:
            self._stop(err)
            return False

    def _collective(self, fn: Callable[[], Any], where: str) -> Any:
        if self._group is None:
            return fn()
        return run_collective(fn, where, self.config.sync_timeout)

    def _stop(self, err: RanksOutOfStepError) -> None:
        """Stop measuring on this rank (hooks stay registered, as no-ops) with one warning.

        Not removed: this runs inside a hook, while the optimizer iterates over its hooks.
        """
        import warnings

        self.stopped = str(err)
        for watch in self._watches:
            watch.free_buffers()
            watch.measuring = watch.provisional = False
            watch.predictions = []
            watch.pending_checks = []
            watch.schedule = []
            watch.metric.reset()
            watch.horizon_metric.reset()
        warnings.warn(self.stopped, UserWarning, stacklevel=2)

    @torch.no_grad()
    def _take_snapshot(self, watch: _OptimizerWatch) -> None:
        if self.config.position_in_window(watch.steps_done) == 0:
            self._follow_group_moves(watch)  # once per window, at its first measured step
        sources = [p.detach() for p in watch.tensors]
        # Taken before every measured step, also right after a measured one: reusing that step's
        # weights would count whatever writes into them between steps (weight clipping, pruning
        # masks, Lookahead) as part of the next step, and writes through ``.data`` leave no trace
        # (version counters do not move) to detect them by.
        watch.snapshot = copy_into(watch.snapshot, sources)
        horizon = self.config.horizon
        if horizon > 1 and self.config.position_in_window(watch.steps_done) % horizon == 0:
            watch.anchor = copy_into(watch.anchor, sources)
        watch.predictions.append(explain_equilibrium(watch.optimizer))

    @torch.no_grad()
    def _measure(self, watch: _OptimizerWatch) -> None:
        assert watch.snapshot is not None
        currents = [p.detach() for p in watch.tensors]
        rows = watch.statistics(watch.snapshot, currents)
        # The fused engine's one-time compile, counted apart from the steady per-step cost.
        self.cost.compile_seconds = sum(w.statistics.compile_seconds for w in self._watches)
        watch.metric.update(statistics=self._to_unit_rows(watch, rows))
        position = self.config.position_in_window(watch.steps_done)
        horizon = self.config.horizon
        if watch.anchor is not None and position % horizon == horizon - 1:
            rows = watch.statistics(watch.anchor, currents)
            watch.horizon_metric.update(statistics=self._to_unit_rows(watch, rows))
        if self._measured_steps < self.config.verify_steps:
            self._verify_orthogonality(watch)

    def _to_unit_rows(self, watch: _OptimizerWatch, rows: Tensor) -> Tensor:
        """Sum member tensors' rows into unit rows (a weight and its bias are one unit)."""
        if watch.rows_are_units:
            return rows
        if watch.row_to_unit_row.device != rows.device:  # moved once, not on every step
            watch.row_to_unit_row = watch.row_to_unit_row.to(rows.device)
            watch.member_counts = watch.member_counts.to(rows.device)
        index = watch.row_to_unit_row
        unit_rows = rows.new_zeros(watch.num_rows, rows.shape[1]).index_add_(0, index, rows)
        # Coverage is a fraction per tensor, not a sum over elements: average it over members.
        unit_rows[:, COVERAGE] /= watch.member_counts.to(rows.dtype)
        return unit_rows

    def _verify_orthogonality(self, watch: _OptimizerWatch) -> None:
        """Gradient-orthogonality check: ``<w, grad> = 0`` for a scale-invariant unit."""
        self._measured_steps += 1
        grads = [p.grad for p in watch.tensors]
        if watch.snapshot is None or any(g is None for g in grads):
            return
        # One row per tensor (``dim=None``), whatever the units' granularity: the cosine is the
        # whole unit's. Its own cached layout: a from-scratch call would build it again.
        rows = watch.tensor_statistics(
            watch.snapshot, [g.detach() for g in grads if g is not None], curr_is_delta=True
        )
        if self._group is None:
            self._apply_check(watch, rows)
        else:  # summed over the ranks with the window's statistics, in its one collective
            watch.pending_checks.append(rows)

    def _apply_check(self, watch: _OptimizerWatch, per_tensor: Tensor) -> None:
        """One step's check from its per-tensor statistics (summed over the ranks)."""
        tolerance = self.config.orthogonality_tolerance
        for unit, tensor_rows in zip(watch.units, unit_tensor_rows(watch.units), strict=True):
            cosine = cosine_from_statistics(per_tensor[tensor_rows].sum(dim=0)).abs().item()
            if math.isnan(cosine):
                continue
            unit.max_abs_cosine = max(unit.max_abs_cosine, cosine)
            violated = unit.max_abs_cosine > orthogonality_threshold(unit.tensors, tolerance)
            unit.invariance = "violated" if violated else "verified"

    def _reduce_window(self, watch: _OptimizerWatch, where: str) -> None:
        """Sum the window's statistics and its pending checks over the ranks: one collective.

        Everything the window needs from the other ranks travels in one buffer (the per-step
        and the multi-step statistics of every unit row, the orthogonality checks' rows), so a
        window costs one all-reduce of ``O(window * rows)`` float64 values whatever the number
        of units, tensors or mesh dimensions (torchmetrics' own synchronisation would gather
        each state separately, after a gather of the shapes).
        """
        checks = torch.stack(watch.pending_checks) if watch.pending_checks else None
        watch.pending_checks = []
        config = self.config
        parts: list[tuple[Tensor, int, int]] = []
        synced = self._group is not None and self.sync_on_compute
        if synced:
            horizon = watch.horizon_metric.step_statistics
            parts.append((watch.metric.step_statistics, config.window, watch.num_rows))
            parts.append((horizon, config.window // config.horizon, watch.num_rows))
        if checks is not None:  # the first windows only (``verify_steps``), alike on every rank
            parts.append((checks, min(config.window, config.verify_steps), len(watch.tensors)))
        if not parts:
            return
        device = watch.tensors[0].device
        summed = reduce_window(parts, self._group, device, where, config.sync_timeout)
        if synced:
            watch.metric.step_statistics, watch.horizon_metric.step_statistics = summed[:2]
        if checks is not None:
            for rows in summed[-1]:
                self._apply_check(watch, rows)

    def _close_window(self, watch: _OptimizerWatch, where: str) -> None:
        self._reduce_window(watch, where)  # the metrics themselves never synchronise
        # torchmetrics squeezes one-element results to scalars: restore the unit axis. The
        # results go to the host once per window, not once per unit and value.
        computed = watch.metric.compute()
        sums = _balance_rows(watch, watch.predictions)
        if sums is not None:  # [rows, NUM_SUMS], kept 2-D (the others are flattened)
            computed["balance"] = sums
        result = {
            key: (value if key == "balance" else value.reshape(-1)).cpu()
            for key, value in computed.items()
        }
        watch.metric.reset()
        if watch.horizon_metric.step_statistics.shape[0] > 0:
            result["horizon_rms"] = watch.horizon_metric.compute()["rms"].reshape(-1).cpu()
            watch.horizon_metric.reset()
        predictions, watch.predictions = watch.predictions, []
        schedule, watch.schedule = watch.schedule, []
        if self.config.every_n_steps != self.config.window:
            watch.free_buffers()  # no extra memory between windows
        rows = {key: value.tolist() for key, value in result.items() if key != "balance"}
        if "balance" in result:  # every row's balance at once (per unit: a slice of it)
            result["balance"] = _pooled_balance(watch, result["balance"], int(rows["steps"][0]))
            rows["balance"] = result["balance"].tolist()
        else:
            watch.radial = None
        global_step = sum(w.steps_done for w in self._watches)
        self._windows.extend(
            self._unit_window(watch, unit, result, rows, predictions, schedule, global_step)
            for unit in watch.units
        )

    def _follow_group_moves(self, watch: _OptimizerWatch) -> None:
        """A unit moved to another param group: the window starting now follows that group.

        Checked once per window (a dictionary of parameter ids), not per step.
        """
        groups = param_groups(watch.optimizer)
        for unit in watch.units:
            found = {groups.get(id(t)) for t in unit.tensors}
            if len(found) == 1 and None not in found and unit.group_index not in found:
                new_index = found.pop()
                assert new_index is not None
                self.moved[unit.spec.name] = (unit.group_index, new_index)
                unit.group_index = new_index

    def _unit_window(
        self,
        watch: _OptimizerWatch,
        unit: _Unit,
        result: Mapping[str, Tensor],
        rows: Mapping[str, list[float]],
        predictions: list[list[Prediction]],
        schedule: Sequence[tuple[bool, tuple[float, ...], tuple[float, ...]]],
        global_step: int,
    ) -> UnitWindow:
        """One unit's window from the (host) results; ``rows`` holds them as Python lists."""
        # Muon's prediction depends on the matrix's shape: the group's value is refined per unit.
        shape = unit.tensors[0].shape
        values = [for_shape(p[unit.group_index], shape).angular_update for p in predictions]
        frozen_now = not any(t.requires_grad for t in unit.tensors)
        theory = None
        if not frozen_now and all(v is not None for v in values):
            theory = math.sqrt(sum(v * v for v in values if v is not None) / len(values))
        latest = predictions[-1][unit.group_index]
        lr = float(latest.hyperparameters.get("lr", math.nan))
        horizon_angle = channels = channel_ratios = None
        if not unit.per_channel:
            # One row per unit: plain floats (sqrt(x * x) == |x| exactly, as the tensor ops gave).
            row = unit.rows.start
            angle = rows["rms"][row]
            norm = math.sqrt(rows["weight_norm"][row] * rows["weight_norm"][row])
            last = rows["last"][row]
            if "horizon_rms" in rows:
                horizon_angle = math.sqrt(rows["horizon_rms"][row] * rows["horizon_rms"][row])
        else:
            rms = result["rms"][unit.rows]
            angle = rms.square().mean().sqrt().item()
            norm = result["weight_norm"][unit.rows].square().sum().sqrt().item()
            last = result["last"][unit.rows].square().mean().sqrt().item()
            if "horizon_rms" in result:
                horizon_angle = result["horizon_rms"][unit.rows].square().mean().sqrt().item()
            channels = _summarize(rms)
            if theory:
                norms = result["weight_norm"][unit.rows]
                channel_ratios = _summarize(rms / _channel_theory(latest, unit, theory, norms))
        unit.weight_rms = norm / math.sqrt(max(sum(t.numel() for t in unit.tensors), 1))
        # Frozen: no gradient now and no rotation in the window. A unit frozen during the window
        # moved in part of it: its angle is logged, without a prediction to compare it with.
        frozen = frozen_now and angle == 0.0
        balance = None
        if theory is not None and not frozen:
            balance = _unit_balance(watch, unit, latest, theory, result, rows)
        elif watch.radial is not None:
            watch.radial[unit.rows] = math.nan  # its pool restarts with its balance
        trajectory = None
        if theory is not None and not frozen:
            trajectory = _follow_trajectory(unit, for_shape(latest, shape), schedule, angle, norm)
        else:
            unit.trajectory = None  # no equilibrium to follow: it restarts when one returns
        return UnitWindow(
            unit=unit.spec.name,
            optimizer_step=watch.steps_done,
            global_step=global_step,
            angular_update=angle,
            last=last,
            theory=theory,
            ratio=angle / theory if theory else None,
            weight_norm=norm,
            steps=int(rows["steps"][0]),
            lr=lr,
            frozen=frozen,
            channels=channels,
            channel_ratios=channel_ratios,
            time_scale=relaxation_time(latest),
            horizon_angular_update=horizon_angle,
            norm_exponent=equilibrium_norm_exponent(latest),
            trajectory=trajectory,
            balance=balance,
        )


# -------------------------------------------------------------------- the radial balance


def _balance_rows(watch: _OptimizerWatch, predictions: list[list[Prediction]]) -> Tensor | None:
    """Per unit row: the sums of the radial balance (:mod:`lightning_sdm.theory._balance`).

    From the per-step statistics the window already holds and each step's weight decay per
    param group: no pass over the weights, and no host sync (the small decay table goes to the
    device without waiting for it; the result comes back with the window's other results).
    ``None`` when no unit of the watch has a measured balance, or the steps' predictions do not
    line up with them.
    """
    statistics = watch.metric.step_statistics
    if statistics.dim() != 3 or statistics.shape[0] == 0 or statistics.shape[0] != len(predictions):
        return None
    groups = len(watch.optimizer.param_groups)
    decays = [
        [decoupled_decay(step[g]) if g < len(step) else None for g in range(groups)]
        for step in predictions
    ]
    if all(d is None for step in decays for d in step):
        return None
    table = torch.tensor(
        [[math.nan if d is None else d for d in step] for step in decays], dtype=torch.float64
    )
    group_of_row = torch.zeros(statistics.shape[1], dtype=torch.long)
    for unit in watch.units:
        group_of_row[unit.rows] = unit.group_index
    per_row = table[:, group_of_row]
    if statistics.device.type == "cuda":  # from pinned memory: queued, the host does not wait
        per_row = per_row.pin_memory().to(statistics.device, non_blocking=True)
    return window_sums(statistics, per_row.to(statistics.device))


# The radial part P is a property of the gradients that does not move with the norm, but one
# window (2 steps by default) estimates it poorly, and the balance is convex in it: the sums are
# pooled over the recent windows, forgotten over this many measured steps.
RADIAL_MEMORY = 256


def _pooled_balance(watch: _OptimizerWatch, sums: Tensor, steps: int) -> Tensor:
    """Every row's balance angle from this window's sums pooled with the recent windows'."""
    fresh = sums[:, :3] * steps  # the sums are per step: a window weighs its steps
    pool = watch.radial
    if pool is not None and pool.shape == fresh.shape:
        kept = pool * math.exp(-steps / RADIAL_MEMORY) + fresh
        fresh = torch.where(torch.isfinite(pool), kept, fresh)
    watch.radial = fresh
    return balance_angle(torch.cat([fresh, sums[:, 3:]], dim=1))


def _unit_balance(
    watch: _OptimizerWatch,
    unit: _Unit,
    latest: Prediction,
    theory: float,
    result: Mapping[str, Tensor],
    rows: Mapping[str, list[Any]],
) -> float | None:
    """The unit's radial balance: its rows' RMS, the prediction for SGD, ``None`` without one."""
    kind = balance_kind(latest)
    # Weights whose dtype cannot hold the decay per step (bfloat16 and lr * wd = 1e-3) are not
    # decayed: the balance would describe a decay that does not happen (the audit says so).
    lost = any(decay_lost_to_rounding(latest, t.dtype) is not None for t in unit.tensors)
    if kind != "measured" or "balance" not in result or lost:
        if watch.radial is not None:
            watch.radial[unit.rows] = math.nan
        return theory if kind == "a priori" else None  # SGD: fixed by momentum and decay
    if not unit.per_channel:
        value = rows["balance"][unit.rows.start]
    else:
        # A row whose update points inward by more than half its size (p >= 1/2) has no
        # balance (its norm shrinks at any update size): the unit's RMS is over the others.
        angles = result["balance"][unit.rows]
        angles = angles[torch.isfinite(angles)]
        value = angles.square().mean().sqrt().item() if angles.numel() else math.nan
    return value if math.isfinite(value) else None


# -------------------------------------------------------------------- the trajectory


def _host_float(value: Any) -> float:
    """A hyper-parameter as a float, read without a device sync (NaN for a device tensor)."""
    if isinstance(value, Tensor):
        return float(value) if value.device.type == "cpu" and value.numel() == 1 else math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _schedule_entry(
    optimizer: Optimizer, measured: bool
) -> tuple[bool, tuple[float, ...], tuple[float, ...]]:
    """This step's LR and weight decay per group: host values, one dict read each."""
    groups = optimizer.param_groups
    return (
        measured,
        tuple(_host_float(g.get("lr", math.nan)) for g in groups),
        tuple(_host_float(g.get("weight_decay", 0.0)) for g in groups),
    )


def _follow_trajectory(
    unit: _Unit,
    latest: Prediction,
    schedule: Sequence[tuple[bool, tuple[float, ...], tuple[float, ...]]],
    angle: float,
    norm: float,
) -> float | None:
    """The unit's predicted angle for this window (before seeing it); its state moves on."""
    constants = trajectory_constants(latest)
    index = unit.group_index
    steps = [entry for entry in schedule if index < len(entry[1])]
    lrs = [entry[1][index] for entry in steps]
    wds = [entry[2][index] for entry in steps]
    if constants is None or len(steps) < len(schedule) or not all(map(math.isfinite, lrs + wds)):
        unit.trajectory = None  # a schedule it cannot read: start again from the next window
        return None
    unit.trajectory, predicted = observe(
        unit.trajectory, lrs, wds, [entry[0] for entry in steps], constants, angle, norm
    )
    return predicted


# -------------------------------------------------------------------- construction helpers


def _bind(method: Callable[[_OptimizerWatch], None], watch: _OptimizerWatch) -> Callable[..., None]:
    def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        method(watch)

    return outside_compile(hook)  # a compiled optimizer step must not trace the bookkeeping


def orthogonality_threshold(tensors: Sequence[Tensor], tolerance: float) -> float:
    """``tolerance / sqrt(n)`` for a unit of ``n`` elements (global ones for sharded tensors)."""
    return tolerance / math.sqrt(max(sum(t.numel() for t in tensors), 1))


def _check_distinct(units: Sequence[Unit]) -> None:
    """Each unit once, each parameter in one unit: else every window would count twice."""
    owner: dict[str, str] = {}
    names: set[str] = set()
    for unit in units:
        if unit.name in names:
            raise ValueError(f"`units` holds {unit.name!r} twice; give each unit once.")
        names.add(unit.name)
        for param in unit.params:
            if param in owner:
                raise ValueError(
                    f"`units`: parameter {param!r} is in both {owner[param]!r} and "
                    f"{unit.name!r}; a parameter belongs to one unit."
                )
            owner[param] = unit.name


def _channel_theory(
    prediction: Prediction, unit: _Unit, theory: float, norms: Tensor
) -> Tensor | float:
    """Per channel: ``theory``, scaled for Adafactor by each channel's norm against its matrix's.

    Adafactor's one step for the whole matrix turns a channel (a row under BatchNorm, a head)
    by the matrix's row RMS over the channel's norm (:func:`for_shape`'s ``relative_norm``);
    every other prediction, and a unit with more than its weight, keeps the unit's value.
    """
    if prediction.family != "adafactor" or len(unit.tensors) != 1 or norms.numel() < 2:
        return theory
    shape = unit.tensors[0].shape
    whole = for_shape(prediction, shape).angular_update
    relative = (norms / norms.square().mean().sqrt()).tolist()
    if not whole or not all(math.isfinite(x) and x > 0 for x in relative):
        return theory
    # Per window on the host, once per channel (a few microseconds each).
    values = [for_shape(prediction, shape, relative_norm=x).angular_update for x in relative]
    return torch.tensor(values, dtype=norms.dtype) * (theory / whole)


def _summarize(values: Tensor) -> dict[str, float]:
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return dict.fromkeys(CHANNEL_SUMMARIES, math.nan)
    quantiles = torch.quantile(finite, torch.tensor([0.1, 0.5, 0.9], dtype=finite.dtype))
    return {
        "mean": finite.mean().item(),
        "std": finite.std(unbiased=False).item(),
        "min": finite.min().item(),
        "p10": quantiles[0].item(),
        "median": quantiles[1].item(),
        "p90": quantiles[2].item(),
        "max": finite.max().item(),
    }


def _restored_prediction(
    value: float | None, hyperparameters: Mapping[str, float], family: Any = None
) -> Prediction:
    return Prediction(
        angular_update=value,
        optimizer="restored",
        rule="restored",
        reason="restored from a checkpoint",
        source="",
        hyperparameters=dict(hyperparameters),
        family=family,
    )


def _saved_anchor(watch: _OptimizerWatch) -> list[Tensor] | None:
    """The weights at the start of the open multi-step block, for a checkpoint.

    Sharded (DTensor) weights are not saved: each rank holds another shard, and the callback's
    state is one for all ranks; after a resume their open block restarts.
    """
    if watch.anchor is None or any(is_dtensor(t) for t in watch.tensors):
        return None
    return [a.detach().cpu().clone() for a in watch.anchor]
