"""The measurement settings, validated and clamped in one place (torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

from lightning_sdm._checks import check_integer, check_number
from lightning_sdm.records import GRANULARITIES, Granularity

__all__ = ["DEFAULT_EVERY_N_STEPS", "ENGINES", "Engine", "MonitorConfig"]

#: How a measured step's statistics are computed: ``"eager"`` (the chunked float64 engine,
#: the reference), ``"compiled"`` (one ``torch.compile``'d pass per step, compiled once per
#: layout at the first measured step; eager where compiling fails) or ``"auto"`` (per device,
#: from measurements: see ``lightning_sdm.monitor._fused``).
Engine = Literal["auto", "eager", "compiled"]
ENGINES: tuple[str, ...] = get_args(Engine)

#: Optimizer steps between two windows where nothing else says (Fabric; a Trainer without
#: ``log_every_n_steps``).
DEFAULT_EVERY_N_STEPS = 50


@dataclass(frozen=True)
class MonitorConfig:
    """What to measure and how often; every consumer reads these values from here.

    Validated once, at construction; ``window`` is clamped to ``every_n_steps`` once that is
    known (a window cannot be longer than the interval it closes). ``every_n_steps=None`` means
    "the Trainer's ``log_every_n_steps``", resolved by :meth:`resolve` in ``setup``.

    Args:
        granularity: ``"layer"`` or ``"channel"`` (see :data:`~lightning_sdm.records.Granularity`).
        every_n_steps: optimizer steps between two windows, or ``None``.
        window: measured optimizer steps per window (the last ``window`` of each interval).
        horizon: also measure the angle between ``w_t`` and ``w_{t+horizon}`` over consecutive
            blocks of ``horizon`` steps inside each window; at most ``window``.
        verify_steps: measured steps on which the gradient-orthogonality check runs (0: never).
        orthogonality_tolerance: the gradient-orthogonality cross-check in units of the
            ``1/sqrt(n)`` that a random direction in ``n`` dimensions gives (as AdamP does): a unit
            of ``n`` elements is "violated" when ``|cos(w, grad)| > orthogonality_tolerance /
            sqrt(n)``. A scale-invariant unit gives float32 rounding (~1e-6), a weight that is not
            invariant about ``1/sqrt(n)`` or more: a size-free threshold such as 1e-2 would
            "verify" a random ``100 x 100`` weight. In ``(0, 10]``.
        sync_timeout: seconds a rank waits in the monitor's reduction for the other ranks
            (distributed runs; the monitor has a process group of its own). Past it, the
            monitor stops on that rank with one warning and training goes on: ranks that
            disagree on the number of optimizer steps cannot hang the job. In ``[1, 86400]``.
        engine: how a measured step's sums are computed (see :data:`Engine`): the same numbers
            to 1e-12 either way; ``"compiled"`` is ~4x cheaper per measured step on CPU but
            compiles for ~1-1.7 s per monitored tensor at its first measured step (a 2-core
            CPU; Inductor caches the result on disk for later runs).

    Raises:
        ValueError: naming the first invalid argument.

    Example::

        >>> MonitorConfig(every_n_steps=5, window=8).window
        5
        >>> MonitorConfig(every_n_steps=None).resolve(20).every_n_steps
        20
        >>> MonitorConfig(window=0)
        Traceback (most recent call last):
        ...
        ValueError: `window` must be a positive integer, got 0.
    """

    granularity: Granularity = "layer"
    every_n_steps: int | None = DEFAULT_EVERY_N_STEPS
    # 2 of every 50: <= 1% of a compute-light ResNet-18's CPU step; in the detector study
    # (docs/reproduction.md) nearly as good as 8 (in equilibrium after settling 96.3% vs 97.3% SGD,
    # 90.9% vs 92.4% AdamW; flags off by > 10% and late detections unchanged; 20 exits instead
    # of 5 in ~2270 windows) at a quarter of the cost.
    window: int = 2
    horizon: int = 1
    verify_steps: int = 3
    orthogonality_tolerance: float = 0.1
    sync_timeout: float = 300.0
    engine: Engine = "auto"

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"`granularity` must be one of {GRANULARITIES}, got {self.granularity!r}."
            )
        if self.engine not in ENGINES:
            raise ValueError(f"`engine` must be one of {ENGINES}, got {self.engine!r}.")
        check_integer("every_n_steps", self.every_n_steps, 1, allow_none=True)
        check_integer("window", self.window, 1)
        check_integer("horizon", self.horizon, 1)
        check_integer("verify_steps", self.verify_steps, 0)
        for name in ("every_n_steps", "window", "horizon", "verify_steps"):  # numpy ints too
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else int(value))
        check_number(
            "orthogonality_tolerance",
            self.orthogonality_tolerance,
            low=0.0,
            high=10.0,
            high_open=False,
        )
        # At least a second: gloo rounds a shorter wait to 0 ms and fails to create the group.
        timeout = self.sync_timeout
        check_number("sync_timeout", timeout, low=1, high=86400, low_open=False, high_open=False)
        if self.every_n_steps is not None and self.window > self.every_n_steps:
            object.__setattr__(self, "window", self.every_n_steps)
        if self.horizon > self.window:
            raise ValueError(
                f"`horizon` must be at most the window ({self.window} steps"
                + (
                    f", every_n_steps={self.every_n_steps}"
                    if self.every_n_steps == self.window
                    else ""
                )
                + f"), got {self.horizon}: pass `window` (and `every_n_steps`) of at least "
                f"{self.horizon} too."
            )

    def key(self) -> dict[str, Any]:
        """The settings that identify a callback's state (``state_key``), as given.

        ``sync_timeout`` and ``engine`` are left out: they change how long ranks wait and how the
        same sums are computed, not what is measured, and a resume with other values must still
        find its checkpointed state.
        """
        return {k: v for k, v in asdict(self).items() if k not in ("sync_timeout", "engine")}

    @property
    def resolved(self) -> bool:
        """Whether ``every_n_steps`` is known."""
        return self.every_n_steps is not None

    def resolve(self, every_n_steps: int) -> MonitorConfig:
        """This config with ``every_n_steps`` set (``window`` clamped again, ``horizon`` checked).

        Raises:
            ValueError: if ``horizon`` does not fit the resulting window.
        """
        if self.every_n_steps is not None:
            return self
        return replace(self, every_n_steps=every_n_steps)

    def is_measured(self, step_index: int) -> bool:
        """Whether optimizer step ``step_index`` (0-based) is among the last ``window`` ones."""
        assert self.every_n_steps is not None
        return step_index % self.every_n_steps >= self.every_n_steps - self.window

    def position_in_window(self, step_index: int) -> int:
        """0 for the first measured step of a window."""
        assert self.every_n_steps is not None
        return step_index % self.every_n_steps - (self.every_n_steps - self.window)
