"""Training-step overhead of the monitor (and of ``wandb.watch``) on a CPU ResNet-18.

One process, one model, one optimizer. Configurations are run in blocks of ``--steps`` training
steps, interleaved (A B C ... A B C ...) ``--repeats`` times, so that slow drifts of a shared
machine hit every configuration alike. Reported per configuration:

* ``step``: median over repeats of the block's mean step time, wall clock and CPU time of the
  process (``time.process_time``: on a shared machine, time spent waiting for a core is not
  counted, which makes it far less noisy than wall time; torch runs on ``--threads`` threads);
* ``slowdown``: median over repeats of (block's mean step time / mean step time of the no-monitor
  block of the same repeat) - 1, in CPU time and in wall time, with the range over repeats;
* ``in-hook``: CPU time spent inside the monitor's optimizer hooks (or inside ``wandb.watch``'s
  histogram code plus the ``wandb.log`` commit) per step, as a fraction of the no-monitor step:
  the part of the slowdown that the tool itself causes, measured directly;
* ``peak RSS``: peak resident memory during the block minus resident memory before it (Linux:
  ``VmHWM`` after ``malloc_trim`` and a reset through ``/proc/self/clear_refs``), minus the same
  for the no-monitor block: a rough figure, as the allocator reuses memory freed by the training
  step; the ``held`` column counts the bytes of the tensors the monitor keeps (snapshot, work
  buffers, statistics) exactly, sampled inside a window.

Run ``python benchmarks/bench_overhead.py --help`` for the knobs; ``--lightning`` repeats the
comparison inside a Lightning ``Trainer`` with :class:`SphericalDynamicsCallback`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ResNet18, conv_units, median, synthetic_batches

from lightning_sdm import SphericalMonitor
from lightning_sdm.config import MonitorConfig

# ----------------------------------------------------------------------------- memory


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back first
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages among ``tensors`` (nested lists/dicts allowed)."""
    seen: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)):
            for item in vars(value).values():
                visit(item)

    visit(tensors)
    return sum(seen.values())


def monitor_held_bytes(monitor: SphericalMonitor) -> int:
    """Bytes of the tensors the monitor holds besides the model (snapshot, work buffers...)."""
    held = []
    workspace = 0
    for watch in monitor._watches:
        held.append([watch.snapshot, watch.anchor])
        held.append([watch.metric.step_statistics, watch.horizon_metric.step_statistics])
        statistics = getattr(watch, "statistics", None)  # the batched statistics' work buffer
        workspace += getattr(statistics, "workspace_bytes", 0)
    return tensor_bytes(held) + workspace


# ----------------------------------------------------------------------------- configurations


@dataclass
class Config:
    name: str
    start: Callable[[], None]
    stop: Callable[[], None]
    hook_seconds: Callable[[], float]
    after_step: Callable[[int], None] = lambda step: None
    held_bytes: Callable[[], int] = lambda: 0
    block_times: list[float] = field(default_factory=list)  # wall seconds per step
    block_cpu: list[float] = field(default_factory=list)  # CPU seconds per step
    hook_fractions: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    cpu_ratios: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    held: list[int] = field(default_factory=list)


class HookTimer:
    """Wraps callables and adds up the CPU time of the calling thread spent in them."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start

        return timed

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def monitor_config(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    every: int,
    window: int,
    engine: str = "eager",
) -> Config:
    monitor = SphericalMonitor(
        model, optimizer, conv_units(model), every_n_steps=every, window=window, engine=engine
    )
    timer = HookTimer()
    monitor._before_step = timer.wrap(monitor._before_step)  # type: ignore[method-assign]
    monitor._after_step = timer.wrap(monitor._after_step)  # type: ignore[method-assign]

    def stop() -> None:
        monitor.detach()
        monitor.pop_windows()

    config = Config(name, monitor.attach, stop, timer.take)
    config.held_bytes = lambda: monitor_held_bytes(monitor)
    config.monitor = monitor  # type: ignore[attr-defined]
    return config


@contextlib.contextmanager
def wandb_run(directory: str) -> Iterator[Any]:
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("WANDB_DIR", directory)
    import wandb

    run = wandb.init(project="lightning-sdm-bench", dir=directory, mode="offline")
    try:
        yield run
    finally:
        run.finish()


def wandb_config(name: str, run: Any, model: nn.Module, log_freq: int) -> Config:
    from wandb.integration.torch.wandb_torch import TorchHistory

    timer = HookTimer()
    if not getattr(TorchHistory, "_bench_wrapped", False):
        TorchHistory.log_tensor_stats = timer.wrap(TorchHistory.log_tensor_stats)  # type: ignore[method-assign]
        TorchHistory._bench_wrapped = True  # type: ignore[attr-defined]
        TorchHistory._bench_timer = timer  # type: ignore[attr-defined]
    shared: HookTimer = TorchHistory._bench_timer  # type: ignore[attr-defined]
    commit = shared.wrap(lambda step: run.log({"bench/step": step}))

    def after_step(step: int) -> None:
        # `wandb.watch` logs with commit=False; a user's loop commits at its own frequency.
        if (step + 1) % log_freq == 0:
            commit(step)

    return Config(
        name,
        start=lambda: run.watch(model, log="parameters", log_freq=log_freq),
        stop=lambda: run.unwatch(model),
        hook_seconds=shared.take,
        after_step=after_step,
    )


def none_config() -> Config:
    return Config("no monitor", lambda: None, lambda: None, lambda: 0.0)


# ----------------------------------------------------------------------------- the loop


def train_block(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    after_step: Callable[[int], None],
    probe: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """Mean wall and CPU seconds per step; ``probe`` runs (untimed) after the last but one."""
    wall = cpu = 0.0
    start, start_cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        after_step(step)
        if probe is not None and step == steps - 2:
            wall += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            probe()
            start, start_cpu = time.perf_counter(), time.process_time()
    wall += time.perf_counter() - start
    cpu += time.process_time() - start_cpu
    return wall / steps, cpu / steps


def run_blocks(
    configs: list[Config],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    repeats: int,
    warmup: bool = True,
) -> None:
    if warmup:  # one untimed pass per configuration (first-use allocations, verification)
        for config in configs:
            config.start()
            train_block(model, optimizer, batches, steps, config.after_step)
            config.stop()
            config.hook_seconds()
    baseline = configs[0]
    for repeat in range(repeats):
        order = configs if repeat % 2 == 0 else [configs[0], *reversed(configs[1:])]
        for config in order:
            config.start()
            rss_before = rss_bytes()
            reset_peak_rss()
            held: list[int] = []
            wall, cpu = train_block(
                model,
                optimizer,
                batches,
                steps,
                config.after_step,
                probe=lambda config=config, held=held: held.append(config.held_bytes()),
            )
            config.peaks.append(max(peak_rss_bytes() - rss_before, 0))
            config.held.extend(held)
            config.stop()
            config.block_times.append(wall)
            config.block_cpu.append(cpu)
            config.hook_fractions.append(config.hook_seconds() / steps)
        base, base_cpu = baseline.block_times[-1], baseline.block_cpu[-1]
        for config in configs:
            config.ratios.append(config.block_times[-1] / base - 1.0)
            config.cpu_ratios.append(config.block_cpu[-1] / base_cpu - 1.0)
            config.hook_fractions[-1] = config.hook_fractions[-1] / base_cpu
        print(
            f"  repeat {repeat + 1}/{repeats} (CPU ms/step): "
            + ", ".join(f"{c.name} {c.block_cpu[-1] * 1e3:.1f}" for c in configs),
            flush=True,
        )


def _percent(values: list[float]) -> str:
    return f"{median(values) * 100:+.2f}% ({min(values) * 100:+.1f}..{max(values) * 100:+.1f})"


def report(configs: list[Config], weights_bytes: int, title: str) -> str:
    base_peak = median(configs[0].peaks)
    lines = [
        f"### {title}",
        "",
        "| configuration | CPU ms/step | slowdown, CPU time | in-hook CPU | wall ms/step | "
        "slowdown, wall | extra peak RSS | held by monitor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        held = max(config.held) if config.held else 0
        extra_peak = median(config.peaks) - base_peak
        held_text = f"{held / 2**20:.1f} MiB ({held / weights_bytes:.2f}x)"
        lines.append(
            f"| {config.name} | {median(config.block_cpu) * 1e3:.1f} | "
            f"{_percent(config.cpu_ratios)} | {median(config.hook_fractions) * 100:.2f}% | "
            f"{median(config.block_times) * 1e3:.1f} | {_percent(config.ratios)} | "
            f"{extra_peak / 2**20:+.1f} MiB | {held_text} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Lightning


def lightning_comparison(args: argparse.Namespace) -> str:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_sdm import SphericalDynamicsCallback

    # CPU time inside the monitor's optimizer hooks and the callback's per-batch hook.
    hooks = HookTimer()
    for owner, name in (
        (SphericalMonitor, "_before_step"),
        (SphericalMonitor, "_after_step"),
        (SphericalDynamicsCallback, "on_train_batch_end"),
    ):
        setattr(owner, name, hooks.wrap(getattr(owner, name)))

    class Module(pl.LightningModule):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    class StepTimer(pl.Callback):
        """CPU time of each training batch (forward, backward, optimizer step, callbacks)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.hook_times: list[float] = []
            self._start = self._hooks = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            self._start, self._hooks = time.process_time(), hooks.seconds

        def on_train_batch_end(self, *args: Any) -> None:
            self.times.append(time.process_time() - self._start)
            self.hook_times.append(hooks.seconds - self._hooks)

    torch.manual_seed(0)
    module = Module(ResNet18(width=args.width, stem=args.stem))
    batches = synthetic_batches(4, args.batch_size)
    data = TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    loader = DataLoader(data, batch_size=args.batch_size)
    steps = args.lightning_steps
    skip = 2  # the first step of a fit traces the model (auto-detection) and warms up
    first_window = 50  # the Trainer's log_every_n_steps: the default callback's windows close here

    def fit(callbacks: list[pl.Callback]) -> tuple[float, float]:
        timer = StepTimer()
        trainer = pl.Trainer(
            max_steps=steps,
            callbacks=[*callbacks, timer],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            accelerator="cpu",
            log_every_n_steps=first_window,
        )
        trainer.fit(module, loader)
        times, hook_times = timer.times[skip:], timer.hook_times[skip:]
        # The batches after the first window closed: the steady state, without a
        # fit's one-time costs (trace, layout, the first measured steps' orthogonality check).
        steady = timer.hook_times[first_window:] if len(timer.hook_times) > first_window else [0.0]
        return (
            sum(times) / len(times),
            sum(hook_times) / len(hook_times),
            sum(steady) / len(steady),
        )

    makers: list[tuple[str, Callable[[], list[pl.Callback]]]] = [
        ("no callback", list),
        (
            "callback, every step (every_n_steps=1, window=1)",
            lambda: [SphericalDynamicsCallback(every_n_steps=1, window=1, prog_bar=False)],
        ),
        (
            f"callback, default (every_n_steps={MonitorConfig().every_n_steps}, "
            f"window={MonitorConfig().window})",
            lambda: [SphericalDynamicsCallback(prog_bar=False)],
        ),
    ]
    results: dict[str, list[float]] = {name: [] for name, _ in makers}
    ratios: dict[str, list[float]] = {name: [] for name, _ in makers}
    in_hooks: dict[str, list[float]] = {name: [] for name, _ in makers}
    steady_hooks: dict[str, list[float]] = {name: [] for name, _ in makers}
    for repeat in range(args.lightning_repeats):
        for name, make in makers:
            step, in_hook, steady = fit(make())
            results[name].append(step)
            in_hooks[name].append(in_hook)
            steady_hooks[name].append(steady)
        base = results[makers[0][0]][-1]
        for name, _ in makers:
            ratios[name].append(results[name][-1] / base - 1.0)
            in_hooks[name][-1] /= base
            steady_hooks[name][-1] /= base
        print(
            f"  lightning repeat {repeat + 1}: "
            + ", ".join(
                f"{name.split(' (')[0]} {results[name][-1] * 1e3:.0f} ms" for name, _ in makers
            ),
            flush=True,
        )
    lines = [
        f"### Inside a Lightning Trainer ({steps} steps per fit, first {skip} not timed)",
        "",
        "| configuration | CPU ms/step | slowdown, CPU time | in-hook CPU | "
        f"in-hook CPU after step {first_window} |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, _ in makers:
        lines.append(
            f"| {name} | {median(results[name]) * 1e3:.1f} | {_percent(ratios[name])} | "
            f"{median(in_hooks[name]) * 100:.2f}% | {median(steady_hooks[name]) * 100:.2f}% |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _default_schedule() -> str:
    config = MonitorConfig()
    return f"{config.every_n_steps}/{config.window}"


def _parse_schedule(text: str) -> tuple[int, int]:
    every, _, window = text.partition("/")
    if not (every.isdigit() and window.isdigit()) or int(window) > int(every) or int(window) < 1:
        raise SystemExit(
            f"--schedules: expected EVERY/WINDOW with 1 <= WINDOW <= EVERY, got {text}"
        )
    return int(every), int(window)


def _schedule_name(every: int, window: int) -> str:
    if f"{every}/{window}" == _default_schedule():
        return f"SDM default ({every}/{window})"
    if every == window == 1:
        return "SDM every step (1/1)"
    return f"SDM {window} of every {every} ({every}/{window})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32, help="ResNet-18 base width (64: full)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--stem",
        choices=("cifar", "imagenet"),
        default="cifar",
        help="cifar: 3x3 stem (compute-heavy); imagenet: torchvision's 7x7 + max-pool (light)",
    )
    parser.add_argument("--steps", type=int, default=50, help="steps per block (>= 50)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-wandb", action="store_true", help="leave wandb.watch out")
    parser.add_argument(
        "--no-single-step", action="store_true", help="leave the 50/1 monitor schedule out"
    )
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=["1/1", _default_schedule()],
        help="monitor schedules EVERY/WINDOW to time (default: every step and the default)",
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=("eager", "compiled"),
        default=["eager"],
        help="the monitor's engines to time for each schedule (compiled: torch.compile'd pass)",
    )
    parser.add_argument("--lightning", action="store_true", help="also run the Trainer check")
    parser.add_argument("--lightning-only", action="store_true")
    parser.add_argument("--lightning-steps", type=int, default=52)
    parser.add_argument("--lightning-repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = ResNet18(width=args.width, stem=args.stem)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    batches = synthetic_batches(4, args.batch_size)
    units = conv_units(model)
    weights = [model.get_parameter(u.params[0]) for u in units]
    weights_bytes = sum(w.numel() * w.element_size() for w in weights)
    total = sum(p.numel() for p in model.parameters())
    header = (
        f"ResNet-18 ({args.stem} stem, width {args.width}): {total / 1e6:.2f}M parameters, "
        f"{len(units)} "
        f"monitored conv weights ({weights_bytes / 2**20:.1f} MiB); batch {args.batch_size} of "
        f"3x32x32, SGD; torch {torch.__version__}, {args.threads} thread(s); blocks of "
        f"{args.steps} steps, {args.repeats} interleaved repeats."
    )
    print(header, flush=True)
    sections = []
    if not args.lightning_only:
        with contextlib.ExitStack() as stack:
            schedules = [
                (_schedule_name(every, window), every, window)
                for every, window in (_parse_schedule(text) for text in args.schedules)
            ]
            if not args.no_single_step and (50, 1) not in [s[1:] for s in schedules]:
                schedules.append((_schedule_name(50, 1), 50, 1))
            configs = [none_config()] + [
                monitor_config(
                    name if engine == "eager" else f"{name}, compiled",
                    model,
                    optimizer,
                    every,
                    window,
                    engine,
                )
                for name, every, window in schedules
                for engine in args.engines
            ]
            if not args.no_wandb:
                directory = stack.enter_context(tempfile.TemporaryDirectory())
                run = stack.enter_context(wandb_run(directory))
                configs += [
                    wandb_config("wandb.watch parameters, every step", run, model, 1),
                    wandb_config("wandb.watch parameters, every 50", run, model, 50),
                ]
            run_blocks(configs, model, optimizer, batches, args.steps, args.repeats)
            sections.append(report(configs, weights_bytes, "Plain PyTorch loop"))
    if args.lightning or args.lightning_only:
        sections.append(lightning_comparison(args))
    print()
    print(header)
    print()
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
