"""What the monitor costs, measured in the run itself: host time in its hooks vs the step time.

The README's cost figures hold for the models they were measured on; a user's own cost depends on
how many weights are monitored against how much compute a step does (a compute-light model on a
CPU pays ~4% at the default schedule, a compute-heavy one ~0.3%). So the monitor times itself:
``time.perf_counter`` around the work of its hooks (nothing on steps it does not measure, where
the hooks only count), and the wall time from one step's pre-hook to the next (a whole period:
forward, backward, update, the loop's callbacks). The first window is left out (the tracing
step, the first allocation of the work buffers, the first logging): the figure covers the second
interval, from the pre-hook after the first window closes to the pre-hook after the second
(whole periods), the steady state.

Host time is the cost only when the tensors are on the CPU; on an accelerator the hooks enqueue
kernels and return, so the callback reports this figure for CPU runs only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["CostMeter", "schedule_within"]


class CostMeter:
    """Seconds spent in the monitor's hooks and between optimizer steps, from a restart on."""

    #: Where the monitor reads the time (a class attribute: a test can drive it by hand).
    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(self) -> None:
        self.hook_seconds = 0.0
        self.measured_steps = 0
        self.steps = 0
        self.windows_closed = 0
        self._start: float | None = None
        self._last: float | None = None
        self._freeze = False
        #: Seconds the fused measurement spent compiling (``engine="compiled"``; 0 otherwise):
        #: paid once per layout at the first measured step, so outside the steady figures.
        self.compile_seconds = 0.0
        #: The first steady-state interval's figures, as they were when its window closed:
        #: ``(fraction, seconds per measured step, seconds per step)``; ``None`` until then.
        self.steady: tuple[float, float, float] | None = None

    def add(self, seconds: float, measured: bool) -> None:
        """Time spent in one hook call (``measured``: it measured a step)."""
        self.hook_seconds += seconds
        self.measured_steps += int(measured)

    def step(self, first: bool = True) -> None:
        """An optimizer step begins (its pre-hook): the time between two calls is one period.

        ``first``: the step is the first optimizer's. With several optimizers only its steps
        open and close the interval, so that the interval is made of whole batches.
        """
        now = self.clock()
        if self._start is None:
            if not first:
                return
            self._start = now
        self._last = now
        self.steps += 1
        if self._freeze and first and self.measured_steps:  # whole periods since the start
            self.steady = self._figures(now, self.steps - 1)
            self._freeze = False

    def window_closed(self) -> None:
        """The first close restarts the meter; the second one keeps :attr:`steady`.

        Called for the first optimizer's windows only: with several optimizers, their windows
        close in the same batch, and one close must not end the interval another one began.
        """
        self.windows_closed += 1
        if self.windows_closed == 1:
            self.hook_seconds, self.measured_steps, self.steps = 0.0, 0, 0
            self._start = self._last = None
        elif self.steady is None:
            self._freeze = True  # at the next step's pre-hook: whole periods only

    @property
    def ready(self) -> bool:
        """A whole steady-state interval was timed (:attr:`steady` holds its figures)."""
        return self.steady is not None

    @property
    def step_seconds(self) -> float:
        """Mean wall time of one optimizer step without the monitor's share (so far)."""
        return self._figures(self._last, self.steps - 1)[2]

    @property
    def seconds_per_measured_step(self) -> float:
        return self.hook_seconds / self.measured_steps if self.measured_steps else math.nan

    @property
    def fraction(self) -> float:
        """Hook time over the step time without it (0.036: the monitor adds 3.6%), so far."""
        return self._figures(self._last, self.steps - 1)[0]

    def _figures(self, end: float | None, periods: int) -> tuple[float, float, float]:
        if self._start is None or end is None or periods < 1:
            return math.nan, self.seconds_per_measured_step, math.nan
        base = max(end - self._start - self.hook_seconds, 0.0)
        fraction = self.hook_seconds / base if base > 0 else math.nan
        return fraction, self.seconds_per_measured_step, base / periods


def schedule_within(
    budget: float, every_n_steps: int, window: int, per_measured: float, per_step: float
) -> tuple[int | None, int]:
    """Schedules that keep the cost within ``budget`` (a fraction of the step time).

    Returns ``(window, every_n_steps)``: the largest window that fits at this
    ``every_n_steps`` (``None`` if not even one measured step does), and the smallest
    ``every_n_steps`` that fits with this ``window``. The cost is linear in the measured steps:
    ``window * per_measured / (every_n_steps * per_step)``.

    Example::

        >>> schedule_within(0.01, 50, 8, per_measured=0.033, per_step=0.154)  # 33 vs 154 ms
        (2, 172)
        >>> schedule_within(0.01, 4, 4, per_measured=0.0051, per_step=0.009)  # 1 of 4: 14%
        (None, 227)
    """
    fitting_window = math.floor(budget * every_n_steps * per_step / per_measured)
    fitting_every = math.ceil(window * per_measured / (budget * per_step))
    return (fitting_window if fitting_window >= 1 else None), max(fitting_every, every_n_steps)
