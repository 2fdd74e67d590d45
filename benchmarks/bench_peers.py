"""Peers side by side: what measuring weight updates costs with this package and with others.

One process, one model (ResNet-18, ``benchmarks/common.py``), one AdamW optimizer, the same
synthetic batches; configurations run in blocks of ``--steps`` steps, interleaved and reversed on
every other repeat (``bench_overhead.run_blocks``), ``--repeats`` times. AdamW, because Composer's
update norms exist only for Adam-type state. Reported per configuration: median CPU time per step,
the median over repeats of its ratio to the no-monitor block of the same repeat (with the range),
and the CPU time spent inside the tool's own code per step (in-hook), over the no-monitor step.

The configurations:

* **this package**: :class:`lightning_sdm.SphericalMonitor` on the conv weights, at the default
  schedule (2 of every 50 steps) and every step, with the eager engine and the compiled one
  (``engine="compiled"``; compiled before the timed blocks, its compile time printed);
* **eager floor**: the cheapest eager measurement of a step (``bench_scaling.py``'s floor) as
  optimizer hooks on the same weights: a ``_foreach_copy_`` snapshot before the step, then
  ``_foreach_norm`` of ``w_t`` and ``w_{t+1}`` and ``torch.vdot`` per tensor in float32, no
  angle formed, nothing logged: a bandwidth bound, not a usable measurement;
* **REQ** (Kosson et al., epfml/REQ at commit bab824d4ae0ab01f04751e188cf3b521296588f9,
  ``shared/utils/logger.py``, ``DynamicsLogger.step`` and ``log_statistics``): on a logged step
  it clones every parameter, keeps every gradient and deep-copies every parameter's optimizer
  state (``copy.deepcopy(optimizer.state[param])``) before the step; after it, for every weight
  of 2 or more dimensions, float32 ``acos(clamp(cosine_similarity))`` of the whole tensor and of
  every output row, kept as tensors in lists (REQ writes them out later). Here with the angular
  updates and the weight norms requested (``stats``: ``layer_angular_update``,
  ``neuron_angular_update``, ``layer_norm``, ``neuron_norm``), every step and every 50;
* **Composer** (mosaicml/composer at commit 6405188805a0054b4551ec49e4919c54c971d0e8,
  ``composer/callbacks/optimizer_monitor.py`` ``OptimizerMonitor.batch_end`` and
  ``composer/optim/decoupled_weight_decay.py`` ``DecoupledAdamW.report_per_parameter_metrics``):
  after the step, for every parameter with a gradient, the Adam update is reconstructed from the
  optimizer state (``exp_avg / (sqrt(exp_avg_sq / bc2) + eps) * lr / bc1`` plus the decoupled
  decay term) and the L2 norms of the moment, the parameter, the update and the gradient are
  taken, then the global gradient norm, then ``.item()`` of every metric; every step and every
  10 (its ``batch_log_interval`` default). One process: no all-reduce;
* **wandb.watch** (``log="parameters"``, offline), as in ``bench_overhead.py``.

Run ``python benchmarks/bench_peers.py --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import (
    Config,
    HookTimer,
    monitor_config,
    none_config,
    run_blocks,
    train_block,
    wandb_config,
    wandb_run,
)
from common import ResNet18, conv_units, median, synthetic_batches

# ----------------------------------------------------------------------------- REQ


class ReqLogger:
    """epfml/REQ's ``DynamicsLogger`` step (commit bab824d), reduced to what it computes.

    It replaces ``optimizer.step`` as REQ does (``optimizer.original_step``); the W&B and disk
    output REQ adds later is left out, the tensors it keeps for them are kept.
    """

    STATS = ("layer_norm", "neuron_norm", "layer_angular_update", "neuron_angular_update")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, interval: int):
        self.model, self.optimizer, self.interval = model, optimizer, interval
        self.iteration = 0
        self.stats: defaultdict[str, defaultdict[str, list[torch.Tensor]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self.timer = HookTimer()

    def attach(self) -> None:
        self.optimizer.original_step = self.optimizer.step  # type: ignore[attr-defined]
        self.optimizer.step = self.step  # type: ignore[method-assign]

    def detach(self) -> None:
        del self.optimizer.step  # back to the class's method
        del self.optimizer.original_step  # type: ignore[attr-defined]
        self.stats.clear()

    def step(self, *args: Any, **kwargs: Any) -> Any:
        original = self.optimizer.original_step  # type: ignore[attr-defined]
        if self.iteration % self.interval != 0:
            self.iteration += 1
            return original(*args, **kwargs)
        start = time.thread_time()
        pre_params, pre_grads, pre_states, post_params, post_states = {}, {}, {}, {}, {}
        for name, param in self.model.named_parameters():
            pre_params[name] = param.clone().detach()
            pre_grads[name] = param.grad
            pre_states[name] = copy.deepcopy(self.optimizer.state[param])
        self.timer.seconds += time.thread_time() - start
        result = original(*args, **kwargs)  # the step itself is not the logger's cost
        start = time.thread_time()
        for name, param in self.model.named_parameters():
            post_params[name] = param.detach()
            post_states[name] = self.optimizer.state[param]
        self._log_statistics(pre_params, post_params)
        self.timer.seconds += time.thread_time() - start
        self.iteration += 1
        return result

    @torch.no_grad()
    def _log_statistics(
        self, pre_params: dict[str, torch.Tensor], post_params: dict[str, torch.Tensor]
    ) -> None:
        for name, param in pre_params.items():
            if param.dim() < 2:
                continue
            neuron_norm = torch.linalg.vector_norm(param.flatten(1), dim=1)
            self.stats["layer_norm"][name].append(torch.linalg.vector_norm(neuron_norm))
            self.stats["neuron_norm"][name].append(neuron_norm)
        for name, pre_param in pre_params.items():
            if pre_param.dim() < 2:
                continue
            post_param = post_params[name]
            cos = F.cosine_similarity(pre_param.flatten(), post_param.flatten(), dim=0)
            self.stats["layer_angular_update"][name].append(torch.acos(torch.clamp(cos, -1, 1)))
            cos = F.cosine_similarity(pre_param.flatten(1), post_param.flatten(1), dim=1)
            self.stats["neuron_angular_update"][name].append(torch.acos(torch.clamp(cos, -1, 1)))


def req_config(
    name: str, model: nn.Module, optimizer: torch.optim.Optimizer, interval: int
) -> Config:
    logger = ReqLogger(model, optimizer, interval)
    return Config(name, logger.attach, logger.detach, logger.timer.take)


# ----------------------------------------------------------------------------- Composer


class ComposerMonitor:
    """Composer's ``OptimizerMonitor.batch_end`` with ``DecoupledAdamW``'s per-parameter metrics
    (commit 6405188), on ``torch.optim.AdamW`` state (``exp_avg``, ``exp_avg_sq``, ``step``)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, interval: int):
        self.model, self.optimizer, self.interval = model, optimizer, interval
        self.batch = 0
        self.timer = HookTimer()
        self.logged: list[dict[str, float]] = []

    def after_step(self, step: int) -> None:
        self.batch += 1
        if self.batch % self.interval != 0:
            return
        start = time.thread_time()
        self._batch_end()
        self.timer.seconds += time.thread_time() - start

    def _report_per_parameter_metrics(
        self, param: torch.Tensor, name: str, metrics: dict[str, Any]
    ) -> dict[str, Any]:
        group = self.optimizer.param_groups[0]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        initial_lr = group.get("initial_lr", lr)
        beta1, beta2 = group["betas"]
        if param in self.optimizer.state:
            state = self.optimizer.state[param]
            step = state["step"].item()
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias_correction2)).add_(eps)
            step_size = lr / bias_correction1
            step_tensor = step_size * state["exp_avg"].div(denom)
            decay_factor = (lr / initial_lr) if initial_lr else 1.0
            step_tensor.add_(param, alpha=-weight_decay * decay_factor)
            metrics[f"l2_norm/moment/{name}"] = torch.linalg.vector_norm(state["exp_avg"])
            metrics[f"l2_norm/param/{name}"] = torch.linalg.vector_norm(param.data)
            metrics[f"l2_norm/update/{name}"] = torch.linalg.vector_norm(step_tensor)
            metrics[f"l2_norm/grad/{name}"] = torch.linalg.vector_norm(param.grad)
        return metrics

    @torch.no_grad()
    def _batch_end(self) -> None:
        norm: Any = 0.0
        metrics: dict[str, Any] = {}
        for name, p in self.model.named_parameters():
            if p.grad is not None and p.requires_grad:
                metrics.update(self._report_per_parameter_metrics(p, name, metrics))
                if f"l2_norm/grad/{name}" not in metrics:
                    metrics[f"l2_norm/grad/{name}"] = torch.linalg.vector_norm(p.grad)
        for metric in metrics:
            if metric.startswith("l2_norm/grad"):
                norm += metrics[metric] ** 2
        metrics["l2_norm/grad/global"] = norm**0.5
        for metric in metrics:
            if isinstance(metrics[metric], torch.Tensor):
                metrics[metric] = metrics[metric].item()
        self.logged.append(metrics)


def composer_config(
    name: str, model: nn.Module, optimizer: torch.optim.Optimizer, interval: int
) -> Config:
    monitor = ComposerMonitor(model, optimizer, interval)

    def stop() -> None:
        monitor.logged.clear()

    return Config(name, lambda: None, stop, monitor.timer.take, after_step=monitor.after_step)


# ----------------------------------------------------------------------------- eager floor


def floor_config(name: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> Config:
    """The cheapest eager measurement of every step, as optimizer hooks (float32, no angle)."""
    weights = [model.get_parameter(unit.params[0]) for unit in conv_units(model)]
    snapshot = [torch.empty_like(w) for w in weights]
    timer = HookTimer()
    handles: list[Any] = []
    kept: list[Any] = []

    @torch.no_grad()
    def before(*_: Any) -> None:
        torch._foreach_copy_(snapshot, [w.detach() for w in weights])

    @torch.no_grad()
    def after(*_: Any) -> None:
        current = [w.detach() for w in weights]
        sums = (
            torch._foreach_norm(snapshot),
            torch._foreach_norm(current),
            [torch.vdot(a.view(-1), b.view(-1)) for a, b in zip(snapshot, current, strict=True)],
        )
        kept[:] = [sums]

    def start() -> None:
        handles.append(optimizer.register_step_pre_hook(timer.wrap(before)))
        handles.append(optimizer.register_step_post_hook(timer.wrap(after)))

    def stop() -> None:
        while handles:
            handles.pop().remove()

    return Config(name, start, stop, timer.take)


# ----------------------------------------------------------------------------- the run


def _compile_engines(configs: list[Config], model: nn.Module) -> None:
    """Compile the compiled engines' layouts before the timed blocks; print how long it took."""
    for config in configs:
        monitor = getattr(config, "monitor", None)
        if monitor is None or monitor.config.engine != "compiled":
            continue
        watch = monitor._watches[0]
        weights = [p.detach() for p in watch.tensors]
        watch.statistics([w.clone() for w in weights], weights)
        seconds = watch.statistics.compile_seconds
        fallback = getattr(watch.statistics, "fallback", None)
        print(
            f"  {config.name}: compiled in {seconds:.1f} s (wall)"
            + (f"; FELL BACK: {fallback}" if fallback else ""),
            flush=True,
        )


def report(configs: list[Config], what: dict[str, str]) -> str:
    lines = [
        "| configuration | what it computes | CPU ms/step | x no monitor (range) | in-hook CPU |",
        "|---|---|---:|---:|---:|",
    ]
    for config in configs:
        ratios = [1.0 + r for r in config.cpu_ratios]
        ratio = (
            f"{median(ratios):.3f}x ({min(ratios):.3f}..{max(ratios):.3f})"
            if config is not configs[0]
            else ""
        )
        hook = f"{median(config.hook_fractions) * 100:.2f}%" if config is not configs[0] else ""
        lines.append(
            f"| {config.name} | {what.get(config.name, '')} | "
            f"{median(config.block_cpu) * 1e3:.1f} | {ratio} | {hook} |"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64: full)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stem", choices=("cifar", "imagenet"), default="imagenet")
    parser.add_argument("--steps", type=int, default=50, help="steps per block (50: one window)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-wandb", action="store_true", help="leave wandb.watch out")
    parser.add_argument("--no-compiled", action="store_true", help="leave the compiled engine out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = ResNet18(width=args.width, stem=args.stem)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-2)
    batches = synthetic_batches(4, args.batch_size)
    units = conv_units(model)
    total = sum(p.numel() for p in model.parameters())
    monitored = sum(model.get_parameter(u.params[0]).numel() for u in units)
    header = (
        f"ResNet-18 ({args.stem} stem, width {args.width}): {total / 1e6:.2f}M parameters, "
        f"{len(units)} conv weights ({monitored / 1e6:.2f}M elements) monitored by this package; "
        f"batch {args.batch_size} of 3x32x32, AdamW; torch {torch.__version__}, "
        f"{args.threads} thread(s), {os.cpu_count()} CPUs ({_cpu_model()}), load average "
        f"{os.getloadavg()[0]:.1f} at start; blocks of {args.steps} steps, {args.repeats} "
        "interleaved repeats."
    )
    print(header, flush=True)
    what = {
        "SDM default (50/2), eager": "float64 angle, norms, theory per unit; 2 of 50 steps",
        "SDM default (50/2), compiled": "same, fused pass",
        "SDM every step (1/1), eager": "float64 angle, norms, theory per unit; every step",
        "SDM every step (1/1), compiled": "same, fused pass",
        "eager floor, every step": "snapshot + 3 float32 sums per weight, no angle",
        "REQ logger, every step": "clone all params + deepcopy state; float32 acos per layer/row",
        "REQ logger, every 50": "same, 1 of 50 steps",
        "Composer OptimizerMonitor, every step": "4 L2 norms per param (update rebuilt), .item()",
        "Composer OptimizerMonitor, every 10": "same, its default interval",
        "wandb.watch parameters, every step": "64-bin histograms on the host",
        "wandb.watch parameters, every 50": "same, 1 of 50 steps",
    }
    engines = ["eager"] if args.no_compiled else ["eager", "compiled"]
    with contextlib.ExitStack() as stack:
        configs = [none_config()]
        for label, every, window in (("SDM default (50/2)", 50, 2), ("SDM every step (1/1)", 1, 1)):
            for engine in engines:
                configs.append(
                    monitor_config(f"{label}, {engine}", model, optimizer, every, window, engine)
                )
        configs += [
            floor_config("eager floor, every step", model, optimizer),
            req_config("REQ logger, every step", model, optimizer, 1),
            req_config("REQ logger, every 50", model, optimizer, 50),
            composer_config("Composer OptimizerMonitor, every step", model, optimizer, 1),
            composer_config("Composer OptimizerMonitor, every 10", model, optimizer, 10),
        ]
        if not args.no_wandb:
            directory = stack.enter_context(tempfile.TemporaryDirectory())
            run = stack.enter_context(wandb_run(directory))
            configs += [
                wandb_config("wandb.watch parameters, every step", run, model, 1),
                wandb_config("wandb.watch parameters, every 50", run, model, 50),
            ]
        _compile_engines(configs, model)
        for config in configs:  # a short untimed pass each (first-use allocations)
            config.start()
            train_block(model, optimizer, batches, 3, config.after_step)
            config.stop()
            config.hook_seconds()
        run_blocks(configs, model, optimizer, batches, args.steps, args.repeats, warmup=False)
    print()
    print(header)
    print()
    print(report(configs, what))


if __name__ == "__main__":
    main()
