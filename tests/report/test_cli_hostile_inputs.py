"""``lightning-sdm report`` on hostile or broken inputs: it refuses, warns or survives; no crash.

Every case is a log directory a user can really end up with (a ``--summary`` pointing at the log,
a FIFO or a ``/dev/zero`` link named ``metrics.csv``, a truncated event file, unit names with
``$``, ``[``, terminal escapes or Markdown syntax, 2,000,000 rows, 400 units). The contract:
errors exit with code 2 and one ``lightning-sdm: error: ...`` line, warnings are one
``lightning-sdm: warning: ...`` line each on stderr, and nothing is ever written over an input.
"""

from __future__ import annotations

import csv
import os
import re
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

from lightning_sdm.keys import Keys
from lightning_sdm.report._cli import main
from lightning_sdm.report._plot import plot_run, unit_title
from lightning_sdm.report._rundata import load_run

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STEPS = (10, 20, 30, 40, 50)


# ------------------------------------------------------------------ helpers


def unit_columns(unit: str, au: float = 0.02, theory: float = 0.021, norm: float = 3.0) -> dict:
    """The per-unit keys the callback logs for a layer unit (see ``records.window_metrics``)."""
    return {
        f"{Keys.ANGULAR_UPDATE}{unit}": au,
        f"{Keys.THEORY}{unit}": theory,
        f"{Keys.RATIO}{unit}": au / theory,
        f"{Keys.WEIGHT_NORM}{unit}": norm,
    }


def write_metrics(path: Path, rows: Iterable[Mapping[str, object]]) -> Path:
    """A ``metrics.csv`` as ``CSVLogger`` writes it: sorted columns, ``\\r\\n``, sparse rows."""
    rows = list(rows)
    keys = sorted({key for row in rows for key in row})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def sdm_rows(units: Iterable[str], steps: Iterable[int] = STEPS) -> list[dict]:
    units = list(units)
    rows: list[dict] = []
    for index, step in enumerate(steps):
        row: dict[str, object] = {"step": step, Keys.FRACTION: 0.0}
        for unit in units:
            row.update(unit_columns(unit, au=0.02 + 0.001 * index))
        rows.append(row)
        rows.append({"lr-SGD": 0.1, "step": step})  # LearningRateMonitor's rows are separate
    return rows


def simple_run(directory: Path, units: Iterable[str] = ("net.0.weight",)) -> Path:
    return write_metrics(directory / "metrics.csv", sdm_rows(units))


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def error(capsys, *argv: object) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith("lightning-sdm"), err
    assert "error:" in lines[-1], err
    return err


def warnings_of(err: str) -> list[str]:
    lines = err.strip().splitlines()
    assert all(line.startswith("lightning-sdm: warning: ") for line in lines), err
    return lines


def image_size(path: Path) -> tuple[int, int]:
    height, width = imread(path).shape[:2]
    return width, height


# ------------------------------------------------------------------ 1. outputs over inputs


def test_summary_or_figure_over_an_input_or_each_other_is_refused(tmp_path: Path, capsys):
    csv_path = simple_run(tmp_path / "logs" / "version_0")
    before = csv_path.read_bytes()
    figure = tmp_path / "report.png"

    err = error(capsys, "report", tmp_path / "logs", "-o", figure, "--summary", csv_path)
    assert "input" in err and "metrics.csv" in err and "--summary" in err
    # Given the file itself as LOG_DIR, and through a relative path with `..`.
    sneaky = tmp_path / "logs" / "version_0" / ".." / "version_0" / "metrics.csv"
    error(capsys, "report", csv_path, "-o", figure, "--summary", sneaky)
    # Through a symbolic link and a hard link (samefile), for --summary and for -o.
    (tmp_path / "link.md").symlink_to(csv_path)
    error(capsys, "report", tmp_path / "logs", "-o", figure, "--summary", tmp_path / "link.md")
    os.link(csv_path, tmp_path / "hard.png")
    err = error(capsys, "report", tmp_path / "logs", "-o", tmp_path / "hard.png")
    assert "-o" in err and "input" in err
    assert csv_path.read_bytes() == before
    assert not figure.exists()

    # --summary equal to -o (also through a link to an existing figure).
    err = error(capsys, "report", tmp_path / "logs", "-o", figure, "--summary", figure)
    assert "--summary" in err and "-o" in err
    assert not figure.exists()
    code, _, err = run(capsys, "report", tmp_path / "logs", "-o", figure, "--dpi", 40)
    assert code == 0, err
    png = figure.read_bytes()
    (tmp_path / "fig_link.md").symlink_to(figure)
    error(capsys, "report", tmp_path / "logs", "-o", figure, "--summary", tmp_path / "fig_link.md")
    assert figure.read_bytes() == png


def test_summary_over_an_event_file_is_refused(tmp_path: Path, capsys):
    event = tensorboard_run(tmp_path / "tb")
    before = event.read_bytes()
    err = error(capsys, "report", tmp_path / "tb", "-o", tmp_path / "r.png", "--summary", event)
    assert "input" in err and event.name in err
    err = error(capsys, "report", event, "-o", tmp_path / "r.png", "--summary", event)
    assert event.read_bytes() == before
    assert not (tmp_path / "r.png").exists()


# ------------------------------------------------------------------ 2. dpi


@pytest.mark.parametrize("dpi", ["0", "-5", "100000", "abc"])
def test_dpi_out_of_range_is_a_usage_error(tmp_path: Path, capsys, dpi: str):
    simple_run(tmp_path / "logs")
    code = main(["report", str(tmp_path / "logs"), "-o", str(tmp_path / "r.png"), "--dpi", dpi])
    err = capsys.readouterr().err
    assert code == 2
    assert "--dpi" in err and "10" in err and "1200" in err
    assert not (tmp_path / "r.png").exists()


def test_the_figure_pixel_size_is_capped(tmp_path: Path, capsys):
    simple_run(tmp_path / "logs")
    figure = tmp_path / "r.png"
    code, _, err = run(capsys, "report", tmp_path / "logs", "-o", figure, "--dpi", 1200)
    assert code == 0, err
    (warning,) = warnings_of(err)
    assert "dpi" in warning
    width, height = image_size(figure)
    assert width * height <= 40_000_000 and max(width, height) <= 16384


# ------------------------------------------------------------------ 3. absurd steps and values


def test_rows_with_absurd_steps_are_skipped_with_one_warning(tmp_path: Path, capsys):
    path = simple_run(tmp_path / "logs")
    text = path.read_text()
    header = text.splitlines()[0].split(",")
    bad = []
    for step in ("inf", "nan", "1e400", "-5", "1.5", "-inf", "9" * 30):
        cells = ["0.5"] * len(header)
        cells[header.index("step")] = step
        bad.append(",".join(cells))
    path.write_text(text + "\r\n".join(bad) + "\r\n")

    code, out, err = run(capsys, "report", tmp_path / "logs", "-o", tmp_path / "r.png")
    assert code == 0, err
    (warning,) = warnings_of(err)
    assert "7 rows" in warning and "step" in warning and "metrics.csv" in warning
    assert "Last window at step 50" in out

    path.write_text(text.splitlines()[0] + "\r\n" + "\r\n".join(bad) + "\r\n")
    err = error(capsys, "report", tmp_path / "logs", "-o", tmp_path / "r2.png")
    assert "step" in err and "metrics.csv" in err


def test_a_metrics_csv_with_only_its_header_is_a_run_without_windows(tmp_path: Path, capsys):
    # A run killed before the CSVLogger's first flush: the header, no row.
    run_dir = tmp_path / "logs" / "version_0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text(
        "epoch,sdm/angular_update/net.0.weight,sdm/angular_update_theory/net.0.weight,step\n"
    )
    err = error(capsys, "report", tmp_path / "logs", "-o", tmp_path / "r.png")
    assert "unexpected" not in err and "please report" not in err
    assert "No sdm/ keys" in err and "did a window close" in err


def test_a_repeated_column_is_said_and_rows_out_of_order_are_read_in_step_order(tmp_path):
    from lightning_sdm.report import RunDataWarning, load_run

    run_dir = tmp_path / "logs" / "version_0"
    run_dir.mkdir(parents=True)
    u = "sdm/angular_update/w"
    (run_dir / "metrics.csv").write_text(
        f"{u},sdm/angular_update_theory/w,{u},step\n"
        "0.1,0.2,0.3,20\n"  # a resume from an earlier checkpoint appends step 10 after 20
        "0.4,0.2,0.5,10\n"
    )
    with pytest.warns(RunDataWarning, match="appear more than once"):
        data = load_run(tmp_path / "logs")
    series = data.angular_update("w")
    assert list(series.steps) == [10, 20]
    assert list(series.values) == [0.5, 0.3]  # the last column of the name, in step order
    assert series.last == 0.3


def test_huge_and_infinite_values_are_drawn_and_shown(tmp_path: Path, capsys):
    rows = sdm_rows(["net.0.weight", "net.1.weight"])
    rows[-2].update(unit_columns("net.0.weight", au=1e308, theory=float("inf"), norm=-1e308))
    rows[0][f"{Keys.WEIGHT_NORM}net.0.weight"] = 1e308  # a linear axis from -1e308 to 1e308
    rows[-2][f"{Keys.RATIO}net.1.weight"] = float("-inf")
    rows[-2][f"{Keys.WEIGHT_NORM}net.1.weight"] = float("nan")
    rows[-1]["lr-SGD"] = float("inf")
    rows[-2][Keys.FRACTION] = 1e308
    write_metrics(tmp_path / "logs" / "metrics.csv", rows)

    code, out, err = run(capsys, "report", tmp_path / "logs", "-o", tmp_path / "r.png")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("net.0.weight"))
    assert "1.0000e+308" in line and "inf" in line
    line = next(line for line in out.splitlines() if line.startswith("net.1.weight"))
    assert "-inf" in line and "n/a" in line
    assert image_size(tmp_path / "r.png")[0] > 500


# ------------------------------------------------------------------ 4. mathtext


def test_mathtext_in_unit_names_and_paths_is_shown_literally(tmp_path: Path, capsys):
    units = ["$\\frac{$", "a$b$c", "back\\slash$"]
    log_dir = tmp_path / "run $x^$ {"
    simple_run(log_dir, units)
    code, out, err = run(capsys, "report", log_dir, "-o", tmp_path / "r.png", "--dpi", 40)
    assert code == 0, err
    assert (tmp_path / "r.png").stat().st_size > 1000
    for unit in units:  # the table shows the names as they are
        assert any(line.startswith(unit + " ") for line in out.splitlines()), unit

    figure = plot_run(load_run(log_dir))
    titles = [ax.get_title() for ax in figure.axes]
    for unit in units:
        assert unit_title(unit) in titles
    assert "\\$" in unit_title("$x$")  # escaped: Matplotlib shows it, does not parse it
    figure.canvas.draw()  # rendering parses every text (titles, legends, labels)


# ------------------------------------------------------------------ 5. non-regular files


@pytest.mark.timeout(60)
def test_a_fifo_named_metrics_csv_is_skipped(tmp_path: Path, capsys):
    simple_run(tmp_path / "good")
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "metrics.csv")
    code, out, err = run(capsys, "report", tmp_path, "-o", tmp_path / "r.png", "--dpi", 40)
    assert code == 0, err
    (warning,) = warnings_of(err)
    assert "fifo" in warning.lower() and "metrics.csv" in warning
    assert f"Run: {tmp_path / 'good' / 'metrics.csv'}" in out
    err = error(capsys, "report", tmp_path / "fifo" / "metrics.csv")
    assert "regular file" in err


def test_a_link_to_dev_zero_named_metrics_csv_is_skipped(tmp_path: Path, capsys):
    simple_run(tmp_path / "good")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "metrics.csv").symlink_to("/dev/zero")
    code, out, err = run(capsys, "report", tmp_path, "-o", tmp_path / "r.png", "--dpi", 40)
    assert code == 0, err
    (warning,) = warnings_of(err)
    assert "zero" in warning and "device" in warning
    assert f"Run: {tmp_path / 'good' / 'metrics.csv'}" in out
    err = error(capsys, "report", tmp_path, "--run", "zero", "-o", tmp_path / "r.png")
    assert "character device" in err and "No run 'zero'" in err
    err = error(capsys, "report", tmp_path / "zero" / "metrics.csv")
    assert "regular file" in err


def test_dangling_symlinks_do_not_abort_the_scan(tmp_path: Path, capsys):
    simple_run(tmp_path / "good")
    tensorboard_run(tmp_path / "tb")
    (tmp_path / "tb" / "events.out.tfevents.0.gone.1").symlink_to(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.csv").symlink_to(tmp_path / "nowhere")
    (tmp_path / "good" / "notes.txt").symlink_to(tmp_path / "nowhere")
    for argv in (["--run", "good"], ["--run", "tb"], []):
        code, out, err = run(capsys, "report", tmp_path, "-o", tmp_path / "r.png", *argv)
        assert code == 0, err
        lines = warnings_of(err)
        assert len(lines) == 2, err  # the two broken links named like run files
        assert all("broken symbolic link" in line for line in lines)
        assert "notes.txt" not in err
    code, out, _ = run(capsys, "report", tmp_path, "--list")
    assert code == 0 and "broken" not in out


def test_a_huge_file_that_is_not_a_metrics_csv_is_refused(tmp_path: Path, capsys):
    (tmp_path / "a").mkdir()
    with (tmp_path / "a" / "metrics.csv").open("wb") as handle:
        handle.write(b"," * (20 << 20))
    err = error(capsys, "report", tmp_path / "a", "-o", tmp_path / "r.png")
    assert "longer than" in err and "metrics.csv" in err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.csv").write_bytes(bytes(range(256)) * 4000)
    err = error(capsys, "report", tmp_path / "b", "-o", tmp_path / "r.png")
    assert "metrics.csv" in err


# ------------------------------------------------------------------ 6. damaged event files


def tensorboard_run(directory: Path, unit: str = "net.0.weight") -> Path:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(directory)) as writer:
        for index, step in enumerate(range(10, 101, 10)):
            for key, value in unit_columns(unit, au=0.02 + 0.001 * index).items():
                writer.add_scalar(key, value, step)
            writer.add_scalar(Keys.FRACTION, 0.0, step)
    (event,) = directory.glob("events.out.tfevents.*")
    return event


def record_offsets(path: Path) -> list[tuple[int, int]]:
    """``(offset, step)`` of every record of a TFRecord file."""
    from tensorboard.compat.proto.event_pb2 import Event

    data, offset, found = path.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = Event.FromString(data[offset + 12 : offset + 12 + length])
        found.append((offset, event.step))
        offset += 12 + length + 4
    return found


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_event_file_is_reported(tmp_path: Path, capsys, damage: str):
    event = tensorboard_run(tmp_path / "tb")
    offset = next(o for o, step in record_offsets(event) if step == 60)
    data = bytearray(event.read_bytes())
    if damage == "truncated":
        data = data[: offset + 10]
    else:
        data[offset + 14] ^= 0xFF  # inside the payload: only its checksum can tell
    event.write_bytes(bytes(data))

    code, out, err = run(capsys, "report", tmp_path / "tb", "-o", tmp_path / "r.png", "--dpi", 40)
    assert code == 0, err
    (warning,) = warnings_of(err)
    assert event.name in warning and "step 50" in warning
    assert "Last window at step 50" in out


# ------------------------------------------------------------------ 7. exact unit names


def test_exact_unit_names_with_brackets_win_over_globbing(tmp_path: Path, capsys):
    units = ["blocks[0].weight", "blocks0.weight", "net.0.weight[3]", "net.0.weight3"]
    simple_run(tmp_path / "logs", units)

    def rows(*patterns: str) -> list[str]:
        argv = ["report", tmp_path / "logs", "-o", tmp_path / "r.png", "--dpi", 40, "--units"]
        code, out, err = run(capsys, *argv, *patterns)
        assert code == 0, err
        return [line.split()[0] for line in out.splitlines() if line.split()[0] in units]

    assert rows("blocks[0].weight") == ["blocks[0].weight"]
    assert rows("net.0.weight[3]") == ["net.0.weight[3]"]
    assert sorted(rows("blocks*")) == ["blocks0.weight", "blocks[0].weight"]  # globs still glob
    both = ["blocks0.weight", "net.0.weight[3]"]
    assert sorted(rows("net.0.weight[3]", "blocks0.weight")) == both


# ------------------------------------------------------------------ 8. escapes and Markdown


def test_terminal_escapes_in_names_are_shown_escaped(tmp_path: Path, capsys):
    units = ["net.\x1b[31mred", "net.\x1b]0;title\x07x", "net.\u202etxt"]
    log_dir = tmp_path / "logs\x1b[2J"
    simple_run(log_dir / "version_0", units)
    summary = tmp_path / "s.md"
    argv = ["report", log_dir, "-o", tmp_path / "r.png", "--dpi", 40, "--summary", summary]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    for text in (out, err, summary.read_text()):
        assert not any(ch in text for ch in "\x1b\x07\u202e")
    assert "net.\\x1b[31mred" in out and "\\x1b]0;title\\x07x" in out and "\\u202e" in out
    assert "logs\\x1b[2J" in out
    _, out, err = run(capsys, "report", log_dir.parent, "--list")
    assert "\x1b" not in out and "logs\\x1b[2J" in out
    err = error(capsys, "report", log_dir, "--units", "\x1b[31m*nothing")
    assert "\x1b" not in err and "\\x1b[31m*nothing" in err


def gfm_cells(row: str) -> list[str]:
    """The cells of a GitHub-flavoured Markdown table row (``\\|`` does not split)."""
    assert row.startswith("| ") and row.endswith(" |")
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row[1:-1])]


def code_span_text(cell: str) -> str:
    """What a CommonMark code span renders, with GFM's table-cell ``\\|`` unescaping."""
    fence = re.match(r"`+", cell)
    assert fence, cell
    ticks = fence.group(0)
    assert cell.endswith(ticks) and not cell.endswith("`" + ticks), cell
    inner = cell[len(ticks) : -len(ticks)]
    assert not re.search(rf"(?<!`){ticks}(?!`)", inner), cell  # the fence is not closed early
    if inner.startswith(" ") and inner.endswith(" ") and inner.strip():
        inner = inner[1:-1]
    return inner.replace("\\|", "|")


def test_markdown_special_names_keep_the_summary_table_intact(tmp_path: Path, capsys):
    units = ["a|b", "c`d", "``e", "f`", "*g*_h_", "<i>[j](k)", "l\\|m", " n "]
    simple_run(tmp_path / "logs", units)
    summary = tmp_path / "summary.md"
    argv = ["report", tmp_path / "logs", "-o", tmp_path / "r.png", "--dpi", 40]
    code, _, err = run(capsys, *argv, "--summary", summary)
    assert code == 0, err
    rows = [line for line in summary.read_text().splitlines() if line.startswith("| ")]
    header, *body = rows
    assert len(gfm_cells(header)) == 7
    assert len(body) == len(units)
    names = []
    for row in body:
        cells = gfm_cells(row)
        assert len(cells) == 7, row
        names.append(code_span_text(cells[0]))
    assert sorted(names) == sorted(units)


# ------------------------------------------------------------------ 9. scale


def write_big_metrics(path: Path, rows: int, units: int = 4) -> None:
    """``rows`` dense windows of ``units`` units, as ``CSVLogger`` formats them."""
    names = [f"model.layer{i}.conv.weight" for i in range(1, units + 1)]
    keys = sorted(
        [f"{Keys.ANGULAR_UPDATE}{n}" for n in names] + [f"{Keys.THEORY}{n}" for n in names]
    )
    # Values as the callback logs them: float32 tensors' .item() (17 significant digits).
    import numpy as np

    rng = np.random.default_rng(0)
    block = rng.uniform(0.01, 0.03, size=(997, len(keys))).astype(np.float32).astype(float)
    tails = [",".join(repr(float(v)) for v in row) for row in block]
    with path.open("w", newline="") as handle:
        handle.write(",".join([*keys, "step"]) + "\r\n")
        for start in range(0, rows, 20_000):
            stop = min(rows, start + 20_000)
            handle.write("".join(f"{tails[s % 997]},{s}\r\n" for s in range(start, stop)))


@pytest.mark.slow
def test_two_million_rows_read_whole_in_bounded_memory(tmp_path: Path):
    # The time it takes is a benchmark's figure, printed here, never asserted (CI is a busy
    # 2-core machine): the test bounds the work (every row read) and the memory.
    if not Path("/proc/self/status").exists():
        pytest.skip("reads the peak memory from /proc (Linux)")
    write_big_metrics(tmp_path / "metrics.csv", 2_000_000)
    probe = textwrap.dedent(
        f"""
        import sys
        from lightning_sdm.report import main
        code = main(["report", {str(tmp_path)!r}, "-o", {str(tmp_path / "r.png")!r}])
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so it would report
        # the test process's own peak; the high-water mark belongs to this new address space.
        status = open("/proc/self/status").read()
        hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        print(f"PEAK_MB {{int(hwm.split()[1]) / 1024:.0f}}", file=sys.stderr)
        sys.exit(code)
        """
    )
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    peak = float(re.search(r"PEAK_MB (\d+)", result.stderr).group(1))
    print(f"2,000,000 rows: {seconds:.2f} s, peak RSS {peak:.0f} MB")
    assert "Last window at step 1999999" in result.stdout
    assert peak < 400, peak


# ------------------------------------------------------------------ 10. many units


def test_many_units_keep_the_figure_bounded(tmp_path: Path, capsys):
    units = [f"net.{i}.weight" for i in range(400)]
    write_metrics(tmp_path / "logs" / "metrics.csv", sdm_rows(units, steps=(10, 20)))
    figure = tmp_path / "r.png"
    code, out, err = run(capsys, "report", tmp_path / "logs", "-o", figure)
    assert code == 0, err
    (warning,) = warnings_of(err)
    assert "24" in warning and "400" in warning and "--units" in warning
    width, height = image_size(figure)
    assert height <= 5000 and width <= 1300, (width, height)
    assert sum(line.startswith("net.") for line in out.splitlines()) == 400  # the table: all

    code, _, err = run(capsys, "report", tmp_path / "logs", "-o", figure, "--units", "net.39?.*")
    assert code == 0 and err == ""
    assert image_size(figure)[1] < height

    code = main(["report", "--help"])
    assert code == 0 and "24" in capsys.readouterr().out
