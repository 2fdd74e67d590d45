"""The study's analysis, figure and Markdown report, from the recorded runs only."""

from __future__ import annotations

import collections
import math
import statistics
from pathlib import Path
from typing import Any

from lightning_sdm.equilibrium._detector import _DEFAULT_HORIZON_WINDOWS

FIGURE = "llm_qknorm.png"
TITLES = {
    "muon": "Muon on the hidden matrices, AdamW on the rest",
    "adamw": "AdamW everywhere (baseline)",
}


#: The regime shown for a unit without a prediction that the detector judged stationary.
STATIONARY = "no prediction, stationary"


def _regime(window: dict[str, Any]) -> str:
    """The window's regime, telling a stationary unit without a prediction apart."""
    if window["regime"] == "no_prediction" and window["in_equilibrium"]:
        return STATIONARY
    return window["regime"]


def _short(unit: str) -> str:
    """``model.layers.1.self_attn.q_proj.weight`` -> ``L1.q``."""
    parts = unit.split(".")
    layer = parts[parts.index("layers") + 1] if "layers" in parts else "?"
    return f"L{layer}.{parts[-2].split('_')[0]}"


def _median(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _steps(steps: list[int]) -> str:
    """``median (low-high)`` of optimizer steps, ``-`` for none."""
    if not steps:
        return "-"
    return f"{statistics.median(steps):.0f} ({steps[0]}-{steps[-1]})"


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}"


#: What the detector's note says made a window ``non_stationary`` (a phrase of the note, and how
#: the report names it), in the order the report lists them.
NON_STATIONARY_CAUSES = (
    (
        "is off while the norm is steady",
        "the ratio to the static prediction off by more than the tolerance while the norm was "
        "steady",
    ),
    (
        "on the side it does not lag to",
        "off the trajectory under the cosine on the side it does not lag to",
    ),
    ("has not come closer", "the ratio no closer to the prediction after two relaxation times"),
    ("swings by", "the ratio oscillating"),
)

#: Why the tracer rejected a parameter (a phrase of its reason in ``report.summary()``), and how
#: the report names it, in the order the report lists them.
REJECTIONS = (
    ("is added to a tensor", "the residual stream"),
    ("reaches silu", "a SiLU"),
    ("softmax", "the softmax"),
    ("reaches cross_entropy", "the cross-entropy"),
)
EMBEDDING = "embedding table"


def _cause(note: str | None) -> str:
    """How the report names what made a window ``non_stationary`` (its note, if unknown)."""
    for phrase, cause in NON_STATIONARY_CAUSES:
        if phrase in (note or ""):
            return cause
    return note or "no note"


def _non_stationary_spans(windows: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Per cause (:func:`_cause`): the first and the last step it made a window non_stationary."""
    spans: dict[str, tuple[int, int]] = {}
    for w in windows:
        if w["regime"] == "non_stationary":
            cause, step = _cause(w["regime_note"]), w["optimizer_step"]
            spans[cause] = (spans.get(cause, (step, step))[0], step)
    return spans


def unit_series(run: dict[str, Any], unit: str) -> list[dict[str, Any]]:
    """The unit's windows in order."""
    return [r for r in run["history"] if r["unit"] == unit]


def analyse_unit(run: dict[str, Any], unit: str) -> dict[str, Any]:
    """What one unit did: last window, ratios over the second half, detection, norms."""
    windows = unit_series(run, unit)
    steps = run["figures"]["batches"]
    late = [w for w in windows if w["optimizer_step"] > steps / 2] or windows
    flagged = [w for w in windows if w["in_equilibrium"]]
    first = next((w["optimizer_step"] for w in windows if w["in_equilibrium"]), None)
    after = [w for w in windows if first is not None and w["optimizer_step"] >= first]
    last = windows[-1]
    heads = last["channels"] or {}
    # The plateau: from three relaxation times (at the peak LR) after the warm-up until the
    # step from which the advice said the LR falls faster than the weights relax (or, without
    # one, the unit lags to the end): where the static prediction applies.
    args = run["args"]
    tau = 1 / (2 * args["hidden_lr"] * args["hidden_weight_decay"])
    lagging_from = _lagging_from(windows)
    onset = _lag_onset(run.get("advice"))
    end = next((x for x in (onset, lagging_from) if x is not None), steps + 1)
    plateau = [w for w in windows if args["warmup"] + 3 * tau <= w["optimizer_step"] < end]
    to_trajectory = [
        w["angular_update"] / w["trajectory"]
        for w in late
        if w.get("trajectory") is not None and w["trajectory"] > 0
    ]

    def head_ratio(window: dict[str, Any], key: str) -> float:
        return (window["channel_ratios"] or {}).get(key, math.nan)

    return {
        "unit": unit,
        "windows": len(windows),
        "angle_last": heads.get("median", last["angular_update"]),
        "angle_last_min": heads.get("min", math.nan),
        "angle_last_max": heads.get("max", math.nan),
        "theory_last": last["theory"],
        "ratio_late": _median([w["ratio"] for w in late]),
        "ratio_plateau": _median([w["ratio"] for w in plateau]),
        "ratio_trajectory_late": _median(to_trajectory),
        "plateau": (plateau[0]["optimizer_step"], plateau[-1]["optimizer_step"])
        if plateau
        else None,
        "head_ratio_min_late": _median([head_ratio(w, "min") for w in late]),
        "head_ratio_max_late": _median([head_ratio(w, "max") for w in late]),
        "ratio_flagged": _median([_to_reference(w) for w in flagged]),
        # How far the norm moved while flagged (first to last flagged window): a unit that
        # tracks a moving LR is in equilibrium with it, not at a fixed point.
        "norm_change_flagged": (
            flagged[-1]["weight_norm"] / flagged[0]["weight_norm"] - 1 if flagged else math.nan
        ),
        "flagged_span": (flagged[0]["optimizer_step"], flagged[-1]["optimizer_step"])
        if flagged
        else None,
        "norm_first": windows[0]["weight_norm"],
        "norm_last": last["weight_norm"],
        "first_equilibrium": first,
        "in_equilibrium_after_first": (
            sum(w["in_equilibrium"] for w in after) / len(after) if after else math.nan
        ),
        "lagging_from": lagging_from,
        "regime_last": last["regime"],
        "note_last": last["regime_note"],
        "regimes": sorted({w["regime"] for w in windows}),
        "non_stationary": _non_stationary_spans(windows),
    }


def analyse(raw: dict[str, Any]) -> dict[str, Any]:
    """Per arm: per-unit summaries, the prediction of the units' group, the cost."""
    result: dict[str, Any] = {}
    for arm, run in raw["runs"].items():
        units = [u["name"] for u in run["units"]]
        summaries = [analyse_unit(run, unit) for unit in units]
        steady = run["cost"]["steady"]
        ratios = [s["ratio_late"] for s in summaries]
        result[arm] = {
            "units": summaries,
            "predicted_units": sum(run["predictions"][u]["prediction"] is not None for u in units),
            "ratio_late_median": _median(ratios),
            "ratio_late_range": (
                min((r for r in ratios if math.isfinite(r)), default=math.nan),
                max((r for r in ratios if math.isfinite(r)), default=math.nan),
            ),
            "in_equilibrium_last": sum(
                run["history"][-len(units) :][i]["in_equilibrium"] for i in range(len(units))
            ),
            "ever_in_equilibrium": sum(s["first_equilibrium"] is not None for s in summaries),
            "cost_fraction": steady[0] if steady else math.nan,
            "cost_ms_per_measured_step": 1e3 * steady[1] if steady else math.nan,
            "cost_ms_per_step": 1e3 * steady[2] if steady else math.nan,
            "hook_share_whole_run": run["cost"]["hook_seconds"] / run["figures"]["seconds"],
            "ratio_flagged_median": _median([s["ratio_flagged"] for s in summaries]),
            "ratio_trajectory_late_range": (
                min(
                    (
                        s["ratio_trajectory_late"]
                        for s in summaries
                        if math.isfinite(s["ratio_trajectory_late"])
                    ),
                    default=math.nan,
                ),
                max(
                    (
                        s["ratio_trajectory_late"]
                        for s in summaries
                        if math.isfinite(s["ratio_trajectory_late"])
                    ),
                    default=math.nan,
                ),
            ),
            "ratio_plateau_range": (
                min(
                    (s["ratio_plateau"] for s in summaries if math.isfinite(s["ratio_plateau"])),
                    default=math.nan,
                ),
                max(
                    (s["ratio_plateau"] for s in summaries if math.isfinite(s["ratio_plateau"])),
                    default=math.nan,
                ),
            ),
            "ratio_flagged_range": (
                min(
                    (s["ratio_flagged"] for s in summaries if math.isfinite(s["ratio_flagged"])),
                    default=math.nan,
                ),
                max(
                    (s["ratio_flagged"] for s in summaries if math.isfinite(s["ratio_flagged"])),
                    default=math.nan,
                ),
            ),
            "non_stationary_units": [
                s["unit"] for s in summaries if "non_stationary" in s["regimes"]
            ],
            "norm_change_flagged": _median([s["norm_change_flagged"] for s in summaries]),
            "lr_change_flagged": _median(
                [_lr_change(run, s["unit"], s["flagged_span"]) for s in summaries]
            ),
            "flagged_windows": sum(w["in_equilibrium"] for w in run["history"]),
            "windows": len(run["history"]),
            "lagging_from": sorted(
                s["lagging_from"] for s in summaries if s["lagging_from"] is not None
            ),
            "advised_lag_onset": _lag_onset(run.get("advice")),
        }
    return result


def _to_reference(window: dict[str, Any]) -> float:
    """Measured / what the detector judged the window against: the trajectory under a moving
    LR (``tracking``), the static prediction otherwise; NaN without either."""
    reference = window["theory"]
    if window["regime"] == "tracking" and window.get("trajectory"):
        reference = window["trajectory"]
    return window["angular_update"] / reference if reference else math.nan


def _lr_change(run: dict[str, Any], unit: str, span: tuple[int, int] | None) -> float:
    """Relative change of the unit's LR between two optimizer steps (its windows')."""
    if span is None:
        return math.nan
    lrs = {w["optimizer_step"]: w["lr"] for w in unit_series(run, unit)}
    return lrs[span[1]] / lrs[span[0]] - 1


def _lagging_from(windows: list[dict[str, Any]]) -> int | None:
    """The first step of the run's final stretch of ``lagging`` verdicts (None: it ends otherwise).

    Its window's step minus the interval: the verdict comes at the window that closes it.
    """
    start = None
    for previous, window in zip([None, *windows], windows, strict=False):
        if window["regime"] == "lagging" and (previous is None or previous["regime"] != "lagging"):
            start = window["optimizer_step"]
        elif window["regime"] != "lagging":
            start = None
    return start


def _lag_onset(advice: dict[str, Any] | None) -> int | None:
    """The step from which the advice said the LR falls faster than the units' weights relax."""
    for group in (advice or {}).get("groups", []):
        for phase in group["phases"]:
            if phase.get("lag_onset") is not None:
                return int(phase["lag_onset"])
    return None


# ------------------------------------------------------------------ figure


def write_figure(raw: dict[str, Any], path: Path) -> None:
    """Per arm (a row): per-head angle vs prediction, ratio, weight norm with the LR, regimes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(raw["runs"])
    fig, axes = plt.subplots(len(arms), 4, figsize=(20, 4.4 * len(arms)), squeeze=False)
    regimes = [
        "unknown",
        "relaxing",
        "equilibrium",
        "tracking",
        "lagging",
        "non_stationary",
        "no_prediction",
        STATIONARY,
    ]
    colors = dict(zip(regimes, ["0.85", "C1", "C2", "C9", "C3", "C4", "C8", "C5"], strict=True))
    for row, arm in enumerate(arms):
        run = raw["runs"][arm]
        units = [u["name"] for u in run["units"]]
        angle_ax, ratio_ax, norm_ax, regime_ax = axes[row]
        for index, unit in enumerate(units):
            windows = unit_series(run, unit)
            steps = [w["optimizer_step"] for w in windows]
            layer = index // 2
            style = "-" if ".q_proj" in unit else "--"
            color = f"C{layer}"
            heads = [w["channels"] or {} for w in windows]
            median = [
                h.get("median", w["angular_update"]) for h, w in zip(heads, windows, strict=True)
            ]
            angle_ax.plot(steps, median, style, color=color, lw=1.2, label=_short(unit))
            angle_ax.fill_between(
                steps,
                [h.get("min", math.nan) for h in heads],
                [h.get("max", math.nan) for h in heads],
                color=color,
                alpha=0.08,
            )
            theory = [w["theory"] if w["theory"] is not None else math.nan for w in windows]
            if index == 0 and any(math.isfinite(t) for t in theory):
                angle_ax.plot(steps, theory, "k:", lw=2.2, label="predicted")
            trajectory = [
                w["trajectory"] if w.get("trajectory") is not None else math.nan for w in windows
            ]
            if any(math.isfinite(t) for t in trajectory):
                angle_ax.plot(
                    steps,
                    trajectory,
                    ":",
                    color=color,
                    lw=0.9,
                    alpha=0.8,
                    label="trajectory (dotted)" if index == 0 else None,
                )
            ratio = [w["ratio"] if w["ratio"] is not None else math.nan for w in windows]
            ratio_ax.plot(steps, ratio, style, color=color, lw=1.2)
            norm_ax.plot(steps, [w["weight_norm"] for w in windows], style, color=color, lw=1.2)
            for w in windows:
                regime_ax.barh(
                    index,
                    run["config"]["every_n_steps"],
                    left=w["optimizer_step"] - run["config"]["every_n_steps"],
                    color=colors.get(_regime(w), "k"),
                    height=0.8,
                )
        angle_ax.set_yscale("log")
        angle_ax.set_xlabel("optimizer step")
        angle_ax.set_ylabel("RMS angular update per step (rad)")
        angle_ax.set_title(f"{arm}: per head (line: median, band: min-max)", fontsize=10)
        angle_ax.legend(fontsize=7, ncol=3)
        if any(w["ratio"] is not None for w in run["history"]):
            ratio_ax.axhline(1, color="k", lw=1)
            ratio_ax.axhspan(0.9, 1.1, color="0.9")
            ratio_ax.set_ylim(0, 2)
        else:
            ratio_ax.text(
                0.5,
                0.5,
                f"no prediction for {run['predictions'][units[0]]['optimizer']}",
                ha="center",
                va="center",
                transform=ratio_ax.transAxes,
            )
        ratio_ax.set_xlabel("optimizer step")
        ratio_ax.set_ylabel("measured / predicted (grey: ±10%)")
        ratio_ax.set_title(f"{arm}: ratio per unit", fontsize=10)
        lr_ax = norm_ax.twinx()
        windows = unit_series(run, units[0])
        lr_ax.plot([w["optimizer_step"] for w in windows], [w["lr"] for w in windows], "k-", lw=0.8)
        lr_ax.set_ylabel("lr of the units' group (black)")
        norm_ax.set_xlabel("optimizer step")
        norm_ax.set_ylabel("weight norm |w|")
        norm_ax.set_title(f"{arm}: weight norms and LR", fontsize=10)
        regime_ax.set_yticks(range(len(units)), [_short(u) for u in units], fontsize=8)
        regime_ax.set_xlabel("optimizer step")
        regime_ax.set_title(f"{arm}: the detector's regime per window", fontsize=10)
        seen = {_regime(w) for w in run["history"]}
        for regime in regimes:
            if regime in seen:
                regime_ax.barh(-10, 0, color=colors[regime], label=regime.replace("_", " "))
        regime_ax.set_ylim(-0.6, len(units) - 0.4)
        regime_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


# ------------------------------------------------------------------ Markdown


def _prediction_line(prediction: dict[str, Any]) -> str:
    if prediction["prediction"] is None:
        return f"no prediction: {prediction['reason']}"
    return f"{prediction['reason']} ({prediction['source']})"


def write_report(out: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """``<out>/llm.md`` and ``<out>/figures/llm_qknorm.png``; returns the analysis."""
    analysis = analyse(raw)
    write_figure(raw, out / "figures" / FIGURE)
    runs = raw["runs"]
    first = next(iter(runs.values()))
    args, figures, env = first["args"], first["figures"], raw["environment"]
    quick = " --quick" if raw.get("quick") else ""
    timings = ", ".join(
        f"{arm}: {r['figures']['seconds']:.0f} s ({r['cpu_seconds']:.0f} CPU-s)"
        for arm, r in runs.items()
    )
    lines = [
        "# A QK-norm decoder LLM trained with Muon + AdamW: what the callback sees",
        "",
        f"Generated by `python -m studies.llm{quick} --out docs` (Python {env['python']}, torch "
        f"{env['torch']}, {env['threads']} torch thread(s), {env['machine']}); "
        f"{timings} wall clock on a shared 2-core machine. Nothing is downloaded: the text "
        "is the Python standard library's own source.",
        "",
        "## Set-up",
        "",
        f"`examples/llm_qknorm.py`: a Qwen3-style byte-level decoder, {figures['parameters']:,} "
        f"parameters ({args['layers']} layers, hidden {args['hidden']}, {args['heads']} heads of "
        f"{args['hidden'] // args['heads']}, SwiGLU, RoPE, causal `scaled_dot_product_attention`), "
        "RMSNorm written by hand as in HF transformers, per-head QK-norm (an RMSNorm over "
        "`head_dim` on each head's queries and keys), pre-norm residual blocks, untied head. "
        f"Data: {figures['corpus_bytes']:,} bytes of {figures['corpus_files']} top-level `*.py` "
        "files of `sysconfig.get_paths()['stdlib']` in sorted order, 90% for training; "
        f"{args['steps']} batches of {args['batch_size']} x {args['seq_len']} bytes per arm. "
        "Two optimizers stepped by hand (Lightning's automatic optimization takes one; "
        "`automatic_optimization = False`, both stepped every batch, so Lightning's global step "
        f"is twice the batches: {figures['global_step']}), each with a `LambdaLR` warm-up "
        f"({args['warmup']} steps) + cosine to 10% of the peak, stepped per batch. "
        f"AdamW (lr {args['adamw_lr']:g}, betas (0.9, 0.95), weight decay "
        f"{args['adamw_weight_decay']:g} on the embedding and head, none on the gains) on the "
        "parameters that are not hidden matrices. The callback: "
        f'`SphericalDynamicsCallback(granularity="channel", every_n_steps='
        f"{first['config']['every_n_steps']}, window={first['config']['window']})`, everything "
        "else at its defaults; all windows and verdicts below are the callback's own.",
        "",
        "| arm | hidden matrices | lr x wd at the peak | relaxation time 1/(2 lr wd) at the peak |",
        "|---|---|---|---|",
    ]
    for arm, run in runs.items():
        a = run["args"]
        product = a["hidden_lr"] * a["hidden_weight_decay"]
        name = "Muon (Nesterov, momentum 0.95)" if a["hidden_optimizer"] == "muon" else "AdamW"
        lines.append(
            f"| {arm} | {name}, lr {a['hidden_lr']:g}, weight decay "
            f"{a['hidden_weight_decay']:g} | {product:g} | {1 / (2 * product):.0f} steps |"
        )
    lines += [
        "",
        "Long LLM runs use products of about 1e-5 to 1e-4 (GPT-2-style AdamW: lr 6e-4, weight "
        "decay 0.1); these are larger so that a few hundred steps settle.",
        "",
        "## What the callback found",
        "",
        "```",
        first["detection"].splitlines()[0],
        *[line for line in first["detection"].splitlines()[1:] if "<-" in line],
        "```",
        "",
    ]
    unit_rows = first["units"]
    groups = sorted({u["channel_group"] for u in unit_rows})
    lines.append(
        f"{len(unit_rows)} units, the q and k projections of every layer, each measured in blocks "
        f"of {', '.join(map(str, groups))} rows (`Unit.channel_group`, one block per head: the "
        "QK-norm normalises each head on its own, so each head's rows are invariant on their "
        f"own). {_rejections(first['detection'])}"
    )
    lines += [
        "",
        "## Predictions",
        "",
        "As the callback held them at the end of the run (at the final LR):",
        "",
    ]
    for arm, run in runs.items():
        prediction = run["predictions"][unit_rows[0]["name"]]
        lines.append(f"- **{arm}** ({prediction['optimizer']}): {_prediction_line(prediction)}")
    lines += [
        "",
        "The prediction is the unit's (its param group's; for Muon refined by the matrix's "
        "shape, see [muon.md](muon.md)), evaluated per window at the window's learning rates "
        "(RMS), so it follows the cosine; every head of a unit takes its matrix's value.",
        "",
        "## Results per unit",
        "",
        "Angle: RMS angular update per step of the last window, median over the heads "
        "(min-max in brackets). Ratios: measured / predicted (the static equilibrium), the "
        "median over the windows of the plateau (from three relaxation times after the "
        "warm-up until the step from which the advice said the LR falls faster than the "
        "weights relax), over the windows the detector flagged, and over the second half of "
        "the run (heads: the median over those windows of the lowest and the highest head's "
        "ratio). Flagged windows are compared with what the detector judged them against (the "
        "reference): the trajectory in `tracking` windows, the static prediction in "
        "`equilibrium` ones. Trajectory: the angle the monitor predicted for each window "
        "before measuring it, by integrating the norm balance along the real LR schedule "
        "(`HistoryRecord.trajectory`); measured / trajectory over the second half. First "
        "equilibrium: the optimizer step at which the detector first "
        "flagged the unit; then the share of the later windows it kept the flag.",
        "",
    ]
    for arm, result in analysis.items():
        lines += [
            f"**{arm}**: {TITLES.get(arm, arm)}",
            "",
            "| unit | angle, last window | predicted | ratio, plateau (steps) | ratio, flagged "
            "windows (reference) | ratio, 2nd half (heads) | measured / trajectory, 2nd half "
            "| \\|w\\| first -> last | first equilibrium (kept) | regime at the end |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in result["units"]:
            heads = (
                f" ({_fmt(s['head_ratio_min_late'], 3)}-{_fmt(s['head_ratio_max_late'], 3)})"
                if math.isfinite(s["head_ratio_min_late"])
                else ""
            )
            plateau = f" ({s['plateau'][0]}-{s['plateau'][1]})" if s["plateau"] else ""
            kept = (
                f"{s['first_equilibrium']} ({100 * s['in_equilibrium_after_first']:.0f}%)"
                if s["first_equilibrium"] is not None
                else "never"
            )
            lines.append(
                f"| `{s['unit'].removeprefix('model.')}` | {s['angle_last']:.4f} "
                f"({s['angle_last_min']:.4f}-{s['angle_last_max']:.4f}) | "
                f"{_fmt(s['theory_last'])} | {_fmt(s['ratio_plateau'], 3)}{plateau} | "
                f"{_fmt(s['ratio_flagged'], 3)} | {_fmt(s['ratio_late'], 3)}{heads} | "
                f"{_fmt(s['ratio_trajectory_late'], 3)} | "
                f"{s['norm_first']:.2f} -> {s['norm_last']:.2f} "
                f"| {kept} | {s['regime_last'].replace('_', ' ')} |"
            )
        lines.append("")
    lines += ["## Detection and cost", ""]
    lines += [
        "Flagged: windows after which the detector held the unit in equilibrium (regimes "
        "`equilibrium` and `tracking`, or, without a prediction, stationary). The advice is what "
        "the callback printed before the first step: the step from which the schedule takes the "
        "LR down faster than the weights relax.",
        "",
        "| arm | units with a prediction | windows flagged | measured / reference in flagged "
        "windows (median over units) | units ever flagged / at the end | `lagging` to the end "
        "from step: median over units, range (advice) | monitor cost (same run) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, result in analysis.items():
        n = len(result["units"])
        cost = (
            f"{100 * result['cost_fraction']:.2f}% of the step time "
            f"({result['cost_ms_per_measured_step']:.1f} ms per measured step, "
            f"{result['cost_ms_per_step']:.0f} ms per step)"
            if math.isfinite(result["cost_fraction"])
            else "not measured (too few windows)"
        )
        advised = result["advised_lag_onset"]
        lines.append(
            f"| {arm} | {result['predicted_units']} of {n} | {result['flagged_windows']} of "
            f"{result['windows']} | {_fmt(result['ratio_flagged_median'], 3)} | "
            f"{result['ever_in_equilibrium']} / {result['in_equilibrium_last']} of {n} | "
            f"{_steps(result['lagging_from'])} "
            f"({advised if advised is not None else '-'}) | {cost} |"
        )
    lines += [
        "",
        "The cost is the monitor's own meter (`monitor.cost`, host time in its hooks against the "
        "time between two optimizer steps, over the second logging interval), in the same run: "
        "no second run without the callback is needed, and none would be comparable on a "
        "machine shared with other jobs.",
        "",
        f"![per-head angles, ratios, norms and regimes](figures/{FIGURE})",
        "",
    ]
    notes = _notes(raw, analysis)
    if notes:
        lines += ["## Reading it", "", *notes, ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm.md").write_text("\n".join(lines))
    return analysis


def _notes(raw: dict[str, Any], analysis: dict[str, Any]) -> list[str]:
    """Statements that follow from the numbers above (each computed, none typed in)."""
    notes = []
    for arm, result in analysis.items():
        run = raw["runs"][arm]
        n = len(result["units"])
        prediction = run["predictions"][result["units"][0]["unit"]]
        flagged = f"{result['ever_in_equilibrium']} of {n}"
        if result["predicted_units"] == 0:
            notes.append(
                f"- **{arm}**: {prediction['optimizer']} has no prediction in this version of "
                "the package: the callback logs the measured angles without a ratio, and the "
                "detector judges by stationarity alone (regime `no_prediction`; stationary when "
                f"the norm and the angle stop moving). {flagged} units were stationary at some "
                f"point ({result['flagged_windows']} of {result['windows']} windows), "
                f"{result['in_equilibrium_last']} at the end. While flagged, the norm moved by "
                f"{100 * result['norm_change_flagged']:+.0f}% and the LR by "
                f"{100 * result['lr_change_flagged']:+.0f}% (median over the units, first to "
                "last flagged window): without a prediction there is no relaxation time, so "
                f"the detector pools a fixed {_DEFAULT_HORIZON_WINDOWS} windows "
                f"({_DEFAULT_HORIZON_WINDOWS * run['config']['every_n_steps']} steps here), "
                "over which a norm that follows a slowly falling LR changes by less than the "
                "tolerance: it passes as stationary."
            )
            continue
        low, high = result["ratio_late_range"]
        plow, phigh = result["ratio_plateau_range"]
        flow, fhigh = result["ratio_flagged_range"]
        text = (
            f"- **{arm}**: {flagged} units were flagged at some point; in the flagged windows "
            f"the measured per-head angle was {_fmt(result['ratio_flagged_median'], 3)} times "
            "the detector's reference (median over the units; "
            f"{_fmt(flow, 3)}-{_fmt(fhigh, 3)}). Over the plateau the units' median ratios to "
            f"the static prediction span {_fmt(plow, 3)}-{_fmt(phigh, 3)}."
        )
        odd = result["non_stationary_units"]
        if odd:
            text += (
                f" {len(odd)} units ({', '.join(_short(u) for u in odd)}) were `non_stationary` "
                f"for a while and not flagged then; the detector's note: {_causes(result)}."
            )
        tlow, thigh = result["ratio_trajectory_late_range"]
        if math.isfinite(tlow):
            text += (
                " In the second half, where the cosine takes the LR down faster than the weights "
                "relax, the angle falls below the static prediction (ratio "
                f"{_fmt(result['ratio_late_median'], 3)}, {_fmt(low, 3)}-{_fmt(high, 3)} over "
                "the units: the annealing a decaying schedule relies on), and measured / "
                f"trajectory is {_fmt(tlow, 3)}-{_fmt(thigh, 3)} over the units."
            )
        advised = result["advised_lag_onset"]
        said = f"; the advice put the onset of the lag at step {advised}" if advised else ""
        if result["lagging_from"]:
            text += (
                f" The detector reads `lagging` to the end from step "
                f"{_steps(result['lagging_from'])} (median over the units and range{said})."
            )
        else:
            ends = collections.Counter(s["regime_last"] for s in result["units"])
            text += (
                " At the end the detector reads "
                + ", ".join(f"{k.replace('_', ' ')} ({v} units)" for k, v in ends.items())
                + f"{said}."
            )
        notes.append(text)
    return notes


def _causes(result: dict[str, Any]) -> str:
    """What made the arm's units ``non_stationary``: per cause, the units (if not all of them)
    and the steps."""
    spans: dict[str, list[tuple[str, tuple[int, int]]]] = collections.defaultdict(list)
    for s in result["units"]:
        for cause, span in s["non_stationary"].items():
            spans[cause].append((s["unit"], span))
    order = [cause for _, cause in NON_STATIONARY_CAUSES]
    parts = []
    for cause in sorted(spans, key=lambda c: order.index(c) if c in order else len(order)):
        first = min(span[0] for _, span in spans[cause])
        last = max(span[1] for _, span in spans[cause])
        where = f"step {first}" if first == last else f"steps {first}-{last}"
        if len(spans) > 1:
            where = f"{', '.join(_short(u) for u, _ in spans[cause])}, {where}"
        parts.append(f"{cause} ({where})")
    return "; ".join(parts)


def _rejections(detection: str) -> str:
    """The rejected parameters of ``report.summary()``, counted by what their reason says."""
    lines = detection.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Rejected")), len(lines))
    reasons = [line.split(": ", 1)[1] for line in lines[start + 1 :] if ": " in line]
    if not reasons:
        return ""
    counts = collections.Counter(
        next((label for phrase, label in REJECTIONS if phrase in reason), None)
        or (EMBEDDING if EMBEDDING in reason else "other")
        for reason in reasons
    )
    reached = [f"{label} ({counts[label]})" for _, label in REJECTIONS if counts[label]]
    parts = []
    if reached:
        listed = ", ".join(reached[:-1]) + " or " + reached[-1] if len(reached) > 1 else reached[0]
        parts.append(f"before any normalization they reach {listed}")
    if counts[EMBEDDING]:
        parts.append(f"the {EMBEDDING} ({counts[EMBEDDING]}) is a lookup")
    if counts["other"]:
        parts.append(f"{counts['other']} for other reasons")
    return (
        f"The other {len(reasons)} parameters are rejected, each with its reason in "
        f"`callback.report.summary()`: {'; '.join(parts)}."
    )
