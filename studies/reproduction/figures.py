"""The report's figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studies.reproduction.analysis import random_walk_growth, relaxation_model, unit_series
from studies.reproduction.common import EVERY


def _short(unit: str) -> str:
    return "conv" + unit.split(".")[1]


def _figure(path: Path, fig: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def figure_grid(rows: Sequence[dict[str, Any]], path: Path) -> str:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    markers = {0: "o", 1: "s", 2: "^"}
    ratio_ax = axes[2]
    for offset, optimizer in enumerate(("sgd", "adamw")):
        chosen = [r for r in rows if r["optimizer"] == optimizer]
        values = sorted({r["momentum"] for r in chosen})
        name = "SGD momentum" if optimizer == "sgd" else "AdamW beta1"
        for position, value in enumerate(values):
            color = f"C{2 * offset + position}"
            ratio_ax.scatter([], [], c=color, label=f"{name} {value:g}")
            for row in chosen:
                if row["momentum"] != value:
                    continue
                for index, layer in enumerate(row["layers"].values()):
                    ratio_ax.scatter(
                        row["intrinsic_lr"] * (1.04 if offset else 0.96),
                        layer["ratio"],
                        c=color,
                        marker=markers.get(index, "o"),
                        s=18,
                        zorder=3,
                    )
    ratio_ax.axhline(1, color="k", lw=1)
    ratio_ax.axhspan(0.95, 1.05, color="0.9")
    ratio_ax.set_xscale("log")
    ratio_ax.set_xlabel("lr * wd")
    ratio_ax.set_ylabel("measured / predicted (grey: ±5%)")
    ratio_ax.set_title("ratio per layer (o conv1, square conv2, triangle conv3)")
    ratio_ax.legend(fontsize=7, loc="lower left")
    for ax, optimizer in zip(axes[:2], ("sgd", "adamw"), strict=True):
        chosen = [r for r in rows if r["optimizer"] == optimizer]
        if not chosen:
            ax.set_visible(False)
            continue
        values = sorted({r["momentum"] for r in chosen})
        for row in chosen:
            color = "C0" if row["momentum"] == values[0] else "C3"
            for index, layer in enumerate(row["layers"].values()):
                ax.scatter(
                    row["prediction"],
                    layer["measured"],
                    c=color,
                    marker=markers.get(index, "o"),
                    s=22,
                    zorder=3,
                )
        low = min(r["prediction"] for r in chosen) * 0.7
        high = max(r["prediction"] for r in chosen) * 1.4
        line = [low, high]
        ax.plot(line, line, "k-", lw=1, label="measured = predicted")
        ax.fill_between(
            line, [0.9 * v for v in line], [1.1 * v for v in line], color="0.85", label="±10%"
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        name = "momentum" if optimizer == "sgd" else "beta1"
        for value, color in zip(values, ("C0", "C3"), strict=False):
            ax.scatter([], [], c=color, label=f"{name} = {value:g}")
        for index in range(3):
            ax.scatter([], [], c="0.4", marker=markers[index], label=f"conv layer {index + 1}")
        ax.set_xlabel("predicted equilibrium angular update (rad/step)")
        ax.set_ylabel("measured RMS angular update (rad/step)")
        ax.set_title(
            f"{'SGD' if optimizer == 'sgd' else 'AdamW'}: {len(chosen)} settings x 3 layers"
        )
        ax.legend(fontsize=7, loc="upper left")
    return _figure(path, fig)


def figure_nonstationary(stationary: dict[str, Any], moving: dict[str, Any], path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, style in ((stationary, "--"), (moving, "-")):
        label = (
            "label noise 20% (stationary)"
            if run["spec"]["label_noise"]
            else "clean labels (loss -> 0)"
        )
        for index, unit in enumerate(run["units"]):
            series = unit_series(run, unit)
            axes[0].plot(
                [e["step"] for e in series],
                [e["ratio"] for e in series],
                style,
                color=f"C{index}",
                lw=1,
                label=f"{_short(unit)}, {label}",
            )
        axes[1].semilogy(
            [EVERY * (i + 1) for i in range(len(run["losses"]))],
            run["losses"],
            style,
            color="k",
            lw=1,
            label=label,
        )
    axes[0].axhline(1, color="k", lw=0.8)
    axes[0].axhspan(0.85, 1.15, color="0.9")
    axes[0].set_ylim(0, 3)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("measured / predicted angular update")
    spec = moving["spec"]
    axes[0].set_title(
        f"SGD lr {spec['lr']:g}, wd {spec['weight_decay']:g}, momentum {spec['momentum']:g}"
    )
    axes[0].legend(fontsize=6)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss (per 16 steps)")
    axes[1].legend(fontsize=7)
    return _figure(path, fig)


def figure_decay(decays: Sequence[dict[str, Any]], path: Path) -> str:
    import matplotlib.pyplot as plt

    chosen = [d for d in decays if d.get("decay_step") is not None]
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 3.6), squeeze=False)
    for ax, decay in zip(axes[0], chosen, strict=True):
        end = 0
        for index, (unit, layer) in enumerate(decay["layers"].items()):
            ax.plot(layer["t"], layer["ratios"], color=f"C{index}", lw=1, label=_short(unit))
            end = max(end, layer["t"][-1])
        ts = list(range(0, end + 1, 4))
        if not decay["rescaled"]:
            ax.plot(
                ts,
                [relaxation_model(t, decay["k"], decay["tau"]) for t in ts],
                "k--",
                lw=1.2,
                label=f"model, tau = {decay['tau']:.0f}",
            )
        ax.axhline(1, color="k", lw=0.8)
        if "smd_steps" in decay and not decay["rescaled"]:
            ax.axvline(
                decay["smd_steps"], color="0.5", ls=":", label=f"SMD Cor. 3.1: {decay['smd_steps']}"
            )
        title = {
            "decay_sgd_multistep": "SGD, MultiStepLR /10",
            "decay_sgd_auto_rescale": "SGD, callback decay_lr + rescale",
            "decay_adamw_multistep": "AdamW, MultiStepLR /10",
        }
        ax.set_title(title.get(decay["name"], decay["name"]), fontsize=10)
        ax.set_xlabel("steps after the decay")
        ax.set_ylabel("angular update / new prediction")
        ax.set_ylim(0, 1.3)
        ax.legend(fontsize=7, loc="lower right")
    return _figure(path, fig)


def figure_scaling(scaling: Sequence[dict[str, Any]], path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, color in zip(scaling, ("C3", "C0"), strict=False):
        ks = run["ks"]
        for index, (unit, layer) in enumerate(run["layers"].items()):
            axes[0].loglog(
                ks,
                layer["angles"],
                marker="os^"[index % 3],
                color=color,
                lw=0.8,
                label=f"momentum {run['momentum']:g}, {_short(unit)}" if True else None,
            )
            hs = sorted(layer["horizon"], key=int)
            axes[1].plot(
                [int(h) for h in hs],
                [layer["horizon"][h]["ratio"] for h in hs],
                marker="os^"[index % 3],
                color=color,
                lw=0.8,
                label=f"momentum {run['momentum']:g}, {_short(unit)}",
            )
        axes[0].loglog(
            ks,
            [run["layers"][run_units(run)[0]]["predictions"][i] for i in range(len(ks))],
            "--",
            lw=1,
            color=color,
        )
        hs = [2, 4, 8]
        axes[1].plot(
            hs,
            [random_walk_growth(h, run["momentum"]) / math.sqrt(h) for h in hs],
            ":",
            color=color,
            lw=1.5,
            label=f"independent-gradient model, momentum {run['momentum']:g}",
        )
    hs = [2, 4, 8]
    axes[1].plot(hs, [math.sqrt(h) for h in hs], "k-", lw=1, label="sqrt(k) (angles add)")
    axes[1].plot(hs, [1, 1, 1], "k--", lw=1, label="1 (pure random walk)")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axes[0].set_xticks([1, 2, 4, 8])
    axes[0].xaxis.set_major_formatter(ScalarFormatter())
    axes[0].xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_xlabel("k (batch k*B, lr k*eta)")
    axes[0].set_ylabel("equilibrium RMS angle per step")
    axes[0].set_title("per-step angle vs k (dashed: prediction)")
    axes[0].legend(fontsize=6)
    axes[1].set_xlabel("k")
    axes[1].set_ylabel("angle(w_t, w_t+k) at B / one step at kB")
    axes[1].set_title("k steps at batch B vs one step at k*B")
    axes[1].legend(fontsize=6, loc="upper left")
    return _figure(path, fig)


def run_units(run: dict[str, Any]) -> list[str]:
    return list(run["layers"])


def figure_channels(channels: Sequence[dict[str, Any]], path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(channels), figsize=(5 * len(channels), 3.6), squeeze=False)
    for ax, run in zip(axes[0], channels, strict=True):
        bins = [0.7 + 0.01 * i for i in range(61)]
        for index, (unit, layer) in enumerate(run["layers"].items()):
            ax.hist(
                [min(max(r, 0.7), 1.3) for r in layer["ratios"]],
                bins=bins,
                histtype="step",
                lw=1.5,
                color=f"C{index}",
                label=f"{_short(unit)} ({layer['channels']} channels)",
            )
        ax.axvline(1, color="k", lw=1)
        ax.set_xlabel("per-channel RMS angular update / prediction")
        ax.set_ylabel("channels")
        ax.set_title(
            f"{'SGD' if run['optimizer'] == 'sgd' else 'AdamW'}, {run['steps']} steps per channel"
        )
        ax.legend(fontsize=7)
    return _figure(path, fig)
