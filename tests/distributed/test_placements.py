"""DTensor placements, one by one, on 2 gloo ranks: what each rank adds to the sum over ranks.

``Replicate()``: the rank at coordinate 0 adds its copy and the other adds zeros, so the sum is the
single-copy statistic bit for bit (no replica counted twice). ``Shard(1)``: each rank adds the
partial sums of its columns to every row. ``Partial()``: refused, naming the parameter. And the
window's one collective: ranks that held different numbers of steps are told so, never summed;
and ``sync_on_compute=False`` keeps each rank's own statistics.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_sdm import _messages
from lightning_sdm.functional import angular_update, angular_update_statistics

from .launch import run_distributed

pytestmark = pytest.mark.distributed


def _tensors() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    prev = torch.randn(5, 7, dtype=torch.float64, generator=generator)
    return prev, prev + 0.05 * torch.randn(5, 7, dtype=torch.float64, generator=generator)


def _worker() -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from lightning_sdm.monitor import SphericalMonitor
    from lightning_sdm.monitor._sync import RanksOutOfStepError, monitor_group, reduce_window
    from lightning_sdm.units import Unit

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    prev, curr = _tensors()
    out: dict[str, Any] = {}
    for name, placement in (("replicate", Replicate()), ("shard1", Shard(1))):
        dprev = distribute_tensor(prev, mesh, [placement])
        dcurr = distribute_tensor(curr, mesh, [placement])
        out[f"{name}_local"] = angular_update_statistics([dprev], [dcurr], dim=0)
        out[f"{name}_angles"] = angular_update(dprev, dcurr, dim=0)
        out[f"{name}_angle"] = angular_update(dprev, dcurr)
    # The monitor's cached layout, a plain tensor first and a DTensor after it: every call reads
    # the DTensor's local shard (its rows placed as the first call found), never the DTensor.
    from lightning_sdm._engine import BatchedStatistics

    statistics = BatchedStatistics([0, 0])
    dprev, dcurr = (distribute_tensor(t, mesh, [Shard(1)]) for t in (prev, curr))
    out["mixed"] = [statistics([prev, dprev], [curr, dcurr]) for _ in range(3)]
    module = nn.Linear(7, 5, bias=False)
    module.weight = nn.Parameter(DTensor.from_local(prev / 2, mesh, [Partial()]))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    try:
        SphericalMonitor(module, optimizer, [Unit("weight", ("weight",))], every_n_steps=2)
    except ValueError as error:
        out["partial"] = str(error)
    for sync in (True, False):  # weights that differ per rank: summed, or each rank's own
        model = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.ones(2, 3) * (rank + 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        unit = [Unit("weight", ("weight",))]
        settings = {"every_n_steps": 1, "window": 1, "verify_steps": 0}
        monitor = SphericalMonitor(model, optimizer, unit, sync_on_compute=sync, **settings)
        monitor.attach()
        model(torch.ones(4, 3)).square().sum().backward()
        optimizer.step()
        out[f"norm_sync_{sync}"] = monitor.pop_windows()[0].weight_norm
        out["own_norm"] = model.weight.detach().double().norm().item()
    group = monitor_group(60.0)
    where = "the window closing at optimizer step 4"
    try:  # rank 0 held 2 steps of the window, rank 1 one
        reduce_window([(torch.ones(2 - rank, 3, 4), 3, 3)], group, torch.device("cpu"), where, 60)
    except RanksOutOfStepError as error:
        out["out_of_step"] = str(error)
    parts = [(torch.full((2, 3, 4), rank + 1.0), 3, 3), (torch.zeros(0, 0, 4), 1, 3)]
    out["summed"] = reduce_window(parts, group, torch.device("cpu"), where, 60)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_distributed(_worker, 2, timeout=120)


def test_a_replica_adds_zeros_and_the_sum_is_the_single_copy_bit_for_bit(results):
    prev, curr = _tensors()
    plain = angular_update_statistics([prev], [curr], dim=0)
    rank0, rank1 = results
    assert torch.equal(rank0["replicate_local"], plain)
    assert not rank1["replicate_local"].any()
    for result in results:
        assert torch.equal(result["replicate_angles"], angular_update(prev, curr, dim=0))
        assert torch.equal(result["replicate_angle"], angular_update(prev, curr))


def test_shards_of_the_columns_add_partial_sums_to_every_row(results):
    prev, curr = _tensors()
    rank0, rank1 = results
    # Columns 0-3 on rank 0, 4-6 on rank 1: every row's sums are split, the coverage too.
    assert torch.allclose(
        rank0["shard1_local"] + rank1["shard1_local"],
        angular_update_statistics([prev], [curr], dim=0),
        rtol=1e-15,
        atol=0,
    )
    assert rank0["shard1_local"][:, 3].tolist() == [4 / 7] * 5
    for result in results:
        torch.testing.assert_close(
            result["shard1_angles"], angular_update(prev, curr, dim=0), rtol=1e-14, atol=0
        )
        torch.testing.assert_close(
            result["shard1_angle"], angular_update(prev, curr), rtol=1e-14, atol=0
        )


def test_the_cached_layout_of_a_mixed_list_reads_the_local_shards(results):
    prev, curr = _tensors()
    plain = angular_update_statistics([prev], [curr], dim=0)
    for rank, result in enumerate(results):
        first, *again = result["mixed"]
        for stats in again:
            assert torch.equal(stats, first)
        assert torch.equal(first[:5], plain)  # the plain tensor, whole on each rank
        columns = slice(0, 4) if rank == 0 else slice(4, 7)
        local = angular_update_statistics([prev[:, columns]], [curr[:, columns]], dim=0)
        assert torch.allclose(first[5:, :3], local[:, :3], rtol=1e-15, atol=0)


def test_a_partial_placement_is_refused_by_name(results):
    for result in results:
        assert "Unit 'weight': parameter 'weight'" in result["partial"]
        assert "Partial" in result["partial"] and "redistribute" in result["partial"]


def test_the_window_collective_refuses_different_step_counts(results):
    for rank, result in enumerate(results):
        assert _messages.STEP_COUNTS_DIFFER in result["out_of_step"]
        assert f"rank {rank}" in result["out_of_step"]
        assert "window closing at optimizer step 4" in result["out_of_step"]
        summed, empty = result["summed"]
        assert torch.equal(summed, torch.full((2, 3, 4), 3.0))  # 1 + 2, padding dropped
        assert empty.shape == (0, 0, 4)


def test_sync_on_compute_false_keeps_each_rank_its_own_statistics(results):
    norms = [result["own_norm"] for result in results]
    assert norms[0] != pytest.approx(norms[1])  # the ranks' weights differ
    for result in results:
        assert result["norm_sync_False"] == pytest.approx(result["own_norm"], rel=1e-12)
        # Summed over the ranks (plain tensors: one copy per rank, divided by the coverage).
        rms = math.sqrt((norms[0] ** 2 + norms[1] ** 2) / 2)
        assert result["norm_sync_True"] == pytest.approx(rms, rel=1e-12)
