"""Draw the W&B charts the callback logs, from an offline run read back, as a PNG for the docs.

A screenshot of the W&B UI needs an account and network; an offline run has neither. This script
shows instead what the charts contain: it trains the digits demo (``examples/digits_demo.py``)
with Lightning's ``WandbLogger`` in offline mode, then reads the run directory back, without
network: each chart's data (the ``wandb.plot.line_series`` tables in ``files/media/table``, as
W&B draws them) and its definition (title, x axis name, panel type: the ``_wandb/visualize``
entries of the run's transaction log), and draws them with matplotlib, one panel per chart, one
colour and legend entry per line, as W&B's line-series panel does. The colours and fonts are
matplotlib's, not W&B's.

    python docs/wandb_charts.py                    # docs/figures/wandb_charts.png
    python docs/wandb_charts.py --epochs 5 --output /tmp/charts.png --keep wandb_runs/

The run directory it writes can also be read by ``lightning-sdm report`` (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WANDB_ENVIRONMENT = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true",
    "WANDB_X_DISABLE_STATS": "true",
}


def train(directory: Path, epochs: int) -> Path:
    """The digits demo with an offline WandbLogger; returns the W&B run directory."""
    for key, value in WANDB_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        os.environ[key] = str(directory)
    import lightning.pytorch as pl
    import wandb
    from lightning.pytorch.loggers import WandbLogger
    from torch.utils.data import DataLoader

    from lightning_sdm import SphericalDynamicsCallback

    spec = importlib.util.spec_from_file_location(
        "digits_demo", ROOT / "examples" / "digits_demo.py"
    )
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)

    pl.seed_everything(0, verbose=False)
    train_set, test_set = demo.digits_datasets(0)
    logger = WandbLogger(save_dir=str(directory), project="lightning-sdm-docs")
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[SphericalDynamicsCallback(every_n_steps=20, window=10)],
        log_every_n_steps=20,
        enable_model_summary=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(
        demo.DigitsConvNet(lr=0.1, weight_decay=5e-3, momentum=0.9),
        DataLoader(train_set, batch_size=64, shuffle=True, drop_last=True),
        DataLoader(test_set, batch_size=256),
    )
    run_directory = Path(logger.experiment.dir).parent
    wandb.finish()
    return run_directory


def read_charts(run_directory: Path) -> dict[str, dict[str, Any]]:
    """Per chart key: its panel definition and its lines ``{label: (steps, values)}``.

    Both read from the run's own files: the definitions from the transaction log (decoded with
    the ``wandb`` package's protobuf classes), the data from the tables the chart queries.
    """
    from wandb.proto import wandb_internal_pb2

    from lightning_sdm.report._wandb import _Columns, _records

    (log,) = run_directory.glob("run-*.wandb")
    # wandb.finish() can return before the W&B service has written the log's last record.
    for _ in range(150):
        records = [wandb_internal_pb2.Record.FromString(p) for p in _records(log, _Columns())]
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            break
        time.sleep(0.2)
    charts: dict[str, dict[str, Any]] = {}
    tables: dict[str, str] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        items = record.config.update if kind == "config" else ()
        for item in items:
            if list(item.nested_key[:2]) == ["_wandb", "visualize"]:
                charts[item.nested_key[2]] = {"panel": json.loads(item.value_json)}
        if kind == "history":
            for item in record.history.item:
                if len(item.nested_key) == 2 and item.nested_key[1] == "path":
                    tables[item.nested_key[0]] = json.loads(item.value_json)
    for key, chart in charts.items():
        table = json.loads((run_directory / "files" / tables[f"{key}_table"]).read_text())
        fields = chart["panel"]["panel_config"]["fieldSettings"]
        columns = [table["columns"].index(fields[name]) for name in ("step", "lineKey", "lineVal")]
        lines: dict[str, tuple[list[float], list[float]]] = {}
        for row in table["data"]:
            step, label, value = (row[column] for column in columns)
            xs, ys = lines.setdefault(label, ([], []))
            xs.append(step)
            ys.append(value)
        chart["lines"] = lines
    return charts


def draw(charts: dict[str, dict[str, Any]], output: Path) -> None:
    """One panel per chart (the units first, the ratio chart last)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(charts, key=lambda key: key.endswith("/ratio"))
    columns = 2
    rows = -(-len(keys) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 3.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        panel = charts[key]["panel"]["panel_config"]
        for label, (xs, ys) in charts[key]["lines"].items():
            band = label.startswith(("predicted -", "predicted +", "1 -", "1 +"))
            ax.plot(xs, ys, label=label, linestyle=":" if band else "-", linewidth=1.6)
        strings = panel["stringSettings"]
        ax.set_title(f"{strings['title']}\n[{key}: {panel['panelDefId']}]", fontsize=9)
        ax.set_xlabel(strings.get("xname", "x"))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    figure.suptitle(
        "W&B charts logged by lightning_sdm (offline run read back; drawn with matplotlib)",
        fontsize=11,
    )
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Train, read the run back, draw the charts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--output", default=str(ROOT / "docs" / "figures" / "wandb_charts.png"))
    parser.add_argument("--keep", help="write the W&B run here and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(args.keep or scratch)
        directory.mkdir(parents=True, exist_ok=True)
        run_directory = train(directory, args.epochs)
        charts = read_charts(run_directory)
        draw(charts, Path(args.output))
    print(f"{len(charts)} charts of {run_directory.name}: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
