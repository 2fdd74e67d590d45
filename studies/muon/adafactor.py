"""Adafactor on real networks: which factor carries measured / predicted.

torch's Adafactor moves row ``i`` of a matrix ``W`` (``rows x cols``) by
``alpha / c * u_i`` with ``alpha = rho_t * max(eps2, RMS(W))``, ``u = g / sqrt(v_hat)`` the
normalised update and ``c = max(1, RMS(u) / d)`` its clipping, after decaying ``W`` by
``1 - lr wd``. Its angle is therefore, to first order,

    theta_i = rho_t * RMS(u) / c * p_i * f_i,
    p_i = |u_i perp w_i| / (sqrt(cols) RMS(u)),    f_i = sqrt(cols) RMS(W) / |w_i|

(``p_i``: the row's share of the update, orthogonal to the row; ``f_i``: the row's norm against
the matrix's, 1 for every row when they are equal; for a whole-matrix unit ``p`` is the
orthogonal share of the whole update and ``f = 1``). The prediction assumes
``RMS(u) / c = min(d, 1, 1 / sqrt(1 + a M))`` and ``p = f = 1``. This study recomputes every
factor in float64 at every step of the second half of a run, from the weights before and after
and the optimizer's state (independently of the package's monitor), and splits
measured / predicted into the product

    update RMS  x  clipping  x  orthogonal share  x  row norms  x  residual

of successive root-mean-square ratios over steps and rows (each adds one factor to the one
before; the residual is the exact angle against the first-order product). Networks: digits'
BatchNorm MLP (64-256-256-10, per-row units), a generated teacher-student regression with
BatchNorm (32-128-192-1, per-row units, dense Gaussian inputs) and a BatchNorm convnet on noisy
generated prototypes (``studies.muon.memory``'s task, per-channel units), each with and without
weight decay. Each row's measured angle is also set against the package's per-row prediction
(:func:`lightning_sdm.theory.for_shape` with the row's ``relative_norm = 1 / f_i``)::

    python -m studies.muon.adafactor            # about 8 minutes on one core
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sdm.theory import for_shape, predict_param_group
from studies.muon.measure import Batches, backward, digits_task, teacher_batches
from studies.muon.memory import prototypes_task
from studies.nets import normed_mlp

FACTORS = ("update_rms", "clipping", "orthogonal", "row_norms", "residual")


def teacher_bn_task(seed: int) -> tuple[Batches, nn.Module, str]:
    """The teacher task of ``studies.muon.measure`` with BatchNorm: per-row units, dense inputs."""
    batch = teacher_batches(seed)
    return batch, normed_mlp([32, 128, 192], 1, activation=nn.GELU), "row"


TASKS = {"digits": digits_task, "teacher_bn": teacher_bn_task, "prototypes": prototypes_task}


def _normalised_update(grad: torch.Tensor, state: dict[str, Any], eps1: float) -> torch.Tensor:
    """``g / sqrt(v_hat)`` from the state after the step, as torch's Adafactor computes it."""
    row, col = state["row_var"].double(), state["col_var"].double()
    v_hat = (row @ col) / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
    return grad / v_hat.clamp(min=eps1 * eps1).sqrt()


def run(task: str, settings: dict[str, Any], steps: int, seed: int = 0) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    batch, model, invariance = TASKS[task](seed)
    # Every weight but the readout's: the two hidden matrices, or the three convolutions.
    hidden = [m.weight for m in model if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    main = torch.optim.Adafactor(hidden, **settings)
    other = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.0)
    loss_fn = nn.MSELoss() if task == "teacher_bn" else nn.CrossEntropyLoss()
    group = main.param_groups[0]
    lr, d, eps2 = group["lr"], group["d"], group["eps"][1]
    eps1 = torch.finfo(torch.float32).eps
    # Per matrix: the running sums of squares of each nested first-order angle, and more.
    names = ("predicted", "unclipped", "clipped", "orthogonal", "row_norms", "measured")
    sums = [dict.fromkeys(names, 0.0) for _ in hidden]
    extra = [
        {"rms_u": [], "clip": [], "f_rms": [], "norm_first": 0.0, "norm_last": 0.0} for _ in hidden
    ]
    # The unfactored second moment with Adafactor's own schedule: splits RMS(u) into the
    # gradient's change in time (g^2 against its average) and the factorisation.
    full = [torch.zeros(h.shape, dtype=torch.float64) for h in hidden]
    full_sq = [0.0 for _ in hidden]
    rows_sq = [torch.zeros(h.shape[0], dtype=torch.float64) for h in hidden]
    rows_pred = [torch.zeros(h.shape[0], dtype=torch.float64) for h in hidden]
    count, late_loss = 0, 0.0
    for step in range(steps):
        loss = backward(model, loss_fn, batch(step), main, other)
        if step >= steps - 100:
            late_loss += loss.item() / 100
        measuring = step >= steps // 2
        if measuring:
            whole = predict_param_group(main, group)
            prediction = whole.angular_update
            before = [h.detach().double().clone() for h in hidden]
            grads = [h.grad.detach().double().clone() for h in hidden]
        for i, h in enumerate(hidden):
            full[i].lerp_(h.grad.detach().double().square(), (step + 1) ** group["beta2_decay"])
            if measuring:
                u_full = h.grad.detach().double() / full[i].clamp(min=eps1 * eps1).sqrt()
                full_sq[i] += u_full.square().mean().item()
        main.step()
        other.step()
        if not measuring:
            continue
        count += 1
        rho = min(lr, 1 / math.sqrt(float(main.state[hidden[0]]["step"])))
        for i, (b, g, h) in enumerate(zip(before, grads, hidden, strict=True)):
            # A convolution is factored over its kernel's two dims, as torch does; its units are
            # its output channels: the rows of the flattened weight.
            u = _normalised_update(g, main.state[h], eps1).flatten(1)
            a, b = h.detach().double().flatten(1), b.flatten(1)
            n = u.numel()
            rms_u = (u.square().sum() / n).sqrt().item()
            clip = max(1.0, rms_u / d)
            rms_w = max(eps2, (b.square().sum() / n).sqrt().item())
            dims: int | tuple[int, int] = 1 if invariance == "row" else (0, 1)
            w_norm = b.norm(dim=dims)
            w_hat = b / (w_norm.unsqueeze(-1) if invariance == "row" else w_norm)
            u_perp = u - (u * w_hat).sum(dims, keepdim=True) * w_hat
            share = (
                math.sqrt(n) * rms_u * (1 if invariance == "matrix" else 1 / math.sqrt(b.shape[0]))
            )
            p = u_perp.norm(dim=dims) / share
            f = rms_w * math.sqrt(n / (b.shape[0] if invariance == "row" else 1)) / w_norm
            cos = (a * b).sum(dims) / (a.norm(dim=dims) * w_norm)
            angle = torch.atan2((1 - cos.clamp(-1, 1) ** 2).clamp(min=0).sqrt(), cos)
            s = sums[i]
            s["predicted"] += prediction**2
            s["unclipped"] += (rho * rms_u) ** 2
            s["clipped"] += (rho * rms_u / clip) ** 2
            s["orthogonal"] += ((rho * rms_u / clip * p) ** 2).mean().item()
            s["row_norms"] += ((rho * rms_u / clip * p * f) ** 2).mean().item()
            s["measured"] += angle.square().mean().item()
            if invariance == "row":
                rows_sq[i] += angle.square()
                # The package's per-row prediction, from the row's norm against the matrix's.
                per_row = [
                    for_shape(whole, b.shape, relative_norm=1 / x).angular_update
                    for x in f.tolist()
                ]
                rows_pred[i] += torch.tensor(per_row, dtype=torch.float64) ** 2
            e = extra[i]
            e["rms_u"].append(rms_u)
            e["clip"].append(clip)
            e["f_rms"].append(f.square().mean().sqrt().item())
            e["norm_last"] = b.norm().item()
            if count == 1:
                e["norm_first"] = b.norm().item()
    out = []
    for i, h in enumerate(hidden):
        s, e = sums[i], extra[i]
        chain = [math.sqrt(s[k] / count) for k in names]
        factors = dict(zip(FACTORS, (chain[j + 1] / chain[j] for j in range(5)), strict=True))
        row: dict[str, Any] = {
            "task": task,
            "settings": {k: str(v) for k, v in settings.items()},
            "matrix": "x".join(map(str, h.shape)),
            "measured": chain[-1],
            "predicted": chain[0],
            "ratio": chain[-1] / chain[0],
            "update_rms_over_size": chain[1] / chain[0],
            **factors,
            "unfactored_rms": math.sqrt(full_sq[i] / count),
            "clipped_update": chain[2] / chain[0],
            "rms_u_range": [min(e["rms_u"]), max(e["rms_u"])],
            "rms_u_median": sorted(e["rms_u"])[len(e["rms_u"]) // 2],
            "clipped_fraction": sum(c > 1 for c in e["clip"]) / len(e["clip"]),
            "f_rms": sum(e["f_rms"]) / len(e["f_rms"]),
            "norm_growth": e["norm_last"] / e["norm_first"],
            "late_loss": late_loss,
            "rule": predict_param_group(main, group).rule,
        }
        if invariance == "row":
            # Per row: measured against the per-row prediction and against the matrix's.
            measured_rows = (rows_sq[i] / count).sqrt()
            per_row = measured_rows / (rows_pred[i] / count).sqrt()
            plain = measured_rows / chain[0]
            row["per_row_spread_plain"] = (plain.std() / plain.mean()).item()
            row["per_row_spread_with_f"] = (per_row.std() / per_row.mean()).item()
            row["ratio_with_f"] = chain[-1] / (rows_pred[i].mean() / count).sqrt().item()
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


CASES = [
    ("digits", {"lr": 0.01, "weight_decay": 0.0}),
    ("digits", {"lr": 0.01, "weight_decay": 0.01}),
    ("teacher_bn", {"lr": 0.01, "weight_decay": 0.0}),
    ("teacher_bn", {"lr": 0.01, "weight_decay": 0.01}),
    ("prototypes", {"lr": 0.01, "weight_decay": 0.0}),
    ("prototypes", {"lr": 0.01, "weight_decay": 0.01}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", type=int, default=None, help="run CASES[only] only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = CASES if args.only is None else [CASES[args.only]]
    rows = [row for task, settings in cases for row in run(task, settings, args.steps)]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
