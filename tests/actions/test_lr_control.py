import math

import pytest
import torch
from torch.optim import lr_scheduler

from lightning_sdm.actions._actions import DecayLR
from lightning_sdm.actions._lr_control import (
    check_schedulers_supported,
    decay_param_groups,
    rescale_for_lr_decay,
)
from lightning_sdm.functional import angular_update
from lightning_sdm.theory._predictions import (
    equilibrium_angular_update,
    equilibrium_norm_exponent,
    explain_equilibrium,
)

SCHEDULERS = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=40),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=60),
    "Sequential": lambda opt: lr_scheduler.SequentialLR(
        opt,
        [lr_scheduler.LinearLR(opt, 0.1, total_iters=5), lr_scheduler.ExponentialLR(opt, 0.95)],
        milestones=[5],
    ),
}


def _lrs(make_scheduler, decay_at=None, factor=0.1, steps=50):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    scheduler = make_scheduler(optimizer)
    values = []
    for step in range(steps):
        if step == decay_at:
            decay_param_groups(optimizer, [0], factor, 0.0, [scheduler])
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_decay_multiplies_the_rest_of_the_schedule(name):
    plain = _lrs(SCHEDULERS[name])
    decayed = _lrs(SCHEDULERS[name], decay_at=20)
    assert decayed[:20] == plain[:20]
    for step in range(20, 50):
        assert decayed[step] == pytest.approx(0.1 * plain[step], rel=1e-9, abs=1e-15), step


def test_reduce_on_plateau_keeps_the_decay_and_its_own_reductions():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
    decay_param_groups(optimizer, [0], 0.1, 0.0, [scheduler])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    for _ in range(4):
        scheduler.step(1.0)  # no improvement: the scheduler halves on top of the decay
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)


def test_min_lr_bounds_the_decay_and_only_named_groups_change():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.1}])
    assert decay_param_groups(optimizer, [0], 0.1, 0.05) == [(0.1, 0.05)]
    assert decay_param_groups(optimizer, [0], 0.1, 0.05) == [(0.05, 0.05)]
    assert optimizer.param_groups[1]["lr"] == 0.1


def test_unsupported_scheduler_is_refused_with_the_alternatives():
    class Custom(lr_scheduler.LRScheduler):
        def get_lr(self):
            return [0.1 for _ in self.optimizer.param_groups]

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    message = r"cannot scale the state of Custom.*on_equilibrium='warn'"
    with pytest.raises(ValueError, match=message):
        check_schedulers_supported([Custom(optimizer)])
    check_schedulers_supported([lr_scheduler.StepLR(optimizer, 3)])


def test_rescale_refuses_optimizers_without_known_equilibrium_norm():
    params = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="rescale_weights=True is defined for"):
        DecayLR(rescale_weights=True).setup([torch.optim.RMSprop(params, lr=0.1)], [])
    DecayLR(rescale_weights=True).setup([torch.optim.SGD(params, lr=0.1)], [])
    DecayLR(rescale_weights=True).setup([torch.optim.AdamW(params, lr=0.1)], [])


def _orthogonal_grad(weight, generator):
    noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
    unit = weight / weight.norm()
    return (noise - (noise @ unit) * unit) / weight.norm()


def _rms_after_decay(optimizer_name, rescale, decay=10.0, rows=8, dim=500):
    """Scale-invariant toy problem at equilibrium, LR divided by ``decay``, next 50 steps' RMS."""
    generator = torch.Generator().manual_seed(0)
    weights = [
        torch.nn.Parameter(torch.randn(dim, generator=generator, dtype=torch.float64))
        for _ in range(rows)
    ]
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(weights, lr=0.1, momentum=0.9, weight_decay=5e-3)
        burn_in = 2500
    else:
        optimizer = torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
        burn_in = 4000

    def step():
        for w in weights:
            w.grad = _orthogonal_grad(w.detach(), generator)
        before = [w.detach().clone() for w in weights]
        optimizer.step()
        return [angular_update(b, w.detach()).item() for b, w in zip(before, weights)]

    for _ in range(burn_in):
        step()
    old_theory = equilibrium_angular_update(optimizer)[0]
    decay_param_groups(optimizer, [0], 1 / decay, 0.0)
    if rescale:
        exponent = equilibrium_norm_exponent(explain_equilibrium(optimizer)[0])
        rescale_for_lr_decay(optimizer, [[w] for w in weights], decay, exponent)
    new_theory = equilibrium_angular_update(optimizer)[0]
    assert new_theory == pytest.approx(old_theory / math.sqrt(decay))
    angles = [a for _ in range(50) for a in step()]
    return math.sqrt(sum(a * a for a in angles) / len(angles)) / new_theory


@pytest.mark.slow
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_rescaling_lands_on_the_new_equilibrium_at_once(optimizer_name):
    with_rescale = _rms_after_decay(optimizer_name, rescale=True)
    without = _rms_after_decay(optimizer_name, rescale=False)
    assert with_rescale == pytest.approx(1.0, abs=0.05)
    assert without < 0.75  # the usual dip: the norm is still at the old equilibrium
