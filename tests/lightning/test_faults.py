"""Faults around the callback that must not cost the run: loggers that fail, a second fit on
another model, damaged checkpoint states."""

from __future__ import annotations

import csv as csv_module
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger

from lightning_sdm import SphericalDynamicsCallback
from tests.helpers import BNNet, loader, noisy_classification_data, trainer

STEPS = 20


class Refusing(Logger):
    """A logger that works, then raises from global step ``from_step`` on (a full disk)."""

    def __init__(self, from_step: int) -> None:
        super().__init__()
        self.from_step, self.steps = from_step, []

    @property
    def name(self) -> str:
        return "refusing"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is not None and step >= self.from_step:
            raise OSError(28, "No space left on device")
        self.steps.append(step)


def _fit(tmp_path, loggers, model=None, **callback_settings):
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2, **callback_settings)
    run = trainer(tmp_path, callbacks=[callback], logger=loggers, max_steps=STEPS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(model or BNNet(), loader(noisy_classification_data(samples=1024)))
    texts = [str(w.message) for w in caught]
    return callback, run, texts


def test_a_logger_that_fails_is_reported_once_and_training_goes_on(tmp_path):
    refusing = Refusing(from_step=12)
    csv = CSVLogger(tmp_path, name="csv")
    callback, run, texts = _fit(tmp_path, [refusing, csv])
    assert run.global_step == STEPS  # trained to the end
    assert sorted({r.global_step for r in callback.history}) == [4, 8, 12, 16, 20]
    assert refusing.steps == [4, 8]  # what it took before the fault
    (warning,) = [t for t in texts if "log_metrics failed" in t]
    assert "Refusing.log_metrics failed at global step 12" in warning
    assert "OSError" in warning and "training continues" in warning
    # The other logger got every window.
    csv.save()
    with (Path(csv.log_dir) / "metrics.csv").open() as handle:
        rows = list(csv_module.DictReader(handle))
    logged = [row for row in rows if row.get("sdm/angular_update_ratio")]
    assert [int(row["step"]) for row in logged] == [4, 8, 12, 16, 20]


def test_a_finished_wandb_run_does_not_stop_training(tmp_path, wandb_offline):
    from lightning.pytorch.loggers import WandbLogger

    class FinishRun(pl.Callback):  # the W&B run ends under the logger (a crash of the service)
        def on_train_batch_end(self, trainer, *args: Any) -> None:
            if trainer.global_step == 10:
                wandb_logger.experiment.finish()

    wandb_logger = WandbLogger(project="faults", save_dir=str(tmp_path))
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    run = trainer(tmp_path, callbacks=[FinishRun(), callback], logger=wandb_logger, max_steps=STEPS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(BNNet(), loader(noisy_classification_data(samples=1024)))
    assert run.global_step == STEPS
    assert sorted({r.global_step for r in callback.history}) == [4, 8, 12, 16, 20]
    failed = [str(w.message) for w in caught if "WandbLogger.log_metrics failed" in str(w.message)]
    assert len(failed) == 1 and "at global step 12" in failed[0]


def test_a_second_fit_on_another_model_finds_that_models_units(tmp_path):
    callback, _, _ = _fit(tmp_path, CSVLogger(tmp_path, name="first"))
    assert {r.unit for r in callback.history} == {"net.0.weight", "net.3.weight"}

    class Other(BNNet):  # other names, and one more invariant layer
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(16, 32),
                torch.nn.BatchNorm1d(32),
                torch.nn.ReLU(),
                torch.nn.Linear(32, 32),
                torch.nn.BatchNorm1d(32),
                torch.nn.ReLU(),
                torch.nn.Linear(32, 32, bias=False),
                torch.nn.LayerNorm(32),
                torch.nn.Linear(32, 4),
            )

    second_logger = CSVLogger(tmp_path, name="second")
    run = trainer(tmp_path, callbacks=[callback], logger=second_logger, max_steps=STEPS)
    first = len(callback.history)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        run.fit(Other(), loader(noisy_classification_data(samples=1024)))
    second = {r.unit for r in callback.history[first:]}
    assert second == {"net.0.weight", "net.3.weight", "net.6.weight"}
    assert callback.monitor is not None and "net.6.weight" in callback.monitor.units


@pytest.mark.parametrize(
    "damage",
    [
        {"history": [{"unit": "w"}]},  # a record without its fields
        {"units": [{"name": 3}]},
        {"detector": "not a dict"},
        {"policy": {"events": [{"global_step": "x"}]}},
        {"detector": {"net.0.weight": {"samples": 5}}},  # failed at the first window after resume
        {"detector": {"net.0.weight": {"relax_until": "soon"}}},
        {"monitor": {"steps_done": ["abc"]}},  # failed at the first batch after resume
        {"monitor": {"window_statistics": [torch.zeros(1, 1, 3)]}},
        {"history": [{"unit": "w", "optimizer_step": 1, "global_step": "x"}]},
    ],
)
def test_a_damaged_state_names_the_callback_and_the_checkpoint(damage):
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    state = {**callback.state_dict(), **damage}
    with pytest.raises(ValueError, match=r"SphericalDynamicsCallback.*checkpoint"):
        callback.load_state_dict(state)


def test_a_state_that_cannot_be_read_leaves_the_callback_as_it_was():
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    before = callback.state_dict()
    with pytest.raises(ValueError, match="Nothing of it was applied"):
        callback.load_state_dict({**before, "detector": {"w": {"regime": "gone"}}})
    assert callback.state_dict() == before


def test_units_no_optimizer_updates_are_said_once(tmp_path):
    class Frozen(BNNet):  # the only invariant layer is frozen and left out of the optimizer
        def configure_optimizers(self):
            self.net[0].requires_grad_(False)
            trained = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.SGD(trained, lr=0.1, weight_decay=5e-3)

    callback = SphericalDynamicsCallback(params=["net.0.*"], every_n_steps=4, window=2)
    run = trainer(tmp_path, callbacks=[callback], logger=False, max_steps=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(Frozen(), loader(noisy_classification_data(samples=512)))
    said = [str(w.message) for w in caught if "measures nothing" in str(w.message)]
    assert len(said) == 1 and "net.0.weight" in said[0] and "not updated" in said[0]
    assert callback.history == [] and run.global_step == 8
