"""The audit's dtype check against what the optimizer really does to low-precision weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sdm.advice import audit_param_groups
from lightning_sdm.invariance import find_scale_invariant_units


def _decayed_norm_ratio(dtype: torch.dtype, lr: float, wd: float) -> float:
    """|w| after 20 AdamW steps with a zero gradient (the decoupled decay alone) over |w|."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(64, 32).to(dtype))
    before = weight.detach().double().norm()
    # eps large enough for float16 (1e-8 underflows: 0 / 0 with a zero gradient).
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=wd, eps=1e-3)
    for _ in range(20):
        weight.grad = torch.zeros_like(weight)
        optimizer.step()
    return float(weight.detach().double().norm() / before)


@pytest.mark.parametrize(
    ("dtype", "lr", "wd"),
    [
        (torch.bfloat16, 1e-3, 1.0),  # lr * wd = 1e-3 < 0.0039: lost
        (torch.bfloat16, 3e-3, 1.0),  # between eps/4 and eps/2: lost for part of the elements
        (torch.bfloat16, 1e-2, 1.0),  # 1e-2: held
        (torch.float16, 1e-4, 1.0),  # 1e-4 < 4.9e-4: lost
        (torch.float32, 1e-4, 0.1),  # 1e-5: held
    ],
)
def test_the_audit_flags_exactly_the_decay_the_dtype_loses(dtype, lr, wd):
    ratio = _decayed_norm_ratio(dtype, lr, wd)
    happened = (1 - ratio) / (1 - (1 - lr * wd) ** 20)  # of the decay AdamW should apply
    lost = happened < 0.9
    net = nn.Sequential(nn.Linear(32, 64, bias=False), nn.LayerNorm(64), nn.Linear(64, 4))
    report = find_scale_invariant_units(net, torch.randn(8, 32))
    net = net.to(dtype)
    optimizer = torch.optim.AdamW(net[0].parameters(), lr=lr, weight_decay=wd)
    findings = audit_param_groups(net, [optimizer], report.units, report)
    flagged = [f for f in findings if f.kind == "decay_lost_to_rounding"]
    assert bool(flagged) == lost, (ratio, findings)
    if flagged:
        assert flagged[0].params == ("0.weight",)
        assert "bf16-mixed" in flagged[0].message and f"{lr * wd:.3g}" in flagged[0].message
