"""What to do at an :class:`~lightning_sdm.records.EquilibriumEvent`: the actions.

The policy (``_policy``) hands each event to one of them:

* :class:`Warn` (``"warn"``): one message per event;
* :class:`DecayLR` (``"decay_lr"``): multiply the LR schedule of the param groups that hold
  monitored units, optionally with SMD's weight rescaling;
* :class:`Stop` (``"stop"``): ask the Trainer to stop;
* :class:`CallFunction` (any callable ``(trainer, pl_module, event)``);
* or a subclass of :class:`EquilibriumAction`.

Nothing here needs a Trainer: an action reads and changes the optimizers and schedulers it is
given in an :class:`ActionContext`, and says what it did in the event it returns, so the policy
and every action are tested on real optimizers without training. The strings are shortcuts for
the classes; in LightningCLI YAML an action is configured by ``class_path``::

    on_equilibrium:
      class_path: lightning_sdm.actions.DecayLR
      init_args: {factor: 0.2, rescale_weights: true}
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor
from torch.optim import Optimizer

from lightning_sdm._checks import check_bool, check_fraction, check_integer, check_number
from lightning_sdm.actions._lr_control import (
    check_schedulers_supported,
    decay_param_groups,
    rescale_for_lr_decay,
)
from lightning_sdm.records import ActionName, EquilibriumEvent
from lightning_sdm.theory._optimizers import family_of, recognise, unwrap
from lightning_sdm.theory._predictions import (
    Prediction,
    equilibrium_norm_exponent,
    lr_change_relaxation_steps,
    predict_param_group,
    relaxation_time,
)

__all__ = [
    "ACTIONS",
    "ActionContext",
    "CallFunction",
    "DecayLR",
    "EquilibriumAction",
    "Stop",
    "Warn",
    "as_action",
]

#: Relative distance to the new prediction at which a decay counts as relaxed (the default
#: cooldown): about where SMD's Cor. 3.1 puts it for a 10x decay.
COOLDOWN_TOLERANCE = 0.05


@dataclass
class ActionContext:
    """What an action may read and change.

    Attributes:
        global_step: the global clock at the event.
        unit_groups: per monitored unit, the optimizer and the index of its param group.
        unit_parameters: per monitored unit, its parameters.
        predictions: per monitored unit, the theory's prediction before the action.
        schedulers: the LR schedulers of the run (Lightning's ``lr_scheduler_configs``).
        trainer: the Trainer, for user callables (``None`` outside Lightning).
        pl_module: the LightningModule, for user callables.
        global_per_optimizer_step: global steps per optimizer step (see the field).
        total_steps: the training budget in global steps (Lightning's
            ``estimated_stepping_batches``), ``None`` when unknown or unbounded.
        stop_requested: set by an action that wants training to stop.
    """

    global_step: int
    unit_groups: Mapping[str, tuple[Optimizer, int]]
    unit_parameters: Mapping[str, Sequence[Tensor]] = field(default_factory=dict)
    predictions: Mapping[str, Prediction] = field(default_factory=dict)
    schedulers: Sequence[Any] = ()
    trainer: Any = None
    pl_module: Any = None
    total_steps: int | None = None
    stop_requested: bool = False
    #: Global steps per step of one optimizer: more than 1 under manual optimization with
    #: several optimizers stepping once per batch (relaxation times count optimizer steps).
    global_per_optimizer_step: int = 1

    def __post_init__(self) -> None:
        groups = self.unit_groups
        well_formed = isinstance(groups, Mapping) and all(
            isinstance(entry, tuple)
            and len(entry) == 2
            and isinstance(entry[0], Optimizer)
            and isinstance(entry[1], int)
            for entry in groups.values()
        )
        if not well_formed:
            raise ValueError(
                "`unit_groups` must map each unit to (optimizer, param group index), got "
                f"{groups!r:.80}."
            )
        check_integer("global_per_optimizer_step", self.global_per_optimizer_step, 1)
        for name in ("unit_parameters", "predictions"):
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"`{name}` must be a mapping by unit name.")


class EquilibriumAction:
    """Base class of the reactions to an :class:`~lightning_sdm.records.EquilibriumEvent`.

    Subclasses override :meth:`__call__` (and, when they keep state, :meth:`state_dict` /
    :meth:`load_state_dict`; when they can check the set-up, :meth:`setup`).
    """

    #: Name recorded in the event's ``action`` field.
    name: ClassVar[str] = "custom"
    #: The event message is a warning (``True``) or an info line (``False``).
    warns: ClassVar[bool] = False

    def setup(self, optimizers: Sequence[Optimizer], schedulers: Sequence[Any]) -> None:
        """Called at the start of fit; raise ``ValueError`` if the action cannot work here."""

    def __call__(self, event: EquilibriumEvent, context: ActionContext) -> EquilibriumEvent:
        """Act on ``event``; return it, updated with what was done."""
        _check_call(event, context)
        return replace(event, action=self.name)

    def deadline(self, global_step: int, total_steps: int | None) -> bool:
        """Whether the budget calls for the action now, equilibrium or not (default: never)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (plain types)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Warn(EquilibriumAction):
    """One warning per event, naming the units and their measured and predicted values."""

    name = "warn"
    warns = True


class Stop(EquilibriumAction):
    """Ask the Trainer to stop (``trainer.should_stop``) at the event."""

    name = "stop"

    def __call__(self, event: EquilibriumEvent, context: ActionContext) -> EquilibriumEvent:
        """Request the stop."""
        _check_call(event, context)
        context.stop_requested = True
        return replace(event, action=self.name)


class DecayLR(EquilibriumAction):
    """Multiply the LR schedule of the param groups holding monitored units by ``factor``.

    The whole remaining schedule is scaled (the group's ``lr`` and what schedulers recompute it
    from, see :mod:`lightning_sdm.actions`), so each later LR is ``factor`` times what the
    schedule alone would give. After a decay the detector waits ``cooldown`` optimizer steps
    before it may declare equilibrium again.

    Args:
        factor: LR multiplier of a decay, in (0, 1).
        min_lr: no decay goes below this learning rate.
        max_decays: at most this many decays (``None``: no limit).
        cooldown: optimizer steps after a decay before the next decision; ``None`` uses theory:
            the time for the angular update to get within 5% of its new prediction,
            :func:`~lightning_sdm.theory.lr_change_relaxation_steps` (for the slowest unit).
        rescale_weights: at each decay by ``k``, divide the invariant weights by ``k^(1/4)``
            (SGD; ``k^(1/2)`` for AdamW) and adjust the optimizer state, so that the run lands on
            the new equilibrium at once (SMD Sec. 4).
        stop_at_min_lr: stop training at an equilibrium event when no further decay is allowed.
        final_phase: with a known budget (``trainer.estimated_stepping_batches``), the fraction
            of it kept for a last, low-LR phase: a decay at equilibrium is skipped when the new
            phase would not last one relaxation time (under the new LR) before that phase
            starts, and the last phase starts with one more decay at ``(1 - final_phase)`` of the
            budget,
            equilibrium or not (SDM: late phases do not re-equilibrate anyway, and the drop of
            the angular update right after a decay is the annealing a step schedule relies on).
            ``None``: equilibrium alone decides.

    Raises:
        ValueError: for an invalid argument (the message names it).

    Example::

        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(4, 4))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-3)
        >>> event = EquilibriumEvent(100, ("w",), 1.0, {"w": 0.01}, {"w": 0.01}, "theory")
        >>> done = DecayLR(factor=0.1)(event, ActionContext(100, {"w": (opt, 0)}))
        >>> done.old_lrs, done.new_lrs, done.cooldown, opt.param_groups[0]["lr"]
        ((0.1,), (0.010000000000000002,), 11057, 0.010000000000000002)
    """

    name = "decay_lr"

    def __init__(
        self,
        factor: float = 0.1,
        min_lr: float = 0.0,
        max_decays: int | None = None,
        cooldown: int | None = None,
        rescale_weights: bool = False,
        stop_at_min_lr: bool = False,
        final_phase: float | None = 0.25,
    ) -> None:
        check_fraction("factor", factor)
        if final_phase is not None:
            check_fraction("final_phase", final_phase)
        check_number("min_lr", min_lr, low=0.0, low_open=False)
        check_integer("max_decays", max_decays, 0, allow_none=True)
        check_integer("cooldown", cooldown, 0, allow_none=True)
        check_bool("rescale_weights", rescale_weights)
        check_bool("stop_at_min_lr", stop_at_min_lr)
        self.factor = factor
        self.min_lr = min_lr
        self.max_decays = None if max_decays is None else int(max_decays)
        self.cooldown = None if cooldown is None else int(cooldown)
        self.rescale_weights = rescale_weights
        self.stop_at_min_lr = stop_at_min_lr
        self.final_phase = final_phase
        self.decays = 0
        self.final_done = False

    def setup(self, optimizers: Sequence[Optimizer], schedulers: Sequence[Any]) -> None:
        """Refuse schedulers it cannot scale, and optimizers SMD's rescaling does not cover."""
        check_schedulers_supported(schedulers)
        if not self.rescale_weights:
            return
        for optimizer in optimizers:
            key, name = recognise(unwrap(optimizer))
            if family_of(key) not in ("sgd", "adam"):
                raise ValueError(
                    f"rescale_weights=True is defined for SGD and Adam-type optimizers with "
                    f"decoupled weight decay, got {name}: the equilibrium norm after a decay is "
                    "not known for it. Use rescale_weights=False."
                )

    def deadline(self, global_step: int, total_steps: int | None) -> bool:
        """The planned final decay is due (once, at ``1 - final_phase`` of the budget)."""
        if self.final_phase is None or total_steps is None or self.final_done:
            return False
        exhausted = self.max_decays is not None and self.decays >= self.max_decays
        return not exhausted and global_step >= (1 - self.final_phase) * total_steps

    def __call__(self, event: EquilibriumEvent, context: ActionContext) -> EquilibriumEvent:
        """Decay, rescale if asked, and set the cooldown."""
        _check_call(event, context)
        missing = [n for n in context.unit_groups if n not in context.unit_parameters]
        if self.rescale_weights and missing:  # before any state changes (final_done included)
            raise ValueError(
                f"DecayLR(rescale_weights=True) needs the parameters of {missing} in the "
                "ActionContext's `unit_parameters` (nothing was changed)."
            )
        final = event.criterion == "budget"
        if final:
            self.final_done = True
        elif self._too_late(context):
            note = (
                "decay skipped: the new phase would not last one relaxation time before the "
                f"final phase starts at global step {self._final_start(context)}"
            )
            return replace(event, action="none", note=note)
        exhausted = self.max_decays is not None and self.decays >= self.max_decays
        changes = [] if exhausted else self._decay(context)
        if not any(new < old for old, new in changes):
            if self.stop_at_min_lr:
                context.stop_requested = True
            return replace(event, action="stop" if self.stop_at_min_lr else "none")
        self.decays += 1
        decay = max(old / new for old, new in changes if new > 0)
        if self.rescale_weights:
            self._rescale(context, decay)
        cooldown = self.cooldown if self.cooldown is not None else _relaxation(context, decay)
        if final:  # the last phase: no further decision (and no cooldown to honour)
            note = "final decay: the last phase of the budget starts"
            left = (context.total_steps or 0) - context.global_step  # global steps
            cooldown = max(int(cooldown), math.ceil(left / context.global_per_optimizer_step))
        else:
            note = ""
        return replace(
            event,
            action=self.name,
            old_lrs=tuple(old for old, _ in changes),
            new_lrs=tuple(new for _, new in changes),
            cooldown=int(cooldown),
            note=note,
        )

    def state_dict(self) -> dict[str, Any]:
        """The number of decays so far, and whether the final one happened."""
        return {"decays": self.decays, "final_done": self.final_done}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: for a damaged state (a negative or non-integer count, a non-bool flag).
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"DecayLR's state must be a mapping, got {type(state).__name__}.")
        decays, final_done = state.get("decays", self.decays), state.get("final_done", False)
        check_integer("decays", decays, 0)
        check_bool("final_done", final_done)
        self.decays, self.final_done = int(decays), final_done

    def _final_start(self, context: ActionContext) -> int:
        assert self.final_phase is not None and context.total_steps is not None
        return math.ceil((1 - self.final_phase) * context.total_steps)

    def _too_late(self, context: ActionContext) -> bool:
        """A decay now would leave the new phase no time to relax before the final phase."""
        if self.final_phase is None or context.total_steps is None:
            return False
        lrs = {opt.param_groups[i]["lr"] for opt, i in context.unit_groups.values()}
        if all(float(lr) * self.factor < self.min_lr for lr in lrs):
            return False  # no decay would happen anyway: let __call__ say why
        needed = _time_constant_after(context, 1 / self.factor)  # optimizer steps
        needed_global = needed * context.global_per_optimizer_step
        return context.global_step + needed_global > self._final_start(context)

    def __repr__(self) -> str:
        return (
            f"DecayLR(factor={self.factor}, min_lr={self.min_lr}, max_decays={self.max_decays}, "
            f"cooldown={self.cooldown}, rescale_weights={self.rescale_weights}, "
            f"stop_at_min_lr={self.stop_at_min_lr}, final_phase={self.final_phase})"
        )

    def _decay(self, context: ActionContext) -> list[tuple[float, float]]:
        changes: list[tuple[float, float]] = []
        for optimizer, indices in _groups_by_optimizer(context).items():
            changes.extend(
                decay_param_groups(
                    optimizer, sorted(indices), self.factor, self.min_lr, context.schedulers
                )
            )
        return changes

    def _rescale(self, context: ActionContext, decay: float) -> None:
        by_optimizer: dict[Optimizer, list[Sequence[Tensor]]] = {}
        for name, (optimizer, _) in context.unit_groups.items():
            by_optimizer.setdefault(optimizer, []).append(context.unit_parameters[name])
        for optimizer, units in by_optimizer.items():
            prediction = next(
                (
                    context.predictions[n]
                    for n, (o, _) in context.unit_groups.items()
                    if o is optimizer
                ),
                None,
            )
            exponent = equilibrium_norm_exponent(prediction) if prediction is not None else None
            if exponent is not None:
                rescale_for_lr_decay(optimizer, units, decay, exponent)


class CallFunction(EquilibriumAction):
    """Call ``function(trainer, pl_module, event)`` at each event.

    Raises:
        ValueError: if ``function`` is not callable with three positional arguments.
    """

    name = "callable"

    def __init__(self, function: Callable[[Any, Any, EquilibriumEvent], Any]) -> None:
        if not callable(function):
            raise ValueError(f"`on_equilibrium` must be callable, got {function!r}.")
        try:
            inspect.signature(function).bind(None, None, None)
        except TypeError:
            raise ValueError(
                f"`on_equilibrium={_label(function)}` must accept (trainer, pl_module, event); "
                f"its signature is {inspect.signature(function)}."
            ) from None
        except ValueError:  # builtins without a signature: trust them
            pass
        self.function = function

    def __call__(self, event: EquilibriumEvent, context: ActionContext) -> EquilibriumEvent:
        """Call the function; an exception from it is re-raised naming it."""
        _check_call(event, context)
        try:
            self.function(context.trainer, context.pl_module, event)
        except Exception as error:
            raise RuntimeError(
                f"on_equilibrium callable {_label(self.function)} raised at global step "
                f"{event.global_step}: {type(error).__name__}: {error}"
            ) from error
        return replace(event, action=self.name)

    def __repr__(self) -> str:
        return f"CallFunction({_identity(self.function)})"


#: The string shortcuts of ``on_equilibrium``.
ACTIONS: dict[str, type[EquilibriumAction]] = {"warn": Warn, "decay_lr": DecayLR, "stop": Stop}


def as_action(spec: ActionName | EquilibriumAction | Callable[..., Any]) -> EquilibriumAction:
    """The action an ``on_equilibrium`` argument names.

    Raises:
        ValueError: for an unknown string or a callable of the wrong arity.

    Example::

        >>> as_action("decay_lr"), as_action(Stop())
        (DecayLR(factor=0.1, min_lr=0.0, max_decays=None, cooldown=None, rescale_weights=False, stop_at_min_lr=False, final_phase=0.25), Stop())
    """  # noqa: E501
    if isinstance(spec, EquilibriumAction):
        return spec
    if isinstance(spec, str):
        if spec not in ACTIONS:
            raise ValueError(
                f"`on_equilibrium` must be one of {tuple(ACTIONS)}, an EquilibriumAction or a "
                f"callable (trainer, pl_module, event); got {spec!r}."
            )
        return ACTIONS[spec]()
    if isinstance(spec, type):
        name = spec.__name__
        action = issubclass(spec, EquilibriumAction)
        shortcut = getattr(spec, "name", None) if action else None
        shortcut = shortcut if shortcut in ACTIONS else None
        raise ValueError(
            f"`on_equilibrium={name}` is a class; pass "
            + (f"an instance, `{name}()`" if action else "a callable or an action instance")
            + (f", or the string {shortcut!r}." if shortcut else ".")
        )
    if callable(spec):
        return CallFunction(spec)
    raise ValueError(
        f"`on_equilibrium` must be one of {tuple(ACTIONS)}, an EquilibriumAction or a callable "
        f"(trainer, pl_module, event); got {spec!r}."
    )


# ---------------------------------------------------------------------- internals


def _groups_by_optimizer(context: ActionContext) -> dict[Optimizer, set[int]]:
    groups: dict[Optimizer, set[int]] = {}
    for optimizer, index in context.unit_groups.values():
        groups.setdefault(optimizer, set()).add(index)
    return groups


def _relaxation(context: ActionContext, decay: float) -> int:
    """Optimizer steps until the slowest unit is within 5% of its new prediction (LRs decayed)."""
    longest = 0.0
    for optimizer, index in context.unit_groups.values():
        after = predict_param_group(optimizer, optimizer.param_groups[index])
        tau = relaxation_time(after)
        # Without a norm exponent no norm relaxes to the new LR: relative steps (Adafactor)
        # turn the weight by the new rho_t at once.
        if tau is not None and equilibrium_norm_exponent(after) is not None:
            longest = max(longest, lr_change_relaxation_steps(1 / decay, tau, COOLDOWN_TOLERANCE))
    return math.ceil(longest)


def _time_constant_after(context: ActionContext, decay: float) -> int:
    """The slowest unit's relaxation time after a decay by ``decay`` that has not happened."""
    longest = 0.0
    for optimizer, index in context.unit_groups.values():
        group = dict(optimizer.param_groups[index])
        group["lr"] = float(group["lr"]) / decay
        tau = relaxation_time(predict_param_group(optimizer, group))
        if tau is not None:
            longest = max(longest, tau)
    return math.ceil(longest)


def _check_call(event: Any, context: Any) -> None:
    if not isinstance(event, EquilibriumEvent):
        raise ValueError(f"`event` must be an EquilibriumEvent, got {type(event).__name__}.")
    if not isinstance(context, ActionContext):
        raise ValueError(f"`context` must be an ActionContext, got {type(context).__name__}.")


def _label(function: Any) -> str:
    return getattr(function, "__qualname__", None) or repr(function)


def _identity(function: Any) -> str:
    """The function's name, and where it is defined: two lambdas are two different actions.

    The label keys the callback's state (``state_key``), so it must differ between different
    functions yet stay the same across processes (a resumed run): the module, the qualified
    name and the first line of the source, not the object's id.
    """
    name = getattr(function, "__qualname__", None) or repr(function)
    code = getattr(function, "__code__", None)
    module = getattr(function, "__module__", None)
    if code is None:
        return f"{module}.{name}" if module else name
    where = f"{Path(code.co_filename).name}:{code.co_firstlineno}"
    positions = getattr(code, "co_positions", None)  # Python 3.11+: two lambdas on one line
    columns = [p[2] for p in positions() if p[2]] if positions else []  # 0: the preamble
    column = min(columns) if columns else None
    return f"{module}.{name}@{where}" + (f":{column}" if column is not None else "")
