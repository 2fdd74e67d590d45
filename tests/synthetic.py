"""A scale-invariant problem with known physics, measured by the real monitor (or the callback).

Every row of a ``[rows, dim]`` weight gets, at every step, Gaussian noise projected orthogonal to
the row and divided by its norm as its gradient: exactly the stationary gradient noise of a
scale-invariant loss, so the equilibrium norm, the relaxation time and the angular update are
those of :mod:`lightning_sdm.theory` (checked in ``tests/theory/test_theory.py``). Knobs: the
starting norm (approach from below or above), an LR schedule, and the noise scale over time (a
loss going to zero, or oscillating gradient statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_sdm import SphericalMonitor, Unit
from lightning_sdm.records import UnitWindow
from lightning_sdm.theory._predictions import adamw_equilibrium_weight_norm, equilibrium_weight_norm


def orthogonal_noise(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32).to(weight.dtype)
    norm = weight.norm(dim=1, keepdim=True)
    unit = weight / norm
    noise -= (noise * unit).sum(dim=1, keepdim=True) * unit
    return noise / norm


def equilibrium_norm(kind: str, lr: float, wd: float, beta: float, dim: int) -> float:
    """Per-row equilibrium norm of the problem (theory, validated against the simulation)."""
    if kind == "sgd":
        return equilibrium_weight_norm(lr, wd, grad_sq_unit=dim - 1, momentum=beta)
    return adamw_equilibrium_weight_norm(lr, wd, fan_in=dim)


def make_optimizer(
    kind: str, params: Any, lr: float, wd: float, beta: float
) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=beta, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=(beta, 0.99))


def initial_weight(
    kind: str, lr: float, wd: float, beta: float, rows: int, dim: int, start: float, seed: int
) -> tuple[torch.Tensor, torch.Generator]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    star = equilibrium_norm(kind, lr, wd, beta, dim)
    weight *= start * star / weight.norm(dim=1, keepdim=True)
    return weight, generator


class Holder(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def windows(
    kind: str = "sgd",
    lr: float = 0.1,
    wd: float = 1e-3,
    beta: float = 0.9,
    steps: int = 3000,
    every: int = 50,
    window: int = 8,
    rows: int = 8,
    dim: int = 256,
    start: float = 1.0,
    seed: int = 0,
    lr_at: Callable[[int], float] | None = None,
    noise_at: Callable[[int], float] | None = None,
) -> list[UnitWindow]:
    """The windows :class:`SphericalMonitor` closes on the problem (the whole weight one unit)."""
    weight, generator = initial_weight(kind, lr, wd, beta, rows, dim, start, seed)
    module = Holder(weight)
    optimizer = make_optimizer(kind, module.parameters(), lr, wd, beta)
    monitor = SphericalMonitor(
        module, optimizer, [Unit("w", ("weight",))], every_n_steps=every, window=window,
        verify_steps=0,
    ).attach()  # fmt: skip
    out: list[UnitWindow] = []
    for step in range(steps):
        if lr_at is not None:
            optimizer.param_groups[0]["lr"] = lr_at(step)
        scale = noise_at(step) if noise_at is not None else 1.0
        module.weight.grad = orthogonal_noise(module.weight.detach(), generator) * scale
        optimizer.step()
        out.extend(monitor.pop_windows())
    monitor.detach()
    return out


def model_ratio(kind: str, start: float, tau: float, step: float) -> float:
    """Noise-free ratio measured/predicted at ``step`` for a start at ``start`` x the norm.

    ``q = |w|^p`` (``p = 4`` SGD, ``2`` AdamW) relaxes as ``q - q* ~ exp(-t / tau)``; the ratio
    is ``(q* / q)^(1/2)`` (see ``lr_change_relaxation_steps``).
    """
    power = 4 if kind == "sgd" else 2
    excess = (start**power - 1) * math.exp(-step / tau)
    return (1 + excess) ** -0.5


class ScaleInvariantModule(pl.LightningModule):
    """The problem as a LightningModule: ``loss = <w, g>`` with ``g`` the orthogonal noise."""

    def __init__(
        self,
        kind: str = "sgd",
        lr: float = 0.1,
        wd: float = 1e-3,
        beta: float = 0.9,
        rows: int = 8,
        dim: int = 256,
        start: float = 1.0,
        seed: int = 0,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> None:
        super().__init__()
        weight, self.noise = initial_weight(kind, lr, wd, beta, rows, dim, start, seed)
        self.net = Holder(weight)
        self.kind, self.lr, self.wd, self.beta = kind, lr, wd, beta
        self.scheduler = scheduler

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        weight = self.net.weight
        gradient = orthogonal_noise(weight.detach(), self.noise)
        return (weight * gradient).sum()  # d loss / d w = gradient exactly

    def configure_optimizers(self) -> Any:
        optimizer = make_optimizer(self.kind, self.parameters(), self.lr, self.wd, self.beta)
        if self.scheduler is None:
            return optimizer
        schedule = {"scheduler": self.scheduler(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}


def batches(steps: int) -> torch.utils.data.DataLoader:
    """``steps`` dummy batches (the module makes its own gradient)."""
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(steps, 1)))
