"""Spherical Motion Dynamics of a LightningModule, live, with one callback."""

from __future__ import annotations

import fnmatch
import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from lightning_sdm import integrations
from lightning_sdm.equilibrium import EquilibriumDetector, EquilibriumEvent
from lightning_sdm.invariance import (
    InvarianceReport,
    ScaleInvarianceTracer,
    structural_candidates,
)
from lightning_sdm.lr_control import (
    check_rescale_supported,
    check_schedulers_supported,
    decay_param_groups,
    rescale_for_lr_decay,
)
from lightning_sdm.monitor import (
    SphericalMonitor,
    UnitSpec,
    UnitWindow,
    check_monitor_arguments,
)
from lightning_sdm.theory import lr_decay_relaxation_steps

__all__ = ["SphericalDynamicsCallback"]

ParamsSpec = str | Sequence[str] | Sequence[nn.Module]
EquilibriumAction = Callable[[pl.Trainer, pl.LightningModule, EquilibriumEvent], None]
ACTIONS = ("warn", "decay_lr", "stop")


class SphericalDynamicsCallback(Callback):
    r"""Log per-layer angular updates, their predicted equilibrium and equilibrium status.

    With the defaults, the callback finds the scale-invariant units of the LightningModule by
    following the first training step's forward pass (weights whose output reaches a
    BatchNorm/GroupNorm/LayerNorm/InstanceNorm only through positively homogeneous operations,
    with the bias that precedes the norm), cross-checks them on the first measured steps by
    gradient orthogonality (``|cos(w, grad)|`` ~ 0), and then measures their angular updates at
    the optimizers' real steps. Every ``every_n_steps`` optimizer steps it logs, to every logger
    of the Trainer:

    ========================================  ================================================
    key                                       value
    ========================================  ================================================
    ``sdm/angular_update/<name>``             RMS angular update (rad/step) over the window
    ``sdm/angular_update_theory/<name>``      predicted equilibrium for the unit's param group
    ``sdm/angular_update_ratio/<name>``       measured / predicted
    ``sdm/weight_norm/<name>``                norm of the unit
    ``sdm/in_equilibrium/<name>``             1 while the unit is in equilibrium, else 0
    ``sdm/angular_update_ratio``              median ratio over the units
    ``sdm/equilibrium_fraction``              fraction of units in equilibrium
    ========================================  ================================================

    ``<name>`` is the weight's qualified name in the LightningModule (``net.0.weight``). With
    ``granularity="channel"`` the per-unit keys get ``/mean``, ``/std``, ``/min``, ``/p10``,
    ``/median``, ``/p90``, ``/max`` suffixes (statistics over the unit's output channels). The
    progress bar shows ``sdm_ratio`` (the median ratio). The same numbers are kept in
    :attr:`history` (one dict per unit and window) for notebooks.

    Args:
        params: ``"auto"`` (detect scale-invariant units), or an explicit selection: parameter
            names, glob patterns (``"net.*.weight"``) or regular expressions prefixed with
            ``"re:"``, or modules (their ``weight`` and ``bias``). A selected weight that fails
            the gradient-orthogonality check is still logged, with a warning.
        granularity: ``"layer"`` (whole unit, Wan et al. 2020) or ``"channel"`` (per output
            channel/neuron, Kosson et al. 2024).
        every_n_steps: optimizer steps between two logged windows; defaults to the Trainer's
            ``log_every_n_steps``.
        window: measured optimizer steps per logged value (the last ``window`` steps of each
            interval), at most ``every_n_steps``.
        tolerance: relative tolerance of the equilibrium test.
        patience: consecutive windows within tolerance (and without trend) to declare
            equilibrium.
        verify_steps: measured steps on which the gradient-orthogonality check runs.
        orthogonality_tolerance: largest ``|cos(w, grad)|`` accepted as scale-invariant.
        prog_bar: show the median ratio in the progress bar.
        quorum: fraction of units that must be in equilibrium for an equilibrium event.
        on_equilibrium: what to do when the quorum reaches equilibrium: ``"warn"`` (one
            message per event), ``"decay_lr"`` (multiply the LR schedule of the param groups
            holding monitored units by ``decay_factor``), ``"stop"`` (ask the Trainer to stop),
            or a callable ``(trainer, pl_module, event)``. Every event is in :attr:`events` and
            logged as ``sdm/lr_decays``, ``sdm/equilibrium_event_step``, ``sdm/lr_after_event``.
        decay_factor: LR multiplier of a decay, in (0, 1).
        min_lr: no decay goes below this learning rate.
        max_decays: at most this many decays (``None``: no limit).
        cooldown: steps after a decay before the next decision; ``None`` uses the theory's
            relaxation time: SMD Cor. 3.1 for SGD (``ceil(log(k) (1 - momentum) / (2 wd
            lr_new))``), ``ceil(log(k) / (wd lr_new))`` for decoupled weight decay (AdamW).
        rescale_weights: at each decay by ``k``, divide the invariant weights by ``k^(1/4)``
            (SGD; ``k^(1/2)`` for AdamW) and adjust the optimizer state, so that the run lands on
            the new equilibrium at once (SMD Sec. 4).
        stop_at_min_lr: with ``"decay_lr"``, stop training at an equilibrium event when no
            further decay is allowed (``min_lr`` or ``max_decays`` reached).
        horizon: also log ``sdm/angular_update_horizon/<name>``, the RMS angle between ``w_t``
            and ``w_{t+horizon}`` (consecutive blocks inside each window), at most ``window``.

    Raises:
        ValueError: for an invalid argument (the message names it).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_sdm import SphericalDynamicsCallback
        >>> trainer = Trainer(callbacks=[SphericalDynamicsCallback()])  # doctest: +SKIP
        >>> SphericalDynamicsCallback(granularity="channel", every_n_steps=20, window=5).window
        5
    """

    def __init__(
        self,
        params: ParamsSpec = "auto",
        granularity: str = "layer",
        every_n_steps: int | None = None,
        window: int = 8,
        tolerance: float = 0.1,
        patience: int = 3,
        verify_steps: int = 3,
        orthogonality_tolerance: float = 1e-2,
        prog_bar: bool = True,
        quorum: float = 1.0,
        on_equilibrium: str | EquilibriumAction = "warn",
        decay_factor: float = 0.1,
        min_lr: float = 0.0,
        max_decays: int | None = None,
        cooldown: int | None = None,
        rescale_weights: bool = False,
        stop_at_min_lr: bool = False,
        horizon: int = 1,
    ) -> None:
        _check_params_spec(params)
        _check_action_arguments(
            on_equilibrium, decay_factor, min_lr, max_decays, cooldown, rescale_weights
        )
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(
                f"`every_n_steps` must be a positive integer or None, got {every_n_steps!r}."
            )
        check_monitor_arguments(
            granularity, every_n_steps or 1, window, verify_steps, orthogonality_tolerance
        )
        self.params = params
        self.granularity = granularity
        self.every_n_steps = every_n_steps
        self.window = window if every_n_steps is None else min(window, every_n_steps)
        self.verify_steps = verify_steps
        self.orthogonality_tolerance = orthogonality_tolerance
        self.prog_bar = prog_bar
        self.detector = EquilibriumDetector(tolerance=tolerance, patience=patience, quorum=quorum)
        self.on_equilibrium = on_equilibrium
        self.decay_factor = decay_factor
        self.min_lr = min_lr
        self.max_decays = max_decays
        self.cooldown = cooldown
        self.rescale_weights = rescale_weights
        self.stop_at_min_lr = stop_at_min_lr
        if not isinstance(horizon, int) or not 1 <= horizon <= self.window:
            raise ValueError(f"`horizon` must be an integer in [1, window], got {horizon!r}.")
        self.horizon = horizon
        # Constructor values (setup() may resolve every_n_steps later): a stable state key.
        self._key_arguments = {
            "params": repr(params),
            "granularity": granularity,
            "every_n_steps": every_n_steps,
            "window": window,
            "horizon": horizon,
        }
        self.history: list[dict[str, Any]] = []
        self.events: list[EquilibriumEvent] = []
        self._decays = 0
        self._cooldown_until = 0
        self._quorum_reached = False
        self._estimate_announced = False
        self._units: list[UnitSpec] | None = None
        self.report: InvarianceReport | None = None
        self.monitor: SphericalMonitor | None = None
        self._tracer: ScaleInvarianceTracer | None = None
        self._pending_windows: list[UnitWindow] = []
        self._pending_state: dict[str, Any] | None = None
        self._warned: set[str] = set()
        self._disabled = False

    @property
    def state_key(self) -> str:
        """Unique per configuration, so that several instances can share a Trainer."""
        return self._generate_state_key(**self._key_arguments)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve ``every_n_steps`` from the Trainer."""
        if stage != "fit":
            return
        if self.every_n_steps is None:
            # `Trainer.log_every_n_steps` is set dynamically (0 in barebones mode: use 50).
            self.every_n_steps = int(getattr(trainer, "log_every_n_steps", 0)) or 50
            self.window = min(self.window, self.every_n_steps)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check that the requested action can be carried out with these optimizers/schedulers."""
        if self.on_equilibrium != "decay_lr":
            return
        check_schedulers_supported(config.scheduler for config in trainer.lr_scheduler_configs)
        if self.rescale_weights:
            for optimizer in trainer.optimizers:
                check_rescale_supported(optimizer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """On the first batch, follow the forward pass to find the invariant units."""
        if self.monitor is not None or self._disabled or self._tracer is not None:
            return
        if self._units is not None:  # resumed: the units were found before the checkpoint
            self._start_monitor(trainer, pl_module, self._units)
        elif self.params == "auto":
            self._tracer = _shared_tracer(pl_module)
        else:
            self._start_monitor(trainer, pl_module, self._explicit_units(pl_module))

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any
    ) -> None:
        """The first forward is over: read the tracer and start measuring."""
        if self._tracer is None:
            return
        tracer, self._tracer = self._tracer, None
        _release_tracer(pl_module, tracer)
        report = tracer.report()
        if not report.units:
            fallback = structural_candidates(pl_module)
            if fallback.units:
                report = fallback
        self.report = report
        rank_zero_info(f"[lightning_sdm] {report.summary()}")
        self._start_monitor(trainer, pl_module, UnitSpec.from_report(report))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Log the windows the optimizer steps of this batch closed."""
        if self.monitor is None:
            return
        windows = self.monitor.pop_windows()
        if windows:
            self._report_verification(self.monitor)
            self._log_windows(trainer, pl_module, windows)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Never leave the tracer or the hooks behind."""
        self._shutdown()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give logger integrations the final per-unit results."""
        if self.monitor is not None:
            integrations.on_monitoring_finished(trainer, self)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the optimizer hooks."""
        if stage == "fit":
            self._shutdown()

    def state_dict(self) -> dict[str, Any]:
        """Step counters, equilibrium state and history, for exact resumption."""
        monitor_state = self.monitor.state_dict() if self.monitor is not None else None
        return {
            "monitor": monitor_state or (self._pending_state or {}).get("monitor"),
            "units": [asdict(unit) for unit in self._units] if self._units is not None else None,
            "detector": self.detector.state_dict(),
            "history": list(self.history),
            "events": [event.as_dict() for event in self.events],
            "decays": self._decays,
            "cooldown_until": self._cooldown_until,
            "quorum_reached": self._quorum_reached,
            "estimate_announced": self._estimate_announced,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the monitor state applies once it starts)."""
        self.detector.load_state_dict(state_dict.get("detector", {}))
        self.history = list(state_dict.get("history", []))
        self.events = [_event_from_dict(event) for event in state_dict.get("events", [])]
        self._decays = int(state_dict.get("decays", 0))
        self._cooldown_until = int(state_dict.get("cooldown_until", 0))
        self._quorum_reached = bool(state_dict.get("quorum_reached", False))
        self._estimate_announced = bool(state_dict.get("estimate_announced", False))
        units = state_dict.get("units")
        if units is not None:
            self._units = [_unit_spec_from_dict(unit) for unit in units]
        self._pending_state = dict(state_dict)

    # ------------------------------------------------------------------ internals

    def _start_monitor(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, units: list[UnitSpec]
    ) -> None:
        if not units:
            self._warn_once(
                "no_units",
                "SphericalDynamicsCallback found no scale-invariant weights in "
                f"{type(pl_module).__name__} (no weight reaches a BatchNorm/GroupNorm/LayerNorm/"
                "InstanceNorm through positively homogeneous operations only). Nothing will be "
                "measured; pass `params=[...]` to monitor weights explicitly.",
            )
            self._disabled = True
            return
        assert self.every_n_steps is not None
        self._units = list(units)
        self.monitor = SphericalMonitor(
            pl_module,
            trainer.optimizers,
            units,
            granularity=self.granularity,
            every_n_steps=self.every_n_steps,
            window=self.window,
            verify_steps=self.verify_steps,
            orthogonality_tolerance=self.orthogonality_tolerance,
            horizon=self.horizon,
        )
        if self._pending_state and self._pending_state.get("monitor"):
            self.monitor.load_state_dict(self._pending_state["monitor"])
        else:
            # Steps taken before the monitor started still count. Lightning's global step
            # counts the steps of all optimizers together.
            per_optimizer = trainer.global_step // max(len(trainer.optimizers), 1)
            self.monitor.load_state_dict({"steps_done": [per_optimizer] * len(trainer.optimizers)})
        self.monitor.attach()
        if self.monitor.skipped:
            skipped = ", ".join(f"{name} ({why})" for name, why in self.monitor.skipped.items())
            self._warn_once("skipped", f"SphericalDynamicsCallback does not monitor: {skipped}.")
        if not self.monitor.units:
            self._disabled = True
            self.monitor.detach()
            self.monitor = None
            return
        self._warn_missing_predictions(self.monitor)
        integrations.on_monitoring_started(trainer, self)

    def _warn_missing_predictions(self, monitor: SphericalMonitor) -> None:
        reasons: dict[str, list[str]] = {}
        for name, prediction in monitor.predictions().items():
            if prediction.angular_update is None:
                reasons.setdefault(prediction.reason, []).append(name)
        for reason, names in reasons.items():
            self._warn_once(
                f"no_prediction:{reason}",
                f"SphericalDynamicsCallback has no predicted equilibrium for {', '.join(names)}: "
                f"{reason}. Measured angular updates are still logged; equilibrium is then "
                "judged by stationarity alone.",
            )

    def _report_verification(self, monitor: SphericalMonitor) -> None:
        for name, (status, cosine) in monitor.invariance.items():
            if status != "violated":
                continue
            self._warn_once(
                f"violated:{name}",
                f"SphericalDynamicsCallback: {name} is monitored but its gradient is not "
                f"orthogonal to it (|cos(w, grad)| = {cosine:.2e} > "
                f"{self.orthogonality_tolerance:g}), so it is probably not scale-invariant and the "
                "theory does not apply to it. Its figures are still logged, marked "
                "`invariance='violated'` in `history`.",
            )

    def _log_windows(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, windows: list[UnitWindow]
    ) -> None:
        entered = self.detector.update(windows)
        assert self.monitor is not None
        invariance = self.monitor.invariance
        metrics: dict[str, float] = {}
        for window in windows:
            metrics.update(_window_metrics(window))
            unit = self.detector.state[window.unit]
            metrics[f"sdm/in_equilibrium/{window.unit}"] = float(unit.in_equilibrium)
            self.history.append(
                {
                    "step": trainer.global_step,
                    "unit": window.unit,
                    "angular_update": window.angular_update,
                    "theory": window.theory,
                    "ratio": window.ratio,
                    "weight_norm": window.weight_norm,
                    "lr": window.lr,
                    "in_equilibrium": unit.in_equilibrium,
                    "equilibrium_criterion": unit.criterion,
                    "invariance": invariance[window.unit][0],
                    "frozen": window.frozen,
                    "channels": window.channels,
                    "horizon_angular_update": window.horizon_angular_update,
                    "channel_ratios": window.channel_ratios,
                    "time_scale": window.time_scale,
                }
            )
        ratios = [w.ratio for w in windows if w.ratio is not None and math.isfinite(w.ratio)]
        median_ratio = statistics.median(ratios) if ratios else math.nan
        metrics["sdm/angular_update_ratio"] = median_ratio
        metrics["sdm/equilibrium_fraction"] = self.detector.fraction()
        self._warn_non_finite(windows)
        metrics["sdm/steps_to_equilibrium"] = self.detector.steps_to_equilibrium()
        self._announce_estimate(trainer)
        metrics.update(self._maybe_act(trainer, pl_module, windows))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.prog_bar and math.isfinite(median_ratio):
            pl_module.log("sdm_ratio", median_ratio, prog_bar=True, logger=False)
        for name in entered:
            unit = self.detector.state[name]
            rank_zero_info(
                f"[lightning_sdm] {name} reached equilibrium at step {unit.reached_step} "
                f"(criterion: {unit.criterion})."
            )

    def _announce_estimate(self, trainer: pl.Trainer) -> None:
        estimate = self.detector.steps_to_equilibrium()
        if self._estimate_announced or not math.isfinite(estimate) or estimate <= 0:
            return
        self._estimate_announced = True
        rank_zero_info(
            f"[lightning_sdm] step {trainer.global_step}: about {estimate:.0f} more steps until "
            f"{self.detector.quorum:.0%} of the units reach equilibrium (theory's relaxation "
            "time, refined by the measured trend)."
        )

    def _maybe_act(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, windows: list[UnitWindow]
    ) -> dict[str, float]:
        """Fire one event when the quorum enters equilibrium (outside a cooldown)."""
        due = self.detector.reached() and trainer.global_step >= self._cooldown_until
        # Values are identical on all ranks already (statistics are reduced before any angle);
        # agreeing explicitly keeps the decision collective even if that ever changed.
        due = bool(trainer.strategy.reduce_boolean_decision(due, all=True))
        fire = due and not self._quorum_reached
        self._quorum_reached = due
        if not fire:
            return {}
        event = self._make_event(trainer, windows)
        event = self._carry_out(trainer, pl_module, event)
        self.events.append(event)
        self._message(event)
        metrics = {"sdm/lr_decays": float(self._decays), "sdm/equilibrium_event_step": event.step}
        if event.new_lrs:
            metrics["sdm/lr_after_event"] = event.new_lrs[0]
        return metrics

    def _make_event(self, trainer: pl.Trainer, windows: list[UnitWindow]) -> EquilibriumEvent:
        units = tuple(name for name, u in self.detector.state.items() if u.in_equilibrium)
        by_unit = {w.unit: w for w in windows}
        criteria = {self.detector.state[name].criterion for name in units}
        return EquilibriumEvent(
            step=trainer.global_step,
            units=units,
            fraction=self.detector.fraction(),
            measured={n: by_unit[n].angular_update for n in units if n in by_unit},
            predicted={n: by_unit[n].theory for n in units if n in by_unit},
            criterion="stationary" if "stationary" in criteria else "theory",
            action=self.on_equilibrium if isinstance(self.on_equilibrium, str) else "callable",
        )

    def _carry_out(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: EquilibriumEvent
    ) -> EquilibriumEvent:
        if callable(self.on_equilibrium):
            self.on_equilibrium(trainer, pl_module, event)
            return event
        if self.on_equilibrium == "stop":
            trainer.should_stop = True
            return event
        if self.on_equilibrium != "decay_lr":
            return event
        exhausted = self.max_decays is not None and self._decays >= self.max_decays
        changes = [] if exhausted else self._decay(trainer)
        if not any(new < old for old, new in changes):
            if self.stop_at_min_lr:
                trainer.should_stop = True
            return replace(event, action="stop" if self.stop_at_min_lr else "none")
        self._decays += 1
        return replace(
            event,
            old_lrs=tuple(old for old, _ in changes),
            new_lrs=tuple(new for _, new in changes),
        )

    def _decay(self, trainer: pl.Trainer) -> list[tuple[float, float]]:
        """Decay every param group that holds monitored units; rescale and set the cooldown."""
        assert self.monitor is not None
        groups: dict[int, tuple[Any, set[int]]] = {}
        for optimizer, index in self.monitor.parameter_groups().values():
            groups.setdefault(id(optimizer), (optimizer, set()))[1].add(index)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        changes: list[tuple[float, float]] = []
        for optimizer, indices in groups.values():
            changes.extend(
                decay_param_groups(
                    optimizer, sorted(indices), self.decay_factor, self.min_lr, schedulers
                )
            )
        if not any(new < old for old, new in changes):
            return changes
        decay = max(old / new for old, new in changes if new > 0)
        if self.rescale_weights:
            self._rescale(decay)
        cooldown = self.cooldown if self.cooldown is not None else self._relaxation_after(decay)
        self._cooldown_until = trainer.global_step + cooldown
        self.detector.restart(trainer.global_step, cooldown)
        return changes

    def _rescale(self, decay: float) -> None:
        assert self.monitor is not None
        params = self.monitor.unit_parameters()
        by_optimizer: dict[int, tuple[Any, list[Any]]] = {}
        for name, (optimizer, _) in self.monitor.parameter_groups().items():
            by_optimizer.setdefault(id(optimizer), (optimizer, []))[1].append(params[name])
        for optimizer, units in by_optimizer.values():
            rescale_for_lr_decay(optimizer, units, decay)

    def _relaxation_after(self, decay: float) -> int:
        """Steps to the new equilibrium after an LR decay by ``decay``, for the slowest unit.

        SGD: SMD Cor. 3.1 with the new LR, ``ceil(log(k) (1 - alpha) / (2 lam eta))``. Decoupled
        weight decay (AdamW, Lion): ``ceil(log(k) / (eta lam))``; the SGD formula with
        ``alpha = 0`` ends at ~83% of the new prediction there (measured in
        ``docs/reproduction.md``), this one at the same ~95% level SMD's formula gives SGD.
        """
        assert self.monitor is not None
        longest = 0
        for prediction in self.monitor.predictions().values():
            hyper = prediction.hyperparameters
            lr, weight_decay = hyper.get("lr", 0.0), hyper.get("weight_decay", 0.0)
            if lr <= 0 or weight_decay <= 0 or decay <= 1:
                continue
            if "momentum" in hyper:
                steps = lr_decay_relaxation_steps(decay, lr, weight_decay, hyper["momentum"])
            else:
                steps = math.ceil(math.log(decay) / (lr * weight_decay))
            longest = max(longest, steps)
        return longest

    def _message(self, event: EquilibriumEvent) -> None:
        figures = ", ".join(
            f"{name}: {event.measured.get(name, math.nan):.3g} rad/step vs "
            f"{_format_prediction(event.predicted.get(name))}"
            for name in event.units
        )
        text = (
            f"[lightning_sdm] step {event.step}: {event.fraction:.0%} of the units are in "
            f"equilibrium (criterion: {event.criterion}): {figures}."
        )
        if event.new_lrs:
            pairs = zip(event.old_lrs, event.new_lrs, strict=True)
            lrs = ", ".join(f"{old:.3g} -> {new:.3g}" for old, new in pairs)
            text += f" Learning rate decayed ({lrs}), decay #{self._decays}."
        elif event.action == "none":
            text += " No decay: min_lr or max_decays reached."
        elif event.action == "stop":
            text += " Asking the Trainer to stop."
        if event.action == "warn":
            rank_zero_warn(text)
        else:
            rank_zero_info(text)

    def _warn_non_finite(self, windows: list[UnitWindow]) -> None:
        bad = [w.unit for w in windows if not math.isfinite(w.angular_update)]
        if bad:
            self._warn_once(
                "nan",
                "SphericalDynamicsCallback: the weights of "
                f"{', '.join(bad)} contain NaN/Inf or are zero; their angular updates are "
                "logged as NaN. Training continues; check the learning rate and the loss.",
            )

    def _explicit_units(self, pl_module: pl.LightningModule) -> list[UnitSpec]:
        named = dict(pl_module.named_parameters())
        if isinstance(self.params, str) or (
            isinstance(self.params, Sequence) and all(isinstance(p, str) for p in self.params)
        ):
            patterns = [self.params] if isinstance(self.params, str) else list(self.params)
            selected = _match_names(list(named), patterns)  # type: ignore[arg-type]
            if not selected:
                raise MisconfigurationException(
                    f"`params={self.params!r}` matches no parameter of "
                    f"{type(pl_module).__name__}. Available names include: "
                    f"{list(named)[:8]}."
                )
            return _units_from_names(pl_module, selected)
        return _units_from_modules(pl_module, list(self.params))  # type: ignore[arg-type]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _shutdown(self) -> None:
        if self._tracer is not None:
            for module_id, tracer in list(_ACTIVE_TRACERS.items()):
                if tracer is self._tracer:
                    tracer.__exit__(None, None, None)
                    del _ACTIVE_TRACERS[module_id]
            self._tracer = None
        if self.monitor is not None:
            self.monitor.detach()


# ---------------------------------------------------------------------- helpers

# One tracer per module at a time: several callbacks on one Trainer (say, layer and channel
# granularity) share the trace of the first training step instead of tracing each other's hooks.
_ACTIVE_TRACERS: dict[int, ScaleInvarianceTracer] = {}


def _shared_tracer(module: nn.Module) -> ScaleInvarianceTracer:
    tracer = _ACTIVE_TRACERS.get(id(module))
    if tracer is None:
        tracer = ScaleInvarianceTracer(module)
        tracer.__enter__()
        _ACTIVE_TRACERS[id(module)] = tracer
    return tracer


def _release_tracer(module: nn.Module, tracer: ScaleInvarianceTracer) -> None:
    """Stop ``tracer`` if it still runs (the first callback to read it stops it)."""
    if _ACTIVE_TRACERS.get(id(module)) is tracer:
        del _ACTIVE_TRACERS[id(module)]
        tracer.__exit__(None, None, None)


def _check_params_spec(params: Any) -> None:
    if isinstance(params, str):
        if params != "auto" and not params:
            raise ValueError("`params` must be 'auto', names/patterns, or modules; got ''.")
        return
    if isinstance(params, nn.Module):
        return
    if isinstance(params, Sequence) and params:
        kinds = {isinstance(p, str) for p in params} | {isinstance(p, nn.Module) for p in params}
        if all(isinstance(p, (str, nn.Module)) for p in params) and len(kinds) <= 2:
            return
    raise ValueError(
        "`params` must be 'auto', a parameter name / glob / 're:' regex (or a non-empty list of "
        f"them), or a non-empty list of modules; got {params!r}."
    )


def _match_names(names: list[str], patterns: list[str]) -> list[str]:
    matched = []
    for name in names:
        for pattern in patterns:
            if pattern.startswith("re:"):
                hit = re.fullmatch(pattern[3:], name) is not None
            else:
                hit = fnmatch.fnmatchcase(name, pattern)
            if hit:
                matched.append(name)
                break
    return matched


def _units_from_names(pl_module: nn.Module, names: list[str]) -> list[UnitSpec]:
    """One unit per selected weight; a selected bias of the same module joins its weight."""
    modules = dict(pl_module.named_modules())
    chosen = set(names)
    units = []
    for name in names:
        owner, _, attr = name.rpartition(".")
        if attr == "bias" and f"{owner}.weight" in chosen:
            continue  # joined to its weight below
        params = [name]
        if attr == "weight" and f"{owner}.bias" in chosen:
            params.append(f"{owner}.bias")
        module = modules.get(owner)
        channel_dim = 1 if isinstance(module, _ConvTransposeNd) else 0
        units.append(UnitSpec(name, tuple(params), channel_dim=channel_dim, source="explicit"))
    return units


def _units_from_modules(pl_module: nn.Module, selected: list[nn.Module]) -> list[UnitSpec]:
    names = {id(module): name for name, module in pl_module.named_modules()}
    units = []
    for module in selected:
        if id(module) not in names:
            raise MisconfigurationException(
                f"`params` holds a {type(module).__name__} that is not a submodule of the "
                "LightningModule."
            )
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise MisconfigurationException(
                f"`params` holds module {names[id(module)]!r} ({type(module).__name__}), which "
                "has no `weight` parameter."
            )
        prefix = f"{names[id(module)]}." if names[id(module)] else ""
        params = [f"{prefix}weight"]
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            params.append(f"{prefix}bias")
        channel_dim = 1 if isinstance(module, _ConvTransposeNd) else 0
        units.append(UnitSpec(params[0], tuple(params), channel_dim=channel_dim))
    return units


def _window_metrics(window: UnitWindow) -> dict[str, float]:
    name = window.unit
    nan = math.nan
    theory = window.theory if window.theory is not None else nan
    ratio = window.ratio if window.ratio is not None else nan
    metrics = {f"sdm/weight_norm/{name}": window.weight_norm}
    if window.channels is None:
        metrics[f"sdm/angular_update/{name}"] = window.angular_update
        metrics[f"sdm/angular_update_ratio/{name}"] = ratio
    else:
        for key, value in window.channels.items():
            metrics[f"sdm/angular_update/{name}/{key}"] = value
        for key, value in (window.channel_ratios or {}).items():
            metrics[f"sdm/angular_update_ratio/{name}/{key}"] = value
    metrics[f"sdm/angular_update_theory/{name}"] = theory
    if window.horizon_angular_update is not None:
        metrics[f"sdm/angular_update_horizon/{name}"] = window.horizon_angular_update
    return metrics


def _check_action_arguments(
    on_equilibrium: Any,
    decay_factor: float,
    min_lr: float,
    max_decays: int | None,
    cooldown: int | None,
    rescale_weights: bool,
) -> None:
    if not callable(on_equilibrium) and on_equilibrium not in ACTIONS:
        raise ValueError(
            f"`on_equilibrium` must be one of {ACTIONS} or a callable "
            f"(trainer, pl_module, event), got {on_equilibrium!r}."
        )
    if not 0 < decay_factor < 1:
        raise ValueError(f"`decay_factor` must be in (0, 1), got {decay_factor!r}.")
    if not (isinstance(min_lr, (int, float)) and min_lr >= 0):
        raise ValueError(f"`min_lr` must be a number >= 0, got {min_lr!r}.")
    if max_decays is not None and (not isinstance(max_decays, int) or max_decays < 0):
        raise ValueError(f"`max_decays` must be None or an integer >= 0, got {max_decays!r}.")
    if cooldown is not None and (not isinstance(cooldown, int) or cooldown < 0):
        raise ValueError(f"`cooldown` must be None or an integer >= 0, got {cooldown!r}.")
    if rescale_weights and on_equilibrium != "decay_lr":
        raise ValueError("`rescale_weights=True` needs `on_equilibrium='decay_lr'`.")


def _event_from_dict(values: dict[str, Any]) -> EquilibriumEvent:
    values = dict(values)
    for key in ("units", "old_lrs", "new_lrs"):
        values[key] = tuple(values.get(key, ()))
    return EquilibriumEvent(**values)


def _unit_spec_from_dict(values: dict[str, Any]) -> UnitSpec:
    values = dict(values)
    values["params"] = tuple(values["params"])
    return UnitSpec(**values)


def _format_prediction(value: float | None) -> str:
    return "no prediction" if value is None else f"{value:.3g} predicted"
