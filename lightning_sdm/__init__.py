"""lightning_sdm: Spherical Motion Dynamics monitor for PyTorch Lightning."""

from lightning_sdm.functional import angular_update, angular_update_statistics
from lightning_sdm.metric import AngularUpdate

__all__ = ["AngularUpdate", "angular_update", "angular_update_statistics"]
__version__ = "0.1.0.dev0"
