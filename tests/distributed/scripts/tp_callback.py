"""Tensor parallelism and 2-D meshes (``ModelParallelStrategy``) with SphericalDynamicsCallback.

Run: ``python tests/distributed/scripts/tp_callback.py --out DIR --init STATE.pt --layout L``
(Lightning starts the other ranks by re-executing this command), with ``L`` one of

* ``tp``: 2 ranks, tensor parallel only: ``fc1`` ``ColwiseParallel`` (weight ``Shard(0)``),
  ``fc2`` ``RowwiseParallel`` (weight ``Shard(1)``, bias ``Replicate()``); ``fc3`` stays a plain
  tensor replicated on both ranks;
* ``fsdp_tp``: 4 ranks, a 2 x 2 (data parallel, tensor parallel) mesh: the same TP plan, then
  FSDP2 over the data-parallel dimension (``fc1``: ``(_StridedShard(0), Shard(0))``, ``fc2``:
  ``(Shard(0), Shard(1))``; ``fc3`` a DTensor on the data-parallel sub-mesh only, replicated
  across the tensor-parallel ranks outside its mesh);
* ``hsdp``: 4 ranks, FSDP2 over the whole 2 x 2 mesh: replicated over the first dimension,
  sharded over the second (every parameter ``(Replicate(), Shard(0))``).

The model is float64, so that the distributed run and the single-process reference (the test,
on the concatenated data-parallel batches) agree to ~1e-15 and any error of the monitor's
reductions (a double-counted replica, a missing TP partial sum) shows. Two callbacks (layer and
channel granularity) watch the run and find the units on the parallelized model; each rank writes
``DIR/<layout>_rank{r}.json``, with the collectives the monitor issued per window (``Collectives``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sdm import SphericalDynamicsCallback
from tests.distributed.scripts.common import HistoryDump

FEATURES, HIDDEN, WIDTH, CLASSES = 6, 10, 9, 4  # odd sizes: uneven shards (5 + 5, 5 + 4, ...)
MICRO_BATCH = 8
STEPS, EVERY, WINDOW = 12, 4, 3
LR, WD, MOMENTUM = 0.2, 0.05, 0.9
LAYOUTS = {"tp": (1, 2), "fsdp_tp": (2, 2), "hsdp": (4, 1)}  # data-parallel ranks, TP ranks


def group_standardize(h: torch.Tensor) -> torch.Tensor:
    """Each feature standardised over each micro-batch (BatchNorm without affine, per rank).

    Per micro-batch, so that one process on the concatenated batches of the data-parallel ranks
    computes what each rank computes on its own; per feature, so that each row of the weight
    before it (with its bias) is scale-invariant on its own. Works on a TP shard of the features.
    """
    groups = h.reshape(-1, MICRO_BATCH, h.shape[-1])
    centred = groups - groups.mean(dim=1, keepdim=True)
    scale = (centred.square().mean(dim=1, keepdim=True) + 1e-5).rsqrt()
    return (centred * scale).reshape(h.shape)


class TPNet(pl.LightningModule):
    """fc1 -> standardize -> ReLU -> fc2 -> standardize -> ReLU -> fc3 -> LayerNorm -> head."""

    def __init__(self, initial_state: str | None = None, layout: str | None = None) -> None:
        super().__init__()
        self.layout = layout
        self.fc1 = nn.Linear(FEATURES, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, WIDTH)
        self.fc3 = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)
        self.double()
        if initial_state is not None:
            self.load_state_dict(torch.load(initial_state, weights_only=True))

    def configure_model(self) -> None:
        if self.layout is None:
            return
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = self.device_mesh
        if self.layout in ("tp", "fsdp_tp"):
            plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}
            parallelize_module(self, mesh["tensor_parallel"], plan)
        if self.layout == "fsdp_tp":
            fully_shard(self, mesh=mesh["data_parallel"])
        if self.layout == "hsdp":
            # A 2-D mesh: replicate over its first dimension, shard over its second.
            fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(group_standardize(self.fc1(x)))
        h = torch.relu(group_standardize(self.fc2(h)))
        return self.head(self.norm(self.fc3(h)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


def initial_state(path: Path) -> None:
    torch.manual_seed(0)
    model = TPNet()
    with torch.no_grad():
        model.norm.weight.normal_(1.0, 0.2)
        model.norm.bias.normal_(0.0, 0.2)
    torch.save(model.state_dict(), path)


def batches(data_parallel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[step, dp_rank, sample, feature]`` and ``y[step, dp_rank, sample]`` (float64)."""
    generator = torch.Generator().manual_seed(1)
    shape = (STEPS, data_parallel, MICRO_BATCH)
    x = torch.randn(*shape, FEATURES, generator=generator, dtype=torch.float64)
    y = torch.randint(0, CLASSES, shape, generator=generator)
    return x, y


def loader(data_parallel: int, dp_rank: int | None) -> DataLoader:
    """One data-parallel rank's micro-batches; ``dp_rank=None``: all of them concatenated."""
    x, y = batches(data_parallel)
    if dp_rank is None:
        dataset = TensorDataset(x.reshape(-1, FEATURES), y.reshape(-1))
        return DataLoader(dataset, batch_size=data_parallel * MICRO_BATCH, shuffle=False)
    dataset = TensorDataset(x[:, dp_rank].reshape(-1, FEATURES), y[:, dp_rank].reshape(-1))
    return DataLoader(dataset, batch_size=MICRO_BATCH, shuffle=False)


class Collectives(pl.Callback):
    """Counts the collectives issued from the package's code, per training batch.

    Every collective of ``torch.distributed`` and of its functional collectives (what DTensor
    redistributions use) is wrapped in this process; a call counts when a frame of
    ``lightning_sdm`` is on the stack (the model's own TP and FSDP2 collectives do not), and is
    recorded with the package's innermost function. At each batch end the calls since the last
    one are filed under that batch's global step.
    """

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "all_to_all",
        "all_to_all_single",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "gather",
        "reduce",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "scatter",
        "all_gather_tensor",
    )

    def __init__(self, dump: HistoryDump) -> None:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol
        import torch.distributed.distributed_c10d as c10d

        self.dump = dump
        self.pending: list[str] = []
        self.per_step: dict[int, list[str]] = {}
        for module in (dist, c10d, funcol):
            for name in self.NAMES:
                if callable(getattr(module, name, None)):
                    setattr(module, name, self._wrap(getattr(module, name), name))

    def _wrap(self, fn: Any, name: str) -> Any:
        import functools

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            frame = sys._getframe(1)
            while frame is not None:
                path = frame.f_code.co_filename
                if "/lightning_sdm/" in path:
                    where = path.rsplit("/lightning_sdm/", 1)[1]
                    self.pending.append(f"{name} from {where}:{frame.f_code.co_name}")
                    break
                frame = frame.f_back  # type: ignore[assignment]
            return fn(*args, **kwargs)

        return counted

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.per_step[trainer.global_step] = self.pending
        self.pending = []

    def on_train_end(self, trainer, pl_module) -> None:
        self.dump.extra["collectives"] = self.per_step
        self.dump.extra["placements"] = {
            name: str(getattr(param, "placements", "plain"))
            for name, param in pl_module.named_parameters()
        }


def sdm_callbacks() -> dict[str, SphericalDynamicsCallback]:
    """Layer (and multi-step, ``horizon``) and channel granularity; units found by the trace."""
    from tests.distributed.scripts.common import KeyedSDM

    common: dict[str, Any] = {"every_n_steps": EVERY, "window": WINDOW}
    return {
        "layer": KeyedSDM(horizon=WINDOW, **common),
        "channel": KeyedSDM(granularity="channel", prog_bar=False, **common),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", type=Path, required=True)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from lightning.pytorch.strategies import ModelParallelStrategy

    data_parallel, tensor_parallel = LAYOUTS[args.layout]
    mesh = (2, 2) if args.layout == "hsdp" else (data_parallel, tensor_parallel)
    sdm = sdm_callbacks()
    dump = HistoryDump(args.out, args.layout, sdm)
    collectives = Collectives(dump)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=data_parallel * tensor_parallel,
        strategy=ModelParallelStrategy(data_parallel_size=mesh[0], tensor_parallel_size=mesh[1]),
        max_epochs=1,
        logger=False,
        callbacks=[*sdm.values(), collectives, dump],
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = TPNet(initial_state=str(args.init), layout=args.layout)
    # Tensor-parallel peers train on the same batches; the data-parallel rank picks them.
    module.train_dataloader = lambda: loader(  # type: ignore[method-assign]
        data_parallel, trainer.global_rank // tensor_parallel
    )
    trainer.fit(module)


if __name__ == "__main__":
    main()
