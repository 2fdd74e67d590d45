"""``AngularUpdate`` and ``angular_update`` are exact across processes: real 2-rank gloo CPU runs.

All scenarios run in one pair of spawned processes (a module-scoped fixture: starting a rank and
importing DDP/FSDP costs several seconds, the scenarios themselves well under one). The workers
train small models, feed the metric, compute the single-process reference on the same (or the
gathered full) tensors, and return everything; the tests compare in the parent, so a failure
names the unit and the size of the error. The reference is always the plain functional on ordinary
tensors: ``angular_update(prev, curr, dim=...)`` per step, RMS over the steps.
"""

from __future__ import annotations

import operator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sdm.functional import angular_update
from lightning_sdm.metric import AngularUpdate

from .launch import DistributedLaunchError, run_distributed, run_script

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
STEPS = 6
# Float64 statistics summed in a different order than the reference: ~1e-18 rad in practice.
ANGLE_ATOL = 1e-12
NORM_RTOL = 1e-12


# --------------------------------------------------------------------------------------------
# Single-process reference (plain tensors only)


def _reference(history: list[tuple[dict[str, Tensor], dict[str, Tensor]]], dim: int | None) -> dict:
    """What the metric should return, from per-step ``angular_update`` on plain full tensors."""
    angles = []
    for prev, curr in history:
        per_tensor = [angular_update(prev[name], curr[name], dim=dim) for name in prev]
        angles.append(torch.stack(per_tensor) if dim is None else torch.cat(per_tensor))
    angles_t = torch.stack(angles)  # [steps, units]
    norms = [_true_norm(tensor, dim) for tensor in history[-1][1].values()]
    weight_norm = torch.stack(norms) if dim is None else torch.cat(norms)
    return {
        "rms": angles_t.square().mean(dim=0).sqrt(),
        "mean": angles_t.mean(dim=0),
        "last": angles_t[-1],
        "weight_norm": weight_norm,
        "angles": angles_t,
    }


def _unit_names(shapes: dict[str, tuple[int, ...]], dim: int | None) -> list[str]:
    if dim is None:
        return list(shapes)
    return [f"{name}[{i}]" for name, shape in shapes.items() for i in range(shape[dim])]


def _batch(generator: torch.Generator, features: int, classes: int) -> tuple[Tensor, Tensor]:
    x = torch.randn(16, features, generator=generator)
    return x, torch.randint(0, classes, (16,), generator=generator)


# --------------------------------------------------------------------------------------------
# Workers (run in each spawned rank; module-level so that they can be pickled)


def _ddp_worker(steps: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 24, bias=False), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 5)
    )
    _randomize_norm_layers(model)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    per_layer, per_channel = AngularUpdate(), AngularUpdate(dim=0)
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank sees different data
    history = []
    for _ in range(steps):
        x, y = _batch(generator, features=12, classes=5)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        prev = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        curr = {n: p.detach().clone() for n, p in model.named_parameters()}
        per_layer.update(prev, curr)
        per_channel.update(prev, curr)
        history.append((prev, curr))

    # The replicas really are identical (DDP averaged the different gradients).
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return {
        "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()},
        "replicas_identical": all(torch.equal(g, flat) for g in gathered),
        "layer": per_layer.compute(),
        "channel": per_channel.compute(),
        "ref_layer": _reference(history, dim=None),
        "ref_channel": _reference(history, dim=0),
        # compute() restored the local state: one rank saw each element once.
        "local_coverage": per_layer.step_statistics[..., 3].clone(),
    }


def _randomize_norm_layers(model: nn.Module) -> None:
    # Default affine parameters are ones (barely moving at first) and zeros (no angle at all:
    # NaN); random ones make every unit's angle defined and non-trivial from the first step.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)


def _fsdp_model() -> nn.Module:
    # 63 rows shard 32/31 (uneven); the 1-row head leaves rank 1 an empty shard.
    return nn.Sequential(
        nn.Linear(32, 63),
        nn.BatchNorm1d(63),
        nn.ReLU(),
        nn.Linear(63, 64),
        nn.LayerNorm(64),
        nn.Linear(64, 10),
        nn.ReLU(),
        nn.Linear(10, 1),
    )


def _fsdp_worker(steps: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = _fsdp_model()
    _randomize_norm_layers(model)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    metrics = {
        "layer": AngularUpdate(),
        "channel": AngularUpdate(dim=0),
        "local_layer": AngularUpdate(sync_on_compute=False),
        "local_channel": AngularUpdate(dim=0, sync_on_compute=False),
    }
    generator = torch.Generator().manual_seed(2000 + rank)
    history_full, history_local = [], []
    functional: dict[str, list[Tensor]] = {"layer": [], "channel": []}
    all_dtensors = True
    for _ in range(steps):
        x, target = torch.randn(16, 32, generator=generator), torch.randn(16, generator=generator)
        optimizer.zero_grad()
        (model(x).squeeze(1) - target).square().mean().backward()
        all_dtensors &= all(isinstance(p, DTensor) for p in params.values())
        prev = {n: p.detach().clone() for n, p in params.items()}  # DTensors (local shards)
        optimizer.step()
        curr = {n: p.detach().clone() for n, p in params.items()}
        for metric in metrics.values():
            metric.update(prev, curr)
        # The functional on DTensors all-reduces over the mesh by itself.
        functional["layer"].append(torch.stack([angular_update(prev[n], curr[n]) for n in prev]))
        functional["channel"].append(
            torch.cat([angular_update(prev[n], curr[n], dim=0) for n in prev])
        )
        # The single-process reference works on the gathered full tensors (collectives: every
        # rank gathers every tensor, in the same order).
        history_full.append((_full(prev), _full(curr)))
        history_local.append((_local(prev), _local(curr)))

    return {
        "shapes": {n: tuple(p.shape) for n, p in params.items()},
        "local_shapes": {n: tuple(p.to_local().shape) for n, p in params.items()},
        "all_dtensors": all_dtensors,
        **{name: metric.compute() for name, metric in metrics.items()},
        "functional_layer": torch.stack(functional["layer"]),
        "functional_channel": torch.stack(functional["channel"]),
        "ref_layer": _reference(history_full, dim=None),
        "ref_channel": _reference(history_full, dim=0),
        # Per-layer angles of this rank's shards alone: what an unsynced metric measures.
        "ref_local_layer": _reference(history_local, dim=None),
    }


def _full(tensors: dict[str, Any]) -> dict[str, Tensor]:
    return {name: tensor.full_tensor() for name, tensor in tensors.items()}


def _local(tensors: dict[str, Any]) -> dict[str, Tensor]:
    return {name: tensor.to_local() for name, tensor in tensors.items()}


def _true_norm(tensor: Tensor, dim: int | None) -> Tensor:
    if dim is None:
        return tensor.double().norm()
    return tensor.double().movedim(dim, 0).reshape(tensor.shape[dim], -1).norm(dim=1)


def _dtensor_worker() -> dict[str, Any]:
    """The functional and the metric on hand-placed DTensors of several layouts."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)  # the same full tensors on every rank
    cases = {}
    for shape in [(63, 33), (5, 7, 3), (1, 10)]:
        prev = torch.randn(shape)
        # A typical SGD step: small, mostly orthogonal, with some shrinkage.
        curr = 0.999 * prev + 1e-3 * torch.randn(shape)
        placements = {"Shard(0)": Shard(0), "Shard(1)": Shard(1), "Replicate": Replicate()}
        for kind, placement in placements.items():
            name = f"{shape}-{kind}"
            prev_d = distribute_tensor(prev, mesh, [placement])
            curr_d = distribute_tensor(curr, mesh, [placement])
            case: dict[str, Any] = {"local_shape": tuple(prev_d.to_local().shape)}
            for dim in [None, 0, 1, -1]:
                case[f"dtensor dim={dim}"] = angular_update(prev_d, curr_d, dim=dim)
                case[f"full dim={dim}"] = angular_update(prev, curr, dim=dim)
            for dim in [None, 0, -1]:
                metric = AngularUpdate(dim=dim)
                metric.update(prev_d, curr_d)
                metric.update(curr_d, prev_d)  # and back: a second step
                result = metric.compute()
                case[f"metric rms dim={dim}"] = result["rms"]
                case[f"metric norm dim={dim}"] = result["weight_norm"]
                case[f"true norm dim={dim}"] = _true_norm(prev, dim)  # after the step back
            cases[name] = case
    return cases


# --------------------------------------------------------------------------------------------
# Fixtures: one 2-process run for all scenarios


def _unequal_steps_worker() -> str:
    """Rank 1 feeds one step fewer (a skipped optimizer step): the reduction must say so."""
    metric = AngularUpdate()
    w = torch.ones(4)
    for _ in range(3 - dist.get_rank()):
        metric.update(w, w + 0.1)
    try:
        metric.compute()
    except ValueError as error:
        return str(error)
    return "no error"


def _all_scenarios(steps: int) -> dict[str, Any]:
    return {
        "ddp": _ddp_worker(steps),
        "fsdp": _fsdp_worker(steps),
        "dtensor": _dtensor_worker(),
        "unequal": _unequal_steps_worker(),
    }


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_distributed(_all_scenarios, WORLD_SIZE, args=(STEPS,), timeout=120)


@pytest.fixture(scope="module")
def ddp_results(results) -> list[dict[str, Any]]:
    return [r["ddp"] for r in results]


@pytest.fixture(scope="module")
def fsdp_results(results) -> list[dict[str, Any]]:
    return [r["fsdp"] for r in results]


@pytest.fixture(scope="module")
def dtensor_results(results) -> list[dict[str, Any]]:
    return [r["dtensor"] for r in results]


def _max_error(actual: Tensor, expected: Tensor, names: list[str]) -> tuple[float, str]:
    """Largest absolute difference (inf where exactly one of the two is NaN) and its unit."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    errors = (actual - expected).abs().reshape(-1)
    both_nan = (torch.isnan(actual) & torch.isnan(expected)).reshape(-1)
    errors = torch.where(both_nan, torch.zeros_like(errors), errors)
    errors = torch.where(torch.isnan(errors), torch.full_like(errors, float("inf")), errors)
    if errors.numel() == 0:
        return 0.0, ""
    worst = int(errors.argmax())
    return float(errors[worst]), names[worst % len(names)]


def _assert_close(
    actual: Tensor, expected: Tensor, names: list[str], *, atol: float = 0.0, rtol: float = 0.0
) -> float:
    error, where = _max_error(actual, expected, names)
    finite = expected[torch.isfinite(expected)]
    bound = atol + rtol * (float(finite.abs().max()) if finite.numel() else 0.0)
    assert error <= bound, f"max error {error:.3e} > {bound:.1e} at {where}"
    return error


def _assert_meaningful(reference: dict[str, Tensor]) -> None:
    """The comparison is not vacuous: every angle is defined, and many are not tiny.

    (Single-element units, per channel of a 1-d tensor, cannot rotate: their angle is 0 or pi.)
    """
    assert not torch.isnan(reference["angles"]).any()
    assert (reference["rms"] > 1e-4).float().mean() > 0.25


def _assert_ranks_identical(results: list[dict[str, Any]], key: str) -> None:
    first = results[0][key]
    for rank, result in enumerate(results[1:], start=1):
        assert set(result[key]) == set(first)
        for name, value in first.items():
            assert torch.equal(value, result[key][name]), f"{key}[{name}]: rank 0 != rank {rank}"


# --------------------------------------------------------------------------------------------
# 1. DDP: replicated parameters


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_ddp_replicated_matches_single_process(ddp_results, granularity):
    dim = None if granularity == "layer" else 0
    for rank, result in enumerate(ddp_results):
        assert result["replicas_identical"], f"rank {rank}: DDP replicas diverged"
        names = _unit_names(result["shapes"], dim)
        metric, reference = result[granularity], result[f"ref_{granularity}"]
        assert int(metric["steps"]) == STEPS  # steps are kept apart, not summed over ranks
        _assert_meaningful(reference)
        for key in ("rms", "mean", "last"):
            _assert_close(metric[key], reference[key], names, atol=ANGLE_ATOL)
        # The summed statistics count every element twice; the coverage column undoes it.
        _assert_close(metric["weight_norm"], reference["weight_norm"], names, rtol=NORM_RTOL)
    _assert_ranks_identical(ddp_results, granularity)
    # The snapshots were identical at every step, not only at the end.
    _assert_ranks_identical(ddp_results, f"ref_{granularity}")


def test_ddp_replicated_local_coverage_is_one(ddp_results):
    for result in ddp_results:
        assert torch.equal(result["local_coverage"], torch.ones_like(result["local_coverage"]))


# --------------------------------------------------------------------------------------------
# 2. FSDP2: sharded parameters


def test_fsdp_parameters_are_really_sharded(fsdp_results):
    shapes = fsdp_results[0]["shapes"]
    for result in fsdp_results:
        assert result["all_dtensors"]
    for name, shape in shapes.items():
        rows = [result["local_shapes"][name][0] for result in fsdp_results]
        assert sum(rows) == shape[0], (name, rows)
        if shape[0] >= WORLD_SIZE:
            assert max(rows) < shape[0], f"{name} is not sharded: local rows {rows}"
    assert [r["local_shapes"]["0.weight"][0] for r in fsdp_results] == [32, 31]  # uneven
    assert [r["local_shapes"]["7.weight"][0] for r in fsdp_results] == [1, 0]  # empty shard


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_fsdp_sharded_matches_full_tensors(fsdp_results, granularity):
    dim = None if granularity == "layer" else 0
    for result in fsdp_results:
        names = _unit_names(result["shapes"], dim)
        metric, reference = result[granularity], result[f"ref_{granularity}"]
        assert int(metric["steps"]) == STEPS
        _assert_meaningful(reference)
        for key in ("rms", "mean", "last"):
            _assert_close(metric[key], reference[key], names, atol=ANGLE_ATOL)
        _assert_close(metric["weight_norm"], reference["weight_norm"], names, rtol=NORM_RTOL)
    _assert_ranks_identical(fsdp_results, granularity)


# --------------------------------------------------------------------------------------------
# 3. The functional on DTensors all-reduces to the full-tensor angle


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_functional_on_fsdp_dtensors_matches_full_tensors(fsdp_results, granularity):
    dim = None if granularity == "layer" else 0
    for result in fsdp_results:
        names = _unit_names(result["shapes"], dim)
        expected = result[f"ref_{granularity}"]["angles"]
        _assert_close(result[f"functional_{granularity}"], expected, names, atol=ANGLE_ATOL)
    for result in fsdp_results[1:]:
        key = f"functional_{granularity}"
        assert torch.equal(result[key], fsdp_results[0][key])


def test_functional_and_metric_on_placed_dtensors(dtensor_results):
    """Shard(0) (uneven, empty shard), Shard(1) (units split across ranks) and Replicate."""
    cases = dtensor_results[0]
    assert {"(63, 33)-Shard(1)", "(1, 10)-Shard(0)", "(5, 7, 3)-Replicate"} <= set(cases)
    for rank, rank_cases in enumerate(dtensor_results):
        for name, case in rank_cases.items():
            for dim in [None, 0, 1, -1]:
                expected = case[f"full dim={dim}"]
                units = [f"rank {rank} {name} dim={dim} unit {i}" for i in range(expected.numel())]
                actual = case[f"dtensor dim={dim}"]
                assert actual.shape == expected.shape
                _assert_close(actual.reshape(-1), expected.reshape(-1), units, atol=ANGLE_ATOL)
            for dim in [None, 0, -1]:
                expected = case[f"full dim={dim}"].reshape(-1)
                units = [f"rank {rank} {name} dim={dim} unit {i}" for i in range(expected.numel())]
                # Two steps of the same angle (there and back): the RMS is that angle.
                rms = case[f"metric rms dim={dim}"].reshape(-1)
                _assert_close(rms, expected, units, atol=ANGLE_ATOL)
                norm = case[f"metric norm dim={dim}"].reshape(-1)
                true_norm = case[f"true norm dim={dim}"].reshape(-1)
                _assert_close(norm, true_norm, units, rtol=NORM_RTOL)
    for name in cases:
        for key in cases[name]:
            if key != "local_shape":
                assert torch.equal(dtensor_results[1][name][key], cases[name][key]), (name, key)


# --------------------------------------------------------------------------------------------
# 4. Without sync each rank only sees its shard


def test_unsynced_metric_sees_only_local_shards(fsdp_results):
    rank0, rank1 = fsdp_results
    names = list(rank0["shapes"])
    global_rms = rank0["layer"]["rms"]
    for rank, result in enumerate(fsdp_results):
        local = result["local_layer"]
        assert int(local["steps"]) == STEPS
        # What the unsynced metric measures is exactly the angle of this rank's shards...
        _assert_close(local["rms"], result["ref_local_layer"]["rms"], names, atol=ANGLE_ATOL)
        # ... a rank holding nothing of a tensor has no angle for it (NaN) ...
        empty = [i for i, n in enumerate(names) if 0 in result["local_shapes"][n]]
        assert torch.isnan(local["rms"][empty]).all()
        assert not torch.isnan(local["rms"][[i for i in range(len(names)) if i not in empty]]).any()
        # ... and it is not the angle of the layer.
        differs = (local["rms"] - global_rms).abs() > 1e-6
        assert differs.any(), f"rank {rank}: local angles equal the global ones"
    assert not torch.equal(rank0["local_layer"]["rms"], rank1["local_layer"]["rms"])

    # Per channel with rows sharded, each rank has the exact angle of its own rows and nothing
    # (NaN) for the others: the ranks' rows are disjoint and together cover every row.
    global_channel = rank0["channel"]["rms"]
    held = [~torch.isnan(result["local_channel"]["rms"]) for result in fsdp_results]
    assert not (held[0] & held[1]).any()
    assert (held[0] | held[1]).all()
    for mask, result in zip(held, fsdp_results, strict=True):
        assert torch.equal(result["local_channel"]["rms"][mask], global_channel[mask])


# --------------------------------------------------------------------------------------------
# The launcher itself: a failure in a child fails the test with the child's traceback. (The
# children run library functions and a tiny script: importing this module in a child would cost
# seconds.)


def test_ranks_with_different_step_counts_get_a_clear_error(results):
    for rank in results:
        assert "[3, 2] steps" in rank["unequal"]
        assert "every rank must call `update` once per optimizer step" in rank["unequal"]


def test_launcher_reports_the_child_traceback():
    with pytest.raises(DistributedLaunchError) as info:
        run_distributed(operator.truediv, WORLD_SIZE, args=(1.0, 0.0), timeout=60)
    message = str(info.value)
    assert "-- rank 0 raised:" in message
    assert "-- rank 1 raised:" in message
    assert "ZeroDivisionError" in message
    assert "_call_in_process_group" in message  # the child's own frames


_FAILING_SCRIPT = """
import os, torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    raise ValueError("rank 1 fails on purpose")
dist.barrier()  # rank 0 is left waiting for a peer that is gone
"""


def test_launcher_reports_the_failing_script(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(_FAILING_SCRIPT)
    with pytest.raises(DistributedLaunchError) as info:
        run_script(script, WORLD_SIZE, timeout=60)
    message = str(info.value)
    assert "-- rank 1 (exit code 1)" in message
    assert "ValueError: rank 1 fails on purpose" in message
    assert f'File "{script}", line 5' in message
