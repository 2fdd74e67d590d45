"""What a new-user probe of the advice found: each case as the user wrote it."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from lightning_sdm import SphericalDynamicsCallback, _messages
from lightning_sdm.advice import _audit as audit
from lightning_sdm.advice._advice import Advice, advise
from lightning_sdm.advice._schedule import ScheduledLR, sample_learning_rates
from lightning_sdm.invariance import find_scale_invariant_units
from lightning_sdm.lightning._trainer import optimizer_budget, steps_per_epoch, trainer_schedules
from lightning_sdm.monitor import SphericalMonitor
from lightning_sdm.theory import for_shape, predict_param_group
from tests.helpers import BNNet, loader, noisy_classification_data, trainer


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


def test_an_unknown_budget_shows_the_known_schedule_and_says_so_once() -> None:
    # It showed one phase "0-1" and no note; the StepLR drops were known all the same.
    opt = _sgd()
    drops = torch.optim.lr_scheduler.StepLR(opt, 10, 0.1)
    advice = advise([opt], {"w": (0, 0)}, None, 100, [ScheduledLR(drops)])
    live = _sgd()
    stepped = torch.optim.lr_scheduler.StepLR(live, 10, 0.1)
    real = []
    for _ in range(40):
        real.append(live.param_groups[0]["lr"])
        live.step()
        stepped.step()
    starts = [phase.start for phase in advice.groups[0].phases]
    jumps = [100 * e for e in range(1, 40) if real[e] != real[e - 1]]
    assert starts[1:4] == jumps[:3]  # 1,000, 2,000, 3,000: then below 1% of the peak, the tail
    assert advice.total_steps is None and advice.note.count("the budget is unknown") == 1
    assert advice.text().count("the budget is unknown") == 1
    assert not any("at the end of the budget" in w for w in advice.warnings())


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


def _four_groups() -> tuple[torch.optim.SGD, dict[str, tuple[int, int]]]:
    weights = [nn.Parameter(torch.ones(8, 8)) for _ in range(5)]
    opt = torch.optim.SGD(
        [
            {"params": [weights[0]], "name": "blocks.0"},
            {"params": [weights[1], weights[2]], "name": "blocks.1"},
            {"params": [weights[3]], "weight_decay": 5e-3},  # a setting of its own
            {"params": [weights[4]]},
        ],
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
    )
    units = {"a": (0, 0), "b": (0, 1), "c": (0, 1), "d": (0, 2), "e": (0, 3)}
    return opt, units


def test_groups_alike_share_one_row_that_names_them_all() -> None:
    # Per-block param groups with the same settings were one block of the table each.
    opt, units = _four_groups()
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, [900], gamma=0.5)
    advice = advise([opt], units, 1000, None, [ScheduledLR(schedule, "step")])
    assert [g.places for g in advice.groups] == [((0, 0), (0, 1), (0, 3)), ((0, 2),)]
    assert sorted(u for g in advice.groups for u in g.units) == sorted(units)  # none lost
    alike, own = advice.groups
    assert alike.units == ("a", "b", "c", "e") and own.units == ("d",)
    assert alike.label == "SGD, optimizer 0 groups 0, 1, 3 (a, b, c, ...)"
    assert own.label == "SGD, optimizer 0 group 2 (d)"
    assert advice.table().count("SGD, optimizer 0 group") == 2
    # The shared advice is each group's own: what advising one of them alone gives.
    (alone,) = advise([opt], {"e": (0, 3)}, 1000, None, [ScheduledLR(schedule, "step")]).groups
    assert alike.prediction == alone.prediction and alike.phases == alone.phases
    assert alike.end_ratio == alone.end_ratio
    # Its notes name every unit it covers.
    (end,) = [note for note in alike.notes if "at the end of the budget" in note]
    assert "4 units (a, b, c, e)" in end
    assert advice.as_dict()["groups"][0]["places"] == [[0, 0], [0, 1], [0, 3]]


def test_groups_under_different_schedules_or_optimizers_stay_apart() -> None:
    opt, units = _four_groups()
    # A LambdaLR with one function per group: group 1's LR halves, the others' do not.
    lambdas = [lambda s: 1.0, lambda s: 0.5 if s >= 900 else 1.0, lambda s: 1.0, lambda s: 1.0]
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    advice = advise([opt], units, 1000, None, [ScheduledLR(schedule, "step")])
    assert [g.places for g in advice.groups] == [((0, 0), (0, 3)), ((0, 1),), ((0, 2),)]
    # The same settings in two optimizers of one class (a GAN's): one row naming both.
    first = torch.optim.SGD([nn.Parameter(torch.ones(4, 4))], lr=0.1, weight_decay=1e-3)
    second = torch.optim.SGD([nn.Parameter(torch.ones(4, 4))], lr=0.1, weight_decay=1e-3)
    adamw = torch.optim.AdamW([nn.Parameter(torch.ones(4, 4))], lr=0.1, weight_decay=1e-3)
    advice = advise([first, second, adamw], {"g": (0, 0), "d": (1, 0), "x": (2, 0)}, 100)
    assert [g.where for g in advice.groups] == [
        "optimizer 0 group 0 + optimizer 1 group 0",
        "optimizer 2 group 0",
    ]


class _Recorder(pl.Callback):
    """The LR of each optimizer step as Lightning runs it, and the sampling ahead at its start."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.sampled: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        budget = optimizer_budget(trainer)
        assert budget is not None
        trajectory = sample_learning_rates(
            optimizer, trainer_schedules(trainer), budget, steps_per_epoch(trainer)
        )
        self.sampled = [trajectory.lr_at(0, step) for step in range(budget)]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


class _StepDecay(BNNet):
    def __init__(self, frequency: int) -> None:
        super().__init__()
        self.frequency = frequency

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        decay = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)
        schedule = {"scheduler": decay, "interval": "step", "frequency": self.frequency}
        return {"optimizer": opt, "lr_scheduler": schedule}


@pytest.mark.parametrize(
    ("accumulate", "frequency", "epochs"),
    [(2, 2, 2), (3, 2, 2), (1, 3, 3)],
    ids=["every_step_not_every_other", "two_per_epoch", "count_restarts_each_epoch"],
)
def test_a_step_scheduler_is_sampled_as_lightning_steps_it(
    tmp_path, accumulate: int, frequency: int, epochs: int
) -> None:
    # Lightning counts a step frequency in batches of the epoch (batch_idx + 1): under
    # accumulate_grad_batches=2, frequency=2 steps the scheduler after every optimizer step,
    # and the count starts again each epoch. The advice sampled every 2nd optimizer step.
    callback, recorder = SphericalDynamicsCallback(every_n_steps=4, window=2), _Recorder()
    limits = {"max_epochs": epochs, "accumulate_grad_batches": accumulate}
    run = trainer(tmp_path, callbacks=[callback, recorder], **limits)
    run.fit(_StepDecay(frequency), loader(noisy_classification_data(samples=320)))  # 10 batches
    assert len(recorder.lrs) == run.global_step == epochs * math.ceil(10 / accumulate)
    assert recorder.sampled == pytest.approx(recorder.lrs, rel=1e-12)
    assert callback.advice is not None and callback.advice.total_steps == run.global_step
    (phase,) = callback.advice.groups[0].phases
    assert phase.lr_end == pytest.approx(recorder.lrs[-1], rel=1e-12)


class _SlowDiscriminator(BNNet):
    """Manual optimization: the second network steps every other batch (a GAN's critic)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.other = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4))
        self.steps = [0, 0]

    def training_step(self, batch, batch_idx):
        x, y = batch
        for index, (optimizer, net) in enumerate(zip(self.optimizers(), (self.net, self.other))):
            if index == 1 and batch_idx % 2:
                continue
            optimizer.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(net(x), y))
            optimizer.step()
            self.steps[index] += 1

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3),
            torch.optim.SGD(self.other.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3),
        )


def test_manual_optimization_says_once_which_step_rate_the_advice_assumes(tmp_path) -> None:
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    run = trainer(tmp_path, callbacks=[callback], max_epochs=10)
    module = _SlowDiscriminator()
    run.fit(module, loader(noisy_classification_data(samples=128)))  # 4 batches per epoch
    assert module.steps == [40, 20]  # unknowable before step 1: training_step decides
    advice = callback.advice
    assert advice is not None and advice.total_steps == 40
    assert advice.note.count("manual optimization") == 1
    assert "assumes that each optimizer steps once per batch (40 steps each)" in advice.note
    assert advice.text().count("manual optimization") == 1
    # Automatic optimization: the Trainer steps the optimizer and the schedulers, no such note.
    automatic = SphericalDynamicsCallback(every_n_steps=4, window=2)
    trainer(tmp_path, callbacks=[automatic], max_epochs=1).fit(
        BNNet(), loader(noisy_classification_data(samples=128))
    )
    assert automatic.advice is not None and "manual" not in automatic.advice.text()


def test_max_steps_between_two_optimizers_steps_leaves_each_the_last_batch(tmp_path) -> None:
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    run = trainer(tmp_path, callbacks=[callback], max_epochs=10, max_steps=61)
    module = _SlowDiscriminator()
    module.training_step = _both_every_batch.__get__(module)  # type: ignore[method-assign]
    run.fit(module, loader(noisy_classification_data(samples=128)))
    assert run.global_step == 62 and module.steps == [31, 31]  # the 31st batch steps both
    assert callback.advice is not None and callback.advice.total_steps == 31  # was 61 // 2


def test_max_steps_shared_by_a_slow_discriminator_is_said_with_its_real_split(tmp_path) -> None:
    # max_steps counts the global step, all optimizers' steps together: a discriminator that
    # steps every other batch leaves the generator more of it. The note said "1/k of those
    # steps" (31 and 16 here); the run takes 41 and 21, what the note now states.
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    run = trainer(tmp_path, callbacks=[callback], max_epochs=100, max_steps=61)
    module = _SlowDiscriminator()
    run.fit(module, loader(noisy_classification_data(samples=128)))
    generator, discriminator = module.steps
    assert callback.advice is not None
    assert "max_steps=61 counts the steps of all 2 optimizers together" in callback.advice.note
    assert f"take {generator} and {discriminator}." in callback.advice.note
    assert "1/k of those steps" not in callback.advice.note
    # Bound by the epochs instead, every batch counts for each: the 1/k reading holds.
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    run = trainer(tmp_path, callbacks=[callback], max_epochs=10, max_steps=1000)
    module = _SlowDiscriminator()
    run.fit(module, loader(noisy_classification_data(samples=128)))
    assert module.steps == [40, 20] and callback.advice is not None
    assert (
        "takes 1/k of those steps" in callback.advice.note
        and "max_steps" not in callback.advice.note
    )


def _both_every_batch(self, batch, batch_idx):
    x, y = batch
    for index, (optimizer, net) in enumerate(zip(self.optimizers(), (self.net, self.other))):
        optimizer.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(net(x), y))
        optimizer.step()
        self.steps[index] += 1


def _no_decay_on_biases(net: nn.Module) -> list[audit.Finding]:
    report = find_scale_invariant_units(net, torch.randn(16, 4))
    decay = [p for p in net.parameters() if p.ndim >= 2]
    rest = [p for p in net.parameters() if p.ndim < 2]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}], lr=0.1
    )
    return audit.audit_param_groups(net, [opt], report.units, report)


def test_a_unit_bias_in_the_no_decay_group_is_one_message_not_two() -> None:
    # The usual recipe (no decay on biases and norms) split each Linear -> norm unit and also
    # reported its bias as an invariant weight without decay: "no equilibrium", which is wrong
    # for a unit whose weight decays.
    net = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8)
    )
    (finding,) = _no_decay_on_biases(net)
    assert finding.kind == "split_unit" and finding.params == ("0.weight", "3.weight")
    assert "0.bias, 3.bias sit in a group without weight decay" in finding.message
    assert "bias=False" in finding.message and "no equilibrium" not in finding.message
    # A unit without decay in all its parts keeps its own finding, beside the split one.
    body = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8))
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), body)
    report = find_scale_invariant_units(net, torch.randn(16, 4))
    decayed = [net[0].weight, net[1].weight, net[1].bias]
    rest = [net[0].bias, *body.parameters()]
    opt = torch.optim.SGD(
        [{"params": decayed, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}], lr=0.1
    )
    found = {f.kind: f for f in audit.audit_param_groups(net, [opt], report.units, report)}
    assert found["invariant_without_decay"].params == ("2.0.weight",)
    assert found["split_unit"].params == ("0.weight",)
    assert "0.bias sit in a group without weight decay" in found["split_unit"].message


def test_a_weight_without_decay_beside_a_decayed_bias_is_a_unit_without_decay() -> None:
    # The reverse split (weight in the no-decay group, bias decayed): the monitor takes the
    # weight's group, which has no weight decay, so the unit has no prediction; the no-decay-bias
    # text ("decayed through its weight ... the prediction of the weight's group") was wrong.
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.LayerNorm(8))
    report = find_scale_invariant_units(net, torch.randn(16, 4))
    decayed = [net[0].weight, net[2].bias]
    rest = [net[0].bias, net[2].weight, *net[1].parameters(), *net[3].parameters()]
    opt = torch.optim.SGD(
        [{"params": decayed, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}], lr=0.1
    )
    found = {f.kind: f for f in audit.audit_param_groups(net, [opt], report.units, report)}
    assert found["invariant_without_decay"].params == ("2.weight",)
    assert found["split_unit"].params == ("0.weight",)  # its weight is decayed: monitored
    assert "2.weight" not in found["split_unit"].message
    monitor = SphericalMonitor(net, opt, report.units)
    assert monitor.predictions()["2.weight"].angular_update is None  # as the finding says


def test_a_unit_split_across_optimizers_gets_one_finding_with_the_fix() -> None:
    # Muon on a matrix, AdamW on its bias: the monitor skips the unit. The audit said besides
    # it "monitored with the prediction of the weight's group", which contradicts the skip.
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    report = find_scale_invariant_units(net, torch.randn(16, 4))
    muon = torch.optim.Muon([net[0].weight], lr=0.02, weight_decay=0.1)
    adamw = torch.optim.AdamW(
        [{"params": [net[0].bias], "weight_decay": 0.0}, {"params": list(net[1].parameters())}]
    )
    findings = audit.audit_param_groups(net, [muon, adamw], report.units, report)
    assert not any("0.weight" in f.params or "0.bias" in f.params for f in findings)
    monitor = SphericalMonitor(net, [muon, adamw], report.units)
    assert monitor.skipped == {"0.weight": _messages.SPLIT_ACROSS_OPTIMIZERS}
    assert "bias=False" in _messages.skipped_units(monitor.skipped)


def test_the_stated_start_says_what_replaces_it_once_a_window_is_measured() -> None:
    # Before step 1 the update size is unknown, so the start is stated (3x above and below);
    # from the first window the monitor's per-unit trajectory starts from the measurement.
    table = advise([_sgd()], {"w": (0, 0)}, 1000).table()
    (line,) = [row for row in table.splitlines() if "from initialisation:" in row]
    assert "the start is stated" in line
    assert "sdm/angular_update_trajectory/<unit>" in line and "for planning only" in line


def test_muon_groups_alike_share_a_row_that_keeps_each_shapes_prediction() -> None:
    # Muon's equilibrium depends on the matrix's aspect ratio: merging two groups alike must
    # not lose it, and the advice gives it per shape as the monitor predicts it per unit.
    q, k = nn.Parameter(torch.randn(64, 64)), nn.Parameter(torch.randn(64, 64))
    up = nn.Parameter(torch.randn(256, 64))
    opt = torch.optim.Muon(
        [{"params": [q, k]}, {"params": [up]}], lr=0.02, weight_decay=0.1, momentum=0.95
    )
    units = {"q": (0, 0), "k": (0, 0), "up": (0, 1)}
    shapes = {"q": (64, 64), "k": (64, 64), "up": (256, 64)}
    advice = advise([opt], units, 1000, shapes=shapes)
    (group,) = advice.groups
    assert group.places == ((0, 0), (0, 1)) and group.units == ("q", "k", "up")
    ((square, v_square, on_square), (tall, v_tall, on_tall)) = group.by_shape
    assert (square, on_square, tall, on_tall) == ((64, 64), ("q", "k"), (256, 64), ("up",))
    for name, value in (("q", v_square), ("up", v_tall)):
        group_index = units[name][1]
        unit = for_shape(predict_param_group(opt, opt.param_groups[group_index]), shapes[name])
        assert value == pytest.approx(unit.angular_update, rel=1e-12)
    assert v_square > v_tall  # a square matrix's equilibrium is the larger
    line = "per matrix shape (Muon's equilibrium depends on its aspect ratio): 64x64: "
    assert line in advice.table() and "256x64: " in advice.table()
    assert advice.as_dict()["groups"][0]["by_shape"][1]["units"] == ["up"]
    # SGD's does not depend on the shape: no such line.
    plain = advise([_sgd()], {"w": (0, 0)}, 1000, shapes={"w": (8, 8)})
    assert plain.groups[0].by_shape == () and "per matrix shape" not in plain.table()
    with pytest.raises(ValueError, match="`shapes` must map each unit's name"):
        advise([opt], units, 1000, shapes={"q": "64x64"})


def test_muon_angle_column_and_console_line_give_the_shapes_not_the_wide_matrix() -> None:
    # The group's own Muon value is a wide matrix's, which no unit here is: the table's angle
    # per phase and the console's one line give what the monitor predicts per unit.
    from lightning_sdm.lightning._notices import _prediction_line

    a, b = nn.Parameter(torch.randn(96, 64)), nn.Parameter(torch.randn(24, 96))
    c = nn.Parameter(torch.randn(24, 24))
    opt = torch.optim.Muon(
        [{"params": [a, b]}, {"params": [c], "lr": 0.01}], lr=0.02, weight_decay=0.1
    )
    drop = torch.optim.lr_scheduler.MultiStepLR(opt, [3], 0.3)
    units = {"a": (0, 0), "b": (0, 0), "c": (0, 1)}
    shapes = {"a": (96, 64), "b": (24, 96), "c": (24, 24)}
    advice = advise([opt], units, 100, 20, [ScheduledLR(drop)], shapes=shapes)
    pair, single = advice.groups

    def unit(name: str, lr: float) -> float:
        group = opt.param_groups[units[name][1]]
        value = for_shape(predict_param_group(opt, {**group, "lr": lr}), shapes[name])
        assert value.angular_update is not None
        return value.angular_update

    rows = [r.split() for r in advice.table().splitlines() if r.strip().startswith(("1 ", "2 "))]
    low, high = sorted((unit("a", 0.02), unit("b", 0.02)))
    assert rows[0][3] == f"{low:.4g}-{high:.4g}"  # 0.0115-0.01231, not the wide 0.01103
    assert rows[1][3] == f"{unit('b', 0.006):.4g}-{unit('a', 0.006):.4g}"
    assert rows[2][3] == f"{unit('c', 0.01):.4g}" and rows[3][3] == f"{unit('c', 0.003):.4g}"
    assert _prediction_line(pair)[1] == pytest.approx((low, high))
    assert _prediction_line(single)[1] == pytest.approx(unit("c", 0.01))  # 0.009047, not 0.0078
