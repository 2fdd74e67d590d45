"""FSDP2 (``ModelParallelStrategy``) on 2 CPU processes with SphericalDynamicsCallback.

Run: ``python tests/distributed/scripts/fsdp_callback.py --out DIR --init STATE.pt`` (Lightning
starts rank 1 by re-executing this command). Two callbacks (layer and channel granularity) watch
the same run; each rank writes ``DIR/fsdp_rank{0,1}.json`` (``--optimizer adamw``:
``DIR/fsdp_adamw_rank{0,1}.json``). The script itself asserts that the parameters really are
sharded DTensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from tests.distributed.scripts.common import (
    WORLD_SIZE,
    HistoryDump,
    LNNet,
    rank_loader,
    script_arguments,
    sdm_callbacks,
)


class ShardCheck(pl.Callback):
    """Asserts, at the first batch (and the end), that every parameter is a sharded DTensor."""

    def __init__(self, dump: HistoryDump) -> None:
        self.dump = dump

    def _check(self, pl_module: pl.LightningModule) -> dict[str, list[list[int]]]:
        shapes = {}
        for name, param in pl_module.named_parameters():
            assert isinstance(param, DTensor), f"{name} is a {type(param).__name__}, not a DTensor"
            assert param.device_mesh.size() == WORLD_SIZE, f"{name}: mesh {param.device_mesh}"
            local = tuple(param.to_local().shape)
            assert local[0] < param.shape[0], f"{name}: local {local} of global {param.shape}"
            shapes[name] = [list(param.shape), list(local)]
        return shapes

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            self.dump.extra["shapes"] = self._check(pl_module)
            self.dump.extra["strategy"] = type(trainer.strategy).__name__
            self.dump.extra["first_batch_sum"] = float(batch[0].double().sum())
            optimizer_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
            assert all(isinstance(p, DTensor) for p in optimizer_params)
            assert {id(p) for p in optimizer_params} == {id(p) for p in pl_module.parameters()}

    def on_train_end(self, trainer, pl_module) -> None:
        self.dump.extra["shapes_at_end"] = self._check(pl_module)


def main() -> None:
    args = script_arguments("init")

    sdm = sdm_callbacks()
    tag = "fsdp" if args.optimizer == "sgd" else f"fsdp_{args.optimizer}"
    dump = HistoryDump(args.out, tag, sdm)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1),
        max_epochs=1,
        logger=False,
        callbacks=[*sdm.values(), ShardCheck(dump), dump],  # dump last (writes at train end)
        use_distributed_sampler=False,  # each rank's loader already holds its own micro-batches
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = LNNet(initial_state=str(args.init), shard=True, optimizer=args.optimizer)
    # The rank is only known once Lightning has set up the processes; the loader is built per rank.
    module.train_dataloader = lambda: rank_loader(trainer.global_rank)  # type: ignore[method-assign]
    trainer.fit(module)


if __name__ == "__main__":
    main()
