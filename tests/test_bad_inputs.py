"""Bad input campaign: every public constructor and entry point, fed wrong values.

Each case must fail at construction (or at ``Trainer()`` for the plugin), with a ``ValueError``
whose message names the argument (or environment variable) and says what is expected; never a
bare ``TypeError``/``IndexError``/``re.error`` from deep inside, and never silently accepted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lightning_sdm import (
    AngularUpdate,
    EquilibriumEvent,
    SphericalDynamicsCallback,
    SphericalMonitor,
    Unit,
    UnitWindow,
)
from lightning_sdm.actions import (
    ActionContext,
    EquilibriumPolicy,
    Stop,
    Warn,
    check_schedulers_supported,
    decay_param_groups,
    rescale_for_lr_decay,
)
from lightning_sdm.actions._actions import CallFunction, DecayLR
from lightning_sdm.advice import advise, audit_param_groups
from lightning_sdm.config import MonitorConfig
from lightning_sdm.equilibrium._detector import EquilibriumDetector
from lightning_sdm.functional import angular_update, angular_update_statistics
from lightning_sdm.invariance import find_scale_invariant_units
from lightning_sdm.lightning import CorrectedWeightDecay
from lightning_sdm.lightning._plugin import settings_from_env
from lightning_sdm.theory import (
    equilibrium_angular_update,
    relaxation_steps,
    relaxation_time,
    simulate_scale_invariant,
    steps_to_equilibrium,
)

_MODEL = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
_OPT = torch.optim.SGD(_MODEL.parameters(), lr=0.1, weight_decay=1e-4)
_UNIT = Unit("0.weight", ("0.weight", "0.bias"))
_EVENT = EquilibriumEvent(100, ("w",), 1.0, {"w": 0.01}, {"w": 0.01}, "theory")
_TWO = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def _callback(**kwargs: Any) -> Callable[[], Any]:
    return lambda: SphericalDynamicsCallback(**kwargs)


def _monitor(**kwargs: Any) -> Callable[[], Any]:
    return lambda: SphericalMonitor(_MODEL, _OPT, [_UNIT], **{"every_n_steps": 4, **kwargs})


CASES: list[tuple[str, Callable[[], Any], str]] = [
    # callback
    ("params invalid regex", _callback(params="re:("), r"`params` .*invalid regular expression"),
    ("params empty list", _callback(params=[]), r"`params`"),
    ("params int", _callback(params=3), r"`params`"),
    ("params mixed kinds", _callback(params=["0.weight", nn.Linear(2, 2)]), r"`params` mixes"),
    ("granularity typo", _callback(granularity="channels"), r"`granularity`"),
    ("every_n_steps 0", _callback(every_n_steps=0), r"`every_n_steps`"),
    ("every_n_steps bool", _callback(every_n_steps=True), r"`every_n_steps`"),
    ("every_n_steps float", _callback(every_n_steps=2.5), r"`every_n_steps`"),
    ("window 0", _callback(window=0), r"`window`"),
    ("window str", _callback(window="8"), r"`window`"),
    ("horizon above window", _callback(window=4, horizon=8), r"`horizon`"),
    ("horizon 0", _callback(horizon=0), r"`horizon`"),
    ("tolerance str", _callback(tolerance="0.1"), r"`tolerance`"),
    ("tolerance None", _callback(tolerance=None), r"`tolerance`"),
    ("tolerance nan", _callback(tolerance=float("nan")), r"`tolerance`"),
    ("tolerance 0", _callback(tolerance=0.0), r"`tolerance`"),
    ("tolerance 2", _callback(tolerance=2.0), r"`tolerance`"),
    ("patience 1", _callback(patience=1), r"`patience`"),
    ("patience bool", _callback(patience=True), r"`patience`"),
    ("quorum 0", _callback(quorum=0.0), r"`quorum`"),
    ("quorum str", _callback(quorum="all"), r"`quorum`"),
    ("on_equilibrium typo", _callback(on_equilibrium="decay"), r"`on_equilibrium`"),
    ("on_equilibrium arity", _callback(on_equilibrium=lambda event: None), r"`on_equilibrium"),
    ("on_equilibrium int", _callback(on_equilibrium=3), r"`on_equilibrium`"),
    ("verify_steps -1", _callback(verify_steps=-1), r"`verify_steps`"),
    ("orthogonality str", _callback(orthogonality_tolerance="x"), r"`orthogonality_tolerance`"),
    ("orthogonality 0", _callback(orthogonality_tolerance=0.0), r"`orthogonality_tolerance`"),
    ("sync_timeout 0", _callback(sync_timeout=0), r"`sync_timeout`"),
    ("sync_timeout 1 ms", _callback(sync_timeout=1e-3), r"`sync_timeout`"),
    ("sync_timeout inf", _callback(sync_timeout=float("inf")), r"`sync_timeout`"),
    ("sync_timeout str", _callback(sync_timeout="60"), r"`sync_timeout`"),
    ("prog_bar str", _callback(prog_bar="yes"), r"`prog_bar`"),
    ("engine typo", _callback(engine="compile"), r"`engine` must be one of"),
    ("monitor engine None", _monitor(engine=None), r"`engine` must be one of"),
    # monitor
    ("monitor every_n_steps 0", _monitor(every_n_steps=0), r"`every_n_steps`"),
    (
        "monitor config and fields",
        lambda: SphericalMonitor(
            _MODEL, _OPT, [_UNIT], config=SphericalDynamicsCallback().config, window=2
        ),
        r"either `config` or its fields",
    ),
    (
        "monitor units not Unit",
        lambda: SphericalMonitor(_MODEL, _OPT, ["0.weight"], every_n_steps=4),
        r"`units` must hold lightning_sdm.Unit",
    ),
    (
        "monitor unknown parameter",
        lambda: SphericalMonitor(_MODEL, _OPT, [Unit("x", ("x.weight",))], every_n_steps=4),
        r"parameters the module does not have: \['x.weight'\]",
    ),
    (
        "monitor channel_dim out of range",
        lambda: SphericalMonitor(
            _MODEL, _OPT, [Unit("0.weight", ("0.weight",), channel_dim=2)], every_n_steps=4
        ),
        r"`channel_dim`=2 is out of range",
    ),
    # unit
    ("unit params str", lambda: Unit("w", "0.weight"), r"`params` must be a tuple"),
    ("unit empty name", lambda: Unit("", ("0.weight",)), r"`name`"),
    ("unit channel_dim bool", lambda: Unit("w", ("w",), channel_dim=True), r"`channel_dim`"),
    ("unit channel_dim str", lambda: Unit("w", ("w",), channel_dim="0"), r"`channel_dim`"),
    # actions and detector
    ("decay factor str", lambda: DecayLR(factor="0.1"), r"`factor`"),
    ("decay factor 1", lambda: DecayLR(factor=1.0), r"`factor`"),
    ("decay min_lr -1", lambda: DecayLR(min_lr=-1.0), r"`min_lr`"),
    ("decay max_decays -1", lambda: DecayLR(max_decays=-1), r"`max_decays`"),
    ("decay cooldown 1.5", lambda: DecayLR(cooldown=1.5), r"`cooldown`"),
    ("decay rescale str", lambda: DecayLR(rescale_weights="yes"), r"`rescale_weights`"),
    ("decay final_phase 1", lambda: DecayLR(final_phase=1.0), r"`final_phase`"),
    ("call not callable", lambda: CallFunction(3), r"`on_equilibrium` must be callable"),
    ("detector confidence -1", lambda: EquilibriumDetector(confidence=-1.0), r"`confidence`"),
    # metric and functional
    ("metric dim str", lambda: AngularUpdate(dim="0"), r"`dim`"),
    (
        "functional complex",
        lambda: angular_update(
            torch.ones(2, dtype=torch.complex64), torch.ones(2, dtype=torch.complex64)
        ),
        r"real floating-point tensors",
    ),
    (
        "functional int",
        lambda: angular_update(torch.ones(2, dtype=torch.long), torch.ones(2, dtype=torch.long)),
        r"torch\.int64",
    ),
    ("functional shapes", lambda: angular_update(torch.ones(2), torch.ones(3)), r"same shape"),
    (
        "functional dim range",
        lambda: angular_update(torch.ones(2, 2), torch.ones(2, 2), dim=2),
        r"`dim`=2 is out of range",
    ),
    # found by the reliability campaign (issue 22)
    ("action class", _callback(on_equilibrium=DecayLR), r"`on_equilibrium=DecayLR` is a class"),
    ("action other class", _callback(on_equilibrium=dict), r"`on_equilibrium=dict` is a class"),
    ("params empty name", _callback(params=[""]), r"`params` holds an empty name"),
    ("metric dim bool", lambda: AngularUpdate(dim=True), r"`dim`"),
    (
        "unit invariant str",
        lambda: Unit("w", ("w",), channel_invariant="no"),
        r"`channel_invariant`",
    ),
    ("unit param twice", lambda: Unit("w", ("w", "w")), r"`params` names 'w' twice"),
    (
        "monitor unit twice",
        lambda: SphericalMonitor(_MODEL, _OPT, [_UNIT, _UNIT], every_n_steps=4),
        r"`units` holds '0.weight' twice",
    ),
    (
        "monitor shared param",
        lambda: SphericalMonitor(_MODEL, _OPT, [_UNIT, Unit("bias", ("0.bias",))], every_n_steps=4),
        r"parameter '0.bias' is in both",
    ),
    (
        "statistics of a tensor",
        lambda: angular_update_statistics(torch.ones(3, 2), torch.ones(3, 2)),
        r"`prev` must be a sequence of tensors",
    ),
    ("decay_param_groups factor 0", lambda: decay_param_groups(_OPT, [0], 0.0, 0.0), r"`factor`"),
    ("decay_param_groups min_lr -1", lambda: decay_param_groups(_OPT, [0], 0.5, -1.0), r"`min_lr`"),
    (
        "decay_param_groups index",
        lambda: decay_param_groups(_OPT, [3], 0.5, 0.0),
        r"`group_indices` holds 3",
    ),
    (
        "decay_param_groups optimizer",
        lambda: decay_param_groups("sgd", [0], 0.5, 0.0),
        r"`optimizer`",
    ),
    (
        "rescale exponent nan",
        lambda: rescale_for_lr_decay(_OPT, [list(_MODEL[0].parameters())], 10.0, float("nan")),
        r"`exponent`",
    ),
    (
        "rescale decay 0",
        lambda: rescale_for_lr_decay(_OPT, [list(_MODEL[0].parameters())], 0.0, 0.25),
        r"`decay`",
    ),
    (
        "rescale units flat",
        lambda: rescale_for_lr_decay(_OPT, [_MODEL[0].weight], 10.0, 0.25),
        r"`units` must hold",
    ),
    # the second campaign (issue 22): wrong types at every public entry point
    ("functional None", lambda: angular_update(None, torch.ones(2)), r"`prev` must be a tensor"),
    (
        "functional numpy",
        lambda: angular_update(np.ones(3), np.ones(3)),
        r"`prev` must be a tensor",
    ),
    (
        "functional dim bool",
        lambda: angular_update(torch.ones(2, 2), torch.ones(2, 2), dim=True),
        r"`dim`",
    ),
    (
        "functional dim float",
        lambda: angular_update(torch.ones(2, 2), torch.ones(2, 2), dim=0.0),
        r"`dim`",
    ),
    (
        "functional bool tensors",
        lambda: angular_update(torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)),
        r"torch\.bool",
    ),
    (
        "statistics None",
        lambda: angular_update_statistics(None, None),
        r"`prev` must be a sequence",
    ),
    (
        "statistics dim str",
        lambda: angular_update_statistics([torch.ones(2)], [torch.ones(2)], dim="0"),
        r"`dim`",
    ),
    (
        "statistics curr_is_delta str",
        lambda: angular_update_statistics([torch.ones(2)], [torch.ones(2)], curr_is_delta="False"),
        r"`curr_is_delta`",
    ),
    (
        "metric statistics list",
        lambda: AngularUpdate().update(statistics=[[1.0, 2.0, 3.0, 4.0]]),
        r"`statistics` must be a tensor",
    ),
    (
        "metric merge str",
        lambda: AngularUpdate().merge_state({"step_statistics": "x"}),
        r"`incoming_state`",
    ),
    ("unit params int", lambda: Unit("a", 5), r"`params` must be a tuple"),
    (
        "unit from_dict missing",
        lambda: Unit.from_dict({"name": "a"}),
        r"a saved unit has no `params`",
    ),
    (
        "detector update None",
        lambda: EquilibriumDetector().update(None),
        r"`windows` must be a list",
    ),
    (
        "detector update dicts",
        lambda: EquilibriumDetector().update([{"unit": "w"}]),
        r"`windows` must be a list",
    ),
    ("detector restart inf", lambda: EquilibriumDetector().restart(float("inf")), r"`relax_steps`"),
    (
        "detector load damaged",
        lambda: EquilibriumDetector().load_state_dict({"w": {"samples": 5}}),
        r"state of 'w': `samples`",
    ),
    (
        "theory optimizer None",
        lambda: equilibrium_angular_update(None),
        r"`optimizer` must be a torch\.optim\.Optimizer",
    ),
    ("theory module", lambda: equilibrium_angular_update(_MODEL), r"`optimizer`"),
    ("theory relaxation None", lambda: relaxation_time(None), r"`prediction` must be a Prediction"),
    ("theory relaxation_steps bool", lambda: relaxation_steps(True, 1e-3), r"`lr`"),
    (
        "theory tolerance str",
        lambda: steps_to_equilibrium(2.0, 1.0, 0.1, 1e-3, tolerance="0.05"),
        r"`tolerance`",
    ),
    (
        "simulate steps float",
        lambda: simulate_scale_invariant(lambda p: torch.optim.SGD(p, lr=0.1), steps=2.5),
        r"`steps`",
    ),
    (
        "simulate norm inf",
        lambda: simulate_scale_invariant(
            lambda p: torch.optim.SGD(p, lr=0.1), steps=2, initial_norm=float("inf")
        ),
        r"`initial_norm`",
    ),
    (
        "simulate norms per row, wrong count",
        lambda: simulate_scale_invariant(
            lambda p: torch.optim.SGD(p, lr=0.1), steps=2, rows=3, initial_norm=[1.0, 2.0]
        ),
        r"`initial_norm` must be one number or one per row \(3\)",
    ),
    (
        "simulate norms per row, one negative",
        lambda: simulate_scale_invariant(
            lambda p: torch.optim.SGD(p, lr=0.1), steps=2, rows=2, initial_norm=[1.0, -2.0]
        ),
        r"`initial_norm`",
    ),
    (
        "simulate factory None",
        lambda: simulate_scale_invariant(lambda p: None, steps=2),
        r"must return a torch\.optim\.Optimizer",
    ),
    (
        "monitor module None",
        lambda: SphericalMonitor(None, _OPT, [_UNIT], every_n_steps=4),
        r"`module`",
    ),
    (
        "monitor optimizer None",
        lambda: SphericalMonitor(_MODEL, None, [_UNIT], every_n_steps=4),
        r"`optimizers`",
    ),
    (
        "monitor units None",
        lambda: SphericalMonitor(_MODEL, _OPT, None, every_n_steps=4),
        r"`units`",
    ),
    (
        "monitor config dict",
        lambda: SphericalMonitor(_MODEL, _OPT, [_UNIT], config={"window": 2}),
        r"`config` must be a MonitorConfig",
    ),
    (
        "monitor channel rows",
        lambda: SphericalMonitor(
            _TWO,
            torch.optim.SGD(_TWO.parameters(), lr=0.1),
            [Unit("0.weight", ("0.weight", "2.weight"))],
            every_n_steps=2,
            granularity="channel",
        ),
        r"must index the weight's 8 channels",
    ),
    (
        "monitor state steps",
        lambda: SphericalMonitor(_MODEL, _OPT, [_UNIT], every_n_steps=4).load_state_dict(
            {"steps_done": ["abc"]}
        ),
        r"`steps_done` holds 'abc'",
    ),
    (
        "monitor state invariance",
        lambda: SphericalMonitor(_MODEL, _OPT, [_UNIT], every_n_steps=4).load_state_dict(
            {"invariance": {"0.weight": "verified"}}
        ),
        r"`invariance` of '0\.weight'",
    ),
    (
        "tracer None",
        lambda: find_scale_invariant_units(None),
        r"`module` must be a torch\.nn\.Module",
    ),
    (
        "advise bad group",
        lambda: advise([_OPT], {"u": (0, 5)}, 100),
        r"param group 5 of optimizer 0",
    ),
    ("advise units list", lambda: advise([_OPT], ["u"], 100), r"`units` must map"),
    ("advise negative budget", lambda: advise([_OPT], {"u": (0, 0)}, -5), r"`total_steps`"),
    ("audit units None", lambda: audit_param_groups(_MODEL, [_OPT], None), r"`units`"),
    ("audit optimizer bare", lambda: audit_param_groups(_MODEL, _OPT, [_UNIT]), r"`optimizers`"),
    ("policy None", lambda: EquilibriumPolicy(None), r"`action` must be an EquilibriumAction"),
    (
        "policy state event",
        lambda: EquilibriumPolicy(Warn()).load_state_dict({"events": [{"global_step": 1}]}),
        r"an equilibrium event has no",
    ),
    ("decay state", lambda: DecayLR().load_state_dict({"decays": -5}), r"`decays`"),
    ("decay state flag", lambda: DecayLR().load_state_dict({"final_done": "no"}), r"`final_done`"),
    ("context groups None", lambda: ActionContext(100, None), r"`unit_groups`"),
    (
        "decay_param_groups twice",
        lambda: decay_param_groups(_OPT, [0, 0], 0.5, 0.0),
        r"names a group twice",
    ),
    (
        "decay_param_groups scheduler",
        lambda: decay_param_groups(_OPT, [0], 0.5, 0.0, torch.optim.lr_scheduler.StepLR(_OPT, 10)),
        r"`scheduler_list` must be a list",
    ),
    (
        "decay_param_groups index int",
        lambda: decay_param_groups(_OPT, 0, 0.5, 0.0),
        r"`group_indices` must be a list",
    ),
    (
        "rescale units None",
        lambda: rescale_for_lr_decay(_OPT, None, 10.0, 0.25),
        r"`units` must be a list",
    ),
    (
        "weight decay state",
        lambda: CorrectedWeightDecay().load_state_dict({"bases": "abc"}),
        r"CorrectedWeightDecay cannot read its state",
    ),
    (
        "env not a mapping",
        lambda: settings_from_env(["LIGHTNING_SDM=1"]),
        r"`environ` must be a mapping",
    ),
    (
        "decay state None",
        lambda: DecayLR().load_state_dict(None),
        r"DecayLR's state must be a mapping",
    ),
    (
        "schedulers None",
        lambda: check_schedulers_supported(None),
        r"`scheduler_list` must be a list",
    ),
    ("stop without context", lambda: Stop()(_EVENT, None), r"`context` must be an ActionContext"),
    (
        "decay without context",
        lambda: DecayLR()(_EVENT, None),
        r"`context` must be an ActionContext",
    ),
    (
        "window mistyped",
        lambda: UnitWindow("w", "x", None, "a", 1, 2, 3, 4, 5, 6),
        r"a UnitWindow: `optimizer_step` is 'x'",
    ),
    # plugin (environment variables)
    (
        "env params regex",
        lambda: settings_from_env({"LIGHTNING_SDM": "1", "LIGHTNING_SDM_PARAMS": "re:("}),
        r"LIGHTNING_SDM_PARAMS",
    ),
    (
        "env window word",
        lambda: settings_from_env({"LIGHTNING_SDM": "1", "LIGHTNING_SDM_WINDOW": "eight"}),
        r"LIGHTNING_SDM_WINDOW",
    ),
    (
        "env tolerance word",
        lambda: settings_from_env({"LIGHTNING_SDM": "1", "LIGHTNING_SDM_TOLERANCE": "loose"}),
        r"LIGHTNING_SDM_TOLERANCE",
    ),
]


@pytest.mark.parametrize(("case", "make", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_a_message_naming_it(
    case: str, make: Callable[[], Any], message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        make()
    assert re.search(message, str(raised.value)), str(raised.value)


def test_a_misspelt_plugin_variable_is_named_in_a_warning() -> None:
    # A warning, not an error: an unrelated variable with the prefix must not stop training.
    with pytest.warns(UserWarning, match=r"Ignoring unknown variable\(s\) LIGHTNING_SDM_WINDOWS"):
        assert settings_from_env({"LIGHTNING_SDM": "1", "LIGHTNING_SDM_WINDOWS": "8"}) == {}


def test_refused_lr_control_calls_change_nothing() -> None:
    weights = [p.detach().clone() for p in _MODEL.parameters()]
    lrs = [group["lr"] for group in _OPT.param_groups]
    for call in (
        lambda: rescale_for_lr_decay(_OPT, [list(_MODEL[0].parameters())], 10.0, float("nan")),
        lambda: decay_param_groups(_OPT, [0, 7], 0.5, 0.0),
    ):
        with pytest.raises(ValueError):
            call()
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights, _MODEL.parameters()))
    assert [group["lr"] for group in _OPT.param_groups] == lrs


@pytest.mark.parametrize(("ncols", "dpi", "message"), [(0, 100, "`ncols`"), (2, -1, "`dpi`")])
def test_plot_run_refuses_a_bad_layout_before_reading(tmp_path, ncols, dpi, message) -> None:
    pytest.importorskip("matplotlib")
    from lightning_sdm.report import plot_run

    with pytest.raises(ValueError, match=message):  # before the (missing) run is read
        plot_run(tmp_path / "no_such_run", ncols=ncols, dpi=dpi)


def test_two_lambdas_are_two_actions_with_their_own_state_keys() -> None:
    first, second = (lambda t, m, e: None), (lambda t, m, e: None)
    keys = {SphericalDynamicsCallback(on_equilibrium=f).state_key for f in (first, second)}
    assert len(keys) == 2
    again = SphericalDynamicsCallback(on_equilibrium=first).state_key
    assert again in keys  # stable for the same function (a resumed run finds its state)


def test_numpy_integers_are_integers() -> None:
    config = MonitorConfig(every_n_steps=np.int64(4), window=np.int64(8))
    assert (config.every_n_steps, config.window) == (4, 4)
    assert type(config.window) is int  # stored as a Python int (a state_key stays readable)
    assert angular_update(torch.eye(2), torch.eye(2), dim=np.int64(0)).shape == (2,)


def test_numpy_group_indices_and_a_directory_as_figure_path(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert decay_param_groups(optimizer, [np.int64(0)], 0.5, 0.0) == [(0.1, 0.05)]
    pytest.importorskip("matplotlib")
    from lightning_sdm.report import plot_run

    with pytest.raises(ValueError, match="is a directory"):
        plot_run(tmp_path / "missing", path=tmp_path)


def test_any_iterable_is_a_list_where_one_was_accepted_before() -> None:
    """Found by review: the new checks must not refuse generators and parameter lists."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    stats = angular_update_statistics(list(model.parameters()), model.parameters())
    assert stats.shape == (4, 4)  # four tensors, one row each
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = SphericalMonitor(model, (o for o in [optimizer]), iter([_UNIT]), every_n_steps=2)
    assert monitor.units == ["0.weight"]
    assert EquilibriumDetector().update(iter([])) == []
