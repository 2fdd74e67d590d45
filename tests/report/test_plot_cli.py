"""The report figure and the ``lightning-sdm report`` command, on logs written by real short fits.

One fit per granularity (module-scoped) writes TensorBoard and CSV logs with the callback and a
``LearningRateMonitor``; the tests read them back through the command line (in-process ``main``)
and through the plotting API, and compare every number with the callback's own ``history``.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.records import REGIMES, HistoryRecord
from lightning_sdm.report._cli import format_summary, main
from lightning_sdm.report._plot import (
    EQUILIBRIUM_TITLE,
    LEARNING_RATE_TITLE,
    RATIO_TITLE,
    WEIGHT_NORM_TITLE,
    plot_run,
    unit_title,
)
from lightning_sdm.report._rundata import RunDataError, load_run, run_from_history
from tests.helpers import BNNet, loader, noisy_classification_data

matplotlib = pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")
from matplotlib.image import imread  # noqa: E402

UNITS = ["net.0.weight", "net.3.weight"]
# Fast-equilibrating hyper-parameters (relaxation time ~3 steps): units enter equilibrium, and
# later leave it, within the 24 steps of the fit.
LR, WD = 0.2, 0.05
NUMBER = r"[-+0-9.e]+|n/a"
REGIME = "|".join(sorted((r.replace("_", " ") for r in REGIMES), key=len, reverse=True))
ROW = re.compile(
    rf"^(\S+)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+({REGIME}|n/a)\s+(.+)$"
)


@dataclass
class Fit:
    root: Path
    history: list[HistoryRecord]
    granularity: str

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def csv(self) -> Path:
        return self.root / "csv"

    def last(self, unit: str) -> HistoryRecord:
        return [h for h in self.history if h.unit == unit][-1]

    def all_in_equilibrium_step(self) -> int | None:
        """First step at which every unit was in equilibrium (what the logged fraction shows)."""
        for step in sorted({h.global_step for h in self.history}):
            if all(h.in_equilibrium for h in self.history if h.global_step == step):
                return step
        return None


_FITS: dict[str, Fit] = {}


def _fit(granularity: str, tmp_path_factory: pytest.TempPathFactory) -> Fit:
    if granularity not in _FITS:
        _FITS[granularity] = _train(granularity, tmp_path_factory.mktemp(f"logs_{granularity}"))
    return _FITS[granularity]


@pytest.fixture(params=["layer", "channel"])
def fit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Fit:
    """A fit per granularity, for the tests whose subject depends on it."""
    return _fit(request.param, tmp_path_factory)


@pytest.fixture
def layer_fit(tmp_path_factory: pytest.TempPathFactory) -> Fit:
    return _fit("layer", tmp_path_factory)


def _train(granularity: str, root: Path) -> Fit:
    pl.seed_everything(0, verbose=False)
    sdm = SphericalDynamicsCallback(  # "detailed": the regime codes are logged, and read back
        granularity=granularity,
        every_n_steps=2,
        window=2,
        tolerance=0.3,
        patience=2,
        log_level="detailed",
    )
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=[TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv")],
        callbacks=[sdm, LearningRateMonitor()],
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(BNNet(lr=LR, weight_decay=WD), loader(noisy_classification_data(samples=256)))
    result = Fit(root, list(sdm.history), granularity)
    assert [h.unit for h in result.history[:2]] == UNITS
    assert len(result.history) == 2 * 12  # 24 steps, a window every 2
    # The data must exercise the equilibrium marks (entering, and leaving).
    assert any(h.in_equilibrium for h in result.history)
    assert result.all_in_equilibrium_step() is not None
    return result


def parse_rows(out: str) -> dict[str, dict[str, str]]:
    rows = {}
    for line in out.splitlines():
        match = ROW.match(line)
        if match and match.group(1) in UNITS:
            unit, measured, theory, ratio, norm, regime, equilibrium = match.groups()
            rows[unit] = {
                "measured": measured,
                "theory": theory,
                "ratio": ratio,
                "norm": norm,
                "regime": regime,
                "equilibrium": equilibrium.strip(),
            }
    return rows


def assert_valid_png(path: Path, min_width: int = 600, min_height: int = 600) -> None:
    assert path.is_file() and path.stat().st_size > 10_000
    with path.open("rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    height, width, channels = image.shape
    assert min_width <= width <= 4000 and min_height <= height <= 6000
    assert channels in (3, 4)
    assert image[..., :3].std() > 0.01  # something is drawn


# ------------------------------------------------------------------ the command


@pytest.mark.parametrize("kind", ["tensorboard", "csv"])
def test_report_command_writes_figure_and_summary(fit: Fit, kind: str, tmp_path: Path, capsys):
    log_dir = fit.tensorboard if kind == "tensorboard" else fit.csv
    figure, summary = tmp_path / "out" / "report.png", tmp_path / "summary.md"

    code = main(["report", str(log_dir), "-o", str(figure), "--summary", str(summary)])

    out, err = capsys.readouterr()
    assert code == 0, err
    assert_valid_png(figure)
    assert f"[{kind}]" in out and f"Figure: {figure}" in out
    rows = parse_rows(out)
    assert sorted(rows) == UNITS
    for unit in UNITS:
        last = fit.last(unit)
        # Printed with 5 significant digits (ratio: 3 decimals); TensorBoard stores float32.
        assert float(rows[unit]["measured"]) == pytest.approx(last.angular_update, rel=1e-4)
        assert float(rows[unit]["theory"]) == pytest.approx(last.theory, rel=1e-4)
        assert float(rows[unit]["ratio"]) == pytest.approx(last.ratio, abs=6e-4)
        assert float(rows[unit]["norm"]) == pytest.approx(last.weight_norm, rel=1e-3)
        # The callback logs sdm/in_equilibrium/<unit>: the report gives each unit's own step.
        entries = [h for h in fit.history if h.unit == unit]
        first = next((h.global_step for h in entries if h.in_equilibrium), None)
        expected = "not reached" if first is None else f"step {first}"
        if first is not None and not entries[-1].in_equilibrium:
            expected += " (left it by the end)"
        assert rows[unit]["equilibrium"] == expected
        assert rows[unit]["regime"] == last.regime.replace("_", " ")  # logged as a code
    markdown = summary.read_text()
    assert "| unit | measured | theory | ratio | norm | regime | equilibrium |" in markdown
    for unit in UNITS:
        assert f"| `{unit}` | {rows[unit]['measured']} | {rows[unit]['theory']} |" in markdown
    assert "![SDM report](out/report.png)" in markdown


def test_report_picks_the_newest_run_with_sdm_keys(layer_fit: Fit, tmp_path: Path, capsys):
    csv_text = (layer_fit.csv / "version_0" / "metrics.csv").read_text()
    old, new, other = tmp_path / "old", tmp_path / "new", tmp_path / "no_sdm"
    for directory in (old, new, other):
        directory.mkdir()
    (old / "metrics.csv").write_text(csv_text)
    (new / "metrics.csv").write_text(csv_text)
    (other / "metrics.csv").write_text("step,train/loss\n0,1.5\n1,1.4\n")
    for age, directory in enumerate((other, new, old)):  # `other` is the newest
        stamp = 1_700_000_000 - 1000 * age
        os.utime(directory / "metrics.csv", (stamp, stamp))

    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r.png"), "--dpi", "40"]) == 0
    out = capsys.readouterr().out
    assert f"Run: {new / 'metrics.csv'} [csv]" in out
    assert "3 runs under" in out

    args = ["report", str(tmp_path), "--run", "old", "-o", str(tmp_path / "r.png"), "--dpi", "40"]
    assert main(args) == 0
    assert f"Run: {old / 'metrics.csv'} [csv]" in capsys.readouterr().out

    assert main(["report", str(tmp_path), "--list"]) == 0
    listing = capsys.readouterr().out.split()
    assert listing == [
        "csv",
        "no_sdm/metrics.csv",
        "csv",
        "new/metrics.csv",
        "csv",
        "old/metrics.csv",
    ]


def test_report_on_a_root_with_both_loggers(layer_fit: Fit, tmp_path: Path, capsys):
    assert main(["report", str(layer_fit.root), "--run", "tb", "-o", str(tmp_path / "r.pdf")]) == 0
    out = capsys.readouterr().out
    assert f"Run: {layer_fit.tensorboard / 'version_0'} [tensorboard]" in out
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")

    args = ["report", str(layer_fit.root), "--units", "net.3.*", "-o", str(tmp_path / "r.png")]
    args += ["--dpi", "40"]
    assert main(args) == 0
    assert sorted(parse_rows(capsys.readouterr().out)) == ["net.3.weight"]


# ------------------------------------------------------------------ errors


def _error(capsys, *argv: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in err
    return err


def test_report_errors_exit_2_with_a_message(layer_fit: Fit, tmp_path: Path, capsys):
    err = _error(capsys, "report", str(tmp_path / "missing"))
    assert "no such directory" in err and "missing" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No TensorBoard event files" in _error(capsys, "report", str(empty))
    assert "no TensorBoard event files" in _error(capsys, "report", str(empty), "--list")

    no_sdm = tmp_path / "no_sdm"
    no_sdm.mkdir()
    (no_sdm / "metrics.csv").write_text("step,train/loss\n0,1.5\n")
    assert "No sdm/ keys" in _error(capsys, "report", str(no_sdm))

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb_no_sdm")) as writer:
        writer.add_scalar("train/loss", 1.0, 0)
    assert "No sdm/ keys" in _error(capsys, "report", str(tmp_path / "tb_no_sdm"))

    assert "No run 'nope'" in _error(capsys, "report", str(layer_fit.root), "--run", "nope")
    assert "No unit matches" in _error(
        capsys,
        "report",
        str(layer_fit.csv),
        "--units",
        "classifier*",
        "-o",
        str(tmp_path / "x.png"),
    )
    assert "cannot write" in _error(
        capsys, "report", str(layer_fit.csv), "-o", str(tmp_path / "x.xyz")
    )
    assert not (tmp_path / "x.xyz").exists()
    _error(capsys)  # no command: usage
    _error(capsys, "report")  # missing LOG_DIR: argparse's usage error
    assert main(["--help"]) == 0
    capsys.readouterr()


def test_missing_matplotlib_is_a_clear_error(layer_fit: Fit, tmp_path: Path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backend_bases"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=re.escape("pip install lightning-sdm[plot]")):
        plot_run(layer_fit.history)
    err = _error(capsys, "report", str(layer_fit.csv), "-o", str(tmp_path / "r.png"))
    assert "pip install lightning-sdm[plot]" in err


def test_console_script_is_registered():
    try:
        scripts = metadata.entry_points(group="console_scripts")
    except Exception:  # pragma: no cover
        pytest.skip("package metadata unavailable")
    found = [e for e in scripts if e.name == "lightning-sdm"]
    if not found:
        pytest.skip("lightning-sdm is not installed (pip install -e .)")
    assert found[0].value == "lightning_sdm.report:main"


# ------------------------------------------------------------------ figure and data


def _lines(ax: Any) -> list[Any]:
    return list(ax.lines)


def _unit_axes(figure: Any) -> dict[str, Any]:
    return {ax.get_title(): ax for ax in figure.axes}


@pytest.mark.parametrize("source", ["tensorboard", "csv", "history"])
def test_figure_has_the_expected_panels(fit: Fit, source: str):
    if source == "history":
        run = run_from_history(fit.history)
    else:
        run = load_run(fit.tensorboard if source == "tensorboard" else fit.csv)
    figure = plot_run(run)

    titles = [ax.get_title() for ax in figure.axes]
    assert titles == [
        *(unit_title(u) for u in UNITS),
        RATIO_TITLE,
        WEIGHT_NORM_TITLE,
        LEARNING_RATE_TITLE,
        EQUILIBRIUM_TITLE,
    ]
    axes = _unit_axes(figure)
    all_step = fit.all_in_equilibrium_step()
    for unit in UNITS:
        ax = axes[unit_title(unit)]
        entries = [h for h in fit.history if h.unit == unit]
        first = next(h.global_step for h in entries if h.in_equilibrium)
        measured, theory, trajectory, marker = _lines(ax)
        # The measured line is the history's RMS angular update, at the history's steps.
        assert list(measured.get_xdata()) == [h.global_step for h in entries]
        assert list(measured.get_ydata()) == pytest.approx(
            [h.angular_update for h in entries], rel=1e-6
        )
        assert list(theory.get_ydata()) == pytest.approx([h.theory for h in entries])
        assert trajectory.get_label() == "trajectory"
        want = [math.nan if h.trajectory is None else h.trajectory for h in entries]
        assert list(trajectory.get_ydata()) == pytest.approx(want, rel=1e-6, nan_ok=True)
        assert theory.get_label() == f"theory = {entries[0].theory:.3g}"
        # The equilibrium mark: per unit from the history, the all-units step from the logs.
        assert list(marker.get_xdata()) == [first, first] if source == "history" else [all_step] * 2
        assert ax.get_yscale() == "log"
        bands = 1 if fit.granularity == "channel" else 0
        assert len(ax.collections) == bands
        if source == "history":  # shaded intervals in equilibrium
            assert len(ax.patches) >= 1
    ratio = axes[RATIO_TITLE]
    assert len(_lines(ratio)) == len(UNITS) + 1 and ratio.get_yscale() == "log"
    assert list(_lines(ratio)[-1].get_ydata()) == [1.0, 1.0]
    norms = axes[WEIGHT_NORM_TITLE]
    assert [line.get_label() for line in _lines(norms)] == UNITS
    assert list(_lines(norms)[1].get_ydata()) == pytest.approx(
        [h.weight_norm for h in fit.history if h.unit == UNITS[1]], rel=1e-6
    )
    lr = axes[LEARNING_RATE_TITLE]
    (lr_line,) = _lines(lr)
    assert lr_line.get_label() == ("lr" if source == "history" else "lr-SGD")
    assert list(lr_line.get_ydata()) == pytest.approx([LR] * len(lr_line.get_ydata()))
    fraction = axes[EQUILIBRIUM_TITLE]
    step_line, all_units = _lines(fraction)
    assert max(step_line.get_ydata()) == 1.0
    assert list(all_units.get_xdata()) == [all_step, all_step]


def test_log_and_history_series_agree(fit: Fit):
    history = run_from_history(fit.history)
    for path, rel in ((fit.csv, 1e-12), (fit.tensorboard, 1e-6)):
        run = load_run(path)
        assert run.units == UNITS
        for unit in UNITS:
            # For channel units the unit-level RMS is rebuilt from the logged mean and std.
            assert run.granularity(unit) == fit.granularity
            for accessor in ("angular_update", "theory", "ratio", "weight_norm"):
                logged, expected = getattr(run, accessor)(unit), getattr(history, accessor)(unit)
                assert logged.steps == expected.steps, accessor
                assert list(logged.values) == pytest.approx(list(expected.values), rel=rel)
        fraction, expected = run.equilibrium_fraction(), history.equilibrium_fraction()
        assert fraction is not None and expected is not None
        assert list(fraction.values) == list(expected.values)
    for unit in UNITS:
        info = history.equilibrium(unit)
        first = next(h.global_step for h in fit.history if h.unit == unit and h.in_equilibrium)
        assert (info.step, info.exact, info.reached) == (first, True, True)
        assert info.at_end == fit.last(unit).in_equilibrium


def test_plot_run_accepts_the_callback_its_history_and_paths(layer_fit: Fit, tmp_path: Path):
    class Holder:
        history = layer_fit.history

    csv_file = layer_fit.csv / "version_0" / "metrics.csv"
    for source in (Holder(), layer_fit.history, str(layer_fit.csv), csv_file):
        figure = plot_run(source, units=["net.0.*"])
        assert figure.axes[0].get_title() == unit_title("net.0.weight")
        assert len(figure.axes) == 5
    with pytest.raises(RunDataError, match="empty"):
        plot_run([])
    with pytest.raises(TypeError):
        plot_run(42)
    path = tmp_path / "figure.png"
    plot_run(layer_fit.history, path=path, ncols=3)
    assert_valid_png(path, min_width=1200, min_height=300)
    assert math.isfinite(load_run(layer_fit.csv).summary()[0].measured)


def test_the_radial_balance_is_drawn_and_tabulated_where_it_is_not_the_prediction():
    """An AdamW unit whose update points less outward than white noise's (balance 1.1x theory)
    while its norm is still settling (measured 0.8x the balance): the figure draws the balance
    and the summary has its column; an SGD run's balance is the prediction and adds neither."""

    def history(balance_of):
        return [
            HistoryRecord(
                unit="net.0.weight",
                optimizer_step=step,
                global_step=step,
                angular_update=0.88 * 0.01,
                theory=0.01,
                ratio=0.88,
                weight_norm=3.0,
                lr=1e-3,
                in_equilibrium=False,
                balance=balance_of(0.01),
            )
            for step in (10, 20, 30)
        ]

    run = run_from_history(history(lambda theory: 1.1 * theory))
    ax = plot_run(run).axes[0]
    assert "radial balance" in [line.get_label() for line in _lines(ax)]
    summary = format_summary(run)
    assert summary.splitlines()[0].split()[:5] == ["unit", "measured", "theory", "ratio", "balance"]
    assert "1.1000e-02" in summary.splitlines()[1]
    markdown = format_summary(run, markdown=True)
    assert "| unit | measured | theory | ratio | balance | norm |" in markdown
    assert "|---|---:|---:|---:|---:|---:|---|---|" in markdown
    sgd = run_from_history(history(lambda theory: theory))
    assert "radial balance" not in [line.get_label() for line in _lines(plot_run(sgd).axes[0])]
    assert "balance" not in format_summary(sgd)
