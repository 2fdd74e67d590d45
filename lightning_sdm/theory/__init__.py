"""What theory predicts: equilibrium angular updates, norms and relaxation times per optimizer.

The predictions read only an optimizer and a param group (:func:`predict_param_group`); the
formulas, their sources and where each is derived rather than published are in ``_predictions``.
``_optimizers`` recognises the optimizer family (wrappers included), ``_simulation`` integrates
a synthetic scale-invariant weight to check the formulas, and
:mod:`~lightning_sdm.theory.check_grid` is the grid of optimizers and hyper-parameters on which
they are checked against real training.
"""

from lightning_sdm.theory._optimizers import Family, family_of
from lightning_sdm.theory._predictions import (
    Prediction,
    adamw_equilibrium_weight_norm,
    decoupled_relaxation_steps,
    equilibrium_angular_update,
    equilibrium_norm_exponent,
    equilibrium_weight_norm,
    explain_equilibrium,
    for_shape,
    lr_change_relaxation_steps,
    predict_param_group,
    relaxation_steps,
    relaxation_time,
    steps_to_equilibrium,
)
from lightning_sdm.theory._simulation import SimulationResult, simulate_scale_invariant
from lightning_sdm.theory._trajectory import angular_update_trajectory

__all__ = [
    "Family",
    "Prediction",
    "SimulationResult",
    "adamw_equilibrium_weight_norm",
    "angular_update_trajectory",
    "decoupled_relaxation_steps",
    "equilibrium_angular_update",
    "equilibrium_norm_exponent",
    "equilibrium_weight_norm",
    "explain_equilibrium",
    "family_of",
    "for_shape",
    "lr_change_relaxation_steps",
    "predict_param_group",
    "relaxation_steps",
    "relaxation_time",
    "simulate_scale_invariant",
    "steps_to_equilibrium",
]
