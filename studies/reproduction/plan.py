"""Which runs each experiment needs (full and quick versions)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from studies.reproduction.common import EVERY
from studies.reproduction.runs import RunSpec


def _round(steps: float) -> int:
    return max(EVERY, math.ceil(steps / EVERY) * EVERY)


@dataclass
class Plan:
    """The runs of every experiment, for the full or the quick version."""

    quick: bool
    sgd_grid: list[RunSpec] = field(default_factory=list)
    adamw_grid: list[RunSpec] = field(default_factory=list)
    nonstationary: list[RunSpec] = field(default_factory=list)
    decay: list[RunSpec] = field(default_factory=list)
    scaling: dict[float, list[RunSpec]] = field(default_factory=dict)  # momentum -> runs
    channel: list[RunSpec] = field(default_factory=list)
    long: list[RunSpec] = field(default_factory=list)  # grid settings run 16 relaxation times

    def specs(self) -> list[RunSpec]:
        scaling = [spec for runs in self.scaling.values() for spec in runs]
        return [
            *self.sgd_grid,
            *self.adamw_grid,
            *self.nonstationary,
            *self.decay,
            *scaling,
            *self.channel,
            *self.long,
        ]


def grid_spec(optimizer: str, lr: float, wd: float, momentum: float, **kw: Any) -> RunSpec:
    """A grid run: long enough to relax from initialization, then ``measure_steps`` measured."""
    spec = RunSpec(
        f"{optimizer}_lr{lr:g}_wd{wd:g}_m{momentum:g}", optimizer, lr, wd, momentum, **kw
    )
    # |w|^4 (SGD) / |w|^2 (AdamW) relaxes as exp(-t / tau); the conv weights start within a factor
    # ~3 of their equilibrium norm, so 6 (SGD) / 4 (AdamW) time constants leave < 1% of the gap.
    burn = (6 if optimizer == "sgd" else 4) * spec.time_scale()
    burn = min(max(burn, 320), 6400)
    return replace(spec, steps=_round(burn + spec.measure_steps))


def make_plan(quick: bool, experiments: Sequence[str], base: dict[str, Any]) -> Plan:
    plan = Plan(quick)
    if "equilibrium" in experiments:
        if quick:
            sgd = [(0.1, 1e-2, 0.9), (0.2, 1e-2, 0.9)]
            adamw = [(1e-2, 1.0, 0.9)]
        else:
            sgd = [
                (lr, wd, m)
                for m in (0.0, 0.9)
                for lr in (0.05, 0.1, 0.2)
                for wd in (5e-3, 1e-2, 2e-2)
            ]
            adamw = [
                (lr, wd, b1)
                for b1 in (0.0, 0.9)
                for lr in (2.5e-3, 5e-3, 1e-2)
                for wd in (0.2, 0.5, 1.0)
            ]
        measure = 240 if quick else 480
        plan.sgd_grid = [
            _sized(grid_spec("sgd", lr, wd, m, measure_steps=measure, **base), quick)
            for lr, wd, m in sgd
        ]
        plan.adamw_grid = [
            _sized(grid_spec("adamw", lr, wd, b1, measure_steps=measure, **base), quick)
            for lr, wd, b1 in adamw
        ]
        if not quick:
            # A colder setting (lr*wd = 1e-4) in which a net on clean labels fits its training set.
            clean = RunSpec(
                "nonstationary_clean_labels",
                "sgd",
                0.1,
                1e-3,
                0.9,
                steps=3200,
                measure_steps=1600,
                **{**base, "label_noise": 0.0},
            )
            noisy = replace(
                clean, name="nonstationary_reference_label_noise", label_noise=base["label_noise"]
            )
            plan.nonstationary = [clean, noisy]
            # The grid setting with the lowest SGD ratios, run for 16 relaxation times instead of
            # 6: is the deficit a slow approach, or a wrong equilibrium value?
            slow = grid_spec("sgd", 0.05, 2e-2, 0.0, measure_steps=480, **base)
            plan.long = [replace(slow, name=slow.name + "_long", steps=4000)]
    if "decay" in experiments:
        wd = 2e-2 if quick else 1e-2
        before, after = (160, 400) if quick else (480, 2400)
        sgd = RunSpec(
            "decay_sgd_multistep",
            "sgd",
            0.2,
            wd,
            0.9,
            steps=before + after,
            measure_steps=240,
            milestones=(before,),
            **base,
        )
        plan.decay = [
            sgd,
            replace(sgd, name="decay_sgd_auto_rescale", milestones=(), auto_decay=True),
        ]
        if not quick:
            adamw_before, adamw_after = 480, 3040
            plan.decay.append(
                RunSpec(
                    "decay_adamw_multistep",
                    "adamw",
                    1e-2,
                    1.0,
                    0.9,
                    steps=adamw_before + adamw_after,
                    measure_steps=480,
                    milestones=(adamw_before,),
                    **base,
                )
            )
    if "scaling" in experiments:
        batch = base.get("batch_size", 32)
        settings = [(0.9, 0.05, 2e-2)] if quick else [(0.9, 0.025, 1e-2), (0.0, 0.05, 1e-2)]
        measure = 128 if quick else 480
        for momentum, lr, wd in settings:
            runs = []
            for k in (1, 2, 4, 8):
                spec = RunSpec(
                    f"scaling_m{momentum:g}_k{k}",
                    "sgd",
                    lr * k,
                    wd,
                    momentum,
                    measure_steps=measure,
                    horizons=(2, 4, 8) if k == 1 else (),
                    **{**base, "batch_size": batch * k},
                )
                burn = max(6 * spec.time_scale(), 64 if quick else 160)
                runs.append(replace(spec, steps=_round(burn + measure)))
            plan.scaling[momentum] = runs
    if "channel" in experiments:
        record = 240 if quick else 960
        width = base.get("width", 16) if quick else 2 * base.get("width", 16)
        specs = (
            [("sgd", 0.1, 1e-2, 0.9)]
            if quick
            else [("sgd", 0.1, 1e-2, 0.9), ("adamw", 5e-3, 0.5, 0.9)]
        )
        for optimizer, lr, wd, momentum in specs:
            spec = RunSpec(
                f"channel_{optimizer}",
                optimizer,
                lr,
                wd,
                momentum,
                measure_steps=record,
                channel_steps=record,
                **{**base, "width": width},
            )
            burn = max((6 if optimizer == "sgd" else 4) * spec.time_scale(), 240)
            plan.channel.append(replace(spec, steps=_round(burn + record)))
    return plan


def _sized(spec: RunSpec, quick: bool) -> RunSpec:
    if not quick:
        return spec
    burn = max((6 if spec.optimizer == "sgd" else 4) * spec.time_scale(), 160)
    return replace(spec, steps=_round(burn + spec.measure_steps))
