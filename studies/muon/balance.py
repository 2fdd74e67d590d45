"""The monitor's radial balance on real networks: what of measured / predicted is the gradients'.

The same networks as :mod:`studies.muon.memory` (the BatchNorm convnet on generated prototypes,
whose first convolution has fan-in 9, trained with AdamW; the teacher and digits MLPs trained
with Muon; the convnet with SGD), measured by the package's own :class:`SphericalMonitor`
(every step, windows of 10) instead of the study's recorder. Per matrix, over the second half of
the run: measured / a priori (the prediction), measured / balance (1 once the norm has settled)
and balance / a priori (the update's radial part against white noise's: the task's gradients),
each the ratio of the windows' RMS values; their product is measured / a priori. Compare with
``docs/muon.md``'s table, whose "radial balance" is the same quantity recomputed from the weights
and the optimizer's state by the study::

    python -m studies.muon.balance             # about 6 minutes on one core
    python -m studies.muon.balance --only teacher
    python -m studies.muon.balance --default-windows   # 2 of every 50 steps, as by default
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch
from torch import nn

from lightning_sdm import SphericalMonitor, Unit
from studies.muon.measure import backward
from studies.muon.memory import TASKS

MUON = {"lr": 0.02, "weight_decay": 0.1}
CASES = [
    ("prototypes", "AdamW", {"lr": 2e-3, "weight_decay": 0.5}, 8000),
    ("prototypes", "AdamW", {"lr": 2e-3, "weight_decay": 0.5}, 3000),
    ("teacher", "Muon", MUON, 2000),
    ("digits", "Muon", MUON, 2000),
    ("prototypes", "SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3}, 3000),
]


def run(
    task: str,
    optimizer: str,
    settings: dict[str, Any],
    steps: int,
    every: int = 10,
    window: int = 10,
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    batch, model, invariance = TASKS[task](0)
    names = [
        f"{name}.weight"
        for name, m in model.named_children()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ][:-1]
    params = dict(model.named_parameters())
    hidden = [params[n] for n in names]
    rest = [p for n, p in params.items() if n not in names]
    main = getattr(torch.optim, optimizer)(hidden, **settings)
    other = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.0)
    units = [Unit(n, (n,), channel_invariant=invariance == "row") for n in names]
    granularity = "channel" if invariance == "row" else "layer"
    monitor = SphericalMonitor(
        model, main, units, every_n_steps=every, window=window, granularity=granularity
    ).attach()
    loss_fn = nn.CrossEntropyLoss() if task in ("digits", "prototypes") else nn.MSELoss()
    for step in range(steps):
        backward(model, loss_fn, batch(step), main, other)
        main.step()
        other.step()
    monitor.detach()
    windows = [w for w in monitor.pop_windows() if w.optimizer_step > steps // 2]
    rows = []
    for name, weight in zip(names, hidden, strict=True):
        own = [w for w in windows if w.unit == name]

        def rms(values: list[float]) -> float:
            return math.sqrt(sum(v * v for v in values) / len(values))

        measured = rms([w.angular_update for w in own])
        theory = rms([w.theory for w in own if w.theory is not None])
        balance = rms([w.balance for w in own if w.balance is not None])
        row = {
            "task": task,
            "optimizer": optimizer,
            "steps": steps,
            "measured": f"{window} of every {every} steps",
            "matrix": "x".join(map(str, weight.shape)),
            "measured_over_a_priori": measured / theory,
            "measured_over_balance": measured / balance,
            "balance_over_a_priori": balance / theory,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="run only this task")
    parser.add_argument(
        "--default-windows",
        action="store_true",
        help="measure as the callback does by default (2 of every 50 steps), not every step",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    every, window = (50, 2) if args.default_windows else (10, 10)
    for task, optimizer, settings, steps in CASES:
        if args.only is None or task == args.only:
            run(task, optimizer, settings, steps, every, window)


if __name__ == "__main__":
    main()
