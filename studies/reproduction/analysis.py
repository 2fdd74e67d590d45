"""From recorded runs to the numbers the report states."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from typing import Any

from studies.reproduction.common import EVERY, lr_decay_relaxation_steps
from studies.reproduction.runs import RunSpec


def unit_series(result: dict[str, Any], unit: str) -> list[dict[str, Any]]:
    return [entry for entry in result["history"] if entry["unit"] == unit]


def measured_equilibrium(
    result: dict[str, Any], last: int | None = None
) -> dict[str, dict[str, float]]:
    """Per unit, over the windows of the last ``last`` steps: RMS angle, prediction, ratio."""
    steps = result["spec"]["steps"]
    last = result["spec"]["measure_steps"] if last is None else last
    out = {}
    for unit in result["units"]:
        windows = [e for e in unit_series(result, unit) if e["step"] > steps - last]
        rms = math.sqrt(statistics.fmean(e["angular_update"] ** 2 for e in windows))
        theory = math.sqrt(statistics.fmean(e["theory"] ** 2 for e in windows))
        ratios = [e["ratio"] for e in windows]
        reached = next((e["step"] for e in unit_series(result, unit) if e["in_equilibrium"]), None)
        half = len(ratios) // 2
        out[unit] = {
            "measured": rms,
            "theory": theory,
            "ratio": rms / theory,
            # Still relaxing? RMS ratio of the second half of the windows minus the first half.
            "drift": _rms(ratios[half:]) - _rms(ratios[:half]) if half else 0.0,
            "window_ratio_min": min(ratios),
            "window_ratio_max": max(ratios),
            "window_ratio_std": statistics.pstdev(ratios),
            "in_equilibrium_fraction": statistics.fmean(
                float(e["in_equilibrium"]) for e in windows
            ),
            "first_equilibrium_step": reached,
            "weight_norm": windows[-1]["weight_norm"],
            "first_norm": unit_series(result, unit)[0]["weight_norm"],
        }
    return out


def true_equilibrium_step(
    series: Sequence[dict[str, Any]], tau: float, measure: int, ratio_exponent: float
) -> int:
    """When the weight norm settles, independently of any detector.

    The norm is what relaxes (SMD Thm 2); the angular update follows it, ``omega`` being
    proportional to ``|w|**-ratio_exponent`` at a fixed gradient scale (2 for SGD, 1 for
    decoupled decay). A unit counts as settled from the first dense window after which the norm,
    averaged over one relaxation time of trailing windows, stays within a band of its final value:
    the norm deviation that moves the angular update by the detector's default tolerance
    (``0.1 / ratio_exponent``), widened to three times the windows' own scatter over the
    measured steps when the noise is larger than that. The final equilibrium can come after a
    transient one (the gradient scale, hence the equilibrium norm, moves while the loss falls):
    a flag before this step is not wrong by itself; :func:`flag_errors` checks each flag.
    """
    k = max(3, math.ceil(tau / EVERY))
    steps = [e["step"] for e in series]
    final = [e["weight_norm"] for e in series if e["step"] > steps[-1] - measure]
    norm = statistics.fmean(final)
    scatter = statistics.pstdev(final) / norm / math.sqrt(k) if len(final) > 1 else 0.0
    band = max(0.1 / ratio_exponent, 3.0 * scatter)
    settled = steps[-1]
    for i in range(len(series) - 1, k - 2, -1):
        mean_norm = statistics.fmean(e["weight_norm"] for e in series[i - k + 1 : i + 1])
        if abs(mean_norm / norm - 1) > band:
            break
        settled = steps[i]
    return settled


def flag_errors(dense: Sequence[dict[str, Any]], flags: Sequence[int], span: float) -> list[float]:
    """For each step the detector flagged in equilibrium: how far the angular update really
    was from its prediction, ``|mean dense ratio - 1|`` over the trailing ``span`` steps (the
    dense windows measure every step, 16 at a time; the detector saw the default schedule)."""
    errors = []
    for step in flags:
        block = [e["ratio"] for e in dense if step - span < e["step"] <= step]
        if block:
            errors.append(abs(statistics.fmean(block) - 1.0))
    return errors


def detection_quality(result: dict[str, Any], tau: float) -> dict[str, dict[str, Any]]:
    """Per unit: the default-settings detector against the dense windows' settling step."""
    measure = result["spec"]["measure_steps"]
    ratio_exponent = 2.0 if result["spec"]["optimizer"] == "sgd" else 1.0
    out = {}
    for unit in result["units"]:
        dense = unit_series(result, unit)
        truth = true_equilibrium_step(dense, tau, measure, ratio_exponent)
        windows = [e for e in result.get("default_history", []) if e["unit"] == unit]
        after = [e for e in windows if e["step"] > truth]
        first = next((e["step"] for e in windows if e["in_equilibrium"]), None)
        entered = [e for e in windows if first is not None and e["step"] >= first]
        exits = sum(
            1
            for a, b in itertools.pairwise(entered)
            if a["in_equilibrium"] and not b["in_equilibrium"]
        )
        early = [e["step"] for e in windows if e["in_equilibrium"] and e["step"] < truth - tau]
        flagged = [e["step"] for e in windows if e["in_equilibrium"]]
        errors = flag_errors(dense, flagged, max(tau, 3 * 50))
        out[unit] = {
            "true_step": truth,
            "in_equilibrium_after_truth": (
                statistics.fmean(float(e["in_equilibrium"]) for e in after) if after else None
            ),
            "windows_after_truth": len(after),
            "first_detection": first,
            "delay_in_tau": None if first is None else (first - truth) / tau,
            "exits": exits,
            "windows_in": len(entered),
            "early_flags": early,
            "flag_errors": errors,
            "regimes_after_truth": sorted({e["regime"] for e in after}),
        }
    return out


def _rms(values: Sequence[float]) -> float:
    return math.sqrt(statistics.fmean(v * v for v in values))


def final_loss(result: dict[str, Any], last: int) -> float:
    blocks = max(1, last // EVERY)
    return statistics.fmean(result["losses"][-blocks:])


def analyse_grid(
    results: dict[str, dict[str, Any]], specs: Sequence[RunSpec]
) -> list[dict[str, Any]]:
    rows = []
    for spec in specs:
        result = results[spec.name]
        layers = measured_equilibrium(result)
        ratios = [v["ratio"] for v in layers.values()]
        rows.append(
            {
                "name": spec.name,
                "optimizer": spec.optimizer,
                "lr": spec.lr,
                "weight_decay": spec.weight_decay,
                "momentum": spec.momentum,
                "intrinsic_lr": spec.lr * spec.weight_decay,
                "time_scale": spec.time_scale(),
                "steps": spec.steps,
                "prediction": spec.prediction(),
                "layers": layers,
                "mean_ratio": statistics.fmean(ratios),
                "max_abs_deviation": max(abs(r - 1) for r in ratios),
                "train_loss": final_loss(result, spec.measure_steps),
                "detection": detection_quality(result, spec.time_scale()),
                "units": result["units"],
                "seconds": result["seconds"],
            }
        )
    return rows


def _window_stats(result: dict[str, Any], after: int) -> dict[str, dict[str, float]]:
    out = {}
    for unit in result["units"]:
        windows = [e for e in unit_series(result, unit) if e["step"] > after]
        ratios = [e["ratio"] for e in windows]
        norms = [e["weight_norm"] for e in windows]
        out[unit] = {
            "ratio_rms": math.sqrt(statistics.fmean(r * r for r in ratios)),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratio_std": statistics.pstdev(ratios),
            "outside_15pct": statistics.fmean(float(abs(r - 1) > 0.15) for r in ratios),
            "norm_min": min(norms),
            "norm_max": max(norms),
        }
    return out


def analyse_nonstationary(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    half = result["spec"]["steps"] // 2
    losses = result["losses"][half // EVERY :]
    reference_losses = reference["losses"][half // EVERY :]
    return {
        "name": result["name"],
        "reference": reference["name"],
        "layers": _window_stats(result, half),
        "reference_layers": _window_stats(reference, half),
        "loss_min": min(losses),
        "loss_max": max(losses),
        "loss_final": final_loss(result, 160),
        "reference_loss_min": min(reference_losses),
        "reference_loss_max": max(reference_losses),
    }


def _smoothed(values: Sequence[float], width: int = 3) -> list[float]:
    """RMS over a centred window of ``width`` values (ends: what is available)."""
    half = width // 2
    return [
        math.sqrt(statistics.fmean(v * v for v in values[max(0, i - half) : i + half + 1]))
        for i in range(len(values))
    ]


def _linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def relaxation_model(t: float, k: float, tau: float) -> float:
    """Angle / new prediction, ``t`` steps after an LR decay by ``k`` (derived, see the report).

    With a gradient scale that does not change, the angle is proportional to ``1/|w|^2`` (SGD) or
    ``1/|w|`` (AdamW), and ``|w|^4`` (SGD) / ``|w|^2`` (AdamW) relaxes exponentially with time
    constant ``tau`` from ``k`` times its new equilibrium value:
    ratio ``1/sqrt(1 + (k-1) e^(-t/tau))``.
    """
    return 1.0 / math.sqrt(1.0 + (k - 1.0) * math.exp(-t / tau))


def time_to_ratio(r: float, k: float, tau: float) -> float:
    """Inverse of :func:`relaxation_model`: steps until the ratio reaches ``r``."""
    return tau * math.log((k - 1.0) / (1.0 / (r * r) - 1.0))


def analyse_decay(result: dict[str, Any]) -> dict[str, Any]:
    spec = RunSpec(**{**result["spec"], "milestones": tuple(result["spec"]["milestones"])})
    if spec.milestones:
        decay_step = spec.milestones[0]
    elif result["events"] and result["events"][0]["new_lrs"]:
        decay_step = result["events"][0]["global_step"]
    else:
        return {"name": result["name"], "decay_step": None}
    k = 1.0 / spec.gamma
    lr_new = spec.lr * spec.gamma
    tau = spec.time_scale(lr_new)
    out: dict[str, Any] = {
        "name": result["name"],
        "optimizer": spec.optimizer,
        "decay_step": decay_step,
        "k": k,
        "lr_before": spec.lr,
        "lr_after": lr_new,
        "weight_decay": spec.weight_decay,
        "momentum": spec.momentum,
        "tau": tau,
        "prediction_before": spec.prediction(),
        "prediction_after": spec.prediction(lr_new),
        "predicted_t90": time_to_ratio(0.9, k, tau),
        "predicted_t95": time_to_ratio(0.95, k, tau),
        "steps_after": spec.steps - decay_step,
        "rescaled": spec.auto_decay,
        "layers": {},
    }
    # The callback's cooldown after a decay (and its detector's relaxation) use SMD Cor. 3.1 with
    # the group's momentum, 0 for optimizers without one (AdamW).
    momentum = spec.momentum if spec.optimizer == "sgd" else 0.0
    out["cooldown"] = lr_decay_relaxation_steps(k, lr_new, spec.weight_decay, momentum)
    blocks = decay_step // EVERY
    out["loss_before"] = statistics.fmean(result["losses"][max(0, blocks - 10) : blocks])
    out["loss_after"] = final_loss(result, spec.measure_steps)
    if spec.optimizer == "sgd":
        out["smd_steps"] = lr_decay_relaxation_steps(k, lr_new, spec.weight_decay, spec.momentum)
        out["smd_steps_with_old_lr"] = lr_decay_relaxation_steps(
            k, spec.lr, spec.weight_decay, spec.momentum
        )
    for unit in result["units"]:
        series = unit_series(result, unit)
        before = [e for e in series if decay_step - 160 < e["step"] <= decay_step]
        after = [e for e in series if e["step"] > decay_step]
        pre_rms = math.sqrt(statistics.fmean(e["angular_update"] ** 2 for e in before))
        first = after[0]
        t = [e["step"] - decay_step for e in after]
        ratios = [e["angular_update"] / out["prediction_after"] for e in after]
        smooth = _smoothed(ratios)
        t90 = next((ti for ti, r in zip(t, smooth, strict=True) if r >= 0.9), None)
        t95 = next((ti for ti, r in zip(t, smooth, strict=True) if r >= 0.95), None)
        # ln(1/r^2 - 1) = ln(k - 1) - t / tau: fit on the way up (before the smoothed ratio
        # first reaches 0.9) and where the ratio is clearly below 1 (near 1 the log is all noise).
        points = [
            (ti, math.log(1 / r**2 - 1))
            for ti, r in zip(t, ratios, strict=True)
            if 0 < r < 0.85 and (t90 is None or ti <= t90)
        ]
        fit_tau = fit_intercept = None
        if len(points) >= 3:
            slope, intercept = _linear_fit([p[0] for p in points], [p[1] for p in points])
            if slope < 0:
                fit_tau, fit_intercept = -1.0 / slope, intercept
        tail = [e for e in after if e["step"] > spec.steps - spec.measure_steps]
        final = math.sqrt(statistics.fmean(e["angular_update"] ** 2 for e in tail))
        early = [e["angular_update"] for e in after[:3]]
        at_cooldown = next(
            (r for ti, r in zip(t, smooth, strict=True) if ti >= out["cooldown"]), math.nan
        )
        window = [(r, ti) for ti, r in zip(t, smooth, strict=True) if ti <= 4 * tau]
        dip, dip_t = min(window) if window else (math.nan, 0)
        out["layers"][unit] = {
            "early_ratio": _rms(early) / out["prediction_after"],
            "ratio_at_cooldown": at_cooldown,
            "dip": dip,
            "dip_step": dip_t,
            "ratio_before": pre_rms / out["prediction_before"],
            "first_ratio": first["angular_update"] / out["prediction_after"],
            "drop": pre_rms / first["angular_update"],
            "t90": t90,
            "t95": t95,
            "fit_tau": fit_tau,
            "fit_intercept": fit_intercept,
            "fit_points": len(points),
            "final_ratio": final / out["prediction_after"],
            "t": t,
            "ratios": ratios,
            "norm_before": before[-1]["weight_norm"],
            "norm_after": after[-1]["weight_norm"],
        }
    return out


def analyse_scaling(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    base = runs[0]
    ks = [r["spec"]["batch_size"] // base["spec"]["batch_size"] for r in runs]
    per_k = {k: measured_equilibrium(r) for k, r in zip(ks, runs, strict=True)}
    units = base["units"]
    out: dict[str, Any] = {
        "momentum": base["spec"]["momentum"],
        "base_lr": base["spec"]["lr"],
        "base_batch": base["spec"]["batch_size"],
        "weight_decay": base["spec"]["weight_decay"],
        "ks": ks,
        "steps": [r["spec"]["steps"] for r in runs],
        "layers": {},
    }
    alpha = out["momentum"]
    for unit in units:
        angles = [per_k[k][unit]["measured"] for k in ks]
        slope, _ = _linear_fit([math.log(k) for k in ks], [math.log(a) for a in angles])
        horizon = {}
        for h in (2, 4, 8):
            entries = base["horizon"].get(str(h), [])
            last = base["spec"]["steps"] - base["spec"]["measure_steps"]
            values = [e for e in entries if e["unit"] == unit and e["step"] > last]
            if not values or h not in ks:
                continue
            multi = math.sqrt(statistics.fmean(e["horizon_angular_update"] ** 2 for e in values))
            single_b = math.sqrt(statistics.fmean(e["angular_update"] ** 2 for e in values))
            single_kb = per_k[h][unit]["measured"]
            horizon[h] = {
                "k_step_angle": multi,
                "one_step_angle_B": single_b,
                "one_step_angle_kB": single_kb,
                "ratio": multi / single_kb,
                "growth": multi / single_b,
                "random_walk_growth": random_walk_growth(h, alpha),
                "sqrt_k": math.sqrt(h),
            }
        out["layers"][unit] = {
            "angles": angles,
            "predictions": [per_k[k][unit]["theory"] for k in ks],
            "ratios": [per_k[k][unit]["ratio"] for k in ks],
            "exponent": slope,
            "horizon": horizon,
        }
    return out


def random_walk_growth(k: int, momentum: float, history: int = 4000) -> float:
    """``angle(w_t, w_{t+k}) / angle(w_t, w_{t+1})`` for independent gradients (derived).

    Heavy-ball updates ``u_t = sum_j alpha^j g_{t-j}`` of white-noise gradients: the ratio of the
    standard deviations of ``sum_{t=1..k} u_t`` and ``u_1`` (small angles, constant norm). It is
    ``sqrt(k)`` for ``alpha = 0`` (a random walk) and approaches ``k`` when ``k << 1/(1-alpha)``.
    """
    a = momentum
    past = (
        sum((a ** (1 - s) * (1 - a**k) / (1 - a)) ** 2 for s in range(0, -history, -1))
        if a
        else 0.0
    )
    inside = sum(((1 - a ** (k - s + 1)) / (1 - a)) ** 2 for s in range(1, k + 1))
    return math.sqrt((past + inside) * (1 - a * a))


def analyse_channels(result: dict[str, Any]) -> dict[str, Any]:
    spec = RunSpec(**{**result["spec"], "milestones": tuple(result["spec"]["milestones"])})
    prediction = spec.prediction()
    out: dict[str, Any] = {
        "name": result["name"],
        "optimizer": spec.optimizer,
        "prediction": prediction,
        "steps": spec.channel_steps,
        "layers": {},
    }
    last = spec.steps - spec.channel_steps
    for unit, data in result["channel_rms"].items():
        ratios = [v / prediction for v in data["rms"]]
        first = [v / prediction for v in data["first_half"]]
        second = [v / prediction for v in data["second_half"]]
        spread = statistics.pstdev(ratios)
        noise = statistics.pstdev([a - b for a, b in zip(first, second, strict=True)]) / 2
        quantiles = statistics.quantiles(ratios, n=10)
        windows = [e for e in result["channel_history"] if e["unit"] == unit and e["step"] > last]
        callback = {
            key: statistics.fmean(e["channels"][key] for e in windows) / prediction
            for key in ("p10", "median", "p90")
        }
        out["layers"][unit] = {
            "channels": len(ratios),
            "ratios": ratios,
            "mean": statistics.fmean(ratios),
            "median": statistics.median(ratios),
            "p10": quantiles[0],
            "p90": quantiles[-1],
            "min": min(ratios),
            "max": max(ratios),
            "std": spread,
            "sampling_noise": noise,
            "intrinsic_std": math.sqrt(max(0.0, spread**2 - noise**2)),
            "within_10pct": statistics.fmean(float(abs(r - 1) <= 0.1) for r in ratios),
            "within_20pct": statistics.fmean(float(abs(r - 1) <= 0.2) for r in ratios),
            "layer_ratio": measured_equilibrium(result, spec.channel_steps)[unit]["ratio"],
            "callback_window_ratio": callback,
        }
    return out
