"""The digits demo under DDP: two CPU processes (gloo), the callback unchanged.

Lightning's ``strategy="ddp"`` starts rank 1 by running this same command again, so this file
must stay a script (no notebook). Under DDP every rank holds the same weights and takes the same
steps, so each rank measures the same angular updates; the callback logs from rank zero (loggers
are rank-zero only). At the end every rank's history is gathered and compared.

Each rank sees its own half of each global batch (Lightning installs a ``DistributedSampler``),
and BatchNorm normalises each rank's half on its own (no SyncBatchNorm): the scale invariance of
the conv weights does not depend on that.

    python examples/ddp_example.py --epochs 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_demo import DigitsConvNet, digits_datasets, print_summary

from lightning_sdm import SphericalDynamicsCallback


class RankAgreement(pl.Callback):
    """At the end of fit, gather every rank's measured angles and compare them."""

    def __init__(self, sdm: SphericalDynamicsCallback) -> None:
        self.sdm = sdm
        self.max_difference = float("nan")

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        local = torch.tensor([record.angular_update for record in self.sdm.history])
        gathered = [torch.zeros_like(local) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(gathered, local)
        self.max_difference = max(float((g - gathered[0]).abs().max()) for g in gathered)


def parse_arguments(
    argv: list[str] | None, description: str, *, devices: bool = True
) -> argparse.Namespace:
    """The options of this example, shared with ``fsdp2_example.py`` (which has no --devices)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=-1, help="stop after this many steps")
    if devices:
        parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-3)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--every-n-steps", type=int, default=10)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv, __doc__.splitlines()[0])

    pl.seed_everything(args.seed, verbose=False)
    train, _ = digits_datasets(args.seed)
    model = DigitsConvNet(lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)
    sdm = SphericalDynamicsCallback(every_n_steps=args.every_n_steps, window=args.window)
    agreement = RankAgreement(sdm)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp",
        max_epochs=args.epochs,
        max_steps=args.steps,
        logger=CSVLogger(args.log_dir, name="ddp_example"),
        callbacks=[sdm, agreement],
        log_every_n_steps=args.every_n_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True))
    if trainer.is_global_zero:
        print_summary(sdm, args)
        print(
            f"\n{trainer.world_size} processes, {len(sdm.history)} windows; ranks agree: max "
            f"|difference| of the measured angles = {agreement.max_difference:.1e}"
        )
        print(f"Logs: {trainer.logger.log_dir if trainer.logger else args.log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
