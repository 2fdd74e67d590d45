"""``CorrectedWeightDecay``: weight decay scaled with ``lr_t / lr_max`` (Defazio et al. 2025).

The physics check is independent of the callback's arithmetic: after an LR decay by 10, a
scale-invariant weight under AdamW turns 10x less per step at once (its norm has not moved), while
the prediction with a fixed weight decay falls only sqrt(10)x, so the measured/predicted ratio drops
to ~0.32 and recovers on the new, much longer relaxation time. With the corrected weight decay the
equilibrium norm does not move, so the ratio must stay near 1 right after the decay.
"""

from __future__ import annotations

import statistics

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_sdm import CorrectedWeightDecay, SphericalDynamicsCallback
from tests.helpers import BNNet, loader, noisy_classification_data, trainer


class Recorder(pl.Callback):
    """The LR and weight decay of every group as each update is about to be applied."""

    def __init__(self) -> None:
        self.rows: list[list[tuple[float, float]]] = []
        self.momenta: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.rows.append([(g["lr"], g["weight_decay"]) for g in optimizer.param_groups])
        self.momenta.append(optimizer.param_groups[0].get("momentum", 0.0))


class OneCycle(BNNet):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=40)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class DecayAt(BNNet):
    """AdamW, LR divided by 10 at optimizer step ``at`` (a per-step MultiStepLR)."""

    def __init__(self, at: int, **kwargs) -> None:
        super().__init__(optimizer="adamw", **kwargs)
        self.at = at

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [self.at], gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _fit(tmp_path, module, callbacks, steps):
    torch.manual_seed(0)
    run = trainer(tmp_path, callbacks=callbacks, max_steps=steps, max_epochs=-1, logger=False)
    run.fit(module, loader(noisy_classification_data(samples=512), shuffle=True))
    return run


def test_the_weight_decay_follows_a_one_cycle_schedule_from_its_peak(tmp_path):
    recorder = Recorder()
    sdm = SphericalDynamicsCallback(every_n_steps=5, window=5)
    corrected = CorrectedWeightDecay()
    run = _fit(tmp_path, OneCycle(weight_decay=5e-3), [sdm, corrected, recorder], 40)
    (base, peak) = corrected.bases[(0, 0)]
    assert (base, peak) == (pytest.approx(5e-3), pytest.approx(0.2))  # the schedule's maximum
    assert len(recorder.rows) == 40
    for (lr, wd), *_ in recorder.rows:
        assert wd == pytest.approx(5e-3 * lr / 0.2, rel=1e-12)
    # The first steps run at max_lr / 25: the decay is 25x weaker there, full at the peak.
    assert sdm.history[0].global_step == 5 and len({r.unit for r in sdm.history[:2]}) == 2
    assert recorder.rows[0][0][1] == pytest.approx(5e-3 / 25, rel=1e-9)
    assert max(row[0][1] for row in recorder.rows) == pytest.approx(5e-3, rel=1e-3)
    # The theory reads the live group: per step lr_t sqrt(2 wd / (lr_max (1 + m_t))) (OneCycle
    # cycles the momentum too), and a window's prediction is the RMS of its steps'. Not the
    # first window: its first step's prediction is read before the units are known, when the
    # weight decay is still the base (the update itself is corrected, see the rows above).
    for record in sdm.history[2:]:
        window = slice(record.global_step - 5, record.global_step)
        per_step = [
            lr * (2 * 5e-3 / (0.2 * (1 + m))) ** 0.5
            for ((lr, _), *_), m in zip(
                recorder.rows[window], recorder.momenta[window], strict=True
            )
        ]
        expected = statistics.fmean(p * p for p in per_step) ** 0.5
        assert record.theory == pytest.approx(expected, rel=1e-9)
    # Given back at the end of fit.
    assert run.optimizers[0].param_groups[0]["weight_decay"] == 5e-3


def _ratios_after(history, start, stop):
    return [r.ratio for r in history if start < r.global_step <= stop and r.ratio is not None]


def test_after_an_lr_decay_the_angular_update_follows_at_once(tmp_path):
    at, after = 400, 60
    settings = {"every_n_steps": 10, "window": 10}
    runs = {}
    for name, extra in (("fixed", []), ("corrected", [CorrectedWeightDecay()])):
        sdm = SphericalDynamicsCallback(**settings)
        module = DecayAt(at, lr=0.01, weight_decay=0.5)  # AdamW tau = 1 / (2 lr wd) = 100 steps
        _fit(tmp_path / name, module, [sdm, *extra], at + after)
        runs[name] = sdm.history
    for history in runs.values():  # in equilibrium before the decay (4 relaxation times)
        assert statistics.median(_ratios_after(history, at - 100, at)) == pytest.approx(1, abs=0.15)
    fixed = statistics.median(_ratios_after(runs["fixed"], at, at + after))
    corrected = statistics.median(_ratios_after(runs["corrected"], at, at + after))
    assert fixed < 0.5, fixed  # ~1/sqrt(10) = 0.32, recovering over ~1000 steps
    assert corrected == pytest.approx(1, abs=0.15), corrected


def test_resume_keeps_the_bases_of_the_first_fit(tmp_path):
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1
    )
    first = CorrectedWeightDecay()
    run = trainer(
        tmp_path,
        callbacks=[SphericalDynamicsCallback(every_n_steps=5, window=5), first, checkpoint],
        max_steps=20,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=True,
    )
    run.fit(OneCycle(weight_decay=5e-3), loader(noisy_classification_data(samples=512)))
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    saved = torch.load(path, weights_only=False)
    # The optimizer state in the file holds the base (a resume without the callback starts
    # from what the user set), the callback's state the bases and peaks...
    assert saved["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 5e-3
    recorder, resumed = Recorder(), CorrectedWeightDecay()
    again = trainer(
        tmp_path,
        callbacks=[SphericalDynamicsCallback(every_n_steps=5, window=5), resumed, recorder],
        max_steps=39,  # a mid-epoch resume steps OneCycleLR once more (41 of 40 would raise)
        max_epochs=-1,
        logger=False,
    )
    again.fit(OneCycle(weight_decay=5e-3), loader(noisy_classification_data(samples=512)),
              ckpt_path=path)  # fmt: skip
    # ... which the resumed run uses (the module below could say anything).
    assert resumed.bases == first.bases
    for (lr, wd), *_ in recorder.rows:
        assert wd == pytest.approx(5e-3 * lr / 0.2, rel=1e-12)
    assert again.optimizers[0].param_groups[0]["weight_decay"] == 5e-3


def test_all_groups_without_the_monitor_and_the_errors(tmp_path):
    recorder, corrected = Recorder(), CorrectedWeightDecay("all")
    _fit(tmp_path, OneCycle(weight_decay=5e-3), [corrected, recorder], 10)
    # 10 of OneCycle's 40 steps: lr_max is the largest LR of this run, reached at its last step.
    (_, peak) = corrected.bases[(0, 0)]
    assert peak == pytest.approx(max(lr for (lr, _), *_ in recorder.rows), rel=1e-12) and peak < 0.2
    assert all(wd == pytest.approx(5e-3 * lr / peak) for (lr, wd), *_ in recorder.rows)
    with pytest.raises(ValueError, match="`groups` must be one of"):
        CorrectedWeightDecay(groups="some")
    with pytest.raises(MisconfigurationException, match="groups='all'"):
        _fit(tmp_path, OneCycle(), [CorrectedWeightDecay()], 5)


class WarmUpFromZero(BNNet):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 8))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_a_warm_up_from_zero_is_not_audited_as_no_weight_decay(tmp_path, recwarn):
    sdm, recorder = SphericalDynamicsCallback(every_n_steps=4, window=4), Recorder()
    _fit(tmp_path, WarmUpFromZero(weight_decay=5e-3), [sdm, CorrectedWeightDecay(), recorder], 12)
    # The audit and the advice at the first batch saw the base weight decay ...
    assert not [w for w in recwarn if "without weight decay" in str(w.message)]
    assert sdm.advice is not None
    # ... while every update, the first (lr 0) included, had the corrected one.
    assert [row[0] for row in recorder.rows[:3]] == [
        (0.0, 0.0),
        (pytest.approx(0.1 / 8), pytest.approx(5e-3 / 8)),
        (pytest.approx(0.1 / 4), pytest.approx(5e-3 / 4)),
    ]


class PerEpochRise(BNNet):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        return [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1 + epoch)]


def test_lr_max_with_accumulation_that_does_not_divide_the_epoch(tmp_path):
    # 8 batches per epoch, accumulate 3: Lightning steps 3 times per epoch (2 + the last one).
    run = trainer(
        tmp_path,
        callbacks=[CorrectedWeightDecay("all")],
        max_epochs=3,
        accumulate_grad_batches=3,
        logger=False,
    )
    corrected = run.callbacks[0]
    torch.manual_seed(0)
    run.fit(PerEpochRise(weight_decay=5e-3), loader(noisy_classification_data(samples=256)))
    assert run.global_step == 9
    assert corrected.bases[(0, 0)] == (pytest.approx(5e-3), pytest.approx(0.3))  # epoch 2's LR


class WarmUp(BNNet):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 0.1, 1.0, total_iters=30)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class StopAfter(pl.Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, *args) -> None:
        trainer.should_stop = trainer.global_step >= self.steps


def test_a_warm_up_without_a_budget_is_corrected_from_its_first_step(tmp_path):
    recorder, corrected = Recorder(), CorrectedWeightDecay("all")
    run = trainer(
        tmp_path,
        callbacks=[corrected, recorder, StopAfter(12)],
        max_steps=-1,
        max_epochs=-1,
        logger=False,
    )
    torch.manual_seed(0)
    run.fit(WarmUp(weight_decay=5e-3), loader(noisy_classification_data(samples=1024)))
    assert run.estimated_stepping_batches == float("inf")
    assert corrected.bases[(0, 0)][1] == pytest.approx(0.1)  # the warm-up's end, sampled ahead
    (lr, wd), *_ = recorder.rows[0]
    assert (lr, wd) == (pytest.approx(0.01), pytest.approx(5e-4))
