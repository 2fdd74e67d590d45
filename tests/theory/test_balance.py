"""The radial balance (``UnitWindow.balance``) against the simulation, where the truth is known.

On white gradient noise the update's radial part is the a-priori one, so the balance must read
the prediction, settled or not; where the norm has settled it must read the measured angle; and
while the norm is far from its equilibrium the whole deviation of measured / predicted must be
in measured / balance. SGD's radial part is fixed by momentum and weight decay, whatever the
gradients: its balance is its prediction, and a settled run with persistent gradients reads it.
The real-network numbers (the fan-in-9 convolution under AdamW, Muon's matrices) are in
``docs/muon.md`` (``studies/muon/balance.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_sdm import SphericalMonitor, Unit
from lightning_sdm.records import UnitWindow
from lightning_sdm.theory import predict_param_group, simulate_scale_invariant
from lightning_sdm.theory._balance import balance_kind, decoupled_decay

pytestmark = pytest.mark.usefixtures("one_thread")


def _monitored(make, *, burn_in, steps, layer=False, **kwargs) -> list[UnitWindow]:
    """The simulation's weight watched by a monitor from ``burn_in`` on, every step."""
    monitors: list[SphericalMonitor] = []

    def attach(step: int, optimizer: torch.optim.Optimizer) -> None:
        if step == burn_in:
            module = nn.Module()
            module.weight = optimizer.param_groups[0]["params"][0]
            unit = Unit("weight", ("weight",), channel_invariant=not layer)
            granularity = "layer" if layer else "channel"
            monitors.append(
                SphericalMonitor(
                    module, optimizer, [unit], every_n_steps=50, window=50, granularity=granularity
                ).attach()
            )

    simulate_scale_invariant(make, steps=steps, burn_in=burn_in, before_step=attach, **kwargs)
    return monitors[0].pop_windows()


def _rms(values) -> float:
    values = list(values)
    return math.sqrt(sum(v * v for v in values) / len(values))


def _ratios(windows: list[UnitWindow]) -> tuple[float, float]:
    """(measured / balance, balance / a priori) pooled over the windows."""
    measured = _rms(w.angular_update for w in windows)
    balance = _rms(w.balance for w in windows)
    return measured / balance, balance / _rms(w.theory for w in windows)


def test_adamw_settled_balance_reads_the_measured_angle_and_the_prediction():
    windows = _monitored(
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5),
        burn_in=1500,
        steps=500,
        rows=16,
        dim=128,
        dtype=torch.float32,
    )
    settled, radial = _ratios(windows)
    assert settled == pytest.approx(1.0, abs=0.01)
    assert radial == pytest.approx(1.0, abs=0.01)  # white noise: beta1's radial part


def test_muon_matrix_balance_reads_the_measured_angle():
    windows = _monitored(
        lambda p: torch.optim.Muon(p, lr=0.02, weight_decay=0.1),
        burn_in=1000,
        steps=500,
        rows=32,
        dim=64,
        invariance="matrix",
        layer=True,
        dtype=torch.float32,
    )
    settled, radial = _ratios(windows)
    assert settled == pytest.approx(1.0, abs=0.01)
    # Against the prediction: the tabulated R of torch's Newton-Schulz (within 4% in test_muon).
    assert radial == pytest.approx(1.0, abs=0.04)


@pytest.mark.parametrize(("start", "low", "high"), [(4.0, 0.35, 0.85), (0.3, 1.02, 1.3)])
def test_a_norm_far_from_its_equilibrium_is_the_norm_not_the_radial_part(start, low, high):
    """From 4x or 0.3x the equilibrium norm the angle reads far from the prediction; the radial
    part is still white noise's, so the balance stays at the prediction and measured / balance
    carries the whole deviation. (Earlier than 50 steps from a small norm the balance reads up to
    7% low: the gradient's scale falls as the norm grows, faster than Adam's second moment
    follows, and the update's radial part is not yet white noise's.)"""
    windows = _monitored(
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5),
        burn_in=50,
        steps=200,
        rows=16,
        dim=128,
        initial_norm=start * math.sqrt(0.01 * 128 / (2 * 0.5)),
        dtype=torch.float32,
    )
    for window in windows:
        assert window.theory is not None and window.balance is not None
        assert low < window.ratio < high
        assert window.balance / window.theory == pytest.approx(1.0, abs=0.03)
        assert window.angular_update / window.balance == pytest.approx(window.ratio, rel=0.03)


def test_sgd_balance_is_its_prediction_whatever_the_gradients_persistence():
    """With heavy-ball momentum and a gradient orthogonal to the weight, the norm balance fixes
    the radial part exactly: the settled angle reads the prediction with gradients persistent
    over 50 steps (correlation 0.98), and the balance is the prediction."""
    windows = _monitored(
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-3),
        burn_in=600,
        steps=600,
        rows=16,
        dim=128,
        correlation=0.98,
    )
    assert all(w.balance == w.theory for w in windows)
    assert _ratios(windows)[0] == pytest.approx(1.0, abs=0.02)


def test_which_groups_have_a_balance():
    w = nn.Parameter(torch.ones(4, 4))

    def first(optimizer):
        return predict_param_group(optimizer, optimizer.param_groups[0])

    adamw = first(torch.optim.AdamW([w], lr=1e-3, weight_decay=0.1))
    assert balance_kind(adamw) == "measured"
    assert decoupled_decay(adamw) == pytest.approx(1e-4)
    decoupled = first(torch.optim.Adam([w], weight_decay=0.1, decoupled_weight_decay=True))
    assert balance_kind(decoupled) == "measured"
    assert balance_kind(first(torch.optim.Adam([w], weight_decay=0.1))) is None  # coupled L2
    assert balance_kind(first(torch.optim.AdamW([w], weight_decay=0.0))) is None
    assert balance_kind(first(torch.optim.SGD([w], lr=0.1, weight_decay=1e-4))) == "a priori"
    assert balance_kind(first(torch.optim.Adafactor([w], lr=0.01, weight_decay=0.01))) is None
    # Muon decays with the unadjusted lr whatever adjust_lr_fn scales its update by.
    muon = first(torch.optim.Muon([w], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"))
    assert decoupled_decay(muon) == pytest.approx(0.002)


def test_adafactor_and_coupled_adam_windows_have_no_balance():
    for make in (
        lambda p: torch.optim.Adafactor(p, lr=0.01, weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
    ):
        windows = _monitored(make, burn_in=0, steps=100, rows=4, dim=16)
        assert windows and all(w.balance is None for w in windows)
