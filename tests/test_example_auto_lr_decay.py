import importlib.util
from pathlib import Path

import pytest

# End-to-end runs of the examples: the slow lane (`make test-fast` skips them).
pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "auto_lr_decay.py"


def _load():
    spec = importlib.util.spec_from_file_location("auto_lr_decay", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_lr_decay_example_runs_all_schedules(capsys):
    results = _load().main(["--quick"])
    assert [r["schedule"] for r in results] == ["auto", "auto_rescale", "step", "cosine"]
    assert all(r["steps"] == 44 for r in results)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results)
    step = next(r for r in results if r["schedule"] == "step")
    assert step["final_lr"] == 0.1 * 0.2**2
    table = capsys.readouterr().out
    assert "| auto | 44 |" in table and "| cosine | 44 |" in table
