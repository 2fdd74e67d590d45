"""The contracts Lightning tests for its own callbacks, applied to SphericalDynamicsCallback."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import cloudpickle
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.actions._actions import DecayLR
from tests.helpers import BNNet, loader, noisy_classification_data, sgdm_prediction, trainer


def test_exact_state_key() -> None:
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    assert callback.state_key == (
        "SphericalDynamicsCallback{'params': \"'auto'\", 'granularity': 'layer', "
        "'every_n_steps': 4, 'window': 2, 'horizon': 1, 'verify_steps': 3, "
        "'orthogonality_tolerance': 0.1, 'tolerance': 0.1, 'patience': 3, 'quorum': 1.0, "
        "'action': 'Warn()'}"
    )
    # Resolving every_n_steps from the Trainer does not change the key (checkpoints match).
    resolved = SphericalDynamicsCallback()
    key = resolved.state_key
    resolved.setup(pl.Trainer(log_every_n_steps=7, logger=False), BNNet(), "fit")
    assert resolved.config.every_n_steps == 7 and resolved.state_key == key


def test_instances_differing_only_in_detection_settings_share_a_trainer(tmp_path) -> None:
    strict = SphericalDynamicsCallback(every_n_steps=4, window=2, tolerance=0.05)
    loose = SphericalDynamicsCallback(
        every_n_steps=4, window=2, tolerance=0.2, on_equilibrium="stop"
    )
    run = trainer(tmp_path, callbacks=[strict, loose], enable_checkpointing=False)
    run.fit(BNNet(), loader(noisy_classification_data()))
    assert len(strict.history) == len(loose.history) == 8
    # Identical measurements; only the verdicts may differ.
    assert [r.angular_update for r in strict.history] == [r.angular_update for r in loose.history]


def test_cloudpickle_round_trip_before_and_after_fit(tmp_path) -> None:
    callback = SphericalDynamicsCallback(
        params="re:net\\.(0|3)\\.weight", every_n_steps=4, window=2, on_equilibrium=DecayLR()
    )
    clone = cloudpickle.loads(cloudpickle.dumps(callback))
    assert clone.state_key == callback.state_key
    trainer(tmp_path, callbacks=[callback]).fit(BNNet(), loader(noisy_classification_data()))
    after = cloudpickle.loads(cloudpickle.dumps(callback))
    assert after.state_key == callback.state_key
    assert [r.as_dict() for r in after.history] == [r.as_dict() for r in callback.history]
    # The clone of a fitted callback trains again (its monitor re-attaches to the new Trainer).
    trainer(tmp_path / "again", callbacks=[after]).fit(BNNet(), loader(noisy_classification_data()))
    assert len(after.history) == 2 * len(callback.history)


class Counting(SphericalDynamicsCallback):
    """Counts the Lightning hooks it receives (and still does its work)."""

    HOOKS = (
        "setup",
        "on_fit_start",
        "on_train_batch_start",
        "on_before_backward",
        "on_train_batch_end",
        "on_train_end",
        "teardown",
        "state_dict",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: Counter[str] = Counter()
        for name in self.HOOKS:
            setattr(self, name, self._counted(name, getattr(self, name)))

    def _counted(self, name: str, hook: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return hook(*args, **kwargs)

        return call


class OptimizerHookProbe(pl.Callback):
    """How many step hooks the optimizer carries while training."""

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        optimizer = trainer.optimizers[0]
        self.pre = len(optimizer._optimizer_step_pre_hooks)
        self.post = len(optimizer._optimizer_step_post_hooks)


def test_hooks_run_once_per_event_and_the_callback_list_is_unchanged(tmp_path) -> None:
    callback = Counting(every_n_steps=4, window=2)
    probe = OptimizerHookProbe()
    run = trainer(tmp_path, callbacks=[callback, probe], limit_val_batches=2)
    before = list(run.callbacks)
    module = BNNet()
    data = loader(noisy_classification_data())

    class Validating(BNNet):
        def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.training_step(batch, batch_idx)

        def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.training_step(batch, batch_idx)

    module = Validating()
    run.fit(module, data, data)
    assert list(run.callbacks) == before
    batches = 16
    assert callback.calls == {
        "setup": 1,
        "on_fit_start": 1,
        "on_train_batch_start": batches,
        "on_before_backward": batches,
        "on_train_batch_end": batches,
        "on_train_end": 1,
        "teardown": 1,
    }
    assert (probe.pre, probe.post) == (1, 1)  # one pre- and one post-hook, however many steps
    assert callback.monitor is not None
    assert all(not watch.handles for watch in callback.monitor._watches)  # removed at teardown
    windows = len(callback.history)
    run.validate(module, data)
    run.test(module, data)
    assert list(run.callbacks) == before
    assert len(callback.history) == windows  # validate/test take no optimizer step
    assert callback.calls["setup"] == callback.calls["teardown"] == 3
    assert callback.calls["on_train_batch_start"] == batches


def test_restore_from_a_mid_run_model_checkpoint(tmp_path) -> None:
    data = noisy_classification_data()

    def fit(callbacks, epochs, ckpt_path=None):
        torch.manual_seed(0)
        run = trainer(tmp_path, callbacks=callbacks, max_epochs=epochs, enable_checkpointing=True)
        run.fit(BNNet(), loader(data, shuffle=False), ckpt_path=ckpt_path)
        return run

    full = SphericalDynamicsCallback(every_n_steps=6, window=4)
    fit([full], epochs=3)
    # At the end of the first epoch (step 16): inside the window of steps 15-18. (A checkpoint
    # in mid-epoch would restart that epoch's data on resume: not the same run.)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    first = SphericalDynamicsCallback(every_n_steps=6, window=4)
    fit([first, saver], epochs=2)
    mid = tmp_path / "ckpt" / "epoch=0-step=16.ckpt"
    assert mid.exists()
    resumed = SphericalDynamicsCallback(every_n_steps=6, window=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([resumed], epochs=3, ckpt_path=mid)
    assert not any("written with other settings" in str(w.message) for w in caught)
    assert [(r.global_step, r.unit) for r in resumed.history] == [
        (r.global_step, r.unit) for r in full.history
    ]
    for mine, theirs in zip(resumed.history, full.history, strict=True):
        assert mine.angular_update == pytest.approx(theirs.angular_update, rel=1e-9)
        assert mine.regime == theirs.regime


class NoDecayOnBiases(BNNet):
    """The usual recipe: weights decayed, biases and norm parameters in a group without decay."""

    def configure_optimizers(self):
        named = list(self.named_parameters())
        decayed = [p for n, p in named if n.endswith("weight") and p.ndim > 1]
        others = [p for n, p in named if not (n.endswith("weight") and p.ndim > 1)]
        return torch.optim.SGD(
            [{"params": decayed, "weight_decay": 5e-3}, {"params": others, "weight_decay": 0.0}],
            lr=0.1,
            momentum=0.9,
        )


def test_units_split_by_a_no_decay_group_for_biases_are_monitored(tmp_path) -> None:
    callback = SphericalDynamicsCallback(every_n_steps=4, window=4)
    with pytest.warns(UserWarning, match="weight and bias sit in different param groups"):
        trainer(tmp_path, callbacks=[callback], max_steps=8).fit(
            NoDecayOnBiases(), loader(noisy_classification_data())
        )
    # The weight + bias units (Linear before BatchNorm) were skipped before, silently.
    assert callback.monitor is not None
    assert set(callback.monitor.units) == {"net.0.weight", "net.3.weight"}
    (_, group) = callback.monitor.parameter_groups()["net.0.weight"]
    assert group == 0  # the weight's group gives the prediction
    records = [r for r in callback.history if r.global_step == 8]
    assert len(records) == 2
    for record in records:
        assert record.theory == pytest.approx(sgdm_prediction(0.1, 5e-3, 0.9), rel=1e-9)
