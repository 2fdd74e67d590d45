"""Structural performance properties of the measuring path (no wall-clock assertions).

* a measurement runs a fixed number of tensor kernels, whatever the number of tensors;
* a step that is not measured runs no tensor op in the hooks and holds no monitor buffer;
* a measured step that does not close a window never reads a value back to the host (no
  ``.item()``: on a GPU that would be a synchronisation);
* while a window is open the monitor holds one copy of the monitored weights (1.0x) and nothing
  else: its float64 work buffer, of bounded size, exists only inside a measurement; nothing once
  the window is closed;
* every measured step's angle is that of an independent float64 recorder, also when something
  writes into the weights between two measured steps (through ``.data`` too);
* a monitor survives pickling (``torch.save``, ``deepcopy``) mid-window and measures on;
* the cached, chunked layout gives the same statistics as a plain float64 computation for every
  kind of tensor and chunk size.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_sdm import SphericalMonitor, Unit
from lightning_sdm._engine import ACCELERATOR_CHUNK_NUMEL, BatchedStatistics, chunk_numel_for
from lightning_sdm.functional import DEFAULT_CHUNK_NUMEL, angular_update_statistics


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the context (views apart: they run no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[str] = []
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.kernels.append(str(func))
        return func(*args, **(kwargs or {}))

    @property
    def reads_back(self) -> int:
        """Ops that copy a value to the host (``.item()``, ``bool(tensor)``)."""
        return sum("_local_scalar_dense" in name or "is_nonzero" in name for name in self.kernels)


def _tensors(count: int, total: int = 1 << 19, seed: int = 0):
    """``count`` tensors ``[2, L]``, ``total`` elements in all (whole blocks: no padding)."""
    generator = torch.Generator().manual_seed(seed)
    prev = [torch.randn(2, total // count // 2, generator=generator) for _ in range(count)]
    curr = [p + 1e-3 * torch.randn(p.shape, generator=generator) for p in prev]
    return prev, curr


@pytest.mark.parametrize("dim", [None, 0])
def test_kernels_per_measurement_do_not_depend_on_the_number_of_tensors(dim):
    counts = {}
    for count in (4, 64, 512):
        prev, curr = _tensors(count)
        statistics = BatchedStatistics([dim] * count)
        statistics(prev, curr)  # first call: layout and work buffer
        with OpCounter() as ops:
            result = statistics(prev, curr)
        counts[count] = (len(ops.kernels), ops.views)
        expected = angular_update_statistics(prev, curr, dim=dim)
        torch.testing.assert_close(result, expected, rtol=1e-12, atol=0)
        with OpCounter() as ops:
            angular_update_statistics(prev, curr, dim=dim)
        # From scratch: views are made per tensor, but the kernels stay a fixed handful.
        counts[count] += (len(ops.kernels),)
    assert len(set(counts.values())) == 1, counts
    # A handful of kernels per chunk of the work buffer: zero padding, two copies (upcast), one
    # subtraction, one batched product; then three to reduce the blocks to unit rows.
    chunks = -(-(1 << 19) // DEFAULT_CHUNK_NUMEL)
    kernels, views, from_scratch = counts[4]
    assert kernels <= 5 * chunks + 4 and views <= 4 and from_scratch <= kernels + 2, counts


def test_the_accelerator_path_launches_a_few_dozen_kernels_for_100_tensors():
    """The CUDA settings (2^21-element chunks), forced on CPU tensors: the ops are the same.

    Counted at the dispatcher: each op below is one kernel on CUDA, except ``_foreach_copy_``,
    which CUDA's multi-tensor apply launches once per group of up to ~100 tensors.
    """
    assert chunk_numel_for(torch.device("cuda")) == ACCELERATOR_CHUNK_NUMEL
    total, count = 10_000_000, 100
    prev, curr = _tensors(count, total=total, seed=1)
    dims = [0] * count
    counts = {}
    results = {}
    for name, chunk in (("cpu", None), ("accelerator", ACCELERATOR_CHUNK_NUMEL)):
        statistics = BatchedStatistics(dims, chunk_numel=chunk)
        statistics(prev, curr)  # first call: layout and work buffer
        with OpCounter() as ops:
            results[name] = statistics(prev, curr)
        counts[name] = len(ops.kernels)
        assert ops.reads_back == 0
    torch.testing.assert_close(results["accelerator"], results["cpu"], rtol=1e-12, atol=0)
    chunks = -(-total // ACCELERATOR_CHUNK_NUMEL)  # 5
    assert counts["accelerator"] <= 5 * chunks + 4, counts  # 29 at most
    assert counts["cpu"] >= 10 * counts["accelerator"], counts  # 77 cache-sized chunks


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32)
        )


def _monitored(every_n_steps: int, window: int, **kwargs):
    torch.manual_seed(0)
    model = _Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    units = [
        Unit("net.0.weight", ("net.0.weight", "net.0.bias")),
        Unit("net.3.weight", ("net.3.weight", "net.3.bias")),
    ]
    monitor = SphericalMonitor(
        model, optimizer, units, every_n_steps=every_n_steps, window=window, **kwargs
    )
    monitor.attach()
    return model, optimizer, monitor


def _step(model, optimizer):
    optimizer.zero_grad()
    model.net(torch.randn(16, 8)).square().mean().backward()
    optimizer.step()


def _held_bytes(monitor: SphericalMonitor) -> tuple[int, int]:
    (watch,) = monitor._watches
    snapshot = sum(t.numel() * t.element_size() for t in watch.snapshot or [])
    return snapshot, watch.statistics.workspace_bytes


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_steps_that_are_not_measured_cost_a_counter_only(granularity):
    model, optimizer, monitor = _monitored(10, 2, granularity=granularity, verify_steps=0)
    (watch,) = monitor._watches
    weights = sum(t.numel() * t.element_size() for t in watch.tensors)
    for step in range(30):
        measured = monitor.config.is_measured(watch.steps_done)
        assert measured == (step % 10 >= 8)
        if measured:
            _step(model, optimizer)
            if step % 10 == 8:  # window open: one copy of the weights (1.0x), nothing else
                assert _held_bytes(monitor) == (weights, 0)
                peak = watch.statistics.peak_workspace_bytes  # only inside the measurement
                assert 0 < peak <= 2 * 8 * DEFAULT_CHUNK_NUMEL + weights
            continue
        steps_done = watch.steps_done
        with OpCounter() as ops:  # the hooks alone, as the optimizer calls them
            monitor._before_step(watch)
            monitor._after_step(watch)
        assert ops.kernels == [] and ops.views == 0
        assert watch.steps_done == steps_done + 1
        assert _held_bytes(monitor) == (0, 0)  # nothing held between windows
    windows = [(w.optimizer_step, w.steps) for w in monitor.pop_windows()]
    assert windows == [(10, 2), (10, 2), (20, 2), (20, 2), (30, 2), (30, 2)]


def test_measured_steps_never_read_values_back_until_the_window_closes():
    model, optimizer, monitor = _monitored(4, 4, verify_steps=0)
    for step in range(8):
        with OpCounter() as ops:
            _step(model, optimizer)
        closes = (step + 1) % 4 == 0
        if not closes:
            assert ops.reads_back == 0, ops.kernels
    assert len(monitor.pop_windows()) == 4  # 2 windows x 2 units


def test_monitor_with_every_step_keeps_its_buffers_and_allocates_nothing_more():
    model, optimizer, monitor = _monitored(1, 1, verify_steps=0)
    _step(model, optimizer)
    (watch,) = monitor._watches
    snapshot_ids = [id(t) for t in watch.snapshot]
    held = _held_bytes(monitor)
    for _ in range(3):
        _step(model, optimizer)
    assert [id(t) for t in watch.snapshot] == snapshot_ids  # reused, not reallocated
    assert _held_bytes(monitor) == held
    monitor.detach()
    assert _held_bytes(monitor) == (0, 0)


def _reference(prev, curr, dims):
    rows = []
    for p, c, d in zip(prev, curr, dims):
        p64, c64 = p.double(), c.double()
        if d is None:
            p64, c64 = p64.reshape(1, -1), c64.reshape(1, -1)
        else:
            row = p.numel() // p.shape[d] if p.shape[d] else 0
            p64 = p64.movedim(d, 0).reshape(p.shape[d], row)
            c64 = c64.movedim(d, 0).reshape(p.shape[d], row)
        delta = c64 - p64
        coverage = torch.ones(p64.shape[0], dtype=torch.float64) * (p64.shape[1] > 0 or d is None)
        if d is None and p.numel() == 0:
            coverage = torch.zeros(1, dtype=torch.float64)
        rows.append(
            torch.stack(
                [
                    (p64 * p64).sum(1),
                    (delta * delta).sum(1),
                    (delta * p64).sum(1),
                    coverage,
                ],
                dim=1,
            )
        )
    return torch.cat(rows)


@pytest.mark.parametrize("chunk_numel", [1, 7, 64, 1000, 5000, DEFAULT_CHUNK_NUMEL])
def test_chunked_layout_matches_a_plain_float64_computation(chunk_numel):
    generator = torch.Generator().manual_seed(chunk_numel)
    shapes_dims = [
        ((3000,), None),  # longer than most chunks: split in parts
        ((7, 600), 1),  # rows along a trailing dimension, longer than small chunks
        ((5, 3, 2, 2), 0),
        ((), None),  # 0-dimensional
        ((4, 0), 0),  # units without elements
        ((0, 3), 0),  # no units
        ((9, 11), 0),
        ((2, 700), 0),
        ((6, 5), None),
    ]
    prev = [torch.randn(s, generator=generator) for s, _ in shapes_dims]
    curr = [p + 1e-3 * torch.randn(p.shape, generator=generator) for p in prev]
    prev[6] = prev[6].t().contiguous().t()  # non-contiguous input
    dims = [d for _, d in shapes_dims]
    expected = _reference(prev, curr, dims)
    result = angular_update_statistics(prev, curr, dim=dims, chunk_numel=chunk_numel)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    batched = BatchedStatistics(dims, chunk_numel=chunk_numel)
    for _ in range(2):  # the cached layout and buffer give the same again
        torch.testing.assert_close(batched(prev, curr), expected, rtol=1e-12, atol=1e-12)


def _recorded_angles(model, optimizer, steps, between=None):
    """Step ``steps`` times; an independent float64 recorder gives each step's true angles."""
    from tests.reference import reference_angle

    def units():  # each unit's weight and bias as one float64 vector, as the monitor sees it
        layers = (model.net[0], model.net[3])
        return [
            torch.cat([m.weight.detach().reshape(-1), m.bias.detach()]).double() for m in layers
        ]

    angles = []
    for step in range(steps):
        before = units()
        _step(model, optimizer)
        after = units()
        angles.append([reference_angle(p, c) for p, c in zip(before, after)])
        if between is not None:
            between(step)
    return angles


@pytest.mark.parametrize("write", [None, "in_place", "data", "set_data"])
def test_every_measured_step_gets_its_own_angle(write):
    """Angles equal an independent float64 recorder's, also when something writes into the weights
    between two measured steps (weight clipping, pruning, Lookahead): the write is no part of the
    next step, even through ``.data``, which leaves the version counters alone."""
    model, optimizer, monitor = _monitored(4, 4, verify_steps=0)

    def between(step):
        if write is None or step % 4 not in (0, 1):  # inside a window, between measured steps
            return
        weight, other = model.net[0].weight, model.net[3].weight
        noise = 0.05 * torch.randn_like(weight)
        with torch.no_grad():
            if write == "in_place":
                weight.add_(noise)
                other.mul_(2.0)
            elif write == "data":
                weight.data.add_(noise)
                other.data.clamp_(-0.01, 0.01)
            else:
                weight.data = weight.data + noise

    angles = _recorded_angles(model, optimizer, 8, between)
    windows = monitor.pop_windows()
    assert [(w.unit, w.optimizer_step) for w in windows] == [
        ("net.0.weight", 4),
        ("net.3.weight", 4),
        ("net.0.weight", 8),
        ("net.3.weight", 8),
    ]
    for window in windows:
        unit = 0 if window.unit == "net.0.weight" else 1
        steps = range(window.optimizer_step - 4, window.optimizer_step)
        rms = (sum(angles[s][unit] ** 2 for s in steps) / 4) ** 0.5
        assert window.angular_update == pytest.approx(rms, rel=1e-9)
        assert window.last == pytest.approx(angles[steps[-1]][unit], rel=1e-9)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_monitor_copied_mid_window_measures_on(how, tmp_path):
    """A detached monitor is copied (a callback kept from an earlier fit, sent to spawned
    processes) and attached again: its work buffer's views, over storage freed between
    measurements, are not copied as such, and the copy measures the true angles."""
    import copy

    model, optimizer, monitor = _monitored(4, 4, verify_steps=0)
    before = _recorded_angles(model, optimizer, 2)  # inside the first window
    monitor.detach()
    if how == "deepcopy":
        model, optimizer, monitor = copy.deepcopy((model, optimizer, monitor))
    else:
        torch.save((model, optimizer, monitor), tmp_path / "copy.pt")
        model, optimizer, monitor = torch.load(tmp_path / "copy.pt", weights_only=False)
    monitor.attach()
    after = _recorded_angles(model, optimizer, 6)
    windows = monitor.pop_windows()
    assert [(w.unit, w.optimizer_step) for w in windows] == [
        ("net.0.weight", 4), ("net.3.weight", 4), ("net.0.weight", 8), ("net.3.weight", 8)
    ]  # fmt: skip
    for window in windows:
        unit = 0 if window.unit == "net.0.weight" else 1
        steps = [*before, *after][window.optimizer_step - 4 : window.optimizer_step]
        rms = (sum(angles[unit] ** 2 for angles in steps) / 4) ** 0.5
        assert window.angular_update == pytest.approx(rms, rel=1e-9)
