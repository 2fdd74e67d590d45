"""Finding the units of a LightningModule during its first training batch.

The first forward of the batch is traced. When it leaves parameters that an optimizer updates
unused (several networks trained in turn: a GAN in manual optimization runs the discriminator's
forward and backward before the generator's forward), the next forward of the same batch is
traced too, and decides those parameters; and so on until the batch ends. Units are usable as
soon as each forward is read, so the steps of that first batch are measured.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.optim import Optimizer

from lightning_sdm.invariance import InvarianceReport, SharedTrace

__all__ = ["UnitDiscovery"]


class UnitDiscovery:
    """Traces of the first batch's forwards, merged into one report."""

    def __init__(self) -> None:
        self.report: InvarianceReport | None = None
        self._trace: SharedTrace | None = None
        self._open: frozenset[str] = frozenset()

    @property
    def tracing(self) -> bool:
        """Whether a forward is being traced."""
        return self._trace is not None

    def start(self, module: nn.Module) -> None:
        """Trace ``module``'s next forward."""
        self.close()
        self.report = None
        self._trace = SharedTrace(module)

    def read(self, module: nn.Module, optimizers: Sequence[Optimizer]) -> InvarianceReport:
        """After a forward: the report so far; keeps tracing while optimized parameters are open."""
        assert self._trace is not None
        trace, self._trace = self._trace, None
        found = trace.report()
        self.report = found if self.report is None else self.report.completed_by(found)
        optimized = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
        named = dict(module.named_parameters())
        self._open = frozenset(
            name for name in self.report.unused if id(named.get(name)) in optimized
        )
        if self._open and not self.report.failed:
            self._trace = SharedTrace(module)  # the next forward of this batch
        return self.report

    def finish(self) -> InvarianceReport | None:
        """End of the first batch: stop any trace still waiting; the final report, if any."""
        self.close()
        return self.report

    def close(self) -> None:
        """Stop tracing (an exception, the end of fit)."""
        if self._trace is not None:
            self._trace.close()
            self._trace = None
        self._open = frozenset()
