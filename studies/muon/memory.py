"""Is the gap between measured and predicted angles a memory factor? Real networks say no.

The hypothesis tested: every prediction of SGD, AdamW and Muon is ``Delta^2 = D * R``, with ``D``
the long-run angular diffusion per step (``2 lr wd``; ``2 lr (1 - dampening) wd / (1 - momentum)``
for SGD) and ``R = E|u|^2 / V`` the memory factor of the updates (``V`` the long-run variance rate
of their sum). If the norm balance fixed the long-run diffusion at ``D`` whatever the gradients,
``R`` could be measured from the angle over ``H`` steps, ``1/R ~ x_H / (H Delta_1^2)`` with
``x_H = -2 ln cos(theta_H)`` (the sphere's curvature taken out) and the finite-``H`` share of
``1/R`` divided out with the momentum filter's own autocorrelation, and the refined prediction
``sqrt(D * R_measured)`` would correct the a-priori one on real networks.

It does not hold, and this study shows it on four real networks (none of them synthetic noise):
the digits BatchNorm MLP and the teacher-student LayerNorm/RMSNorm MLP of
:mod:`studies.muon.measure`, a LayerNorm MLP with Muon on 64x32, 64x64 and 256x64 matrices (800
steps, the probe that read 1.29-1.40), and a BatchNorm convnet whose first layer is a 3x3
convolution on one input channel (fan-in 9), trained with AdamW on generated images (smooth
random prototypes under noise, as :mod:`studies.trajectory`). Per matrix it prints measured /
a-priori, measured / refined for ``H`` = 25 to 200 (no plateau: the refined ratio keeps moving
with ``H``, and for AdamW it falls to 0.4-0.7), and the radial balance: the update's measured
component along the weight, ``P = <w, Delta> / |Delta|^2`` per row and step, for which the norm
balance gives ``Delta^2 = 2 lr wd / (1 - 2 P)`` (reads 1 where the norm is in balance: the
deviation is all in ``P``). For AdamW it also splits ``P`` into the momentum filter's part,
``-beta1 / (1 - beta1)``, and the radial leak of the fresh preconditioned gradient,
``Q = <w, g / sqrt(v)> / (lr |u|^2)`` (zero for SGD, whose gradient is orthogonal to ``w``).

The angle of every step and over blocks of ``H`` steps is recomputed in float64 from the weights
(independently of the monitor) over the second half of each run::

    python -m studies.muon.memory             # about 15 minutes on one core
    python -m studies.muon.memory --quick     # the probe and the convnet, 3000 steps
"""

from __future__ import annotations

import argparse
import json
import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sdm.theory import Prediction, for_shape, predict_param_group
from studies.muon.measure import Batches, backward, digits_task, teacher_task
from studies.nets import bn_convnet, normed_mlp, smooth_prototypes


def long_run_diffusion(prediction: Prediction) -> float:
    """``D``: ``2 lr wd`` (AdamW, Muon), ``2 lr (1 - tau) wd / (1 - mu)`` (SGD)."""
    hyper = prediction.hyperparameters
    lr, wd = hyper["lr"], hyper["weight_decay"]
    if prediction.family == "sgd":
        return 2 * lr * (1 - hyper["dampening"]) * wd / (1 - hyper["momentum"])
    return 2 * lr * wd


def horizon_share(prediction: Prediction, horizon: int) -> float:
    """``F_H / F_inf`` of the momentum filter's autocorrelation on white noise.

    ``F_H = sum_{|k|<H} (1 - |k|/H) rho_k``: the share of ``1/R`` that blocks of ``H`` steps see.
    Every filter here is geometric from its second coefficient on, so the autocovariance is
    ``gamma_k = c_0 c_k + mu^k sum_{j>=1} c_j^2``.
    """
    hyper = prediction.hyperparameters
    mu = hyper.get("beta1", hyper.get("momentum", 0.0))
    if mu <= 0:
        return 1.0
    nesterov = hyper.get("nesterov", 0.0) > 0
    length = int(math.log(1e-10) / math.log(mu)) + 2
    c = [mu**k for k in range(length)]
    if nesterov and prediction.family == "sgd":  # g + mu * buf
        c = [1 + mu] + [mu ** (k + 1) for k in range(1, length)]
    elif nesterov:  # Muon: lerp(g, buf, mu)
        c = [1 - mu**2] + [(1 - mu) * mu ** (k + 1) for k in range(1, length)]
    tail = sum(v * v for v in c[1:])
    gamma0 = c[0] * c[0] + tail
    gamma = [c[0] * c[k] + mu**k * tail for k in range(1, length)]
    f_inf = 1 + 2 * sum(gamma) / gamma0
    f_h = 1 + 2 * sum((1 - k / horizon) * g for k, g in enumerate(gamma[: horizon - 1], 1)) / gamma0
    return f_h / f_inf


def refined(prediction: Prediction, step_angle: float, horizon_angle: float, horizon: int) -> float:
    """``sqrt(D * R_measured)``, ``R`` from the angle over ``horizon`` steps (the hypothesis)."""
    covered = -2 * math.log(math.cos(horizon_angle))
    r = horizon_share(prediction, horizon) * horizon * step_angle**2 / covered
    return math.sqrt(long_run_diffusion(prediction) * r)


HORIZONS = (25, 50, 100, 200)


def probe_task(seed: int) -> tuple[Batches, nn.Module, str]:
    """A LayerNorm MLP on a teacher regression: Muon's 64x32, 64x64 and 256x64 matrices."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(32, 16, generator=generator) / 32**0.5
    readout = torch.randn(16, 1, generator=generator) / 4.0

    def batch(_: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(64, 32, generator=generator)
        noise = 0.1 * torch.randn(64, 1, generator=generator)
        return x, torch.tanh(x @ teacher) @ readout + noise

    return batch, normed_mlp([32, 64, 64, 256], 1, norm=nn.LayerNorm, activation=nn.GELU), "matrix"


def prototypes_task(seed: int) -> tuple[Batches, nn.Module, str]:
    """8 classes of smooth random 12x12 prototypes under heavy noise; a BatchNorm convnet."""
    generator = torch.Generator().manual_seed(1000 + seed)
    prototypes = smooth_prototypes(generator)

    def batch(_: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 8, (64,), generator=generator)
        return prototypes[labels] + 0.6 * torch.randn(64, 1, 12, 12, generator=generator), labels

    return batch, bn_convnet(1, 16, 8), "row"  # the first conv has fan-in 9


TASKS = {
    "digits": digits_task,
    "teacher": teacher_task,
    "probe": probe_task,
    "prototypes": prototypes_task,
}


def _angles(before: torch.Tensor, after: torch.Tensor, invariance: str) -> torch.Tensor:
    """Per-row (``"row"``) or whole-matrix angles, float64, by atan2 (exact at small angles)."""
    a, b = after.reshape(after.shape[0], -1), before.reshape(before.shape[0], -1)
    if invariance == "matrix":
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return torch.atan2((1 - cos.clamp(-1, 1) ** 2).clamp(min=0).sqrt(), cos)


def _rows(t: torch.Tensor, invariance: str) -> torch.Tensor:
    t = t.reshape(t.shape[0], -1)
    return t.reshape(1, -1) if invariance == "matrix" else t


def _radial(
    optimizer: torch.optim.Optimizer,
    weight: torch.Tensor,
    before: torch.Tensor,
    grad: torch.Tensor,
    invariance: str,
) -> torch.Tensor | None:
    """Per row: ``<w, Delta>``, ``|Delta|^2`` and (AdamW) ``lr <w, g / (sqrt(v) + eps)>``.

    ``Delta = (1 - lr wd) w - w_next`` is the step without its (decoupled) weight decay,
    ``lr * u``; ``g / sqrt(v)`` is the fresh gradient once preconditioned (``g`` is orthogonal
    to ``w``, ``g / sqrt(v)`` need not be). ``None`` for SGD, whose decay is not decoupled.
    """
    if isinstance(optimizer, torch.optim.SGD):
        return None
    group = optimizer.param_groups[0]
    lr, wd = group["lr"], group["weight_decay"]
    w = _rows(before, invariance)
    delta = _rows((1 - lr * wd) * before - weight.detach().double(), invariance)
    fresh = radial = torch.full_like(w[:, 0], math.nan)
    if isinstance(optimizer, torch.optim.AdamW):
        state = optimizer.state[weight]
        step = float(state["step"])
        v = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** step)
        # Delta holds the first moment's bias correction: Q's gradient gets the same.
        scaled = grad / (v.sqrt() + group["eps"]) / (1 - group["betas"][0] ** step)
        fresh = lr * (w * _rows(scaled, invariance)).sum(1)
        radial = fresh / (lr * w.norm(dim=1))  # <w^, g / sqrt(v)>: no scale in it
    return torch.stack([(w * delta).sum(1), delta.square().sum(1), fresh, radial])


def run(
    task: str, optimizer: str, settings: dict[str, Any], steps: int, seed: int = 0
) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    batch, model, invariance = TASKS[task](seed)
    layers = [m for m in model.children() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    hidden = [m.weight for m in layers]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    main = getattr(torch.optim, optimizer)(hidden, **settings)
    other = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss() if task in ("digits", "prototypes") else nn.MSELoss()
    start = steps // 2
    squares = [0.0 for _ in hidden]
    radial: list[torch.Tensor | None] = [None for _ in hidden]
    snapshots: list[list[torch.Tensor]] = [[] for _ in hidden]  # every HORIZONS[0] steps
    for step in range(steps):
        backward(model, loss_fn, batch(step), main, other)
        before = [h.detach().double().clone() for h in hidden]
        grads = [h.grad.detach().double().clone() for h in hidden if h.grad is not None]
        if step >= start and (step - start) % HORIZONS[0] == 0:
            for i, b in enumerate(before):
                snapshots[i].append(b)
        main.step()
        other.step()
        if step >= start:
            for i, (b, h) in enumerate(zip(before, hidden, strict=True)):
                squares[i] += _angles(b, h.detach().double(), invariance).square().mean().item()
                sums = _radial(main, h, b, grads[i], invariance)
                if sums is not None:
                    total = radial[i]
                    radial[i] = sums if total is None else total + sums
    group = predict_param_group(main, main.param_groups[0])
    out = []
    count = steps - start
    for i, h in enumerate(hidden):
        prediction = for_shape(group, h.shape)
        assert prediction.angular_update is not None
        measured = math.sqrt(squares[i] / count)
        lr, wd = prediction.hyperparameters["lr"], prediction.hyperparameters["weight_decay"]
        row: dict[str, Any] = {
            "task": task,
            "optimizer": optimizer,
            "settings": {k: str(v) for k, v in settings.items()},
            "matrix": "x".join(str(s) for s in h.shape),
            "invariance": invariance,
            "measured": measured,
            "a_priori": prediction.angular_update,
            "ratio_a_priori": measured / prediction.angular_update,
        }
        sums = radial[i]
        if sums is not None:
            # Per row, in a stationary state: 2 lr wd E|w|^2 = E|Delta|^2 (1 - 2 P), P =
            # E<w, Delta> / E|Delta|^2, so Delta_row^2 = 2 lr wd / (1 - 2 P_row).
            p = sums[0] / sums[1]
            row["radial_P"] = p.mean().item()
            balance = (2 * lr * wd / (1 - 2 * p)).mean().sqrt().item()
            row["ratio_radial_balance"] = measured / balance
            if optimizer == "AdamW":
                beta1 = prediction.hyperparameters["beta1"]
                q = sums[2] / sums[1]
                row["fresh_Q"] = q.mean().item()
                # The momentum filter's part of P plus the fresh gradient's radial leak: from
                # m_t = beta1 m_{t-1} + (1 - beta1) g_t and w_t = (1 - lr wd) w_{t-1} - lr u_{t-1}
                # (v slow), P (1 - beta1 + beta1 lr wd) = -beta1 + (1 - beta1) Q.
                scale = 1 - beta1 + beta1 * lr * wd
                p_from_q = (-beta1 + (1 - beta1) * q) / scale
                row["radial_P_from_Q"] = p_from_q.mean().item()
                with_q = (2 * lr * wd / (1 - 2 * p_from_q)).mean().sqrt().item()
                row["ratio_with_Q"] = measured / with_q
                # The same balance without the weight's norm: Q = k / Delta with the scale-free
                # leak k = E<w^, g / sqrt(v)> / sqrt(E|u|^2), so a Delta^2 - b Delta = 2 lr wd.
                k = (sums[3] / count) / (sums[1] / count / lr**2).sqrt()
                a, b = 1 + 2 * beta1 / scale, 2 * (1 - beta1) * k / scale
                leak = (b + (b**2 + 8 * lr * wd * a).sqrt()) / (2 * a)
                row["leak_k"] = k.mean().item()
                row["ratio_with_leak"] = measured / leak.square().mean().sqrt().item()
        for horizon in HORIZONS:
            shots = snapshots[i][:: horizon // HORIZONS[0]]
            blocks = [_angles(a, b, invariance).square().mean() for a, b in pairwise(shots)]
            if blocks:
                theta = torch.stack(blocks).mean().sqrt().item()
                row[f"ratio_refined_H{horizon}"] = measured / refined(
                    prediction, measured, theta, horizon
                )
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


MUON = {"lr": 0.02, "weight_decay": 0.1}
CASES = [
    ("probe", "Muon", {"lr": 0.02, "weight_decay": 0.5}, 800),
    ("prototypes", "AdamW", {"lr": 2e-3, "weight_decay": 0.5}, 3000),
    ("prototypes", "SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-3}, 3000),
    ("prototypes", "AdamW", {"lr": 2e-3, "weight_decay": 0.5}, 8000),  # the norm settled
    ("digits", "Muon", MUON, 2000),
    ("digits", "Muon", {**MUON, "nesterov": False, "momentum": 0.9}, 2000),
    ("teacher", "Muon", MUON, 2000),
    ("teacher", "Muon", {**MUON, "nesterov": False, "momentum": 0.9}, 2000),
    ("digits", "AdamW", {"lr": 2e-3, "weight_decay": 0.5}, 2000),
    ("teacher", "AdamW", {"lr": 2e-3, "weight_decay": 0.5}, 2000),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the probe and the convnet runs only")
    parser.add_argument("--only", default=None, help="run only this task")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = CASES[:3] if args.quick else CASES
    if args.only:
        cases = [c for c in cases if c[0] == args.only]
    rows = [row for task, opt, settings, n in cases for row in run(task, opt, settings, n)]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
