"""Automatic LR decay at equilibrium vs. a hand-tuned step schedule vs. cosine, on digits.

Every run trains the same BatchNorm convnet (``examples/digits_demo.py``) for the same number of
optimizer steps from the same seeds with SGD (momentum 0.9, weight decay 1e-2), starting at
lr=0.1, and differs only in how the learning rate moves:

* ``auto``: constant LR; ``SphericalDynamicsCallback(on_equilibrium="decay_lr")`` divides it by 5
  each time the scale-invariant layers reach their predicted equilibrium (then waits SMD's
  relaxation time, Cor. 3.1, before the next decision);
* ``auto_rescale``: the same, with SMD's rescaling trick at each decay (``rescale_weights=True``:
  invariant weights divided by ``5**(1/4)``, momentum buffers adjusted);
* ``step``: the hand-tuned schedule, LR divided by 5 at 50% and 75% of the budget;
* ``cosine``: cosine annealing to 0 over the budget.

    python examples/auto_lr_decay.py                 # 3 seeds x 3 schedules, markdown table
    python examples/auto_lr_decay.py --quick         # a smoke run (what the tests do)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_demo import DigitsConvNet, digits_datasets

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.actions import DecayLR

SCHEDULES = ("auto", "auto_rescale", "step", "cosine")


class ScheduledDigitsNet(DigitsConvNet):
    """The digits convnet with the optimizer's LR schedule chosen by name."""

    def __init__(self, schedule: str, total_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schedule = schedule
        self.total_steps = total_steps

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        if self.schedule.startswith("auto"):
            return optimizer
        if self.schedule == "step":
            milestones = [self.total_steps // 2, (3 * self.total_steps) // 4]
            scheduler: Any = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.2)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.total_steps)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def run(schedule: str, seed: int, epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    train, test = digits_datasets(seed)
    loader = DataLoader(train, batch_size=64, shuffle=True, drop_last=True)
    total_steps = epochs * len(loader)
    model = ScheduledDigitsNet(
        schedule, total_steps, lr=args.lr, weight_decay=args.weight_decay, width=args.width
    )
    callbacks: list[pl.Callback] = []
    monitor = SphericalDynamicsCallback(
        every_n_steps=10,
        window=10,
        tolerance=0.15,
        patience=3,
        on_equilibrium=(
            DecayLR(factor=0.2, rescale_weights=schedule == "auto_rescale")
            if schedule.startswith("auto")
            else "warn"
        ),
        prog_bar=False,
    )
    callbacks.append(monitor)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():
        x, y = test.tensors
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    decays = [e.global_step for e in monitor.events if e.new_lrs]
    return {
        "schedule": schedule,
        "seed": seed,
        "steps": trainer.global_step,
        "accuracy": accuracy,
        "final_lr": trainer.optimizers[0].param_groups[0]["lr"],
        "decay_steps": decays,
    }


def summarize(results: list[dict[str, Any]]) -> str:
    lines = [
        "| schedule | steps | test accuracy (mean ± std over seeds) | final lr | decays at steps |",
        "|---|---|---|---|---|",
    ]
    for schedule in SCHEDULES:
        rows = [r for r in results if r["schedule"] == schedule]
        if not rows:
            continue
        accuracies = [100 * r["accuracy"] for r in rows]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        decays = "; ".join(",".join(str(s) for s in r["decay_steps"]) or "-" for r in rows)
        lines.append(
            f"| {schedule} | {rows[0]['steps']} | {statistics.mean(accuracies):.2f} ± "
            f"{spread:.2f} | {statistics.mean(r['final_lr'] for r in rows):.2g} | "
            f"{decays if schedule.startswith('auto') else '(schedule)'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="2 epochs, one seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs, seeds = (2, [0]) if args.quick else (args.epochs, args.seeds)
    results = [run(s, seed, epochs, args) for seed in seeds for s in args.schedules]
    print(summarize(results))
    return results


if __name__ == "__main__":
    main()
