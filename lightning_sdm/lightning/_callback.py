"""Spherical Motion Dynamics of a LightningModule, live, with one callback.

The Lightning plumbing only: measuring is :class:`~lightning_sdm.monitor.SphericalMonitor`,
finding the units :mod:`lightning_sdm.invariance` / :mod:`lightning_sdm.units`, the verdict
:class:`~lightning_sdm.equilibrium.EquilibriumDetector`, what happens at equilibrium
:mod:`lightning_sdm.actions`, the keys and records :mod:`lightning_sdm.records`, and the logger
extras :mod:`lightning_sdm.lightning`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_sdm import _messages
from lightning_sdm._checks import check_bool
from lightning_sdm.actions._actions import EquilibriumAction, as_action
from lightning_sdm.actions._policy import EquilibriumPolicy
from lightning_sdm.advice._advice import Advice
from lightning_sdm.advice._audit import Finding
from lightning_sdm.config import DEFAULT_EVERY_N_STEPS, Engine, MonitorConfig
from lightning_sdm.equilibrium._detector import EquilibriumDetector
from lightning_sdm.invariance import InvarianceReport
from lightning_sdm.keys import LOG_LEVELS, SUMMARY_KEYS, Keys, LogLevel
from lightning_sdm.lightning import _loggers, _trainer
from lightning_sdm.lightning._discovery import UnitDiscovery
from lightning_sdm.lightning._notices import Notices, texts_for_loggers
from lightning_sdm.lightning._resume import adopt_state
from lightning_sdm.lightning._session import Host, Session, SessionViews
from lightning_sdm.monitor._monitor import SphericalMonitor
from lightning_sdm.monitor._state import check_monitor_state
from lightning_sdm.records import ActionName, EquilibriumEvent, Granularity
from lightning_sdm.units import ParamsSpec, Unit, check_params_spec, select_units

__all__ = ["SphericalDynamicsCallback"]

OnEquilibrium = ActionName | EquilibriumAction | Callable[[Any, Any, EquilibriumEvent], Any]


class SphericalDynamicsCallback(SessionViews, Callback):
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

    (:class:`~lightning_sdm.records.Keys`). ``<name>`` is the weight's qualified name in the
    LightningModule (``net.0.weight``). With
    ``granularity="channel"`` the per-unit keys get ``/mean``, ``/std``, ``/min``, ``/p10``,
    ``/median``, ``/p90``, ``/max`` suffixes (statistics over the unit's output channels). The
    progress bar shows ``sdm_ratio`` (the median ratio). The same numbers are kept in
    :attr:`history` (one :class:`~lightning_sdm.records.HistoryRecord` per unit and window).
    Logs use the global step; the detector counts each unit's optimizer steps.

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
            interval). A larger value than ``every_n_steps`` measures every step (the window is
            the interval; said once in the log).
        tolerance: how far (relative) the angular update may still be from its equilibrium, as
            judged by the norm's trend and the ratio's trend (:mod:`lightning_sdm.equilibrium`).
        patience: windows of evidence before any verdict (the pooling horizon is one relaxation
            time, at least this many windows), >= 2. Not ``EarlyStopping``'s patience: a verdict
            rests on the trend of the norm and of the ratio, which needs two windows at least.
        quorum: fraction of units that must be in equilibrium for an equilibrium event.
        on_equilibrium: what to do when the quorum reaches equilibrium: ``"warn"`` (one
            message per event), ``"decay_lr"`` (:class:`~lightning_sdm.actions.DecayLR` with its
            defaults), ``"stop"``, an :class:`~lightning_sdm.actions.EquilibriumAction` such as
            ``DecayLR(factor=0.2, rescale_weights=True)``, or a callable
            ``(trainer, pl_module, event)``. Every event is in :attr:`events` and logged as
            ``sdm/lr_decays``, ``sdm/equilibrium_event_step``, ``sdm/lr_after_event``.
        horizon: also log ``sdm/angular_update_horizon/<name>``, the RMS angle between ``w_t``
            and ``w_{t+horizon}`` (consecutive blocks inside each window), at most ``window``.
        verify_steps: measured steps on which the gradient-orthogonality check runs.
        orthogonality_tolerance: the cross-check's threshold in units of ``1/sqrt(n)`` for a unit
            of ``n`` elements (see :class:`~lightning_sdm.config.MonitorConfig`).
        prog_bar: show the median ratio in the progress bar.
        sync_timeout: seconds a rank waits for the others in the monitor's reductions; past it
            (ranks out of step) monitoring stops there with one warning, training goes on.
        alerts: also send each equilibrium event as a Weights & Biases alert (``run.alert``,
            to the channels set up in W&B) when a ``WandbLogger`` is used.
        verbose: routine events (the units found, the prediction, advisory notes, the summary
            table at the end of fit) on the ``logging`` logger ``"lightning_sdm"`` at INFO, on
            rank zero; ``False``: at DEBUG. Warnings (``warnings.warn``) are kept for what needs
            acting on, and the equilibrium events with ``on_equilibrium="warn"``.
        log_level: ``"summary"`` (the keys of the table above, ``sdm/regime/<name>``, the
            regime's code in :data:`~lightning_sdm.keys.REGIME_CODES`, and
            ``sdm/tolerance_band/lower`` and ``upper``, the band ``1 -/+ tolerance`` of the ratio's
            chart) or ``"detailed"``: also ``sdm/regime_count/<regime>`` (for the regimes seen in
            the run). In TensorBoard the regimes are also a text, ``sdm/regimes``, whenever one
            changes.
        engine: ``"eager"``, ``"compiled"`` (one ``torch.compile``'d pass per measured step) or
            ``"auto"`` (see :data:`~lightning_sdm.config.Engine`).

    Raises:
        ValueError: for an invalid argument (the message names it).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_sdm import SphericalDynamicsCallback
        >>> from lightning_sdm.actions import DecayLR
        >>> trainer = Trainer(callbacks=[SphericalDynamicsCallback()])  # doctest: +SKIP
        >>> callback = SphericalDynamicsCallback(granularity="channel", every_n_steps=20, window=30)
        >>> callback.config.granularity, callback.config.every_n_steps, callback.config.window
        ('channel', 20, 20)
        >>> SphericalDynamicsCallback(on_equilibrium=DecayLR(factor=0.2)).on_equilibrium.factor
        0.2
    """

    def __init__(
        self,
        params: ParamsSpec = "auto",
        granularity: Granularity = MonitorConfig.granularity,
        every_n_steps: int | None = None,
        window: int = MonitorConfig.window,
        tolerance: float = EquilibriumDetector.DEFAULT_TOLERANCE,
        patience: int = EquilibriumDetector.DEFAULT_PATIENCE,
        quorum: float = EquilibriumDetector.DEFAULT_QUORUM,
        on_equilibrium: OnEquilibrium = "warn",
        horizon: int = MonitorConfig.horizon,
        verify_steps: int = MonitorConfig.verify_steps,
        orthogonality_tolerance: float = MonitorConfig.orthogonality_tolerance,
        prog_bar: bool = True,
        sync_timeout: float = MonitorConfig.sync_timeout,
        alerts: bool = False,
        verbose: bool = True,
        log_level: LogLevel = "summary",
        engine: Engine = MonitorConfig.engine,
    ) -> None:
        self.params = check_params_spec(params)
        self._window = window  # as asked: a longer window than the interval is said so
        config = MonitorConfig(
            granularity=granularity,
            every_n_steps=every_n_steps,
            window=window,
            horizon=horizon,
            verify_steps=verify_steps,
            orthogonality_tolerance=orthogonality_tolerance,
            sync_timeout=sync_timeout,
            engine=engine,
        )
        detector = EquilibriumDetector(tolerance=tolerance, patience=patience, quorum=quorum)
        policy = EquilibriumPolicy(as_action(on_equilibrium))
        check_bool("prog_bar", prog_bar)
        check_bool("alerts", alerts)
        self.prog_bar = prog_bar
        if log_level not in LOG_LEVELS:
            raise ValueError(_messages.bad_log_level(log_level, LOG_LEVELS))
        notices = Notices(verbose)
        self.session = Session(
            config, detector, policy, alerts=alerts, notices=notices, log_level=log_level
        )
        # Every setting, as given (setup may resolve every_n_steps): two callbacks that differ in
        # any of them may share a Trainer and a checkpoint.
        self._key_arguments = {"params": repr(params), **config.key(), **self.session.settings()}
        self._state_key = self._generate_state_key(**self._key_arguments)
        self.report: InvarianceReport | None = None
        self.monitor: SphericalMonitor | None = None
        self.advice: Advice | None = None  # what theory predicts for these settings, at start
        self.audit: list[Finding] = []  # param-group set-ups at odds with the theory
        self._units: list[Unit] | None = None
        # _reattach: the monitor was detached at the end of a fit (a second fit attaches it again)
        self._discovery, self._announced, self._reattach = UnitDiscovery(), False, False
        self._monitor_state: dict[str, Any] | None = None
        self._disabled = False
        # The model the units were found in (None: from a checkpoint), and the checkpoint read.
        self._units_model: weakref.ref[nn.Module] | None = None
        self._checkpoint: str | None = None

    # ------------------------------------------------------------------ settings

    @property
    def alerts(self) -> bool:
        """Equilibrium events are also sent as W&B alerts."""
        return self.session.alerts

    @alerts.setter
    def alerts(self, value: bool) -> None:
        self.session.alerts = value

    @property
    def state_key(self) -> str:
        """Unique per configuration, so that several instances can share a Trainer."""
        return self._state_key  # Lightning reads it for every hook call: built once

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve ``every_n_steps`` from the Trainer (its ``log_every_n_steps``)."""
        if stage == "fit" and self._units is not None and not self._same_model(pl_module):
            self._forget_units()  # another model: its own units, found again
        if stage == "fit" and self._units is None:
            self.report, self._announced, self._disabled = None, False, False
        if stage == "fit" and not self.config.resolved:
            # `Trainer.log_every_n_steps` is set dynamically (0 in barebones mode: the default).
            every = int(getattr(trainer, "log_every_n_steps", 0)) or DEFAULT_EVERY_N_STEPS
            try:
                self.session.config = self.config.resolve(every)
            except ValueError as error:
                raise MisconfigurationException(_messages.window_too_long(error, every)) from None
        if stage == "fit" and self.config.window < self._window:
            assert self.config.every_n_steps is not None  # resolved above
            message = _messages.window_clamped(self._window, self.config.every_n_steps)
            self._notices.info_once("window_clamped", message)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the action against the optimizers; write the TensorBoard hparams experiment.

        The experiment goes first (Lightning logs the hyper-parameters right after this hook, and
        TensorBoard reads the first experiment of a run), with the module's columns and ours.
        """
        self.policy.action.setup(trainer.optimizers, _trainer.lr_schedulers(trainer))
        if trainer.is_global_zero:
            _loggers.on_fit_started(
                trainer.loggers,
                hparams=_trainer.logged_hparams(trainer),
                optimizers=trainer.optimizers,
                action=repr(self.policy.action),
                warned=self.session.logger_failures,
            )
        every = self.config.every_n_steps
        assert every is not None  # resolved in setup
        # Lightning counts a step-interval scheduler's frequency in batches (batch_idx + 1) and
        # steps it only on batches that step the optimizer: every lcm(frequency, accumulate)
        # batches, i.e. lcm / accumulate optimizer steps; windows close every `every` of those.
        accumulate = _trainer.accumulation(trainer)
        for monitored, frequency in _trainer.step_scheduler_monitors(trainer, Keys.PREFIX):
            steps = math.lcm(frequency, accumulate) // accumulate
            if steps % every != 0:
                raise MisconfigurationException(
                    _messages.scheduler_between_windows(monitored, frequency, every, accumulate)
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a step scheduler on an ``sdm/`` key that can never step in an epoch.

        Lightning steps it when ``batch_idx + 1`` is a multiple of its frequency, and
        ``batch_idx`` starts again every epoch: a frequency above the epoch's batches never
        comes. The batches are known from here on (not yet at ``on_fit_start``).
        """
        batches = _trainer.batches_per_epoch(trainer)
        if batches is None:
            return
        for monitored, frequency in _trainer.step_scheduler_monitors(trainer, Keys.PREFIX):
            if frequency > batches:
                raise MisconfigurationException(
                    _messages.scheduler_never_steps(monitored, frequency, batches)
                )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """On the first batch, follow the forward pass to find the invariant units."""
        attached = self.monitor is not None and not self._reattach
        if attached or self._disabled or self._discovery.tracing:
            return
        if self._units is not None and not self._same_model(pl_module):
            self._forget_units()  # units from a checkpoint of another model
            self.report = None
        if self._units is not None:  # resumed, or a later fit: the units are known
            self._start_monitor(trainer, pl_module, self._units)
        elif self.params == "auto" and self.report is None:
            self._discovery.start(pl_module)
        else:
            try:
                units = select_units(pl_module, self.params)
            except ValueError as error:
                raise MisconfigurationException(str(error)) from None
            self._start_monitor(trainer, pl_module, units)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: Any) -> None:
        """A traced forward is over: start measuring its units, this very step included."""
        if not self._discovery.tracing:
            return
        # A failed trace falls back to the registration-order guess by itself, with a note.
        report = self.report = self._discovery.read(pl_module, trainer.optimizers)
        if report.units and list(report.units) != self._units:
            self._start_monitor(trainer, pl_module, list(report.units))
            if self.monitor is not None:
                self.monitor.catch_running_step()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the windows the optimizer steps of this batch closed."""
        if self.report is not None and not self._announced:  # what the first batch's traces found
            self._announced = True
            self._discovery.finish()
            self._notices.discovery(self.report, type(pl_module).__name__)
            self._disabled = not self.report.units
        if self.monitor is None:
            return
        if self.monitor.replaced_by(trainer.optimizers):  # a new optimizer object: follow it
            self._notices.warn_once("replaced", _messages.optimizer_replaced(trainer.global_step))
            self.monitor = self._monitor_state = None  # counters start again from the Trainer's
            self._start_monitor(trainer, pl_module, self._units or [])
        assert self.monitor is not None  # (re)started above
        windows = self.monitor.pop_windows(global_step=trainer.global_step)
        self._notices.cost(self.monitor)  # once its first steady interval has been timed
        if windows:
            self.session.windows(self.monitor, windows, self._host(trainer, pl_module, True))
        elif self.policy.action.deadline(trainer.global_step, _trainer.budget_of(trainer)):
            # The budget's deadline between windows (a pure test, repeated by the session):
            # the host is built only then, not at every batch.
            self.session.between_windows(self.monitor, self._host(trainer, pl_module, False))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        """Never leave the tracer or the hooks behind."""
        self._shutdown()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The summary table, and the final per-unit results for the logger integrations."""
        if self.monitor is None:
            return
        if not self.history and self.monitor.stopped is None:
            message = _messages.no_window_closed(trainer.global_step, self.config.every_n_steps)
            self._notices.warn_once("no_window", message)
        if trainer.is_global_zero:
            predictions = self.monitor.predictions()
            results = _loggers.unit_results(self.history, predictions, self.detector.state)
            if self.history:
                rows = [
                    (
                        r.unit,
                        r.final_angular_update,
                        r.final_theory,
                        r.final_ratio,
                        r.equilibrium_step,
                        r.in_equilibrium,
                    )
                    for r in results
                ]
                fraction = self.detector.fraction()
                self._notices.info(_messages.fit_summary(rows, fraction, trainer.global_step))
            _loggers.on_monitoring_finished(
                trainer.loggers,
                results=results,
                fraction=self.detector.fraction(),
                global_step=trainer.global_step,
                warned=self.session.logger_failures,
                predictions={name: p.hyperparameters for name, p in predictions.items()},
                history=self.history,
                tolerance=self.detector.tolerance,
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the optimizer hooks."""
        if stage == "fit":
            self._shutdown()

    @override
    def state_dict(self) -> dict[str, Any]:
        """Step counters, equilibrium state, events and history, for exact resumption."""
        monitor_state = self.monitor.state_dict() if self.monitor is not None else None
        return {
            "monitor": monitor_state or self._monitor_state,
            "units": [unit.as_dict() for unit in self._units] if self._units else None,
            **self.session.state_dict(),
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Adopt the state of this callback written with other settings (see ``_resume``)."""
        classes = [c.__qualname__ for c in type(self).__mro__ if issubclass(c, Callback)]
        claimed = [callback.state_key for callback in getattr(trainer, "callbacks", [])]
        states = checkpoint.get("callbacks") or {}
        self._checkpoint = getattr(trainer, "ckpt_path", None)
        message = adopt_state(states, self.state_key, self._key_arguments, classes, claimed)
        if message is not None:
            self._notices.warn_once("adopted", message)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the monitor state applies once it starts).

        Raises:
            ValueError: for a state this callback cannot read (damaged, or written by an
                incompatible version), naming the callback and the checkpoint; nothing of it is
                applied.
        """
        before = self.session.state_dict()
        try:
            if not isinstance(state_dict, dict):
                raise TypeError(f"a {type(state_dict).__name__}, not a dict")
            self.session.load_state_dict(state_dict)
            units = state_dict.get("units")
            loaded = [Unit.from_dict(unit) for unit in units] if units else None
            monitor = state_dict.get("monitor")
            if monitor is not None:
                check_monitor_state(monitor)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            self.session.load_state_dict(before)
            raise ValueError(_messages.unreadable_state(self._checkpoint, error)) from error
        if loaded:
            self._units, self._units_model = loaded, None
        self._monitor_state = monitor
        if self.monitor is not None:  # the checkpoint's counters replace a previous fit's
            self.monitor.detach()
            self.monitor = None

    # ------------------------------------------------------------------ internals

    def _start_monitor(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, units: list[Unit]
    ) -> None:
        self._units = list(units)  # never empty: an empty trace or selection stops earlier
        self._units_model = weakref.ref(pl_module)
        state = self._monitor_state
        if self.monitor is not None:  # more units, or a later fit: take the counters over
            state = self.monitor.state_dict()
            self.monitor.detach()
        self._reattach = False
        self.monitor = SphericalMonitor(pl_module, trainer.optimizers, units, self.config)
        if state:
            self.monitor.load_state_dict(state)
        else:
            # Steps taken before the monitor started still count. Lightning's global step
            # counts the steps of all optimizers together.
            per_optimizer = trainer.global_step // _trainer.stepping_optimizers(trainer)
            self.monitor.load_state_dict({"steps_done": [per_optimizer] * len(trainer.optimizers)})
        self.monitor.attach()
        if not self.monitor.units:  # none is updated by an optimizer: say so, measure nothing
            self._notices.warn_once(
                "nothing_stepped", _messages.nothing_to_measure(self.monitor.skipped)
            )
            self._disabled = True
            self.monitor.detach()
            self.monitor = None
            return
        self._notices.monitor_started(self.monitor)
        if self.advice is None:  # once: what the hyper-parameters and the schedule predict
            self.advice, self.audit = self._advise(trainer, self.monitor)
        predictions = self.monitor.predictions()
        if trainer.is_global_zero:
            _loggers.on_monitoring_started(
                trainer.loggers,
                units=self.monitor.units,
                channel_units=self.monitor.channel_units,
                settings={**asdict(self.config), **self.session.settings()},
                predictions={name: p.as_dict() for name, p in predictions.items()},
                warned=self.session.logger_failures,
                advice=self.advice.as_dict() if self.advice else None,
                texts=texts_for_loggers(self.advice, self.report),
                alerts=self.alerts,
            )

    def _host(self, trainer: pl.Trainer, pl_module: pl.LightningModule, windows: bool) -> Host:
        """What the Trainer offers the session at this batch's end."""

        def log(metrics: dict[str, float]) -> None:
            failures = self.session.logger_failures
            _loggers.log_metrics(trainer.loggers, metrics, trainer.global_step, failures)
            if not windows:
                return
            # For EarlyStopping, ModelCheckpoint and ReduceLROnPlateau (logger=False: the
            # loggers have them already).
            for key, value in _finite(metrics, SUMMARY_KEYS).items():
                pl_module.log(key, value, logger=False)
            median = _finite(metrics, [Keys.MEDIAN_RATIO])
            if self.prog_bar and median:
                pl_module.log(
                    Keys.PROGRESS_BAR, median[Keys.MEDIAN_RATIO], prog_bar=True, logger=False
                )

        def stop() -> None:
            trainer.should_stop = True

        return Host(
            global_step=trainer.global_step,
            log=log,
            loggers=trainer.loggers,
            is_global_zero=trainer.is_global_zero,
            total_steps=_trainer.budget_of(trainer),
            schedulers=_trainer.lr_schedulers(trainer),
            trainer=trainer,
            pl_module=pl_module,
            request_stop=stop,
            global_per_optimizer_step=_trainer.stepping_optimizers(trainer),
        )

    def _advise(
        self, trainer: pl.Trainer, monitor: SphericalMonitor
    ) -> tuple[Advice, list[Finding]]:
        """What the hyper-parameters and the schedule predict, and the param-group audit."""
        return self._notices.advise(
            optimizers=list(trainer.optimizers),
            module=trainer.lightning_module,
            monitor=monitor,
            report=self.report,
            budget=_trainer.optimizer_budget(trainer),  # each optimizer's own steps
            steps_per_epoch=_trainer.steps_per_epoch(trainer),
            schedules=_trainer.trainer_schedules(trainer),
            tolerance=self.detector.tolerance,  # "within tolerance" as the detector judges it
            manual=_trainer.manual_optimization(trainer),
            shared_max_steps=_trainer.shared_max_steps(trainer),
        )

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (a weak reference is not): a copy judges its units by parameter names."""
        return {**self.__dict__, "_units_model": None}

    def _same_model(self, pl_module: pl.LightningModule) -> bool:
        """Whether the known units belong to ``pl_module`` (a later fit may bring another).

        Units from a checkpoint belong to any model that has all their parameters.
        """
        if self._units_model is not None:
            return self._units_model() is pl_module
        names = {name for name, _ in pl_module.named_parameters()}
        missing = [p for unit in self._units or [] for p in unit.params if p not in names]
        if missing:
            message = _messages.checkpoint_units_missing(missing, type(pl_module).__name__)
            self._notices.warn_once("units_missing", message)
        return not missing

    def _forget_units(self) -> None:
        """Another model: its units are found again; the history and the events are kept."""
        if self.monitor is not None:
            self.monitor.detach()
        self.monitor, self._monitor_state, self._units, self._units_model = None, None, None, None
        self.advice, self.audit, self._reattach = None, [], False
        self.session.new_model()

    def _shutdown(self) -> None:
        self._discovery.close()
        if self.monitor is not None:  # kept for inspection; a later fit re-attaches
            self.monitor.detach()
            self._reattach = True


def _finite(metrics: Mapping[str, float], keys: Sequence[str]) -> dict[str, float]:
    """The entries of ``keys`` that are in ``metrics`` and finite."""
    return {k: metrics[k] for k in keys if k in metrics and math.isfinite(metrics[k])}
