"""Lion on real BatchNorm convnets: measured angular update and norm against the prediction.

A small ResNet (conv-BN-ReLU stem, two residual stages, a strided stage with a 1x1 shortcut; every
conv without bias and followed by BatchNorm, so each output channel is invariant on its own) is
trained with the reference Lion of :mod:`lightning_sdm.theory.check_grid` on two tasks: a
generated image task (16x16 RGB: oriented gratings of a class-specific frequency and colour,
random phase, shift and noise) and scikit-learn's digits (8x8). ``--label-noise`` (default 0.2)
redraws that fraction of the labels at every step, the stationary noise the theory assumes; 0
gives clean labels. The angle of every step is recomputed in float64 from the weights before
and after, per output channel (independent of the package's monitor); its RMS over the last
half of the run is compared with the package's prediction and with REQ's linearised formula.
``S`` (the sign correlation sum) is read from the measured norm: ``|w|^2 (1 - q^2) / (lr^2 d)``::

    python -m studies.lion.measure            # about 10 minutes on one core
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sdm.theory import explain_equilibrium
from lightning_sdm.theory._lion import lion_sign_correlation
from lightning_sdm.theory.check_grid import Lion
from studies.nets import digits

Batches = Callable[[], tuple[torch.Tensor, torch.Tensor]]


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


def resnet(channels: int, classes: int, width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        Block(width, width, 1),
        Block(width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def gratings_task(generator: torch.Generator, batch: int = 64) -> tuple[Batches, int]:
    classes, size = 10, 16
    freq = 0.3 + 1.2 * torch.rand(classes, generator=generator)
    theta = math.pi * torch.rand(classes, generator=generator)
    colour = torch.rand(classes, 3, generator=generator)
    grid = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (batch,), generator=generator)
        phase = 2 * math.pi * torch.rand(batch, 1, 1, generator=generator)
        jitter = 0.15 * torch.randn(batch, 1, 1, generator=generator)
        t = theta[y].view(-1, 1, 1) + jitter
        wave = torch.sin(freq[y].view(-1, 1, 1) * (xx * t.cos() + yy * t.sin()) + phase)
        image = wave.unsqueeze(1) * colour[y].view(-1, 3, 1, 1)
        image = image + 0.5 * torch.randn(batch, 3, size, size, generator=generator)
        return image, y

    return draw, 3


def digits_task(generator: torch.Generator, batch: int = 64) -> tuple[Batches, int]:
    images, labels = digits()

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(images), (batch,), generator=generator)
        return images[index], labels[index]

    return draw, 1


def req_formula(lr: float, wd: float, beta1: float, beta2: float) -> float:
    k = (1 - beta1) ** 2 + beta1**2 * (1 - beta2) / (1 + beta2)
    return math.sqrt(math.pi / 2 * 2 * lr * wd * k)


def run(
    task: str, lr: float, wd: float, betas: tuple[float, float], steps: int, label_noise: float
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    draw, channels = {"gratings": gratings_task, "digits": digits_task}[task](generator)
    model = resnet(channels, 10)
    convs = [(n, m.weight) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    conv_ids = {id(w) for _, w in convs}
    rest = [p for p in model.parameters() if id(p) not in conv_ids]
    optimizer = Lion([w for _, w in convs], lr=lr, betas=betas, weight_decay=wd)
    s_theory = lion_sign_correlation(betas[0], betas[1], lr * wd)
    decay = 1 - (1 - lr * wd) ** 2
    with torch.no_grad():  # start each unit at the predicted equilibrium norm (fewer steps)
        for _, w in convs:
            target = lr * math.sqrt(w[0].numel() * s_theory / decay)
            w.mul_(target / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    other = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    half = steps // 2
    sums = [torch.zeros(w.shape[0], dtype=torch.float64) for _, w in convs]
    norms_sq = [torch.zeros(4, w.shape[0], dtype=torch.float64) for _, w in convs]
    losses = torch.zeros(4)
    for step in range(steps):
        x, y = draw()
        if label_noise > 0:
            redraw = torch.rand(len(y), generator=generator) < label_noise
            y = torch.where(redraw, torch.randint(0, 10, y.shape, generator=generator), y)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        other.zero_grad(set_to_none=True)
        loss.backward()
        before = [w.detach().double().flatten(1).clone() for _, w in convs]
        optimizer.step()
        other.step()
        quarter = 4 * step // steps
        losses[quarter] += loss.item() / (steps / 4)
        for i, (b, (_, w)) in enumerate(zip(before, convs, strict=True)):
            a = w.detach().double().flatten(1)
            norms_sq[i][quarter] += a.square().sum(1) / (steps / 4)
            if step >= half:
                cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
                sin = (1 - cos.clamp(-1, 1) ** 2).clamp(min=0).sqrt()
                sums[i] += torch.atan2(sin, cos).square()
    predicted = explain_equilibrium(optimizer)[0].angular_update
    req = req_formula(lr, wd, *betas)
    out = []
    for i, (name, w) in enumerate(convs):
        per_unit = (sums[i] / (steps - half)).sqrt()
        fan_in = w[0].numel()
        s_measured = norms_sq[i][3] * decay / (lr**2 * fan_in)
        row = {
            "task": task,
            "label_noise": label_noise,
            "betas": list(betas),
            "lr": lr,
            "wd": wd,
            "layer": name,
            "fan_in": fan_in,
            "units": w.shape[0],
            "measured_rms": float(per_unit.square().mean().sqrt()),
            "predicted": predicted,
            "req": req,
            "ratio": float(per_unit.square().mean().sqrt()) / predicted,
            "ratio_req": float(per_unit.square().mean().sqrt()) / req,
            "unit_ratio_min": float(per_unit.min()) / predicted,
            "unit_ratio_max": float(per_unit.max()) / predicted,
            "norm_sq_q3_over_q4": float(norms_sq[i][2].mean() / norms_sq[i][3].mean()),
            "s_measured": float(s_measured.mean()),
            "s_theory": s_theory,
            "loss_quarters": [round(v, 3) for v in losses.tolist()],
        }
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


CASES: list[tuple[str, float, float, tuple[float, float]]] = [
    ("gratings", 1e-3, 1.0, (0.9, 0.99)),
    ("gratings", 1e-3, 0.5, (0.5, 0.9)),
    ("gratings", 1e-3, 1.0, (0.9, 0.999)),
    ("digits", 1e-3, 1.0, (0.9, 0.99)),
    ("digits", 1e-3, 0.5, (0.5, 0.9)),
    ("digits", 1e-3, 1.0, (0.9, 0.999)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--label-noise", type=float, default=0.2)
    parser.add_argument("--only", type=int, nargs="*", default=None, help="case indices")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    chosen = [CASES[i] for i in args.only] if args.only else CASES
    rows = [row for case in chosen for row in run(*case, args.steps, args.label_noise)]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
