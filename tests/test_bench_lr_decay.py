"""The benchmarks of LR decay and corrected weight decay run (quick versions), with their tables."""

import importlib.util
from pathlib import Path

import pytest

# An end-to-end run of a benchmark: the slow lane (`make test-fast` skips it).
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lr_decay.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_lr_decay", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_runs_every_task_and_schedule(capsys, tmp_path):
    out = tmp_path / "results.json"
    results = _load().main(["--quick", "--out", str(out)])
    runs = [(r["task"], r["schedule"]) for r in results]
    assert runs == [
        (task, schedule)
        for task in ("digits", "noisy")
        for schedule in ("auto", "auto_rescale", "step", "cosine")
    ]
    assert all(r["steps"] == 44 for r in results)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results)
    step = next(r for r in results if r["schedule"] == "step")
    assert step["final_lr"] == pytest.approx(0.1 * 0.2**2)
    table = capsys.readouterr().out
    assert "| digits (target 98%) | auto | 44 |" in table and "| noisy (target 97%) |" in table
    assert out.exists()


def test_the_corrected_weight_decay_benchmark_runs(capsys):
    path = SCRIPT.parent / "bench_corrected_wd.py"
    spec = importlib.util.spec_from_file_location("bench_corrected_wd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--epochs", "3", "--seeds", "0"])
    assert list(results) == ["fixed", "corrected"]
    for (row,) in results.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["grad_rise"] >= 1.0
    table = capsys.readouterr().out
    assert "| fixed |" in table and "| corrected |" in table
