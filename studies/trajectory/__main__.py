"""``python -m studies.trajectory --out docs`` (~10 CPU-minutes): the table of trajectory.md."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from studies.trajectory.run import OPTIMIZERS, SCHEDULES, TASKS, run, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0, help="data, model and batches (unseen: 1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for task in TASKS:
        for optimizer in OPTIMIZERS:
            for schedule in SCHEDULES:
                rows = run(task, optimizer, schedule, steps=args.steps, seed=args.seed)
                summary = summarize(rows)
                results.append(
                    {"task": task, "optimizer": optimizer, "schedule": schedule, **summary}
                )
                print(json.dumps(results[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trajectory_results.json").write_text(json.dumps(results, indent=1))
    lines = [
        "| task | optimizer | schedule | windows | trajectory within 10% | reference's floor "
        "| median error | recall | far windows | false flags | static recall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:

        def pct(x: float) -> str:
            return "-" if math.isnan(x) else f"{x:.0%}"

        lines.append(
            f"| {r['task']} | {r['optimizer']} | {r['schedule']} | {r['windows']:.0f} | "
            f"{pct(r['accuracy'])} | {pct(r['floor'])} | {r['median_error']:.3f} | "
            f"{pct(r['recall'])} ({r['near']:.0f}) | {r['far']:.0f} | {pct(r['false_flags'])} | "
            f"{pct(r['static_recall'])} ({r['static_near']:.0f}) |"
        )
    (args.out / "trajectory_table.md").write_text("\n".join(lines) + "\n")


main()
