"""One trace of a module's first training step, shared by every callback that asks for it.

Several callbacks on one Trainer (say, one at layer and one at channel granularity) must not trace
each other's hooks: the first to ask starts a :class:`ScaleInvarianceTracer` on the module, the
others join it, and the first to read the report stops it.
"""

from __future__ import annotations

from torch import nn

from lightning_sdm.invariance._recorder import ScaleInvarianceTracer
from lightning_sdm.invariance._report import InvarianceReport

__all__ = ["SharedTrace"]

# module id -> the running tracer of that module
_RUNNING: dict[int, ScaleInvarianceTracer] = {}


class SharedTrace:
    """A handle on the (possibly shared) trace of ``module``'s next forward pass.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> first, second = SharedTrace(net), SharedTrace(net)
        >>> _ = net(torch.randn(8, 4))
        >>> [u.name for u in first.report().units] == [u.name for u in second.report().units]
        True
    """

    def __init__(self, module: nn.Module) -> None:
        self._key = id(module)
        tracer = _RUNNING.get(self._key)
        if tracer is None:
            tracer = ScaleInvarianceTracer(module)
            tracer.__enter__()
            _RUNNING[self._key] = tracer
        self._tracer: ScaleInvarianceTracer | None = tracer

    def report(self) -> InvarianceReport:
        """Stop the trace if it still runs, and return what it found."""
        tracer = self._tracer
        if tracer is None:
            raise RuntimeError("This trace was closed without a report.")
        self._stop(tracer)
        return tracer.report()

    def close(self) -> None:
        """Stop the trace without reading it (an exception, or the end of fit)."""
        if self._tracer is not None:
            self._stop(self._tracer)
            self._tracer = None

    def _stop(self, tracer: ScaleInvarianceTracer) -> None:
        if _RUNNING.get(self._key) is tracer:
            del _RUNNING[self._key]
            tracer.__exit__(None, None, None)
