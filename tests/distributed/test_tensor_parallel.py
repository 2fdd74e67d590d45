"""Tensor parallelism and 2-D meshes through ``ModelParallelStrategy``: exact, one collective.

Three launches of ``scripts/tp_callback.py`` (one per layout, started together by one fixture):
tensor parallel on 2 ranks (``ColwiseParallel`` / ``RowwiseParallel``: weights
``Shard(0)``, ``Shard(1)``, a ``Replicate()`` bias, plain replicated tensors), FSDP2 x TP on a
2 x 2 mesh (``_StridedShard``, ``(Shard(0), Shard(1))``, a DTensor on the data-parallel sub-mesh)
and HSDP on a 2 x 2 mesh (``(Replicate(), Shard(0))``). The unchanged callback finds the units on
the parallelized model itself. In float64, every rank logs, per unit and per channel, the angles
and norms that one process logs training the same model on the concatenated data-parallel
batches, to 1e-12; and the monitor issues one collective per closed window (the callback one
more, its equilibrium agreement), counted by wrapping ``torch.distributed`` in the ranks.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from .launch import run_script
from .scripts import tp_callback as script
from .scripts.common import REPO_ROOT, HistoryDump, exact, read_record

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).parent / "scripts" / "tp_callback.py"
TIMEOUT_S = 300.0  # per launch; the three together take ~1-2 min on a busy 2-core machine
# float64 training: the TP/FSDP2 runs and one process differ by the rounding of float64 sums in
# another order (measured: at most 1.3e-15); 1e-12 still fails any factor or missing partial sum.
ATOL = 1e-12
UNITS = ["fc1.weight", "fc2.weight", "fc3.weight"]
PER_CHANNEL = ["fc1.weight", "fc2.weight"]  # fc3 reaches a LayerNorm: invariant only as a whole


def _reference(init: Path, out: Path, data_parallel: int) -> dict[str, Any]:
    out.mkdir()
    callbacks = script.sdm_callbacks()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        callbacks=[*callbacks.values(), HistoryDump(out, "single", callbacks)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(script.TPNet(initial_state=str(init)), script.loader(data_parallel, None))
    return read_record(out / "single_rank0.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """The three launches, started together, and their references, computed meanwhile.

    Concurrent (as in ``test_callback_distributed``): each launch spends much of its time
    starting processes and waiting for its peers, so the three take little more than the
    largest; the single-process references run in this process in the meantime.
    """
    root = tmp_path_factory.mktemp("sdm_tensor_parallel")
    init = root / "init.pt"
    script.initial_state(init)
    launches: dict[str, Future] = {}
    with ThreadPoolExecutor(max_workers=len(script.LAYOUTS)) as pool:
        for layout, (data_parallel, tensor_parallel) in script.LAYOUTS.items():
            out = root / layout
            out.mkdir()
            arguments = ["--out", str(out), "--init", str(init), "--layout", layout]
            world = data_parallel * tensor_parallel
            launches[layout] = pool.submit(
                run_script,
                SCRIPT,
                world,
                arguments,
                per_rank=False,
                timeout=TIMEOUT_S,
                cwd=REPO_ROOT,
            )
        references = {
            data_parallel: _reference(init, root / f"single_{data_parallel}", data_parallel)
            for data_parallel, _ in script.LAYOUTS.values()
        }
        for launch in launches.values():
            launch.exception()  # wait; a failed launch raises in the tests of its layout
    return {
        layout: {"launch": launches[layout], "out": root / layout, "reference": references[dp]}
        for layout, (dp, _) in script.LAYOUTS.items()
    }


@pytest.fixture(scope="module", params=sorted(script.LAYOUTS))
def run(request, runs) -> dict[str, Any]:
    layout = request.param
    entry = runs[layout]
    entry["launch"].result()  # raises DistributedLaunchError with every process's output
    data_parallel, tensor_parallel = script.LAYOUTS[layout]
    paths = [
        entry["out"] / f"{layout}_rank{rank}.json"
        for rank in range(data_parallel * tensor_parallel)
    ]
    records = [read_record(path) for path in paths]
    return {"layout": layout, "records": records, "reference": entry["reference"]}


def _values(entry: dict[str, Any]) -> dict[str, float]:
    values = {key: entry[key] for key in ("angular_update", "weight_norm", "ratio")}
    if entry["horizon_angular_update"] is not None:
        values["horizon_angular_update"] = entry["horizon_angular_update"]
    for group in ("channels", "channel_ratios"):
        for key, value in (entry[group] or {}).items():
            values[f"{group}/{key}"] = value
    return values


def test_parameters_are_laid_out_as_intended(run):
    placements = run["records"][0]["extra"]["placements"]
    expected = {
        "tp": {
            "fc1.weight": "(Shard(dim=0),)",
            "fc2.weight": "(Shard(dim=1),)",
            "fc2.bias": "(Replicate(),)",
            "fc3.weight": "plain",
        },
        "fsdp_tp": {
            "fc1.weight": "(_StridedShard(dim=0, sf=2), Shard(dim=0))",
            "fc2.weight": "(Shard(dim=0), Shard(dim=1))",
            "fc2.bias": "(Shard(dim=0), Replicate())",
            "fc3.weight": "(Shard(dim=0),)",  # on the data-parallel sub-mesh
        },
        "hsdp": dict.fromkeys(
            ("fc1.weight", "fc2.weight", "fc2.bias", "fc3.weight"), "(Replicate(), Shard(dim=0))"
        ),
    }[run["layout"]]
    assert {name: placements[name] for name in expected} == expected


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_every_rank_logs_what_one_process_logs(run, granularity):
    reference = run["reference"]["callbacks"][granularity]
    ranks = [record["callbacks"][granularity] for record in run["records"]]
    assert reference["units"] == UNITS  # found by the trace in one process...
    for record, rank in zip(run["records"], ranks, strict=True):
        assert rank["units"] == UNITS  # ... and on the parallelized model, on every rank
        assert rank["report_method"] == "trace"
        assert record["global_step"] == script.STEPS
        assert exact(rank["history"]) == exact(ranks[0]["history"]), "ranks logged differently"
    assert len(reference["history"]) == len(UNITS) * (script.STEPS // script.EVERY)
    worst, where = 0.0, ""
    for expected, actual in zip(reference["history"], ranks[0]["history"], strict=True):
        assert (actual["global_step"], actual["unit"]) == (
            expected["global_step"],
            expected["unit"],
        )
        assert actual["invariance"] == expected["invariance"] == "verified"
        per_channel = granularity == "channel" and actual["unit"] in PER_CHANNEL
        assert (actual["channels"] is not None) == per_channel
        # The layer callback also measures over blocks of 3 steps (horizon=3): that sum too.
        assert (actual["horizon_angular_update"] is not None) == (granularity == "layer")
        expected_values, actual_values = _values(expected), _values(actual)
        assert set(actual_values) == set(expected_values)
        for key, value in expected_values.items():
            # not a vacuous match (the smallest channel is ~0.01 rad per step)
            assert math.isfinite(value) and value > 1e-3, (key, value)
            error = abs(actual_values[key] - value)
            if error >= worst:
                worst, where = error, f"step {expected['global_step']} {expected['unit']} {key}"
    print(f"{run['layout']} vs one process, {granularity}: max |difference| {worst:.2e} at {where}")
    assert worst <= ATOL, f"{worst:.3e} > {ATOL:g} at {where}"


def test_one_collective_per_closed_window(run):
    callbacks = 2  # the layer and the channel callback watch the same run
    for record in run["records"]:
        for step, calls in record["extra"]["collectives"].items():
            # The discovery's forward pass (first batch) runs the model's own TP collectives.
            calls = [call for call in calls if "invariance/" not in call]
            if int(step) % script.EVERY:
                assert calls == [], f"rank {record['rank']}, step {step}: {calls}"
                continue
            reductions = [call for call in calls if call.endswith("_sync.py:reduce_window")]
            agreements = [call for call in calls if call.endswith("_sync.py:all_agree")]
            assert len(reductions) == callbacks, (step, calls)  # one per closed window
            assert all(call.startswith("all_reduce ") for call in reductions)
            assert len(agreements) == callbacks, (step, calls)  # the equilibrium decision
            assert len(calls) == 2 * callbacks, (step, calls)  # and nothing else
