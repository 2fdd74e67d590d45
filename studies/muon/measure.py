"""Muon and Adafactor on real networks: measured angular update against the prediction.

Two tasks, neither of them synthetic noise: scikit-learn's digits with a BatchNorm MLP (each
output row of a hidden layer is invariant on its own), and a generated teacher-student
regression with LayerNorm/RMSNorm after each hidden layer (only the whole matrix is invariant).
The hidden matrices are trained with ``torch.optim.Muon`` (or ``Adafactor``), everything else
with AdamW. The angle of every step is recomputed in float64 from the weights before and after
(independent of the package's monitor), its RMS over the second half of the run compared with
:func:`lightning_sdm.theory.for_shape` of the group's prediction::

    python -m studies.muon.measure            # about 3 minutes on one core
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

from lightning_sdm.theory import for_shape, predict_param_group
from studies.nets import digits, normed_mlp

Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def digits_task(seed: int) -> tuple[Batches, nn.Module, str]:
    images, y = digits()
    x = images.flatten(1)
    generator = torch.Generator().manual_seed(seed)

    def batch(_: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(x), (64,), generator=generator)
        return x[index], y[index]

    return batch, normed_mlp([64, 256, 256], 10), "row"


def teacher_batches(seed: int) -> Batches:
    """A random tanh teacher (32 -> 64 -> 1) plus noise: dense Gaussian inputs, 64 per batch."""
    generator = torch.Generator().manual_seed(seed)
    teacher = [
        torch.randn(32, 64, generator=generator) / 32**0.5,
        torch.randn(64, 1, generator=generator) / 8.0,
    ]

    def batch(_: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(64, 32, generator=generator)
        noise = 0.1 * torch.randn(64, 1, generator=generator)
        return x, torch.tanh(x @ teacher[0]) @ teacher[1] + noise

    return batch


def backward(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    *optimizers: torch.optim.Optimizer,
) -> torch.Tensor:
    """The loss of one batch, its gradients in place of the last ones (the optimizers' params)."""
    x, y = batch
    loss = loss_fn(model(x), y)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def teacher_task(seed: int) -> tuple[Batches, nn.Module, str]:
    batch = teacher_batches(seed)
    model = normed_mlp([32, 128, 192], 1, norm=[nn.LayerNorm, nn.RMSNorm], activation=nn.GELU)
    return batch, model, "matrix"


def run(
    task: str, optimizer: str, settings: dict[str, Any], steps: int, seed: int = 0
) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    batch, model, invariance = {"digits": digits_task, "teacher": teacher_task}[task](seed)
    hidden = [m.weight for m in model if isinstance(m, nn.Linear)][:2]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    main = getattr(torch.optim, optimizer)(hidden, **settings)
    other = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss() if task == "digits" else nn.MSELoss()
    sums = [0.0 for _ in hidden]
    count = 0
    for step in range(steps):
        backward(model, loss_fn, batch(step), main, other)
        before = [h.detach().double().clone() for h in hidden]
        main.step()
        other.step()
        if step >= steps // 2:
            count += 1
            for i, (b, h) in enumerate(zip(before, hidden, strict=True)):
                a = h.detach().double()
                dims = 1 if invariance == "row" else (0, 1)
                cos = (a * b).sum(dims) / (a.norm(dim=dims) * b.norm(dim=dims))
                angle = torch.atan2((1 - cos.clamp(-1, 1) ** 2).clamp(min=0).sqrt(), cos)
                sums[i] += angle.square().mean().item()
    group = predict_param_group(main, main.param_groups[0])
    out = []
    for i, h in enumerate(hidden):
        predicted = for_shape(group, h.shape).angular_update
        measured = math.sqrt(sums[i] / count)
        out.append(
            {
                "task": task,
                "optimizer": optimizer,
                "settings": {k: str(v) for k, v in settings.items()},
                "matrix": f"{h.shape[0]}x{h.shape[1]}",
                "invariance": invariance,
                "measured": measured,
                "predicted": predicted,
                "ratio": measured / predicted if predicted else None,
                "rule": group.rule,
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


CASES = [
    ("digits", "Muon", {"lr": 0.02, "weight_decay": 0.1}),
    ("digits", "Muon", {"lr": 0.02, "weight_decay": 0.1, "nesterov": False, "momentum": 0.9}),
    ("digits", "Muon", {"lr": 0.01, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}),
    ("teacher", "Muon", {"lr": 0.02, "weight_decay": 0.1}),
    ("teacher", "Muon", {"lr": 0.02, "weight_decay": 0.1, "nesterov": False, "momentum": 0.9}),
    ("teacher", "Muon", {"lr": 0.01, "weight_decay": 0.1, "adjust_lr_fn": "match_rms_adamw"}),
    ("digits", "AdamW", {"lr": 2e-3, "weight_decay": 0.5}),
    ("teacher", "AdamW", {"lr": 2e-3, "weight_decay": 0.5}),
    ("digits", "Adafactor", {"lr": 0.01, "weight_decay": 0.0}),
    ("teacher", "Adafactor", {"lr": 0.01, "weight_decay": 0.01}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for task, opt, settings in CASES for row in run(task, opt, settings, args.steps)]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
