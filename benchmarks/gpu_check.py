"""GPU check: exactness on CUDA, no host sync when not measuring, kernels per measurement, cost.

Run on a machine with a CUDA device (about 5 minutes on one recent GPU)::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
    make bench-gpu

``--device cpu --quick`` runs every part on the CPU with small sizes (what the tests do, so the
script cannot rot where no GPU is lent). Parts:

1. **Exactness.** Angular-update statistics of 1e3..1e7-element float32 and bfloat16 tensors,
   computed on the device by the monitor's engine, against a float64 CPU reference (the plain
   formula on ``double`` copies): largest relative error of the angle and of the norm.
2. **No host sync on unmeasured steps.** A ``SphericalMonitor`` on a ResNet's optimizer; the
   steps that are not measured run under ``torch.cuda.set_sync_debug_mode("error")`` (any
   device-to-host synchronisation raises).
3. **Kernels per measurement.** Device kernels launched by one measured step's statistics for 100
   tensors (``torch.profiler``), against the number of tensors.
4. **Overhead.** Training step time of a ResNet-50-sized model (bottleneck blocks, synthetic
   224x224 images, bf16 autocast, channels_last, SGD) with no monitor, the monitor at every step,
   at the default schedule (``MonitorConfig``: 2 of every 50 steps), and
   ``wandb.watch(log="parameters")`` when ``wandb`` is installed (offline). Interleaved blocks
   of 50 steps, median of ``--repeats``, CUDA-synchronised wall clock.

Parts 1, 3 and 4 also run the fused measurement (``engine="compiled"``: one ``torch.compile``'d
pass, Triton on CUDA) beside the eager engine, with its compile time (``--engines``; on CPU the
default is eager only, as Inductor's C++ build takes minutes there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import conv_units

from lightning_sdm import SphericalMonitor
from lightning_sdm._engine import BatchedStatistics
from lightning_sdm.config import MonitorConfig
from lightning_sdm.functional import angles_from_statistics, norms_from_statistics
from lightning_sdm.monitor._fused import FusedStatistics


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout (3-4-6-3 bottlenecks, 25.6M parameters at width 64)."""

    def __init__(self, width: int = 64, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for index, blocks in enumerate((3, 4, 6, 3)):
            planes = width * 2**index
            for block in range(blocks):
                stride = 2 if block == 0 and index > 0 else 1
                layers.append(Bottleneck(cin, planes, stride))
                cin = planes * Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        return self.fc(F.adaptive_avg_pool2d(self.layers(x), 1).flatten(1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ 1. exactness


def _reference(prev: Tensor, curr: Tensor) -> tuple[float, float]:
    p, c = prev.double().cpu().reshape(-1), curr.double().cpu().reshape(-1)
    d = c - p
    pn2, dn2, dot = float(p @ p), float(d @ d), float(d @ p)
    along = pn2 + dot
    orth = math.sqrt(max(dn2 - dot * dot / pn2, 0.0) * pn2)
    return math.atan2(orth, along), float(c.norm())


def _engine(name: str, dims: list[int | None]) -> BatchedStatistics:
    return FusedStatistics(dims, "compiled") if name == "compiled" else BatchedStatistics(dims)


def check_exactness(
    device: torch.device, sizes: list[int], engines: list[str]
) -> list[dict[str, Any]]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for size in sizes:
            prev = torch.randn(size, generator=generator).to(device, dtype)
            step = 1e-3 * torch.randn(size, generator=generator)
            curr = (prev.float().cpu() + step).to(device, dtype)
            ref_angle, ref_norm = _reference(prev, curr)
            for name in engines:
                engine = _engine(name, [None])
                stats = engine([prev], [curr])
                angle = float(angles_from_statistics(stats.sum(dim=0)).cpu())
                norm = float(norms_from_statistics(stats.sum(dim=0))[1].cpu())
                rows.append(
                    {
                        "engine": name,
                        "dtype": str(dtype).replace("torch.", ""),
                        "elements": size,
                        "angle": angle,
                        "angle_rel_error": abs(angle - ref_angle) / ref_angle,
                        "norm_rel_error": abs(norm - ref_norm) / ref_norm,
                        "compile_s": engine.compile_seconds,
                        "fallback": getattr(engine, "fallback", None),
                    }
                )
    return rows


# ------------------------------------------------------------------- 2. and 4. training steps


def _model(device: torch.device, quick: bool) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    model = ResNet50(width=8 if quick else 64, classes=10 if quick else 1000)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return model, optimizer, 32 if quick else 224


def _step_function(
    model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, image: int, batch: int
) -> Callable[[], None]:
    x = torch.randn(batch, 3, image, image, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, model.fc.out_features, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def check_no_sync(device: torch.device, quick: bool) -> dict[str, Any]:
    model, optimizer, image = _model(device, quick)
    monitor = SphericalMonitor(model, optimizer, conv_units(model), every_n_steps=10, window=2)
    monitor.attach()
    step = _step_function(model, optimizer, device, image, 4)
    unmeasured = 0
    try:
        for index in range(20):
            measured = monitor.config.is_measured(index) or (index + 1) % 10 == 0
            if device.type == "cuda" and not measured:
                torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            unmeasured += not measured
        windows = monitor.pop_windows()
    finally:
        monitor.detach()
    # Reaching here means no unmeasured step synchronised with the host (it would have raised).
    checked = unmeasured if device.type == "cuda" else 0
    return {"unmeasured_steps_checked": checked, "windows": len(windows)}


# ------------------------------------------------------------------------ 3. kernel counting


def count_kernels(device: torch.device, tensors: int, elements: int, engine_name: str) -> int:
    from torch.profiler import ProfilerActivity, profile

    generator = torch.Generator().manual_seed(1)
    size = max(elements // tensors, 1)
    prev = [torch.randn(size, generator=generator).to(device) for _ in range(tensors)]
    curr = [p + 1e-3 for p in prev]
    engine = _engine(engine_name, [None] * tensors)
    engine(prev, curr)  # layout and work buffer (compiled code)
    _sync(device)
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        engine(prev, curr)
        _sync(device)
    if device.type == "cuda":
        return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


# ---------------------------------------------------------------------------- 4. overhead


def measure_overhead(
    device: torch.device, quick: bool, repeats: int, engines: list[str]
) -> dict[str, float]:
    model, optimizer, image = _model(device, quick)
    batch = 4 if quick else 64
    step = _step_function(model, optimizer, device, image, batch)
    block = 10 if quick else 50
    configs: dict[str, Callable[[], Callable[[], None]]] = {"none": lambda: lambda: None}

    compile_seconds: dict[str, float] = {}

    def monitored(every: int, window: int, engine: str) -> Callable[[], Callable[[], None]]:
        # One monitor per configuration, kept across its blocks: a compiled layout is built once.
        monitor = SphericalMonitor(
            model, optimizer, conv_units(model), every_n_steps=every, window=window, engine=engine
        )
        if engine == "compiled":  # compile before the timed blocks
            watch = monitor._watches[0]
            weights = [p.detach() for p in watch.tensors]
            watch.statistics([w.clone() for w in weights], weights)
            _sync(device)
            compile_seconds[f"{every}/{window}"] = watch.statistics.compile_seconds

        def start() -> Callable[[], None]:
            monitor.attach()
            return monitor.detach

        return start

    default = MonitorConfig()
    assert default.every_n_steps is not None
    for engine in engines:
        suffix = "" if engine == "eager" else ", compiled"
        configs[f"every step (1/1){suffix}"] = monitored(1, 1, engine)
        configs[f"default ({default.every_n_steps}/{default.window}){suffix}"] = monitored(
            default.every_n_steps, default.window, engine
        )
    try:
        import wandb
    except ImportError:
        wandb = None
    if wandb is not None and not quick:
        run_dir = tempfile.mkdtemp()

        def watched() -> Callable[[], None]:
            os.environ["WANDB_MODE"] = "offline"
            run = wandb.init(dir=run_dir, project="sdm-gpu-check", reinit=True)
            run.watch(model, log="parameters", log_freq=block)
            return run.finish

        configs["wandb.watch(parameters, log_freq=50)"] = watched
    for _ in range(3):
        step()  # warm-up: cuDNN autotuning, allocator
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, start in configs.items():
            stop = start()
            _sync(device)
            began = time.perf_counter()
            for _ in range(block):
                step()
            _sync(device)
            times[name].append((time.perf_counter() - began) / block)
            stop()
    base = statistics.median(times["none"])
    return {
        "step_ms_no_monitor": base * 1e3,
        **{f"compile_s ({key})": value for key, value in compile_seconds.items()},
        **{name: statistics.median(v) / base - 1 for name, v in times.items() if name != "none"},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=("eager", "compiled"),
        default=None,
        help="engines to check (default: both on CUDA, eager on CPU)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    engines = args.engines or (["eager", "compiled"] if device.type == "cuda" else ["eager"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --device cpu --quick for a smoke run")
    sizes = [10**3, 10**5] if args.quick else [10**3, 10**5, 10**6, 10**7]
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "engines": engines,
        "exactness": check_exactness(device, sizes, engines),
        "no_sync": check_no_sync(device, args.quick),
        "kernels_per_measurement": {
            (str(n) if engine == "eager" else f"{n}, compiled"): count_kernels(
                device, n, 10**5 if args.quick else 10**7, engine
            )
            for engine in engines
            for n in (10, 100)
        },
        "overhead": measure_overhead(
            device, args.quick, 1 if args.quick else args.repeats, engines
        ),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
