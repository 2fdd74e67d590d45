"""Reproduce the claims of Spherical Motion Dynamics with lightning_sdm, on real data, offline.

Four experiments, each a set of short Lightning runs of a small BatchNorm convnet on scikit-learn's
bundled 8x8 digits (or on CIFAR-10 read from ``--cifar-dir``, the standard
``cifar-10-batches-py`` pickles, no torchvision), measured with nothing but the public API of
``lightning_sdm`` (:class:`~lightning_sdm.SphericalDynamicsCallback`,
:func:`~lightning_sdm.angular_update` and :mod:`lightning_sdm.theory`):

1. equilibrium: SGD (lr x weight decay x momentum) and AdamW (lr x weight decay x beta1) grids,
   measured RMS angular update of every BN-followed conv at equilibrium against the prediction, in
   a regime with stationary gradient noise (labels re-drawn at random for 20% of every batch, so
   the training loss cannot reach zero), and one non-stationary run (clean labels, loss -> 0);
2. LR decay by 10x: the drop, the relaxation to the new prediction and its time against theory
   (MultiStepLR), and SMD's rescaling trick (the callback's ``decay_lr`` + ``rescale_weights``);
3. linear scaling: batch k*B with lr k*eta (k = 1, 2, 4, 8), per-step angle against sqrt(k), and
   the angle between w_t and w_{t+k} at batch B (the callback's ``horizon=k``) against the single
   step at batch k*B;
4. per channel: distribution of the per-channel RMS angular update around the prediction.

    python examples/reproduce_paper.py --out docs --jobs 2     # full report, ~10 CPU-minutes
    python examples/reproduce_paper.py --quick --out /tmp/sdm  # small grid, few hundred steps
    python examples/reproduce_paper.py --cifar-dir ~/data/cifar-10-batches-py --out cifar_report

Writes ``<out>/reproduction.md`` (tables and discussion), ``<out>/figures/*.png`` and
``<out>/results.json`` (every number, per run and per layer). ``tests/test_reproduce_paper.py``
runs ``--quick`` and asserts the claims with tolerances.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import os
import pickle
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from lightning_sdm import SphericalDynamicsCallback, angular_update
from lightning_sdm.actions import DecayLR
from lightning_sdm.simulation import simulate_scale_invariant
from lightning_sdm.theory import (
    adamw_equilibrium_weight_norm,
    equilibrium_angular_update,
    relaxation_steps,
)


def lr_decay_relaxation_steps(k: float, lr: float, weight_decay: float, momentum: float) -> int:
    """SMD Cor. 3.1, the claim under test: ``ceil(ln(k) (1 - m) / (2 wd lr))`` steps after a
    decay by ``k`` (``lr`` after the decay), i.e. two of theory's time constants per e-fold of k."""
    return math.ceil(2 * relaxation_steps(lr, weight_decay, momentum) * math.log(k))


EVERY = 16  # optimizer steps per logged window; every step is measured (window = EVERY)
AUTO_WINDOW = 48  # window of the callback that decays the LR at equilibrium (experiment 2)
EXPERIMENTS = ("equilibrium", "decay", "scaling", "channel")

# ------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from (digits unless ``cifar_dir`` is given)."""

    cifar_dir: str | None = None
    cifar_train_size: int = 10000
    threads: int = 1

    @property
    def name(self) -> str:
        return "CIFAR-10" if self.cifar_dir else "digits"


@lru_cache(maxsize=2)
def load_data(config: DataConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) as float images in NCHW and int64 labels."""
    if config.cifar_dir:
        return load_cifar10(config.cifar_dir, config.cifar_train_size)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from digits_demo import digits_datasets

    train, test = digits_datasets(0)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    return x_train, y_train, x_test, y_test


def load_cifar10(
    directory: str | os.PathLike[str], train_size: int = 10000
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CIFAR-10 from the ``cifar-10-batches-py`` pickles (``data_batch_1..5``, ``test_batch``).

    The first ``train_size`` training images (0: all 50000), standardized per channel with the
    statistics of the training set.
    """
    root = Path(directory).expanduser()
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"

    def read(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        with open(root / name, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = torch.as_tensor(batch[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32)
        return data, torch.as_tensor(batch[b"labels"], dtype=torch.long)

    names = sorted(p.name for p in root.glob("data_batch_*"))
    if not names or not (root / "test_batch").exists():
        raise FileNotFoundError(f"{root} holds no cifar-10-batches-py data_batch_*/test_batch.")
    parts = [read(name) for name in names]
    x_train = torch.cat([p[0] for p in parts])
    y_train = torch.cat([p[1] for p in parts])
    if train_size:
        x_train, y_train = x_train[:train_size], y_train[:train_size]
    x_test, y_test = read("test_batch")
    x_train, x_test = x_train.float() / 255, x_test.float() / 255
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def train_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> DataLoader:
    """Shuffled batches indexed in one go (no per-sample collate: ~3x less Python per step)."""
    dataset = TensorDataset(x, y)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(
        dataset, sampler=BatchSampler(sampler, batch_size, drop_last=True), batch_size=None
    )


# ------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class RunSpec:
    """One training run (one Lightning fit)."""

    name: str
    optimizer: str  # "sgd" | "adamw"
    lr: float
    weight_decay: float
    momentum: float = 0.9  # SGD heavy-ball momentum, or AdamW beta1
    batch_size: int = 32
    steps: int = 800
    measure_steps: int = 480  # the equilibrium is measured over the last measure_steps steps
    label_noise: float = 0.2
    milestones: tuple[int, ...] = ()  # MultiStepLR milestones (steps), gamma below
    gamma: float = 0.1
    auto_decay: bool = False  # the callback decays the LR by 10x at equilibrium, with rescaling
    horizons: tuple[int, ...] = ()  # extra callbacks measuring angle(w_t, w_{t+h})
    channel_steps: int = 0  # record per-channel angles over the last channel_steps steps
    width: int = 16
    seed: int = 0

    @property
    def beta1(self) -> float:
        return self.momentum

    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        return torch.optim.AdamW(groups, lr=self.lr, betas=(self.momentum, 0.999))

    def prediction(self, lr: float | None = None) -> float:
        """The package's predicted equilibrium angular update for the invariant param group."""
        weight = nn.Parameter(torch.ones(2))
        optimizer = self.make_optimizer([{"params": [weight], "weight_decay": self.weight_decay}])
        optimizer.param_groups[0]["lr"] = self.lr if lr is None else lr
        value = equilibrium_angular_update(optimizer)[0]
        assert value is not None
        return value

    def time_scale(self, lr: float | None = None) -> float:
        """Relaxation time (steps): SGD ``(1 - alpha) / (4 eta lam)``; AdamW ``1 / (2 eta lam)``."""
        lr = self.lr if lr is None else lr
        if self.optimizer == "sgd":
            return relaxation_steps(lr, self.weight_decay, self.momentum)
        return 1.0 / (2.0 * lr * self.weight_decay)

    def formula(self) -> str:
        if self.optimizer == "sgd":
            return "sqrt(2 lr wd / (1 + momentum))"
        return "sqrt(2 lr wd (1 - beta1) / (1 + beta1))"


class BNConvNet(pl.LightningModule):
    """conv-BN-ReLU x3 (the digits demo's net, any input size) and a linear classifier.

    The three conv weights (no bias: BatchNorm follows) are scale-invariant per output channel.
    They form the param group with weight decay; the classifier and the BN affine parameters are
    not scale-invariant and get no weight decay, so the monitored group is exactly the one the
    theory speaks about.
    """

    def __init__(self, spec: RunSpec, in_channels: int, image_size: int) -> None:
        super().__init__()
        width = spec.width
        self.spec = spec
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        if image_size > 16:
            layers.append(nn.MaxPool2d(2))
        layers += [
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(2 * width, 10)
        self.noise = torch.Generator().manual_seed(spec.seed + 1)
        self.losses: list[float] = []

    def convs(self) -> dict[str, nn.Conv2d]:
        return {
            f"features.{name}.weight": module
            for name, module in self.features.named_children()
            if isinstance(module, nn.Conv2d)
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.spec.label_noise > 0:
            # Fresh random labels for a random 20% of every batch: the per-sample gradients never
            # vanish, so the gradient noise stays stationary once the model has fit the rest.
            flip = torch.rand(y.shape, generator=self.noise) < self.spec.label_noise
            y = torch.where(flip, torch.randint(0, 10, y.shape, generator=self.noise), y)
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        invariant = [conv.weight for conv in self.convs().values()]
        chosen = {id(p) for p in invariant}
        rest = [p for p in self.parameters() if id(p) not in chosen]
        optimizer = self.spec.make_optimizer(
            [
                {"params": invariant, "weight_decay": self.spec.weight_decay},
                {"params": rest, "weight_decay": 0.0},
            ]
        )
        if not self.spec.milestones:
            return optimizer
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, list(self.spec.milestones), self.spec.gamma
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class ChannelRecorder(pl.Callback):
    """Per-channel angle of every step over the last ``steps`` steps, with the public
    :func:`lightning_sdm.angular_update` (``dim=0``: one angle per output channel).

    Sums of squared angles are kept for the two halves of the recording separately, so that the
    sampling noise of a per-channel RMS can be told apart from a real spread between channels.
    """

    def __init__(self, modules: dict[str, nn.Module], start: int, steps: int) -> None:
        self.modules = modules
        self.start, self.middle = start, start + steps // 2
        self.prev: dict[str, torch.Tensor] | None = None
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.counts = [0, 0]

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if trainer.global_step >= self.start:
            self.prev = {n: m.weight.detach().clone() for n, m in self.modules.items()}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.prev is None:
            return
        half = int(trainer.global_step > self.middle)
        self.counts[half] += 1
        for name, module in self.modules.items():
            angles = angular_update(self.prev[name], module.weight.detach(), dim=0)
            sums = self.sums.setdefault(name, [torch.zeros_like(angles), torch.zeros_like(angles)])
            sums[half] += angles.square()
        self.prev = None


def run_one(spec: RunSpec, data: DataConfig) -> dict[str, Any]:
    """Train one run and return everything measured, as plain Python values."""
    with quiet(data.threads):
        return _run_one(spec, data)


def _run_one(spec: RunSpec, data: DataConfig) -> dict[str, Any]:
    pl.seed_everything(spec.seed, verbose=False)
    x_train, y_train, *_ = load_data(data)
    model = BNConvNet(spec, x_train.shape[1], x_train.shape[-1])
    main = SphericalDynamicsCallback(every_n_steps=EVERY, window=EVERY, prog_bar=False)
    callbacks: list[pl.Callback] = [main]
    decider = None
    if spec.auto_decay:
        # The decision uses longer windows than the measurement: the RMS of 16 steps scatters by
        # ~8% in equilibrium, and all three layers must be within 10% for 2 windows in a row.
        decider = SphericalDynamicsCallback(
            every_n_steps=AUTO_WINDOW,
            window=AUTO_WINDOW,
            patience=2,
            prog_bar=False,
            on_equilibrium=DecayLR(factor=spec.gamma, max_decays=1, rescale_weights=True),
        )
        callbacks.append(decider)
    convs = model.convs()
    horizon = {
        h: SphericalDynamicsCallback(
            params=list(convs.values()),
            every_n_steps=EVERY,
            window=EVERY,
            horizon=h,
            prog_bar=False,
        )
        for h in spec.horizons
    }
    callbacks += list(horizon.values())
    recorder = None
    channel = None
    if spec.channel_steps:
        start = spec.steps - spec.channel_steps
        recorder = ChannelRecorder(convs, start, spec.channel_steps)
        channel = SphericalDynamicsCallback(
            granularity="channel", every_n_steps=EVERY, window=EVERY, prog_bar=False
        )
        callbacks += [recorder, channel]
    trainer = pl.Trainer(
        max_steps=spec.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    cpu_started = time.process_time()
    trainer.fit(model, train_loader(x_train, y_train, spec.batch_size, spec.seed))
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    result: dict[str, Any] = {
        "name": spec.name,
        "spec": asdict(spec),
        "units": [unit.name for unit in (main.report.units if main.report else [])],
        "weight_decay_group": list(convs),
        "history": [_plain(entry) for entry in main.history],
        "events": [event.as_dict() for event in (decider or main).events],
        "losses": _block_means(model.losses, EVERY),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "horizon": {
            str(h): [
                {
                    "step": e.global_step,
                    "unit": e.unit,
                    "angular_update": e.angular_update,
                    "horizon_angular_update": e.horizon_angular_update,
                }
                for e in cb.history
            ]
            for h, cb in horizon.items()
        },
    }
    if recorder is not None and channel is not None:
        result["channel_history"] = [_plain(entry) for entry in channel.history]
        result["channel_rms"] = {
            name: {
                "rms": ((sums[0] + sums[1]) / sum(recorder.counts)).sqrt().tolist(),
                "first_half": (sums[0] / recorder.counts[0]).sqrt().tolist(),
                "second_half": (sums[1] / recorder.counts[1]).sqrt().tolist(),
                "steps": sum(recorder.counts),
            }
            for name, sums in recorder.sums.items()
        }
    return result


def adamw_update_balance(
    data: DataConfig, steps: int = 2400, measure: int = 1200, seed: int = 0
) -> dict[str, Any]:
    """Where the AdamW update of each conv layer goes, in the real network (diagnostic).

    A plain PyTorch loop (same network, data and label noise as the grid) with AdamW, lr 0.01,
    wd 0.5, beta1 = 0 (no momentum, so that the norm balance below is exact to first order). Per
    output channel, with ``d = w_{t+1} - (1 - lr wd) w_t`` (the Adam step without the decay), the
    norm is stationary when ``(2 lr wd - (lr wd)^2) |w|^2 = |d|^2 + 2 (1 - lr wd) <w, d>``, and the
    angle is ``|d_perp| / |w|`` to first order, so::

        ratio^2 = (1 - lr wd / 2) (1 - radial) / (1 + outward)

    with ``radial`` the share of ``|d|^2`` along ``w`` and
    ``outward = 2 (1 - lr wd) <w, d> / |d|^2`` (means over channels and steps, each term divided
    by ``|w|^2``). SGD's step is orthogonal to
    ``w`` (``<w, grad> = 0``): radial = outward = 0 and the prediction is exact. Adam divides each
    element by its own ``sqrt(v)``, which breaks the orthogonality. The angle itself is measured
    with :func:`lightning_sdm.angular_update` per channel.
    """
    with quiet(data.threads):
        return _adamw_update_balance(data, steps, measure, seed)


def _adamw_update_balance(data: DataConfig, steps: int, measure: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    x_train, y_train, *_ = load_data(data)
    spec = RunSpec("adamw_balance", "adamw", 1e-2, 0.5, 0.0, seed=seed)
    model = BNConvNet(spec, x_train.shape[1], x_train.shape[-1])
    optimizer = model.configure_optimizers()
    decay = spec.lr * spec.weight_decay
    convs = model.convs()
    sums = {name: torch.zeros(4, dtype=torch.float64) for name in convs}
    count = 0
    step = 0
    while step < steps:
        for batch in train_loader(x_train, y_train, spec.batch_size, seed + step):
            loss = model.training_step(batch, step)
            optimizer.zero_grad()
            loss.backward()
            prev = {name: conv.weight.detach().clone() for name, conv in convs.items()}
            optimizer.step()
            if step >= steps - measure:
                count += 1
                for name, conv in convs.items():
                    curr = conv.weight.detach()
                    w = prev[name].double().flatten(1)
                    d = curr.double().flatten(1) - (1 - decay) * w
                    w2 = w.square().sum(1)
                    dot = (d * w).sum(1)
                    angle2 = angular_update(prev[name], curr, dim=0).square()
                    sums[name] += torch.stack(
                        [
                            angle2.mean(),
                            (d.square().sum(1) / w2).mean(),
                            (dot.square() / w2 / w2).mean(),
                            (2 * (1 - decay) * dot / w2).mean(),
                        ]
                    )
            step += 1
            if step >= steps:
                break
    prediction = spec.prediction()
    fan_in = next(iter(convs.values())).weight[0].numel()
    synthetic = simulate_scale_invariant(
        lambda params: spec.make_optimizer([{"params": params, "weight_decay": spec.weight_decay}]),
        steps=measure,
        burn_in=steps - measure,
        rows=32,
        dim=fan_in,
        initial_norm=adamw_equilibrium_weight_norm(spec.lr, spec.weight_decay, fan_in),
        seed=seed,
    )
    layers = {}
    for name, conv in convs.items():
        angle2, d2, radial2, outward = (sums[name] / count).tolist()
        radial, drift = radial2 / d2, outward / d2
        layers[name] = {
            "fan_in": conv.weight[0].numel(),
            "measured_ratio": math.sqrt(angle2) / prediction,
            "radial_share": radial,
            "outward": drift,
            "balance_ratio": math.sqrt((1 - decay / 2) * (1 - radial) / (1 + drift)),
        }
    return {
        "lr": spec.lr,
        "weight_decay": spec.weight_decay,
        "beta1": 0.0,
        "steps": steps,
        "measure": measure,
        "prediction": prediction,
        "layers": layers,
        "synthetic_ratio": synthetic.rms_angular_update / prediction,
    }


def _plain(record: Any) -> dict[str, Any]:
    keys = ("unit", "angular_update", "theory", "ratio", "weight_norm", "lr")
    out = {"step": record.global_step, **{key: getattr(record, key) for key in keys}}
    out["in_equilibrium"] = bool(record.in_equilibrium)
    if record.channels:
        out["channels"] = dict(record.channels)
    return out


def _block_means(values: Sequence[float], size: int) -> list[float]:
    return [statistics.fmean(values[i : i + size]) for i in range(0, len(values), size)]


@contextlib.contextmanager
def quiet(threads: int) -> Iterator[None]:
    """Torch threads, and Lightning's and the callback's per-run messages kept out of the output.

    Everything is restored on exit (the tests run this in-process, next to other tests).
    """
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    previous_threads = torch.get_num_threads()
    with warnings.catch_warnings():
        for message in (
            ".*does not have many workers.*",
            ".*reached equilibrium.*",
            ".*of the units are in equilibrium.*",
            ".*LitLogger.*",
            ".*LeafSpec.*",
        ):
            warnings.filterwarnings("ignore", message=message)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous_threads)
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def run_all(specs: Sequence[RunSpec], data: DataConfig, jobs: int) -> dict[str, dict[str, Any]]:
    """Run every spec (``jobs`` processes); results by name, in the order given."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("run names must be unique")
    # Longest first, so that parallel workers finish together.
    order = sorted(specs, key=lambda s: -s.steps * (s.batch_size + 16) * s.width)
    results: dict[str, dict[str, Any]] = {}
    total = len(order)
    if jobs <= 1 or total == 1:
        for index, spec in enumerate(order, 1):
            results[spec.name] = run_one(spec, data)
            _progress(index, total, results[spec.name])
    else:
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {pool.submit(run_one, spec, data): spec for spec in order}
            for index, future in enumerate(_as_completed(futures), 1):
                result = future.result()
                results[result["name"]] = result
                _progress(index, total, result)
    return {name: results[name] for name in names}


def _as_completed(futures: Iterable[Any]) -> Iterable[Any]:
    from concurrent.futures import as_completed

    return as_completed(list(futures))


def _progress(index: int, total: int, result: dict[str, Any]) -> None:
    print(
        f"  [{index}/{total}] {result['name']}: {result['spec']['steps']} steps in "
        f"{result['seconds']:.1f} s",
        flush=True,
    )


# ------------------------------------------------------------------------------- the plan


def _round(steps: float) -> int:
    return max(EVERY, math.ceil(steps / EVERY) * EVERY)


@dataclass
class Plan:
    """The runs of every experiment, for the full or the quick version."""

    quick: bool
    sgd_grid: list[RunSpec] = field(default_factory=list)
    adamw_grid: list[RunSpec] = field(default_factory=list)
    nonstationary: list[RunSpec] = field(default_factory=list)
    decay: list[RunSpec] = field(default_factory=list)
    scaling: dict[float, list[RunSpec]] = field(default_factory=dict)  # momentum -> runs
    channel: list[RunSpec] = field(default_factory=list)
    long: list[RunSpec] = field(default_factory=list)  # grid settings run 16 relaxation times

    def specs(self) -> list[RunSpec]:
        scaling = [spec for runs in self.scaling.values() for spec in runs]
        return [
            *self.sgd_grid,
            *self.adamw_grid,
            *self.nonstationary,
            *self.decay,
            *scaling,
            *self.channel,
            *self.long,
        ]


def grid_spec(optimizer: str, lr: float, wd: float, momentum: float, **kw: Any) -> RunSpec:
    """A grid run: long enough to relax from initialization, then ``measure_steps`` measured."""
    spec = RunSpec(
        f"{optimizer}_lr{lr:g}_wd{wd:g}_m{momentum:g}", optimizer, lr, wd, momentum, **kw
    )
    # |w|^4 (SGD) / |w|^2 (AdamW) relaxes as exp(-t / tau); the conv weights start within a factor
    # ~3 of their equilibrium norm, so 6 (SGD) / 4 (AdamW) time constants leave < 1% of the gap.
    burn = (6 if optimizer == "sgd" else 4) * spec.time_scale()
    burn = min(max(burn, 320), 6400)
    return replace(spec, steps=_round(burn + spec.measure_steps))


def make_plan(quick: bool, experiments: Sequence[str], base: dict[str, Any]) -> Plan:
    plan = Plan(quick)
    if "equilibrium" in experiments:
        if quick:
            sgd = [(0.1, 1e-2, 0.9), (0.2, 1e-2, 0.9)]
            adamw = [(1e-2, 1.0, 0.9)]
        else:
            sgd = [
                (lr, wd, m)
                for m in (0.0, 0.9)
                for lr in (0.05, 0.1, 0.2)
                for wd in (5e-3, 1e-2, 2e-2)
            ]
            adamw = [
                (lr, wd, b1)
                for b1 in (0.0, 0.9)
                for lr in (2.5e-3, 5e-3, 1e-2)
                for wd in (0.2, 0.5, 1.0)
            ]
        measure = 240 if quick else 480
        plan.sgd_grid = [
            _sized(grid_spec("sgd", lr, wd, m, measure_steps=measure, **base), quick)
            for lr, wd, m in sgd
        ]
        plan.adamw_grid = [
            _sized(grid_spec("adamw", lr, wd, b1, measure_steps=measure, **base), quick)
            for lr, wd, b1 in adamw
        ]
        if not quick:
            # A colder setting (lr*wd = 1e-4) in which a net on clean labels fits its training set.
            clean = RunSpec(
                "nonstationary_clean_labels",
                "sgd",
                0.1,
                1e-3,
                0.9,
                steps=3200,
                measure_steps=1600,
                **{**base, "label_noise": 0.0},
            )
            noisy = replace(
                clean, name="nonstationary_reference_label_noise", label_noise=base["label_noise"]
            )
            plan.nonstationary = [clean, noisy]
            # The grid setting with the lowest SGD ratios, run for 16 relaxation times instead of
            # 6: is the deficit a slow approach, or a wrong equilibrium value?
            slow = grid_spec("sgd", 0.05, 2e-2, 0.0, measure_steps=480, **base)
            plan.long = [replace(slow, name=slow.name + "_long", steps=4000)]
    if "decay" in experiments:
        wd = 2e-2 if quick else 1e-2
        before, after = (160, 400) if quick else (480, 2400)
        sgd = RunSpec(
            "decay_sgd_multistep",
            "sgd",
            0.2,
            wd,
            0.9,
            steps=before + after,
            measure_steps=240,
            milestones=(before,),
            **base,
        )
        plan.decay = [
            sgd,
            replace(sgd, name="decay_sgd_auto_rescale", milestones=(), auto_decay=True),
        ]
        if not quick:
            adamw_before, adamw_after = 480, 3040
            plan.decay.append(
                RunSpec(
                    "decay_adamw_multistep",
                    "adamw",
                    1e-2,
                    1.0,
                    0.9,
                    steps=adamw_before + adamw_after,
                    measure_steps=480,
                    milestones=(adamw_before,),
                    **base,
                )
            )
    if "scaling" in experiments:
        batch = base.get("batch_size", 32)
        settings = [(0.9, 0.05, 2e-2)] if quick else [(0.9, 0.025, 1e-2), (0.0, 0.05, 1e-2)]
        measure = 128 if quick else 480
        for momentum, lr, wd in settings:
            runs = []
            for k in (1, 2, 4, 8):
                spec = RunSpec(
                    f"scaling_m{momentum:g}_k{k}",
                    "sgd",
                    lr * k,
                    wd,
                    momentum,
                    measure_steps=measure,
                    horizons=(2, 4, 8) if k == 1 else (),
                    **{**base, "batch_size": batch * k},
                )
                burn = max(6 * spec.time_scale(), 64 if quick else 160)
                runs.append(replace(spec, steps=_round(burn + measure)))
            plan.scaling[momentum] = runs
    if "channel" in experiments:
        record = 240 if quick else 960
        width = base.get("width", 16) if quick else 2 * base.get("width", 16)
        specs = (
            [("sgd", 0.1, 1e-2, 0.9)]
            if quick
            else [("sgd", 0.1, 1e-2, 0.9), ("adamw", 5e-3, 0.5, 0.9)]
        )
        for optimizer, lr, wd, momentum in specs:
            spec = RunSpec(
                f"channel_{optimizer}",
                optimizer,
                lr,
                wd,
                momentum,
                measure_steps=record,
                channel_steps=record,
                **{**base, "width": width},
            )
            burn = max((6 if optimizer == "sgd" else 4) * spec.time_scale(), 240)
            plan.channel.append(replace(spec, steps=_round(burn + record)))
    return plan


def _sized(spec: RunSpec, quick: bool) -> RunSpec:
    if not quick:
        return spec
    burn = max((6 if spec.optimizer == "sgd" else 4) * spec.time_scale(), 160)
    return replace(spec, steps=_round(burn + spec.measure_steps))


# ------------------------------------------------------------------------------- analysis


def unit_series(result: dict[str, Any], unit: str) -> list[dict[str, Any]]:
    return [entry for entry in result["history"] if entry["unit"] == unit]


def measured_equilibrium(
    result: dict[str, Any], last: int | None = None
) -> dict[str, dict[str, float]]:
    """Per unit, over the windows of the last ``last`` steps: RMS angle, prediction, ratio."""
    steps = result["spec"]["steps"]
    last = result["spec"]["measure_steps"] if last is None else last
    out = {}
    for unit in result["units"]:
        windows = [e for e in unit_series(result, unit) if e["step"] > steps - last]
        rms = math.sqrt(statistics.fmean(e["angular_update"] ** 2 for e in windows))
        theory = math.sqrt(statistics.fmean(e["theory"] ** 2 for e in windows))
        ratios = [e["ratio"] for e in windows]
        reached = next((e["step"] for e in unit_series(result, unit) if e["in_equilibrium"]), None)
        half = len(ratios) // 2
        out[unit] = {
            "measured": rms,
            "theory": theory,
            "ratio": rms / theory,
            # Still relaxing? RMS ratio of the second half of the windows minus the first half.
            "drift": _rms(ratios[half:]) - _rms(ratios[:half]) if half else 0.0,
            "window_ratio_min": min(ratios),
            "window_ratio_max": max(ratios),
            "window_ratio_std": statistics.pstdev(ratios),
            "in_equilibrium_fraction": statistics.fmean(
                float(e["in_equilibrium"]) for e in windows
            ),
            "first_equilibrium_step": reached,
            "weight_norm": windows[-1]["weight_norm"],
            "first_norm": unit_series(result, unit)[0]["weight_norm"],
        }
    return out


def _rms(values: Sequence[float]) -> float:
    return math.sqrt(statistics.fmean(v * v for v in values))


def final_loss(result: dict[str, Any], last: int) -> float:
    blocks = max(1, last // EVERY)
    return statistics.fmean(result["losses"][-blocks:])


def analyse_grid(
    results: dict[str, dict[str, Any]], specs: Sequence[RunSpec]
) -> list[dict[str, Any]]:
    rows = []
    for spec in specs:
        result = results[spec.name]
        layers = measured_equilibrium(result)
        ratios = [v["ratio"] for v in layers.values()]
        rows.append(
            {
                "name": spec.name,
                "optimizer": spec.optimizer,
                "lr": spec.lr,
                "weight_decay": spec.weight_decay,
                "momentum": spec.momentum,
                "intrinsic_lr": spec.lr * spec.weight_decay,
                "time_scale": spec.time_scale(),
                "steps": spec.steps,
                "prediction": spec.prediction(),
                "layers": layers,
                "mean_ratio": statistics.fmean(ratios),
                "max_abs_deviation": max(abs(r - 1) for r in ratios),
                "train_loss": final_loss(result, spec.measure_steps),
                "units": result["units"],
                "seconds": result["seconds"],
            }
        )
    return rows


def _window_stats(result: dict[str, Any], after: int) -> dict[str, dict[str, float]]:
    out = {}
    for unit in result["units"]:
        windows = [e for e in unit_series(result, unit) if e["step"] > after]
        ratios = [e["ratio"] for e in windows]
        norms = [e["weight_norm"] for e in windows]
        out[unit] = {
            "ratio_rms": math.sqrt(statistics.fmean(r * r for r in ratios)),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratio_std": statistics.pstdev(ratios),
            "outside_15pct": statistics.fmean(float(abs(r - 1) > 0.15) for r in ratios),
            "norm_min": min(norms),
            "norm_max": max(norms),
        }
    return out


def analyse_nonstationary(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    half = result["spec"]["steps"] // 2
    losses = result["losses"][half // EVERY :]
    reference_losses = reference["losses"][half // EVERY :]
    return {
        "name": result["name"],
        "reference": reference["name"],
        "layers": _window_stats(result, half),
        "reference_layers": _window_stats(reference, half),
        "loss_min": min(losses),
        "loss_max": max(losses),
        "loss_final": final_loss(result, 160),
        "reference_loss_min": min(reference_losses),
        "reference_loss_max": max(reference_losses),
    }


def _smoothed(values: Sequence[float], width: int = 3) -> list[float]:
    """RMS over a centred window of ``width`` values (ends: what is available)."""
    half = width // 2
    return [
        math.sqrt(statistics.fmean(v * v for v in values[max(0, i - half) : i + half + 1]))
        for i in range(len(values))
    ]


def _linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def relaxation_model(t: float, k: float, tau: float) -> float:
    """Angle / new prediction, ``t`` steps after an LR decay by ``k`` (derived, see the report).

    With a gradient scale that does not change, the angle is proportional to ``1/|w|^2`` (SGD) or
    ``1/|w|`` (AdamW), and ``|w|^4`` (SGD) / ``|w|^2`` (AdamW) relaxes exponentially with time
    constant ``tau`` from ``k`` times its new equilibrium value:
    ratio ``1/sqrt(1 + (k-1) e^(-t/tau))``.
    """
    return 1.0 / math.sqrt(1.0 + (k - 1.0) * math.exp(-t / tau))


def time_to_ratio(r: float, k: float, tau: float) -> float:
    """Inverse of :func:`relaxation_model`: steps until the ratio reaches ``r``."""
    return tau * math.log((k - 1.0) / (1.0 / (r * r) - 1.0))


def analyse_decay(result: dict[str, Any]) -> dict[str, Any]:
    spec = RunSpec(**{**result["spec"], "milestones": tuple(result["spec"]["milestones"])})
    if spec.milestones:
        decay_step = spec.milestones[0]
    elif result["events"] and result["events"][0]["new_lrs"]:
        decay_step = result["events"][0]["global_step"]
    else:
        return {"name": result["name"], "decay_step": None}
    k = 1.0 / spec.gamma
    lr_new = spec.lr * spec.gamma
    tau = spec.time_scale(lr_new)
    out: dict[str, Any] = {
        "name": result["name"],
        "optimizer": spec.optimizer,
        "decay_step": decay_step,
        "k": k,
        "lr_before": spec.lr,
        "lr_after": lr_new,
        "weight_decay": spec.weight_decay,
        "momentum": spec.momentum,
        "tau": tau,
        "prediction_before": spec.prediction(),
        "prediction_after": spec.prediction(lr_new),
        "predicted_t90": time_to_ratio(0.9, k, tau),
        "predicted_t95": time_to_ratio(0.95, k, tau),
        "steps_after": spec.steps - decay_step,
        "rescaled": spec.auto_decay,
        "layers": {},
    }
    # The callback's cooldown after a decay (and its detector's relaxation) use SMD Cor. 3.1 with
    # the group's momentum, 0 for optimizers without one (AdamW).
    momentum = spec.momentum if spec.optimizer == "sgd" else 0.0
    out["cooldown"] = lr_decay_relaxation_steps(k, lr_new, spec.weight_decay, momentum)
    blocks = decay_step // EVERY
    out["loss_before"] = statistics.fmean(result["losses"][max(0, blocks - 10) : blocks])
    out["loss_after"] = final_loss(result, spec.measure_steps)
    if spec.optimizer == "sgd":
        out["smd_steps"] = lr_decay_relaxation_steps(k, lr_new, spec.weight_decay, spec.momentum)
        out["smd_steps_with_old_lr"] = lr_decay_relaxation_steps(
            k, spec.lr, spec.weight_decay, spec.momentum
        )
    for unit in result["units"]:
        series = unit_series(result, unit)
        before = [e for e in series if decay_step - 160 < e["step"] <= decay_step]
        after = [e for e in series if e["step"] > decay_step]
        pre_rms = math.sqrt(statistics.fmean(e["angular_update"] ** 2 for e in before))
        first = after[0]
        t = [e["step"] - decay_step for e in after]
        ratios = [e["angular_update"] / out["prediction_after"] for e in after]
        smooth = _smoothed(ratios)
        t90 = next((ti for ti, r in zip(t, smooth, strict=True) if r >= 0.9), None)
        t95 = next((ti for ti, r in zip(t, smooth, strict=True) if r >= 0.95), None)
        # ln(1/r^2 - 1) = ln(k - 1) - t / tau: fit on the way up (before the smoothed ratio
        # first reaches 0.9) and where the ratio is clearly below 1 (near 1 the log is all noise).
        points = [
            (ti, math.log(1 / r**2 - 1))
            for ti, r in zip(t, ratios, strict=True)
            if 0 < r < 0.85 and (t90 is None or ti <= t90)
        ]
        fit_tau = fit_intercept = None
        if len(points) >= 3:
            slope, intercept = _linear_fit([p[0] for p in points], [p[1] for p in points])
            if slope < 0:
                fit_tau, fit_intercept = -1.0 / slope, intercept
        tail = [e for e in after if e["step"] > spec.steps - spec.measure_steps]
        final = math.sqrt(statistics.fmean(e["angular_update"] ** 2 for e in tail))
        early = [e["angular_update"] for e in after[:3]]
        at_cooldown = next(
            (r for ti, r in zip(t, smooth, strict=True) if ti >= out["cooldown"]), math.nan
        )
        window = [(r, ti) for ti, r in zip(t, smooth, strict=True) if ti <= 4 * tau]
        dip, dip_t = min(window) if window else (math.nan, 0)
        out["layers"][unit] = {
            "early_ratio": _rms(early) / out["prediction_after"],
            "ratio_at_cooldown": at_cooldown,
            "dip": dip,
            "dip_step": dip_t,
            "ratio_before": pre_rms / out["prediction_before"],
            "first_ratio": first["angular_update"] / out["prediction_after"],
            "drop": pre_rms / first["angular_update"],
            "t90": t90,
            "t95": t95,
            "fit_tau": fit_tau,
            "fit_intercept": fit_intercept,
            "fit_points": len(points),
            "final_ratio": final / out["prediction_after"],
            "t": t,
            "ratios": ratios,
            "norm_before": before[-1]["weight_norm"],
            "norm_after": after[-1]["weight_norm"],
        }
    return out


def analyse_scaling(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    base = runs[0]
    ks = [r["spec"]["batch_size"] // base["spec"]["batch_size"] for r in runs]
    per_k = {k: measured_equilibrium(r) for k, r in zip(ks, runs, strict=True)}
    units = base["units"]
    out: dict[str, Any] = {
        "momentum": base["spec"]["momentum"],
        "base_lr": base["spec"]["lr"],
        "base_batch": base["spec"]["batch_size"],
        "weight_decay": base["spec"]["weight_decay"],
        "ks": ks,
        "steps": [r["spec"]["steps"] for r in runs],
        "layers": {},
    }
    alpha = out["momentum"]
    for unit in units:
        angles = [per_k[k][unit]["measured"] for k in ks]
        slope, _ = _linear_fit([math.log(k) for k in ks], [math.log(a) for a in angles])
        horizon = {}
        for h in (2, 4, 8):
            entries = base["horizon"].get(str(h), [])
            last = base["spec"]["steps"] - base["spec"]["measure_steps"]
            values = [e for e in entries if e["unit"] == unit and e["step"] > last]
            if not values or h not in ks:
                continue
            multi = math.sqrt(statistics.fmean(e["horizon_angular_update"] ** 2 for e in values))
            single_b = math.sqrt(statistics.fmean(e["angular_update"] ** 2 for e in values))
            single_kb = per_k[h][unit]["measured"]
            horizon[h] = {
                "k_step_angle": multi,
                "one_step_angle_B": single_b,
                "one_step_angle_kB": single_kb,
                "ratio": multi / single_kb,
                "growth": multi / single_b,
                "random_walk_growth": random_walk_growth(h, alpha),
                "sqrt_k": math.sqrt(h),
            }
        out["layers"][unit] = {
            "angles": angles,
            "predictions": [per_k[k][unit]["theory"] for k in ks],
            "ratios": [per_k[k][unit]["ratio"] for k in ks],
            "exponent": slope,
            "horizon": horizon,
        }
    return out


def random_walk_growth(k: int, momentum: float, history: int = 4000) -> float:
    """``angle(w_t, w_{t+k}) / angle(w_t, w_{t+1})`` for independent gradients (derived).

    Heavy-ball updates ``u_t = sum_j alpha^j g_{t-j}`` of white-noise gradients: the ratio of the
    standard deviations of ``sum_{t=1..k} u_t`` and ``u_1`` (small angles, constant norm). It is
    ``sqrt(k)`` for ``alpha = 0`` (a random walk) and approaches ``k`` when ``k << 1/(1-alpha)``.
    """
    a = momentum
    past = (
        sum((a ** (1 - s) * (1 - a**k) / (1 - a)) ** 2 for s in range(0, -history, -1))
        if a
        else 0.0
    )
    inside = sum(((1 - a ** (k - s + 1)) / (1 - a)) ** 2 for s in range(1, k + 1))
    return math.sqrt((past + inside) * (1 - a * a))


def analyse_channels(result: dict[str, Any]) -> dict[str, Any]:
    spec = RunSpec(**{**result["spec"], "milestones": tuple(result["spec"]["milestones"])})
    prediction = spec.prediction()
    out: dict[str, Any] = {
        "name": result["name"],
        "optimizer": spec.optimizer,
        "prediction": prediction,
        "steps": spec.channel_steps,
        "layers": {},
    }
    last = spec.steps - spec.channel_steps
    for unit, data in result["channel_rms"].items():
        ratios = [v / prediction for v in data["rms"]]
        first = [v / prediction for v in data["first_half"]]
        second = [v / prediction for v in data["second_half"]]
        spread = statistics.pstdev(ratios)
        noise = statistics.pstdev([a - b for a, b in zip(first, second, strict=True)]) / 2
        quantiles = statistics.quantiles(ratios, n=10)
        windows = [e for e in result["channel_history"] if e["unit"] == unit and e["step"] > last]
        callback = {
            key: statistics.fmean(e["channels"][key] for e in windows) / prediction
            for key in ("p10", "median", "p90")
        }
        out["layers"][unit] = {
            "channels": len(ratios),
            "ratios": ratios,
            "mean": statistics.fmean(ratios),
            "median": statistics.median(ratios),
            "p10": quantiles[0],
            "p90": quantiles[-1],
            "min": min(ratios),
            "max": max(ratios),
            "std": spread,
            "sampling_noise": noise,
            "intrinsic_std": math.sqrt(max(0.0, spread**2 - noise**2)),
            "within_10pct": statistics.fmean(float(abs(r - 1) <= 0.1) for r in ratios),
            "within_20pct": statistics.fmean(float(abs(r - 1) <= 0.2) for r in ratios),
            "layer_ratio": measured_equilibrium(result, spec.channel_steps)[unit]["ratio"],
            "callback_window_ratio": callback,
        }
    return out


# -------------------------------------------------------------------------------- figures


def _short(unit: str) -> str:
    return "conv" + unit.split(".")[1]


def _figure(path: Path, fig: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def figure_grid(rows: Sequence[dict[str, Any]], path: Path) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    markers = {0: "o", 1: "s", 2: "^"}
    ratio_ax = axes[2]
    for offset, optimizer in enumerate(("sgd", "adamw")):
        chosen = [r for r in rows if r["optimizer"] == optimizer]
        values = sorted({r["momentum"] for r in chosen})
        name = "SGD momentum" if optimizer == "sgd" else "AdamW beta1"
        for position, value in enumerate(values):
            color = f"C{2 * offset + position}"
            ratio_ax.scatter([], [], c=color, label=f"{name} {value:g}")
            for row in chosen:
                if row["momentum"] != value:
                    continue
                for index, layer in enumerate(row["layers"].values()):
                    ratio_ax.scatter(
                        row["intrinsic_lr"] * (1.04 if offset else 0.96),
                        layer["ratio"],
                        c=color,
                        marker=markers.get(index, "o"),
                        s=18,
                        zorder=3,
                    )
    ratio_ax.axhline(1, color="k", lw=1)
    ratio_ax.axhspan(0.95, 1.05, color="0.9")
    ratio_ax.set_xscale("log")
    ratio_ax.set_xlabel("lr * wd")
    ratio_ax.set_ylabel("measured / predicted (grey: ±5%)")
    ratio_ax.set_title("ratio per layer (o conv1, square conv2, triangle conv3)")
    ratio_ax.legend(fontsize=7, loc="lower left")
    for ax, optimizer in zip(axes[:2], ("sgd", "adamw"), strict=True):
        chosen = [r for r in rows if r["optimizer"] == optimizer]
        if not chosen:
            ax.set_visible(False)
            continue
        values = sorted({r["momentum"] for r in chosen})
        for row in chosen:
            color = "C0" if row["momentum"] == values[0] else "C3"
            for index, layer in enumerate(row["layers"].values()):
                ax.scatter(
                    row["prediction"],
                    layer["measured"],
                    c=color,
                    marker=markers.get(index, "o"),
                    s=22,
                    zorder=3,
                )
        low = min(r["prediction"] for r in chosen) * 0.7
        high = max(r["prediction"] for r in chosen) * 1.4
        line = [low, high]
        ax.plot(line, line, "k-", lw=1, label="measured = predicted")
        ax.fill_between(
            line, [0.9 * v for v in line], [1.1 * v for v in line], color="0.85", label="±10%"
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        name = "momentum" if optimizer == "sgd" else "beta1"
        for value, color in zip(values, ("C0", "C3"), strict=False):
            ax.scatter([], [], c=color, label=f"{name} = {value:g}")
        for index in range(3):
            ax.scatter([], [], c="0.4", marker=markers[index], label=f"conv layer {index + 1}")
        ax.set_xlabel("predicted equilibrium angular update (rad/step)")
        ax.set_ylabel("measured RMS angular update (rad/step)")
        ax.set_title(
            f"{'SGD' if optimizer == 'sgd' else 'AdamW'}: {len(chosen)} settings x 3 layers"
        )
        ax.legend(fontsize=7, loc="upper left")
    return _figure(path, fig)


def figure_nonstationary(stationary: dict[str, Any], moving: dict[str, Any], path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, style in ((stationary, "--"), (moving, "-")):
        label = (
            "label noise 20% (stationary)"
            if run["spec"]["label_noise"]
            else "clean labels (loss -> 0)"
        )
        for index, unit in enumerate(run["units"]):
            series = unit_series(run, unit)
            axes[0].plot(
                [e["step"] for e in series],
                [e["ratio"] for e in series],
                style,
                color=f"C{index}",
                lw=1,
                label=f"{_short(unit)}, {label}",
            )
        axes[1].semilogy(
            [EVERY * (i + 1) for i in range(len(run["losses"]))],
            run["losses"],
            style,
            color="k",
            lw=1,
            label=label,
        )
    axes[0].axhline(1, color="k", lw=0.8)
    axes[0].axhspan(0.85, 1.15, color="0.9")
    axes[0].set_ylim(0, 3)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("measured / predicted angular update")
    spec = moving["spec"]
    axes[0].set_title(
        f"SGD lr {spec['lr']:g}, wd {spec['weight_decay']:g}, momentum {spec['momentum']:g}"
    )
    axes[0].legend(fontsize=6)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss (per 16 steps)")
    axes[1].legend(fontsize=7)
    return _figure(path, fig)


def figure_decay(decays: Sequence[dict[str, Any]], path: Path) -> str:
    import matplotlib.pyplot as plt

    chosen = [d for d in decays if d.get("decay_step") is not None]
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 3.6), squeeze=False)
    for ax, decay in zip(axes[0], chosen, strict=True):
        end = 0
        for index, (unit, layer) in enumerate(decay["layers"].items()):
            ax.plot(layer["t"], layer["ratios"], color=f"C{index}", lw=1, label=_short(unit))
            end = max(end, layer["t"][-1])
        ts = list(range(0, end + 1, 4))
        if not decay["rescaled"]:
            ax.plot(
                ts,
                [relaxation_model(t, decay["k"], decay["tau"]) for t in ts],
                "k--",
                lw=1.2,
                label=f"model, tau = {decay['tau']:.0f}",
            )
        ax.axhline(1, color="k", lw=0.8)
        if "smd_steps" in decay and not decay["rescaled"]:
            ax.axvline(
                decay["smd_steps"], color="0.5", ls=":", label=f"SMD Cor. 3.1: {decay['smd_steps']}"
            )
        title = {
            "decay_sgd_multistep": "SGD, MultiStepLR /10",
            "decay_sgd_auto_rescale": "SGD, callback decay_lr + rescale",
            "decay_adamw_multistep": "AdamW, MultiStepLR /10",
        }
        ax.set_title(title.get(decay["name"], decay["name"]), fontsize=10)
        ax.set_xlabel("steps after the decay")
        ax.set_ylabel("angular update / new prediction")
        ax.set_ylim(0, 1.3)
        ax.legend(fontsize=7, loc="lower right")
    return _figure(path, fig)


def figure_scaling(scaling: Sequence[dict[str, Any]], path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, color in zip(scaling, ("C3", "C0"), strict=False):
        ks = run["ks"]
        for index, (unit, layer) in enumerate(run["layers"].items()):
            axes[0].loglog(
                ks,
                layer["angles"],
                marker="os^"[index % 3],
                color=color,
                lw=0.8,
                label=f"momentum {run['momentum']:g}, {_short(unit)}" if True else None,
            )
            hs = sorted(layer["horizon"], key=int)
            axes[1].plot(
                [int(h) for h in hs],
                [layer["horizon"][h]["ratio"] for h in hs],
                marker="os^"[index % 3],
                color=color,
                lw=0.8,
                label=f"momentum {run['momentum']:g}, {_short(unit)}",
            )
        axes[0].loglog(
            ks,
            [run["layers"][run_units(run)[0]]["predictions"][i] for i in range(len(ks))],
            "--",
            lw=1,
            color=color,
        )
        hs = [2, 4, 8]
        axes[1].plot(
            hs,
            [random_walk_growth(h, run["momentum"]) / math.sqrt(h) for h in hs],
            ":",
            color=color,
            lw=1.5,
            label=f"independent-gradient model, momentum {run['momentum']:g}",
        )
    hs = [2, 4, 8]
    axes[1].plot(hs, [math.sqrt(h) for h in hs], "k-", lw=1, label="sqrt(k) (angles add)")
    axes[1].plot(hs, [1, 1, 1], "k--", lw=1, label="1 (pure random walk)")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axes[0].set_xticks([1, 2, 4, 8])
    axes[0].xaxis.set_major_formatter(ScalarFormatter())
    axes[0].xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_xlabel("k (batch k*B, lr k*eta)")
    axes[0].set_ylabel("equilibrium RMS angle per step")
    axes[0].set_title("per-step angle vs k (dashed: prediction)")
    axes[0].legend(fontsize=6)
    axes[1].set_xlabel("k")
    axes[1].set_ylabel("angle(w_t, w_t+k) at B / one step at kB")
    axes[1].set_title("k steps at batch B vs one step at k*B")
    axes[1].legend(fontsize=6, loc="upper left")
    return _figure(path, fig)


def run_units(run: dict[str, Any]) -> list[str]:
    return list(run["layers"])


def figure_channels(channels: Sequence[dict[str, Any]], path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(channels), figsize=(5 * len(channels), 3.6), squeeze=False)
    for ax, run in zip(axes[0], channels, strict=True):
        bins = [0.7 + 0.01 * i for i in range(61)]
        for index, (unit, layer) in enumerate(run["layers"].items()):
            ax.hist(
                [min(max(r, 0.7), 1.3) for r in layer["ratios"]],
                bins=bins,
                histtype="step",
                lw=1.5,
                color=f"C{index}",
                label=f"{_short(unit)} ({layer['channels']} channels)",
            )
        ax.axvline(1, color="k", lw=1)
        ax.set_xlabel("per-channel RMS angular update / prediction")
        ax.set_ylabel("channels")
        ax.set_title(
            f"{'SGD' if run['optimizer'] == 'sgd' else 'AdamW'}, {run['steps']} steps per channel"
        )
        ax.legend(fontsize=7)
    return _figure(path, fig)


# --------------------------------------------------------------------------------- report


def _f(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report_grid(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    units = rows[0]["units"]
    mom = "momentum" if rows[0]["optimizer"] == "sgd" else "beta1"
    header = [
        "lr",
        "wd",
        mom,
        "lr*wd",
        "tau",
        "steps",
        "predicted",
        *[f"{_short(u)} ratio" for u in units],
        "drift",
        "in eq.",
        "first eq. step",
        "loss",
    ]
    body = []
    for row in rows:
        layers = row["layers"]
        body.append(
            [
                _f(row["lr"]),
                _f(row["weight_decay"]),
                _f(row["momentum"]),
                f"{row['intrinsic_lr']:.2g}",
                f"{row['time_scale']:.0f}",
                row["steps"],
                f"{row['prediction']:.4f}",
                *[
                    f"**{layers[u]['ratio']:.3f}**"
                    if abs(layers[u]["ratio"] - 1) > 0.1
                    else f"{layers[u]['ratio']:.3f}"
                    for u in units
                ],
                f"{statistics.fmean(layers[u]['drift'] for u in units):+.3f}",
                f"{statistics.fmean(layers[u]['in_equilibrium_fraction'] for u in units):.0%}",
                ", ".join(str(layers[u]["first_equilibrium_step"] or "-") for u in units),
                f"{row['train_loss']:.2f}",
            ]
        )
    return _table(header, body)


def summary_stats(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    ratios = [layer["ratio"] for row in rows for layer in row["layers"].values()]
    if not ratios:
        return {}
    return {
        "count": len(ratios),
        "mean": statistics.fmean(ratios),
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "within_5pct": statistics.fmean(float(abs(r - 1) <= 0.05) for r in ratios),
        "within_10pct": statistics.fmean(float(abs(r - 1) <= 0.1) for r in ratios),
        "within_15pct": statistics.fmean(float(abs(r - 1) <= 0.15) for r in ratios),
    }


def write_report(
    out: Path,
    results: dict[str, dict[str, Any]],
    plan: Plan,
    args: argparse.Namespace,
    data: DataConfig,
    elapsed: float,
    diagnostics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    figures = out / "figures"
    analysis: dict[str, Any] = {"quick": plan.quick, "dataset": data.name}
    parts: list[str] = []
    version = "quick" if plan.quick else "full"
    cpu = sum(r["cpu_seconds"] for r in results.values())
    steps = sum(r["spec"]["steps"] for r in results.values())
    command = "python examples/reproduce_paper.py" + (" --quick" if plan.quick else "")
    command += f" --out {args.out}" + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
    if data.cifar_dir:
        command += f" --cifar-dir {data.cifar_dir}"
    machine = platform.processor() or platform.machine()
    products = [s.lr * s.weight_decay for s in plan.sgd_grid + plan.adamw_grid]
    noisy_losses = [
        final_loss(r, r["spec"]["measure_steps"])
        for r in results.values()
        if r["spec"]["label_noise"] > 0
    ]
    parts.append(
        f"# Reproducing Spherical Motion Dynamics with lightning_sdm\n\n"
        f"Generated by `{command}` ({version} version) on {data.name}: {len(results)} Lightning "
        f"runs, {steps} optimizer steps, {elapsed / 60:.1f} min wall clock, {cpu / 60:.1f} "
        f"CPU-minutes in training ({args.jobs} process(es), {data.threads} torch thread(s) each; "
        f"{machine}, torch {torch.__version__}, lightning {pl.__version__}).\n\n"
        + SETUP_TEXT.format(
            grid_range=f"{min(products):.2g} to {max(products):.2g}" if products else "-",
            n_train=len(load_data(data)[1]),
            loss_range=_range(noisy_losses) if noisy_losses else "-",
        )
    )
    if plan.sgd_grid or plan.adamw_grid:
        sgd = analyse_grid(results, plan.sgd_grid)
        adamw = analyse_grid(results, plan.adamw_grid)
        analysis["sgd_grid"], analysis["adamw_grid"] = sgd, adamw
        analysis["sgd_summary"], analysis["adamw_summary"] = (
            summary_stats(sgd),
            summary_stats(adamw),
        )
        figure = figure_grid(sgd + adamw, figures / "equilibrium_grid.png")
        measure = (plan.sgd_grid or plan.adamw_grid)[0].measure_steps
        parts.append(
            "## 1. Equilibrium angular update: measured vs predicted\n\n"
            + GRID_TEXT.format(
                measure=measure, windows=measure // EVERY, minimum=160 if plan.quick else 320
            )
        )
        for label, rows, summary in (
            ("SGD", sgd, analysis["sgd_summary"]),
            ("AdamW", adamw, analysis["adamw_summary"]),
        ):
            if not rows:
                continue
            parts.append(
                f"### {label}\n\n"
                f"Prediction: `{RunSpec('x', rows[0]['optimizer'], 1, 1).formula()}`. "
                f"Ratio = measured RMS over the last {measure} "
                f"steps / prediction, per conv layer (bold: off by more than 10%).\n\n"
                + report_grid(rows)
                + f"\n\nAll {summary['count']} layer ratios: mean {summary['mean']:.3f}, median "
                f"{summary['median']:.3f}, range {summary['min']:.3f} to {summary['max']:.3f}; "
                f"{summary['within_5pct']:.0%} within 5%, "
                f"{summary['within_10pct']:.0%} within 10%, "
                f"{summary['within_15pct']:.0%} within 15%.\n"
            )
        parts.append(f"![equilibrium grid](figures/{figure})\n")
        if plan.long:
            analysis["long"] = [
                analyse_long(results[spec.name], results.get(spec.name.removesuffix("_long")))
                for spec in plan.long
            ]
            parts.append(report_long(analysis["long"]))
        balance = (diagnostics or {}).get("adamw_balance")
        if balance:
            analysis["adamw_balance"] = balance
            parts.append(report_balance(balance))
    if plan.nonstationary:
        moving = results[plan.nonstationary[0].name]
        reference = results[plan.nonstationary[1].name]
        ns = analyse_nonstationary(moving, reference)
        analysis["nonstationary"] = ns
        figure = figure_nonstationary(reference, moving, figures / "nonstationary.png")
        rows = []
        for unit, layer in ns["layers"].items():
            ref = ns["reference_layers"][unit]
            rows.append(
                [
                    _short(unit),
                    f"{layer['ratio_rms']:.2f}",
                    f"{layer['ratio_min']:.2f} to {layer['ratio_max']:.2f}",
                    f"{layer['ratio_std']:.3f}",
                    f"{layer['outside_15pct']:.0%}",
                    f"{layer['norm_min']:.2f} to {layer['norm_max']:.2f}",
                    f"{ref['ratio_rms']:.2f}",
                    f"{ref['ratio_min']:.2f} to {ref['ratio_max']:.2f}",
                    f"{ref['ratio_std']:.3f}",
                    f"{ref['outside_15pct']:.0%}",
                    f"{ref['norm_min']:.2f} to {ref['norm_max']:.2f}",
                ]
            )
        sp = plan.nonstationary[0]
        parts.append(
            "### Non-stationary regime: clean labels, the training loss goes to zero\n\n"
            f"Two runs identical but for the labels: SGD lr {sp.lr:g}, wd {sp.weight_decay:g}, "
            f"momentum {sp.momentum:g} (prediction {sp.prediction():.4f} rad/step, tau "
            f"{sp.time_scale():.0f} steps), {sp.steps} steps, clean labels vs 20% label noise. "
            f"Statistics of the {EVERY}-step windows over the second half of each run. "
            f"Training loss there: clean {ns['loss_min']:.2g} to "
            f"{ns['loss_max']:.2g} (last 160 steps {ns['loss_final']:.2g}); label noise "
            f"{ns['reference_loss_min']:.2f} to {ns['reference_loss_max']:.2f}.\n\n"
            + _table(
                [
                    "layer",
                    "clean: RMS ratio",
                    "window ratio range",
                    "std",
                    "windows off >15%",
                    "weight norm",
                    "noisy: RMS ratio",
                    "range",
                    "std",
                    "off >15%",
                    "weight norm",
                ],
                rows,
            )
            + "\n\n"
            + NONSTATIONARY_TEXT
            + f"\n![non-stationary](figures/{figure})\n"
        )
    if plan.decay:
        decays = [analyse_decay(results[spec.name]) for spec in plan.decay]
        analysis["decay"] = decays
        figure = figure_decay(decays, figures / "lr_decay.png")
        rows = []
        for d in decays:
            if d.get("decay_step") is None:
                rows.append([d["name"], "no decay happened", *["-"] * 11])
                continue
            for unit, layer in d["layers"].items():
                rows.append(
                    [
                        d["name"],
                        _short(unit),
                        d["decay_step"],
                        f"{layer['ratio_before']:.3f}",
                        f"{layer['drop']:.1f}",
                        f"{layer['first_ratio']:.3f} / {layer['early_ratio']:.3f}",
                        "-" if d["rescaled"] else f"{d['tau']:.0f} / {_f(layer['fit_tau'])}",
                        "-" if d["rescaled"] else f"{d['predicted_t90']:.0f} / {_f(layer['t90'])}",
                        "-" if d["rescaled"] else f"{d['predicted_t95']:.0f} / {_f(layer['t95'])}",
                        "-" if d["rescaled"] else f"{d.get('smd_steps', '-')} / {d['cooldown']}",
                        f"{layer['final_ratio']:.3f}",
                        f"{d['loss_before']:.2f} / {d['loss_after']:.2f}",
                    ]
                )
        parts.append(
            "## 2. Learning-rate decay by 10x\n\n"
            + DECAY_TEXT
            + "\n\n"
            + _table(
                [
                    "run",
                    "layer",
                    "decay at step",
                    "ratio before",
                    "drop (x)",
                    "ratio: first window / first 3",
                    "tau: theory / fit",
                    "t90: model / measured",
                    "t95: model / measured",
                    "SMD Cor. 3.1 / callback cooldown",
                    "final ratio",
                    "loss before / after",
                ],
                rows,
            )
            + f"\n\n![lr decay](figures/{figure})\n"
        )
    if plan.scaling:
        scaling = [
            analyse_scaling([results[s.name] for s in runs]) for runs in plan.scaling.values()
        ]
        analysis["scaling"] = scaling
        figure = figure_scaling(scaling, figures / "linear_scaling.png")
        rows, hrows = [], []
        for run in scaling:
            for unit, layer in run["layers"].items():
                rows.append(
                    [
                        f"{run['momentum']:g}",
                        _short(unit),
                        *[
                            f"{a:.4f} ({r:.2f})"
                            for a, r in zip(layer["angles"], layer["ratios"], strict=True)
                        ],
                        f"{layer['exponent']:.3f}",
                    ]
                )
                for h, v in sorted(layer["horizon"].items()):
                    hrows.append(
                        [
                            f"{run['momentum']:g}",
                            _short(unit),
                            h,
                            f"{v['k_step_angle']:.4f}",
                            f"{v['one_step_angle_B']:.4f}",
                            f"{v['one_step_angle_kB']:.4f}",
                            f"{v['ratio']:.2f}",
                            f"{v['sqrt_k']:.2f}",
                            f"{v['random_walk_growth'] / v['sqrt_k']:.2f}",
                            f"{v['growth']:.2f}",
                        ]
                    )
        ks = scaling[0]["ks"]
        base = scaling[0]
        parts.append(
            "## 3. Linear scaling: batch k*B with lr k*eta\n\n"
            + SCALING_TEXT.format(
                B=base["base_batch"],
                measure=next(iter(plan.scaling.values()))[0].measure_steps,
                burn=64 if plan.quick else 160,
            )
            + "\n\n"
            + _table(
                ["momentum", "layer", *[f"k={k}: angle (ratio)" for k in ks], "exponent (fit)"],
                rows,
            )
            + "\n\n"
            + HORIZON_TEXT
            + "\n\n"
            + _table(
                [
                    "momentum",
                    "layer",
                    "k",
                    "angle(w_t, w_t+k) at B",
                    "1 step at B",
                    "1 step at kB",
                    "ratio",
                    "sqrt(k)",
                    "independent-gradient model",
                    "k-step / 1-step at B",
                ],
                hrows,
            )
            + f"\n\n![linear scaling](figures/{figure})\n"
        )
    if plan.channel:
        channels = [analyse_channels(results[spec.name]) for spec in plan.channel]
        analysis["channel"] = channels
        figure = figure_channels(channels, figures / "per_channel.png")
        rows = []
        for run in channels:
            for unit, layer in run["layers"].items():
                cb = layer["callback_window_ratio"]
                rows.append(
                    [
                        run["optimizer"],
                        _short(unit),
                        layer["channels"],
                        f"{layer['median']:.3f}",
                        f"{layer['p10']:.3f} to {layer['p90']:.3f}",
                        f"{layer['min']:.2f} to {layer['max']:.2f}",
                        f"{layer['std']:.3f}",
                        f"{layer['sampling_noise']:.3f}",
                        f"{layer['intrinsic_std']:.3f}",
                        f"{layer['within_10pct']:.0%}",
                        f"{layer['layer_ratio']:.3f}",
                        f"{cb['p10']:.2f} / {cb['median']:.2f} / {cb['p90']:.2f}",
                    ]
                )
        parts.append(
            "## 4. Per-channel angular updates (Rotational Equilibrium)\n\n"
            + CHANNEL_TEXT.format(steps=channels[0]["steps"])
            + "\n\n"
            + _table(
                [
                    "optimizer",
                    "layer",
                    "channels",
                    "median",
                    "p10 to p90",
                    "min to max",
                    "std",
                    "sampling noise",
                    "intrinsic std",
                    "within 10%",
                    "layer ratio",
                    f"callback ({EVERY}-step windows) p10 / median / p90",
                ],
                rows,
            )
            + f"\n\n![per channel](figures/{figure})\n"
        )
    parts.append(discussion(analysis))
    runtime_rows = [
        [
            name,
            r["spec"]["steps"],
            r["spec"]["batch_size"],
            r["spec"]["width"],
            f"{r['seconds']:.1f}",
            f"{r['cpu_seconds']:.1f}",
            f"{final_loss(r, r['spec']['measure_steps']):.3f}",
        ]
        for name, r in results.items()
    ]
    parts.append(
        "## Runs\n\nEvery run: wall-clock and CPU seconds of its `fit` (with --jobs > 1 runs "
        "overlap; the machine was shared, so wall clock exceeds CPU time), and its training loss "
        "over the measured steps (on the labels it trained on, noisy or clean).\n\n"
        + _table(["run", "steps", "batch", "width", "wall s", "CPU s", "loss"], runtime_rows)
        + "\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduction.md").write_text("\n".join(parts))
    if args.json:
        slim = {
            name: {k: v for k, v in r.items() if k not in ("history", "horizon", "channel_history")}
            for name, r in results.items()
        }
        Path(args.json).write_text(
            json.dumps({"analysis": analysis, "runs": slim}, indent=1, default=str)
        )
    return analysis


def analyse_long(result: dict[str, Any], grid: dict[str, Any] | None) -> dict[str, Any]:
    """A grid setting run much longer: the ratio in tenths of the run, and at the end."""
    spec = result["spec"]
    tau = RunSpec(**{**spec, "milestones": tuple(spec["milestones"])}).time_scale()
    out: dict[str, Any] = {"name": result["name"], "steps": spec["steps"], "tau": tau, "layers": {}}
    for unit in result["units"]:
        series = unit_series(result, unit)
        size = max(1, len(series) // 10)
        blocks = [
            (series[i + size - 1]["step"], _rms([e["ratio"] for e in series[i : i + size]]))
            for i in range(0, len(series) - size + 1, size)
        ]
        out["layers"][unit] = {
            "blocks": blocks,
            "final": measured_equilibrium(result)[unit]["ratio"],
            "grid": measured_equilibrium(grid)[unit]["ratio"] if grid else None,
        }
    if grid:
        out["grid_steps"] = grid["spec"]["steps"]
    return out


def report_long(longs: Sequence[dict[str, Any]]) -> str:
    parts = []
    for run in longs:
        units = list(run["layers"])
        steps = [step for step, _ in run["layers"][units[0]]["blocks"]]
        rows = [
            [
                _short(unit),
                *[f"{ratio:.3f}" for _, ratio in layer["blocks"]],
                _f(layer["grid"]),
                f"{layer['final']:.3f}",
            ]
            for unit, layer in run["layers"].items()
        ]
        parts.append(
            f"### A slow approach, not a wrong value: {run['name']}\n\n"
            f"The SGD setting with the lowest ratios, run for {run['steps']} steps "
            f"({run['steps'] / run['tau']:.0f} relaxation times) instead of "
            f"{run.get('grid_steps', '-')}: RMS ratio per tenth of the run (column: last step of "
            "the tenth), the grid's value, and the value over the last 480 steps of this run.\n\n"
            + _table(["layer", *[f"to {s}" for s in steps], "grid run", "last 480 steps"], rows)
            + "\n"
        )
    return "\n".join(parts)


def report_balance(balance: dict[str, Any]) -> str:
    rows = [
        [
            _short(unit),
            layer["fan_in"],
            f"{layer['measured_ratio']:.3f}",
            f"{layer['radial_share']:.4f}",
            f"{layer['outward']:+.4f}",
            f"{layer['balance_ratio']:.3f}",
        ]
        for unit, layer in balance["layers"].items()
    ]
    return (
        "### AdamW: where the update goes (diagnostic)\n\n"
        f"A plain PyTorch loop on the same network and data, AdamW lr {balance['lr']:g}, wd "
        f"{balance['weight_decay']:g}, beta1 0 (no momentum, so that the norm balance is exact "
        f"to first order), {balance['steps']} steps, the last {balance['measure']} measured per "
        "output channel. With `d = w_{t+1} - (1 - lr wd) w_t` (the Adam step), a stationary norm "
        "needs "
        "`(2 lr wd - (lr wd)^2)|w|^2 = |d|^2 + 2(1 - lr wd)<w, d>` and the angle is "
        "`|d_perp|/|w|`, so `ratio^2 = (1 - lr wd/2)(1 - radial)/(1 + outward)`: `radial` is the "
        "share of `|d|^2` along `w`, `outward` = `2(1 - lr wd)<w, d>/|d|^2`. Under SGD both are 0 "
        "(the gradient is orthogonal to `w`); Adam divides every element by its own `sqrt(v)`, "
        "which breaks the orthogonality.\n\n"
        + _table(["layer", "fan-in", "measured ratio", "radial", "outward", "balance ratio"], rows)
        + "\n"
    )


def _range(values: Sequence[float], digits: int = 2) -> str:
    low, high = min(values), max(values)
    if f"{low:.{digits}f}" == f"{high:.{digits}f}":
        return f"{low:.{digits}f}"
    return f"{low:.{digits}f} to {high:.{digits}f}"


def _pct_range(values: Sequence[float], digits: int = 0) -> str:
    low, high = f"{min(values):.{digits}%}", f"{max(values):.{digits}%}"
    return low if low == high else f"{low} to {high}"


def discussion(analysis: dict[str, Any]) -> str:
    """Every disagreement with theory found in this report, with the evidence for its cause."""
    items: list[str] = []
    sgd, adamw = analysis.get("sgd_grid", []), analysis.get("adamw_grid", [])
    if sgd:
        text = (
            f"**SGD equilibrium.** {len(sgd) * 3} layer ratios, "
            f"{_range([v['ratio'] for r in sgd for v in r['layers'].values()], 3)}"
        )
        by_momentum = {}
        for row in sgd:
            by_momentum.setdefault(row["momentum"], []).extend(
                v["ratio"] for v in row["layers"].values()
            )
        text += (
            "; "
            + "; ".join(
                f"momentum {m:g}: {_range(v, 3)} (mean {statistics.fmean(v):.3f})"
                for m, v in sorted(by_momentum.items())
            )
            + "."
        )
        low = [r for r in sgd if min(v["ratio"] for v in r["layers"].values()) < 0.97]
        long = analysis.get("long", [])
        if low:
            excess = max(
                (v["first_norm"] / v["weight_norm"]) ** 4 for r in low for v in r["layers"].values()
            )
            names = ", ".join(
                f"lr {r['lr']:g} / wd {r['weight_decay']:g} / momentum {r['momentum']:g}"
                for r in low
            )
            text += (
                f" The ratios below 0.97 ({names}) come from runs whose relaxation time is "
                f"{_range([r['time_scale'] for r in low], 0)} steps (momentum 0 relaxes 10x "
                "slower than momentum 0.9) and whose conv weights started far above the "
                f"equilibrium norm (|w|^4 up to {excess:.0f} times its final value)."
            )
        for run in long:
            finals = [x["final"] for x in run["layers"].values()]
            grids = [x["grid"] for x in run["layers"].values() if x["grid"] is not None]
            text += (
                f" Run for {run['steps'] / run['tau']:.0f} relaxation times instead of "
                f"{run.get('grid_steps', 0) / run['tau']:.0f}, the worst of them ends at "
                f"{_range(finals, 3)} (grid run: {_range(grids, 3)}; table above): the deficit "
                "is a slow approach, not a wrong equilibrium value. The approach from far above "
                "is slower than `exp(-t/tau)` of `|w|^4` would say (the ratio is still "
                f"{1 - statistics.fmean(grids):.0%} low after "
                f"{run.get('grid_steps', 0) / run['tau']:.0f} relaxation times), as in the "
                "LR-decay experiment below."
            )
        items.append(text)
    if adamw:
        units = adamw[0]["units"]
        per_layer = {u: [r["layers"][u]["ratio"] for r in adamw] for u in units}
        text = (
            "**AdamW equilibrium: the first conv layer sits below the prediction.** "
            + "; ".join(
                f"{_short(u)}: {_range(v, 3)} (median {statistics.median(v):.3f})"
                for u, v in per_layer.items()
            )
            + "."
        )
        balance = analysis.get("adamw_balance")
        if balance:
            layers = list(balance["layers"].values())
            first = layers[0]
            text += (
                " The deficit of the first layer is systematic: in the diagnostic run "
                f"({balance['steps'] * 2 * balance['lr'] * balance['weight_decay']:.0f} "
                f"relaxation times) it measures {first['measured_ratio']:.3f}, while the other "
                f"layers measure {_range([x['measured_ratio'] for x in layers[1:]], 3)}. The "
                "decomposition of the Adam step explains it: the first layer (fan-in "
                f"{first['fan_in']}) has an outward component `2<w, d>` worth "
                f"{first['outward']:+.1%} of `|d|^2` (the others "
                f"{_pct_range([x['outward'] for x in layers[1:]], 1)}), so the norm settles higher "
                f"and the angle lower: the balance gives {first['balance_ratio']:.3f}, the "
                f"measurement {first['measured_ratio']:.3f}. The package's prediction (Kosson et "
                "al.) assumes an update orthogonal to the weight, which Adam's per-element "
                "scaling only approximates. The package's synthetic check "
                "(`simulate_scale_invariant`: i.i.d. noise of equal variance in every element) "
                "cannot show this, since there every element has the same second moment and the "
                "update stays orthogonal: with the same AdamW setting and fan-in "
                f"{first['fan_in']} it measures {balance['synthetic_ratio']:.3f}. Layers with a "
                "larger fan-in average the radial part out."
            )
        lowest = [r["layers"][units[0]] for r in adamw if r["layers"][units[0]]["ratio"] < 0.93]
        if lowest:
            text += (
                f" The grid's values below 0.93 ({len(lowest)} settings) are those where the "
                "first layer started furthest above its equilibrium norm (|w|^4 "
                f"{_range([(x['first_norm'] / x['weight_norm']) ** 4 for x in lowest], 0)} times "
                "its final value): a slow approach on top of the systematic deficit."
            )
        reached = [r["layers"][units[0]]["first_equilibrium_step"] or r["steps"] for r in adamw]
        others = [
            r["layers"][u]["first_equilibrium_step"] or r["steps"] for r in adamw for u in units[1:]
        ]
        text += (
            " The first layer is also the slowest to get there: first equilibrium window at "
            f"{statistics.median(reached):.0f} steps (median) against "
            f"{statistics.median(others):.0f} for the other layers: its per-channel AdamW "
            "equilibrium `|w|^2 = lr C / (2 wd)` with C = 9 is "
            f"{_range([2 * r['weight_decay'] / (3 * r['lr'] * 9) for r in adamw], 1)} times "
            "smaller than the 1/3 of PyTorch's default init, so its norm has the longest way "
            "to go."
        )
        items.append(text)
    rows = sgd + adamw
    if rows:
        stds = [v["window_ratio_std"] for r in rows for v in r["layers"].values()]
        fractions = [
            statistics.fmean(v["in_equilibrium_fraction"] for v in r["layers"].values())
            for r in rows
        ]
        items.append(
            f"**The detector and short windows.** In equilibrium, the RMS over one {EVERY}-step "
            f"window scatters around its mean by {_range(stds, 3)} (standard deviation of the "
            "window ratio, largest for the first layer, whose per-step angle is the noisiest). "
            "With tolerance 10% and patience 3 the callback's detector therefore counted only "
            f"{_pct_range(fractions)} of the measured windows of these stationary runs as "
            "in equilibrium (column `in eq.`). The callback that decays the LR in experiment 2 "
            f"therefore uses {AUTO_WINDOW}-step windows and patience 2. Detection wants windows of "
            "~50 steps or more (the callback's default `window` is 8)."
        )
    ns = analysis.get("nonstationary")
    if ns:
        clean = list(ns["layers"].values())
        noisy = list(ns["reference_layers"].values())
        items.append(
            "**Non-stationary regime (clean labels).** Over the second half of the run the window "
            f"ratio goes from {min(x['ratio_min'] for x in clean):.2f} to "
            f"{max(x['ratio_max'] for x in clean):.2f}, RMS "
            f"{_range([x['ratio_rms'] for x in clean])}, with "
            f"{_pct_range([x['outside_15pct'] for x in clean])} of the windows more than 15% off "
            f"(label-noise twin: RMS {_range([x['ratio_rms'] for x in noisy])}, "
            f"{_pct_range([x['outside_15pct'] for x in noisy])} off). The training loss falls to "
            f"{ns['loss_min']:.1e}; each time the gradient vanishes the angle collapses (ratio "
            f"down to {min(x['ratio_min'] for x in clean):.2f}) while weight decay shrinks the "
            "norm, until the growing effective learning rate kicks the loss up and the angle "
            f"overshoots (ratio up to {max(x['ratio_max'] for x in clean):.2f}): the periodic "
            "behaviour of Lobacheva et al. (2021). Theory's equilibrium assumes "
            "stationary gradient noise and does not describe this regime; it is reported, not "
            "counted as a failure."
        )
    decays = [d for d in analysis.get("decay", []) if d.get("decay_step") is not None]
    plain = [d for d in decays if not d["rescaled"]]
    for d in plain:
        layers = list(d["layers"].values())
        label = "SGD" if d["optimizer"] == "sgd" else "AdamW"
        text = (
            f"**LR decay, {label}.** Drop {_range([x['drop'] for x in layers], 1)}x (theory 10), "
            f"first-window ratio {_range([x['first_ratio'] for x in layers], 3)} (theory 0.316 at "
            f"t = 0; the relaxation model averaged over the first window gives "
            f"{relaxation_model(EVERY / 2, d['k'], d['tau']):.3f}). The ratio reaches 0.9 after "
            f"{_range([x['t90'] or math.nan for x in layers], 0)} steps (model "
            f"{d['predicted_t90']:.0f}) and 0.95 after "
            f"{_range([x['t95'] or math.nan for x in layers], 0)} (model {d['predicted_t95']:.0f})"
        )
        fits = [x["fit_tau"] for x in layers if x["fit_tau"]]
        if fits:
            text += (
                f"; the fitted time constant is {_range(fits, 0)} steps against "
                f"{d['tau']:.0f} from theory"
            )
        text += f"; final ratio {_range([x['final_ratio'] for x in layers], 3)}."
        if d["optimizer"] == "sgd":
            t95 = [x["t95"] for x in layers if x["t95"]]
            text += (
                f" SMD Cor. 3.1 gives {d['smd_steps']} steps (with the new LR; "
                f"{d['smd_steps_with_old_lr']} with the old one, 10x too short), the model's time "
                "to reach 0.958 of the new prediction; the measured t95 is "
                f"{_range([t / d['smd_steps'] for t in t95], 2)} of it. The measured relaxation is "
                "somewhat slower than theory's time constant (fit above), consistent with a target "
                f"that moves while the weights relax: the training loss falls after the decay "
                f"({d['loss_before']:.2f} before, {d['loss_after']:.2f} at the end), so the "
                "gradient noise, and with it the new equilibrium norm, is lower than before."
            )
        else:
            cooldown = [x["ratio_at_cooldown"] for x in layers]
            text += (
                " The early climb is faster than the `|w|^2` model with `tau = 1/(2 lr wd)` and "
                "the end slower (figure). Not investigated further; the model assumes an Adam "
                "step of fixed size, which holds only once the second moment (memory "
                "1/(1 - beta2) = 1000 steps) has caught up with the gradient scale, and the end "
                "carries the first layer's deficit above. The callback's cooldown after a decay "
                f"({d['cooldown']} steps, SMD Cor. 3.1 evaluated with momentum 0, as the callback "
                f"does for AdamW) ends while the ratio is still {_range(cooldown, 2)} "
                f"(model {relaxation_model(d['cooldown'], d['k'], d['tau']):.2f}): for AdamW it "
                "is "
                f"{_pct_range([d['cooldown'] / x['t95'] for x in layers if x['t95']])} of the "
                "measured time to 95%. The first window after the decay is also higher than the "
                "model (see above; not investigated)."
            )
        items.append(text)
    for d in decays:
        if not d["rescaled"]:
            continue
        layers = list(d["layers"].values())
        items.append(
            f"**LR decay with SMD's rescaling (callback).** The callback decided at step "
            f"{d['decay_step']}; the angle dropped by {_range([x['drop'] for x in layers], 1)}x "
            f"(sqrt(10) = 3.16 expected: the rescaling puts the weight on the new equilibrium at "
            f"once) and the first 3 windows after the decay are at "
            f"{_range([x['early_ratio'] for x in layers], 2)} of the new prediction, against "
            + ", ".join(
                f"{_range([x['early_ratio'] for x in p['layers'].values()], 2)}"
                for p in plain
                if p["optimizer"] == "sgd"
            )
            + " without rescaling. It then dips to "
            f"{_range([x['dip'] for x in layers], 2)} (3-window RMS, "
            f"{_range([x['dip_step'] for x in layers], 0)} steps after the decay; relaxation "
            f"time {d['tau']:.0f}) before settling at "
            f"{_range([x['final_ratio'] for x in layers], 2)}"
            + (
                ". The rescaling assumes that the gradient noise is the same after the decay, "
                f"but the training loss falls ({d['loss_before']:.2f} before, "
                f"{d['loss_after']:.2f} at the end): the new equilibrium norm is then below "
                "`k^(-1/4)` times the old one, and a small relaxation remains (consistent with the "
                "dip, not proven by it)."
                if d["loss_after"] < d["loss_before"]
                else "; the cause was not investigated."
            )
        )
    for run in analysis.get("scaling", []):
        layers = list(run["layers"].values())
        ratios = [h["ratio"] for x in layers for h in x["horizon"].values()]
        text = (
            f"**Linear scaling, momentum {run['momentum']:g}.** Exponent "
            f"{_range([x['exponent'] for x in layers], 3)} (theory 0.5); per-k ratios "
            f"{_range([r for x in layers for r in x['ratios']], 2)}. k-step / one-step-at-kB "
            f"ratios {_range(ratios, 2)}, all at or below sqrt(k)"
        )
        if run["momentum"] > 0:
            models = [
                h["ratio"] / (h["random_walk_growth"] / h["sqrt_k"])
                for x in layers
                for h in x["horizon"].values()
            ]
            text += (
                f" and within {max(abs(m - 1) for m in models):.0%} of the independent-gradient "
                "model: momentum makes consecutive steps of the same batch size point the same "
                "way for ~10 steps, so k = 2..8 small steps add almost coherently."
            )
        else:
            growth = [h["growth"] / h["sqrt_k"] for x in layers for h in x["horizon"].values()]
            text += (
                f", but also below the random-walk value 1 (down to {min(ratios):.2f}): the "
                f"k-step angle at batch B is {_range(growth, 2)} of `sqrt(k)` one-step angles, "
                "i.e. consecutive SGD steps without momentum are slightly anti-correlated "
                "(the steps partly undo each other, as when bouncing across a sharp direction "
                "at a large learning rate), and the k = 1 run itself sits "
                f"{1 - statistics.fmean(x['ratios'][0] for x in layers):.0%} below its "
                "prediction (relaxation time "
                f"{relaxation_steps(run['base_lr'], run['weight_decay'], run['momentum']):.0f} "
                "steps, still relaxing) while k = 8 is within "
                f"{1 - statistics.fmean(x['ratios'][-1] for x in layers):.0%}. The issue's "
                "bound (at or below sqrt(k)) holds; the random walk is not a lower bound."
            )
        items.append(text)
    for run in analysis.get("channel", []):
        layers = run["layers"]
        label = "SGD" if run["optimizer"] == "sgd" else "AdamW"
        items.append(
            f"**Per channel, {label}.** Medians "
            f"{_range([x['median'] for x in layers.values()], 3)}, spread between channels "
            f"(std) {_range([x['std'] for x in layers.values()], 3)} against a sampling noise of "
            f"{_range([x['sampling_noise'] for x in layers.values()], 3)} over {run['steps']} "
            "steps: unexplained spread "
            f"{_range([x['intrinsic_std'] for x in layers.values()], 3)}. "
            "Every channel rotates at its layer's rate (rotational equilibrium per neuron)"
            + (
                ", the AdamW first layer again a few percent low."
                if run["optimizer"] == "adamw"
                else "."
            )
        )
    if not items:
        return ""
    return (
        "## 5. Disagreements with theory, and their explanations\n\n"
        + "\n\n".join(f"- {item}" for item in items)
        + "\n"
    )


SETUP_TEXT = """\
**Setup.** Network: conv(3x3)-BN-ReLU, conv-BN-ReLU-maxpool, conv-BN-ReLU, global average pool,
linear classifier (the digits demo's network; for 32x32 images a max-pool follows the first block).
The three conv weights (no bias) are scale-invariant per output channel; they are found by the
callback's tracer (`params="auto"`) and they alone form the param group with weight decay (the BN
affine parameters and the classifier are not scale-invariant and get none). Every optimizer step is
measured (`every_n_steps = window = 16`); "ratio" is measured RMS angular update /
`equilibrium_angular_update`, per conv layer (whole-layer angle, as in Wan et al.). The grid's
`lr*wd` spans {grid_range}, so that the equilibrium is reached within hundreds to a few thousand
steps of a CPU run: the "intrinsic learning rate" `lr*wd` sets the clock (SGD: the norm relaxes
with time constant `(1 - momentum) / (4 lr wd)` steps, `lightning_sdm.theory.relaxation_steps`;
AdamW: `1 / (2 lr wd)`).

**Stationary-noise regime (chosen for experiments 1-4).** For every sample of every batch, with
probability 0.2 the label is replaced by a fresh uniformly random one (dynamic label noise). The
theory assumes a stationary distribution of the gradient with respect to the unit weight; with
clean labels the per-sample gradients of a net that fits its {n_train} training images vanish and
the equilibrium chases a moving target (see the non-stationary run). Random labels drawn anew at
every step keep the per-sample gradients at a floor that does not shrink with training (the
training loss cannot go below the entropy of the noisy labels, ~0.87 nats; it ends at {loss_range}
in these runs), which is exactly the stationary noise the random-walk argument of SMD needs. Label
smoothing alone would not do: a model can fit smoothed targets exactly and its gradients still
vanish.
"""

GRID_TEXT = """\
Each setting trains from initialization for 6 relaxation times (SGD) or 4 (AdamW), at least
{minimum} steps, and measures the RMS angle over the following {measure} steps ({windows} windows).
Columns: `tau` is the relaxation time (steps), `in eq.` the fraction of the measured windows the
callback's detector (tolerance 10%, patience 3) counted as in equilibrium, `first eq. step` the
step at which each layer first entered equilibrium, `drift` the change of the RMS window ratio from
the first to the second half of the measured steps (mean over the layers; positive: still rising
towards equilibrium), `loss` the training loss (noisy labels) over the measured steps.
"""

NONSTATIONARY_TEXT = """\
With clean labels the per-sample gradients shrink as the net fits the training set: the angle falls
below the prediction, weight decay then shrinks the norm (the effective learning rate `lr/|w|^2`
grows), and the angle climbs back or overshoots when the loss is kicked up again: the ratio drifts
and oscillates instead of settling (Lobacheva et al. 2021, periodic behaviour of BN + weight
decay). The prediction is the equilibrium of stationary noise; in this regime it is a moving
target, and the callback's detector (which requires no trend over its patience) is right to report
equilibrium only intermittently, if at all.
"""

DECAY_TEXT = """\
The LR of the invariant group is divided by k = 10 at `decay at step` (MultiStepLR), or by the
callback itself when its detector reports equilibrium (a second callback with 48-step windows,
`patience=2`, `on_equilibrium="decay_lr"`, `rescale_weights=True`, `max_decays=1`: SMD's trick of
dividing the invariant weights by `k^(1/4)`, `k^(1/2)` for AdamW). `ratio before` is relative to
the old prediction, every later ratio to the new one (`1/sqrt(10)` of the old). Expected (SMD Sec.
4, Cor. 3.1): the angle first drops by ~k = 10 (ratio just after ~`1/sqrt(10)` = 0.316) and then
relaxes back to the new prediction while the norm shrinks by `k^(1/4)`. Model used for the time
axis (derived here from the norm dynamics the package documents): the angle scales as `1/|w|^2`
under SGD (`1/|w|` under AdamW) and `|w|^4` (`|w|^2` under AdamW) relaxes exponentially with time
constant `tau` of the NEW learning rate, so ratio(t) = `1/sqrt(1 + (k-1) exp(-t/tau))`. `tau:
theory / fit` compares `relaxation_steps(lr_new, wd, momentum)` (`1/(2 lr_new wd)` for AdamW) with
the slope of `ln(1/ratio^2 - 1)` against t (windows with ratio < 0.92). `t90`, `t95`: steps until
the (3-window RMS) ratio first reaches 0.9 / 0.95, as predicted by the model and as measured. SMD
Cor. 3.1 (`lr_decay_relaxation_steps(10, lr_new, wd, momentum)` = `2 ln(k) tau`) is the time at
which the model reaches a ratio of 0.958.
"""

SCALING_TEXT = """\
SGD, batch k*B (B = {B}) with lr k*eta, same weight decay, k = 1, 2, 4, 8; each run relaxes for 6
relaxation times at its own learning rate (at least {burn} steps) and is measured over the last
{measure} steps. Prediction: `sqrt(2 k eta wd / (1 + momentum))`, i.e. the per-step angle grows as
`sqrt(k)`. Cells: measured RMS angle per step (ratio to the prediction); `exponent`: least-squares
slope of log(angle) against log(k), expected 0.5.
"""

HORIZON_TEXT = """\
Angle between `w_t` and `w_{t+k}` at batch B (run k = 1, measured by extra callbacks with
`horizon=k`, over consecutive k-step blocks of every window), against the single-step angle at
batch k*B (run k). If the k small steps pointed the same way their angles would add (k times the
one-step angle at B, i.e. `sqrt(k)` times the step at kB); if they were a random walk the k-step
angle would be `sqrt(k)` times the one-step angle at B, i.e. equal to the step at kB (ratio 1). So
the ratio is expected between 1 and `sqrt(k)`. `independent-gradient model` is what independent
minibatch gradients filtered by heavy-ball momentum give (derived: the standard deviation of the
sum of k consecutive momentum updates, relative to one, divided by `sqrt(k)`): momentum correlates
consecutive updates over ~`1/(1-momentum)` steps, so with momentum 0.9 the k steps add almost
coherently for k <= 8.
"""

CHANNEL_TEXT = """\
Each output channel of a conv followed by BatchNorm is scale-invariant on its own, so each channel
has its own equilibrium with the same predicted angle (Kosson et al. 2024: rotational equilibrium
per neuron). Per-channel RMS angle over the last {steps} steps, measured in a callback-free way
with `lightning_sdm.angular_update(prev, curr, dim=0)` at every step (plus the callback with
`granularity="channel"`, whose per-window summaries are in the last column). `sampling noise`: the
spread expected from the finite number of steps, estimated from the difference between the two
halves of the recording (`std(r1 - r2) / 2`); `intrinsic std` = `sqrt(std^2 - noise^2)`, the spread
between channels that sampling does not explain.
"""


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid, few hundred steps")
    parser.add_argument("--out", default="reproduction_report", help="output directory")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    parser.add_argument(
        "--cifar-dir", default=None, help="cifar-10-batches-py directory (else digits)"
    )
    parser.add_argument("--cifar-train-size", type=int, default=10000, help="0: all 50000 images")
    parser.add_argument("--batch-size", type=int, default=32, help="B (experiment 3 uses k*B)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--label-noise", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write every analysed number here")
    parser.add_argument("--raw", default=None, help="also write the raw per-window results here")
    parser.add_argument("--from-raw", default=None, help="re-render the report from --raw output")
    args = parser.parse_args(argv)
    with quiet(args.threads):
        return _main(args)


def _main(args: argparse.Namespace) -> dict[str, Any]:
    data = DataConfig(args.cifar_dir, args.cifar_train_size, args.threads)
    base = {
        "batch_size": args.batch_size,
        "width": args.width,
        "label_noise": args.label_noise,
        "seed": args.seed,
    }
    plan = make_plan(args.quick, args.experiments, base)
    specs = plan.specs()
    total = sum(s.steps for s in specs)
    print(f"{len(specs)} runs, {total} steps, {args.jobs} process(es), data: {data.name}")
    needs_balance = "equilibrium" in args.experiments and not args.quick
    diagnostics: dict[str, Any] = {}
    if args.from_raw:
        saved = json.loads(Path(args.from_raw).read_text())
        results, elapsed = saved["runs"], saved["elapsed"]
        diagnostics = saved.get("diagnostics", {})
        args.jobs = saved.get("jobs", args.jobs)
        missing = [spec.name for spec in specs if spec.name not in results]
        if missing:
            raise SystemExit(f"{args.from_raw} lacks the runs {missing}: same options as the run?")
    else:
        started = time.perf_counter()
        load_data(data)  # once in the parent: forked workers inherit it
        results = run_all(specs, data, args.jobs)
        elapsed = time.perf_counter() - started
    if needs_balance and "adamw_balance" not in diagnostics:
        started = time.perf_counter()
        diagnostics["adamw_balance"] = adamw_update_balance(data, seed=args.seed)
        elapsed += time.perf_counter() - started
        print(f"  AdamW update balance diagnostic: {time.perf_counter() - started:.1f} s")
    if args.raw:
        raw = {"runs": results, "elapsed": elapsed, "jobs": args.jobs, "diagnostics": diagnostics}
        Path(args.raw).write_text(json.dumps(raw))
    out = Path(args.out)
    analysis = write_report(out, results, plan, args, data, elapsed, diagnostics)
    analysis["elapsed"] = elapsed
    print(f"Report: {out / 'reproduction.md'} ({elapsed:.0f} s)")
    return analysis


if __name__ == "__main__":
    main()
