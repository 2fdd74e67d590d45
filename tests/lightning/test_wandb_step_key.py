"""The W&B x axis of the ``sdm/*`` metrics is the step key the WandbLogger logs, read from it.

Lightning 2.6's WandbLogger has no setting for that key: ``log_metrics`` adds
``"trainer/global_step"`` (nothing with ``sync_tensorboard=True``, where TensorBoard's
``global_step`` is the axis). :class:`GlobalStepWandbLogger` does what a logger that logs the
step as ``global_step`` does; both spellings are checked by reading the offline run file back.
"""

import json
from pathlib import Path

import pytest
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.loggers import WandbLogger

from lightning_sdm.lightning import _loggers as integrations
from tests.lightning.test_loggers import STEPS, _fit, _wandb_records

UNIT = "net.0.weight"


class GlobalStepWandbLogger(WandbLogger):
    """Logs the step under ``global_step`` and makes it the run's x axis, and says so."""

    _step_key = "global_step"

    @property
    def experiment(self):
        if self._experiment is None:
            import wandb

            self._experiment = wandb.init(**self._wandb_init)
            self._experiment.define_metric(self._step_key)
            self._experiment.define_metric("*", step_metric=self._step_key, step_sync=True)
        return self._experiment

    def log_metrics(self, metrics, step=None):
        metrics = _add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)
        if step is not None:
            metrics = dict(metrics, **{self._step_key: step})
        self.experiment.log(metrics)


def test_the_step_key_is_read_from_the_logger(tmp_path):
    pytest.importorskip("wandb")
    assert integrations.wandb_step_key(WandbLogger(save_dir=str(tmp_path))) == (
        "trainer/global_step"
    )
    synced = WandbLogger(save_dir=str(tmp_path), sync_tensorboard=True)
    assert integrations.wandb_step_key(synced) == "global_step"
    assert integrations.wandb_step_key(GlobalStepWandbLogger(save_dir=str(tmp_path))) == (
        "global_step"
    )
    for attribute in integrations.WANDB_STEP_KEY_ATTRIBUTES:
        logger = WandbLogger(save_dir=str(tmp_path))
        setattr(logger, attribute, "custom/step")
        assert integrations.wandb_step_key(logger) == "custom/step", attribute
        setattr(logger, attribute, "")  # empty: not a key
        assert integrations.wandb_step_key(logger) == "trainer/global_step", attribute


@pytest.mark.usefixtures("wandb_offline")
@pytest.mark.parametrize(
    ("logger_class", "step_key", "other"),
    [
        (WandbLogger, "trainer/global_step", "global_step"),
        (GlobalStepWandbLogger, "global_step", "trainer/global_step"),
    ],
)
def test_sdm_metrics_are_defined_against_the_logged_step_key(
    tmp_path, logger_class, step_key, other
):
    import wandb

    logger = logger_class(save_dir=str(tmp_path), project="lightning-sdm-tests")
    _, callback = _fit(tmp_path, logger)
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()
    (run_file,) = run_dir.glob("run-*.wandb")
    records = _wandb_records(run_file, until="exit")

    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    sdm = [m for m in metrics if m.glob_name == "sdm/*"]
    assert [(m.step_metric, m.options.step_sync) for m in sdm] == [(step_key, True)]
    # The logger's own axis is that key too, and the other spelling is never an axis.
    assert any(m.glob_name == "*" and m.step_metric == step_key for m in metrics)
    assert all(m.step_metric != other for m in metrics)

    # Every row with sdm values carries the step under that key (and never the other one).
    rows = [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    sdm_rows = [row for row in rows if f"sdm/angular_update/{UNIT}" in row]
    assert [json.loads(row[step_key]) for row in sdm_rows] == STEPS
    assert all(other not in row for row in rows)
    logged = [json.loads(row[f"sdm/angular_update/{UNIT}"]) for row in sdm_rows]
    expected = [r.angular_update for r in callback.history if r.unit == UNIT]
    assert logged == pytest.approx(expected, rel=1e-12)
