"""The study's entry point: ``main(argv)`` runs the arms and writes the report (see the package)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from studies.llm.report import write_report
from studies.reproduction.runs import quiet

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llm_qknorm.py"

#: The arms: options of the example. Both put lr * wd = 2.5e-2 on the hidden matrices at the peak
#: LR (relaxation time 1 / (2 lr wd) = 20 steps), so that the weights settle while the cosine
#: is still flat; Muon's lr is Keller Jordan's, AdamW's a usual one for a model of this size.
ARMS: dict[str, list[str]] = {
    "muon": ["--hidden-optimizer", "muon", "--hidden-lr", "0.02", "--hidden-weight-decay", "1.25"],
    "adamw": ["--hidden-optimizer", "adamw", "--hidden-lr", "5e-3", "--hidden-weight-decay", "5"],
}


def load_example() -> ModuleType:
    """``examples/llm_qknorm.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("llm_qknorm_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def run_arm(name: str, argv: list[str], log_dir: str) -> dict[str, Any]:
    """One fit of the example; every number the callback recorded, as plain values."""
    example = load_example()
    args = example.parse_args([*argv, "--log-dir", log_dir])
    started, cpu = time.perf_counter(), time.process_time()
    callback, figures = example.train(args)
    cpu = time.process_time() - cpu
    monitor = callback.monitor
    if monitor is None or callback.report is None:
        raise RuntimeError(f"arm {name}: the callback measured nothing")
    meter = monitor.cost
    print(f"  {name}: {time.perf_counter() - started:.0f} s, val loss {figures['val_loss']:.3f}")
    return {
        "argv": argv,
        "args": {k: v for k, v in vars(args).items() if k != "log_dir"},
        "figures": figures,
        "cpu_seconds": cpu,
        "detection": callback.report.summary(),
        "units": [
            {
                "name": unit.name,
                "channel_group": unit.channel_group,
                "channel_invariant": unit.channel_invariant,
                "norm": unit.norm,
            }
            for unit in monitor.unit_specs
        ],
        "predictions": {unit: p.as_dict() for unit, p in monitor.predictions().items()},
        "history": [asdict(record) for record in callback.history],
        "detector": {unit: asdict(state) for unit, state in callback.detector.state.items()},
        "events": [asdict(event) for event in callback.events],
        "advice": callback.advice.as_dict() if callback.advice is not None else None,
        "cost": {
            "steady": list(meter.steady) if meter.steady is not None else None,
            "hook_seconds": meter.hook_seconds,
            "steps": meter.steps,
            "measured_steps": meter.measured_steps,
        },
        "config": {
            "every_n_steps": callback.config.every_n_steps,
            "window": callback.config.window,
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="llm_report", help="output directory (docs/)")
    parser.add_argument("--quick", action="store_true", help="the example's --fast settings")
    parser.add_argument("--steps", type=int, default=400, help="batches per arm")
    parser.add_argument("--every-n-steps", type=int, default=5, help="the callback's interval")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--raw", default=None, help="also write every recorded number here")
    parser.add_argument(
        "--from-raw",
        nargs="+",
        default=None,
        help="re-render the report from --raw output (several files: their arms together)",
    )
    args = parser.parse_args(argv)
    if args.from_raw:
        raw = json.loads(Path(args.from_raw[0]).read_text())
        for path in args.from_raw[1:]:  # arms run separately (or one rerun): later files win
            raw["runs"].update(json.loads(Path(path).read_text())["runs"])
    else:
        raw = {
            "runs": {},
            "quick": args.quick,
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "threads": args.threads,
            },
        }
        extra = (
            ["--fast"]
            if args.quick
            else ["--steps", str(args.steps), "--every-n-steps", str(args.every_n_steps)]
        )
        print(f"{len(args.arms)} arms, {'--fast' if args.quick else args.steps} steps each")
        with quiet(args.threads), tempfile.TemporaryDirectory() as logs:
            for arm in args.arms:
                raw["runs"][arm] = run_arm(arm, [*ARMS[arm], *extra], logs)
    if args.raw:
        Path(args.raw).write_text(json.dumps(raw))
    out = Path(args.out)
    analysis = write_report(out, raw)
    print(f"Report: {out / 'llm.md'}")
    return analysis
