"""The actions on real optimizers, without a Trainer: DecayLR's budget on the right clock."""

from __future__ import annotations

import pytest
import torch

from lightning_sdm.actions import ActionContext, DecayLR
from lightning_sdm.records import EquilibriumEvent


def _context(global_per_optimizer_step: int):
    weight = torch.nn.Parameter(torch.ones(4, 4))
    # After a 10x decay: lr 0.01, wd 0.05, no momentum: relaxation (1/(4 lr wd)) = 500 steps.
    optimizer = torch.optim.SGD([weight], lr=0.1, weight_decay=0.05)
    context = ActionContext(
        750,
        {"w": (optimizer, 0)},
        unit_parameters={"w": [weight]},
        total_steps=2000,  # global steps; the final phase starts at 1500
        global_per_optimizer_step=global_per_optimizer_step,
    )
    return context, optimizer


@pytest.mark.parametrize(("per_step", "decays"), [(1, True), (2, False)])
def test_a_decay_too_late_for_the_final_phase_counts_optimizer_steps(per_step, decays):
    # One optimizer: 750 + 500 < 1500, the new phase relaxes in time. Two optimizers stepping
    # each batch (a GAN): 500 optimizer steps are 1000 global steps, 750 + 1000 > 1500.
    context, optimizer = _context(per_step)
    event = EquilibriumEvent(750, ("w",), 1.0, {"w": 0.1}, {"w": 0.1}, "theory")
    done = DecayLR(factor=0.1, final_phase=0.25)(event, context)
    assert (done.action == "decay_lr") == decays
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 if decays else 0.1)
    if not decays:
        assert "would not last one relaxation time" in done.note


def test_the_final_decay_cools_down_for_the_rest_of_the_run_in_optimizer_steps():
    context, _ = _context(2)
    event = EquilibriumEvent(1500, ("w",), 1.0, {"w": 0.1}, {"w": 0.1}, "budget")
    context.global_step = 1500
    done = DecayLR(factor=0.1, final_phase=0.25, cooldown=10)(event, context)
    assert done.cooldown == 250  # 500 global steps left, two per optimizer step


def test_a_decay_under_relative_steps_needs_no_cooldown_for_a_norm_to_relax():
    """Adafactor turns the weight by the new rho_t at once: after DecayLR no norm relaxes, so
    the cooldown is 0 (it was the second moment's memory fed to the norm-relaxation formula,
    35-191 steps of 'relaxing' at ratios 0.96-1.00 in a probe); SGD keeps its wait."""
    adafactor = pytest.importorskip("torch.optim").__dict__.get("Adafactor")
    if adafactor is None:
        pytest.skip("torch.optim.Adafactor needs torch >= 2.5")
    weight = torch.nn.Parameter(torch.randn(8, 8))
    optimizer = adafactor([weight], lr=0.01, weight_decay=0.01)
    for _ in range(50):  # a step count for the memory M = step^0.8
        weight.grad = torch.randn(8, 8)
        optimizer.step()
    context = ActionContext(50, {"w": (optimizer, 0)}, unit_parameters={"w": [weight]})
    event = EquilibriumEvent(50, ("w",), 1.0, {"w": 0.01}, {"w": 0.01}, "theory")
    done = DecayLR(factor=0.5, final_phase=None)(event, context)
    assert done.action == "decay_lr" and optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    assert done.cooldown == 0
    sgd_context, sgd = _context(1)
    done = DecayLR(factor=0.5, final_phase=None)(event, sgd_context)
    assert done.cooldown > 0 and sgd.param_groups[0]["lr"] == pytest.approx(0.05)
