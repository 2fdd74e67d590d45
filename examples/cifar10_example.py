"""A small BatchNorm ResNet on CIFAR-10 read from a local directory, with the SDM callback.

The setting of Wan et al. (2020, Fig. 2): SGD with momentum and weight decay on a ResNet, where
every convolution feeds a BatchNorm and is therefore scale-invariant (the residual additions come
after the norms). Nothing is downloaded: point ``--data-dir`` at the extracted python version of
CIFAR-10 (``cifar-10-python.tar.gz`` from https://www.cs.toronto.edu/~kriz/cifar.html), i.e. the
``cifar-10-batches-py`` directory with ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, or
its parent. The batches are Python pickles: only load files you trust.

    python examples/cifar10_example.py --data-dir ~/data/cifar-10-batches-py --epochs 30
    lightning-sdm report lightning_logs/cifar10 -o cifar10_report.png

On CPU an epoch takes minutes; use ``--steps`` and ``--width`` to keep it short, or a GPU
(``--accelerator auto``).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_sdm import SphericalDynamicsCallback

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
FOLDER = "cifar-10-batches-py"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class CifarNotFoundError(FileNotFoundError):
    """The CIFAR-10 directory is missing or incomplete."""


def find_cifar_dir(data_dir: str | Path) -> Path:
    """The directory that holds the batches: ``data_dir`` itself or its ``cifar-10-batches-py``."""
    root = Path(data_dir).expanduser()
    for candidate in (root, root / FOLDER):
        if all((candidate / name).is_file() for name in (*TRAIN_FILES, TEST_FILE)):
            return candidate
    missing = [n for n in (*TRAIN_FILES, TEST_FILE) if not (root / n).is_file()]
    raise CifarNotFoundError(
        f"CIFAR-10 not found in {root}" + ("" if root.is_dir() else " (no such directory)") + ": "
        f"expected the python version ({FOLDER}/ with data_batch_1..5 and test_batch; missing "
        f"{', '.join(missing)}). Download cifar-10-python.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and pass --data-dir."
    )


def load_batches(directory: Path, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """Images ``[N, 3, 32, 32]`` (uint8) and labels ``[N]`` from pickled CIFAR batches."""
    images, labels = [], []
    for name in names:
        with (directory / name).open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data = torch.as_tensor(batch["data"], dtype=torch.uint8)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(batch["labels"], dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


class Cifar10(Dataset):
    """Normalized CIFAR-10 images, with random crop (padding 4) and flip when ``augment``."""

    def __init__(self, images: Tensor, labels: Tensor, augment: bool) -> None:
        mean = torch.tensor(MEAN).view(3, 1, 1)
        std = torch.tensor(STD).view(3, 1, 1)
        self.images = (images.float() / 255.0 - mean) / std
        self.labels = labels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.augment:
            padded = nn.functional.pad(image, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            image = padded[:, top : top + 32, left : left + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image, self.labels[index]


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU: every conv is followed by its own BN."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nn.functional.relu(out + self.shortcut(x))


class SmallResNet(pl.LightningModule):
    """A ResNet-ish net: stem, three stages of ``blocks`` blocks (width w, 2w, 4w), linear head."""

    def __init__(
        self,
        width: int = 16,
        blocks: int = 1,
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        total_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        channels = width
        for stage, outputs in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, outputs, stride))
                channels = outputs
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/accuracy", (self(x).argmax(dim=1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        if hp.total_steps <= 0:
            return optimizer
        # Step decay by 10 at 50% and 75%: each decay sends the angular update down and back up
        # to a new equilibrium sqrt(10) lower (SMD Cor. 3.1), which the report shows.
        milestones = [int(hp.total_steps * 0.5), int(hp.total_steps * 0.75)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help=f"{FOLDER} directory, or its parent")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=-1, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=1, help="blocks per stage")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--lr-decay", action="store_true", help="decay the LR by 10 at 50%%, 75%%")
    parser.add_argument("--every-n-steps", type=int, default=50)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--log-dir", default="lightning_logs")
    parser.add_argument("--report", default=None, help="report figure (default: in the log dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        directory = find_cifar_dir(args.data_dir)
    except CifarNotFoundError as err:
        parser.exit(2, f"error: {err}\n")
    pl.seed_everything(args.seed, verbose=False)
    train = Cifar10(*load_batches(directory, TRAIN_FILES), augment=True)
    test = Cifar10(*load_batches(directory, (TEST_FILE,)), augment=False)
    print(f"CIFAR-10 from {directory}: {len(train)} train, {len(test)} test images")
    train_loader = DataLoader(
        train,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
    )
    steps_per_epoch = len(train_loader)
    total = args.steps if args.steps > 0 else args.epochs * steps_per_epoch
    model = SmallResNet(
        width=args.width,
        blocks=args.blocks,
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        total_steps=total if args.lr_decay else 0,
    )
    sdm = SphericalDynamicsCallback(every_n_steps=args.every_n_steps, window=args.window)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=args.epochs,
        max_steps=args.steps,
        logger=[
            TensorBoardLogger(args.log_dir, name="cifar10"),
            CSVLogger(args.log_dir, name="cifar10_csv"),
        ],
        callbacks=[sdm, LearningRateMonitor(logging_interval="step")],
        log_every_n_steps=args.every_n_steps,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_loader, DataLoader(test, batch_size=512, num_workers=args.num_workers))

    from lightning_sdm.report._cli import format_summary
    from lightning_sdm.report._plot import plot_run
    from lightning_sdm.report._rundata import run_from_history

    if not sdm.history:
        print("No SDM window closed (fewer steps than --every-n-steps).")
        return 0
    run = run_from_history(sdm.history)
    print()
    print(format_summary(run))
    report = Path(args.report or Path(args.log_dir) / "cifar10_report.png")
    report.parent.mkdir(parents=True, exist_ok=True)
    plot_run(run, path=report, title="Spherical Motion Dynamics: CIFAR-10, small ResNet")
    print(f"\nReport figure: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
