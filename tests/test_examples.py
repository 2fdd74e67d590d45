"""Every example runs, as a user would run it (a subprocess), with short settings.

Each test checks the example's own output: the windows or the summary it prints (units, steps,
the predicted equilibrium), and the files it leaves (logs, report figure). The DDP and FSDP2
examples start their second rank by re-running the script (Lightning's ``strategy="ddp"`` and
``ModelParallelStrategy``), so they run through ``tests.distributed.launch.run_script``, which
kills every process of the run on a timeout.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from lightning_sdm.config import MonitorConfig
from tests.distributed.launch import run_script

# End-to-end runs of the examples: the slow lane (`make test-fast` skips them).
pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DIGITS_UNITS = ["features.0.weight", "features.3.weight", "features.7.weight"]
# digits defaults: sqrt(2 lr wd / (1 + momentum)) with lr 0.1, wd 5e-3, momentum 0.9.
DIGITS_THEORY = math.sqrt(2 * 0.1 * 5e-3 / 1.9)
SHORT = ["--steps", "6", "--every-n-steps", "2", "--window", "2"]
WINDOW_LINE = re.compile(
    r"^step\s+(\d+)\s+(\S+)\s+measured ([0-9.]+)\s+theory ([0-9.]+)\s+ratio ([0-9.]+)\s+"
    r"\|w\| ([0-9.]+)$"
)
TIMEOUT = 300


def run_example(script: str, *args: str, cwd: Path) -> str:
    """Run ``python examples/<script> *args``; return its stdout (fail with its output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2-core CI machines are easily oversubscribed
    try:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / script), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{script} did not finish in {TIMEOUT} s:\n{err.stdout}\n{err.stderr}")
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr[-5000:]}"
    return result.stdout


def window_lines(out: str) -> list[tuple[int, str, float, float, float, float]]:
    lines = []
    for line in out.splitlines():
        match = WINDOW_LINE.match(line.strip())
        if match:
            step, unit, *numbers = match.groups()
            lines.append((int(step), unit, *(float(n) for n in numbers)))  # type: ignore[arg-type]
    return lines


def summary_rows(out: str, units: list[str]) -> dict[str, list[str]]:
    """Rows of a printed per-unit table (unit name first)."""
    rows = {}
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] in units:
            rows[fields[0]] = fields[1:]
    return rows


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 10_000
    height, width, _ = imread(path).shape
    assert width >= 600 and height >= 600


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ single process


def test_digits_demo_leaves_logs_and_the_report(tmp_path: Path):
    logs = tmp_path / "logs"
    out = run_example(
        "digits_demo.py", "--steps", "6", "--every-n-steps", "2", "--log-dir", str(logs),
        cwd=tmp_path,
    )  # fmt: skip
    assert f"Predicted equilibrium angular update: {DIGITS_THEORY:.5f} rad/step" in out
    rows = summary_rows(out, DIGITS_UNITS)
    assert sorted(rows) == DIGITS_UNITS
    for fields in rows.values():
        assert float(fields[1]) == pytest.approx(DIGITS_THEORY, abs=1e-5)  # theory column
        assert float(fields[0]) > 0  # measured
    report = logs / "digits_demo_report.png"
    assert f"Report figure: {report}" in out
    assert_png(report)
    assert list((logs / "digits_demo" / "version_0").glob("events.out.tfevents.*"))
    header = (logs / "digits_demo_csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert all(f"sdm/angular_update/{unit}" in header for unit in DIGITS_UNITS)

    # The report command reads the same logs (through `python -m lightning_sdm`).
    result = subprocess.run(
        [sys.executable, "-m", "lightning_sdm", "report", str(logs), "-o", "cli.png"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(summary_rows(result.stdout, DIGITS_UNITS)) == DIGITS_UNITS
    assert_png(tmp_path / "cli.png")


def test_plain_pytorch_and_fabric_examples_measure_the_same_windows(tmp_path: Path):
    plain = run_example("plain_pytorch.py", *SHORT, cwd=tmp_path)
    fabric = run_example("fabric_example.py", *SHORT, cwd=tmp_path)

    windows = window_lines(plain)
    assert [(step, unit) for step, unit, *_ in windows] == [
        (step, unit) for step in (2, 4, 6) for unit in DIGITS_UNITS
    ]
    for _, _, measured, theory, ratio, norm in windows:
        assert measured > 0 and norm > 0
        assert theory == pytest.approx(DIGITS_THEORY, abs=1e-5)
        assert ratio == pytest.approx(measured / theory, abs=2e-3)
    assert "Scale-invariant units (method: trace): 3" in plain
    assert "6 steps, 9 windows of 3 units." in plain
    assert all(f"{unit}: gradient orthogonality verified" in plain for unit in DIGITS_UNITS)

    # Fabric: same model, data and seed; the hooks on the wrapped optimizer fired at every step,
    # and the units are named after the original module.
    assert "hooks fired at every fabric optimizer.step(): OK" in fabric
    assert "names: features.0.weight (original) = _forward_module.features.0.weight" in fabric
    assert window_lines(fabric) == windows


def write_fake_cifar(root: Path, per_batch: int = 64) -> Path:
    """A tiny ``cifar-10-batches-py`` in the original format (pickled dicts, bytes keys)."""
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        with (directory / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return directory


def test_cifar10_example_on_a_fake_local_copy(tmp_path: Path):
    write_fake_cifar(tmp_path / "data")
    logs = tmp_path / "logs"
    out = run_example(
        "cifar10_example.py", "--data-dir", str(tmp_path / "data"), *SHORT,
        "--batch-size", "32", "--width", "8", "--log-dir", str(logs), cwd=tmp_path,
    )  # fmt: skip
    assert "320 train, 64 test images" in out
    units = [
        "features.0.weight",
        *(f"features.{b}.conv{i}.weight" for b in (3, 4, 5) for i in (1, 2)),
        "features.4.shortcut.0.weight",
        "features.5.shortcut.0.weight",
    ]
    rows = summary_rows(out, units)
    assert sorted(rows) == sorted(units)  # every conv feeds a BN: all scale-invariant
    theory = math.sqrt(2 * 0.1 * 5e-4 / 1.9)
    assert all(float(fields[1]) == pytest.approx(theory, rel=1e-4) for fields in rows.values())
    assert_png(logs / "cifar10_report.png")
    assert list((logs / "cifar10" / "version_0").glob("events.out.tfevents.*"))


def test_cifar10_example_explains_a_missing_directory(tmp_path: Path, capsys):
    cifar = load_example("cifar10_example")
    with pytest.raises(SystemExit) as exit_:
        cifar.main(["--data-dir", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 not found" in err and "no such directory" in err
    assert "cifar-10-python.tar.gz" in err

    directory = write_fake_cifar(tmp_path / "partial", per_batch=8)
    (directory / "data_batch_3").unlink()
    with pytest.raises(cifar.CifarNotFoundError, match="missing data_batch_3"):
        cifar.find_cifar_dir(directory)
    images, labels = cifar.load_batches(
        write_fake_cifar(tmp_path / "ok", per_batch=8), ("test_batch",)
    )
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8,)


def test_llm_qknorm_example_finds_each_head_and_counts_each_optimizer(tmp_path: Path):
    # Muon + AdamW in manual optimization: Lightning's global step counts both optimizers.
    out = run_example("llm_qknorm.py", "--fast", "--log-dir", str(tmp_path / "logs"), cwd=tmp_path)
    assert "Corpus: 50,000 bytes of " in out  # the standard library's own sources
    assert "Scale-invariant units (method: trace): 2" in out
    units = [f"model.layers.0.self_attn.{p}_proj.weight" for p in ("q", "k")]
    for unit in units:  # QK-norm over head_dim = 32 / 2 heads: one block of 16 rows per head
        assert re.search(rf"^  {re.escape(unit)}\s+16 rows/head  Muon: ", out, re.M), out
    assert "12 batches, Lightning's global step 24 (both optimizers' steps)" in out
    assert "Optimizer steps counted by the monitor (optimizers holding units): [12]" in out
    rows = summary_rows(out, units)
    assert sorted(rows) == sorted(units)
    for fields in rows.values():
        median, low, high, theory = (float(x) for x in fields[:4])
        assert 0 < low <= median <= high  # one angle per head
        # A prediction where theory has one for Muon, else none and the regime says so.
        assert math.isnan(theory) == ("no prediction" in " ".join(fields[5:]))
    header = (tmp_path / "logs" / "llm_qknorm" / "version_0" / "metrics.csv").read_text()
    assert f"sdm/angular_update/{units[0]}/median" in header.splitlines()[0]


def test_llm_study_quick_writes_its_report(tmp_path: Path):
    # studies/llm runs the example per arm and renders docs/llm.md from what the callback logged.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(EXAMPLES.parent)}
    raw_path, out = tmp_path / "raw.json", tmp_path / "docs"
    command = ["-m", "studies.llm", "--quick", "--out", str(out), "--raw", str(raw_path)]
    result = subprocess.run(
        [sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    raw = json.loads(raw_path.read_text())
    assert sorted(raw["runs"]) == ["adamw", "muon"]
    units = [f"model.layers.0.self_attn.{p}_proj.weight" for p in ("q", "k")]
    text = (out / "llm.md").read_text()
    for run in raw["runs"].values():
        assert [u["name"] for u in run["units"]] == units
        assert {u["channel_group"] for u in run["units"]} == {16}  # 2 heads of 16 rows
        windows = [r for r in run["history"] if r["unit"] == units[0]]
        assert [r["optimizer_step"] for r in windows] == [2, 4, 6, 8, 10, 12]
        for r in windows:  # the ratio is the callback's measured / predicted, when predicted
            if r["theory"] is not None:
                assert r["ratio"] == pytest.approx(r["angular_update"] / r["theory"], rel=1e-6)
        last = windows[-1]
        assert f"{last['channels']['median']:.4f}" in text  # the table shows the last window
        assert f"{run['figures']['seconds']:.0f} s" in text
    assert raw["runs"]["adamw"]["predictions"][units[0]]["optimizer"] == "AdamW"
    assert "| adamw | 2 of 2 |" in text  # AdamW predicts both units
    # The rejected parameters, counted by their reason: every one of the summary's is counted.
    rejected = re.search(r"^Rejected parameters: (\d+)$", raw["runs"]["muon"]["detection"], re.M)
    sentence = re.search(r"The other (\d+) parameters are rejected[^\n]*", text)
    assert rejected and sentence and sentence.group(1) == rejected.group(1) != "0"
    counted = re.findall(r"\((\d+)\)|(\d+) for other reasons", sentence.group(0))
    assert sum(int(a or b) for a, b in counted) == int(rejected.group(1)), sentence.group(0)
    assert_png(out / "figures" / "llm_qknorm.png")

    # Re-rendered from the raw numbers alone: the same report.
    again = tmp_path / "again"
    command = ["-m", "studies.llm", "--out", str(again), "--from-raw", str(raw_path)]
    result = subprocess.run(
        [sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert (again / "llm.md").read_text() == text


# ------------------------------------------------------------------ two processes


def _distributed(script: str, tmp_path: Path, *extra: str) -> str:
    results = run_script(
        EXAMPLES / script,
        world_size=2,
        args=[*SHORT, "--log-dir", str(tmp_path / "logs"), *extra],
        per_rank=False,  # the strategy starts rank 1 itself
        timeout=TIMEOUT,
        cwd=tmp_path,
    )
    return results[0].stdout


@pytest.mark.distributed
def test_ddp_example(tmp_path: Path):
    out = _distributed("ddp_example.py", tmp_path)
    rows = summary_rows(out, DIGITS_UNITS)
    assert sorted(rows) == DIGITS_UNITS
    assert "2 processes, 9 windows; ranks agree: max |difference| of the measured angles = " in out
    assert "= 0.0e+00" in out  # replicated weights: bit-identical angles on both ranks
    metrics = tmp_path / "logs" / "ddp_example" / "version_0" / "metrics.csv"
    assert "sdm/angular_update/features.0.weight" in metrics.read_text().splitlines()[0]


@pytest.mark.distributed
def test_fsdp2_example(tmp_path: Path):
    out = _distributed("fsdp2_example.py", tmp_path)
    rows = summary_rows(out, DIGITS_UNITS)
    assert sorted(rows) == DIGITS_UNITS
    assert all(
        float(fields[1]) == pytest.approx(DIGITS_THEORY, abs=1e-5) for fields in rows.values()
    )
    # Each rank holds half of each weight (a DTensor), and the angle is still the whole tensor's.
    assert "features.0.weight: DTensor, local shard [16, 1, 3, 3] of [32, 1, 3, 3]" in out
    assert "features.7.weight: DTensor, local shard [32, 64, 3, 3] of [64, 64, 3, 3]" in out
    metrics = tmp_path / "logs" / "fsdp2_example" / "version_0" / "metrics.csv"
    assert "sdm/angular_update/features.0.weight" in metrics.read_text().splitlines()[0]


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu(tmp_path):
    # The GPU check is run where a device is lent; its CPU smoke run keeps it from rotting.
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "gpu.json")])
    assert all(row["angle_rel_error"] < 1e-12 for row in results["exactness"])
    assert results["no_sync"]["windows"] > 0
    assert results["kernels_per_measurement"]["100"] > 0
    default = f"default ({MonitorConfig().every_n_steps}/{MonitorConfig().window})"
    assert set(results["overhead"]) == {"step_ms_no_monitor", "every step (1/1)", default}
    assert (tmp_path / "gpu.json").exists()
