"""What a new-user probe of the advice found: each case as the user wrote it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_sdm.advice._advice import Advice, advise
from lightning_sdm.advice._schedule import ScheduledLR
from lightning_sdm.lightning._trainer import optimizer_budget


def _sgd() -> torch.optim.SGD:
    weight = nn.Parameter(torch.ones(8, 8))
    return torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=1e-4)


@pytest.mark.parametrize("bad", [0, -1, True, False, 2.5, 100.0, "100"])
def test_a_budget_that_is_not_a_positive_integer_is_refused_naming_the_fix(bad) -> None:
    # 0 used to be read as an unknown budget (a falsy check): one phase of one step, no checks.
    with pytest.raises(ValueError, match=r"`total_steps` must be a positive integer.*or None"):
        advise([_sgd()], {"w": (0, 0)}, bad)


def test_zero_says_why_and_a_numpy_budget_is_a_budget() -> None:
    with pytest.raises(ValueError, match="a budget of no steps has nothing to advise on"):
        advise([_sgd()], {"w": (0, 0)}, 0)
    advice = advise([_sgd()], {"w": (0, 0)}, np.int64(1000))
    assert advice.total_steps == 1000 and type(advice.total_steps) is int
    assert advice.groups[0].phases[-1].end == 1000
    assert advise([_sgd()], {"w": (0, 0)}, None).total_steps is None


def test_a_trainer_without_a_step_has_no_budget_rather_than_a_refused_one() -> None:
    class NoStep:  # Trainer(max_steps=0): the callback must not hand advise() a 0
        estimated_stepping_batches, max_steps = 0, 0

    assert optimizer_budget(NoStep()) is None


def _halved_at(milestone: int, gamma: float, tolerance: float) -> Advice:
    weight = nn.Parameter(torch.ones(8, 8))
    opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=1e-3)  # tau 250 steps
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, [milestone], gamma=gamma)
    return advise(
        [opt], {"w": (0, 0)}, 1000, None, [ScheduledLR(schedule, "step")], tolerance=tolerance
    )


def test_a_small_tolerance_prints_as_itself_not_as_zero_percent() -> None:
    text = _halved_at(900, 0.5, 1e-12).text()
    assert "0%" not in text.replace("10%", "")  # "within 0%" was every tolerance below 0.5%
    assert "within 1e-10% (norm balance)" in text
    assert "beyond the 1e-10% tolerance" in text and "to get within 1e-10%." in text
    assert "within 12.5% (norm balance)" in _halved_at(900, 0.5, 0.125).table()


def test_a_lag_beyond_a_small_tolerance_is_not_printed_as_1x() -> None:
    # A 1% LR drop 100 steps (0.4 tau) before the end: the angle lags by a few 1e-3.
    advice = _halved_at(900, 0.99, 1e-4)
    ratio = advice.groups[0].end_ratio
    assert ratio is not None and 1e-4 < 1 - ratio < 0.005
    (end,) = [line for line in advice.warnings() if "at the end of the budget" in line]
    shown = float(end.split("is expected at ")[1].split("x its equilibrium")[0])
    assert shown != 1 and abs(shown - ratio) <= 0.01 * (1 - ratio)  # "1x" before
