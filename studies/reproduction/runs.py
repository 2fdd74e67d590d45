"""One run of the study: the BatchNorm convnet, its callbacks, and what is recorded."""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_sdm import SphericalDynamicsCallback, angular_update
from lightning_sdm.actions._actions import DecayLR
from lightning_sdm.theory._predictions import (
    adamw_equilibrium_weight_norm,
    equilibrium_angular_update,
    relaxation_steps,
)
from lightning_sdm.theory._simulation import simulate_scale_invariant
from studies.nets import bn_convnet_features
from studies.reproduction.common import AUTO_WINDOW, EVERY
from studies.reproduction.data import DataConfig, load_data, train_loader


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
        self.spec = spec
        layers = bn_convnet_features(in_channels, spec.width, pool_first=image_size > 16)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(2 * spec.width, 10)
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
    # The detector as users get it: the callback's defaults (MonitorConfig).
    default = SphericalDynamicsCallback(prog_bar=False)
    callbacks: list[pl.Callback] = [main, default]
    decider = None
    if spec.auto_decay:
        # The decision uses longer windows than the measurement: the RMS of 16 steps scatters by
        # ~8% in equilibrium, and all three layers must be within 10% for 2 windows in a row.
        decider = SphericalDynamicsCallback(
            every_n_steps=AUTO_WINDOW,
            window=AUTO_WINDOW,
            patience=2,
            prog_bar=False,
            on_equilibrium=DecayLR(
                factor=spec.gamma, max_decays=1, rescale_weights=True, final_phase=None
            ),
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
        "default_history": [_plain(entry) for entry in default.history],
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
    out["regime"] = record.regime
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
