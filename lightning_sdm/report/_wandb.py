"""Reading a Weights & Biases run from its own files: offline or synced, no network.

A W&B run directory (``wandb/offline-run-<time>-<id>/`` or ``wandb/run-<time>-<id>/``) holds
``run-<id>.wandb``, the transaction log the W&B service writes while the run goes: a 7-byte
header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each with a CRC-32 (seeded with
the chunk's type), a length and a type (whole, first, middle or last piece of a record); a record
is a protobuf ``Record``. Its ``history`` records are the rows of ``run.log`` (what
``WandbLogger.log_metrics`` sends), its ``metric`` records the ``define_metric`` calls. The step
of a row is the value in it of the step metric defined for ``sdm/*`` (the callback defines it:
``trainer/global_step`` with Lightning's ``WandbLogger``), else of ``trainer/global_step`` or
``global_step``, else W&B's own ``_step``.

The records are decoded with the ``wandb`` package's own protobuf classes (``wandb.proto``),
imported only when a W&B run is read; the block format is read here (recent ``wandb`` releases
keep no Python reader of it). A run directory without a transaction log but with
``files/wandb-history.jsonl`` (written by ``wandb`` releases before the Go service: one JSON row
per ``run.log``) is read from that file. ``files/wandb-summary.json`` holds last values only,
not series, so it is not needed.

A log that ends inside a record (a run still being written, or a file cut short) or fails a
checksum is read up to there, with a :class:`~lightning_sdm.report.RunDataWarning` naming the
step its data end at.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
import zlib
from array import array
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning_sdm.keys import Keys
from lightning_sdm.report._rundata import (
    _WANDB_HISTORY,
    RunDataError,
    RunDataWarning,
    Series,
    _open_regular,
)

__all__ = ["read_wandb"]

_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_IDENT, _MAGIC = b":W&B", 0xBEE1
_CHUNK = struct.Struct("<IHB")  # CRC-32, length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
# Step keys, in order of preference, when no step metric is defined for ``sdm/*``.
_STEP_KEYS = ("trainer/global_step", "global_step")
_CHUNK_CRC = {kind: zlib.crc32(bytes([kind])) for kind in (_FULL, _FIRST, _MIDDLE, _LAST)}


def read_wandb(path: Path) -> dict[str, Series]:
    """Every numeric value a W&B run logged, by key, on the step of the ``sdm/*`` metrics.

    Args:
        path: the run's ``run-<id>.wandb`` or its ``files/wandb-history.jsonl``.

    Raises:
        RunDataError: the file is not a W&B transaction log or history, or cannot be read.
        ImportError: a transaction log without the ``wandb`` package.
    """
    columns = _Columns()
    if path.name == _WANDB_HISTORY:
        _read_jsonl(path, columns)
    else:
        _read_log(path, columns)
    return columns.series()


class _Columns:
    """Values by key, each with its step (``array`` storage, as the other readers keep)."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[array[int], array[float]]] = {}
        self.step_metric: str | None = None
        self.last_step: int | None = None

    def add_row(self, row: Mapping[str, float], fallback: int | None) -> None:
        step = _step_of(row, self.step_metric, fallback)
        if step is None:
            return
        self.last_step = step
        for key, value in row.items():
            if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                steps, values = self.data.setdefault(key, (array("q"), array("d")))
                steps.append(step)
                values.append(value)

    def series(self) -> dict[str, Series]:
        return {key: Series(steps, values) for key, (steps, values) in self.data.items()}


def _step_of(row: Mapping[str, float], step_metric: str | None, fallback: int | None) -> int | None:
    for key in (step_metric, *_STEP_KEYS):
        value = row.get(key) if key else None
        if value is not None and math.isfinite(value):
            return int(value)
    return fallback


def _number(text: str) -> float | None:
    """A JSON value as a float, or ``None`` for anything but a number (tables, text, booleans)."""
    try:  # JSON numbers, and the NaN / Infinity that W&B writes for non-finite values
        return float(text)
    except ValueError:
        return None


def _read_log(path: Path, columns: _Columns) -> None:
    try:
        from wandb.proto import wandb_internal_pb2
    except ImportError as err:
        raise ImportError(
            f"Reading the W&B run {path} needs the `wandb` package (its protobuf classes; nothing "
            "is sent anywhere): pip install lightning-sdm[wandb]"
        ) from err
    record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
    sdm_glob = f"{Keys.PREFIX}*"
    for payload in _records(path, columns):
        record.Clear()
        try:
            record.ParseFromString(payload)
        except Exception as err:  # protobuf's DecodeError: a checksum passed, the content not
            _damaged(path, f"a record cannot be decoded ({err})", columns)
            return
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for item in record.history.item:
                if item.key or len(item.nested_key) == 1:  # nested keys: media and tables
                    value = _number(item.value_json)
                    if value is not None:
                        row[item.key or item.nested_key[0]] = value
            numbered = record.history.HasField("step")
            step = record.history.step.num if numbered else row.get("_step")
            columns.add_row(row, None if step is None else int(step))
        elif kind == "metric" and record.metric.glob_name.endswith(sdm_glob):
            columns.step_metric = record.metric.step_metric or columns.step_metric


def _records(path: Path, columns: _Columns) -> Iterator[bytes]:
    """The records of a transaction log, block by block; damage ends them with a warning."""
    try:
        with _open_regular(path) as handle:
            header = handle.read(_HEADER.size)
            if len(header) < _HEADER.size or _HEADER.unpack(header)[:2] != (_IDENT, _MAGIC):
                raise RunDataError(f"Cannot read {path}: it is not a W&B transaction log.")
            size, pending, inside, end = _BLOCK - _HEADER.size, b"", False, False
            while not end and (block := handle.read(size)):
                position, size = 0, _BLOCK
                # A block's last bytes, too few for a chunk header, are zeros: skipped.
                while position + _CHUNK.size <= len(block):
                    crc, length, kind = _CHUNK.unpack_from(block, position)
                    if kind == 0 and length == 0:  # zeros: the end of what was written
                        end = True
                        break
                    start, position = position + _CHUNK.size, position + _CHUNK.size + length
                    chunk = block[start:position]
                    if len(chunk) < length:  # a record crosses no block boundary: cut here
                        _damaged(path, "it ends inside a record", columns)
                        return
                    if kind not in _CHUNK_CRC or zlib.crc32(chunk, _CHUNK_CRC[kind]) != crc:
                        _damaged(path, "a record fails its checksum", columns)
                        return
                    if (kind in (_FULL, _FIRST)) == inside:  # a first piece inside a record, ...
                        _damaged(path, "a record is missing a piece", columns)
                        return
                    pending, inside = pending + chunk, kind in (_FIRST, _MIDDLE)
                    if not inside:
                        yield pending
                        pending = b""
            if inside:
                _damaged(path, "it ends inside a record", columns)
    except OSError as err:
        raise RunDataError(f"Cannot read {path}: {err}") from err


def _damaged(path: Path, what: str, columns: _Columns) -> None:
    step = columns.last_step
    end = "no step is readable" if step is None else f"its data end at step {step}"
    text = (
        f"{path}: the W&B run file is damaged or still being written ({what}): {end}; the "
        "report shows the rest"
    )
    warnings.warn(text, RunDataWarning, stacklevel=4)


def _read_jsonl(path: Path, columns: _Columns) -> None:
    skipped = 0
    try:
        with _open_regular(path) as handle:
            for line in handle:
                try:
                    row: Any = json.loads(line)
                except ValueError:
                    skipped += 1
                    continue
                if not isinstance(row, dict):
                    skipped += 1
                    continue
                numbers = {
                    str(key): float(value)
                    for key, value in row.items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)
                }
                step = numbers.get("_step")
                columns.add_row(numbers, None if step is None else int(step))
    except OSError as err:
        raise RunDataError(f"Cannot read {path}: {err}") from err
    if skipped:
        warnings.warn(
            f"{path}: skipped {skipped} lines that are not a JSON object", RunDataWarning, 3
        )
