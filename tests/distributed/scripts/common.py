"""Shared by the Lightning scripts of ``test_callback_distributed.py`` and by the test itself.

The scripts run as ``python tests/distributed/scripts/<name>.py --out DIR`` (Lightning's
``strategy="ddp"`` and ``ModelParallelStrategy`` re-execute ``sys.argv`` for the other rank), so
this module must import without the package being on ``sys.path``: :func:`ensure_repo_on_path`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]


def ensure_repo_on_path() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def script_arguments(*paths: str) -> argparse.Namespace:
    """A script's command line: ``--out DIR`` and the other required paths; one torch thread."""
    parser = argparse.ArgumentParser()
    for name in ("out", *paths):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    args = parser.parse_args()
    torch.set_num_threads(1)  # 2 ranks on a 2-core machine
    return args


ensure_repo_on_path()

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_sdm import SphericalDynamicsCallback  # noqa: E402

# FSDP2 comparison: per-rank micro-batch, steps, model sizes. 33 rows shard unevenly (17 + 16).
FEATURES, HIDDEN, CLASSES = 12, 33, 5
MICRO_BATCH = 8
WORLD_SIZE = 2
FSDP_STEPS = 12
FSDP_EVERY, FSDP_WINDOW = 4, 3
FSDP_LR, FSDP_WD, FSDP_MOMENTUM = 0.2, 0.05, 0.9
# The AdamW run (the radial balance is measured from the update's radial part, not a priori).
FSDP_ADAMW_LR, FSDP_ADAMW_WD = 0.02, 0.5


class LNNet(pl.LightningModule):
    """Linear -> LayerNorm -> ReLU -> Linear -> ReLU -> LayerNorm -> Linear.

    LayerNorm normalizes each sample on its own, so two ranks that each see half of a batch
    compute exactly what one process computes on the whole batch (BatchNorm would not).
    ``shard=True`` applies FSDP2 in :meth:`configure_model`: the first Linear, then the root.
    """

    def __init__(
        self, initial_state: str | None = None, shard: bool = False, optimizer: str = "sgd"
    ) -> None:
        super().__init__()
        self.shard = shard
        self.optimizer = optimizer
        self.net = nn.Sequential(
            nn.Linear(FEATURES, HIDDEN),
            nn.LayerNorm(HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.LayerNorm(HIDDEN),
            nn.Linear(HIDDEN, CLASSES),
        )
        if initial_state is not None:
            self.net.load_state_dict(torch.load(initial_state, weights_only=True))

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        # net.0 gets its own FSDP unit (resharded after forward); net.3 stays with the root,
        # whose parameters FSDP2 keeps unsharded from forward to backward.
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)  # mean over the (local) batch

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(
                self.parameters(), lr=FSDP_ADAMW_LR, weight_decay=FSDP_ADAMW_WD
            )
        return torch.optim.SGD(
            self.parameters(), lr=FSDP_LR, momentum=FSDP_MOMENTUM, weight_decay=FSDP_WD
        )


def initial_lnnet_state(path: Path) -> None:
    """Write a random initial state with non-trivial LayerNorm affine parameters."""
    torch.manual_seed(0)
    net = LNNet().net
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    torch.save(net.state_dict(), path)


def global_batches(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[step, rank, sample, feature]`` and ``y[step, rank, sample]``: every rank's batches."""
    generator = torch.Generator().manual_seed(seed)
    shape = (FSDP_STEPS, WORLD_SIZE, MICRO_BATCH)
    x = torch.randn(*shape, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, shape, generator=generator)
    return x, y


def rank_loader(rank: int) -> DataLoader:
    """Rank ``rank``'s micro-batches, in order (no sampler: the split is explicit)."""
    x, y = global_batches()
    dataset = TensorDataset(x[:, rank].reshape(-1, FEATURES), y[:, rank].reshape(-1))
    return DataLoader(dataset, batch_size=MICRO_BATCH, shuffle=False)


def full_loader() -> DataLoader:
    """One process: each batch is the concatenation of the ranks' micro-batches of that step."""
    x, y = global_batches()
    dataset = TensorDataset(x.reshape(-1, FEATURES), y.reshape(-1))
    return DataLoader(dataset, batch_size=WORLD_SIZE * MICRO_BATCH, shuffle=False)


class KeyedSDM(SphericalDynamicsCallback):
    """The callback, unchanged but for a ``state_key`` that lets two instances share a Trainer.

    ``SphericalDynamicsCallback.state_key`` is the class name, so Lightning refuses a second
    instance in the same Trainer ("more than one stateful callback"); with this key one run serves
    both granularities.
    """

    @property
    def state_key(self) -> str:
        return self._generate_state_key(granularity=self.config.granularity)


def sdm_callbacks() -> dict[str, SphericalDynamicsCallback]:
    """The callbacks of the FSDP2 run and of its single-process reference, in the same order."""
    return {
        "layer": KeyedSDM(every_n_steps=FSDP_EVERY, window=FSDP_WINDOW),
        "channel": KeyedSDM(
            granularity="channel", every_n_steps=FSDP_EVERY, window=FSDP_WINDOW, prog_bar=False
        ),
    }


class HistoryDump(pl.Callback):
    """At the end of fit, write the SDM callbacks' ``history`` (and more) to ``DIR/<tag>_rankN``."""

    def __init__(self, out: Path, tag: str, callbacks: dict[str, Any]) -> None:
        self.out = Path(out)
        self.tag = tag
        self.callbacks = callbacks
        self.extra: dict[str, Any] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, param in pl_module.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            digest.update(name.encode())
            digest.update(local.detach().cpu().contiguous().numpy().tobytes())
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "extra": self.extra,
            "lrs": [group["lr"] for opt in trainer.optimizers for group in opt.param_groups],
            "local_parameters_sha256": digest.hexdigest(),
            "callbacks": {
                name: {
                    "history": [record.as_dict() for record in callback.history],
                    "units": callback.monitor.units if callback.monitor else None,
                    "report_method": callback.report.method if callback.report else None,
                    "skipped": dict(callback.monitor.skipped) if callback.monitor else None,
                    "equilibrium_fraction": callback.detector.fraction(),
                    "events": [event.as_dict() for event in callback.events],
                }
                for name, callback in self.callbacks.items()
            },
        }
        path = self.out / f"{self.tag}_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record, indent=1))


def read_record(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def exact(value: Any) -> Any:
    """Floats as their exact hex form (NaN-safe equality); recursively."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else value.hex()
    if isinstance(value, dict):
        return {key: exact(v) for key, v in value.items()}
    if isinstance(value, list):
        return [exact(v) for v in value]
    return value
