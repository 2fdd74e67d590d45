"""The digits demo under FSDP2 (``ModelParallelStrategy``): weights sharded over two CPU processes.

``configure_model`` applies ``fully_shard`` to each conv layer and then to the whole model, on
the data-parallel mesh of ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``
(with the default sizes the data-parallel mesh can have size 1, and then nothing is sharded). Each
rank holds half of every weight, as a ``DTensor``; the callback sums the angle's statistics over
the local shards and all-reduces them, so both ranks report the exact angle of the whole tensor.

Like ``strategy="ddp"``, the strategy starts rank 1 by running this command again: keep it a
script. Uses gloo on CPU.

    python examples/fsdp2_example.py --epochs 5
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_example import parse_arguments
from digits_demo import DigitsConvNet, digits_datasets, print_summary

from lightning_sdm import SphericalDynamicsCallback


class ShardedDigitsConvNet(DigitsConvNet):
    """The digits convnet, sharded with FSDP2 when the strategy sets up the model."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)  # the root: BatchNorm parameters and the classifier


class ShardCheck(pl.Callback):
    """Record, per monitored unit, the local and the global shape of its weight."""

    def __init__(self, sdm: SphericalDynamicsCallback) -> None:
        self.sdm = sdm
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], str]] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        from torch.distributed.tensor import DTensor

        params = dict(pl_module.named_parameters())
        for unit in self.sdm.monitor.units if self.sdm.monitor else []:
            weight = params[unit]
            local = weight.to_local() if isinstance(weight, DTensor) else weight
            self.shapes[unit] = (tuple(local.shape), tuple(weight.shape), type(weight).__name__)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv, __doc__.splitlines()[0], devices=False)

    pl.seed_everything(args.seed, verbose=False)
    train, _ = digits_datasets(args.seed)
    model = ShardedDigitsConvNet(lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)
    sdm = SphericalDynamicsCallback(every_n_steps=args.every_n_steps, window=args.window)
    shards = ShardCheck(sdm)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=args.epochs,
        max_steps=args.steps,
        logger=CSVLogger(args.log_dir, name="fsdp2_example"),
        callbacks=[sdm, shards],
        log_every_n_steps=args.every_n_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True))
    if trainer.is_global_zero:
        print_summary(sdm, args)
        print()
        for unit, (local, full, kind) in shards.shapes.items():
            print(f"{unit}: {kind}, local shard {list(local)} of {list(full)} on rank 0")
        print(f"Logs: {trainer.logger.log_dir if trainer.logger else args.log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
