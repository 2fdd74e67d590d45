"""Predicted trajectory against a dense (every-step) measurement, and the detector against both.

Two tasks (scikit-learn's digits with a BatchNorm convnet; a generated image task with a
BatchNorm MLP), SGD with momentum and AdamW, six per-step schedules. Each run trains with a
:class:`~lightning_sdm.monitor.SphericalMonitor` at its default window (2 measured steps per
window) and an independent float64 recorder of every step's angle per unit; the default
:class:`~lightning_sdm.equilibrium.EquilibriumDetector` judges the monitor's windows.

Per unit-window it records: the trajectory's prediction (made before the window), the dense RMS
angle over the window's measured steps and over its whole interval, the trajectory's prediction
for every step of the interval (the model the monitor runs, replayed on the monitor's own window
measurements: it gives the same value for the measured steps, checked at every window), the
static prediction, and the detector's regime. ``python -m studies.trajectory --out docs``
writes the table of ``docs/trajectory.md``; :func:`run` is what the fast test calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_sdm.config import MonitorConfig
from lightning_sdm.equilibrium import EquilibriumDetector
from lightning_sdm.monitor import SphericalMonitor
from lightning_sdm.records import UnitWindow
from lightning_sdm.theory import predict_param_group
from lightning_sdm.theory._trajectory import (
    TrajectoryConstants,
    TrajectoryState,
    advance,
    observe,
    trajectory_constants,
)
from lightning_sdm.units import Unit
from studies.nets import bn_convnet, digits, normed_mlp, smooth_prototypes

SCHEDULES = ("constant", "step", "warmup_cosine", "onecycle", "wsd", "linear_to_zero")
OPTIMIZERS = ("sgdm", "adamw")
TASKS = ("digits", "blobs")


@dataclass(frozen=True)
class Row:
    """One unit-window."""

    task: str
    optimizer: str
    schedule: str
    unit: str
    step: int
    lr: float
    trajectory: float  # NaN where the monitor made none
    dense: float  # RMS of the dense angle over the window's measured steps
    dense_interval: float  # ... over all the steps since the last window (a steadier reference)
    trajectory_interval: float  # the trajectory's RMS over the same steps (NaN: none)
    steps_in_interval: int
    static_interval: float  # the static prediction's RMS over the same steps (at each step's LR)
    theory: float
    regime: str
    flagged: bool  # the detector's equilibrium or tracking
    elapsed_tau: float  # relaxation times since the start (integrated, 1/tau per step)
    # Mean squares over the first and the second half of the interval: the dense angle and the
    # trajectory's prediction (NaN: none). The reference's own noise (split halves).
    dense_halves: tuple[float, float] = (math.nan, math.nan)
    trajectory_halves: tuple[float, float] = (math.nan, math.nan)


def schedule_factor(name: str, total: int) -> Callable[[int], float]:
    """The LR multiplier of step ``t`` (0-based) of a schedule of ``total`` steps."""
    warm = max(total // 20, 1)

    def factor(t: int) -> float:
        f = t / total
        if name == "constant":
            return 1.0
        if name == "step":
            return 1.0 if f < 0.5 else 0.1 if f < 0.75 else 0.01
        if name == "warmup_cosine":
            return min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * f))
        if name == "onecycle":  # torch's OneCycleLR shape: div 25, final div 1e4, 30% up
            up = 0.3
            if f < up:
                return 0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi * f / up))
            return 4e-6 + (1 - 4e-6) * 0.5 * (1 + math.cos(math.pi * (f - up) / (1 - up)))
        if name == "wsd":
            return min(1.0, (t + 1) / warm) * (1.0 if f < 0.8 else (1 - f) / 0.2)
        if name == "linear_to_zero":
            return 1 - f
        raise ValueError(f"unknown schedule {name!r}")

    return factor


def _data(task: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if task == "digits":
        return digits()
    # Generated: 8 classes of random smooth 12x12 prototypes under heavy noise (not digits).
    g = torch.Generator().manual_seed(1000 + seed)
    protos = smooth_prototypes(g)
    labels = torch.randint(0, 8, (1600,), generator=g)
    x = protos[labels] + 0.6 * torch.randn(1600, 1, 12, 12, generator=g)
    return x.flatten(1), labels


def _model(task: str, seed: int) -> tuple[nn.Module, list[Unit]]:
    torch.manual_seed(seed)
    if task == "digits":
        model = bn_convnet(1, 16, 10, last_kernel=1)  # the third conv is a 1x1 conv
        names = ["0.weight", "3.weight", "7.weight"]
    else:
        model = normed_mlp([144, 64, 64], 8)
        names = ["0.weight", "3.weight"]
    return model, [Unit(name=n, params=(n,)) for n in names]


def _optimizer(name: str, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    if name == "sgdm":
        return torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=5e-3)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)


def run(
    task: str,
    optimizer: str,
    schedule: str,
    steps: int = 1200,
    every_n_steps: int = 20,
    seed: int = 0,
) -> list[Row]:
    """One training run; one :class:`Row` per unit and window."""
    x, y = _data(task, seed)
    model, units = _model(task, seed)
    invariant = {u.params[0] for u in units}
    named = dict(model.named_parameters())
    decayed = [p for n, p in named.items() if n in invariant]
    rest = [p for n, p in named.items() if n not in invariant]
    opt = _optimizer(optimizer, decayed)
    opt.add_param_group({"params": rest, "weight_decay": 0.0})
    factor = schedule_factor(schedule, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    monitor = SphericalMonitor(model, opt, units, MonitorConfig(every_n_steps=every_n_steps))
    monitor.attach()
    constants = trajectory_constants(predict_param_group(opt, opt.param_groups[0]))
    states: dict[str, TrajectoryState | None] = {u.name: None for u in units}
    lrs: list[float] = []
    wds: list[float] = []
    last_end: dict[str, int] = {u.name: 0 for u in units}
    detector = EquilibriumDetector()
    g = torch.Generator().manual_seed(seed)
    dense: dict[str, list[float]] = {u.name: [] for u in units}
    taus: list[float] = []
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    rows: list[Row] = []
    elapsed = 0.0
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,), generator=g)
        before = {n: named[n].detach().double().clone() for n in invariant}
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[batch]), y[batch]).backward()
        lr, wd = opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]
        lrs.append(lr)
        wds.append(wd)
        rate = (4 * lr * wd / 0.1) if optimizer == "sgdm" else 2 * lr * wd
        elapsed += rate
        taus.append(elapsed)
        opt.step()
        sched.step()
        for n in invariant:
            a, b = before[n], named[n].detach().double()
            a, b = a.flatten() / a.norm(), b.flatten() / b.norm()
            dense[n].append(2 * math.asin(min(float((a - b).norm()) / 2, 1.0)))
        for window in monitor.pop_windows():
            detector.update([window])
            state = detector.state[window.unit]
            end = window.optimizer_step
            measured = dense[window.unit][end - window.steps : end]
            rms = math.sqrt(sum(v * v for v in measured) / len(measured))
            start = last_end[window.unit]
            interval = dense[window.unit][start:end]
            rms_interval = math.sqrt(sum(v * v for v in interval) / len(interval))
            predicted: list[float] = []
            if window.theory is None or window.frozen:
                # The monitor drops the trajectory there (lr = 0, frozen): so does the replay.
                states[window.unit] = None
            else:
                predicted, states[window.unit] = _replay(
                    states[window.unit], constants, lrs[start:end], wds[start:end], window
                )
            last_end[window.unit] = end
            per_step = math.sqrt(sum(predicted) / len(predicted)) if predicted else math.nan
            lr_end = lrs[end - 1]
            static = math.nan
            if window.theory is not None and lr_end > 0:
                # The static angle goes as sqrt(lr) (wd constant): each step's at its own LR.
                static = window.theory * math.sqrt(
                    sum(v for v in lrs[start:end]) / len(interval) / lr_end
                )
            rows.append(
                Row(
                    task,
                    optimizer,
                    schedule,
                    window.unit,
                    end,
                    window.lr,
                    window.trajectory if window.trajectory is not None else math.nan,
                    rms,
                    rms_interval,
                    per_step,
                    end - start,
                    static,
                    window.theory if window.theory is not None else math.nan,
                    state.regime,
                    # Recognised as following theory: in equilibrium, or on its trajectory
                    # (`tracking`, which after an LR jump is not yet `in_equilibrium`: theory's
                    # wait keeps DecayLR off a unit that is only relaxing).
                    state.in_equilibrium or state.regime == "tracking",
                    taus[end - 1],
                    _halves([v * v for v in interval]),
                    _halves(predicted) if predicted else (math.nan, math.nan),
                )
            )
    monitor.detach()
    return rows


def _replay(
    state: TrajectoryState | None,
    constants: TrajectoryConstants | None,
    lrs: Sequence[float],
    wds: Sequence[float],
    window: UnitWindow,
) -> tuple[list[float], TrajectoryState | None]:
    """The trajectory's mean square of every step of a window, from the state the monitor holds.

    The monitor's model replayed on its own window (angle, norm) and the recorded schedule: the
    prediction for the measured steps must equal the monitor's (a check that this is the same
    model, not a second one).
    """
    measured = [False] * (len(lrs) - window.steps) + [True] * window.steps
    per_step: list[float] = []
    if state is not None and constants is not None and math.isfinite(state.scale):
        _, terms, _ = advance(state.q, state.scale, lrs, wds, constants, state.memory)
        per_step = [state.scale * term for term in terms]
    if constants is None:
        return per_step, None
    new, predicted = observe(
        state, lrs, wds, measured, constants, window.angular_update, window.weight_norm
    )
    logged = window.trajectory
    if (predicted is None) != (logged is None) or (
        predicted is not None
        and logged is not None
        and not math.isclose(predicted, logged, rel_tol=1e-9)
    ):
        raise RuntimeError(f"the replayed trajectory {predicted} is not the monitor's {logged}")
    return per_step, new


def _halves(values: Sequence[float]) -> tuple[float, float]:
    """Means of the first and the second half of ``values`` (the middle one in neither)."""
    half = len(values) // 2
    if half == 0:
        return math.nan, math.nan
    return sum(values[:half]) / half, sum(values[-half:]) / half


def pooled_reference(rows: Sequence[Row]) -> list[float]:
    """Per row, dense / trajectory over every step of the last relaxation time (>= 3 windows).

    The model predicts the expected mean square of every step, so the reference is the dense
    angle of every step against the trajectory's prediction for the same step: each window's
    ratio of mean squares, averaged (weighted by steps) over the windows of the last relaxation
    time, at least the last 3 (60 steps). Averaged as ratios, not as sums of squares: after a
    10x drop the angle's square falls ~10x, and pooled sums would let the windows before the
    drop speak for those after it for a whole relaxation time.
    Not fewer: one 20-step window of these networks scatters by +-12-17% (90th percentile) around
    a centred 100-step RMS at a constant LR, 60 steps by 9-12%; the update size itself moves
    from window to window, which no prediction made before the window can know.
    """
    return _per_span(rows, _pooled)


def _pooled(span: Sequence[Row]) -> float:
    if not all(math.isfinite(r.trajectory_interval) for r in span):
        return math.nan
    return _mean_ratio(span, [r.trajectory_interval for r in span])


def reference_noise(rows: Sequence[Row]) -> list[float]:
    """Per row, the reference's own sampling error, from its two halves (NaN: no reference).

    Each window's interval is split in two halves, and the dense / trajectory ratio of mean
    squares is pooled over the span of :func:`pooled_reference` separately for the first halves
    (``A``) and the second ones (``B``). Both halves of a window share the trajectory's update
    size, so an error of the prediction cancels in ``A / B``; what remains is the dense angle's
    step-to-step scatter. With independent halves, ``ln(A / B) / 2`` has the spread of the pooled
    mean square's own error, and ``(A / B) ** (1 / 4) - 1`` that of the reference's (an RMS).
    The halves are 10 steps of adjacent windows of 20 steps: the per-step ratio's
    autocorrelation at lag 10 is 0.1-0.2 on the study's SGD-M runs, so this reads the floor
    slightly low.
    """
    return _per_span(rows, _halves_noise)


def _halves_noise(span: Sequence[Row]) -> float:
    first = second = 0.0
    for r in span:
        (dense_a, dense_b), (pred_a, pred_b) = r.dense_halves, r.trajectory_halves
        if not (pred_a > 0 and pred_b > 0 and math.isfinite(dense_a + dense_b)):
            return math.nan
        first += r.steps_in_interval * dense_a / pred_a
        second += r.steps_in_interval * dense_b / pred_b
    return (first / second) ** 0.25 - 1 if first > 0 and second > 0 else math.nan


def _per_span(rows: Sequence[Row], value: Callable[[Sequence[Row]], float]) -> list[float]:
    """Per row, ``value`` of its span (:func:`_span`) within its own unit's series of a run."""
    by_unit: dict[tuple[str, str, str, str], list[Row]] = {}
    for row in rows:
        by_unit.setdefault((row.task, row.optimizer, row.schedule, row.unit), []).append(row)
    index = {id(row): i for i, row in enumerate(rows)}
    values = [math.nan] * len(rows)
    for series in by_unit.values():
        for i, row in enumerate(series):
            values[index[id(row)]] = value(_span(series, i))
    return values


def _mean_ratio(span: Sequence[Row], predicted: Sequence[float]) -> float:
    """RMS of dense / predicted over ``span``: per-window ratios of mean squares, step-weighted."""
    if not all(p > 0 for p in predicted):
        return math.nan
    steps = sum(r.steps_in_interval for r in span)
    squares = sum(
        (r.dense_interval / p) ** 2 * r.steps_in_interval
        for r, p in zip(span, predicted, strict=True)
    )
    return math.sqrt(squares / steps)


def summarize(rows: Sequence[Row]) -> dict[str, float]:
    """The issue's numbers for a set of rows (one task, optimizer and schedule, or more).

    ``accuracy``: fraction of windows after the first relaxation time whose pooled dense /
    trajectory is within 10%; ``floor``: of the same windows, the fraction whose reference's own
    sampling error (:func:`reference_noise`) is within 10%, what a prediction of every step's
    expected angle would reach; ``recall``: of the windows within 10%, the fraction the detector
    flags (equilibrium or tracking); ``false_flags``: of those more than 25% off, the fraction
    flagged; ``static_recall``: of the windows within 10% of the static prediction (dense over
    the same span), the fraction flagged.
    """
    reference = pooled_reference(rows)
    noise = reference_noise(rows)
    judged = [(r, x) for r, x in zip(rows, reference, strict=True) if math.isfinite(x)]
    settled = [(r, x) for r, x in judged if r.elapsed_tau > 1]
    floor = [
        abs(e) <= 0.1
        for r, x, e in zip(rows, reference, noise, strict=True)
        if math.isfinite(x) and r.elapsed_tau > 1 and math.isfinite(e)
    ]
    near = [r for r, x in judged if abs(x - 1) <= 0.1]
    far = [r for r, x in judged if abs(x - 1) > 0.25]

    def fraction(values: Sequence[bool]) -> float:
        return sum(values) / len(values) if values else math.nan

    static = []  # settled windows whose dense RMS over one relaxation time is near the static one
    for (r, _), x in zip(judged, _pooled_static(rows, [r for r, _ in judged]), strict=True):
        if r.elapsed_tau > 1 and math.isfinite(x) and abs(x - 1) <= 0.1:
            static.append(r)
    return {
        "static_recall": fraction([r.flagged for r in static]),
        "static_near": float(len(static)),
        "windows": float(len(settled)),
        "accuracy": fraction([abs(x - 1) <= 0.1 for _, x in settled]),
        "floor": fraction(floor),
        "median_error": sorted(abs(x - 1) for _, x in settled)[len(settled) // 2]
        if settled
        else math.nan,
        "near": float(len(near)),
        "recall": fraction([r.flagged for r in near]),
        "far": float(len(far)),
        "false_flags": fraction([r.flagged for r in far]),
    }


def _span(series: Sequence[Row], i: int) -> list[Row]:
    """The windows of one unit's series pooled for row ``i``: last relaxation time, >= 3."""
    row = series[i]
    span = [r for r in series[: i + 1] if r.elapsed_tau > row.elapsed_tau - 1]
    return span if len(span) >= 3 else list(series[max(i - 2, 0) : i + 1])


def _pooled_static(rows: Sequence[Row], chosen: Sequence[Row]) -> list[float]:
    """Dense / static prediction pooled like :func:`pooled_reference`, for ``chosen`` rows."""
    out = []
    for row in chosen:
        series = [
            r
            for r in rows
            if (r.task, r.optimizer, r.schedule, r.unit)
            == (row.task, row.optimizer, row.schedule, row.unit)
        ]
        span = _span(series, series.index(row))
        out.append(_mean_ratio(span, [r.static_interval for r in span]))
    return out
