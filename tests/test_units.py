"""Explicit unit selection by names, globs, regular expressions and modules; errors up front."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_sdm.units import Unit, check_params_spec, select_units


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ConvTranspose2d(8, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.Linear(4, 2),
    )


def test_a_selected_bias_joins_its_weight_and_transposed_convs_use_dim_1():
    units = select_units(_net(), ["0.*", "re:2\\.weight"])
    assert [(u.name, u.params, u.channel_dim) for u in units] == [
        ("0.weight", ("0.weight", "0.bias"), 0),
        ("2.weight", ("2.weight",), 1),
    ]
    only_weight = select_units(_net(), "0.weight")
    assert only_weight == [Unit("0.weight", ("0.weight",))]


def test_modules_select_their_weight_and_bias():
    net = _net()
    units = select_units(net, [net[0], net[2]])
    assert [u.params for u in units] == [("0.weight", "0.bias"), ("2.weight",)]
    assert units[1].channel_dim == 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("", "`params` must be"),
        ([], "`params`"),
        (["0.weight", nn.Linear(1, 1)], "mixes names/patterns and modules"),
        ("re:(", "invalid regular expression"),
        (3, "`params`"),
    ],
)
def test_bad_selections_fail_at_construction(params, message):
    with pytest.raises(ValueError, match=message):
        check_params_spec(params)


def test_a_selection_that_matches_nothing_lists_real_names():
    with pytest.raises(ValueError, match=r"matches no parameter of Sequential.*'0\.weight'"):
        select_units(_net(), ["layer*.weight"])
    with pytest.raises(ValueError, match="not a submodule"):
        select_units(_net(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="has no `weight`"):
        net = _net()
        net.append(nn.ReLU())
        select_units(net, net[5])
    with pytest.raises(ValueError, match="not 'auto'"):
        select_units(_net(), "auto")


def test_units_round_trip_and_refuse_malformed_fields():
    unit = Unit("0.weight", ("0.weight", "0.bias"), channel_dim=1, norm="1 (BatchNorm2d)")
    assert Unit.from_dict(unit.as_dict()) == unit
    with pytest.raises(ValueError, match="`channel_dim` must be an int"):
        Unit("w", ("w",), channel_dim=True)
    with pytest.raises(ValueError, match="`source` must be one of"):
        Unit("w", ("w",), source="guess")
