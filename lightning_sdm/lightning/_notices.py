"""What the callback tells the user, each thing once, on rank zero (texts in ``_messages``).

Two channels, as in Lightning:

* :data:`log`, the ``logging`` logger ``"lightning_sdm"`` (set up as Lightning sets up
  ``"lightning.pytorch"``: level INFO, its own console handler unless the root logger has one),
  for routine events and advisory notes: what was found, what theory predicts, the notes on the
  param groups and the schedule, units entering equilibrium, the summary at the end of fit. With
  ``verbose=False`` they go to DEBUG (``logging.getLogger("lightning_sdm").setLevel`` works too).
  They are not Python warnings: ``python -W error`` never stops a run on a note.
* ``warnings`` (``rank_zero_warn``) for what a user must act on: no unit found, a failed trace, a
  unit that fails the invariance check, NaN, a param-group set-up that breaks the predictions, a
  lost logger, and the equilibrium events with ``on_equilibrium="warn"``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace

from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from lightning_sdm import _messages
from lightning_sdm._checks import check_bool
from lightning_sdm.advice._advice import Advice, GroupAdvice, advise
from lightning_sdm.advice._audit import Finding, audit_param_groups
from lightning_sdm.advice._schedule import ScheduledLR
from lightning_sdm.equilibrium._detector import EquilibriumDetector
from lightning_sdm.invariance import InvarianceReport
from lightning_sdm.monitor._cost import schedule_within
from lightning_sdm.monitor._monitor import SphericalMonitor, orthogonality_threshold
from lightning_sdm.records import UnitWindow

__all__ = ["Notices", "log"]

#: The package's logger (see the module docstring).
log = logging.getLogger("lightning_sdm")
if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers() and not log.handlers:
    log.addHandler(logging.StreamHandler())
    log.propagate = False

# Audit findings that break the predictions: warnings; the others are notes.
_SERIOUS = ("invariant_without_decay", "adam_coupled_l2", "split_unit", "decay_lost_to_rounding")


def texts_for_loggers(advice: Advice | None, report: InvarianceReport | None) -> dict[str, str]:
    """What the loggers keep as text: the advice, and the full detection report.

    The console shows the detection report's short summary only; the full list goes here.
    """
    return {
        "advice": advice.text() if advice is not None else "",
        "detection": report.summary() if report is not None else "",
    }


class Notices:
    """One-time warnings and notes of one callback (the estimate survives a resume)."""

    def __init__(self, verbose: bool = True) -> None:
        check_bool("verbose", verbose)  # the callback's and the plugin's argument
        self.verbose = verbose
        self.warned: set[str] = set()
        self.estimate_announced = False
        self._without_prediction: set[str] | None = None

    def warn_once(self, key: str, message: str) -> None:
        """A Python warning, once: something the user must act on."""
        if key not in self.warned:
            self.warned.add(key)
            rank_zero_warn(message)

    def info(self, message: str) -> None:
        """A routine event or an advisory note: INFO on rank zero, DEBUG when not verbose."""
        _emit(logging.INFO if self.verbose else logging.DEBUG, message)

    def detail(self, message: str) -> None:
        """What the loggers and the callback's attributes hold in full: DEBUG only."""
        _emit(logging.DEBUG, message)

    def info_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            self.info(message)

    def discovery(self, report: InvarianceReport, model: str) -> None:
        """What the traces of the first batch found (one line; ``report.summary()``: all)."""
        names = [unit.name for unit in report.units]
        self.info(_messages.units_found(names, report.method, report.rejection_counts()))
        self.detail(f"{_messages.PREFIX} {report.short_summary()}")
        if report.failed:
            names = [unit.name for unit in report.units]
            self.warn_once("trace_failed", _messages.trace_failed(report.notes, names))
        if not report.units:
            reasons = report.rejection_counts()
            self.warn_once("no_units", _messages.no_units_found(model, reasons))

    def advise(
        self,
        *,
        optimizers: Sequence[Optimizer],
        module: nn.Module,
        monitor: SphericalMonitor,
        report: InvarianceReport | None,
        budget: int | None,
        steps_per_epoch: int | None,
        schedules: Sequence[ScheduledLR],
        tolerance: float,
        manual: bool = False,
        shared_max_steps: int | None = None,
    ) -> tuple[Advice, list[Finding]]:
        """What the hyper-parameters and the schedule predict, shown once, and the audit.

        ``manual``: under manual optimization how often each optimizer and scheduler steps is
        unknown before step 1: the advice assumes once per batch and says so in its note.
        ``shared_max_steps``: the Trainer's ``max_steps`` where it ends the run and counts the
        steps of several optimizers together (the note then says how it is shared).
        """
        optimizers = list(optimizers)
        units = {
            name: (next(i for i, o in enumerate(optimizers) if o is opt), group)
            for name, (opt, group) in monitor.parameter_groups().items()
        }
        # Muon's equilibrium depends on the matrix's shape: the advice gives it per shape.
        shapes = {name: tuple(p[0].shape) for name, p in monitor.unit_parameters().items() if p}
        advice = advise(
            optimizers,
            units,
            budget,
            steps_per_epoch,
            list(schedules),
            tolerance=tolerance,
            shapes=shapes,
        )
        if manual:
            count = len(optimizers)
            assumed = _messages.advice_manual_optimization(budget, shared_max_steps, count)
            advice = replace(advice, note="; ".join(n for n in (advice.note, assumed) if n))
        # The table is in the loggers' texts (sdm/advice) and in `callback.advice`; one line here.
        self.info(_messages.predicted([_prediction_line(group) for group in advice.groups]))
        self.detail(
            f"{_messages.PREFIX} What theory predicts for these settings:\n{advice.table()}"
        )
        for line in advice.warnings():  # advisory: the run is valid as it is
            self.info_once(f"advice:{line}", f"{_messages.PREFIX} note: {line}")
        invariant = report.units if report is not None else monitor.unit_specs
        findings = audit_param_groups(module, optimizers, invariant, report)
        for finding in findings:
            text = f"{_messages.PREFIX} parameter groups: {finding.message}"
            if finding.kind in _SERIOUS:
                self.warn_once(f"audit:{finding.kind}", text)
            else:
                self.info_once(f"audit:{finding.kind}", text)
        return advice, findings

    def monitor_started(self, monitor: SphericalMonitor) -> None:
        if monitor.skipped:
            self.warn_once("skipped", _messages.skipped_units(monitor.skipped))
        for key, message in _messages.missing_predictions(monitor.predictions()).items():
            self.warn_once(key, message)
        if monitor.granularity == "channel":
            whole = sorted(set(monitor.units) - set(monitor.channel_units))
            if whole:  # said once: their per-channel keys would otherwise just be missing
                self.info_once("whole_units", _messages.whole_units_under_channel(whole))

    def window_closed(self, monitor: SphericalMonitor, tolerance: float, global_step: int) -> None:
        """What changed under the monitor: failed checks, moved units, lost predictions."""
        self.verification(monitor, tolerance)
        for name, (old, new) in monitor.moved.items():
            message = _messages.moved_group(name, old, new, global_step)
            self.warn_once(f"moved:{name}:{new}", message)
        predictions = monitor.predictions()
        without = {name for name, p in predictions.items() if p.angular_update is None}
        if self._without_prediction is not None:
            lost = {name: predictions[name] for name in sorted(without - self._without_prediction)}
            for key, message in _messages.missing_predictions(lost, global_step).items():
                self.warn_once(f"lost:{key}", message)
        self._without_prediction = without

    def cost(self, monitor: SphericalMonitor, budget: float = 0.01) -> None:
        """Once, after the first steady-state interval: the schedule costs over ``budget``.

        CPU runs only: on an accelerator the hooks' host time is not what the measurement costs.
        """
        meter = monitor.cost
        if "cost" in self.warned or not meter.ready:
            return
        self.warned.add("cost")  # judged once, whatever the verdict
        params = [p for ps in monitor.unit_parameters().values() for p in ps]
        on_cpu = all(p.device.type == "cpu" for p in params)
        assert meter.steady is not None
        fraction, per_measured, per_step = meter.steady
        if on_cpu and fraction > budget:
            every, window = monitor.config.every_n_steps, monitor.config.window
            assert every is not None
            fitting = schedule_within(budget, every, window, per_measured, per_step)
            figures = (fraction, per_measured, per_step, every, window, budget, fitting)
            self.info(_messages.monitor_cost(*figures))

    def verification(self, monitor: SphericalMonitor, tolerance: float) -> None:
        """Units whose gradient is not orthogonal to them (probably not scale-invariant)."""
        params = monitor.unit_parameters()
        for name, (status, cosine) in monitor.invariance.items():
            if status == "violated":
                limit = orthogonality_threshold(params[name], tolerance)
                self.warn_once(f"violated:{name}", _messages.not_orthogonal(name, cosine, limit))

    def windows(
        self,
        windows: Sequence[UnitWindow],
        detector: EquilibriumDetector,
        entered: Sequence[str],
        global_step: int,
    ) -> None:
        """Non-finite values, the first time-to-equilibrium estimate, units entering it."""
        bad = [w.unit for w in windows if not math.isfinite(w.angular_update)]
        if bad:
            self.warn_once("nan", _messages.non_finite(bad))
        estimate = detector.steps_to_equilibrium()
        if not self.estimate_announced and math.isfinite(estimate) and estimate > 0:
            self.estimate_announced = True
            self.info(_messages.steps_to_equilibrium(global_step, estimate, detector.quorum))
        for name in entered:  # each unit in the summary at the end; the event says the quorum
            state = detector.state[name]
            self.detail(
                _messages.entered_equilibrium(
                    name, state.reached_global_step, state.reached_optimizer_step, state.criterion
                )
            )


def _prediction_line(
    group: GroupAdvice,
) -> tuple[str, float | tuple[float, float] | None, float | None]:
    """A group's label, predicted angle and relaxation time at the peak LR, for the console.

    Where the equilibrium depends on the matrix's shape (Muon) and the shapes are known, the
    angle is the range of the group's shapes: the group's own value is a wide matrix's, which
    none of its units may be.
    """
    taus = [phase.relaxation_time for phase in group.phases if phase.relaxation_time]
    tau = min(taus) if taus else None  # at the peak LR, as the angle
    angle: float | tuple[float, float] | None = group.prediction.angular_update
    shaped = [value for _, value, _ in group.by_shape if value is not None]
    if shaped:
        angle = (min(shaped), max(shaped)) if min(shaped) != max(shaped) else shaped[0]
    return f"{group.prediction.optimizer} {group.where}", angle, tau


@rank_zero_only
def _emit(level: int, message: str) -> None:
    log.log(level, message)
