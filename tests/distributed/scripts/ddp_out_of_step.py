"""DDP on 2 CPU processes where rank 1 skips one ``optimizer.step()`` (manual optimization).

A user bug that Lightning alone survives (DDP's gradient all-reduce still pairs up: both ranks run
every backward). The monitor then closes its windows one batch later on rank 1 than on rank 0;
its reductions run on a process group of its own with ``sync_timeout``, so the job must neither
hang nor fail: each rank stops monitoring with one warning and trains to the end.

Run: ``python tests/distributed/scripts/ddp_out_of_step.py --out DIR``. Writes
``DIR/out_of_step_rank{0,1}.json``: steps, windows logged, the package's warnings, seconds.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import lightning.pytorch as pl
import torch

from lightning_sdm import SphericalDynamicsCallback
from tests.distributed.scripts.common import script_arguments
from tests.helpers import BNNet, loader, noisy_classification_data

SKIPPED_BATCH = 5  # rank 1 does not step its optimizer on this batch
EVERY, WINDOW = 4, 3
SYNC_TIMEOUT = 8.0
SAMPLES, BATCH, EPOCHS = 256, 16, 2  # 8 batches per epoch per rank


class SkipsOneStepOnRankOne(BNNet):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        if not (self.global_rank == 1 and self.current_epoch == 0 and batch_idx == SKIPPED_BATCH):
            optimizer.step()
        return loss


def main() -> None:
    args = script_arguments()
    pl.seed_everything(0, workers=True, verbose=False)
    sdm = SphericalDynamicsCallback(every_n_steps=EVERY, window=WINDOW, sync_timeout=SYNC_TIMEOUT)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=EPOCHS,
        logger=False,
        callbacks=[sdm],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(
            SkipsOneStepOnRankOne(lr=0.1, weight_decay=5e-3, momentum=0.9),
            loader(noisy_classification_data(samples=SAMPLES), batch_size=BATCH),
        )
    record = {
        "rank": trainer.global_rank,
        "seconds": time.perf_counter() - start,
        "global_step": trainer.global_step,
        "windows": sorted({(r.unit, r.global_step) for r in sdm.history}),
        "stopped": sdm.monitor.stopped if sdm.monitor is not None else None,
        "warnings": [str(w.message) for w in caught if "[lightning_sdm] rank" in str(w.message)],
    }
    path = args.out / f"out_of_step_rank{trainer.global_rank}.json"
    path.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
