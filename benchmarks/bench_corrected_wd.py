"""Corrected weight decay (``CorrectedWeightDecay``, AdamC) against a fixed one, under cosine decay.

Every run trains the digits demo's BatchNorm convnet with AdamW and a per-step cosine schedule to
0 over the budget, the same seeds, and differs only in the weight decay: fixed, or scaled with
``lr_t / lr_max`` (Defazio et al. 2025). What the theory says should differ (see
``lightning_sdm.lightning``): with a fixed weight decay the equilibrium norm of the
scale-invariant conv weights shrinks with the LR and the weights lag behind it, so their norm
keeps falling late in training and their gradient norm (proportional to ``1/|w|``) rises; with
the corrected one the equilibrium norm stays put.

Reported per variant, mean +- std over the seeds: final test accuracy; the gradient norm of the
invariant weights at the end of training over its minimum during the run (1.0: no late rise);
their weight norm at the end over its value at 50% of the budget; and the measured/predicted
angular update ratio over the last 10% of the steps (1: the weights follow the schedule).

    python benchmarks/bench_corrected_wd.py --seeds 0 1 2
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits_demo import DigitsConvNet, digits_datasets

from lightning_sdm import CorrectedWeightDecay, SphericalDynamicsCallback

VARIANTS = ("fixed", "corrected")


class CosineAdamW(DigitsConvNet):
    def __init__(self, total_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.total_steps = total_steps

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.total_steps)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}


class Norms(pl.Callback):
    """Per step: the gradient and weight norms of the monitored (scale-invariant) weights."""

    def __init__(self, monitor: SphericalDynamicsCallback) -> None:
        self.monitor = monitor
        self.grad: list[float] = []
        self.weight: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.monitor.monitor is None:
            return
        weights = [p for ps in self.monitor.monitor.unit_parameters().values() for p in ps[:1]]
        grads = [w.grad for w in weights if w.grad is not None]
        self.grad.append(float(torch.stack([g.norm() for g in grads]).norm()))
        self.weight.append(float(torch.stack([w.detach().norm() for w in weights]).norm()))


def run(variant: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    train, test = digits_datasets(seed)
    loader = DataLoader(train, batch_size=64, shuffle=True, drop_last=True)
    total = args.epochs * len(loader)
    model = CosineAdamW(total, lr=args.lr, weight_decay=args.weight_decay, width=args.width)
    monitor = SphericalDynamicsCallback(prog_bar=False)
    norms = Norms(monitor)
    callbacks: list[pl.Callback] = [monitor, norms]
    if variant == "corrected":
        callbacks.append(CorrectedWeightDecay())
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, loader)
    x, y = test.tensors
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(dim=1) == y).float().mean())
    tail = [r.ratio for r in monitor.history if r.global_step > 0.9 * total and r.ratio]
    end = max(len(norms.grad) // 50, 1)  # the last 2% of the steps, averaged
    return {
        "accuracy": accuracy,
        "grad_rise": statistics.fmean(norms.grad[-end:]) / min(norms.grad),
        "weight_end_over_mid": norms.weight[-1] / norms.weight[len(norms.weight) // 2],
        "ratio_last_10pct": statistics.median(tail) if tail else float("nan"),
    }


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for seed in args.seeds:
        for variant in VARIANTS:
            results[variant].append(run(variant, seed, args))
            print(variant, seed, results[variant][-1], flush=True)
    print(f"\nAdamW lr {args.lr}, wd {args.weight_decay}, cosine over {args.epochs} epochs, "
          f"seeds {args.seeds}")  # fmt: skip
    print("| weight decay | test accuracy | grad norm end / min | weight norm end / mid "
          "| ratio, last 10% |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for variant, rows in results.items():
        cells = []
        for key in ("accuracy", "grad_rise", "weight_end_over_mid", "ratio_last_10pct"):
            values = [row[key] for row in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.3f} +- {spread:.3f}")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    return results


if __name__ == "__main__":
    main()
