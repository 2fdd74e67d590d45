"""``lightning-sdm report`` on Weights & Biases runs, read from their own files (no network).

One real short fit with Lightning's ``WandbLogger`` in offline mode (and a ``LearningRateMonitor``)
writes the run directory; the tests read it back through the command line (in-process ``main``)
and :func:`load_run`, and compare every number with the callback's own ``history``: W&B keeps
the values as JSON doubles, so they agree exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import LearningRateMonitor

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.records import HistoryRecord
from lightning_sdm.report._cli import main
from lightning_sdm.report._rundata import find_runs, load_run, run_from_history
from tests.helpers import BNNet, loader, noisy_classification_data
from tests.report.test_plot_cli import UNITS, assert_valid_png, parse_rows

pytest.importorskip("matplotlib")
wandb = pytest.importorskip("wandb")

# As in test_plot_cli: units enter equilibrium, and some leave it, within the 24 steps.
LR, WD = 0.2, 0.05
_ENVIRONMENT = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_CONSOLE": "off",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_DISABLE_CODE": "true",
    "WANDB_X_DISABLE_STATS": "true",
}


@dataclass
class Run:
    root: Path  # the logger's save_dir: holds wandb/
    directory: Path  # wandb/offline-run-<time>-<id>/
    history: list[HistoryRecord]

    @property
    def log(self) -> Path:
        (path,) = self.directory.glob("run-*.wandb")
        return path

    def last(self, unit: str) -> HistoryRecord:
        return [h for h in self.history if h.unit == unit][-1]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    from lightning.pytorch.loggers import WandbLogger

    from tests.lightning.test_loggers import _wandb_records

    root = tmp_path_factory.mktemp("wandb_run")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in _ENVIRONMENT.items():
            patch.setenv(key, value)
        for key, name in [("WANDB_DIR", ""), ("WANDB_CONFIG_DIR", "config")]:
            patch.setenv(key, str(root / name))
        patch.setenv("WANDB_CACHE_DIR", str(root / "cache"))
        patch.setenv("WANDB_DATA_DIR", str(root / "data"))
        for name in [n for n in os.environ if n.startswith("LIGHTNING_SDM")]:
            patch.delenv(name)
        pl.seed_everything(0, verbose=False)
        # "detailed": the regime codes are logged too, and read back.
        sdm = SphericalDynamicsCallback(
            every_n_steps=2, window=2, tolerance=0.3, patience=2, log_level="detailed"
        )
        logger = WandbLogger(save_dir=str(root), project="lightning-sdm-tests")
        trainer = pl.Trainer(
            max_epochs=3,
            accelerator="cpu",
            devices=1,
            logger=logger,
            callbacks=[sdm, LearningRateMonitor()],
            log_every_n_steps=2,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(BNNet(lr=LR, weight_decay=WD), loader(noisy_classification_data(samples=256)))
        directory = Path(logger.experiment.dir).parent
        wandb.finish()
    run = Run(root, directory, list(sdm.history))
    _wandb_records(run.log, until="exit")  # the service has written the whole log
    assert len(run.history) == 2 * 12
    assert any(h.in_equilibrium for h in run.history)
    return run


def _report(capsys, *argv: object) -> tuple[int, str, str]:
    code = main(["report", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_report_reads_an_offline_run_directory(offline_run: Run, tmp_path: Path, capsys):
    figure, summary = tmp_path / "report.png", tmp_path / "summary.md"

    code, out, err = _report(capsys, offline_run.directory, "-o", figure, "--summary", summary)

    assert code == 0, err
    assert err == ""  # nothing skipped, nothing damaged
    assert_valid_png(figure)
    assert f"Run: {offline_run.directory} [wandb]" in out
    rows = parse_rows(out)
    assert list(rows) == UNITS  # in natural order: W&B rows hold their keys in no order
    for unit in UNITS:
        last = offline_run.last(unit)
        # Printed as the history's own values would be: W&B holds them exactly.
        assert rows[unit]["measured"] == f"{last.angular_update:.4e}"
        assert rows[unit]["theory"] == f"{last.theory:.4e}"
        assert rows[unit]["ratio"] == f"{last.ratio:.3f}"
        assert rows[unit]["norm"] == f"{last.weight_norm:.4g}"
        assert rows[unit]["regime"] == last.regime.replace("_", " ")
        entries = [h for h in offline_run.history if h.unit == unit]
        first = next((h.global_step for h in entries if h.in_equilibrium), None)
        expected = "not reached" if first is None else f"step {first}"
        if first is not None and not entries[-1].in_equilibrium:
            expected += " (left it by the end)"
        assert rows[unit]["equilibrium"] == expected
    assert "Last window at step 24 (windows from step 2)" in out
    assert f"| `{UNITS[0]}` | {rows[UNITS[0]]['measured']} |" in summary.read_text()


def test_every_way_to_name_the_run_reads_it(offline_run: Run, tmp_path: Path, capsys):
    wandb_dir = offline_run.directory.parent
    # The log itself, the run directory, `wandb/`, the logger's save_dir, W&B's latest-run link.
    names = [offline_run.log, offline_run.directory, wandb_dir, offline_run.root]
    names.append(wandb_dir / "latest-run")
    assert (wandb_dir / "latest-run").is_symlink()
    outputs = []
    for index, name in enumerate(names):
        code, out, err = _report(capsys, name, "-o", tmp_path / f"r{index}.png", "--dpi", 30)
        assert code == 0, (name, err)
        outputs.append(parse_rows(out))
    assert all(rows == outputs[0] for rows in outputs), names
    # The link is not followed when `wandb/` is searched: one run, not two.
    assert [run.path for run in find_runs(wandb_dir)] == [offline_run.directory]


def test_the_newest_run_under_wandb_is_read(offline_run: Run, tmp_path: Path, capsys):
    wandb_dir = tmp_path / "wandb"
    older = wandb_dir / "offline-run-20200101_000000-older"
    newer = wandb_dir / "offline-run-20200101_000001-newer"
    for directory, stamp in ((older, 1_600_000_000), (newer, 1_700_000_000)):
        shutil.copytree(offline_run.directory, directory)
        (log,) = directory.glob("run-*.wandb")
        log = log.rename(directory / f"run-{directory.name.split('-')[-1]}.wandb")  # its own id
        os.utime(log, (stamp, stamp))

    code, out, err = _report(capsys, wandb_dir, "-o", tmp_path / "r.png", "--dpi", 30)

    assert code == 0, err
    assert f"Run: {newer} [wandb]" in out
    assert "2 runs under" in out
    code, out, err = _report(capsys, wandb_dir, "--run", "older", "-o", tmp_path / "r.png")
    assert code == 0 and f"Run: {older} [wandb]" in out, err


def test_wandb_and_history_series_agree(offline_run: Run):
    run, history = load_run(offline_run.directory), run_from_history(offline_run.history)
    assert (run.kind, run.units) == ("wandb", UNITS)
    for unit in UNITS:
        for accessor in ("angular_update", "theory", "ratio", "weight_norm", "equilibrium_flags"):
            logged, expected = getattr(run, accessor)(unit), getattr(history, accessor)(unit)
            assert logged.steps == expected.steps, accessor
            assert logged.values == expected.values, accessor  # exactly: JSON doubles
        assert run.regimes(unit) == history.regimes(unit)
        assert run.equilibrium(unit) == history.equilibrium(unit)
    assert run.equilibrium_fraction().values == history.equilibrium_fraction().values
    # LearningRateMonitor's key, on the same step axis as the sdm/ keys.
    assert list(run.learning_rates) == ["lr-SGD"]
    assert set(run.learning_rates["lr-SGD"].values) == {LR}


def _chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    """``(offset, type, payload)`` of every chunk of a W&B transaction log."""
    position, found = 7, []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's trailer
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:
            break
        found.append((position, kind, data[position + 7 : position + 7 + length]))
        position += 7 + length
    return found


def _history_chunk(data: bytes, step: int) -> int:
    """The offset of the first whole history record logged at ``step`` with sdm/ keys."""
    from wandb.proto import wandb_internal_pb2

    for offset, kind, payload in _chunks(data):
        if kind != 1:
            continue
        record = wandb_internal_pb2.Record.FromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item}
        if items.get("trainer/global_step") == str(step) and any(
            key.startswith("sdm/angular_update/") for key in items
        ):
            return offset
    raise AssertionError(f"no history record at step {step}")


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_or_unfinished_log_is_read_up_to_the_damage(
    offline_run: Run, tmp_path: Path, capsys, damage: str
):
    directory = tmp_path / "offline-run-damaged"
    shutil.copytree(offline_run.directory, directory)
    (log,) = directory.glob("run-*.wandb")
    data = bytearray(log.read_bytes())
    offset = _history_chunk(bytes(data), 12)
    if damage == "truncated":  # as a run killed, or still running, leaves it
        data = data[: offset + 20]
    else:
        data[offset + 30] ^= 0xFF  # inside the payload: only its checksum can tell
    log.write_bytes(bytes(data))

    code, out, err = _report(capsys, directory, "-o", tmp_path / "r.png", "--dpi", 30)

    assert code == 0, err
    (warning,) = [line for line in err.splitlines() if "warning:" in line]
    reason = "it ends inside a record" if damage == "truncated" else "fails its checksum"
    assert "offline-run-damaged" in warning and reason in warning
    # Rows of other keys (the learning rate) at step 12 may precede the damaged one.
    assert re.search(r"its data end at step 1[02];", warning), warning
    assert "Last window at step 10" in out


def test_a_file_named_like_a_log_that_is_not_one_is_refused(tmp_path: Path, capsys):
    directory = tmp_path / "wandb" / "run-20200101_000000-abc"
    directory.mkdir(parents=True)
    (directory / "run-abc.wandb").write_bytes(b"PK\x03\x04 a zip archive, not a W&B log")
    code, _, err = _report(capsys, directory, "-o", tmp_path / "r.png")
    assert code == 2
    assert "not a W&B transaction log" in err and "run-abc.wandb" in err


def test_without_wandb_installed_the_error_says_what_to_install(
    offline_run: Run, tmp_path: Path, monkeypatch, capsys
):
    for name in [n for n in sys.modules if n == "wandb" or n.startswith("wandb.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    code, _, err = _report(capsys, offline_run.directory, "-o", tmp_path / "r.png")
    assert code == 2
    assert "needs the `wandb` package" in err and "pip install lightning-sdm[wandb]" in err
    assert not (tmp_path / "r.png").exists()


def test_an_old_clients_history_jsonl_is_read(offline_run: Run, tmp_path: Path, capsys):
    """``files/wandb-history.jsonl``, one JSON row per ``run.log``, as wandb < 0.18 wrote it."""
    directory = tmp_path / "wandb" / "run-20200101_000000-old"
    (directory / "files").mkdir(parents=True)
    rows: dict[int, dict[str, object]] = {}
    for record in offline_run.history:
        row = rows.setdefault(record.global_step, {"trainer/global_step": record.global_step})
        row[f"sdm/angular_update/{record.unit}"] = record.angular_update
        row[f"sdm/angular_update_theory/{record.unit}"] = record.theory
        row[f"sdm/angular_update_ratio/{record.unit}"] = record.ratio
        row[f"sdm/weight_norm/{record.unit}"] = record.weight_norm
        row["sdm/table"] = {"_type": "table-file", "path": "media/table.json"}  # not a number
    lines = [json.dumps({**row, "_step": index}) for index, row in enumerate(rows.values())]
    (directory / "files" / "wandb-history.jsonl").write_text("\n".join(lines) + "\n")

    code, out, err = _report(capsys, tmp_path / "wandb", "-o", tmp_path / "r.png", "--dpi", 30)

    assert code == 0, err
    assert f"Run: {directory} [wandb]" in out
    rows_out = parse_rows(out)
    assert rows_out[UNITS[1]]["measured"] == f"{offline_run.last(UNITS[1]).angular_update:.4e}"
    run = load_run(directory / "files" / "wandb-history.jsonl")
    assert (
        run.angular_update(UNITS[0]).values
        == run_from_history(offline_run.history).angular_update(UNITS[0]).values
    )


def test_reading_a_wandb_run_imports_no_torch(offline_run: Run, tmp_path: Path):
    from tests.test_structure import _loaded_heavy_modules

    loaded = _loaded_heavy_modules(
        f"""
        import contextlib, io
        from lightning_sdm.report import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["report", {str(offline_run.directory)!r}, "-o", "report.png"])
        assert code == 0, out.getvalue()
        assert "[wandb]" in out.getvalue()
        """,
        tmp_path,
    )
    assert loaded == []


def _write_log(path: Path, payloads: list[bytes]) -> None:
    """A W&B transaction log of these records: header, 32 KiB blocks, CRC-checked chunks."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for payload in payloads:
        first = True
        while first or payload:
            left = 32768 - len(out) % 32768
            if left < 7:  # too short for a chunk header: zeros, and on to the next block
                out += bytes(left)
                left = 32768
            piece, payload = payload[: left - 7], payload[left - 7 :]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)
            crc = zlib.crc32(piece, zlib.crc32(bytes([kind])))
            out += struct.pack("<IHB", crc, len(piece), kind) + piece
            first = False
    path.write_bytes(bytes(out))


def test_a_resumed_run_is_read_from_all_its_directories(offline_run: Run, tmp_path: Path, capsys):
    """A run resumed at step 12 (``WandbLogger(id=..., resume="allow")``): two directories."""
    from tests.lightning.test_loggers import _parse_wandb_file

    records = _parse_wandb_file(offline_run.log.read_bytes())

    def step(record) -> int | None:
        if record.WhichOneof("record_type") != "history":
            return None
        items = {"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item}
        return int(items["trainer/global_step"]) if "trainer/global_step" in items else None

    cut = next(i for i, r in enumerate(records) if (step(r) or 0) > 12)
    before = records[:cut]
    after = [r for r in records if step(r) is None or records.index(r) >= cut]
    wandb_dir = tmp_path / "wandb"
    parts = []
    for name, part, stamp in (("000000", before, 1_600_000_000), ("000100", after, 1_600_000_100)):
        directory = wandb_dir / f"offline-run-20200101_{name}-{offline_run.log.stem[4:]}"
        directory.mkdir(parents=True)
        _write_log(directory / offline_run.log.name, [r.SerializeToString() for r in part])
        os.utime(directory / offline_run.log.name, (stamp, stamp))
        parts.append(directory)
    # The writer writes what the reader reads: a log rewritten whole reads as the original.
    _write_log(tmp_path / offline_run.log.name, [r.SerializeToString() for r in records])
    whole = load_run(tmp_path / offline_run.log.name)
    assert whole.angular_update(UNITS[0]) == load_run(offline_run.log).angular_update(UNITS[0])

    (location,) = find_runs(wandb_dir)
    assert location.path == parts[1]
    assert [path.parent for path in location.files] == parts
    run, history = load_run(wandb_dir), run_from_history(offline_run.history)
    assert load_run(parts[0]).steps() == (2, 12)
    for unit in UNITS:
        for accessor in ("angular_update", "theory", "ratio", "weight_norm", "equilibrium_flags"):
            logged, expected = getattr(run, accessor)(unit), getattr(history, accessor)(unit)
            assert (logged.steps, logged.values) == (expected.steps, expected.values), accessor
    code, out, err = _report(capsys, wandb_dir, "-o", tmp_path / "r.png", "--dpi", 30)
    assert code == 0 and err == "", err
    assert "Last window at step 24 (windows from step 2)" in out


def test_records_longer_than_a_block_are_joined_from_their_pieces(tmp_path: Path):
    """A record over 32 KiB (a long text logged beside the scalars) spans three blocks."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for step, value in ((3, 0.5), (6, 0.25)):
        record = wandb_internal_pb2.Record()
        for key, text in (
            ("notes", json.dumps("x" * 70_000)),  # first, middle and last pieces
            ("sdm/angular_update/w", repr(value)),
            ("trainer/global_step", str(step)),
        ):
            item = record.history.item.add()
            item.nested_key.append(key)
            item.value_json = text
        records.append(record.SerializeToString())
    path = tmp_path / "run-big.wandb"
    _write_log(path, records)
    assert {kind for _, kind, _ in _chunks(path.read_bytes())} == {2, 3, 4}

    run = load_run(path)
    assert (list(run.angular_update("w").steps), list(run.angular_update("w").values)) == (
        [3, 6],
        [0.5, 0.25],
    )
    assert "notes" not in run.scalars  # text is no scalar
