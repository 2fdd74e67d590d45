"""The study's entry point: ``main(argv)`` runs the plan and writes the report (see the package)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from studies.reproduction.common import EXPERIMENTS
from studies.reproduction.data import DataConfig, load_data
from studies.reproduction.plan import make_plan
from studies.reproduction.report import write_report
from studies.reproduction.runs import adamw_update_balance, quiet, run_all


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid, few hundred steps")
    parser.add_argument("--out", default="reproduction_report", help="output directory")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    parser.add_argument(
        "--cifar-dir", default=None, help="cifar-10-batches-py directory (else digits)"
    )
    parser.add_argument("--cifar-train-size", type=int, default=10000, help="0: all 50000 images")
    parser.add_argument("--batch-size", type=int, default=32, help="B (experiment 3 uses k*B)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--label-noise", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write every analysed number here")
    parser.add_argument("--raw", default=None, help="also write the raw per-window results here")
    parser.add_argument("--from-raw", default=None, help="re-render the report from --raw output")
    args = parser.parse_args(argv)
    with quiet(args.threads):
        return _main(args)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    data = DataConfig(args.cifar_dir, args.cifar_train_size, args.threads)
    base = {
        "batch_size": args.batch_size,
        "width": args.width,
        "label_noise": args.label_noise,
        "seed": args.seed,
    }
    plan = make_plan(args.quick, args.experiments, base)
    specs = plan.specs()
    total = sum(s.steps for s in specs)
    print(f"{len(specs)} runs, {total} steps, {args.jobs} process(es), data: {data.name}")
    needs_balance = "equilibrium" in args.experiments and not args.quick
    diagnostics: dict[str, Any] = {}
    if args.from_raw:
        saved = json.loads(Path(args.from_raw).read_text())
        results, elapsed = saved["runs"], saved["elapsed"]
        diagnostics = saved.get("diagnostics", {})
        args.jobs = saved.get("jobs", args.jobs)
        missing = [spec.name for spec in specs if spec.name not in results]
        if missing:
            raise SystemExit(f"{args.from_raw} lacks the runs {missing}: same options as the run?")
    else:
        started = time.perf_counter()
        load_data(data)  # once in the parent: forked workers inherit it
        results = run_all(specs, data, args.jobs)
        elapsed = time.perf_counter() - started
    if needs_balance and "adamw_balance" not in diagnostics:
        started = time.perf_counter()
        diagnostics["adamw_balance"] = adamw_update_balance(data, seed=args.seed)
        elapsed += time.perf_counter() - started
        print(f"  AdamW update balance diagnostic: {time.perf_counter() - started:.1f} s")
    if args.raw:
        raw = {"runs": results, "elapsed": elapsed, "jobs": args.jobs, "diagnostics": diagnostics}
        Path(args.raw).write_text(json.dumps(raw))
    out = Path(args.out)
    analysis = write_report(out, results, plan, args, data, elapsed, diagnostics)
    analysis["elapsed"] = elapsed
    print(f"Report: {out / 'reproduction.md'} ({elapsed:.0f} s)")
    return analysis
