"""The plugin under Lightning Fabric: with ``LIGHTNING_SDM=1`` every ``Fabric`` gets a monitor.

What Fabric calls by itself (Lightning 2.6, ``lightning/fabric/fabric.py`` and ``wrappers.py``):

* the factories of the ``lightning.fabric.callbacks_factory`` entry point, once, in
  ``Fabric.__init__`` (``_configure_callbacks``);
* ``on_after_setup(fabric=, module=)`` at the end of each ``fabric.setup(module, *optimizers)``,
  with the wrapped module but not the optimizers (``setup_module`` calls no hook);
* ``on_after_optimizer_step(strategy=, optimizer=)`` after each ``step()`` of an optimizer that
  Fabric wrapped.

Every other hook runs only when the user calls ``fabric.call(name, ...)``. So, in the usual loop
(``model, optimizer = fabric.setup(model, optimizer)``; forward, ``fabric.backward(loss)``,
``optimizer.step()``), :class:`FabricSphericalDynamics` needs no code:

1. ``fabric.setup``: it follows the model's next training forward (in train mode, with grad)
   through the module Fabric returned, and finds the units there, as the callback does
   (``LIGHTNING_SDM_PARAMS`` names them instead). A loss computed outside the model is not seen;
2. the first step of an optimizer that updates those units (a global optimizer step pre-hook):
   it attaches a :class:`~lightning_sdm.monitor.SphericalMonitor` to that torch optimizer, this
   step included. Another optimizer of the same model joins at its first step;
3. after each step of a Fabric optimizer: the windows that closed go through an
   :class:`~lightning_sdm.equilibrium.EquilibriumDetector` into ``history`` and to
   ``Fabric(loggers=...)`` with ``fabric.log_dict``, at the monitor's count of optimizer steps
   (its ``global_step``).

The user may call ``fabric.call("sdm_attach", module, example=None)`` to monitor another model
(one set up with ``setup_module``, or one of several): ``example`` (an input of the model, or a
tuple of them) finds its units at once, else its next forward through the module Fabric returned
does. ``fabric.call("sdm_detach")`` (or ``fabric.call("on_train_end")``) logs what is left and
removes every hook. :func:`fabric_callback` returns the object (``history``, ``monitor``,
``report``).

Limits: one model is monitored (the first set up whose parameters an optimizer steps). At
equilibrium it warns: ``LIGHTNING_SDM_ON_EQUILIBRIUM=stop`` or ``decay_lr`` need the Trainer (the
loop and the LR schedule are the user's under Fabric). No checkpoint state, no logger extras
(TensorBoard layout, W&B tables). Windows are logged after Fabric optimizer steps; steps of the
bare torch optimizer are measured, and logged at the next Fabric step or at ``sdm_detach``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from lightning.fabric.wrappers import _FabricModule
from torch import nn
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from lightning_sdm import _messages
from lightning_sdm.actions._actions import Warn
from lightning_sdm.actions._policy import EquilibriumPolicy
from lightning_sdm.config import DEFAULT_EVERY_N_STEPS, MonitorConfig
from lightning_sdm.equilibrium._detector import EquilibriumDetector
from lightning_sdm.invariance import InvarianceReport, SharedTrace, find_scale_invariant_units
from lightning_sdm.lightning import _loggers
from lightning_sdm.lightning._notices import Notices
from lightning_sdm.lightning._session import Host, Session, SessionViews
from lightning_sdm.monitor._monitor import SphericalMonitor
from lightning_sdm.records import Granularity, UnitWindow
from lightning_sdm.units import ParamsSpec, Unit, check_params_spec, select_units

__all__ = ["FabricSphericalDynamics", "fabric_callback"]


@dataclass(eq=False)
class _Model:
    """A model set up through Fabric, and what the trace of its training forward found."""

    module: nn.Module  # the original module: unit names are relative to it
    report: InvarianceReport | None = None
    trace: SharedTrace | None = None
    handles: list[RemovableHandle] = field(default_factory=list)

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()
            self.trace = None
        for handle in self.handles:
            handle.remove()
        self.handles = []


class FabricSphericalDynamics(SessionViews):
    """What the plugin adds to a ``Fabric``: the monitor, started by Fabric's own hooks.

    Args:
        params: ``"auto"`` (trace the training forward) or a selection, as for the callback.
        granularity: ``"layer"`` or ``"channel"``.
        every_n_steps: optimizer steps between windows (default ``MonitorConfig.every_n_steps``:
            Fabric has no ``log_every_n_steps`` to follow).
        window: measured steps per window.
        tolerance: the detector's tolerance.
        patience: the detector's patience.
        on_equilibrium: only ``"warn"`` is carried out under Fabric; another value is reported
            once and treated as ``"warn"``.
        verbose: routine events and notes on the ``logging`` logger ``"lightning_sdm"`` at
            INFO (``False``: DEBUG); warnings are shown either way.

    Raises:
        ValueError: for an invalid argument (the message names it).
    """

    def __init__(
        self,
        params: ParamsSpec = "auto",
        granularity: Granularity = MonitorConfig.granularity,
        every_n_steps: int | None = None,
        window: int = MonitorConfig.window,
        tolerance: float = EquilibriumDetector.DEFAULT_TOLERANCE,
        patience: int = EquilibriumDetector.DEFAULT_PATIENCE,
        on_equilibrium: Any = "warn",
        verbose: bool = True,
    ) -> None:
        self.params = check_params_spec(params)
        every = DEFAULT_EVERY_N_STEPS if every_n_steps is None else every_n_steps
        config = MonitorConfig(granularity=granularity, every_n_steps=every, window=window)
        detector = EquilibriumDetector(tolerance=tolerance, patience=patience)
        self.session = Session(
            config, detector, EquilibriumPolicy(Warn()), notices=Notices(verbose)
        )
        self.monitor: SphericalMonitor | None = None
        self.fabric: Any = None
        self._models: list[_Model] = []  # candidates, until one is chosen
        self._chosen: _Model | None = None
        self._units: list[Unit] = []
        self._unit_params: set[int] = set()
        self._optimizers: list[Optimizer] = []
        self._seen: weakref.WeakSet[Optimizer] = weakref.WeakSet()  # first steps looked at
        self._pending: list[UnitWindow] = []  # windows of a monitor that was replaced
        self._step_hook: RemovableHandle | None = None
        self._disabled = False
        if on_equilibrium != "warn":
            self._notices.warn_once("on_equilibrium", _messages.fabric_warn_only(on_equilibrium))
        if config.window < window:
            self._notices.info_once("window_clamped", _messages.window_clamped(window, every))

    @property
    def report(self) -> InvarianceReport | None:
        """What the trace of the monitored model's forward found (``None`` before, or explicit)."""
        return self._chosen.report if self._chosen is not None else None

    # ------------------------------------------------------------------ hooks Fabric calls

    def on_after_setup(self, fabric: Any, module: nn.Module) -> None:
        """End of ``fabric.setup``: a candidate model, whose next training forward is traced."""
        self.fabric = fabric
        if self._chosen is None and not self._disabled:
            self._add(module)

    def on_after_optimizer_step(self, strategy: Any = None, optimizer: Any = None) -> None:
        """After each Fabric optimizer step: judge, record and log the windows that closed."""
        self._publish()

    # ------------------------------------------------------------------ hooks the user calls

    def sdm_attach(self, module: nn.Module, example: Any = None, fabric: Any = None) -> None:
        """``fabric.call("sdm_attach", module, example=None)``: monitor this model from now on.

        The history is kept; the step count restarts. Without ``example`` (and with
        ``params="auto"``), ``module`` must be what Fabric returned, so that its next forward is
        followed. ``fabric`` (the loggers' owner) is needed only if ``fabric.setup`` never ran.

        Raises:
            ValueError: for a bare module without ``example`` (nothing would find its units).
        """
        self.sdm_detach()
        self.fabric = fabric if fabric is not None else self.fabric
        self._disabled, self._chosen, self._models, self._optimizers = False, None, [], []
        self._seen = weakref.WeakSet()
        self.monitor = None
        self._add(module, example)

    def sdm_detach(self) -> None:
        """``fabric.call("sdm_detach")``: log the windows left, remove every hook."""
        self._publish()
        if self.monitor is not None:  # kept for inspection
            self.monitor.detach()
        for model in self._models:
            model.close()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None

    def on_train_end(self) -> None:
        """``fabric.call("on_train_end")``: the same as :meth:`sdm_detach`."""
        self.sdm_detach()

    # ------------------------------------------------------------------ internals

    def _add(self, module: nn.Module, example: Any = None) -> None:
        original = module.module if isinstance(module, _FabricModule) else module
        model = _Model(original)
        if self.params == "auto" and example is not None:
            inputs = example if isinstance(example, tuple) else (example,)
            model.report = find_scale_invariant_units(original, *inputs)
        elif self.params == "auto":
            if not isinstance(module, _FabricModule):
                raise ValueError(
                    "sdm_attach: pass the module that fabric.setup/setup_module returned (its "
                    "next forward is followed), or example=<an input of the model>."
                )
            model.handles = [
                module.register_forward_pre_hook(partial(self._trace_start, model)),
                module.register_forward_hook(partial(self._trace_end, model), always_call=True),
            ]
        self._models.append(model)
        if self._step_hook is None:
            # Weak: a Fabric dropped without sdm_detach leaves a no-op here, not its model.
            method = weakref.WeakMethod(self._before_any_step)

            def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
                alive = method()
                if alive is not None:
                    alive(optimizer)

            self._step_hook = register_optimizer_step_pre_hook(hook)

    def _trace_start(self, model: _Model, module: nn.Module, args: Any) -> None:
        training = model.module.training and torch.is_grad_enabled()
        if training and model.trace is None and model.report is None:
            model.trace = SharedTrace(model.module)

    def _trace_end(self, model: _Model, module: nn.Module, args: Any, output: Any) -> None:
        if model.trace is not None:
            trace, model.trace = model.trace, None
            model.report = trace.report()
            model.close()

    def _before_any_step(self, optimizer: Optimizer) -> None:
        """Pre-hook of every optimizer's step: at its first, should the monitor follow it?"""
        if self._disabled or optimizer in self._seen:
            return
        self._seen.add(optimizer)
        try:
            self._first_step(optimizer)
        except Exception as error:  # the user's step goes on
            self._stand_down(f"measuring could not start ({type(error).__name__}: {error})")

    def _first_step(self, optimizer: Optimizer) -> None:
        params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if self._chosen is None:
            owners = [m for m in self._models if params & {id(p) for p in m.module.parameters()}]
            if not owners:
                return
            if not self._choose(owners[0]):
                self._seen.discard(optimizer)  # the forward was not seen yet: look again
                return
        if not params & self._unit_params:
            return
        # An optimizer that updates units another one updated replaces it (same position).
        replaced = [
            i for i, o in enumerate(self._optimizers) if _updates(o, self._unit_params & params)
        ]
        if len(replaced) == 1:
            self._optimizers[replaced[0]] = optimizer
        else:
            self._optimizers = [o for i, o in enumerate(self._optimizers) if i not in replaced]
            self._optimizers.append(optimizer)
        self._start(keep_state=len(replaced) <= 1)

    def _choose(self, model: _Model) -> bool:
        """Monitor ``model``; ``False`` if its units are not known yet (no traced forward)."""
        if self.params != "auto":
            units = select_units(model.module, self.params)
        elif model.report is None:
            self._notices.warn_once("not_traced", _messages.fabric_not_traced())
            return False
        else:
            self._notices.discovery(model.report, type(model.module).__name__)
            units = list(model.report.units)
        for other in self._models:
            if other is not model:
                other.close()
        self._models, self._chosen, self._units = [model], model, units
        named = dict(model.module.named_parameters())
        self._unit_params = {id(named[p]) for unit in units for p in unit.params if p in named}
        if not units:
            self._disabled = True  # the discovery notice said why
        return True

    def _start(self, keep_state: bool) -> None:
        assert self._chosen is not None
        state = None
        if self.monitor is not None:
            self._pending.extend(self.monitor.pop_windows())
            state = self.monitor.state_dict() if keep_state else None
            self.monitor.detach()
        monitor = SphericalMonitor(self._chosen.module, self._optimizers, self._units, self.config)
        if state:
            monitor.load_state_dict(state)
        monitor.attach()
        monitor.catch_running_step()  # this step's pre-hooks are running: it is measured too
        self.monitor = monitor
        for key, message in _messages.missing_predictions(monitor.predictions()).items():
            self._notices.warn_once(key, message)
        waiting = len(self._units) - len(monitor.units)
        every = self.config.every_n_steps
        assert every is not None
        self._notices.info(
            _messages.fabric_measuring(monitor.units, len(self._optimizers), every, waiting)
        )

    def _publish(self) -> None:
        monitor = self.monitor
        windows, self._pending = self._pending + (monitor.pop_windows() if monitor else []), []
        if not windows or monitor is None:
            return
        fabric, step = self.fabric, windows[-1].global_step
        loggers = list(getattr(fabric, "loggers", None) or [])
        failures = self.session.logger_failures
        host = Host(
            global_step=step,
            # What fabric.log_dict does, each logger guarded as under the Trainer.
            log=lambda metrics: _loggers.log_metrics(loggers, metrics, step, failures),
            loggers=loggers,
            is_global_zero=bool(getattr(fabric, "is_global_zero", True)),
        )
        self.session.windows(monitor, windows, host)

    def _stand_down(self, why: str) -> None:
        """Stop for good, from inside a step.

        The global hook stays, a no-op: removing it while torch iterates over the global hooks
        would break the step. ``sdm_detach`` removes it.
        """
        self._disabled = True
        self._notices.warn_once("stand_down", _messages.fabric_stand_down(why))
        if self.monitor is not None:
            self.monitor.detach()
        for model in self._models:
            model.close()


def _updates(optimizer: Optimizer, param_ids: set[int]) -> bool:
    return any(id(p) in param_ids for group in optimizer.param_groups for p in group["params"])


def fabric_callback(fabric: Any) -> FabricSphericalDynamics | None:
    """The plugin's object in ``fabric`` (``None`` with ``LIGHTNING_SDM`` off).

    Fabric has no public accessor for its callbacks: this reads its ``_callbacks`` list.
    """
    callbacks = getattr(fabric, "_callbacks", None) or []
    return next((cb for cb in callbacks if isinstance(cb, FabricSphericalDynamics)), None)
