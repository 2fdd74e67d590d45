"""The fused measurement: one compiled pass over the snapshot and the weights per step.

The eager engine (:class:`lightning_sdm._engine.BatchedStatistics`) upcasts both tensors into a
float64 work buffer chunk by chunk, subtracts, and forms the three sums with a batched matrix
product: five passes over cache-sized chunks, 2.3-2.5x the cheapest eager measurement on CPU
(``benchmarks/README.md``). Here ``torch.compile`` (Inductor: C++/OpenMP on CPU, Triton on CUDA)
turns the same arithmetic, per unit row ``sum(w_t^2)``, ``sum(d^2)``, ``sum(d * w_t)`` with
``d = float64(w_{t+1}) - float64(w_t)``, into one reduction loop per tensor that reads each
operand once and keeps the float64 accumulators in registers.

It is compiled once per layout (the tensors' shapes, dtypes and unit dimensions), for one
function object of its own, with ``dynamic=False``: a new call with the same layout runs the
compiled code without recompiling (guards only), and a second layout (another optimizer, the
tensor-row layout of the orthogonality check) gets its own compiled code instead of turning the
first into a dynamic-shape one. The eager engine stays the reference (the results agree to 1e-12,
``tests/monitor/test_fused.py``) and the fallback: if compiling or running the compiled code
fails (no C++ compiler, an Inductor error, a device it does not support), one warning says why
and every later call of that layout runs eagerly. The compile time is measured and kept on the
object (:attr:`FusedStatistics.compile_seconds`); the monitor adds it to its cost meter and logs
it once.
"""

from __future__ import annotations

import logging
import time
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_sdm import _messages
from lightning_sdm._engine import (
    NUM_STATISTICS,
    BatchedStatistics,
    _Geometry,
    _Plan,
    check_arguments,
    is_dtensor,
    plan_for,
)
from lightning_sdm.config import Engine

__all__ = ["FusedStatistics", "resolve_engine", "statistics_engine"]

_log = logging.getLogger("lightning_sdm")

# Devices Inductor generates code for (C++ on CPU, Triton on CUDA); others run eagerly.
_COMPILED_DEVICES = ("cpu", "cuda")

# What "auto" resolves to per device type, from measurements (benchmarks/README.md, "Fused
# measurement"). CPU (1 thread, AMD EPYC, bench_scaling.py --fused): the compiled pass costs
# 0.35-0.56 ns per element at 1e7-1e8 elements against 1.9-2.3 ns eagerly (4x less; with the
# snapshot copy 0.7x the eager floor instead of 2x), but compiling takes 10-35 s for 10-30
# tensors on that (loaded, 2-core) machine, 32 s for ResNet-18's 20 conv weights. Saving ~18 ms
# per measured step of a full-width ResNet-18 (11.2M elements), that is paid back after ~1,800
# steps measured every step, ~45,000 at the default schedule (2 of every 50), and a short
# debugging run never pays it back: so eager. CUDA: not measured yet (no GPU was lent to the
# session that wrote this; benchmarks/gpu_check.py times both engines), so eager, the measured
# reference, until a measurement says otherwise.
_AUTO: dict[str, Engine] = {"cpu": "eager", "cuda": "eager"}


def resolve_engine(engine: Engine, device: torch.device) -> Engine:
    """``"eager"`` or ``"compiled"``: what ``engine`` means for tensors on ``device``.

    Example::

        >>> cpu = torch.device("cpu")
        >>> resolve_engine("auto", cpu), resolve_engine("compiled", cpu)
        ('eager', 'compiled')
    """
    if engine != "auto":
        return engine
    return _AUTO.get(device.type, "eager")


def statistics_engine(dims: Sequence[int | None], engine: Engine) -> BatchedStatistics:
    """The per-step statistics of a watch: the eager engine, or the fused one over it.

    ``"auto"`` is resolved at the first call, when the tensors' device is known.
    """
    if engine == "eager":
        return BatchedStatistics(dims)
    return FusedStatistics(dims, engine)


class FusedStatistics(BatchedStatistics):
    """:class:`~lightning_sdm._engine.BatchedStatistics` with the step's sums in one compiled pass.

    Same call, same ``[units, 4]`` result (to 1e-12 relative); the eager engine it extends is
    the fallback, and computes what the fused pass does not cover: ``curr_is_delta=True`` (the
    orthogonality check of the first measured steps) and devices Inductor does not compile for.

    Args:
        dims: the unit dimension of each tensor (``None``: the whole tensor is one unit).
        engine: ``"compiled"``, or ``"auto"`` (resolved per device by :func:`resolve_engine`).
    """

    def __init__(self, dims: Sequence[int | None], engine: Engine = "compiled") -> None:
        super().__init__(dims)
        self.engine = engine
        #: Seconds spent compiling (the first call of each layout), 0 until then.
        self.compile_seconds = 0.0
        #: Why the fused pass was given up (then every call runs eagerly), or ``None``.
        self.fallback: str | None = None
        self._kernels: dict[tuple[object, ...], Callable[..., Tensor]] = {}
        self._geometries: tuple[_Geometry, ...] | None = None
        self._fused_shapes: list[torch.Size] | None = None

    def __call__(
        self,
        prev: Sequence[Tensor],
        curr: Sequence[Tensor],
        *,
        curr_is_delta: bool = False,
    ) -> Tensor:
        """The ``[units, 4]`` statistics of one step (see :mod:`lightning_sdm.functional`)."""
        if curr_is_delta or self.fallback is not None or not curr:
            return super().__call__(prev, curr, curr_is_delta=curr_is_delta)
        device = curr[0].device
        if resolve_engine(self.engine, device) == "eager" or device.type not in _COMPILED_DEVICES:
            return super().__call__(prev, curr, curr_is_delta=curr_is_delta)
        try:
            return self._fused(prev, curr)
        except Exception as error:  # the measurement must never stop training
            self.fallback = _describe(error)
            warnings.warn(_messages.fused_engine_failed(self.fallback), UserWarning, stacklevel=2)
            return super().__call__(prev, curr, curr_is_delta=curr_is_delta)

    def __getstate__(self) -> dict[str, object]:
        # Compiled code does not pickle (torch.save, deepcopy, spawned processes): a copy
        # compiles again at its first call (from Inductor's on-disk cache, when it has one).
        return {**super().__getstate__(), "_kernels": {}}

    def _fused(self, prev: Sequence[Tensor], curr: Sequence[Tensor]) -> Tensor:
        shapes = [t.shape for t in curr]
        geometries = self._geometries
        if (
            geometries is None
            or is_dtensor(curr[0])
            or shapes != self._fused_shapes
            or [t.shape for t in prev] != shapes
        ):
            prev, curr, geometries = check_arguments(prev, curr, self.dims, self.chunk_numel)
            self._geometries = geometries
            self._fused_shapes = None if is_dtensor(curr[0]) else shapes
        if not geometries:
            return torch.zeros(0, NUM_STATISTICS, dtype=torch.float64)
        device = curr[0].device
        plan = plan_for(geometries, self.chunk_numel, device)
        layout = tuple((g.dim, g.local_units) for g in geometries)
        key = (layout, device, tuple(t.dtype for t in prev), tuple(t.dtype for t in curr))
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = _compile(layout)
            start = time.perf_counter()
            with torch.no_grad():
                sums = kernel(list(prev), list(curr))
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the compile's own kernels, once per layout
            seconds = time.perf_counter() - start
            self.compile_seconds += seconds
            self._kernels[key] = kernel
            _log.info(_messages.fused_engine_compiled(seconds, len(layout), str(device)))
        else:
            with torch.no_grad():
                sums = kernel(list(prev), list(curr))
        return _assemble(plan, sums)


def _statistics(prev: list[Tensor], curr: list[Tensor], layout: Any = ()) -> Tensor:
    """Per local unit row: ``sum(w_t^2)``, ``sum(d^2)``, ``sum(d * w_t)`` in float64: ``[rows, 3]``.

    The Python loop unrolls at trace time (the layout is a constant of each compiled copy); at
    run time there is one reduction per tensor, its three sums fused into it.
    """
    rows = []
    for p, c, (dim, units) in zip(prev, curr, layout, strict=True):
        if units == 0:
            continue
        if dim is not None and dim != 0:
            p, c = p.movedim(dim, 0), c.movedim(dim, 0)
        w = p.reshape(units, -1).to(torch.float64)
        # Exact: the difference of two float32 (or bfloat16) values is a float64 value.
        d = c.reshape(units, -1).to(torch.float64) - w
        rows.append(torch.stack([(w * w).sum(1), (d * d).sum(1), (d * w).sum(1)], dim=1))
    if not rows:
        return torch.zeros(0, 3, dtype=torch.float64, device=prev[0].device)
    return torch.cat(rows)


def _compile(layout: tuple[tuple[int | None, int], ...]) -> Callable[..., Tensor]:
    """A compiled copy of :func:`_statistics` for ``layout``, with a code object of its own.

    Dynamo keeps its compiled code and guards on the function's code object: sharing one
    between layouts would count each new layout as a recompile of the others (and, past the
    first, make the shapes dynamic). A copy of the code object per layout keeps them apart.
    """
    code = _statistics.__code__.replace()
    function = types.FunctionType(code, _statistics.__globals__, "_statistics", (layout,))
    return torch.compile(function, dynamic=False, fullgraph=True)


def _describe(error: BaseException) -> str:
    """One line on why compiling failed: the compiler's own error, not dynamo's wrapper."""
    # BackendCompilerFailed wraps Inductor's error (``inner_exception``), itself often chained.
    cause = getattr(error, "inner_exception", None) or error.__cause__ or error
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else 'no message'}"[:300]


def _assemble(plan: _Plan, sums: Tensor) -> Tensor:
    """The ``[units, 4]`` statistics from the local rows' sums (as the eager engine ends)."""
    local = torch.cat([sums, plan.coverage], dim=1)
    if plan.rows is None:
        return local
    stats = local.new_zeros(plan.total_units, NUM_STATISTICS)
    return stats.index_copy_(0, plan.rows, local)
