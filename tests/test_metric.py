import itertools
import math

import pytest
import torch

from lightning_sdm import AngularUpdate
from lightning_sdm.functional import angular_update
from tests.helpers import BNNet, loader, noisy_classification_data, read_csv_metrics, trainer
from tests.reference import reference_angle


def _steps(generator, shapes, steps):
    weights = [torch.randn(s, generator=generator) for s in shapes]
    history = [[w.clone() for w in weights]]
    for _ in range(steps):
        weights = [w + 0.01 * torch.randn(w.shape, generator=generator) for w in weights]
        history.append([w.clone() for w in weights])
    return history


def test_rms_mean_last_and_norm_over_steps():
    generator = torch.Generator().manual_seed(0)
    history = _steps(generator, [(8, 4), (5,)], steps=6)
    metric = AngularUpdate()
    for prev, curr in itertools.pairwise(history):
        metric.update({"a": prev[0], "b": prev[1]}, {"a": curr[0], "b": curr[1]})
    result = metric.compute()
    assert metric.unit_names == ["a", "b"]
    for unit in range(2):
        angles = [
            reference_angle(prev[unit], curr[unit]) for prev, curr in itertools.pairwise(history)
        ]
        rms = math.sqrt(sum(a * a for a in angles) / len(angles))
        assert result["rms"][unit].item() == pytest.approx(rms, rel=1e-9)
        assert result["mean"][unit].item() == pytest.approx(sum(angles) / len(angles), rel=1e-9)
        assert result["last"][unit].item() == pytest.approx(angles[-1], rel=1e-9)
        norm = history[-1][unit].double().norm().item()
        assert result["weight_norm"][unit].item() == pytest.approx(norm, rel=1e-12)
    assert result["steps"].item() == 6
    assert (result["mean"] <= result["rms"]).all()


def test_per_channel_metric():
    generator = torch.Generator().manual_seed(1)
    history = _steps(generator, [(6, 3)], steps=3)
    metric = AngularUpdate(dim=0)
    for prev, curr in itertools.pairwise(history):
        metric.update(prev, curr)
    result = metric.compute()
    assert result["rms"].shape == (6,)
    last = angular_update(history[-2][0], history[-1][0], dim=0)
    torch.testing.assert_close(result["last"], last)


def test_single_tensor_gives_scalars_and_forward_gives_the_step():
    metric = AngularUpdate()
    w = torch.tensor([1.0, 0.0])
    step = metric(w, torch.tensor([math.cos(0.1), math.sin(0.1)]))
    assert step["rms"].shape == ()
    assert step["rms"].item() == pytest.approx(0.1, rel=1e-7)
    metric(w, torch.tensor([math.cos(0.3), math.sin(0.3)]))
    result = metric.compute()
    assert result["steps"].item() == 2
    assert result["rms"].item() == pytest.approx(math.sqrt((0.01 + 0.09) / 2), rel=1e-7)


def test_reset_starts_a_new_window_and_empty_compute_is_nan():
    metric = AngularUpdate()
    w = torch.randn(10)
    metric.update([w], [w + 0.1])
    metric.reset()
    metric.update([w], [w * 2])
    result = metric.compute()
    assert result["steps"].item() == 1
    assert result["rms"].item() == pytest.approx(0.0, abs=1e-7)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = metric.compute()
    # Nothing is known after a reset, not even how many units: empty, not a made-up NaN.
    assert empty["steps"].item() == 0
    assert empty["rms"].shape == empty["weight_norm"].shape == (0,)
    assert metric.unit_names is None


def test_single_tensor_then_reset_then_compute_does_not_crash():
    metric = AngularUpdate()
    metric.update(torch.ones(3), torch.ones(3) + 0.1)
    assert metric.compute()["rms"].shape == ()
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute()["rms"].shape == (0,)
    ones = {"a": torch.ones(2), "b": torch.ones(3)}
    metric.update(ones, ones)
    assert metric.unit_names == ["a", "b"] and metric.compute()["rms"].shape == (2,)


@pytest.mark.parametrize("convert", ["to_half", "set_dtype", "half"])
def test_statistics_stay_float64_whatever_the_metric_dtype(convert: str):
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)
    tiny = torch.tensor([math.cos(1e-5), math.sin(1e-5)], dtype=torch.float64)
    metric = AngularUpdate()
    metric.update(w, tiny)
    if convert == "to_half":
        metric = metric.to(torch.float16)
    elif convert == "set_dtype":
        metric.set_dtype(torch.float16)
    else:
        metric = metric.half()
    metric.update(w, tiny)
    assert metric.step_statistics.dtype == torch.float64
    # 1e-5 rad is far below float16's resolution near 1 (1e-3): only float64 keeps it.
    assert metric.compute()["rms"].item() == pytest.approx(1e-5, rel=1e-6)


def test_state_dict_round_trip_keeps_statistics_and_names():
    metric = AngularUpdate()
    prev = {"conv": torch.randn(4, 3), "fc": torch.randn(5)}
    metric.update(prev, {k: v + 0.05 * torch.randn_like(v) for k, v in prev.items()})
    restored = AngularUpdate()
    restored.load_state_dict(metric.state_dict())
    assert restored.unit_names == ["conv", "fc"]
    torch.testing.assert_close(restored.compute()["rms"], metric.compute()["rms"], rtol=0, atol=0)


def test_merge_state_adds_the_same_steps_of_another_shard():
    # Two halves of one tensor (FSDP-style shards): merged, they give the full tensor's angle.
    torch.manual_seed(0)
    prev, curr = torch.randn(10), torch.randn(10)
    whole = AngularUpdate()
    whole.update(prev, curr)
    first, second = AngularUpdate(), AngularUpdate()
    first.update(prev[:5], curr[:5])
    second.update(prev[5:], curr[5:])
    # Each half is the whole tensor's coverage 1 by itself: scale the coverage to halves.
    first.step_statistics[..., -1] = 0.5
    second.step_statistics[..., -1] = 0.5
    first.merge_state(second)
    assert first.compute()["rms"].item() == pytest.approx(whole.compute()["rms"].item(), rel=1e-12)
    other = AngularUpdate()
    other.update(prev, curr)
    other.update(prev, curr)
    with pytest.raises(ValueError, match=r"same steps .* got \[1, 2\] steps"):
        first.merge_state(other)
    with pytest.raises(ValueError, match="`incoming_state` must be an AngularUpdate"):
        first.merge_state(3)


def test_plot_draws_the_rms_per_unit_with_names_and_units():
    pytest.importorskip("matplotlib")
    metric = AngularUpdate()
    prev = {"net.0.weight": torch.ones(3), "net.3.weight": torch.ones(2)}
    curr = {"net.0.weight": torch.ones(3) + 0.1, "net.3.weight": torch.tensor([1.0, -1.0])}
    metric.update(prev, curr)
    figure, axis = metric.plot()
    assert figure is not None
    assert [label.get_text() for label in axis.get_xticklabels()] == list(prev)
    assert axis.get_ylabel() == "RMS angular update (rad/step)"
    heights = [bar.get_height() for bar in axis.patches]
    assert heights == pytest.approx([0.0, math.pi / 2], abs=1e-6)  # parallel; orthogonal
    # A sequence of results: one labelled line per unit over them.
    first = metric.compute()
    metric.update(curr, prev)
    _, axis = metric.plot([first, metric.compute()])
    assert [line.get_label() for line in axis.get_lines()] == list(prev)
    assert [len(line.get_xdata()) for line in axis.get_lines()] == [2, 2]


class _LoggedAngle(BNNet):
    """Logs ``AngularUpdate(output="rms")`` itself, as torchmetrics metrics are logged."""

    def __init__(self) -> None:
        super().__init__()
        self.angle = AngularUpdate(output="rms")
        self.snapshots: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        weight = self.net[0].weight.detach().clone()
        if self.snapshots:  # the angle of the previous optimizer step
            self.angle(self.snapshots[-1], weight)
            self.log("angle", self.angle, on_step=True, on_epoch=True)
        self.snapshots.append(weight)
        return super().training_step(batch, batch_idx)


def test_the_metric_object_is_logged_the_torchmetrics_way(tmp_path):
    torch.manual_seed(0)
    module = _LoggedAngle()
    run = trainer(tmp_path, max_epochs=1, log_every_n_steps=1)
    run.fit(module, loader(noisy_classification_data(samples=128)))
    rows = read_csv_metrics(run)
    angles = [reference_angle(prev, curr) for prev, curr in itertools.pairwise(module.snapshots)]
    logged = [row["angle_step"] for row in rows if "angle_step" in row]
    # Each step's value is that step's angle (forward); logged from the second batch on.
    assert logged == pytest.approx(angles[: len(logged)], rel=1e-5)
    (epoch,) = [row["angle_epoch"] for row in rows if "angle_epoch" in row]
    assert epoch == pytest.approx(math.sqrt(sum(a * a for a in angles) / len(angles)), rel=1e-5)


def test_a_scalar_output_pools_the_units():
    generator = torch.Generator().manual_seed(1)
    history = _steps(generator, [(8, 4), (5,)], steps=4)
    pooled = {name: AngularUpdate(output=name) for name in ("rms", "mean", "last", "weight_norm")}
    per_unit = AngularUpdate()
    for prev, curr in itertools.pairwise(history):
        per_unit.update(prev, curr)
        for metric in pooled.values():
            metric.update(prev, curr)
    angles = [
        reference_angle(p, c)
        for prev, curr in itertools.pairwise(history)
        for p, c in zip(prev, curr, strict=True)
    ]
    assert pooled["rms"].compute().item() == pytest.approx(
        math.sqrt(sum(a * a for a in angles) / len(angles)), rel=1e-9
    )
    assert pooled["mean"].compute().item() == pytest.approx(sum(angles) / len(angles), rel=1e-9)
    assert pooled["last"].compute().item() == pytest.approx(
        per_unit.compute()["last"].mean().item(), rel=1e-12
    )
    norm = math.sqrt(sum(w.double().square().sum().item() for w in history[-1]))
    assert pooled["weight_norm"].compute().item() == pytest.approx(norm, rel=1e-12)
    assert all(metric.compute().dim() == 0 for metric in pooled.values())


@pytest.mark.parametrize("output", ["median", "", None])
def test_output_is_checked(output):
    with pytest.raises(ValueError, match="`output` must be one of 'dict', 'rms'"):
        AngularUpdate(output=output)


def test_nan_weight_gives_nan_for_that_unit_only():
    metric = AngularUpdate()
    good = torch.ones(3)
    bad = torch.tensor([1.0, float("nan"), 1.0])
    metric.update({"good": good, "bad": good}, {"good": good + 0.1, "bad": bad})
    result = metric.compute()
    assert torch.isfinite(result["rms"][0])
    assert torch.isnan(result["rms"][1])


def test_bad_input_messages():
    with pytest.raises(ValueError, match="`dim`"):
        AngularUpdate(dim="0")
    metric = AngularUpdate()
    with pytest.raises(ValueError, match="same tensors"):
        metric.update({"a": torch.ones(2)}, {"b": torch.ones(2)})
    with pytest.raises(TypeError, match="`prev` must be a tensor"):
        metric.update(3.0, torch.ones(2))
    metric.update([torch.ones(2)], [torch.ones(2)])
    with pytest.raises(ValueError, match="units changed"):
        metric.update([torch.ones(2), torch.ones(2)], [torch.ones(2), torch.ones(2)])


def test_class_flags():
    assert AngularUpdate.is_differentiable is False
    assert AngularUpdate.higher_is_better is None
    assert AngularUpdate.full_state_update is True
    metric = AngularUpdate(sync_on_compute=False)
    assert metric.sync_on_compute is False
