"""Small Lightning modules and data shared by the callback tests."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def noisy_classification_data(
    samples: int = 512, features: int = 16, classes: int = 4, seed: int = 0
) -> TensorDataset:
    """Labels that are only partly predictable: the training loss cannot go to zero."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=generator)
    signal = x[:, :classes].argmax(dim=1)
    noise = torch.randint(0, classes, (samples,), generator=generator)
    keep = torch.rand(samples, generator=generator) < 0.6
    return TensorDataset(x, torch.where(keep, signal, noise))


def loader(dataset: TensorDataset, batch_size: int = 32, shuffle: bool = True) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(1),
    )


class BNNet(pl.LightningModule):
    """Linear -> BN -> ReLU -> Linear -> ReLU -> BN -> Linear classifier."""

    def __init__(
        self,
        lr: float = 0.1,
        weight_decay: float = 5e-3,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        features: int = 16,
        hidden: int = 32,
        classes: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.BatchNorm1d(hidden),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )


def trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": pl.loggers.CSVLogger(tmp_path, name="csv"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 5,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def read_csv_metrics(trainer: pl.Trainer) -> list[dict[str, float]]:
    """Rows of the CSVLogger's metrics.csv, with empty cells dropped."""
    path = Path(trainer.logger.log_dir) / "metrics.csv"  # type: ignore[union-attr]
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return [{k: float(v) for k, v in row.items() if v != ""} for row in rows]


def sgdm_prediction(lr: float, weight_decay: float, momentum: float) -> float:
    return math.sqrt(2 * lr * weight_decay / (1 + momentum))


class WeightRecorder(pl.Callback):
    """Independent record of the monitored weights after every optimizer step."""

    def __init__(self, names: dict[str, tuple[str, ...]]) -> None:
        self.names = names
        self.snapshots: dict[int, dict[str, list[torch.Tensor]]] = {}

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        self.snapshots[trainer.global_step] = {
            unit: [params[p].detach().clone() for p in members]
            for unit, members in self.names.items()
        }

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any):
        self._record(trainer, pl_module)
