"""Automatic LR decay at equilibrium vs a hand-tuned step schedule vs cosine, head to head.

Every run trains the digits demo's BatchNorm convnet (width 16) for the same number of optimizer
steps from the same seeds with SGD (momentum 0.9, weight decay 1e-2, lr 0.1 at the start) and
differs only in how the learning rate moves:

* ``auto``: constant LR; ``SphericalDynamicsCallback(on_equilibrium=DecayLR(factor=0.2))`` with
  the callback's default settings decides: it divides the LR by 5 when the scale-invariant layers
  reach equilibrium, skips a decay whose new phase could not relax before the last quarter of the
  budget, and starts that last phase with one more decay (``DecayLR.final_phase``);
* ``auto_rescale``: the same with SMD's rescaling trick at each decay;
* ``step``: the hand-tuned schedule, LR divided by 5 at 50% and 75% of the budget;
* ``cosine``: cosine annealing to 0 over the budget.

Two tasks: ``digits`` (clean labels, label smoothing 0.1: the loss goes towards its floor and the
gradient noise shrinks) and ``noisy`` (20% of every batch's labels redrawn at random: the
stationary regime the theory describes; test accuracy on the clean labels). Reported per task and
schedule: mean +- std of the final test accuracy over the seeds, and the optimizer steps until
the test accuracy (evaluated every epoch) first reaches the target.

    python benchmarks/bench_lr_decay.py --seeds 0 1 2 3 4 --out benchmarks/results/lr_decay.json
    python benchmarks/bench_lr_decay.py --quick          # one seed, 2 epochs (what the tests do)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_demo import DigitsConvNet, digits_datasets

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.actions._actions import DecayLR

SCHEDULES = ("auto", "auto_rescale", "step", "cosine")
TASKS = {"digits": 0.0, "noisy": 0.2}  # task -> fraction of labels redrawn per batch
TARGETS = {"digits": 0.98, "noisy": 0.97}  # test accuracy for "steps to target"


class BenchmarkNet(DigitsConvNet):
    """The digits convnet with a named LR schedule, optional label noise and per-epoch accuracy."""

    def __init__(
        self, schedule: str, total_steps: int, label_noise: float, seed: int, **kwargs: Any
    ) -> None:
        super().__init__(label_noise=0.0 if label_noise else 0.1, **kwargs)
        self.schedule = schedule
        self.total_steps = total_steps
        self.redraw = label_noise
        self.noise = torch.Generator().manual_seed(seed + 1)
        self.test_accuracy: list[tuple[int, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.redraw:
            flip = torch.rand(y.shape, generator=self.noise) < self.redraw
            y = torch.where(flip, torch.randint(0, 10, y.shape, generator=self.noise), y)
            return nn.functional.cross_entropy(self(x), y)
        return super().training_step((x, y), batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        accuracy = (self(x).argmax(dim=1) == y).float().mean().item()
        self.test_accuracy.append((self.trainer.global_step, accuracy))

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        if self.schedule.startswith("auto"):
            return optimizer
        if self.schedule == "step":
            milestones = [self.total_steps // 2, (3 * self.total_steps) // 4]
            scheduler: Any = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.2)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def run(
    task: str, schedule: str, seed: int, epochs: int, args: argparse.Namespace
) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    train, test = digits_datasets(seed)
    loader = DataLoader(train, batch_size=64, shuffle=True, drop_last=True)
    total_steps = epochs * len(loader)
    model = BenchmarkNet(
        schedule, total_steps, TASKS[task], seed,
        lr=args.lr, weight_decay=args.weight_decay, width=args.width,
    )  # fmt: skip
    action = DecayLR(factor=0.2, rescale_weights=schedule == "auto_rescale")
    monitor = SphericalDynamicsCallback(
        on_equilibrium=action if schedule.startswith("auto") else "warn", prog_bar=False
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, loader, DataLoader(test, batch_size=len(test)))
    target = TARGETS[task]
    reached = next((step for step, acc in model.test_accuracy if acc >= target), None)
    return {
        "task": task,
        "schedule": schedule,
        "seed": seed,
        "steps": trainer.global_step,
        "accuracy": model.test_accuracy[-1][1],
        "steps_to_target": reached,
        "final_lr": trainer.optimizers[0].param_groups[0]["lr"],
        "decays": [(e.global_step, e.criterion) for e in monitor.events if e.new_lrs],
        "regimes_at_end": sorted({r.regime for r in monitor.history[-3:]}),
    }


def summarize(results: list[dict[str, Any]]) -> str:
    lines = [
        "| task | schedule | steps | test accuracy % (mean ± std) | steps to target "
        "(median; runs that reached it) | final lr | decays at steps (per seed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        for schedule in SCHEDULES:
            rows = [r for r in results if r["task"] == task and r["schedule"] == schedule]
            if not rows:
                continue
            accuracies = [100 * r["accuracy"] for r in rows]
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            reached = [r["steps_to_target"] for r in rows if r["steps_to_target"] is not None]
            to_target = (
                f"{statistics.median(reached):.0f} ({len(reached)}/{len(rows)})"
                if reached
                else f"- (0/{len(rows)})"
            )
            decays = "; ".join(
                ",".join(f"{s}{'*' if c == 'budget' else ''}" for s, c in r["decays"]) or "-"
                for r in rows
            )
            lines.append(
                f"| {task} (target {100 * TARGETS[task]:.0f}%) | {schedule} | {rows[0]['steps']} "
                f"| {statistics.mean(accuracies):.2f} ± {spread:.2f} | {to_target} | "
                f"{statistics.mean(r['final_lr'] for r in rows):.2g} | "
                f"{decays if schedule.startswith('auto') else '(schedule)'} |"
            )
    lines.append("\n`*`: the planned final decay (the budget's last quarter), not an equilibrium.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--out", help="write every run's numbers to this JSON file")
    parser.add_argument("--quick", action="store_true", help="2 epochs, one seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs, seeds = (2, [0]) if args.quick else (args.epochs, args.seeds)
    results = []
    for seed in seeds:
        for task in args.tasks:
            for schedule in args.schedules:
                results.append(run(task, schedule, seed, epochs, args))
                print(json.dumps(results[-1]), flush=True)
    table = summarize(results)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"results": results, "table": table}, indent=1))
    return results


if __name__ == "__main__":
    main()
