"""The fused (``torch.compile``'d) measurement against the eager engine, its reference.

Compiling costs seconds per layout on this machine (Inductor builds C++ for CPU), so the runs
that compile are in the slow lane; the choice of engine and the fallback's logic are not.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import fields

import pytest
import torch
from torch import nn

from lightning_sdm import SphericalMonitor, Unit
from lightning_sdm._engine import BatchedStatistics
from lightning_sdm.config import MonitorConfig
from lightning_sdm.monitor import _fused
from lightning_sdm.monitor._fused import FusedStatistics, resolve_engine


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 24, bias=False),
        nn.BatchNorm1d(24),
        nn.ReLU(),
        nn.Linear(24, 3),
    )
    return model.to(dtype)


_UNITS = [
    Unit("0.weight", ("0.weight", "0.bias")),  # a weight and its bias: one row per channel
    Unit("3.weight", ("3.weight",)),
    Unit("6.weight", ("6.weight",), channel_invariant=False),  # one row, whatever granularity
]


class _AgainstEager:
    """The watch's statistics engine, with the eager engine run on the same inputs beside it."""

    def __init__(self, engine: BatchedStatistics) -> None:
        self.engine = engine
        self.reference = BatchedStatistics(engine.dims)
        self.worst = 0.0
        self.calls = 0

    def __call__(self, prev, curr, *, curr_is_delta=False):
        result = self.engine(prev, curr, curr_is_delta=curr_is_delta)
        expected = self.reference(prev, curr, curr_is_delta=curr_is_delta)
        scale = expected.abs().clamp_min(1e-300)
        self.worst = max(self.worst, ((result - expected).abs() / scale).max().item())
        self.calls += 1
        return result

    def __getattr__(self, name):
        return getattr(self.engine, name)


def _run(dtype: torch.dtype, granularity: str, engine: str, steps: int = 14):
    """A short SGD run measured by a monitor; its windows and the per-call comparison."""
    model = _model(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    # 3 consecutive measured steps of every 5 (a snapshot taken again before each), with a
    # 2-step horizon (a second, anchored measurement on the same layout), 2 windows and a part.
    monitor = SphericalMonitor(
        model,
        optimizer,
        _UNITS,
        granularity=granularity,
        every_n_steps=5,
        window=3,
        horizon=2,
        engine=engine,
    ).attach()
    spy = _AgainstEager(monitor._watches[0].statistics)
    monitor._watches[0].statistics = spy  # type: ignore[assignment]
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 12, generator=generator).to(dtype)
        optimizer.zero_grad()
        model(x).float().square().mean().backward()
        optimizer.step()
    monitor.detach()
    return monitor, spy, monitor.pop_windows()


def _floats(window) -> list[float]:
    values = []
    for field in fields(window):
        value = getattr(window, field.name)
        if isinstance(value, float):
            values.append(value)
        elif isinstance(value, dict):
            values.extend(v for v in value.values() if isinstance(v, float))
    return values


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_the_compiled_measurement_equals_the_eager_engine(dtype, granularity) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor, spy, windows = _run(dtype, granularity, "compiled")
    assert not [w for w in caught if "lightning_sdm" in str(w.message)]  # no fallback notice
    _, _, eager_windows = _run(dtype, granularity, "eager")
    # Measured steps 2-4, 7-9, 12-13 and a horizon measurement at the second of each window:
    # 11 calls, every one checked.
    assert spy.calls == 11
    assert spy.worst < 1e-12
    assert spy.engine.fallback is None
    # Compiled once for the layout: the later steps (new snapshots, freed and taken again
    # between windows) run the same code.
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert monitor.cost.compile_seconds > 0
    assert len(windows) == len(eager_windows) == 2 * len(_UNITS)
    for fused, eager in zip(windows, eager_windows, strict=True):
        assert fused.unit == eager.unit and fused.steps == eager.steps == 3
        a, b = _floats(fused), _floats(eager)
        assert len(a) == len(b) > 3
        for x, y in zip(a, b, strict=True):
            assert math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-300) or (
                math.isnan(x) and math.isnan(y)
            )


@pytest.mark.slow
def test_odd_layouts_match_the_eager_engine_and_compile_once(caplog) -> None:
    """Units along dimension 1, whole tensors, a 0-d tensor, empty rows; repeated calls."""
    shapes = [(8, 3, 3, 3), (8,), (6, 5, 2), (5, 7), (), (4, 0)]
    dims = [0, 0, 1, None, None, 0]
    generator = torch.Generator().manual_seed(2)
    fused, eager = FusedStatistics(dims), BatchedStatistics(dims)
    with caplog.at_level(logging.INFO, logger="lightning_sdm"):
        for _ in range(3):
            prev = [torch.randn(s, generator=generator) for s in shapes]
            curr = [p + 1e-4 * torch.randn(p.shape, generator=generator) for p in prev]
            result, expected = fused(prev, curr), eager(prev, curr)
            assert result.shape == expected.shape == (8 + 8 + 5 + 1 + 1 + 4, 4)
            assert torch.allclose(result, expected, rtol=1e-12, atol=0)
    assert fused.fallback is None
    compiled = [r.getMessage() for r in caplog.records if "compiled the fused" in r.getMessage()]
    assert len(compiled) == 1 and "6 tensors on cpu" in compiled[0]


def _broken_compile(layout):
    def kernel(prev, curr):
        raise RuntimeError("InductorError: C++ compile error\n(details)")

    return kernel


@pytest.mark.parametrize(
    "breakage",
    ["compile raises", pytest.param("no C++ compiler", marks=pytest.mark.slow)],
)
def test_a_failed_compile_falls_back_to_eager_with_one_notice(monkeypatch, breakage) -> None:
    if breakage == "compile raises":
        monkeypatch.setattr(_fused, "_compile", _broken_compile)
    else:
        import torch._inductor.config as inductor_config

        monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/c++"))
        monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    with pytest.warns(UserWarning, match="engine='compiled'") as caught:
        _, spy, windows = _run(torch.float32, "channel", "compiled", steps=10)
    notices = [w for w in caught if "engine='compiled'" in str(w.message)]
    assert len(notices) == 1  # once, not once per measured step
    assert "measuring with the eager engine" in str(notices[0].message)
    assert spy.engine.fallback is not None and spy.calls == 8
    assert spy.worst == 0.0  # the eager engine itself
    assert len(windows) == 2 * len(_UNITS)


def test_engine_choice_and_validation() -> None:
    cpu = torch.device("cpu")
    # "auto" is the measured choice per device (benchmarks/README.md): eager on CPU, where the
    # compile time outweighs the gain at the default schedule.
    assert resolve_engine("auto", cpu) == "eager"
    assert resolve_engine("compiled", cpu) == "compiled"
    assert MonitorConfig().engine == "auto"
    with pytest.raises(ValueError, match="`engine` must be one of"):
        MonitorConfig(engine="fast")  # type: ignore[arg-type]
    # How the sums are computed does not identify a callback's checkpointed state.
    assert MonitorConfig(engine="compiled").key() == MonitorConfig().key()
    # "auto" on CPU measures eagerly and never imports the compiler stack for it.
    _, spy, windows = _run(torch.float32, "layer", "auto", steps=5)
    assert spy.engine.compile_seconds == 0.0 and spy.engine._kernels == {}
    assert spy.worst == 0.0 and len(windows) == len(_UNITS)


@pytest.mark.slow
def test_the_compiled_measurement_runs_under_a_compiled_model() -> None:
    """The user's torch.compile and the monitor's: the hooks run outside the user's graphs
    (lightning_sdm._compile) and the measurement compiles its own, once."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _model(torch.float32)
    compiled_model = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    monitor = SphericalMonitor(
        model, optimizer, _UNITS, every_n_steps=3, window=3, engine="compiled"
    ).attach()
    spy = _AgainstEager(monitor._watches[0].statistics)
    monitor._watches[0].statistics = spy  # type: ignore[assignment]
    generator = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(9):
            optimizer.zero_grad()
            compiled_model(torch.randn(32, 12, generator=generator)).square().mean().backward()
            optimizer.step()
    monitor.detach()
    assert not [w for w in caught if "lightning_sdm" in str(w.message)]
    assert spy.calls == 9 and spy.worst < 1e-12 and spy.engine.fallback is None
    assert spy.engine.compile_seconds > 0
    # The model's forward graph and the measurement's own: no recompile of either.
    assert counters["stats"]["unique_graphs"] == 2
    assert len(monitor.pop_windows()) == 3 * len(_UNITS)
