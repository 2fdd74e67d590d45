"""The policy: one :class:`~lightning_sdm.records.EquilibriumEvent` per entry into equilibrium."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from lightning_sdm.actions._actions import ActionContext, DecayLR, EquilibriumAction
from lightning_sdm.equilibrium._detector import EquilibriumDetector
from lightning_sdm.records import EquilibriumEvent, UnitWindow

__all__ = ["EquilibriumPolicy", "decays_of"]


class EquilibriumPolicy:
    """One event each time the quorum of units enters equilibrium, carried out by ``action``.

    After each batch of windows, call :meth:`entering` with ``detector.reached()`` (agreed on
    across ranks); when it returns ``True``, call :meth:`fire`.

    Args:
        action: what to do at an event.

    Example::

        >>> from lightning_sdm.actions import Warn
        >>> policy = EquilibriumPolicy(Warn())
        >>> [policy.entering(reached) for reached in (False, True, True, False, True)]
        [False, True, False, False, True]
    """

    def __init__(self, action: EquilibriumAction) -> None:
        if not isinstance(action, EquilibriumAction):
            raise ValueError(
                f"`action` must be an EquilibriumAction (e.g. Warn()), got {action!r}; "
                "`as_action` turns a string or a callable into one."
            )
        self.action = action
        self.events: list[EquilibriumEvent] = []
        self._quorum_reached = False

    def entering(self, reached: bool) -> bool:
        """Whether the quorum has just entered equilibrium (one event per entry)."""
        entered = reached and not self._quorum_reached
        self._quorum_reached = reached
        return entered

    def due(self, reached: bool, global_step: int, total_steps: int | None) -> str | None:
        """Which event this batch of windows calls for: ``"event"``, ``"deadline"`` or ``None``.

        ``"event"`` when the quorum enters equilibrium (``reached`` must be agreed across ranks,
        so that every rank decides alike), ``"deadline"`` when the action's budget calls for it
        (:meth:`EquilibriumAction.deadline`; ``total_steps`` is the budget in global steps,
        ``None`` when unknown). Carry it out with :meth:`fire` or :meth:`fire_deadline`.

        Example::

            >>> from lightning_sdm.actions import Warn
        >>> policy = EquilibriumPolicy(Warn())
            >>> policy.due(False, 10, None), policy.due(True, 20, None), policy.due(True, 30, None)
            (None, 'event', None)
        """
        deadline = self.action.deadline(global_step, total_steps)
        entering = self.entering(reached)  # always: it tracks the quorum's state
        if deadline:
            return "deadline"
        return "event" if entering else None

    def fire(
        self,
        detector: EquilibriumDetector,
        windows: Sequence[UnitWindow],
        context: ActionContext,
    ) -> EquilibriumEvent:
        """Build the event of this batch of windows and carry it out.

        The event is recorded (:attr:`events`) before the action runs, so a failing user
        callable leaves it in the record; the error propagates. After an action that moved the
        target (new learning rates), the detector forgets equilibrium and waits the event's
        ``cooldown``.
        """
        event = _make_event(detector, windows, context.global_step, self.action.name)
        return self._carry_out(event, detector, context)

    def fire_deadline(
        self,
        detector: EquilibriumDetector,
        windows: Sequence[UnitWindow],
        context: ActionContext,
    ) -> EquilibriumEvent:
        """Carry out the action the budget calls for (its ``deadline``), equilibrium or not."""
        event = _make_event(detector, windows, context.global_step, self.action.name)
        return self._carry_out(replace(event, criterion="budget"), detector, context)

    def _carry_out(
        self, event: EquilibriumEvent, detector: EquilibriumDetector, context: ActionContext
    ) -> EquilibriumEvent:
        self.events.append(event)  # recorded first: a failing user callable leaves it there
        event = self.action(event, context)
        self.events[-1] = event
        if event.new_lrs or event.cooldown:
            # The target moved: equilibrium is forgotten, and reaching it again is a new event.
            detector.restart(event.cooldown)
            self._quorum_reached = False
        return event

    def state_dict(self) -> dict[str, Any]:
        """Events, the quorum flag and the action's own state."""
        return {
            "events": [event.as_dict() for event in self.events],
            "quorum_reached": self._quorum_reached,
            "action": self.action.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: for a damaged state, naming the entry; nothing of it is applied.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"The policy's state is a {type(state).__name__}, not a mapping.")
        events, reached = state.get("events", []), state.get("quorum_reached", False)
        if not isinstance(events, (list, tuple)) or not isinstance(reached, bool):
            raise ValueError(f"The policy's state is damaged: {dict(state)!r:.120}.")
        loaded = [EquilibriumEvent.from_dict(e) for e in events]
        self.action.load_state_dict(state.get("action", {}))
        self.events, self._quorum_reached = loaded, reached


def decays_of(action: EquilibriumAction) -> int | None:
    """LR decays an action has made so far (``None`` for actions that do not decay)."""
    return action.decays if isinstance(action, DecayLR) else None


def _make_event(
    detector: EquilibriumDetector, windows: Sequence[UnitWindow], global_step: int, action: str
) -> EquilibriumEvent:
    units = tuple(name for name, u in detector.state.items() if u.in_equilibrium)
    by_unit = {w.unit: w for w in windows}
    criteria = {detector.state[name].criterion for name in units}
    return EquilibriumEvent(
        global_step=global_step,
        units=units,
        fraction=detector.fraction(),
        measured={n: by_unit[n].angular_update for n in units if n in by_unit},
        predicted={n: by_unit[n].theory for n in units if n in by_unit},
        criterion="stationary" if "stationary" in criteria else "theory",
        action=action,
    )
