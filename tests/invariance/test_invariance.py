"""Tests of scale-invariance detection: every detection is checked against the model's numbers."""

from __future__ import annotations

import copy
import gc
import weakref
from collections.abc import Iterator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sdm import invariance
from lightning_sdm.invariance import (
    InvarianceReport,
    ScaleInvarianceTracer,
    find_scale_invariant_units,
    structural_candidates,
)
from tests.invariance.checks import (
    assert_complete,
    check_numerically,
    names,
    reasons,
)


@pytest.fixture(autouse=True)
def _seed_and_threads() -> Iterator[None]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only cost time on a loaded machine
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# Models (torchvision-style blocks written by hand; torchvision is not a dependency)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block: conv2 and the shortcut are added before any norm."""

    def __init__(self, cin: int, cout: int, projection: bool = True) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False) if projection else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


def resnet(block: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        block,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 5),
    )


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


class FunctionalNorms(nn.Module):
    """Norms called functionally in forward, with functional and method activations."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(6, 8, bias=False)
        self.c = nn.Conv2d(3, 8, 3)
        self.d = nn.Linear(6, 8)
        self.e = nn.Conv2d(3, 8, 3, bias=False)
        self.head = nn.Linear(40, 2)

    def forward(self, x: Tensor, image: Tensor) -> Tensor:
        a = F.layer_norm(torch.relu(self.a(x)), (8,))
        b = F.batch_norm(self.b(x).relu(), None, None, training=True)
        c = F.group_norm(F.max_pool2d(self.c(image), 2), 2).mean(dim=(2, 3))
        d = F.normalize(F.dropout(self.d(x), 0.1, training=self.training), dim=1)
        e = F.instance_norm(F.leaky_relu(self.e(image))).amax(dim=(2, 3))
        return self.head(torch.cat([a, b, c, d, e], dim=1))


class DataDependent(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace this."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Linear(4, 8)
        self.neg = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.pos if x.sum() > 0 else self.neg
        h = x
        for _ in range(int(x.abs().max() > -1) + 1):  # loop count read from the data
            h = h * 1.0
        return self.head(F.relu(self.norm(branch(h))))


# --------------------------------------------------------------------------------------------
# Detection on models


def test_mlp_linear_bn_units_and_classifier_rejected() -> None:
    model, x = mlp(), torch.randn(32, 6)
    report = find_scale_invariant_units(model, x)
    assert report.method == "trace"
    assert names(report) == {"0.weight": ("0.weight", "0.bias"), "3.weight": ("3.weight", "3.bias")}
    assert all(unit.channel_invariant and unit.channel_dim == 0 for unit in report.units)
    assert report.units[0].norm == "1 (BatchNorm1d)"
    why = reasons(report)
    assert "normalization" in why["6.weight"] and "returned by the model" in why["6.weight"]
    assert why["6.bias"].startswith("bias of '6.weight'")
    assert why["1.weight"] == why["4.bias"] == invariance.NORM_AFFINE_REASON
    assert_complete(report, model)
    check_numerically(model, (x,), report)


def test_cnn_conv_bn_relu_pool_and_structural_agrees() -> None:
    model, x = cnn(), torch.randn(4, 3, 8, 8)
    report = find_scale_invariant_units(model, x)
    assert names(report) == {"0.weight": ("0.weight",), "4.weight": ("4.weight", "4.bias")}
    assert_complete(report, model)
    check_numerically(model, (x,), report)
    guess = structural_candidates(model)
    assert guess.method == "registration_order" and guess.notes
    assert names(guess) == names(report)
    assert [u.norm for u in guess.units] == ["1 (BatchNorm2d)", "5 (BatchNorm2d)"]
    assert reasons(guess)["9.bias"].startswith("bias of '9.weight'")
    assert_complete(guess, model)


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.LeakyReLU(0.1)])
def test_activation_between_conv_and_bn_keeps_invariance(activation: nn.Module) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), activation, nn.MaxPool2d(2), nn.Dropout(0.2), nn.BatchNorm2d(6)
    )
    x = torch.randn(4, 3, 10, 10)
    report = find_scale_invariant_units(model, x)
    (unit,) = report.units
    assert unit.params == ("0.weight", "0.bias") and unit.norm == "4 (BatchNorm2d)"
    assert unit.channel_invariant
    check_numerically(model, (x,), report)


def test_basic_block_with_downsample() -> None:
    model, x = resnet(BasicBlock(8, 16, stride=2), 16), torch.randn(4, 3, 8, 8)
    report = find_scale_invariant_units(model, x)
    assert set(names(report)) == {
        "0.weight",
        "3.conv1.weight",
        "3.conv2.weight",
        "3.downsample.0.weight",
    }
    assert {u.name: u.norm for u in report.units}["3.downsample.0.weight"] == (
        "3.downsample.1 (BatchNorm2d)"
    )
    assert_complete(report, model)
    check_numerically(model, (x,), report)
    assert set(names(structural_candidates(model))) == set(names(report))


def test_bottleneck() -> None:
    model, x = resnet(Bottleneck(8, 4, stride=2), 16), torch.randn(2, 3, 8, 8)
    report = find_scale_invariant_units(model, x)
    expected = {"0.weight", "3.downsample.0.weight"} | {f"3.conv{i}.weight" for i in (1, 2, 3)}
    assert set(names(report)) == expected
    assert all(unit.channel_invariant for unit in report.units)
    check_numerically(model, (x,), report)


def test_preactivation_residual_rejected_with_reason() -> None:
    model, x = resnet(PreActBlock(8, 8), 8), torch.randn(4, 3, 8, 8)
    report = find_scale_invariant_units(model, x)
    assert set(names(report)) == {"0.weight", "3.conv1.weight"}
    why = reasons(report)
    for name in ("3.conv2.weight", "3.shortcut.weight"):
        assert "added" in why[name] and "add_ in '3'" in why[name]
    assert_complete(report, model)
    check_numerically(model, (x,), report)


def test_registration_order_is_fooled_by_preactivation_blocks() -> None:
    blocks = nn.Sequential(PreActBlock(8, 8, projection=False), PreActBlock(8, 8, projection=False))
    model, x = resnet(blocks, 8), torch.randn(4, 3, 8, 8)
    # 3.0.conv2 is registered right before 3.1.bn1, but its output is added to the identity
    # first: the heuristic takes it, the trace does not. That is why it must be confirmed.
    assert "3.0.conv2.weight" in names(structural_candidates(model))
    report = find_scale_invariant_units(model, x)
    assert "3.0.conv2.weight" not in names(report)
    assert "added" in reasons(report)["3.0.conv2.weight"]
    check_numerically(model, (x,), report)


@pytest.mark.parametrize(("groups", "per_channel"), [(4, False), (16, True)])
def test_group_norm_granularity(groups: int, per_channel: bool) -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(groups, 16), nn.ReLU())
    x = torch.randn(2, 3, 6, 6)
    report = find_scale_invariant_units(model, x)
    (unit,) = report.units
    assert unit.channel_invariant is per_channel and unit.norm == "1 (GroupNorm)"
    check_numerically(model, (x,), report)


def test_layer_norm_mlp_block_and_gelu_rejected() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.ln1 = nn.LayerNorm(16)
            self.fc2 = nn.Linear(16, 16)
            self.act = nn.GELU()
            self.ln2 = nn.LayerNorm(16)
            self.out = nn.Linear(16, 8)

        def forward(self, x: Tensor) -> Tensor:
            h = F.relu(self.ln1(self.fc1(x)))
            h = self.ln2(self.act(self.fc2(h)))
            return x + self.out(h)

    model, x = Block(), torch.randn(3, 5, 8)  # [batch, tokens, features]
    report = find_scale_invariant_units(model, x)
    (unit,) = report.units
    assert unit.params == ("fc1.weight", "fc1.bias") and unit.norm == "ln1 (LayerNorm)"
    assert not unit.channel_invariant
    why = reasons(report)
    assert (
        "gelu in 'act'" in why["fc2.weight"] and "not positively homogeneous" in why["fc2.weight"]
    )
    assert "added" in why["out.weight"]
    check_numerically(model, (x,), report)


def test_instance_norm_is_per_channel() -> None:
    model = nn.Sequential(nn.Conv1d(3, 6, 3), nn.InstanceNorm1d(6, affine=True))
    x = torch.randn(4, 3, 12)
    report = find_scale_invariant_units(model, x)
    (unit,) = report.units
    assert unit.channel_invariant and unit.norm == "1 (InstanceNorm1d)"
    assert reasons(report)["1.weight"] == invariance.NORM_AFFINE_REASON
    check_numerically(model, (x,), report)


def test_functional_norms_in_forward() -> None:
    model, x, image = FunctionalNorms(), torch.randn(16, 6), torch.randn(16, 3, 6, 6)
    report = find_scale_invariant_units(model, x, image)
    units = {unit.name: unit for unit in report.units}
    assert set(units) == {"a.weight", "b.weight", "c.weight", "d.weight", "e.weight"}
    assert units["a.weight"].norm == "F.layer_norm" and not units["a.weight"].channel_invariant
    assert units["b.weight"].norm == "F.batch_norm" and units["b.weight"].channel_invariant
    assert units["c.weight"].norm == "F.group_norm" and not units["c.weight"].channel_invariant
    assert units["d.weight"].norm == "F.normalize" and not units["d.weight"].channel_invariant
    assert units["e.weight"].norm == "F.instance_norm" and units["e.weight"].channel_invariant
    assert units["a.weight"].params == ("a.weight", "a.bias")
    assert_complete(report, model)
    check_numerically(model, (x, image), report)


def test_data_dependent_control_flow_is_traced() -> None:
    model, x = DataDependent(), torch.randn(8, 4).abs()
    with pytest.raises(Exception, match="symbolically traced variables cannot be used"):
        torch.fx.symbolic_trace(model)
    report = find_scale_invariant_units(model, x)
    assert names(report) == {"pos.weight": ("pos.weight", "pos.bias")}
    assert reasons(report)["neg.weight"] == invariance.UNUSED_REASON  # branch not taken
    assert_complete(report, model)
    check_numerically(model, (x,), report)


def test_conv_transpose_channel_dim_is_one() -> None:
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU())
    x = torch.randn(3, 4, 5, 5)
    report = find_scale_invariant_units(model, x)
    (unit,) = report.units
    assert unit.params == ("0.weight", "0.bias")
    assert unit.channel_dim == 1 and unit.channel_invariant
    check_numerically(model, (x,), report)  # scales weight[:, 1] together with bias[1]


def test_output_used_by_norm_and_residual_is_rejected() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x)
            return self.bn(h) + h

    model, x = Twice(), torch.randn(16, 8)
    report = find_scale_invariant_units(model, x)
    assert report.units == ()
    assert "added" in reasons(report)["fc.weight"]
    check_numerically(model, (x,), report)


def test_reshapes_between_linear_and_norm() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.bn = nn.BatchNorm1d(6)
            self.conv = nn.Conv2d(2, 3, 1, bias=False)
            self.bn2 = nn.BatchNorm1d(3 * 16)

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x)  # [batch, tokens, 6]
            h = self.bn(h.transpose(1, 2).contiguous()).permute(0, 2, 1)
            image = h.reshape(-1, 2, 4, 4)[..., :4] * 2.0
            g = self.bn2(F.pad(self.conv(image), (0, 0, 0, 0)).flatten(1))
            return g.view(-1).unsqueeze(0)

    model, x = Tokens(), torch.randn(8, 16, 4)
    report = find_scale_invariant_units(model, x)
    units = {unit.name: unit for unit in report.units}
    assert units["fc.weight"].channel_invariant  # channel axis followed through the transpose
    # conv channels become blocks of flattened features, each normalised on its own
    assert units["conv.weight"].channel_invariant
    check_numerically(model, (x,), report)


@pytest.mark.parametrize("through_alias", [False, True])
def test_in_place_change_through_a_view_is_seen(through_alias: bool) -> None:
    class ViewAdd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x: Tensor) -> Tensor:
            if through_alias:  # a view taken before the tensor held the layer's output
                h = torch.zeros(x.shape[0], 4)
                flat = h.view(-1)
                h.copy_(self.fc(x))
                flat[:4].add_(1.0)  # shifts the first sample only, through the old view
            else:
                h = self.fc(x)
                h[:4].add_(1.0)  # shifts some samples: not removed by the batch statistics
            return self.bn(h)

    model, x = ViewAdd(), torch.randn(8, 4)
    report = find_scale_invariant_units(model, x)
    assert report.units == ()
    assert "fc.weight" in reasons(report)
    check_numerically(model, (x,), report)


def test_shared_module_must_be_normalised_on_every_call() -> None:
    class Shared(nn.Module):
        def __init__(self, normalise_both: bool) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)
            self.bn = nn.BatchNorm1d(4)
            self.both = normalise_both

        def forward(self, x: Tensor) -> Tensor:
            first = self.bn(self.fc(x))
            second = self.fc(first)
            return first + (self.bn(second) if self.both else second)

    x = torch.randn(8, 4)
    assert names(find_scale_invariant_units(Shared(True), x)) == {"fc.weight": ("fc.weight",)}
    report = find_scale_invariant_units(Shared(False), x)
    assert report.units == () and "added" in reasons(report)["fc.weight"]


def test_lightning_module_names_and_training_step_trace() -> None:
    import lightning.pytorch as pl  # imported here: the FSDP2 workers import this module

    class LitNet(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            return loss + 1e-3 * self.net[0].weight.pow(2).sum()  # explicit L2 on net.0.weight

    model = LitNet()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    report = find_scale_invariant_units(model, x)
    assert names(report) == {"net.0.weight": ("net.0.weight", "net.0.bias")}
    assert reasons(report)["net.3.weight"].startswith("output does not reach a normalization")
    # Tracing the training step itself sees the explicit L2 penalty, which breaks invariance.
    with ScaleInvarianceTracer(model) as tracer:
        loss = model.training_step((x, y), 0)
    traced = tracer.report()
    assert traced.units == () and "net.0.weight" in reasons(traced)
    assert "cross_entropy" in reasons(traced)["net.3.weight"]
    assert loss.requires_grad


def test_frozen_parameters_are_classified() -> None:
    model = mlp()
    for param in model[0].parameters():
        param.requires_grad_(False)
    report = find_scale_invariant_units(model, torch.randn(8, 6))
    assert "0.weight" in names(report)


def test_norm_in_eval_mode_under_the_tracer_is_affine() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    with ScaleInvarianceTracer(model) as tracer:
        model(torch.randn(8, 4))
    report = tracer.report()
    assert report.units == () and "running statistics" in reasons(report)["0.weight"]
    # find_scale_invariant_units traces the training forward instead.
    assert names(find_scale_invariant_units(model, torch.randn(8, 4)))


def test_weight_standardisation_and_free_scale_parameter() -> None:
    class WSConv(nn.Conv2d):
        def forward(self, x: Tensor) -> Tensor:
            w = self.weight
            mean = w.mean(dim=(1, 2, 3), keepdim=True)
            std = w.std(dim=(1, 2, 3), keepdim=True)
            return F.conv2d(x, (w - mean) / std, None, self.stride, self.padding)

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ws = WSConv(3, 4, 3, bias=False)
            self.gain = nn.Parameter(torch.rand(4) + 0.5)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.bn(self.ws(x) * self.gain.view(1, -1, 1, 1))

    model, x = Scaled(), torch.randn(2, 3, 6, 6)
    report = find_scale_invariant_units(model, x)
    units = {unit.name: unit for unit in report.units}
    assert set(units) == {"ws.weight", "gain"}
    assert units["gain"].channel_invariant and units["gain"].norm == "bn (BatchNorm2d)"
    check_numerically(model, (x,), report)


# --------------------------------------------------------------------------------------------
# The tracer never changes what it observes


def test_traced_output_is_identical_and_nothing_is_left_behind() -> None:
    model = resnet(BasicBlock(8, 8), 8).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    with ScaleInvarianceTracer(model) as tracer:
        got = model(x)
    assert torch.equal(got, expected)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch._C._len_torch_function_stack() == 0
    assert tracer.report().method == "trace"


def test_hooks_removed_after_exception_in_forward() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            raise ValueError("boom")

    model = nn.Sequential(nn.Linear(4, 4), Boom())
    with pytest.raises(ValueError, match="boom"), ScaleInvarianceTracer(model) as tracer:
        model(torch.randn(2, 4))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch._C._len_torch_function_stack() == 0
    report = tracer.report()
    assert report.method == "registration_order" and "raised ValueError" in report.notes[0]


def test_recording_failure_falls_back_without_breaking_the_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: object, node: object, output: object) -> None:
        raise RuntimeError("recorder bug")

    monkeypatch.setattr(ScaleInvarianceTracer, "_finish_node", broken)
    model = cnn().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    with ScaleInvarianceTracer(model) as tracer:
        got = model(x)
    assert torch.equal(got, expected)
    report = tracer.report()
    assert report.method == "registration_order"
    assert "recorder bug" in report.notes[0]
    assert names(report) == names(structural_candidates(model))


def test_find_restores_mode_buffers_and_rng() -> None:
    model = cnn().eval()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    x = torch.randn(4, 3, 8, 8)
    state = torch.random.get_rng_state()
    find_scale_invariant_units(model, x)
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_no_tensor_is_kept_alive() -> None:
    refs: list[weakref.ref[Tensor]] = []

    class Spy(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            h = x * 2.0
            refs.append(weakref.ref(h))
            return h.relu()

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), Spy())
    with ScaleInvarianceTracer(model) as tracer:
        out = model(torch.randn(8, 4))
    del out
    gc.collect()
    assert refs[0]() is None
    assert tracer.report().units


def test_report_requires_exit_and_summary_lists_everything() -> None:
    model = mlp()
    tracer = ScaleInvarianceTracer(model)
    with pytest.raises(RuntimeError):
        tracer.report()
    with tracer:
        model(torch.randn(8, 6))
        with pytest.raises(RuntimeError):
            tracer.report()
    text = tracer.report().summary()
    assert "0.weight + 0.bias  <-  1 (BatchNorm1d); per output channel (dim 0)" in text
    assert "6.weight: output does not reach a normalization" in text


# --------------------------------------------------------------------------------------------
# FSDP2: parameters are sharded DTensors, the forward uses unsharded copies


def _fsdp2_worker() -> tuple[InvarianceReport, InvarianceReport, bool]:
    from torch.distributed import get_world_size
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    torch.manual_seed(0)
    model, x = resnet(BasicBlock(8, 16, stride=2), 16), torch.randn(4, 3, 8, 8)
    reference = find_scale_invariant_units(copy.deepcopy(model), x)
    mesh = init_device_mesh("cpu", (get_world_size(),))
    fully_shard(model[3], mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = type(model[0].weight).__name__ == "DTensor"
    with ScaleInvarianceTracer(model) as tracer:
        loss = model(x).square().mean()
    loss.backward()  # outside the tracer, as in a training step
    return reference, tracer.report(), sharded


@pytest.mark.distributed
def test_fsdp2_sharded_parameters_found_by_module_names() -> None:
    try:
        from tests.distributed.launch import run_distributed
    except ImportError:
        pytest.skip("tests.distributed.launch is not available")
    for reference, report, sharded in run_distributed(_fsdp2_worker, 2, timeout=120):
        assert sharded
        assert report.method == "trace" and not report.notes
        assert report.units == reference.units
        assert [r.name for r in report.rejected] == [r.name for r in reference.rejected]
        assert len(report.units) == 4
