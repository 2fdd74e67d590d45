"""Main demo: a small BatchNorm convnet on scikit-learn's bundled digits, with the SDM callback.

Runs in about a minute on 2 CPU cores, offline. It logs to TensorBoard and CSV under
``--log-dir``, prints, per scale-invariant layer, the measured RMS angular update next to the
equilibrium predicted by theory, ``sqrt(2 * lr * wd / (1 + momentum))`` for SGD with momentum,
and saves the report figure (``--report``, by default ``<log-dir>/digits_demo_report.png``).

    python examples/digits_demo.py --epochs 30
    tensorboard --logdir lightning_logs/digits_demo
    lightning-sdm report lightning_logs -o report.png    # the same figure, from the logs
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sdm import SphericalDynamicsCallback


def digits_datasets(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The 8x8 digits of scikit-learn (bundled, no download): 1437 train / 360 test images."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


class DigitsConvNet(pl.LightningModule):
    """conv-BN-ReLU x3 with a linear classifier; every conv weight is scale-invariant."""

    def __init__(
        self,
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        width: int = 32,
        label_noise: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        # Label smoothing keeps the training loss away from zero, so the gradient noise stays
        # stationary and the equilibrium is the one theory describes (SDM-NOTES section 4).
        loss = nn.functional.cross_entropy(self(x), y, label_smoothing=self.hparams.label_noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        accuracy = (self(x).argmax(dim=1) == y).float().mean()
        self.log("val/accuracy", accuracy, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )


def main(argv: list[str] | None = None) -> SphericalDynamicsCallback:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--steps", type=int, default=-1, help="stop after this many steps (-1: all epochs)"
    )
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-3)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--every-n-steps", type=int, default=20)
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--report",
        default=None,
        help="report figure (default: <log-dir>/digits_demo_report.png; '' to skip it)",
    )
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    train, test = digits_datasets(args.seed)
    model = DigitsConvNet(lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)
    # The default window (2 measured steps of each interval): the monitor stays under 1% of the
    # step time, so a healthy run prints only the notes about this set-up and the summary.
    callback = SphericalDynamicsCallback(every_n_steps=args.every_n_steps)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        max_steps=args.steps,
        accelerator="cpu",
        logger=[
            TensorBoardLogger(args.log_dir, name="digits_demo"),
            CSVLogger(args.log_dir, name="digits_demo_csv"),
        ],
        callbacks=[callback],
        log_every_n_steps=args.every_n_steps,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(
        model,
        DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True),
        DataLoader(test, batch_size=256),
    )
    print_summary(callback, args)
    if args.report != "":
        write_report(callback, Path(args.report or Path(args.log_dir) / "digits_demo_report.png"))
    return callback


def write_report(callback: SphericalDynamicsCallback, path: Path) -> None:
    """Measured vs predicted angular updates, weight norms, LR and equilibrium, as a figure."""
    if not callback.history:
        print("No SDM window closed (fewer steps than --every-n-steps): no report figure.")
        return
    from lightning_sdm.report._plot import plot_run

    path.parent.mkdir(parents=True, exist_ok=True)
    plot_run(callback, path=path, title="Spherical Motion Dynamics: digits demo")
    print(f"\nReport figure: {path}")


def print_summary(callback: SphericalDynamicsCallback, args: argparse.Namespace) -> None:
    """Per layer: the last window against theory, and the detector's regime with its reason."""
    theory = math.sqrt(2 * args.lr * args.weight_decay / (1 + args.momentum))
    last = {record.unit: record for record in callback.history}
    print(f"\nPredicted equilibrium angular update: {theory:.5f} rad/step")
    print(f"{'unit':<20} {'measured':>9} {'theory':>9} {'ratio':>6} {'|w|':>7}  regime")
    for unit, record in last.items():
        state = callback.detector.state[unit]
        since = f" since step {state.reached_global_step}" if state.in_equilibrium else ""
        print(
            f"{unit:<20} {record.angular_update:>9.5f} {record.theory or math.nan:>9.5f} "
            f"{record.ratio or math.nan:>6.3f} {record.weight_norm:>7.3f}  "
            f"{record.regime.replace('_', ' ')}{since}: {record.regime_note}"
        )


if __name__ == "__main__":
    main()
