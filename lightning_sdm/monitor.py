"""The measuring core: angular updates of chosen units at real optimizer steps, Trainer or not.

:class:`SphericalMonitor` hooks into optimizers (``register_step_pre_hook`` /
``register_step_post_hook``): it snapshots the monitored weights just before a step that is due to
be measured, and accumulates the step's sufficient statistics just after it. Steps the optimizer
does not take (a grad-scaler skip under AMP) fire neither hook and are never measured. Every
``every_n_steps`` optimizer steps it closes a window covering the last ``window`` steps and makes a
:class:`UnitWindow` per unit available from :meth:`SphericalMonitor.pop_windows`.

The Lightning callback is a thin adapter over this class; Fabric and plain PyTorch loops use it
directly (see ``examples/``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_sdm.functional import (
    COVERAGE,
    _BatchedStatistics,
    _local_shard,
    angular_update_statistics,
    cosine_from_statistics,
)
from lightning_sdm.metric import AngularUpdate
from lightning_sdm.theory import Prediction, explain_equilibrium, relaxation_steps

if TYPE_CHECKING:
    from lightning_sdm.invariance import InvarianceReport

__all__ = ["SphericalMonitor", "UnitSpec", "UnitWindow"]

GRANULARITIES = ("layer", "channel")
CHANNEL_SUMMARIES = ("mean", "std", "min", "p10", "median", "p90", "max")


@dataclass(frozen=True)
class UnitSpec:
    """One scale-invariant unit to monitor.

    Args:
        name: the key the unit is reported under (by convention the weight's qualified name).
        params: qualified names of the unit's parameters (the weight, and the bias that precedes
            the normalization, when there is one).
        channel_dim: dimension of the weight that indexes output channels (1 for ConvTranspose).
        channel_invariant: whether each output channel is invariant on its own (BatchNorm), or
            only the whole tensor (LayerNorm).
        source: how the unit was found (``"trace"``, ``"registration_order"``, ``"explicit"``).
    """

    name: str
    params: tuple[str, ...]
    channel_dim: int = 0
    channel_invariant: bool = True
    source: str = "explicit"

    @classmethod
    def from_report(cls, report: InvarianceReport) -> list[UnitSpec]:
        """The units of a :func:`~lightning_sdm.invariance.find_scale_invariant_units` report."""
        return [
            cls(
                name=unit.name,
                params=tuple(unit.params),
                channel_dim=unit.channel_dim,
                channel_invariant=unit.channel_invariant,
                source=report.method,
            )
            for unit in report.units
        ]


@dataclass(frozen=True)
class UnitWindow:
    """What one unit did over one measurement window.

    Attributes:
        unit: the unit's name.
        step: optimizer steps completed by the unit's optimizer when the window closed.
        angular_update: RMS angular update (radians per step) over the window.
        last: angular update of the last step of the window.
        theory: predicted equilibrium (RMS over the window's learning rates), ``None`` when no
            prediction exists for the unit's optimizer/param group.
        ratio: ``angular_update / theory`` (``None`` without a prediction).
        weight_norm: norm of the unit (weight and bias together) at the end of the window.
        steps: number of measured steps in the window.
        lr: learning rate of the unit's param group at the last measured step.
        frozen: the unit had no gradient (frozen); its angle is 0 and it has no prediction.
        channels: with ``granularity="channel"``, summary statistics over the unit's channels of
            the per-channel RMS angular update (keys in ``CHANNEL_SUMMARIES``), else ``None``.
        channel_ratios: same summaries of per-channel ``angular_update / theory``.
        time_scale: e-folding time (steps) of the relaxation towards equilibrium under the
            current hyper-parameters, ``None`` where theory gives none.
        horizon_angular_update: with ``horizon=h > 1``, the RMS over the window of the angle
            between ``w_t`` and ``w_{t+h}`` (not the sum of the ``h`` one-step angles: angles on
            a sphere do not add, and a random walk covers only about ``sqrt(h)`` of them).
    """

    unit: str
    step: int
    angular_update: float
    last: float
    theory: float | None
    ratio: float | None
    weight_norm: float
    steps: int
    lr: float
    frozen: bool = False
    channels: dict[str, float] | None = None
    channel_ratios: dict[str, float] | None = None
    time_scale: float | None = None
    horizon_angular_update: float | None = None


@dataclass
class _Unit:
    spec: UnitSpec
    tensors: list[nn.Parameter]
    group_index: int
    rows: slice  # rows of this unit in the optimizer watch's statistics
    invariance: str = "unverified"  # "verified" | "violated" | "unverified"
    max_abs_cosine: float = 0.0


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
    statistics: _BatchedStatistics  # cached layout and work buffer of the per-step statistics
    member_counts: Tensor  # tensors per unit row (their coverages are averaged)
    rows_are_units: bool  # one tensor row per unit row, in order: no summing needed
    steps_done: int = 0
    snapshot: list[Tensor] | None = None
    anchor: list[Tensor] | None = None  # start of the current multi-step (horizon) block
    horizon_metric: AngularUpdate = field(default_factory=AngularUpdate)
    predictions: list[list[Prediction]] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)
    measuring: bool = False


class SphericalMonitor:
    """Measure the angular updates of scale-invariant units at the optimizer's real steps.

    Args:
        module: the model owning the parameters named in ``units``.
        optimizers: the optimizer(s) updating them. A unit's parameters must all belong to one
            optimizer param group; units whose parameters no optimizer updates are skipped (see
            :attr:`skipped`).
        units: the units to monitor (see :class:`UnitSpec`).
        granularity: ``"layer"`` (one angle per unit, as in Wan et al.) or ``"channel"`` (one
            angle per output channel, as in Kosson et al.; reported as summary statistics).
        every_n_steps: optimizer steps between two windows.
        window: measured steps per window (the last ``window`` steps before each window closes;
            at most ``every_n_steps``).
        verify_steps: number of measured steps on which the gradient-orthogonality check
            ``|cos(w, grad)| < orthogonality_tolerance`` is run per unit (0 disables it).
        orthogonality_tolerance: largest ``|cos(w, grad)|`` accepted as scale-invariant. Exact
            arithmetic gives 0; float32 backward passes through a normalization leave ~1e-6 early
            in training and up to ~3e-3 on collapsed weights, while weights that are not
            invariant (classifiers) typically show 0.1 or more.
        sync_on_compute: reduce statistics over processes when a window closes (needed for
            sharded parameters; harmless for replicated ones).
        horizon: also measure the angle between ``w_t`` and ``w_{t+horizon}`` over consecutive
            blocks of ``horizon`` steps inside each window (:attr:`UnitWindow.
            horizon_angular_update`). Costs a second copy of the monitored weights while a
            window is open.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_sdm import SphericalMonitor, UnitSpec
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        >>> monitor = SphericalMonitor(model, opt, [UnitSpec("0.weight", ("0.weight", "0.bias"))],
        ...                            every_n_steps=5, window=5).attach()
        >>> for _ in range(10):
        ...     opt.zero_grad()
        ...     model(torch.randn(32, 8)).square().mean().backward()
        ...     opt.step()
        >>> [(w.unit, w.step, w.steps) for w in monitor.pop_windows()]
        [('0.weight', 5, 5), ('0.weight', 10, 5)]
        >>> monitor.detach()
    """

    def __init__(
        self,
        module: nn.Module,
        optimizers: Optimizer | Sequence[Optimizer],
        units: Sequence[UnitSpec],
        *,
        granularity: str = "layer",
        every_n_steps: int = 50,
        window: int = 8,
        verify_steps: int = 3,
        orthogonality_tolerance: float = 1e-2,
        sync_on_compute: bool = True,
        horizon: int = 1,
    ) -> None:
        if not isinstance(horizon, int) or horizon < 1 or horizon > min(window, every_n_steps):
            raise ValueError(
                f"`horizon` must be an integer in [1, window], got {horizon!r} "
                f"(window={window}, every_n_steps={every_n_steps})."
            )
        check_monitor_arguments(
            granularity, every_n_steps, window, verify_steps, orthogonality_tolerance
        )
        self.granularity = granularity
        self.every_n_steps = every_n_steps
        self.window = min(window, every_n_steps)
        self.verify_steps = verify_steps
        self.orthogonality_tolerance = orthogonality_tolerance
        self.sync_on_compute = sync_on_compute
        self.horizon = horizon
        self.skipped: dict[str, str] = {}
        self._windows: list[UnitWindow] = []
        self._measured_steps = 0
        self._listeners: list[Callable[[list[UnitWindow]], None]] = []
        optimizer_list = [optimizers] if isinstance(optimizers, Optimizer) else list(optimizers)
        self._watches = _build_watches(module, optimizer_list, units, self, granularity)

    # ---------------------------------------------------------------- public API

    @property
    def units(self) -> list[str]:
        """Names of the monitored units, in order."""
        return [unit.spec.name for watch in self._watches for unit in watch.units]

    @property
    def invariance(self) -> dict[str, tuple[str, float]]:
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
                result[unit.spec.name] = groups[unit.group_index]
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

    def detach(self) -> None:
        """Remove the hooks and free any snapshot."""
        for watch in self._watches:
            for handle in watch.handles:
                handle.remove()
            watch.handles = []
            watch.snapshot = None
            watch.statistics.release()

    def add_listener(self, listener: Callable[[list[UnitWindow]], None]) -> None:
        """Call ``listener(windows)`` each time windows close (on every rank)."""
        self._listeners.append(listener)

    def pop_windows(self) -> list[UnitWindow]:
        """Windows closed since the last call, oldest first."""
        windows, self._windows = self._windows, []
        return windows

    def state_dict(self) -> dict[str, Any]:
        """Step counters and the open window, so that a resumed run measures the same values.

        Plain Python and tensor types only (checkpoints load with ``weights_only=True``).
        """
        return {
            "steps_done": [watch.steps_done for watch in self._watches],
            "window_statistics": [watch.metric.step_statistics.cpu() for watch in self._watches],
            "window_predictions": [
                [
                    [(p.angular_update, dict(p.hyperparameters)) for p in step]
                    for step in w.predictions
                ]
                for w in self._watches
            ],
            "verified_steps": self._measured_steps,
            "invariance": {
                unit.spec.name: (unit.invariance, unit.max_abs_cosine)
                for watch in self._watches
                for unit in watch.units
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (missing entries are left at their start)."""
        for index, watch in enumerate(self._watches):
            watch.metric.reset()
            watch.horizon_metric.reset()
            watch.snapshot = watch.anchor = None
            watch.statistics.release()
            watch.predictions = []
            if index < len(state.get("steps_done", [])):
                watch.steps_done = int(state["steps_done"][index])
            statistics = state.get("window_statistics", [])
            if index < len(statistics) and statistics[index].numel():
                for step in statistics[index]:
                    watch.metric.update(statistics=step)
            predictions = state.get("window_predictions", [])
            if index < len(predictions):
                watch.predictions = [
                    [_restored_prediction(value, hyper) for value, hyper in step]
                    for step in predictions[index]
                ]
        self._measured_steps = int(state.get("verified_steps", self._measured_steps))
        for watch in self._watches:
            for unit in watch.units:
                if unit.spec.name in state.get("invariance", {}):
                    status, cosine = state["invariance"][unit.spec.name]
                    unit.invariance, unit.max_abs_cosine = str(status), float(cosine)

    # ---------------------------------------------------------------- hooks

    def _is_measured(self, step_index: int) -> bool:
        """Step ``step_index`` (0-based) is among the last ``window`` of its interval."""
        return step_index % self.every_n_steps >= self.every_n_steps - self.window

    def _position_in_window(self, step_index: int) -> int:
        return step_index % self.every_n_steps - (self.every_n_steps - self.window)

    # The hooks run on every optimizer step. On a step that is not measured they only read and
    # increment a counter: no tensor op, no allocation, no host-device synchronisation.

    def _before_step(self, watch: _OptimizerWatch) -> None:
        watch.measuring = self._is_measured(watch.steps_done)
        if watch.measuring:
            self._take_snapshot(watch)

    def _after_step(self, watch: _OptimizerWatch) -> None:
        if watch.measuring and watch.snapshot is not None:
            self._measure(watch)
        watch.measuring = False
        watch.steps_done += 1
        if watch.steps_done % self.every_n_steps == 0 and watch.predictions:
            with torch.no_grad():
                self._close_window(watch)

    @torch.no_grad()
    def _take_snapshot(self, watch: _OptimizerWatch) -> None:
        sources = [p.detach() for p in watch.tensors]
        watch.snapshot = _copy_into(watch.snapshot, sources)
        if self.horizon > 1 and self._position_in_window(watch.steps_done) % self.horizon == 0:
            watch.anchor = _copy_into(watch.anchor, sources)
        watch.predictions.append(explain_equilibrium(watch.optimizer))

    @torch.no_grad()
    def _measure(self, watch: _OptimizerWatch) -> None:
        assert watch.snapshot is not None
        currents = [p.detach() for p in watch.tensors]
        rows = watch.statistics(watch.snapshot, currents)
        watch.metric.update(statistics=self._to_unit_rows(watch, rows))
        position = self._position_in_window(watch.steps_done)
        if watch.anchor is not None and position % self.horizon == self.horizon - 1:
            rows = watch.statistics(watch.anchor, currents)
            watch.horizon_metric.update(statistics=self._to_unit_rows(watch, rows))
        if self._measured_steps < self.verify_steps:
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
        rows = angular_update_statistics(
            watch.snapshot, [g.detach() for g in grads if g is not None], curr_is_delta=True
        )
        per_tensor = _all_reduce_sum(rows)
        for unit, tensor_rows in zip(watch.units, _unit_tensor_rows(watch.units), strict=True):
            cosine = cosine_from_statistics(per_tensor[tensor_rows].sum(dim=0)).abs().item()
            if math.isnan(cosine):
                continue
            unit.max_abs_cosine = max(unit.max_abs_cosine, cosine)
            violated = unit.max_abs_cosine > self.orthogonality_tolerance
            unit.invariance = "violated" if violated else "verified"

    def _close_window(self, watch: _OptimizerWatch) -> None:
        watch.metric.sync_on_compute = self.sync_on_compute
        # torchmetrics squeezes one-element results to scalars: restore the unit axis. The
        # results go to the host once per window, not once per unit and value.
        result = {key: value.reshape(-1).cpu() for key, value in watch.metric.compute().items()}
        watch.metric.reset()
        if watch.horizon_metric.step_statistics.shape[0] > 0:
            watch.horizon_metric.sync_on_compute = self.sync_on_compute
            result["horizon_rms"] = watch.horizon_metric.compute()["rms"].reshape(-1).cpu()
            watch.horizon_metric.reset()
        predictions, watch.predictions = watch.predictions, []
        if self.every_n_steps > self.window:
            watch.snapshot = watch.anchor = None  # no extra memory between windows
            watch.statistics.release()
        rows = {key: value.tolist() for key, value in result.items()}
        windows = [
            self._unit_window(watch, unit, result, rows, predictions) for unit in watch.units
        ]
        self._windows.extend(windows)
        for listener in self._listeners:
            listener(windows)

    def _unit_window(
        self,
        watch: _OptimizerWatch,
        unit: _Unit,
        result: Mapping[str, Tensor],
        rows: Mapping[str, list[float]],
        predictions: list[list[Prediction]],
    ) -> UnitWindow:
        """One unit's window from the (host) results; ``rows`` holds them as Python lists."""
        values = [p[unit.group_index].angular_update for p in predictions]
        frozen = not any(t.requires_grad for t in unit.tensors)
        theory = None
        if not frozen and all(v is not None for v in values):
            theory = math.sqrt(sum(v * v for v in values if v is not None) / len(values))
        lr = float(predictions[-1][unit.group_index].hyperparameters.get("lr", math.nan))
        horizon_angle = None
        if self.granularity == "layer":
            # One row per unit: plain floats (sqrt(x * x) == |x| exactly, as the tensor ops gave).
            row = unit.rows.start
            angle = rows["rms"][row]
            norm = math.sqrt(rows["weight_norm"][row] * rows["weight_norm"][row])
            last = rows["last"][row]
            if "horizon_rms" in rows:
                horizon_angle = math.sqrt(rows["horizon_rms"][row] * rows["horizon_rms"][row])
            channels = channel_ratios = None
        else:
            rms = result["rms"][unit.rows]
            angle = rms.square().mean().sqrt().item()
            norm = result["weight_norm"][unit.rows].square().sum().sqrt().item()
            last = _last_angle(result["last"][unit.rows], self.granularity)
            if "horizon_rms" in result:
                horizon_angle = result["horizon_rms"][unit.rows].square().mean().sqrt().item()
            channels = _summarize(rms)
            channel_ratios = _summarize(rms / theory) if theory else None
        ratio = angle / theory if theory else None
        return UnitWindow(
            unit=unit.spec.name,
            step=watch.steps_done,
            angular_update=angle,
            last=last,
            theory=theory,
            ratio=ratio,
            weight_norm=norm,
            steps=int(rows["steps"][0]),
            lr=lr,
            frozen=frozen,
            channels=channels,
            channel_ratios=channel_ratios,
            time_scale=relaxation_time(predictions[-1][unit.group_index]),
            horizon_angular_update=horizon_angle,
        )


# -------------------------------------------------------------------- construction helpers


def check_monitor_arguments(
    granularity: str,
    every_n_steps: int,
    window: int,
    verify_steps: int,
    orthogonality_tolerance: float,
) -> None:
    """Raise ``ValueError`` naming the first invalid argument (shared with the callback)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}.")
    if not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"`every_n_steps` must be a positive integer, got {every_n_steps!r}.")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"`window` must be a positive integer, got {window!r}.")
    if not isinstance(verify_steps, int) or verify_steps < 0:
        raise ValueError(f"`verify_steps` must be a non-negative integer, got {verify_steps!r}.")
    if not 0 < orthogonality_tolerance < 1:
        raise ValueError(
            f"`orthogonality_tolerance` must be in (0, 1), got {orthogonality_tolerance!r}."
        )


def _bind(method: Callable[[_OptimizerWatch], None], watch: _OptimizerWatch) -> Callable[..., None]:
    def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        method(watch)

    return hook


def _param_groups(optimizer: Optimizer) -> dict[int, int]:
    return {
        id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]
    }


def _build_watches(
    module: nn.Module,
    optimizers: list[Optimizer],
    specs: Sequence[UnitSpec],
    monitor: SphericalMonitor,
    granularity: str,
) -> list[_OptimizerWatch]:
    _reshard_fsdp(module)
    named = dict(module.named_parameters())
    group_of = [_param_groups(opt) for opt in optimizers]
    assigned: list[list[tuple[UnitSpec, list[nn.Parameter], int]]] = [[] for _ in optimizers]
    for spec in specs:
        missing = [name for name in spec.params if name not in named]
        if missing:
            raise ValueError(
                f"Unit {spec.name!r} names parameters the module does not have: {missing}. "
                "Use names from `module.named_parameters()`."
            )
        tensors = [named[name] for name in spec.params]
        owner = _owning_optimizer(tensors, group_of)
        if owner is None:
            monitor.skipped[spec.name] = "not updated by any optimizer (or split across groups)"
            continue
        assigned[owner[0]].append((spec, tensors, owner[1]))
    return [
        _make_watch(opt, entries, granularity, monitor.sync_on_compute)
        for opt, entries in zip(optimizers, assigned, strict=True)
        if entries
    ]


def _owning_optimizer(
    tensors: list[nn.Parameter], group_of: list[dict[int, int]]
) -> tuple[int, int] | None:
    for index, groups in enumerate(group_of):
        found = {groups.get(id(t)) for t in tensors}
        if len(found) == 1 and None not in found:
            return index, found.pop()  # type: ignore[return-value]
    return None


def _make_watch(
    optimizer: Optimizer,
    entries: list[tuple[UnitSpec, list[nn.Parameter], int]],
    granularity: str,
    sync_on_compute: bool,
) -> _OptimizerWatch:
    units: list[_Unit] = []
    tensors: list[nn.Parameter] = []
    dims: list[int | None] = []
    row_map: list[Tensor] = []
    row = 0
    for spec, unit_tensors, group_index in entries:
        channels = unit_tensors[0].shape[spec.channel_dim] if granularity == "channel" else 1
        for position, tensor in enumerate(unit_tensors):
            tensors.append(tensor)
            if granularity == "channel":
                # The weight's output channels, and the bias's elements, map to the same rows.
                dims.append(spec.channel_dim if position == 0 else 0)
                row_map.append(torch.arange(row, row + channels))
            else:
                dims.append(None)
                row_map.append(torch.tensor([row]))
        units.append(_Unit(spec, unit_tensors, group_index, slice(row, row + channels)))
        row += channels
    row_to_unit_row = torch.cat(row_map)
    return _OptimizerWatch(
        optimizer=optimizer,
        units=units,
        tensors=tensors,
        dims=dims,
        row_to_unit_row=row_to_unit_row,
        num_rows=row,
        metric=AngularUpdate(sync_on_compute=sync_on_compute),
        statistics=_BatchedStatistics(dims),
        member_counts=torch.bincount(row_to_unit_row, minlength=row).to(torch.float64),
        rows_are_units=torch.equal(row_to_unit_row, torch.arange(row)),
    )


def _unit_tensor_rows(units: list[_Unit]) -> list[slice]:
    """Rows of the per-tensor (``dim=None``) statistics that belong to each unit."""
    slices, start = [], 0
    for unit in units:
        slices.append(slice(start, start + len(unit.tensors)))
        start += len(unit.tensors)
    return slices


def _all_reduce_sum(stats: Tensor) -> Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats)
    return stats


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


def _last_angle(last: Tensor, granularity: str) -> float:
    if granularity == "layer":
        return last.item()
    return last.square().mean().sqrt().item()


def _restored_prediction(value: float | None, hyperparameters: Mapping[str, float]) -> Prediction:
    return Prediction(
        angular_update=value,
        optimizer="restored",
        rule="restored",
        reason="restored from a checkpoint",
        source="",
        hyperparameters=dict(hyperparameters),
    )


def relaxation_time(prediction: Prediction) -> float | None:
    """E-folding time (steps) of the approach to equilibrium for a param group, if known.

    SGD: :func:`lightning_sdm.theory.relaxation_steps` (``(1 - alpha) / (4 eta lam)``, with
    ``eta (1 - tau)`` under dampening ``tau``). Decoupled weight decay (AdamW, Lion): ``1 / (2 eta
    lam)``, the time scale of ``|w|^2`` under a gradient-scale-free update (Kosson et al. 2024).
    """
    hyper = prediction.hyperparameters
    lr, weight_decay = hyper.get("lr", 0.0), hyper.get("weight_decay", 0.0)
    if prediction.angular_update is None or lr <= 0 or weight_decay <= 0:
        return None
    if "momentum" in hyper:
        effective_lr = lr * (1.0 - hyper.get("dampening", 0.0))
        if effective_lr <= 0 or not 0 <= hyper["momentum"] < 1:
            return None
        return relaxation_steps(effective_lr, weight_decay, hyper["momentum"])
    return 1.0 / (2.0 * lr * weight_decay)


def _copy_into(buffers: list[Tensor] | None, sources: list[Tensor]) -> list[Tensor]:
    """Copy ``sources`` into reusable ``buffers`` (allocated on first use)."""
    if buffers is None:
        return [source.clone() for source in sources]
    # DTensor has no sharding rule for _foreach_copy_: copy the local shards (views) instead.
    torch._foreach_copy_([_local_shard(b) for b in buffers], [_local_shard(s) for s in sources])
    return buffers


def _reshard_fsdp(module: nn.Module) -> None:
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
