"""lightning_sdm: Spherical Motion Dynamics monitor for PyTorch Lightning.

The public names are imported on first use (PEP 562), so that ``lightning-sdm report`` and the
``LIGHTNING_SDM`` plugin entry point, which Lightning loads in every ``Trainer()``, do not pay for
importing Lightning, torchmetrics and the callback when they do not need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_sdm.actions._actions import DecayLR
    from lightning_sdm.config import MonitorConfig
    from lightning_sdm.equilibrium._detector import EquilibriumDetector
    from lightning_sdm.functional import angular_update, angular_update_statistics
    from lightning_sdm.lightning._callback import SphericalDynamicsCallback
    from lightning_sdm.lightning._weight_decay import CorrectedWeightDecay
    from lightning_sdm.metric import AngularUpdate
    from lightning_sdm.monitor._monitor import SphericalMonitor
    from lightning_sdm.records import EquilibriumEvent, HistoryRecord, UnitWindow
    from lightning_sdm.theory._predictions import equilibrium_angular_update, explain_equilibrium
    from lightning_sdm.units import Unit

_EXPORTS = {
    "AngularUpdate": "lightning_sdm.metric",
    "CorrectedWeightDecay": "lightning_sdm.lightning",
    "DecayLR": "lightning_sdm.actions",
    "EquilibriumDetector": "lightning_sdm.equilibrium",
    "EquilibriumEvent": "lightning_sdm.records",
    "HistoryRecord": "lightning_sdm.records",
    "MonitorConfig": "lightning_sdm.config",
    "SphericalDynamicsCallback": "lightning_sdm.lightning",
    "SphericalMonitor": "lightning_sdm.monitor",
    "Unit": "lightning_sdm.units",
    "UnitWindow": "lightning_sdm.records",
    "angular_update": "lightning_sdm.functional",
    "angular_update_statistics": "lightning_sdm.functional",
    "equilibrium_angular_update": "lightning_sdm.theory",
    "explain_equilibrium": "lightning_sdm.theory",
}

__all__ = [
    "AngularUpdate",
    "CorrectedWeightDecay",
    "DecayLR",
    "EquilibriumDetector",
    "EquilibriumEvent",
    "HistoryRecord",
    "MonitorConfig",
    "SphericalDynamicsCallback",
    "SphericalMonitor",
    "Unit",
    "UnitWindow",
    "angular_update",
    "angular_update_statistics",
    "equilibrium_angular_update",
    "explain_equilibrium",
]
__version__ = "0.1.0.dev0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_sdm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
