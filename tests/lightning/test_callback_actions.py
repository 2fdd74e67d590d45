import itertools
import math

import pytest
import torch

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm._messages import describe_event
from lightning_sdm.actions._actions import ActionContext, DecayLR
from lightning_sdm.records import EquilibriumEvent
from lightning_sdm.theory._predictions import lr_change_relaxation_steps, relaxation_steps
from tests import synthetic
from tests.helpers import BNNet, loader, noisy_classification_data, read_csv_metrics, trainer

# Loose detector settings so that short CPU runs see events: the point here is what the
# callback does when equilibrium is reached, not the detection itself
# (tests/equilibrium/test_equilibrium.py).
# Strong weight decay: equilibrium within ~10 steps ((1 - 0.9) / (4 * 0.1 * 0.05) = 5 steps).
WEIGHT_DECAY = 0.05
FAST = {"every_n_steps": 4, "window": 4, "tolerance": 0.3, "patience": 2}


def _fit(tmp_path, callback, module=None, epochs=2, shuffle=False, **kwargs):
    torch.manual_seed(0)
    module = module or BNNet(weight_decay=WEIGHT_DECAY)
    run = trainer(tmp_path, callbacks=[callback], max_epochs=epochs, **kwargs)
    run.fit(module, loader(noisy_classification_data(), shuffle=shuffle))
    return run, module


def test_warn_emits_one_message_per_event(tmp_path):
    callback = SphericalDynamicsCallback(**FAST)
    with pytest.warns(UserWarning, match=r"of the units are in equilibrium .*rad/step vs"):
        _fit(tmp_path, callback)
    assert len(callback.events) >= 1
    event = callback.events[0]
    assert event.action == "warn" and event.criterion == "theory"
    assert set(event.units) <= {"net.0.weight", "net.3.weight"}
    assert all(v is not None for v in event.predicted.values())


def test_decay_lr_decays_waits_for_cooldown_and_logs(tmp_path):
    callback = SphericalDynamicsCallback(on_equilibrium=DecayLR(factor=0.5, cooldown=8), **FAST)
    run, _module = _fit(tmp_path, callback)
    decays = [e for e in callback.events if e.new_lrs]
    assert len(decays) >= 2
    lr = 0.1
    for event in decays:
        assert event.old_lrs == pytest.approx((lr,))
        lr *= 0.5
        assert event.new_lrs == pytest.approx((lr,))
    steps = [e.global_step for e in decays]
    assert all(b - a >= 8 for a, b in itertools.pairwise(steps))
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr)
    rows = [r for r in read_csv_metrics(run) if "sdm/lr_decays" in r]
    assert [r["sdm/lr_decays"] for r in rows] == list(range(1, len(decays) + 1))
    assert [r["step"] for r in rows] == steps
    assert [r["sdm/lr_after_event"] for r in rows] == pytest.approx([e.new_lrs[0] for e in decays])


def test_decay_bounded_by_max_decays_and_min_lr(tmp_path):
    bounded = SphericalDynamicsCallback(
        on_equilibrium=DecayLR(factor=0.5, cooldown=0, max_decays=1), **FAST
    )
    run, _ = _fit(tmp_path, bounded)
    assert sum(1 for e in bounded.events if e.new_lrs) == 1
    assert any(e.action == "none" for e in bounded.events[1:]) or len(bounded.events) == 1
    floor = SphericalDynamicsCallback(
        on_equilibrium=DecayLR(factor=0.1, cooldown=0, min_lr=0.05), **FAST
    )
    run, _ = _fit(tmp_path / "floor", floor)
    assert run.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)
    assert [e.new_lrs for e in floor.events if e.new_lrs] == [pytest.approx((0.05,))]


def test_default_cooldown_is_smd_relaxation_time(tmp_path):
    callback = SphericalDynamicsCallback(on_equilibrium=DecayLR(factor=0.5), **FAST)
    _fit(tmp_path, callback, epochs=1)
    first = next(e for e in callback.events if e.new_lrs)
    # Theory's relaxation to within 5% of the new prediction, with the new LR (0.05).
    tau = relaxation_steps(0.05, WEIGHT_DECAY, momentum=0.9)
    expected = math.ceil(lr_change_relaxation_steps(0.5, tau, tolerance=0.05))
    assert first.cooldown == expected > 0
    decays = [e.global_step for e in callback.events if e.new_lrs]
    assert all(b - a >= expected for a, b in itertools.pairwise(decays))


def test_stop_asks_the_trainer_to_stop(tmp_path):
    callback = SphericalDynamicsCallback(on_equilibrium="stop", **FAST)
    run, _ = _fit(tmp_path, callback, epochs=5)
    assert callback.events[0].action == "stop"
    assert run.global_step == callback.events[0].global_step < 5 * 16


def test_stop_at_min_lr_after_the_decays(tmp_path):
    callback = SphericalDynamicsCallback(
        on_equilibrium=DecayLR(factor=0.5, cooldown=0, max_decays=1, stop_at_min_lr=True),
        **FAST,
    )
    run, _ = _fit(tmp_path, callback, epochs=5)
    assert [e.action for e in callback.events][-1] == "stop"
    assert run.global_step < 5 * 16


def test_callable_receives_trainer_module_and_event(tmp_path):
    seen = []

    def action(trainer, pl_module, event):
        seen.append((trainer.global_step, type(pl_module).__name__, event))

    callback = SphericalDynamicsCallback(on_equilibrium=action, **FAST)
    _fit(tmp_path, callback)
    assert seen and isinstance(seen[0][2], EquilibriumEvent)
    assert seen[0][0] == seen[0][2].global_step and seen[0][1] == "BNNet"
    assert callback.events[0].action == "callable"


def test_a_failing_callable_is_named_after_its_window_and_event_are_recorded(tmp_path):
    def broken_action(trainer, pl_module, event):
        raise KeyError("lr")

    callback = SphericalDynamicsCallback(on_equilibrium=broken_action, **FAST)
    run = trainer(tmp_path, callbacks=[callback], max_epochs=4)
    with pytest.raises(
        RuntimeError,
        match=r"on_equilibrium callable .*broken_action raised at "
        r"global step \d+: KeyError: 'lr'",
    ):
        run.fit(BNNet(weight_decay=WEIGHT_DECAY), loader(noisy_classification_data()))
    (event,) = callback.events
    # The window that triggered the event is in the history and in the logs.
    assert callback.history[-1].global_step == event.global_step
    logged = [row for row in read_csv_metrics(run) if "sdm/equilibrium_fraction" in row]
    assert logged[-1]["step"] == event.global_step


class WithStepLR(BNNet):
    def __init__(self):
        super().__init__(weight_decay=WEIGHT_DECAY)

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.8)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def test_decay_cooperates_with_a_lightning_lr_scheduler(tmp_path):
    callback = SphericalDynamicsCallback(on_equilibrium=DecayLR(factor=0.1, cooldown=1000), **FAST)
    run, _ = _fit(tmp_path, callback, module=WithStepLR())
    event = next(e for e in callback.events if e.new_lrs)
    final = run.optimizers[0].param_groups[0]["lr"]
    schedule_alone = 0.1 * 0.8 ** (run.global_step // 10)
    assert final == pytest.approx(0.1 * schedule_alone)
    assert event.new_lrs[0] == pytest.approx(0.1 * event.old_lrs[0])


class WithCustomScheduler(BNNet):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()

        class Halving(torch.optim.lr_scheduler.LRScheduler):
            def get_lr(self):
                return [0.1 / (1 + self.last_epoch) for _ in self.optimizer.param_groups]

        return {"optimizer": optimizer, "lr_scheduler": Halving(optimizer)}


def test_unsupported_scheduler_fails_before_training(tmp_path):
    callback = SphericalDynamicsCallback(on_equilibrium="decay_lr", **FAST)
    with pytest.raises(ValueError, match="cannot scale the state of Halving"):
        _fit(tmp_path, callback, module=WithCustomScheduler())


def test_rescale_with_an_optimizer_without_known_norm_fails_before_training(tmp_path):
    class RMSpropNet(BNNet):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=1e-3, weight_decay=1e-3)

    callback = SphericalDynamicsCallback(on_equilibrium=DecayLR(rescale_weights=True), **FAST)
    with pytest.raises(ValueError, match="rescale_weights=True is defined for"):
        _fit(tmp_path, callback, module=RMSpropNet())


def test_rescale_divides_the_invariant_weights_by_the_fourth_root(tmp_path):
    norms = []

    class Recording(DecayLR):
        def _rescale(self, context, decay):
            module = context.pl_module.net
            before = (module[0].weight.norm().item(), module[6].weight.norm().item())
            super()._rescale(context, decay)
            after = (module[0].weight.norm().item(), module[6].weight.norm().item())
            norms.append((decay, before, after))

    action = Recording(rescale_weights=True, cooldown=1000)
    callback = SphericalDynamicsCallback(on_equilibrium=action, **FAST)
    _fit(tmp_path, callback)
    assert len(norms) == 1
    decay, before, after = norms[0]
    assert decay == pytest.approx(10.0)
    assert after[0] / before[0] == pytest.approx(10**-0.25, rel=1e-6)
    assert after[1] == before[1]  # the classifier is not scale-invariant: untouched


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_equilibrium": "explode"}, "`on_equilibrium`"),
        ({"on_equilibrium": lambda trainer: None}, "must accept \\(trainer, pl_module, event\\)"),
        ({"quorum": 0.0}, "`quorum`"),
    ],
)
def test_invalid_action_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SphericalDynamicsCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"factor": 1.0}, "`factor`"),
        ({"factor": "0.5"}, "`factor`"),
        ({"min_lr": -1.0}, "`min_lr`"),
        ({"max_decays": -1}, "`max_decays`"),
        ({"max_decays": True}, "`max_decays`"),
        ({"cooldown": -5}, "`cooldown`"),
        ({"rescale_weights": 1}, "`rescale_weights`"),
    ],
)
def test_invalid_decay_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecayLR(**kwargs)


def _decisions(callback):
    return [(e.global_step, e.action, e.old_lrs, e.new_lrs, e.units) for e in callback.events]


def test_resumed_run_makes_the_same_decisions(tmp_path):
    settings = dict(**FAST)
    settings["every_n_steps"], settings["window"] = 5, 3  # windows straddle the epoch boundary
    data = noisy_classification_data()

    def run(callback, epochs, ckpt_path=None, save=None):
        torch.manual_seed(0)
        # A relaxation time short enough for the units to re-equilibrate after the first decay
        # within the 64 steps (a decay before the checkpoint at step 32, one after).
        module = BNNet(weight_decay=4 * WEIGHT_DECAY)
        fit = trainer(
            tmp_path / f"run{epochs}{save is not None}", callbacks=[callback], max_epochs=epochs
        )
        fit.fit(module, loader(data, shuffle=False), ckpt_path=ckpt_path)
        if save:
            fit.save_checkpoint(save)
        return fit

    def decay():  # the first fit has a shorter budget: the budget's own planning is off here
        return DecayLR(factor=0.5, cooldown=6, final_phase=None)

    full = SphericalDynamicsCallback(on_equilibrium=decay(), **settings)
    run(full, epochs=4)
    first = SphericalDynamicsCallback(on_equilibrium=decay(), **settings)
    run(first, epochs=2, save=tmp_path / "mid.ckpt")
    resumed = SphericalDynamicsCallback(on_equilibrium=decay(), **settings)
    run(resumed, epochs=4, ckpt_path=tmp_path / "mid.ckpt")
    assert len(_decisions(full)) >= 2
    assert _decisions(resumed) == _decisions(full)
    keys = [(h.global_step, h.unit) for h in full.history]
    assert [(h.global_step, h.unit) for h in resumed.history] == keys
    for mine, theirs in zip(resumed.history, full.history, strict=True):
        assert mine.angular_update == pytest.approx(theirs.angular_update, rel=1e-6)
        assert mine.in_equilibrium == theirs.in_equilibrium


class AdamWNet(BNNet):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=5.0)


def test_default_cooldown_for_decoupled_weight_decay(tmp_path):
    callback = SphericalDynamicsCallback(on_equilibrium=DecayLR(factor=0.5), **FAST)
    _fit(tmp_path, callback, module=AdamWNet(), epochs=3)
    first = next(e for e in callback.events if e.new_lrs)
    # Decoupled weight decay: |w|^2 relaxes with 1 / (2 lr_new wd), lr_new = 0.005, wd = 5.
    tau = 1 / (2 * 0.005 * 5.0)
    expected = math.ceil(lr_change_relaxation_steps(0.5, tau, tolerance=0.05))
    assert first.cooldown == expected > 0


# ---------------------------------------------------------------------- LR schedules to zero


def _to_zero(kind):
    def make(optimizer):
        if kind == "LinearLR":
            return torch.optim.lr_scheduler.LinearLR(
                optimizer, start_factor=1.0, end_factor=0.0, total_iters=20
            )
        if kind == "LambdaLR":
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / 20))
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[16], gamma=0.0)

    return make


class Scheduled(BNNet):
    def __init__(self, make_scheduler):
        super().__init__(weight_decay=WEIGHT_DECAY)
        self.make_scheduler = make_scheduler

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        schedule = {"scheduler": self.make_scheduler(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}


@pytest.mark.parametrize("kind", ["LinearLR", "LambdaLR", "MultiStepLR"])
def test_a_learning_rate_that_reaches_zero_trains_to_the_end(tmp_path, kind):
    callback = SphericalDynamicsCallback(on_equilibrium=DecayLR(factor=0.5), **FAST)
    run, _ = _fit(tmp_path, callback, module=Scheduled(_to_zero(kind)), epochs=2)
    assert run.global_step == 32  # as without the callback
    last = [record for record in callback.history if record.global_step == 32]
    assert last and all(r.theory == 0.0 and r.ratio is None for r in last)
    assert {r.regime for r in last} == {"no_prediction"}
    assert all(r.regime_note == "lr = 0: the weights do not move" for r in last)


def test_an_action_that_sets_the_learning_rate_to_zero(tmp_path):
    def freeze(trainer, pl_module, event):
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = 0.0

    callback = SphericalDynamicsCallback(on_equilibrium=freeze, **FAST)
    run, _ = _fit(tmp_path, callback, epochs=3)
    assert run.global_step == 48 and callback.events
    after = [r for r in callback.history if r.global_step > callback.events[0].global_step + 4]
    assert after and {r.regime for r in after} == {"no_prediction"}


# ---------------------------------------------------------------------- never while relaxing


@pytest.mark.parametrize(("start", "side"), [(0.3, "from below"), (3.0, "overshoot from above")])
def test_decay_lr_never_fires_while_the_units_still_relax(tmp_path, start, side):
    """The synthetic problem (known physics, tau = 250 steps) approaches its equilibrium from
    below or above; the first decay must come when the noise-free ratio is already within the
    tolerance."""
    torch.manual_seed(0)
    steps = 1500 if start < 1 else 2500
    module = synthetic.ScaleInvariantModule(start=start, dim=64)
    callback = SphericalDynamicsCallback(
        params=["net.weight"], on_equilibrium=DecayLR(factor=0.5), every_n_steps=50
    )
    run = trainer(tmp_path, callbacks=[callback], max_steps=steps, log_every_n_steps=50)
    run.fit(module, synthetic.batches(steps))
    decays = [e for e in callback.events if e.new_lrs]
    assert decays, side
    first = decays[0].global_step
    tau = relaxation_steps(0.1, 1e-3, 0.9)
    deviation = abs(synthetic.model_ratio("sgd", start, tau, first) - 1)
    assert deviation <= 0.1 + 0.03, (side, first, deviation)
    relaxing = [r for r in callback.history if r.global_step < first and r.global_step > 150]
    assert relaxing and all(r.regime == "relaxing" for r in relaxing[:3]), side


# ---------------------------------------------------------------------- the budget


def test_decay_lr_keeps_the_last_phase_of_the_budget():
    """With 1000 steps: decay at equilibrium while a phase of one relaxation time fits before the
    last quarter, skip a decay that would not, and start the last quarter with a decay."""
    weight = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=1e-2)
    action = DecayLR(factor=0.2)  # final_phase=0.25 by default

    def event(step, criterion="theory"):
        return EquilibriumEvent(step, ("w",), 1.0, {"w": 0.0}, {"w": 0.0}, criterion)

    def context(step):
        return ActionContext(step, {"w": (optimizer, 0)}, total_steps=1000)

    # After /5 the relaxation time is (1 - 0.9) / (4 * 0.02 * 0.01) = 125 steps: 500 + 125 < 750.
    done = action(event(500), context(500))
    assert done.new_lrs == pytest.approx((0.02,))
    # After another /5 it would be 625 steps: 700 + 625 > 750, so that decay is skipped.
    skipped = action(event(700), context(700))
    assert skipped.action == "none" and "one relaxation time" in skipped.note
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
    assert [action.deadline(step, 1000) for step in (700, 749, 750)] == [False, False, True]
    assert not action.deadline(750, None)  # unknown budget: equilibrium alone decides
    final = action(event(750, "budget"), context(750))
    assert final.new_lrs == pytest.approx((0.004,)) and final.note.startswith("final decay")
    assert final.cooldown >= 250  # no further decision before the end
    assert not action.deadline(800, 1000)  # once
    assert action.state_dict() == {"decays": 2, "final_done": True}


def test_the_final_phase_starts_between_windows_in_a_real_fit(tmp_path):
    callback = SphericalDynamicsCallback(on_equilibrium=DecayLR(factor=0.5), **FAST)
    _fit(tmp_path, callback, epochs=4)  # 64 steps: the last phase starts at step 48
    final = [e for e in callback.events if e.criterion == "budget"]
    assert len(final) == 1 and final[0].global_step == 48 and final[0].new_lrs
    assert all(e.global_step < 48 for e in callback.events if e.criterion != "budget")
    text = describe_event(final[0], 1)
    assert "the last phase of the budget starts" in text


def test_no_budget_no_final_phase(tmp_path):
    callback = SphericalDynamicsCallback(
        on_equilibrium=DecayLR(factor=0.5, final_phase=None), **FAST
    )
    _fit(tmp_path, callback, epochs=2)
    assert all(e.criterion != "budget" for e in callback.events)
