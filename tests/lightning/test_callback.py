import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_sdm import HistoryRecord, SphericalDynamicsCallback
from lightning_sdm.functional import angles_from_statistics, angular_update_statistics
from lightning_sdm.keys import REGIME_CODES
from lightning_sdm.records import REGIMES
from tests.helpers import (
    BNNet,
    WeightRecorder,
    loader,
    noisy_classification_data,
    read_csv_metrics,
    sgdm_prediction,
    trainer,
)

UNITS = ["net.0.weight", "net.3.weight"]


def _fit(tmp_path, callback, module=None, data=None, **trainer_kwargs):
    module = module or BNNet()
    run = trainer(tmp_path, callbacks=[callback], **trainer_kwargs)
    run.fit(module, loader(data or noisy_classification_data()))
    return run, module


def test_auto_detection_logs_exact_keys_and_values(tmp_path):
    torch.manual_seed(0)
    callback = SphericalDynamicsCallback(every_n_steps=4, window=4)
    run, _ = _fit(tmp_path, callback, max_epochs=2)
    assert callback.report is not None and callback.report.method == "trace"
    assert callback.monitor is not None
    assert callback.monitor.units == UNITS
    rows = read_csv_metrics(run)
    logged = [row for row in rows if "sdm/angular_update_ratio" in row]
    assert len(logged) == run.global_step // 4 == 8
    expected_keys = {
        "sdm/angular_update_ratio",
        "sdm/equilibrium_fraction",
        "sdm/steps_to_equilibrium",
        "sdm/tolerance_band/lower",
        "sdm/tolerance_band/upper",
        "step",
    }
    for unit in UNITS:
        for prefix in [
            "angular_update",
            "angular_update_theory",
            "angular_update_ratio",
            "angular_update_trajectory",  # NaN at the first window
            "angular_update_balance",
        ]:
            expected_keys.add(f"sdm/{prefix}/{unit}")
        expected_keys.add(f"sdm/weight_norm/{unit}")
        expected_keys.add(f"sdm/in_equilibrium/{unit}")
        expected_keys.add(f"sdm/regime/{unit}")
    assert set(logged[-1]) == expected_keys  # log_level="summary": no regime counts
    tolerance = callback.detector.tolerance
    assert logged[-1]["sdm/tolerance_band/lower"] == pytest.approx(1 - tolerance)
    assert logged[-1]["sdm/tolerance_band/upper"] == pytest.approx(1 + tolerance)
    theory = sgdm_prediction(0.1, 5e-3, 0.9)
    for row in logged:
        for unit in UNITS:
            assert row[f"sdm/angular_update_theory/{unit}"] == pytest.approx(theory, rel=1e-12)
            # SGD's radial part is fixed by momentum and weight decay: its balance is theory's.
            assert row[f"sdm/angular_update_balance/{unit}"] == pytest.approx(theory, rel=1e-12)
            ratio = row[f"sdm/angular_update/{unit}"] / theory
            assert row[f"sdm/angular_update_ratio/{unit}"] == pytest.approx(ratio, rel=1e-9)
        ratios = [row[f"sdm/angular_update_ratio/{u}"] for u in UNITS]
        assert row["sdm/angular_update_ratio"] == pytest.approx(sum(ratios) / 2, rel=1e-9)
    # Windows close after optimizer steps 4, 8, ...: logged at that global step.
    assert [row["step"] for row in logged] == [4 * (i + 1) for i in range(8)]
    assert "sdm_ratio" in run.progress_bar_metrics
    assert len(callback.history) == 2 * 8
    assert {"global_step", "optimizer_step", "unit", "angular_update", "theory", "ratio"} <= set(
        callback.history[0].as_dict()
    )
    assert all(entry.invariance == "verified" for entry in callback.history)
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(callback.history)  # the README's notebook recipe
    assert len(frame) == 16 and {"unit", "global_step", "optimizer_step", "ratio"} <= set(frame)
    assert frame.groupby("unit")["ratio"].count().to_dict() == {unit: 8 for unit in UNITS}


def test_values_equal_an_independent_computation(tmp_path):
    torch.manual_seed(1)
    members = {
        "net.0.weight": ("net.0.weight", "net.0.bias"),
        "net.3.weight": ("net.3.weight", "net.3.bias"),
    }
    recorder = WeightRecorder(members)
    callback = SphericalDynamicsCallback(every_n_steps=3, window=2)
    module = BNNet()
    run = trainer(tmp_path, callbacks=[callback, recorder], max_epochs=1)
    run.fit(module, loader(noisy_classification_data(samples=320)))
    snaps = recorder.snapshots
    for entry in callback.history:
        step, unit = entry.global_step, entry.unit
        angles = []
        for s in (step - 1, step):  # the window: the last 2 steps of the interval
            stats = angular_update_statistics(snaps[s - 1][unit], snaps[s][unit])
            angles.append(angles_from_statistics(stats.sum(dim=0)).item())
        rms = math.sqrt(sum(a * a for a in angles) / 2)
        assert entry.angular_update == pytest.approx(rms, rel=1e-9)
        params = snaps[step][unit]
        norm = math.sqrt(sum(p.double().square().sum().item() for p in params))
        assert entry.weight_norm == pytest.approx(norm, rel=1e-9)


def test_channel_granularity_logs_summaries(tmp_path):
    torch.manual_seed(2)
    callback = SphericalDynamicsCallback(granularity="channel", every_n_steps=4, window=4)
    run, _ = _fit(tmp_path, callback)
    last = [row for row in read_csv_metrics(run) if "sdm/equilibrium_fraction" in row][-1]
    for unit in UNITS:
        values = [last[f"sdm/angular_update/{unit}/{k}"] for k in ("min", "median", "max")]
        assert values[0] <= values[1] <= values[2]
        assert last[f"sdm/angular_update/{unit}/std"] >= 0
        assert f"sdm/angular_update_ratio/{unit}/mean" in last
        assert f"sdm/angular_update/{unit}" not in last


def test_gradient_accumulation_measures_real_optimizer_steps(tmp_path):
    torch.manual_seed(3)
    callback = SphericalDynamicsCallback(every_n_steps=2, window=2)
    run, _ = _fit(tmp_path, callback, accumulate_grad_batches=4)
    assert run.global_step == 4  # 16 batches / 4
    steps = sorted({entry.global_step for entry in callback.history})
    assert steps == [2, 4]
    windows = callback.monitor._watches[0]
    assert windows.steps_done == 4


class ManualSkippingModule(BNNet):
    """Manual optimization that skips ``optimizer.step()`` on odd batches (like a scaler skip)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.real_steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        if batch_idx % 2 == 0:
            opt.step()
            self.real_steps += 1


def test_manual_optimization_and_skipped_steps(tmp_path):
    torch.manual_seed(4)
    callback = SphericalDynamicsCallback(every_n_steps=2, window=1)
    module = ManualSkippingModule()
    _fit(tmp_path, callback, module=module)
    assert module.real_steps == 8
    assert callback.monitor._watches[0].steps_done == 8
    assert sorted({e.global_step for e in callback.history}) == [2, 4, 6, 8]


class TwoOptimizers(BNNet):
    second_every = 1  # the second optimizer steps on every `second_every`-th batch

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        first, second = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        if batch_idx % self.second_every == self.second_every - 1:
            second.step()

    def configure_optimizers(self):
        net = self.net
        body = [*net[0].parameters(), *net[1].parameters()]
        rest = [p for p in self.parameters() if all(p is not q for q in body)]
        return (
            torch.optim.SGD(body, lr=0.1, momentum=0.9, weight_decay=1e-3),
            torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99)),
        )


def test_several_optimizers_each_with_its_own_theory(tmp_path):
    torch.manual_seed(5)
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    _fit(tmp_path, callback, module=TwoOptimizers())
    theory = {e.unit: e.theory for e in callback.history}
    assert theory["net.0.weight"] == pytest.approx(sgdm_prediction(0.1, 1e-3, 0.9))
    adamw = math.sqrt(2 * 1e-3 * 0.1 * (1 - 0.9) / (1 + 0.9))
    assert theory["net.3.weight"] == pytest.approx(adamw)


class TwoClocks(TwoOptimizers):
    """The second optimizer steps on every other batch: its clock runs at half speed.

    Strong weight decay: both reach equilibrium within the short run (tau 5 and 10 steps).
    """

    second_every = 2

    def configure_optimizers(self):
        first, second = super().configure_optimizers()
        first.param_groups[0]["weight_decay"] = 0.05
        second.param_groups[0].update(lr=1e-2, weight_decay=5.0)
        return first, second


def test_every_logged_and_printed_step_is_on_the_clock_it_names(tmp_path, sdm_log):
    torch.manual_seed(5)
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2, tolerance=0.9, patience=2)
    run, _ = _fit(tmp_path, callback, module=TwoClocks())  # each unit's entry: in the DEBUG log
    assert run.global_step == 16 + 8  # Lightning counts the steps of both optimizers

    def global_step_after_batch(batch: int) -> int:
        return (batch + 1) + (batch + 1) // 2

    for record in callback.history:
        if record.unit == "net.0.weight":  # first optimizer: one step per batch
            batch = record.optimizer_step - 1
        else:  # second optimizer: one step every other batch
            batch = 2 * record.optimizer_step - 1
        assert record.global_step == global_step_after_batch(batch), record
    first = [r.optimizer_step for r in callback.history if r.unit == "net.0.weight"]
    second = [r.optimizer_step for r in callback.history if r.unit == "net.3.weight"]
    assert (first, second) == ([4, 8, 12, 16], [4, 8])
    logged = sorted({int(row["step"]) for row in read_csv_metrics(run) if len(row) > 1})
    assert logged == sorted({record.global_step for record in callback.history})
    messages = [
        r.getMessage() for r in sdm_log.records if "reached equilibrium at" in r.getMessage()
    ]
    assert messages
    for name, state in callback.detector.state.items():
        if state.reached_global_step is None:
            continue
        text = (
            f"{name} reached equilibrium at global step {state.reached_global_step} "
            f"(optimizer step {state.reached_optimizer_step};"
        )
        assert any(text in message for message in messages), (text, messages)
        entered = next(r for r in callback.history if r.unit == name and r.in_equilibrium)
        assert (entered.global_step, entered.optimizer_step) == (
            state.reached_global_step,
            state.reached_optimizer_step,
        )


@pytest.mark.parametrize(
    "params",
    [
        ["net.0.weight", "net.0.bias", "net.3.weight"],
        "net.[03].weight",
        ["re:net\\.(0|3)\\.weight"],
    ],
)
def test_explicit_selection_by_names_globs_regex(tmp_path, params):
    callback = SphericalDynamicsCallback(params=params, every_n_steps=4, window=2)
    _fit(tmp_path, callback)
    assert callback.monitor.units == UNITS
    assert callback.report is None


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_explicit_modules_and_non_invariant_selection_warns(tmp_path, granularity):
    # The cosine of the gradient-orthogonality check is a whole unit's, whatever the granularity.
    module = BNNet()
    callback = SphericalDynamicsCallback(
        params=[module.net[0], module.net[6]], every_n_steps=4, window=2, granularity=granularity
    )
    with pytest.warns(UserWarning, match=r"net\.6\.weight is monitored but its gradient is not"):
        _fit(tmp_path, callback, module=module)
    status = {e.unit: e.invariance for e in callback.history}
    assert status == {"net.0.weight": "verified", "net.6.weight": "violated"}
    assert any(e.unit == "net.6.weight" and e.angular_update > 0 for e in callback.history)


class PlainMLP(BNNet):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_no_invariant_weights_warns_once_and_training_runs(tmp_path):
    callback = SphericalDynamicsCallback(every_n_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run, _ = _fit(tmp_path, callback, module=PlainMLP())
    messages = [str(w.message) for w in caught if "found no scale-invariant" in str(w.message)]
    assert len(messages) == 1
    assert run.global_step == 16
    assert callback.history == []


def test_no_weight_decay_warns_and_still_logs_measurements(tmp_path):
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    with pytest.warns(UserWarning, match="no predicted equilibrium for net.0.weight, net.3.weight"):
        run, _ = _fit(tmp_path, callback, module=BNNet(weight_decay=0.0))
    row = [r for r in read_csv_metrics(run) if "sdm/equilibrium_fraction" in r][-1]
    assert row["sdm/angular_update/net.0.weight"] > 0
    assert math.isnan(row["sdm/angular_update_theory/net.0.weight"])
    assert all(e.equilibrium_criterion == "stationary" for e in callback.history)


class FreezeMidway(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        frozen = 4 <= trainer.global_step < 10
        for p in pl_module.net[0].parameters():
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None


def test_freezing_and_unfreezing_mid_training(tmp_path):
    callback = SphericalDynamicsCallback(every_n_steps=2, window=1)
    run = trainer(tmp_path, callbacks=[callback, FreezeMidway()])
    run.fit(BNNet(momentum=0.0), loader(noisy_classification_data()))
    by_step = {e.global_step: e for e in callback.history if e.unit == "net.0.weight"}
    assert by_step[6].frozen and by_step[6].angular_update == 0.0
    assert by_step[6].theory is None
    assert not by_step[12].frozen and by_step[12].angular_update > 0


class NaNInjector(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 6:
            with torch.no_grad():
                pl_module.net[3].weight[0, 0] = float("nan")


def test_nan_weights_are_logged_as_nan_with_one_warning(tmp_path):
    callback = SphericalDynamicsCallback(every_n_steps=2, window=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = trainer(tmp_path, callbacks=[callback, NaNInjector()])
        run.fit(BNNet(), loader(noisy_classification_data()))
    assert run.global_step == 16
    nan_warnings = [w for w in caught if "contain NaN/Inf" in str(w.message)]
    assert len(nan_warnings) == 1
    late = [e for e in callback.history if e.unit == "net.3.weight" and e.global_step >= 8]
    assert late and all(math.isnan(e.angular_update) for e in late)


class PartialOptimizer(BNNet):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net[3:].parameters(), lr=0.1, weight_decay=1e-3)


def test_parameters_outside_the_optimizer_are_skipped_with_a_message(tmp_path):
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    with pytest.warns(UserWarning, match=r"does not monitor: net\.0\.weight \(not updated"):
        _fit(tmp_path, callback, module=PartialOptimizer())
    assert callback.monitor.units == ["net.3.weight"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"granularity": "neuron"}, "`granularity`"),
        ({"every_n_steps": 0}, "`every_n_steps`"),
        ({"window": 0}, "`window`"),
        ({"tolerance": 1.5}, "`tolerance`"),
        ({"patience": 0}, "`patience`"),
        ({"verify_steps": -1}, "`verify_steps`"),
        ({"orthogonality_tolerance": 0}, "`orthogonality_tolerance`"),
        ({"params": []}, "`params`"),
        ({"params": [3]}, "`params`"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SphericalDynamicsCallback(**kwargs)


def test_selection_that_matches_nothing(tmp_path):
    callback = SphericalDynamicsCallback(params="encoder.*")
    with pytest.raises(MisconfigurationException, match="matches no parameter"):
        _fit(tmp_path, callback)


def test_state_dict_round_trip():
    callback = SphericalDynamicsCallback()
    callback.history.append(HistoryRecord("w", 3, 3, 0.01, 0.011, 0.9, 2.0, 0.1, False))
    state = callback.state_dict()
    restored = SphericalDynamicsCallback()
    restored.load_state_dict(state)
    assert restored.history == callback.history


def test_two_callbacks_share_a_trainer_and_a_checkpoint(tmp_path):
    layer = SphericalDynamicsCallback(every_n_steps=4, window=2)
    channel = SphericalDynamicsCallback(granularity="channel", every_n_steps=4, window=2)
    assert layer.state_key != channel.state_key
    run = trainer(tmp_path, callbacks=[layer, channel])
    run.fit(BNNet(), loader(noisy_classification_data()))
    # Both found the units from the one traced step (not from each other's hooks).
    assert layer.report.method == channel.report.method == "trace"
    assert layer.monitor.units == channel.monitor.units == UNITS
    assert channel.history[-1].channels is not None and layer.history[-1].channels is None
    run.save_checkpoint(tmp_path / "both.ckpt")
    states = torch.load(tmp_path / "both.ckpt", weights_only=True)["callbacks"]
    assert {layer.state_key, channel.state_key} <= set(states)


def test_log_level_detailed_adds_the_counts_of_seen_regimes(tmp_path):
    torch.manual_seed(0)
    callback = SphericalDynamicsCallback(every_n_steps=4, window=4, log_level="detailed")
    run, _ = _fit(tmp_path, callback, max_epochs=2)
    rows = [row for row in read_csv_metrics(run) if "sdm/angular_update_ratio" in row]
    seen: set[str] = set()
    for row in rows:
        step = int(row["step"])
        records = [r for r in callback.history if r.global_step == step]
        for record in records:
            assert row[f"sdm/regime/{record.unit}"] == REGIME_CODES[record.regime]
        seen |= {record.regime for record in records}
        # A regime is counted from the first window a unit is in it, zeros included after.
        counts = {key.rsplit("/", 1)[1]: v for key, v in row.items() if "regime_count" in key}
        assert set(counts) == seen
        for regime in seen:
            assert counts[regime] == sum(r.regime == regime for r in records)
    assert set(REGIMES) - seen  # some regimes never happened: never logged


@pytest.mark.parametrize("value", ["full", "", None, 1])
def test_log_level_is_checked(value):
    with pytest.raises(ValueError, match="`log_level` must be one of 'summary', 'detailed'"):
        SphericalDynamicsCallback(log_level=value)
