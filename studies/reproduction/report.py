"""The report: tables and discussion, rendered into report_template.md."""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_sdm.config import MonitorConfig
from lightning_sdm.theory._predictions import (
    relaxation_steps,
)
from studies.reproduction.analysis import (
    _rms,
    analyse_channels,
    analyse_decay,
    analyse_grid,
    analyse_nonstationary,
    analyse_scaling,
    final_loss,
    measured_equilibrium,
    relaxation_model,
    unit_series,
)
from studies.reproduction.common import EVERY
from studies.reproduction.data import DataConfig, load_data
from studies.reproduction.figures import (
    _short,
    figure_channels,
    figure_decay,
    figure_grid,
    figure_nonstationary,
    figure_scaling,
)
from studies.reproduction.plan import Plan
from studies.reproduction.runs import RunSpec


def _f(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report_grid(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return ""
    units = rows[0]["units"]
    mom = "momentum" if rows[0]["optimizer"] == "sgd" else "beta1"
    header = [
        "lr",
        "wd",
        mom,
        "lr*wd",
        "tau",
        "steps",
        "predicted",
        *[f"{_short(u)} ratio" for u in units],
        "drift",
        "settled at",
        "in eq. after (default)",
        "first detection (default)",
        "exits",
        "loss",
    ]
    body = []
    for row in rows:
        layers = row["layers"]
        body.append(
            [
                _f(row["lr"]),
                _f(row["weight_decay"]),
                _f(row["momentum"]),
                f"{row['intrinsic_lr']:.2g}",
                f"{row['time_scale']:.0f}",
                row["steps"],
                f"{row['prediction']:.4f}",
                *[
                    f"**{layers[u]['ratio']:.3f}**"
                    if abs(layers[u]["ratio"] - 1) > 0.1
                    else f"{layers[u]['ratio']:.3f}"
                    for u in units
                ],
                f"{statistics.fmean(layers[u]['drift'] for u in units):+.3f}",
                ", ".join(str(row["detection"][u]["true_step"]) for u in units),
                _fraction(row, units),
                ", ".join(str(row["detection"][u]["first_detection"] or "-") for u in units),
                sum(row["detection"][u]["exits"] for u in units),
                f"{row['train_loss']:.2f}",
            ]
        )
    return _table(header, body)


def _fraction(row: dict[str, Any], units: Sequence[str]) -> str:
    values = [row["detection"][u]["in_equilibrium_after_truth"] for u in units]
    known = [v for v in values if v is not None]
    return f"{statistics.fmean(known):.0%}" if known else "-"


def detection_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Grid-wide quality of the default detector against the dense windows' settling steps."""
    flagged = total = late = early = 0
    errors: list[float] = []
    worst_delay = -math.inf
    exits = windows_in = 0
    for row in rows:
        tau = row["time_scale"]
        for d in row["detection"].values():
            n = d["windows_after_truth"]
            if d["in_equilibrium_after_truth"] is not None:
                flagged += round(d["in_equilibrium_after_truth"] * n)
                total += n
            # One relaxation time, or the 3 windows of 50 steps the default needs at least.
            if d["first_detection"] is None or (
                d["first_detection"] - d["true_step"] > max(tau, 150)
            ):
                late += 1
            if d["delay_in_tau"] is not None:
                worst_delay = max(worst_delay, d["delay_in_tau"])
            early += len(d["early_flags"])
            errors += d.get("flag_errors", [])
            exits += d["exits"]
            windows_in += d["windows_in"]
    return {
        "in_equilibrium_after": flagged / total if total else math.nan,
        "unit_windows": total,
        "late_detections": late,
        "units": sum(len(row["detection"]) for row in rows),
        "early_flags": early,
        "exits": exits,
        "windows_in": windows_in,
        "worst_delay_in_tau": worst_delay,
        "flags": len(errors),
        "flags_off_by_tolerance": sum(e > 0.1 for e in errors),
        "flag_error_p90": sorted(errors)[int(0.9 * (len(errors) - 1))] if errors else math.nan,
    }


def summary_stats(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    ratios = [layer["ratio"] for row in rows for layer in row["layers"].values()]
    if not ratios:
        return {}
    return {
        "count": len(ratios),
        "mean": statistics.fmean(ratios),
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "within_5pct": statistics.fmean(float(abs(r - 1) <= 0.05) for r in ratios),
        "within_10pct": statistics.fmean(float(abs(r - 1) <= 0.1) for r in ratios),
        "within_15pct": statistics.fmean(float(abs(r - 1) <= 0.15) for r in ratios),
    }


def write_report(
    out: Path,
    results: dict[str, dict[str, Any]],
    plan: Plan,
    args: argparse.Namespace,
    data: DataConfig,
    elapsed: float,
    diagnostics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    figures = out / "figures"
    analysis: dict[str, Any] = {"quick": plan.quick, "dataset": data.name}
    parts: list[str] = []
    version = "quick" if plan.quick else "full"
    cpu = sum(r["cpu_seconds"] for r in results.values())
    steps = sum(r["spec"]["steps"] for r in results.values())
    command = "python -m studies.reproduction" + (" --quick" if plan.quick else "")
    command += f" --out {args.out}" + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
    if data.cifar_dir:
        command += f" --cifar-dir {data.cifar_dir}"
    machine = platform.processor() or platform.machine()
    products = [s.lr * s.weight_decay for s in plan.sgd_grid + plan.adamw_grid]
    noisy_losses = [
        final_loss(r, r["spec"]["measure_steps"])
        for r in results.values()
        if r["spec"]["label_noise"] > 0
    ]
    parts.append(
        f"# Reproducing Spherical Motion Dynamics with lightning_sdm\n\n"
        f"Generated by `{command}` ({version} version) on {data.name}: {len(results)} Lightning "
        f"runs, {steps} optimizer steps, {elapsed / 60:.1f} min wall clock, {cpu / 60:.1f} "
        f"CPU-minutes in training ({args.jobs} process(es), {data.threads} torch thread(s) each; "
        f"{machine}, torch {torch.__version__}, lightning {pl.__version__}).\n\n"
        + TEXTS["setup"].format(
            grid_range=f"{min(products):.2g} to {max(products):.2g}" if products else "-",
            n_train=len(load_data(data)[1]),
            loss_range=_range(noisy_losses) if noisy_losses else "-",
        )
    )
    if plan.sgd_grid or plan.adamw_grid:
        sgd = analyse_grid(results, plan.sgd_grid)
        adamw = analyse_grid(results, plan.adamw_grid)
        analysis["sgd_grid"], analysis["adamw_grid"] = sgd, adamw
        analysis["sgd_summary"], analysis["adamw_summary"] = (
            summary_stats(sgd),
            summary_stats(adamw),
        )
        figure = figure_grid(sgd + adamw, figures / "equilibrium_grid.png")
        measure = (plan.sgd_grid or plan.adamw_grid)[0].measure_steps
        parts.append(
            "## 1. Equilibrium angular update: measured vs predicted\n\n"
            + TEXTS["grid"].format(
                measure=measure,
                windows=measure // EVERY,
                minimum=160 if plan.quick else 320,
                default=_default_schedule(),
            )
        )
        for label, rows, summary in (
            ("SGD", sgd, analysis["sgd_summary"]),
            ("AdamW", adamw, analysis["adamw_summary"]),
        ):
            if not rows:
                continue
            parts.append(
                f"### {label}\n\n"
                f"Prediction: `{RunSpec('x', rows[0]['optimizer'], 1, 1).formula()}`. "
                f"Ratio = measured RMS over the last {measure} "
                f"steps / prediction, per conv layer (bold: off by more than 10%).\n\n"
                + report_grid(rows)
                + f"\n\nAll {summary['count']} layer ratios: mean {summary['mean']:.3f}, median "
                f"{summary['median']:.3f}, range {summary['min']:.3f} to {summary['max']:.3f}; "
                f"{summary['within_5pct']:.0%} within 5%, "
                f"{summary['within_10pct']:.0%} within 10%, "
                f"{summary['within_15pct']:.0%} within 15%.\n"
            )
            quality = detection_summary(rows)
            analysis[f"{label.lower()}_detection"] = quality
            parts.append(
                f"Detector with the callback's default settings ({_default_schedule()}, "
                f"tolerance 10%, patience 3). Each of its {quality['flags']} equilibrium flags "
                "checked against the dense windows (every step measured) of the relaxation time "
                f"before it: {quality['flags_off_by_tolerance']} had a mean ratio more than 10% "
                f"from 1 (90% of the flags within {quality['flag_error_p90']:.1%}). Against the "
                f"step where the norm settles for good: {quality['in_equilibrium_after']:.1%} of "
                f"the {quality['unit_windows']} unit-windows after it in equilibrium; "
                f"{quality['late_detections']} of {quality['units']} units first detected later "
                "than one relaxation time (or 150 steps, three default windows) after it; "
                f"{quality['early_flags']} flags more than one relaxation time before it (a "
                "transient equilibrium while the loss still falls: the ratio check above is the "
                f"one that counts); {quality['exits']} exits in {quality['windows_in']} windows "
                "after the first detection.\n"
            )
        parts.append(f"![equilibrium grid](figures/{figure})\n")
        if plan.long:
            analysis["long"] = [
                analyse_long(results[spec.name], results.get(spec.name.removesuffix("_long")))
                for spec in plan.long
            ]
            parts.append(report_long(analysis["long"]))
        balance = (diagnostics or {}).get("adamw_balance")
        if balance:
            analysis["adamw_balance"] = balance
            parts.append(report_balance(balance))
    if plan.nonstationary:
        moving = results[plan.nonstationary[0].name]
        reference = results[plan.nonstationary[1].name]
        ns = analyse_nonstationary(moving, reference)
        analysis["nonstationary"] = ns
        figure = figure_nonstationary(reference, moving, figures / "nonstationary.png")
        rows = []
        for unit, layer in ns["layers"].items():
            ref = ns["reference_layers"][unit]
            rows.append(
                [
                    _short(unit),
                    f"{layer['ratio_rms']:.2f}",
                    f"{layer['ratio_min']:.2f} to {layer['ratio_max']:.2f}",
                    f"{layer['ratio_std']:.3f}",
                    f"{layer['outside_15pct']:.0%}",
                    f"{layer['norm_min']:.2f} to {layer['norm_max']:.2f}",
                    f"{ref['ratio_rms']:.2f}",
                    f"{ref['ratio_min']:.2f} to {ref['ratio_max']:.2f}",
                    f"{ref['ratio_std']:.3f}",
                    f"{ref['outside_15pct']:.0%}",
                    f"{ref['norm_min']:.2f} to {ref['norm_max']:.2f}",
                ]
            )
        sp = plan.nonstationary[0]
        parts.append(
            "### Non-stationary regime: clean labels, the training loss goes to zero\n\n"
            f"Two runs identical but for the labels: SGD lr {sp.lr:g}, wd {sp.weight_decay:g}, "
            f"momentum {sp.momentum:g} (prediction {sp.prediction():.4f} rad/step, tau "
            f"{sp.time_scale():.0f} steps), {sp.steps} steps, clean labels vs 20% label noise. "
            f"Statistics of the {EVERY}-step windows over the second half of each run. "
            f"Training loss there: clean {ns['loss_min']:.2g} to "
            f"{ns['loss_max']:.2g} (last 160 steps {ns['loss_final']:.2g}); label noise "
            f"{ns['reference_loss_min']:.2f} to {ns['reference_loss_max']:.2f}.\n\n"
            + _table(
                [
                    "layer",
                    "clean: RMS ratio",
                    "window ratio range",
                    "std",
                    "windows off >15%",
                    "weight norm",
                    "noisy: RMS ratio",
                    "range",
                    "std",
                    "off >15%",
                    "weight norm",
                ],
                rows,
            )
            + "\n\n"
            + TEXTS["nonstationary"]
            + f"\n![non-stationary](figures/{figure})\n"
        )
    if plan.decay:
        decays = [analyse_decay(results[spec.name]) for spec in plan.decay]
        analysis["decay"] = decays
        figure = figure_decay(decays, figures / "lr_decay.png")
        rows = []
        for d in decays:
            if d.get("decay_step") is None:
                rows.append([d["name"], "no decay happened", *["-"] * 11])
                continue
            for unit, layer in d["layers"].items():
                rows.append(
                    [
                        d["name"],
                        _short(unit),
                        d["decay_step"],
                        f"{layer['ratio_before']:.3f}",
                        f"{layer['drop']:.1f}",
                        f"{layer['first_ratio']:.3f} / {layer['early_ratio']:.3f}",
                        "-" if d["rescaled"] else f"{d['tau']:.0f} / {_f(layer['fit_tau'])}",
                        "-" if d["rescaled"] else f"{d['predicted_t90']:.0f} / {_f(layer['t90'])}",
                        "-" if d["rescaled"] else f"{d['predicted_t95']:.0f} / {_f(layer['t95'])}",
                        "-" if d["rescaled"] else f"{d.get('smd_steps', '-')} / {d['cooldown']}",
                        f"{layer['final_ratio']:.3f}",
                        f"{d['loss_before']:.2f} / {d['loss_after']:.2f}",
                    ]
                )
        parts.append(
            "## 2. Learning-rate decay by 10x\n\n"
            + TEXTS["decay"]
            + "\n\n"
            + _table(
                [
                    "run",
                    "layer",
                    "decay at step",
                    "ratio before",
                    "drop (x)",
                    "ratio: first window / first 3",
                    "tau: theory / fit",
                    "t90: model / measured",
                    "t95: model / measured",
                    "SMD Cor. 3.1 / callback cooldown",
                    "final ratio",
                    "loss before / after",
                ],
                rows,
            )
            + f"\n\n![lr decay](figures/{figure})\n"
        )
    if plan.scaling:
        scaling = [
            analyse_scaling([results[s.name] for s in runs]) for runs in plan.scaling.values()
        ]
        analysis["scaling"] = scaling
        figure = figure_scaling(scaling, figures / "linear_scaling.png")
        rows, hrows = [], []
        for run in scaling:
            for unit, layer in run["layers"].items():
                rows.append(
                    [
                        f"{run['momentum']:g}",
                        _short(unit),
                        *[
                            f"{a:.4f} ({r:.2f})"
                            for a, r in zip(layer["angles"], layer["ratios"], strict=True)
                        ],
                        f"{layer['exponent']:.3f}",
                    ]
                )
                for h, v in sorted(layer["horizon"].items()):
                    hrows.append(
                        [
                            f"{run['momentum']:g}",
                            _short(unit),
                            h,
                            f"{v['k_step_angle']:.4f}",
                            f"{v['one_step_angle_B']:.4f}",
                            f"{v['one_step_angle_kB']:.4f}",
                            f"{v['ratio']:.2f}",
                            f"{v['sqrt_k']:.2f}",
                            f"{v['random_walk_growth'] / v['sqrt_k']:.2f}",
                            f"{v['growth']:.2f}",
                        ]
                    )
        ks = scaling[0]["ks"]
        base = scaling[0]
        parts.append(
            "## 3. Linear scaling: batch k*B with lr k*eta\n\n"
            + TEXTS["scaling"].format(
                B=base["base_batch"],
                measure=next(iter(plan.scaling.values()))[0].measure_steps,
                burn=64 if plan.quick else 160,
            )
            + "\n\n"
            + _table(
                ["momentum", "layer", *[f"k={k}: angle (ratio)" for k in ks], "exponent (fit)"],
                rows,
            )
            + "\n\n"
            + TEXTS["horizon"]
            + "\n\n"
            + _table(
                [
                    "momentum",
                    "layer",
                    "k",
                    "angle(w_t, w_t+k) at B",
                    "1 step at B",
                    "1 step at kB",
                    "ratio",
                    "sqrt(k)",
                    "independent-gradient model",
                    "k-step / 1-step at B",
                ],
                hrows,
            )
            + f"\n\n![linear scaling](figures/{figure})\n"
        )
    if plan.channel:
        channels = [analyse_channels(results[spec.name]) for spec in plan.channel]
        analysis["channel"] = channels
        figure = figure_channels(channels, figures / "per_channel.png")
        rows = []
        for run in channels:
            for unit, layer in run["layers"].items():
                cb = layer["callback_window_ratio"]
                rows.append(
                    [
                        run["optimizer"],
                        _short(unit),
                        layer["channels"],
                        f"{layer['median']:.3f}",
                        f"{layer['p10']:.3f} to {layer['p90']:.3f}",
                        f"{layer['min']:.2f} to {layer['max']:.2f}",
                        f"{layer['std']:.3f}",
                        f"{layer['sampling_noise']:.3f}",
                        f"{layer['intrinsic_std']:.3f}",
                        f"{layer['within_10pct']:.0%}",
                        f"{layer['layer_ratio']:.3f}",
                        f"{cb['p10']:.2f} / {cb['median']:.2f} / {cb['p90']:.2f}",
                    ]
                )
        parts.append(
            "## 4. Per-channel angular updates (Rotational Equilibrium)\n\n"
            + TEXTS["channel"].format(steps=channels[0]["steps"])
            + "\n\n"
            + _table(
                [
                    "optimizer",
                    "layer",
                    "channels",
                    "median",
                    "p10 to p90",
                    "min to max",
                    "std",
                    "sampling noise",
                    "intrinsic std",
                    "within 10%",
                    "layer ratio",
                    f"callback ({EVERY}-step windows) p10 / median / p90",
                ],
                rows,
            )
            + f"\n\n![per channel](figures/{figure})\n"
        )
    parts.append(discussion(analysis))
    runtime_rows = [
        [
            name,
            r["spec"]["steps"],
            r["spec"]["batch_size"],
            r["spec"]["width"],
            f"{r['seconds']:.1f}",
            f"{r['cpu_seconds']:.1f}",
            f"{final_loss(r, r['spec']['measure_steps']):.3f}",
        ]
        for name, r in results.items()
    ]
    parts.append(
        "## Runs\n\nEvery run: wall-clock and CPU seconds of its `fit` (with --jobs > 1 runs "
        "overlap; the machine was shared, so wall clock exceeds CPU time), and its training loss "
        "over the measured steps (on the labels it trained on, noisy or clean).\n\n"
        + _table(["run", "steps", "batch", "width", "wall s", "CPU s", "loss"], runtime_rows)
        + "\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduction.md").write_text("\n".join(parts))
    if args.json:
        slim = {
            name: {k: v for k, v in r.items() if k not in ("history", "horizon", "channel_history")}
            for name, r in results.items()
        }
        Path(args.json).write_text(
            json.dumps({"analysis": analysis, "runs": slim}, indent=1, default=str)
        )
    return analysis


def analyse_long(result: dict[str, Any], grid: dict[str, Any] | None) -> dict[str, Any]:
    """A grid setting run much longer: the ratio in tenths of the run, and at the end."""
    spec = result["spec"]
    tau = RunSpec(**{**spec, "milestones": tuple(spec["milestones"])}).time_scale()
    out: dict[str, Any] = {"name": result["name"], "steps": spec["steps"], "tau": tau, "layers": {}}
    for unit in result["units"]:
        series = unit_series(result, unit)
        size = max(1, len(series) // 10)
        blocks = [
            (series[i + size - 1]["step"], _rms([e["ratio"] for e in series[i : i + size]]))
            for i in range(0, len(series) - size + 1, size)
        ]
        out["layers"][unit] = {
            "blocks": blocks,
            "final": measured_equilibrium(result)[unit]["ratio"],
            "grid": measured_equilibrium(grid)[unit]["ratio"] if grid else None,
        }
    if grid:
        out["grid_steps"] = grid["spec"]["steps"]
    return out


def report_long(longs: Sequence[dict[str, Any]]) -> str:
    parts = []
    for run in longs:
        units = list(run["layers"])
        steps = [step for step, _ in run["layers"][units[0]]["blocks"]]
        rows = [
            [
                _short(unit),
                *[f"{ratio:.3f}" for _, ratio in layer["blocks"]],
                _f(layer["grid"]),
                f"{layer['final']:.3f}",
            ]
            for unit, layer in run["layers"].items()
        ]
        parts.append(
            f"### A slow approach, not a wrong value: {run['name']}\n\n"
            f"The SGD setting with the lowest ratios, run for {run['steps']} steps "
            f"({run['steps'] / run['tau']:.0f} relaxation times) instead of "
            f"{run.get('grid_steps', '-')}: RMS ratio per tenth of the run (column: last step of "
            "the tenth), the grid's value, and the value over the last 480 steps of this run.\n\n"
            + _table(["layer", *[f"to {s}" for s in steps], "grid run", "last 480 steps"], rows)
            + "\n"
        )
    return "\n".join(parts)


def report_balance(balance: dict[str, Any]) -> str:
    rows = [
        [
            _short(unit),
            layer["fan_in"],
            f"{layer['measured_ratio']:.3f}",
            f"{layer['radial_share']:.4f}",
            f"{layer['outward']:+.4f}",
            f"{layer['balance_ratio']:.3f}",
        ]
        for unit, layer in balance["layers"].items()
    ]
    return (
        "### AdamW: where the update goes (diagnostic)\n\n"
        f"A plain PyTorch loop on the same network and data, AdamW lr {balance['lr']:g}, wd "
        f"{balance['weight_decay']:g}, beta1 0 (no momentum, so that the norm balance is exact "
        f"to first order), {balance['steps']} steps, the last {balance['measure']} measured per "
        "output channel. With `d = w_{t+1} - (1 - lr wd) w_t` (the Adam step), a stationary norm "
        "needs "
        "`(2 lr wd - (lr wd)^2)|w|^2 = |d|^2 + 2(1 - lr wd)<w, d>` and the angle is "
        "`|d_perp|/|w|`, so `ratio^2 = (1 - lr wd/2)(1 - radial)/(1 + outward)`: `radial` is the "
        "share of `|d|^2` along `w`, `outward` = `2(1 - lr wd)<w, d>/|d|^2`. Under SGD both are 0 "
        "(the gradient is orthogonal to `w`); Adam divides every element by its own `sqrt(v)`, "
        "which breaks the orthogonality.\n\n"
        + _table(["layer", "fan-in", "measured ratio", "radial", "outward", "balance ratio"], rows)
        + "\n"
    )


def _range(values: Sequence[float], digits: int = 2) -> str:
    low, high = min(values), max(values)
    if f"{low:.{digits}f}" == f"{high:.{digits}f}":
        return f"{low:.{digits}f}"
    return f"{low:.{digits}f} to {high:.{digits}f}"


def _pct_range(values: Sequence[float], digits: int = 0) -> str:
    low, high = f"{min(values):.{digits}%}", f"{max(values):.{digits}%}"
    return low if low == high else f"{low} to {high}"


def discussion(analysis: dict[str, Any]) -> str:
    """Every disagreement with theory found in this report, with the evidence for its cause."""
    items: list[str] = []
    sgd, adamw = analysis.get("sgd_grid", []), analysis.get("adamw_grid", [])
    if sgd:
        text = (
            f"**SGD equilibrium.** {len(sgd) * 3} layer ratios, "
            f"{_range([v['ratio'] for r in sgd for v in r['layers'].values()], 3)}"
        )
        by_momentum = {}
        for row in sgd:
            by_momentum.setdefault(row["momentum"], []).extend(
                v["ratio"] for v in row["layers"].values()
            )
        text += (
            "; "
            + "; ".join(
                f"momentum {m:g}: {_range(v, 3)} (mean {statistics.fmean(v):.3f})"
                for m, v in sorted(by_momentum.items())
            )
            + "."
        )
        low = [r for r in sgd if min(v["ratio"] for v in r["layers"].values()) < 0.97]
        long = analysis.get("long", [])
        if low:
            excess = max(
                (v["first_norm"] / v["weight_norm"]) ** 4 for r in low for v in r["layers"].values()
            )
            names = ", ".join(
                f"lr {r['lr']:g} / wd {r['weight_decay']:g} / momentum {r['momentum']:g}"
                for r in low
            )
            text += (
                f" The ratios below 0.97 ({names}) come from runs whose relaxation time is "
                f"{_range([r['time_scale'] for r in low], 0)} steps (momentum 0 relaxes 10x "
                "slower than momentum 0.9) and whose conv weights started far above the "
                f"equilibrium norm (|w|^4 up to {excess:.0f} times its final value)."
            )
        for run in long:
            finals = [x["final"] for x in run["layers"].values()]
            grids = [x["grid"] for x in run["layers"].values() if x["grid"] is not None]
            text += (
                f" Run for {run['steps'] / run['tau']:.0f} relaxation times instead of "
                f"{run.get('grid_steps', 0) / run['tau']:.0f}, the worst of them ends at "
                f"{_range(finals, 3)} (grid run: {_range(grids, 3)}; table above): the deficit "
                "is a slow approach, not a wrong equilibrium value. The approach from far above "
                "is slower than `exp(-t/tau)` of `|w|^4` would say (the ratio is still "
                f"{1 - statistics.fmean(grids):.0%} low after "
                f"{run.get('grid_steps', 0) / run['tau']:.0f} relaxation times), as in the "
                "LR-decay experiment below."
            )
        items.append(text)
    if adamw:
        units = adamw[0]["units"]
        per_layer = {u: [r["layers"][u]["ratio"] for r in adamw] for u in units}
        text = (
            "**AdamW equilibrium: the first conv layer sits below the prediction.** "
            + "; ".join(
                f"{_short(u)}: {_range(v, 3)} (median {statistics.median(v):.3f})"
                for u, v in per_layer.items()
            )
            + "."
        )
        balance = analysis.get("adamw_balance")
        if balance:
            layers = list(balance["layers"].values())
            first = layers[0]
            text += (
                " The deficit of the first layer is systematic: in the diagnostic run "
                f"({balance['steps'] * 2 * balance['lr'] * balance['weight_decay']:.0f} "
                f"relaxation times) it measures {first['measured_ratio']:.3f}, while the other "
                f"layers measure {_range([x['measured_ratio'] for x in layers[1:]], 3)}. The "
                "decomposition of the Adam step explains it: the first layer (fan-in "
                f"{first['fan_in']}) has an outward component `2<w, d>` worth "
                f"{first['outward']:+.1%} of `|d|^2` (the others "
                f"{_pct_range([x['outward'] for x in layers[1:]], 1)}), so the norm settles higher "
                f"and the angle lower: the balance gives {first['balance_ratio']:.3f}, the "
                f"measurement {first['measured_ratio']:.3f}. The package's prediction (Kosson et "
                "al.) assumes an update orthogonal to the weight, which Adam's per-element "
                "scaling only approximates. The package's synthetic check "
                "(`simulate_scale_invariant`: i.i.d. noise of equal variance in every element) "
                "cannot show this, since there every element has the same second moment and the "
                "update stays orthogonal: with the same AdamW setting and fan-in "
                f"{first['fan_in']} it measures {balance['synthetic_ratio']:.3f}. Layers with a "
                "larger fan-in average the radial part out."
            )
        lowest = [r["layers"][units[0]] for r in adamw if r["layers"][units[0]]["ratio"] < 0.93]
        if lowest:
            text += (
                f" The grid's values below 0.93 ({len(lowest)} settings) are those where the "
                "first layer started furthest above its equilibrium norm (|w|^4 "
                f"{_range([(x['first_norm'] / x['weight_norm']) ** 4 for x in lowest], 0)} times "
                "its final value): a slow approach on top of the systematic deficit."
            )
        reached = [r["layers"][units[0]]["first_equilibrium_step"] or r["steps"] for r in adamw]
        others = [
            r["layers"][u]["first_equilibrium_step"] or r["steps"] for r in adamw for u in units[1:]
        ]
        text += (
            " The first layer is also the slowest to get there: first equilibrium window at "
            f"{statistics.median(reached):.0f} steps (median) against "
            f"{statistics.median(others):.0f} for the other layers: its per-channel AdamW "
            "equilibrium `|w|^2 = lr C / (2 wd)` with C = 9 is "
            f"{_range([2 * r['weight_decay'] / (3 * r['lr'] * 9) for r in adamw], 1)} times "
            "smaller than the 1/3 of PyTorch's default init, so its norm has the longest way "
            "to go."
        )
        items.append(text)
    rows = sgd + adamw
    if rows:
        stds = [v["window_ratio_std"] for r in rows for v in r["layers"].values()]
        fractions = [
            statistics.fmean(v["in_equilibrium_fraction"] for v in r["layers"].values())
            for r in rows
        ]
        quality = detection_summary(rows)
        items.append(
            f"**The detector and short windows.** In equilibrium, the RMS over one {EVERY}-step "
            f"window scatters around its mean by {_range(stds, 3)} (standard deviation of the "
            "window ratio, largest for the first layer, whose per-step angle is the noisiest). "
            "A decision on one window (or a few in a row) against a 10% tolerance would flicker "
            "by construction; the detector pools the windows of one relaxation time, reads the "
            "norm's trend as the ratio deviation it implies (exact to first order, and the norm "
            "is measured without sampling noise), and leaves equilibrium only on clear evidence. "
            f"With its default settings, {quality['flags_off_by_tolerance']} of its "
            f"{quality['flags']} equilibrium flags came while the densely measured ratio of the "
            "preceding relaxation time was more than 10% from 1 "
            f"({detection_summary(adamw)['flags_off_by_tolerance']} of them in the AdamW grid, "
            "where some layers settle 5-10% below the prediction at a stationary norm: the norm "
            f"decides, by design); it counted {quality['in_equilibrium_after']:.1%} of the "
            f"{quality['unit_windows']} unit-windows after the norm's settling step as in "
            f"equilibrium (the dense 16-step callback: {_pct_range(fractions)} of the measured "
            f"windows per run), with {quality['exits']} exits in {quality['windows_in']} windows."
        )
    ns = analysis.get("nonstationary")
    if ns:
        clean = list(ns["layers"].values())
        noisy = list(ns["reference_layers"].values())
        items.append(
            "**Non-stationary regime (clean labels).** Over the second half of the run the window "
            f"ratio goes from {min(x['ratio_min'] for x in clean):.2f} to "
            f"{max(x['ratio_max'] for x in clean):.2f}, RMS "
            f"{_range([x['ratio_rms'] for x in clean])}, with "
            f"{_pct_range([x['outside_15pct'] for x in clean])} of the windows more than 15% off "
            f"(label-noise twin: RMS {_range([x['ratio_rms'] for x in noisy])}, "
            f"{_pct_range([x['outside_15pct'] for x in noisy])} off). The training loss falls to "
            f"{ns['loss_min']:.1e}; each time the gradient vanishes the angle collapses (ratio "
            f"down to {min(x['ratio_min'] for x in clean):.2f}) while weight decay shrinks the "
            "norm, until the growing effective learning rate kicks the loss up and the angle "
            f"overshoots (ratio up to {max(x['ratio_max'] for x in clean):.2f}): the periodic "
            "behaviour of Lobacheva et al. (2021). Theory's equilibrium assumes "
            "stationary gradient noise and does not describe this regime; it is reported, not "
            "counted as a failure."
        )
    decays = [d for d in analysis.get("decay", []) if d.get("decay_step") is not None]
    plain = [d for d in decays if not d["rescaled"]]
    for d in plain:
        layers = list(d["layers"].values())
        label = "SGD" if d["optimizer"] == "sgd" else "AdamW"
        text = (
            f"**LR decay, {label}.** Drop {_range([x['drop'] for x in layers], 1)}x (theory 10), "
            f"first-window ratio {_range([x['first_ratio'] for x in layers], 3)} (theory 0.316 at "
            f"t = 0; the relaxation model averaged over the first window gives "
            f"{relaxation_model(EVERY / 2, d['k'], d['tau']):.3f}). The ratio reaches 0.9 after "
            f"{_range([x['t90'] or math.nan for x in layers], 0)} steps (model "
            f"{d['predicted_t90']:.0f}) and 0.95 after "
            f"{_range([x['t95'] or math.nan for x in layers], 0)} (model {d['predicted_t95']:.0f})"
        )
        fits = [x["fit_tau"] for x in layers if x["fit_tau"]]
        if fits:
            text += (
                f"; the fitted time constant is {_range(fits, 0)} steps against "
                f"{d['tau']:.0f} from theory"
            )
        text += f"; final ratio {_range([x['final_ratio'] for x in layers], 3)}."
        if d["optimizer"] == "sgd":
            t95 = [x["t95"] for x in layers if x["t95"]]
            text += (
                f" SMD Cor. 3.1 gives {d['smd_steps']} steps (with the new LR; "
                f"{d['smd_steps_with_old_lr']} with the old one, 10x too short), the model's time "
                "to reach 0.958 of the new prediction; the measured t95 is "
                f"{_range([t / d['smd_steps'] for t in t95], 2)} of it. The measured relaxation is "
                "somewhat slower than theory's time constant (fit above), consistent with a target "
                f"that moves while the weights relax: the training loss falls after the decay "
                f"({d['loss_before']:.2f} before, {d['loss_after']:.2f} at the end), so the "
                "gradient noise, and with it the new equilibrium norm, is lower than before."
            )
        else:
            cooldown = [x["ratio_at_cooldown"] for x in layers]
            text += (
                " The early climb is faster than the `|w|^2` model with `tau = 1/(2 lr wd)` and "
                "the end slower (figure). Not investigated further; the model assumes an Adam "
                "step of fixed size, which holds only once the second moment (memory "
                "1/(1 - beta2) = 1000 steps) has caught up with the gradient scale, and the end "
                "carries the first layer's deficit above. The callback's cooldown after a decay "
                f"({d['cooldown']} steps, SMD Cor. 3.1 evaluated with momentum 0, as the callback "
                f"does for AdamW) ends while the ratio is still {_range(cooldown, 2)} "
                f"(model {relaxation_model(d['cooldown'], d['k'], d['tau']):.2f}): for AdamW it "
                "is "
                f"{_pct_range([d['cooldown'] / x['t95'] for x in layers if x['t95']])} of the "
                "measured time to 95%. The first window after the decay is also higher than the "
                "model (see above; not investigated)."
            )
        items.append(text)
    for d in decays:
        if not d["rescaled"]:
            continue
        layers = list(d["layers"].values())
        items.append(
            f"**LR decay with SMD's rescaling (callback).** The callback decided at step "
            f"{d['decay_step']}; the angle dropped by {_range([x['drop'] for x in layers], 1)}x "
            f"(sqrt(10) = 3.16 expected: the rescaling puts the weight on the new equilibrium at "
            f"once) and the first 3 windows after the decay are at "
            f"{_range([x['early_ratio'] for x in layers], 2)} of the new prediction, against "
            + ", ".join(
                f"{_range([x['early_ratio'] for x in p['layers'].values()], 2)}"
                for p in plain
                if p["optimizer"] == "sgd"
            )
            + " without rescaling. It then dips to "
            f"{_range([x['dip'] for x in layers], 2)} (3-window RMS, "
            f"{_range([x['dip_step'] for x in layers], 0)} steps after the decay; relaxation "
            f"time {d['tau']:.0f}) before settling at "
            f"{_range([x['final_ratio'] for x in layers], 2)}"
            + (
                ". The rescaling assumes that the gradient noise is the same after the decay, "
                f"but the training loss falls ({d['loss_before']:.2f} before, "
                f"{d['loss_after']:.2f} at the end): the new equilibrium norm is then below "
                "`k^(-1/4)` times the old one, and a small relaxation remains (consistent with the "
                "dip, not proven by it)."
                if d["loss_after"] < d["loss_before"]
                else "; the cause was not investigated."
            )
        )
    for run in analysis.get("scaling", []):
        layers = list(run["layers"].values())
        ratios = [h["ratio"] for x in layers for h in x["horizon"].values()]
        text = (
            f"**Linear scaling, momentum {run['momentum']:g}.** Exponent "
            f"{_range([x['exponent'] for x in layers], 3)} (theory 0.5); per-k ratios "
            f"{_range([r for x in layers for r in x['ratios']], 2)}. k-step / one-step-at-kB "
            f"ratios {_range(ratios, 2)}, all at or below sqrt(k)"
        )
        if run["momentum"] > 0:
            models = [
                h["ratio"] / (h["random_walk_growth"] / h["sqrt_k"])
                for x in layers
                for h in x["horizon"].values()
            ]
            text += (
                f" and within {max(abs(m - 1) for m in models):.0%} of the independent-gradient "
                "model: momentum makes consecutive steps of the same batch size point the same "
                "way for ~10 steps, so k = 2..8 small steps add almost coherently."
            )
        else:
            growth = [h["growth"] / h["sqrt_k"] for x in layers for h in x["horizon"].values()]
            text += (
                f", but also below the random-walk value 1 (down to {min(ratios):.2f}): the "
                f"k-step angle at batch B is {_range(growth, 2)} of `sqrt(k)` one-step angles, "
                "i.e. consecutive SGD steps without momentum are slightly anti-correlated "
                "(the steps partly undo each other, as when bouncing across a sharp direction "
                "at a large learning rate), and the k = 1 run itself sits "
                f"{1 - statistics.fmean(x['ratios'][0] for x in layers):.0%} below its "
                "prediction (relaxation time "
                f"{relaxation_steps(run['base_lr'], run['weight_decay'], run['momentum']):.0f} "
                "steps, still relaxing) while k = 8 is within "
                f"{1 - statistics.fmean(x['ratios'][-1] for x in layers):.0%}. The issue's "
                "bound (at or below sqrt(k)) holds; the random walk is not a lower bound."
            )
        items.append(text)
    for run in analysis.get("channel", []):
        layers = run["layers"]
        label = "SGD" if run["optimizer"] == "sgd" else "AdamW"
        items.append(
            f"**Per channel, {label}.** Medians "
            f"{_range([x['median'] for x in layers.values()], 3)}, spread between channels "
            f"(std) {_range([x['std'] for x in layers.values()], 3)} against a sampling noise of "
            f"{_range([x['sampling_noise'] for x in layers.values()], 3)} over {run['steps']} "
            "steps: unexplained spread "
            f"{_range([x['intrinsic_std'] for x in layers.values()], 3)}. "
            "Every channel rotates at its layer's rate (rotational equilibrium per neuron)"
            + (
                ", the AdamW first layer again a few percent low."
                if run["optimizer"] == "adamw"
                else "."
            )
        )
    if not items:
        return ""
    return (
        "## 5. Disagreements with theory, and their explanations\n\n"
        + "\n\n".join(f"- {item}" for item in items)
        + "\n"
    )


def _default_schedule() -> str:
    """The callback's default schedule in words (the study checks the detector users get)."""
    config = MonitorConfig()
    return f"windows of {config.window} steps every {config.every_n_steps}"


def _load_texts() -> dict[str, str]:
    """The fixed prose of the report, from ``report_template.md`` (sections by name)."""
    text = (Path(__file__).parent / "report_template.md").read_text()
    sections = re.split(r"^<!-- section: (\w+) -->\n", text, flags=re.M)
    pairs = zip(sections[1::2], sections[2::2], strict=True)
    return {name: body.strip() + "\n" for name, body in pairs}


TEXTS = _load_texts()
