"""The window pipeline, once for both adapters: windows -> detector -> history -> metrics -> event.

Lightning's ``SpikeDetection`` keeps its logic in a core that knows no Trainer
(``lightning/fabric/utilities/spike.py``) under a 32-line Trainer adapter; this is that core for
the monitor. A :class:`Session` owns the settings (:class:`~lightning_sdm.config.MonitorConfig`),
the :class:`~lightning_sdm.equilibrium.EquilibriumDetector`, the
:class:`~lightning_sdm.actions.EquilibriumPolicy`, the one-time notices and the ``history``. The
Trainer callback and the Fabric plugin hand it the windows a
:class:`~lightning_sdm.monitor.SphericalMonitor` closed, with a :class:`Host`: what the framework
offers at that moment (the step, the loggers, how to log and how to stop). The session knows
neither a Trainer nor Fabric.

What it does with a batch of windows (:meth:`Session.windows`):

1. notices of what changed under the monitor (failed orthogonality checks, moved groups, lost
   predictions);
2. the detector's verdicts, one :class:`~lightning_sdm.records.HistoryRecord` per window;
3. the W&B window table (rank zero);
4. the ``sdm/...`` metrics of the windows and the summary;
5. the event, if one is due (the quorum enters equilibrium, agreed across ranks, or the action's
   budget deadline): carried out, announced, sent to the loggers' alerts;
6. the metrics to ``host.log``, also when the action failed (the error then propagates).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_sdm import _messages
from lightning_sdm.actions._actions import ActionContext, EquilibriumAction
from lightning_sdm.actions._policy import EquilibriumPolicy, decays_of
from lightning_sdm.config import MonitorConfig
from lightning_sdm.equilibrium._detector import EquilibriumDetector
from lightning_sdm.keys import Keys, LogLevel, event_metrics, summary_metrics, window_metrics
from lightning_sdm.lightning import _loggers
from lightning_sdm.lightning._notices import Notices
from lightning_sdm.monitor._monitor import SphericalMonitor
from lightning_sdm.records import EquilibriumEvent, HistoryRecord, UnitWindow

__all__ = ["Host", "Session", "SessionViews"]


@dataclass
class Host:
    """What the framework offers the session at one call.

    Attributes:
        global_step: the framework's step count (the x-axis of the logs).
        log: takes the metrics of this call (every logger of the run).
        loggers: the run's logger objects, for their extras (TensorBoard layouts, W&B tables
            and alerts); loggers the extras do not know are left alone.
        is_global_zero: this process is rank zero (the extras run there only).
        total_steps: the budget in global steps, ``None`` when unknown.
        schedulers: the LR schedulers an action may scale.
        trainer: handed to user callables (``None`` outside the Trainer).
        pl_module: handed to user callables.
        request_stop: asks the loop to stop; ``None`` where the loop is the user's (Fabric).
        global_per_optimizer_step: global steps per step of one optimizer (several optimizers
            stepping once per batch under manual optimization).
    """

    global_step: int
    log: Callable[[dict[str, float]], None]
    loggers: Sequence[Any] = ()
    is_global_zero: bool = True
    total_steps: int | None = None
    schedulers: Sequence[Any] = ()
    trainer: Any = None
    pl_module: Any = None
    request_stop: Callable[[], None] | None = None
    global_per_optimizer_step: int = 1


@dataclass
class Session:
    """Settings, detector, policy, notices and history of one monitored run.

    Args:
        config: the monitor's settings.
        detector: judges each unit's windows.
        policy: turns the detector's verdicts into events and carries out its action.
        alerts: send each event to W&B as an alert.
        log_level: which keys each window logs (:data:`~lightning_sdm.keys.LogLevel`).
    """

    config: MonitorConfig
    detector: EquilibriumDetector
    policy: EquilibriumPolicy
    alerts: bool = False
    log_level: LogLevel = "summary"
    history: list[HistoryRecord] = field(default_factory=list)
    notices: Notices = field(default_factory=Notices)
    #: Logger extras that already reported a failure (each is reported once).
    logger_failures: set[str] = field(default_factory=set)
    #: The regimes some unit was in (``log_level="detailed"`` counts these, zeros included).
    regimes_seen: set[str] = field(default_factory=set)

    @property
    def action(self) -> EquilibriumAction:
        """The action carried out at equilibrium events."""
        return self.policy.action

    @property
    def events(self) -> list[EquilibriumEvent]:
        """Every equilibrium event so far, with what was done."""
        return self.policy.events

    def settings(self) -> dict[str, Any]:
        """The detection settings and the action, as logged and as keyed in checkpoints."""
        return {**self.detector.settings, "action": repr(self.policy.action)}

    # ------------------------------------------------------------------ the pipeline

    def windows(self, monitor: SphericalMonitor, windows: Sequence[UnitWindow], host: Host) -> None:
        """Judge, record and log a batch of windows the monitor closed; act if an event is due."""
        step = host.global_step
        self.notices.window_closed(monitor, self.config.orthogonality_tolerance, step)
        detector = self.detector
        entered = detector.update(windows)
        invariance = monitor.invariance
        detailed = self.log_level == "detailed"
        tolerance = detector.tolerance
        metrics = {Keys.TOLERANCE_LOWER: 1.0 - tolerance, Keys.TOLERANCE_UPPER: 1.0 + tolerance}
        for window in windows:
            state = detector.state[window.unit]
            regime = state.regime if detailed else None  # as text in TensorBoard either way
            metrics.update(window_metrics(window, state.in_equilibrium, regime))
            self.history.append(
                HistoryRecord.from_window(
                    window,
                    in_equilibrium=state.in_equilibrium,
                    criterion=state.criterion,
                    invariance=invariance.get(window.unit, ("unverified", 0.0))[0],
                    regime=state.regime,
                    regime_note=state.note,
                )
            )
        if host.is_global_zero:
            _loggers.on_windows_logged(
                host.loggers,
                records=self.history[-len(windows) :],
                global_step=step,
                warned=self.logger_failures,
            )
        fraction, eta = detector.fraction(), detector.steps_to_equilibrium()
        counts = detector.regimes()
        self.regimes_seen.update(counts)
        regimes = {regime: counts.get(regime, 0) for regime in self.regimes_seen}
        metrics.update(summary_metrics(windows, fraction, eta, regimes if detailed else None))
        self.notices.windows(windows, detector, entered, step)
        try:
            metrics.update(self._act(monitor, windows, host))
        finally:  # an action that fails still leaves the window in the logs
            host.log(metrics)

    def between_windows(self, monitor: SphericalMonitor, host: Host) -> None:
        """A step that closed no window: the action's budget deadline may still fall on it."""
        if self.policy.action.deadline(host.global_step, host.total_steps):
            metrics = self._act(monitor, [], host)
            if metrics:
                host.log(metrics)

    def _act(
        self, monitor: SphericalMonitor, windows: Sequence[UnitWindow], host: Host
    ) -> dict[str, float]:
        """The event of these windows, if one is due (decided alike on every rank).

        The verdict is agreed across ranks with :meth:`SphericalMonitor.agree
        <lightning_sdm.monitor.SphericalMonitor.agree>`: the values are identical on all ranks
        already (the statistics are reduced before any angle), and agreeing keeps the decision
        collective even if that ever changed. Not with a strategy's ``reduce_boolean_decision``:
        on the default group a rank out of step would match it with DDP's gradient all-reduce;
        on the monitor's group the wait is bounded.
        """
        reached = monitor.agree(self.detector.reached())
        due = self.policy.due(reached, host.global_step, host.total_steps)
        if due is None:
            return {}
        context = action_context(monitor, host)
        fire = self.policy.fire_deadline if due == "deadline" else self.policy.fire
        event = fire(self.detector, windows, context)
        if context.stop_requested and host.request_stop is not None:
            host.request_stop()
        action = self.policy.action
        text = _messages.describe_event(event, decays_of(action))
        # "warn" asked for a warning; another action's event is routine: the log, once.
        rank_zero_warn(text) if action.warns else self.notices.info(text)
        if host.is_global_zero:
            # Stopped by the action (request_stop sets it) or by a user callable: the Trainer
            # knows either way; under Fabric the loop is the user's and nothing stops.
            stopped = bool(getattr(host.trainer, "should_stop", False))
            _loggers.on_equilibrium_event(
                host.loggers,
                message=text,
                changed=event.new_lrs != event.old_lrs or stopped,
                alerts=self.alerts,
                warned=self.logger_failures,
                title=_messages.alert_title(event, stopped),
            )
        return event_metrics(event, decays_of(action))

    def new_model(self) -> None:
        """Another model is monitored: the detector starts afresh (the history is kept)."""
        self.detector.state.clear()
        self.policy.entering(False)  # its quorum is not reached

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Detector, policy, history and which one-time notes were shown."""
        return {
            "detector": self.detector.state_dict(),
            "policy": self.policy.state_dict(),
            "history": [record.as_dict() for record in self.history],
            "estimate_announced": self.notices.estimate_announced,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.detector.load_state_dict(state.get("detector", {}))
        self.policy.load_state_dict(state.get("policy", {}))
        self.history = [HistoryRecord.from_dict(r) for r in state.get("history", [])]
        self.notices.estimate_announced = bool(state.get("estimate_announced", False))


class SessionViews:
    """What both adapters show of their :class:`Session` (einops' layer mixins: written once)."""

    session: Session

    @property
    def config(self) -> MonitorConfig:
        """The monitor's settings."""
        return self.session.config

    @config.setter
    def config(self, value: MonitorConfig) -> None:
        self.session.config = value

    @property
    def detector(self) -> EquilibriumDetector:
        """The equilibrium detector."""
        return self.session.detector

    @detector.setter
    def detector(self, value: EquilibriumDetector) -> None:
        self.session.detector = value

    @property
    def policy(self) -> EquilibriumPolicy:
        """Turns the detector's verdicts into events."""
        return self.session.policy

    @policy.setter
    def policy(self, value: EquilibriumPolicy) -> None:
        self.session.policy = value

    @property
    def on_equilibrium(self) -> EquilibriumAction:
        """The action carried out at equilibrium events."""
        return self.session.action

    @property
    def events(self) -> list[EquilibriumEvent]:
        """Every equilibrium event so far, with what was done."""
        return self.session.events

    @property
    def history(self) -> list[HistoryRecord]:
        """One record per unit and window, in order."""
        return self.session.history

    @history.setter
    def history(self, records: list[HistoryRecord]) -> None:
        self.session.history = records

    @property
    def _notices(self) -> Notices:
        return self.session.notices


def action_context(monitor: SphericalMonitor, host: Host) -> ActionContext:
    """What an action may read and change: the monitor's units, the host's schedulers."""
    return ActionContext(
        global_step=host.global_step,
        unit_groups=monitor.parameter_groups(),
        unit_parameters=monitor.unit_parameters(),
        predictions=monitor.predictions(),
        schedulers=list(host.schedulers),
        trainer=host.trainer,
        pl_module=host.pl_module,
        total_steps=host.total_steps,
        global_per_optimizer_step=host.global_per_optimizer_step,
    )
