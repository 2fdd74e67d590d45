"""LightningCLI: the callback configured from YAML (examples/cli), parsed and run for real."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.actions._actions import DecayLR, Stop

pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "cli" / "train.py"
CONFIG = ROOT / "examples" / "cli" / "config.yaml"
UNITS = ["features.0.weight", "features.3.weight", "features.7.weight"]


@pytest.fixture(autouse=True)
def _no_plugin(monkeypatch):
    for name in [n for n in os.environ if n.startswith("LIGHTNING_SDM")]:
        monkeypatch.delenv(name)


def _load_example():
    spec = importlib.util.spec_from_file_location("cli_train_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_yaml_init_args_reach_the_callback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])
    example = _load_example()
    cli = example.main(["--config", str(CONFIG)], run=False)
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SphericalDynamicsCallback)]
    written = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"][0]
    assert written["class_path"] == "lightning_sdm.SphericalDynamicsCallback"
    args = written["init_args"]
    assert callback.params == args["params"] == "auto"
    assert (callback.config.granularity, callback.config.every_n_steps, callback.config.window) == (
        args["granularity"],
        args["every_n_steps"],
        args["window"],
    )
    assert (callback.detector.tolerance, callback.detector.patience) == (
        args["tolerance"],
        args["patience"],
    )
    assert callback.on_equilibrium.name == args["on_equilibrium"]

    # Command-line overrides of the callback's arguments, a list of patterns included.
    cli = example.main(
        [
            "--config",
            str(CONFIG),
            "--trainer.callbacks.init_args.granularity=channel",
            '--trainer.callbacks.init_args.params=["features.0.weight", "features.[37].weight"]',
        ],
        run=False,
    )
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SphericalDynamicsCallback)]
    assert callback.config.granularity == "channel"
    assert callback.params == ["features.0.weight", "features.[37].weight"]


def test_an_action_object_from_yaml_by_class_path(tmp_path, monkeypatch):
    """on_equilibrium given as a class_path with init_args (DecayLR) reaches the callback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"]["callbacks"][0]["init_args"]["on_equilibrium"] = {
        "class_path": "lightning_sdm.actions.DecayLR",
        "init_args": {"factor": 0.2, "max_decays": 2, "rescale_weights": True},
    }
    path = tmp_path / "decay.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = _load_example().main(["--config", str(path)], run=False)
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SphericalDynamicsCallback)]
    action = callback.on_equilibrium
    assert isinstance(action, DecayLR)
    assert (action.factor, action.max_decays, action.rescale_weights) == (0.2, 2, True)
    # The string shortcut still works from the command line.
    cli = _load_example().main(
        ["--config", str(CONFIG), "--trainer.callbacks.init_args.on_equilibrium=stop"], run=False
    )
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, SphericalDynamicsCallback)]
    assert isinstance(callback.on_equilibrium, Stop)


def test_cli_fit_runs_the_callback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTNING_SDM")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        str(SCRIPT),
        "fit",
        "--config",
        str(CONFIG),
        "--trainer.max_steps=10",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks.init_args.every_n_steps=5",
        "--trainer.callbacks.init_args.window=3",
        "--model.width=8",
        "--data.batch_size=32",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 scale-invariant units (trace)" in result.stdout + result.stderr

    logs = tmp_path / "lightning_logs"
    with (logs / "digits_cli_csv" / "version_0" / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("sdm/angular_update_ratio")]
    assert [int(row["step"]) for row in rows] == [5, 10]  # every_n_steps from the command line
    for row in rows:
        for unit in UNITS:
            assert float(row[f"sdm/angular_update/{unit}"]) > 0
            assert float(row[f"sdm/angular_update_theory/{unit}"]) == pytest.approx(
                (2 * 0.1 * 0.005 / 1.9) ** 0.5, rel=1e-9
            )
    # The TensorBoard logger of the same config got the layout; LightningCLI saved the config.
    (events,) = (logs / "digits_cli" / "version_0").glob("events.out.tfevents.*")
    assert b"custom_scalars__config__" in events.read_bytes()
    saved = yaml.safe_load((logs / "digits_cli" / "version_0" / "config.yaml").read_text())
    (entry,) = saved["trainer"]["callbacks"]
    assert entry["class_path"] == "lightning_sdm.SphericalDynamicsCallback"
    assert (entry["init_args"]["every_n_steps"], entry["init_args"]["window"]) == (5, 3)
