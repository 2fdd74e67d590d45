"""Measuring: optimizer hooks, snapshots, the batched float64 statistics, windows, rank agreement.

:class:`SphericalMonitor` is the whole face: give it a module, its optimizers and the units to
watch, ``attach()`` it, and ``pop_windows()`` returns a :class:`~lightning_sdm.records.UnitWindow`
per unit each time a window closes. It knows no Trainer and no logger: the adapters in
:mod:`lightning_sdm.lightning` (and ``examples/plain_pytorch.py``) drive it.

Inside: ``_monitor`` (the object and its hooks), ``_watch`` (which tensors of which optimizer,
laid out once), ``_sync`` (the monitor's own process group; one bounded collective per closed
window) and ``_cost`` (the time its hooks take).
"""

from lightning_sdm.monitor._monitor import SphericalMonitor, orthogonality_threshold

__all__ = ["SphericalMonitor", "orthogonality_threshold"]
