"""lightning_sdm: Spherical Motion Dynamics monitor for PyTorch Lightning."""

from lightning_sdm.callback import SphericalDynamicsCallback
from lightning_sdm.equilibrium import EquilibriumDetector
from lightning_sdm.functional import angular_update, angular_update_statistics
from lightning_sdm.metric import AngularUpdate
from lightning_sdm.monitor import SphericalMonitor, UnitSpec, UnitWindow
from lightning_sdm.theory import equilibrium_angular_update, explain_equilibrium

__all__ = [
    "AngularUpdate",
    "EquilibriumDetector",
    "SphericalDynamicsCallback",
    "SphericalMonitor",
    "UnitSpec",
    "UnitWindow",
    "angular_update",
    "angular_update_statistics",
    "equilibrium_angular_update",
    "explain_equilibrium",
]
__version__ = "0.1.0.dev0"
