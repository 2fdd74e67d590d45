"""Lightning's side: the only folder that imports Lightning.

* :class:`SphericalDynamicsCallback` (``_callback``): the Trainer adapter;
* :class:`FabricSphericalDynamics` (``_fabric``): the Fabric adapter;
* both thin over one :class:`~lightning_sdm.lightning._session.Session`, which owns the settings,
  the detector, the policy and the history and runs each window through
  detector -> history -> metrics -> event -> loggers, once for both;
* ``_plugin``: the ``LIGHTNING_SDM`` environment switch and the two entry points
  (``callbacks_factory``, ``fabric_callbacks_factory``);
* :class:`CorrectedWeightDecay` (``_weight_decay``): weight decay that follows the LR schedule;
* ``_loggers``: TensorBoard and W&B views, each guarded so that a failing logger never stops
  training; ``_trainer``: everything read off a Trainer; ``_notices``: one-time messages
  (texts in :mod:`lightning_sdm._messages`); ``_discovery`` and ``_resume``: the first batch's
  trace and checkpoints written with other settings.
"""

from lightning_sdm.lightning._callback import SphericalDynamicsCallback
from lightning_sdm.lightning._fabric import FabricSphericalDynamics, fabric_callback
from lightning_sdm.lightning._loggers import wandb_step_key
from lightning_sdm.lightning._plugin import (
    callbacks_factory,
    fabric_callbacks_factory,
    settings_from_env,
)
from lightning_sdm.lightning._weight_decay import CorrectedWeightDecay

__all__ = [
    "CorrectedWeightDecay",
    "FabricSphericalDynamics",
    "SphericalDynamicsCallback",
    "callbacks_factory",
    "fabric_callback",
    "fabric_callbacks_factory",
    "settings_from_env",
    "wandb_step_key",
]
