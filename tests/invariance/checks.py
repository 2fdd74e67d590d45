"""Numerical checks of invariance reports: every detection is verified by scaling the weights."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lightning_sdm.invariance import InvarianceReport

K = 3.7  # scale factor used for the numerical checks


def names(report: InvarianceReport) -> dict[str, tuple[str, ...]]:
    return {unit.name: unit.params for unit in report.units}


def reasons(report: InvarianceReport) -> dict[str, str]:
    return {item.name: item.reason for item in report.rejected}


def assert_complete(report: InvarianceReport, model: nn.Module) -> None:
    """Every parameter appears exactly once: in a unit or rejected."""
    seen = [*report.invariant_parameters, *(item.name for item in report.rejected)]
    assert sorted(seen) == sorted(name for name, _ in model.named_parameters())


def output_after_scaling(
    model: nn.Module, inputs: tuple, scale: dict[str, Tensor | float]
) -> Tensor:
    """Output of a train-mode copy of ``model`` with the named parameters multiplied."""
    scaled = copy.deepcopy(model).train()
    params = dict(scaled.named_parameters())
    with torch.no_grad():
        for name, factor in scale.items():
            params[name].mul_(factor)
        torch.manual_seed(1)  # same dropout masks in every evaluation
        return scaled(*inputs)


def changes_output(model: nn.Module, inputs: tuple, scale: dict[str, Tensor | float]) -> bool:
    reference = output_after_scaling(model, inputs, {})
    scaled = output_after_scaling(model, inputs, scale)
    return not torch.allclose(scaled, reference, rtol=1e-3, atol=2e-3)  # norm eps: ~1e-4


def channel_factor(param: Tensor, dim: int, index: int) -> Tensor:
    """Multiplier that scales one output channel (index along ``dim``) by K."""
    shape = [1] * param.dim()
    shape[dim] = param.shape[dim]
    factor = torch.ones(shape)
    factor.view(-1)[index] = K
    return factor


def check_numerically(model: nn.Module, inputs: tuple, report: InvarianceReport) -> None:
    """Units: scaling them (and single channels when channel-invariant) leaves the output alone;
    rejected parameters that are not norm affine: scaling them changes it."""
    with torch.no_grad():  # norm affine parameters start at (1, 0), which hides their effect
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                if getattr(module, "weight", None) is not None:
                    module.weight.uniform_(0.5, 1.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.normal_()
    params = dict(model.named_parameters())
    for unit in report.units:
        assert not changes_output(model, inputs, dict.fromkeys(unit.params, K)), unit
        factors: dict[str, Tensor | float] = {}
        for i, name in enumerate(unit.params):
            dim = unit.channel_dim if i == 0 else 0
            factors[name] = channel_factor(params[name], dim, 1)
        assert changes_output(model, inputs, factors) != unit.channel_invariant, unit
    for item in report.rejected:
        if "unused" in item.reason or "not used" in item.reason or "bias of" in item.reason:
            continue
        assert changes_output(model, inputs, {item.name: K}), item
