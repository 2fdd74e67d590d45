"""What happens at equilibrium: the policy that turns verdicts into events, and the actions.

Nothing here knows a Trainer or the monitor: an action reads and changes the optimizers and
schedulers handed to it in an :class:`ActionContext` (a budget is an ``int``), and says what it
did in the :class:`~lightning_sdm.records.EquilibriumEvent` it returns. ``_lr_control`` holds the
functions that change learning rates and weights, usable on their own.

In LightningCLI YAML an action is configured by ``class_path``::

    on_equilibrium:
      class_path: lightning_sdm.actions.DecayLR
      init_args: {factor: 0.2, rescale_weights: true}
"""

from lightning_sdm.actions._actions import (
    ACTIONS,
    ActionContext,
    CallFunction,
    DecayLR,
    EquilibriumAction,
    Stop,
    Warn,
    as_action,
)
from lightning_sdm.actions._lr_control import (
    check_schedulers_supported,
    decay_param_groups,
    rescale_for_lr_decay,
)
from lightning_sdm.actions._policy import EquilibriumPolicy

__all__ = [
    "ACTIONS",
    "ActionContext",
    "CallFunction",
    "DecayLR",
    "EquilibriumAction",
    "EquilibriumPolicy",
    "Stop",
    "Warn",
    "as_action",
    "check_schedulers_supported",
    "decay_param_groups",
    "rescale_for_lr_decay",
]
