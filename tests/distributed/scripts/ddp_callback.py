"""DDP on 2 CPU processes with SphericalDynamicsCallback; each rank dumps its history.

Run: ``python tests/distributed/scripts/ddp_callback.py --out DIR`` (Lightning starts rank 1 by
re-executing this command). Writes ``DIR/ddp_rank{0,1}.json`` and the CSVLogger's files.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import lightning.pytorch as pl
from torch.utils.data import DistributedSampler

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.actions._actions import DecayLR
from tests.distributed.scripts.common import HistoryDump, script_arguments
from tests.helpers import BNNet, loader, noisy_classification_data

# Fast-equilibrating hyperparameters: the detector has decisions to make within a few windows.
LR, WD, MOMENTUM = 0.2, 0.05, 0.9
EVERY, WINDOW = 4, 3
DECAY = 0.5
SAMPLES, BATCH, EPOCHS = 256, 16, 3  # 8 steps per epoch per rank


class DataCheck(pl.Callback):
    """Records what each rank trains on (the sampler Lightning installed, first batch)."""

    def __init__(self, dump: HistoryDump) -> None:
        self.dump = dump

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            sampler = trainer.train_dataloader.sampler
            self.dump.extra["sampler"] = type(sampler).__name__
            self.dump.extra["is_distributed_sampler"] = isinstance(sampler, DistributedSampler)
            self.dump.extra["first_batch_sum"] = float(batch[0].double().sum())
            self.dump.extra["strategy"] = type(trainer.strategy).__name__


def main() -> None:
    args = script_arguments()
    pl.seed_everything(0, workers=True, verbose=False)

    sdm = SphericalDynamicsCallback(
        every_n_steps=EVERY,
        window=WINDOW,
        tolerance=0.3,
        patience=2,
        # A collective decision with an effect: halve the LR once at equilibrium (on every rank).
        on_equilibrium=DecayLR(factor=DECAY, max_decays=1),
    )
    dump = HistoryDump(args.out, "ddp", {"layer": sdm})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=EPOCHS,
        logger=pl.loggers.CSVLogger(args.out, name="csv"),
        callbacks=[sdm, dump, DataCheck(dump)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    module = BNNet(lr=LR, weight_decay=WD, momentum=MOMENTUM)
    data = noisy_classification_data(samples=SAMPLES)
    trainer.fit(module, loader(data, batch_size=BATCH, shuffle=True))


if __name__ == "__main__":
    main()
