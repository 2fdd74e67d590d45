"""Cost of one measurement against model size and against the number of tensors.

Times, in one process and interleaved across configurations, the exact statistics of one
optimizer step (``w_t`` and ``w_{t+1}`` of every monitored tensor):

* ``monitor path``: what :class:`lightning_sdm.SphericalMonitor` runs on a measured step once its
  window is open (layout cached, work buffer allocated);
* ``functional``: :func:`lightning_sdm.angular_update_statistics` from scratch (validation,
  cached layout, work buffer allocated and freed by the call);
* ``snapshot copy``: the ``_foreach_copy_`` of the weights taken before the step, for scale;
* ``floor``: the cheapest eager measurement of the same step, the yardstick of the issue: the
  snapshot copy plus the three sums the angle needs computed with the fewest eager passes
  (``_foreach_norm`` of ``w_t`` and of ``w_{t+1}``, and ``<w_t, w_{t+1}>`` by ``torch.vdot``
  per tensor), in float32, so less exact than the monitor's float64 partial sums. ``x floor`` is
  (snapshot copy + monitor path) / floor: what a measured step costs in the hooks, relative to
  that yardstick.
* ``fused path`` (``--fused``): the same statistics through the compiled engine
  (:class:`lightning_sdm.monitor._fused.FusedStatistics`, ``engine="compiled"``), once compiled;
  ``x floor (fused)`` = (snapshot copy + fused path) / floor, and ``compile`` the one-time
  compile of that layout (wall clock).

CPU time of the calling thread (``time.thread_time``), median over ``--repeats``; ``ns/elem`` is
that time per monitored element. Memory: ``work buffers`` are the bytes of the float64 buffers the
monitor keeps while a window is open (besides its snapshot: one copy of the weights), counted
exactly; ``peak RSS added`` is the peak resident memory one functional call adds (``VmHWM`` reset
through ``/proc/self/clear_refs`` after ``malloc_trim``; Linux and glibc only). Compare both with
the 4 bytes per element of the float32 weights themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import statistics
import time
from collections.abc import Callable

import torch

from lightning_sdm import functional
from lightning_sdm._engine import BatchedStatistics
from lightning_sdm.monitor._fused import FusedStatistics

Workload = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def make_tensors(total: int, count: int, seed: int = 0) -> Workload:
    """``count`` float32 ``[rows, cols]`` tensors of ``total`` elements in all, and a step."""
    generator = torch.Generator().manual_seed(seed)
    base, extra = divmod(total, count)
    prev, curr, snapshot = [], [], []
    for index in range(count):
        numel = base + (1 if index < extra else 0)
        rows = max(1, int(numel**0.5) // 4)
        while numel % rows:
            rows -= 1
        weight = torch.randn(rows, numel // rows, generator=generator)
        prev.append(weight)
        curr.append(weight + 1e-3 * torch.randn(weight.shape, generator=generator))
        snapshot.append(torch.empty_like(weight))
    return prev, curr, snapshot


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_added_bytes(function: Callable[[], object]) -> int | None:
    """Peak RSS during ``function()`` above the RSS before it (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back first
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    function()
    return max(_status_kib("VmHWM") - before, 0) * 1024


def cpu_seconds(function: Callable[[], object]) -> float:
    start = time.thread_time()
    function()
    return time.thread_time() - start


class Case:
    def __init__(
        self, label: str, total: int, count: int, dim: int | None, fused: bool = False
    ) -> None:
        self.label, self.total, self.count, self.dim = label, total, count, dim
        self.prev, self.curr, self.snapshot = make_tensors(total, count)
        self.batched = BatchedStatistics([dim] * count)
        self.fused = FusedStatistics([dim] * count, "compiled") if fused else None
        self.times: dict[str, list[float]] = {
            "monitor": [],
            "functional": [],
            "copy": [],
            "floor": [],
            "fused": [],
        }

    def run_once(self) -> None:
        prev, curr, dim = self.prev, self.curr, self.dim
        if self.batched is not None:
            self.times["monitor"].append(cpu_seconds(lambda: self.batched(prev, curr)))
        self.times["functional"].append(
            cpu_seconds(lambda: functional.angular_update_statistics(prev, curr, dim=dim))
        )
        self.times["copy"].append(
            cpu_seconds(lambda: torch._foreach_copy_(self.snapshot, self.prev))
        )
        self.times["floor"].append(cpu_seconds(self._floor))
        if self.fused is not None:
            fused = self.fused
            self.times["fused"].append(cpu_seconds(lambda: fused(prev, curr)))

    def _floor(self) -> None:
        torch._foreach_copy_(self.snapshot, self.prev)
        torch._foreach_norm(self.snapshot)
        torch._foreach_norm(self.curr)
        for before, after in zip(self.snapshot, self.curr, strict=True):
            torch.vdot(before.view(-1), after.view(-1))

    def work_memory(self) -> int | None:
        prev, curr, dim = self.prev, self.curr, self.dim
        return peak_added_bytes(lambda: functional.angular_update_statistics(prev, curr, dim=dim))

    def release(self) -> None:
        self.prev = self.curr = self.snapshot = []
        self.batched = self.fused = None


def run_table(cases: list[Case], repeats: int, title: str, first_column: str) -> str:
    for case in cases:  # warm-up: layouts cached (and compiled), buffers touched once
        case.run_once()
        for values in case.times.values():
            values.clear()
        if case.fused is not None:
            if case.fused.fallback is not None:
                print(f"  {case.label}: fused path unavailable: {case.fused.fallback}")
                case.fused = None
            else:
                print(f"  {case.label}: compiled in {case.fused.compile_seconds:.1f} s", flush=True)
    for _ in range(repeats):
        for case in cases:
            case.run_once()
    fused_columns = any(case.times["fused"] for case in cases)
    lines = [
        f"### {title}",
        "",
        f"| {first_column} | monitor path (ms) | ns/elem | functional (ms) | ns/elem | "
        "snapshot copy (ms) | floor (ms) | x floor | work buffers | peak RSS added |"
        + (" fused path (ms) | ns/elem | x floor (fused) | compile (s) |" if fused_columns else ""),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|" * 4 if fused_columns else ""),
    ]
    for case in cases:
        memory = case.work_memory()
        cells = [case.label]
        for key in ("monitor", "functional"):
            values = case.times[key]
            if values:
                seconds = statistics.median(values)
                cells += [f"{seconds * 1e3:.2f}", f"{seconds * 1e9 / case.total:.2f}"]
            else:
                cells += ["n/a", "n/a"]
        copy, floor = (statistics.median(case.times[k]) for k in ("copy", "floor"))
        cells.append(f"{copy * 1e3:.2f}")
        cells.append(f"{floor * 1e3:.2f}")
        monitor = case.times["monitor"]
        ratio = (copy + statistics.median(monitor)) / floor if monitor and floor > 0 else None
        cells.append("n/a" if ratio is None else f"{ratio:.2f}x")
        workspace = getattr(case.batched, "peak_workspace_bytes", None)
        cells.append("n/a" if workspace is None else f"{workspace / 2**20:.2f} MiB")
        cells.append("n/a" if memory is None else f"{memory / 2**20:.1f} MiB")
        if fused_columns:
            fused = case.times["fused"]
            if fused and floor > 0 and case.fused is not None:
                seconds = statistics.median(fused)
                cells += [
                    f"{seconds * 1e3:.2f}",
                    f"{seconds * 1e9 / case.total:.2f}",
                    f"{(copy + seconds) / floor:.2f}x",
                    f"{case.fused.compile_seconds:.1f}",
                ]
            else:
                cells += ["n/a"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--max-total", type=float, default=1e8, help="largest model size")
    parser.add_argument("--tensors", type=int, default=20, help="tensors in the size table")
    parser.add_argument("--fixed-total", type=float, default=1e7, help="size of the count table")
    parser.add_argument(
        "--granularity", choices=("layer", "channel"), default="layer", help="dim=None or dim=0"
    )
    parser.add_argument(
        "--fused", action="store_true", help="also time the compiled engine (compiles per case)"
    )
    parser.add_argument(
        "--fused-max-tensors",
        type=int,
        default=30,
        help="in the tensor-count table, compile only up to this many tensors (1-2.5 s each)",
    )
    parser.add_argument(
        "--counts", type=int, nargs="+", default=[10, 30, 100, 300, 1000], help="tensor counts"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dim = None if args.granularity == "layer" else 0
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), granularity {args.granularity}, "
        f"float32 weights, {args.repeats} interleaved repeats",
        flush=True,
    )
    sections = []

    totals = [t for t in (1e5, 1e6, 1e7, 1e8) if t <= args.max_total]
    cases = [Case(f"{t:.0e}", int(t), args.tensors, dim, args.fused) for t in totals]
    sections.append(
        run_table(
            cases,
            args.repeats,
            f"Against total size ({args.tensors} tensors)",
            "monitored elements",
        )
    )
    print(sections[-1], flush=True)
    for case in cases:
        case.release()

    total = int(args.fixed_total)
    cases = [
        Case(str(count), total, count, dim, args.fused and count <= args.fused_max_tensors)
        for count in args.counts
    ]
    sections.append(
        run_table(
            cases,
            args.repeats,
            f"Against the number of tensors ({total:.0e} elements in all)",
            "tensors",
        )
    )
    print(sections[-1], flush=True)


if __name__ == "__main__":
    main()
