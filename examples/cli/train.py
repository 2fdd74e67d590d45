"""LightningCLI over the digits demo, with the SDM callback configured in YAML.

    python examples/cli/train.py fit --config examples/cli/config.yaml
    python examples/cli/train.py fit --config examples/cli/config.yaml --trainer.max_epochs=2

The callback sits under ``trainer.callbacks`` in ``config.yaml`` (``class_path:
lightning_sdm.SphericalDynamicsCallback`` with its ``init_args``); any of its arguments can be
overridden from the command line, e.g. ``--trainer.callbacks.init_args.granularity=channel``
(see ``fit --help``). Logs go to ``lightning_logs/`` under the current directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

# The model and data of the main demo (examples/digits_demo.py), not a copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits_demo import DigitsConvNet, digits_datasets


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's bundled 8x8 digits (no download): 1437 train / 360 validation images."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        self.train, self.val = digits_datasets(self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(DigitsConvNet, DigitsDataModule, args=args, run=run)


if __name__ == "__main__":
    main()
