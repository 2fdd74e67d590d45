"""Every text the package shows users, in one place, with its prefix.

Each function returns one message; the callers decide how it is shown (the adapters of
:mod:`lightning_sdm.lightning` show each once per run, on rank zero, through Lightning's
``rank_zero_warn``/``rank_zero_info``). Kept free of torch and of the sub-packages, so that
every layer may use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lightning_sdm.keys import Keys
from lightning_sdm.records import EquilibriumEvent

if TYPE_CHECKING:
    from lightning_sdm.theory import Prediction

PREFIX = "[lightning_sdm]"


def no_units_found(model: str, reasons: Mapping[str, int] | None = None) -> str:
    """The trace found no scale-invariant weight: nothing will be measured, and why."""
    why = ""
    if reasons:
        kinds = {k: n for k, n in reasons.items() if k not in ("bias of a rejected weight",)}
        why = " Rejected: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) + "."
    return (
        f"SphericalDynamicsCallback found no scale-invariant weights in {model}: no weight "
        "reaches a BatchNorm/GroupNorm/LayerNorm/InstanceNorm through positively homogeneous "
        "operations only (in transformers the residual stream and attention keep every weight "
        f"from being invariant).{why} Nothing will be measured; pass `params=[...]` to monitor "
        "weights explicitly (their ratio to a prediction is then not physics)."
    )


def no_window_closed(steps: int, every_n_steps: int | None) -> str:
    """Training ended before the first window closed: the history is empty, and why."""
    return (
        f"SphericalDynamicsCallback: training ended after {steps} optimizer step(s), before the "
        f"first window closed (every_n_steps={every_n_steps}), so nothing was logged and "
        "`history` is empty. Pass a smaller `every_n_steps` (and `window`) to measure short runs "
        "such as `fast_dev_run`."
    )


def monitor_cost(
    fraction: float,
    per_measured: float,
    per_step: float,
    every: int,
    window: int,
    budget: float,
    fitting: tuple[int | None, int],
) -> str:
    """The schedule costs more than ``budget`` of this run's CPU steps: how to bring it down.

    ``fitting``: a ``(window, every_n_steps)`` that would fit the budget (``window`` ``None``
    when no window fits at this ``every_n_steps``).
    """
    fitting_window, fitting_every = fitting
    remedy = f"`every_n_steps={fitting_every}`"
    if fitting_window is not None:
        remedy = f"`window={fitting_window}` or {remedy}"
    return (
        f"{PREFIX} measuring {window} of every {every} optimizer steps costs {fraction:.1%} of "
        f"the step time in this run ({per_measured * 1e3:.1f} ms per measured step against "
        f"{per_step * 1e3:.1f} ms per step, on the CPU). {remedy} would keep it under "
        f"{budget:.0%}, with fewer samples per relaxation time for the detector."
    )


def fused_engine_failed(reason: str) -> str:
    """The compiled measurement could not be built or run: the eager engine takes over."""
    return (
        f"{PREFIX} the compiled measurement (engine='compiled') is not available here ({reason}); "
        "measuring with the eager engine instead: the same numbers, ~4x more time per measured "
        "step on CPU. Pass engine='eager' to skip the attempt."
    )


def fused_engine_compiled(seconds: float, tensors: int, device: str) -> str:
    """The compiled measurement was built: how long it took (once per layout)."""
    return (
        f"{PREFIX} compiled the fused measurement of {tensors} tensors on {device} in "
        f"{seconds:.1f} s (once per layout; later measured steps reuse it)."
    )


def window_too_long(error: Exception, every: int) -> str:
    """The Trainer's ``log_every_n_steps`` is shorter than the window asked for."""
    return (
        f"SphericalDynamicsCallback: {error} The window follows the Trainer's "
        f"log_every_n_steps={every}; pass every_n_steps/window explicitly."
    )


def scheduler_between_windows(key: str, frequency: int, every: int, accumulate: int = 1) -> str:
    """A step-interval scheduler monitors a key that changes only when a window closes.

    Lightning counts the frequency in batches; under ``accumulate_grad_batches`` a window of
    ``every`` optimizer steps spans ``every * accumulate`` batches, which is the fix.

    Example::

        >>> text = scheduler_between_windows("sdm/angular_update_ratio", 4, 4, accumulate=2)
        >>> text[text.index("Use"):text.index(", or")]
        "Use 'frequency': 8 (or a multiple of it)"
    """
    fix = every * accumulate
    spans = (
        f" (accumulate_grad_batches={accumulate}: a window spans {fix} batches, and Lightning "
        "counts the frequency in batches)"
        if accumulate > 1
        else ""
    )
    return (
        f"An LR scheduler monitors {key!r} with 'interval': 'step' and 'frequency': {frequency}, "
        f"but SphericalDynamicsCallback sets it only when a window closes (every_n_steps={every}"
        f"{spans}): the scheduler would find it missing before the first window (Lightning stops "
        "the run) or read the same value again between windows (ReduceLROnPlateau counts each as "
        f"a step without improvement). Use 'frequency': {fix} (or a multiple of it), or "
        "'interval': 'epoch'."
    )


def scheduler_never_steps(key: str, frequency: int, batches: int) -> str:
    """A step-interval scheduler on an ``sdm/`` key whose frequency exceeds the epoch's batches.

    Example::

        >>> print(scheduler_never_steps("sdm/angular_update_ratio", 8, 6))
        An LR scheduler monitors 'sdm/angular_update_ratio' with 'interval': 'step' and 'frequency': 8, but an epoch has 6 batches: Lightning steps it when the batch index in the epoch (plus one) is a multiple of 8, which never comes, so the scheduler would never step. Use a frequency of at most 6 that is a multiple of a window's batches (every_n_steps x accumulate_grad_batches; a smaller every_n_steps if none fits), or 'interval': 'epoch'.
    """  # noqa: E501
    return (
        f"An LR scheduler monitors {key!r} with 'interval': 'step' and 'frequency': {frequency}, "
        f"but an epoch has {batches} batches: Lightning steps it when the batch index in the "
        f"epoch (plus one) is a multiple of {frequency}, which never comes, so the scheduler "
        f"would never step. Use a frequency of at most {batches} that is a multiple of a "
        "window's batches (every_n_steps x accumulate_grad_batches; a smaller every_n_steps if "
        "none fits), or 'interval': 'epoch'."
    )


def trace_failed(notes: Sequence[str], units: Sequence[str]) -> str:
    """The trace failed: the units are a registration-order guess."""
    return (
        f"SphericalDynamicsCallback could not trace the model ({'; '.join(notes)}); it guesses "
        f"{len(units)} unit(s) from registration order ({', '.join(units[:6])}"
        f"{', ...' if len(units) > 6 else ''}) and checks each by gradient orthogonality."
    )


#: Why a unit whose parts sit in different optimizers (Muon on the weight, AdamW on its bias) is
#: not monitored, and the fix.
SPLIT_ACROSS_OPTIMIZERS = (
    "its weight and bias are updated by different optimizers, so the unit has no one update "
    "to measure: build the layer with bias=False (the normalization's shift does the bias's "
    "work), or give the whole unit to one optimizer"
)


def skipped_units(skipped: Mapping[str, str]) -> str:
    """Units no optimizer updates."""
    listing = ", ".join(f"{name} ({why})" for name, why in skipped.items())
    return f"SphericalDynamicsCallback does not monitor: {listing}."


def nothing_to_measure(skipped: Mapping[str, str]) -> str:
    """Every unit found is skipped (no optimizer updates it): nothing will be measured."""
    listing = ", ".join(f"{name} ({why})" for name, why in skipped.items())
    return (
        f"SphericalDynamicsCallback measures nothing: no optimizer updates the units it found "
        f"({listing}). Frozen layers have no angular update; add them to an optimizer, or pass "
        "`params=[...]` to choose trained weights."
    )


def missing_predictions(
    predictions: Mapping[str, Prediction], since: int | None = None
) -> dict[str, str]:
    """Per distinct reason: the units without a prediction and why (key -> message).

    ``since``: the global step from which a prediction the units had is gone (a weight decay
    set to 0, a learning rate that reached 0).
    """
    reasons: dict[str, list[str]] = {}
    for name, prediction in predictions.items():
        if prediction.angular_update is None:
            reasons.setdefault(prediction.reason, []).append(name)
    when = "" if since is None else f" from global step {since} on"
    return {
        f"no_prediction:{reason}": (
            f"SphericalDynamicsCallback has no predicted equilibrium for {', '.join(names)}"
            f"{when}: {reason}. Measured angular updates are still logged; equilibrium is then "
            "judged by stationarity alone."
        )
        for reason, names in reasons.items()
    }


def moved_group(name: str, old: int, new: int, global_step: int) -> str:
    """A monitored weight was moved to another param group of its optimizer."""
    return (
        f"SphericalDynamicsCallback: {name} moved from param group {old} to param group {new} "
        f"(seen at global step {global_step}, when its window closed); from the window that "
        f"started after the move, its learning rate and prediction are those of group {new}."
    )


def optimizer_replaced(global_step: int) -> str:
    """The Trainer's optimizers are other objects than the monitored ones."""
    return (
        f"SphericalDynamicsCallback: the optimizer was replaced (seen at global step "
        f"{global_step}); monitoring continues on the new one from the Trainer's step count, "
        "with the history and the detector kept; the open window restarts."
    )


def not_orthogonal(name: str, cosine: float, threshold: float) -> str:
    """A monitored unit failed the gradient-orthogonality cross-check."""
    return (
        f"SphericalDynamicsCallback: {name} is monitored but its gradient is not orthogonal to "
        f"it (|cos(w, grad)| = {cosine:.2e} > {threshold:.2e}, the tolerance over sqrt(size)), "
        "so it is probably not "
        "scale-invariant and the theory does not apply to it. Its figures are still logged, "
        "marked `invariance='violated'` in `history`."
    )


def non_finite(units: Sequence[str]) -> str:
    """Weights turned NaN/Inf/zero."""
    return (
        f"SphericalDynamicsCallback: the weights of {', '.join(units)} contain NaN/Inf or are "
        "zero; their angular updates are logged as NaN. Training continues; check the learning "
        "rate and the loss."
    )


def entered_equilibrium(
    name: str, global_step: int | None, optimizer_step: int | None, criterion: str
) -> str:
    """A unit entered equilibrium (both clocks named)."""
    return (
        f"{PREFIX} {name} reached equilibrium at global step {global_step} (optimizer step "
        f"{optimizer_step}; criterion: {criterion})."
    )


def steps_to_equilibrium(global_step: int, estimate: float, quorum: float) -> str:
    """The first estimate of the time to equilibrium."""
    return (
        f"{PREFIX} global step {global_step}: about {estimate:.0f} more optimizer steps until "
        f"{quorum:.0%} of the units reach equilibrium (theory's relaxation time, refined by the "
        "measured trend)."
    )


def describe_event(event: EquilibriumEvent, decays: int | None = None) -> str:
    """The one-line message of an event.

    Example::

        >>> event = EquilibriumEvent(300, ("w",), 1.0, {"w": 0.0101}, {"w": 0.01}, "theory")
        >>> describe_event(event)
        '[lightning_sdm] global step 300: 100% of the units are in equilibrium (criterion: theory): w: 0.0101 rad/step vs 0.01 predicted.'
    """  # noqa: E501
    figures = ", ".join(
        f"{name}: {event.measured.get(name, math.nan):.3g} rad/step vs "
        f"{_format_prediction(event.predicted.get(name))}"
        for name in event.units
    )
    text = (
        f"{PREFIX} global step {event.global_step}: {event.fraction:.0%} of the units are "
        f"in equilibrium (criterion: {event.criterion}): {figures}."
    )
    if event.criterion == "budget":
        text = (
            f"{PREFIX} global step {event.global_step}: the last phase of the budget "
            f"starts ({event.fraction:.0%} of the units in equilibrium)."
        )
    if event.new_lrs:
        pairs = zip(event.old_lrs, event.new_lrs, strict=True)
        lrs = ", ".join(f"{old:.3g} -> {new:.3g}" for old, new in pairs)
        count = f", decay #{decays}" if decays is not None else ""
        text += f" Learning rate decayed ({lrs}){count}; cooldown {event.cooldown} steps."
    elif event.note:
        text += f" No decay: {event.note}."
    elif event.action == "none":
        text += " No decay: min_lr or max_decays reached."
    elif event.action == "stop":
        text += " Asking the Trainer to stop."
    return text


def _format_prediction(value: float | None) -> str:
    return "no prediction" if value is None else f"{value:.3g} predicted"


def plugin_not_used(switch: str) -> str:
    """The environment switch is on, but the Trainer has its own callback."""
    return (
        f"{PREFIX} {switch} is set but the Trainer already has a SphericalDynamicsCallback; the "
        "plugin's callback is not used."
    )


def ranks_out_of_step(rank: int, what: str, timeout_s: float, cause: str) -> str:
    """A reduction of the monitor did not complete across ranks: monitoring stops there."""
    return (
        f"{PREFIX} rank {rank}: the monitor's reduction at {what} did not complete across ranks "
        f"(a wait is bounded by sync_timeout={timeout_s:g} s; {cause}). The ranks disagree on "
        "the number of optimizer steps (does a rank skip `optimizer.step()`, e.g. in manual "
        "optimization?), or one of them is stuck. Monitoring stops on this rank; training goes "
        "on. Every rank must step its optimizers equally often; a longer `sync_timeout` helps if "
        "a rank is only slow."
    )


def alerts_without_wandb() -> str:
    """``alerts=True`` without a W&B logger."""
    return (
        "SphericalDynamicsCallback(alerts=True): the Trainer has no WandbLogger, so no alert "
        "will be sent (equilibrium events are still printed and logged)."
    )


def alert_title(event: EquilibriumEvent, stopped: bool) -> str:
    """The title of a W&B alert: what happened, so that a list of alerts reads at a glance.

    The planned final decay of :class:`~lightning_sdm.actions.DecayLR` (``criterion="budget"``)
    is no equilibrium; a stop (by the action or a user callable) and an LR decay say so.

    Example::

        >>> event = EquilibriumEvent(300, ("w",), 1.0, {"w": 0.0101}, {"w": 0.01}, "theory")
        >>> alert_title(event, stopped=False)
        'lightning_sdm: equilibrium reached (100% of the units)'
        >>> from dataclasses import replace
        >>> alert_title(replace(event, criterion="budget", old_lrs=(0.1,), new_lrs=(0.01,)), False)
        'lightning_sdm: planned end-of-budget LR decay'
        >>> alert_title(replace(event, action="stop"), stopped=True)
        'lightning_sdm: equilibrium reached, training stopped'
    """
    decayed = event.new_lrs != event.old_lrs
    if event.criterion == "budget":
        what = "planned end-of-budget LR decay" if decayed else "end of budget, no LR decay"
    elif stopped:
        what = "equilibrium reached, training stopped"
    elif decayed:
        what = "equilibrium reached, LR decayed"
    elif event.action == "none" or event.note:
        what = "equilibrium reached, no LR decay"
    else:
        what = f"equilibrium reached ({event.fraction:.0%} of the units)"
    return f"lightning_sdm: {what}"


def wandb_unit_chart_title(unit: str) -> str:
    """The W&B chart of one unit's measured and predicted angular update."""
    return f"{unit}: angular update, measured vs predicted (rad/step)"


def wandb_ratio_chart_title(tolerance: float | None) -> str:
    """The W&B chart of every unit's ratio measured / predicted."""
    band = f", tolerance band 1 ± {tolerance:g}" if tolerance is not None else ""
    return f"angular update / prediction, every unit{band}"


def report_figure_caption(shown: int, total: int, global_step: int) -> str:
    """The caption of the report figure logged to W&B at the end of fit."""
    which = f"the first {shown} of {total} units" if shown < total else f"{total} units"
    return (
        f"lightning_sdm report at global step {global_step} ({which}; `lightning-sdm report` "
        "draws the same figure from the run's files)"
    )


def logger_extra_failed(what: str, error: Exception) -> str:
    """A logger extra (a TensorBoard layout, a W&B table, ...) failed: skipped, once."""
    return (
        f"SphericalDynamicsCallback: the {what} failed and was skipped "
        f"({type(error).__name__}: {error}). The scalars are still logged and training continues."
    )


def logger_failed(logger: str, global_step: int, error: Exception) -> str:
    """A logger raised when the monitor's scalars were written to it."""
    return (
        f"SphericalDynamicsCallback: {logger}.log_metrics failed at global step {global_step} "
        f"({type(error).__name__}: {error}); the sdm/ scalars of the windows it refuses are "
        "missing from that logger (it is tried again at each window, and not reported again). "
        "`history` keeps every window, the other loggers get them, and training continues."
    )


def unreadable_state(checkpoint: str | None, error: Exception) -> str:
    """The callback's state inside a checkpoint cannot be read."""
    where = f"the checkpoint {checkpoint!r}" if checkpoint else "the checkpoint"
    return (
        f"SphericalDynamicsCallback cannot read its state in {where} ({type(error).__name__}: "
        f"{error}): it is damaged or was written by an incompatible version of lightning_sdm. "
        "Nothing of it was applied. To resume the rest, delete the callback's entry from the "
        "checkpoint's 'callbacks' (its key starts with 'SphericalDynamicsCallback'), or resume "
        "with the version that wrote it."
    )


def checkpoint_units_missing(missing: Sequence[str], model: str) -> str:
    """The units restored from a checkpoint name parameters the model does not have."""
    shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
    return (
        f"SphericalDynamicsCallback: the checkpoint's units name parameters {model} does not "
        f"have ({shown}); the units of this model are found again, and the checkpoint's "
        "step counters and detector evidence are not used."
    )


def lr_above_sampled_peak(group: tuple[int, int], lr: float) -> str:
    """CorrectedWeightDecay saw an LR above the schedule's sampled peak."""
    return (
        f"CorrectedWeightDecay: the LR of optimizer {group[0]} group {group[1]} rose to {lr:g}, "
        "above the schedule's sampled peak; lr_max follows it now (until then the weight decay "
        "was corrected against a lower peak). Schedulers the Trainer does not step (manual "
        "optimization) cannot be sampled ahead."
    )


# ---------------------------------------------------------------------- under Fabric

FABRIC_PREFIX = f"{PREFIX} Fabric:"


def fabric_warn_only(on_equilibrium: object) -> str:
    """Fabric leaves the loop and the schedule to the user: events are warnings only."""
    return (
        f"{FABRIC_PREFIX} on_equilibrium={on_equilibrium!r} needs a Trainer; under Fabric the "
        "loop and the LR schedule are yours, so an equilibrium event is a warning only."
    )


def fabric_not_traced() -> str:
    """An optimizer stepped before its model's training forward was seen."""
    return (
        f"{FABRIC_PREFIX} an optimizer stepped before a training forward of its model was "
        "seen: call the module that fabric.setup returned (in train mode), or "
        'fabric.call("sdm_attach", model, example=x). Waiting for it.'
    )


def fabric_measuring(units: Sequence[str], optimizers: int, every: int, waiting: int) -> str:
    """What the plugin measures, once it started."""
    more = f"; {waiting} more unit(s) when their optimizer steps." if waiting else "."
    return (
        f"{FABRIC_PREFIX} measuring {', '.join(units)} at the steps of {optimizers} "
        f"optimizer(s), one window every {every} steps{more}"
    )


def fabric_stand_down(why: str) -> str:
    """The plugin stops for good (from inside a step)."""
    return f"{FABRIC_PREFIX} {why}; nothing more is measured."


def units_found(units: Sequence[str], method: str, rejected: Mapping[str, int]) -> str:
    """One line for what the trace found (``report.summary()`` has the full list).

    Example::

        >>> print(units_found(["a.weight", "b.weight"], "trace", {"reaches the loss": 1}))
        [lightning_sdm] 2 scale-invariant units (trace): a.weight, b.weight; 1 other parameter not monitored (1 reaches the loss); callback.report.summary() lists them.
    """  # noqa: E501
    shown = ", ".join(units[:4]) + (f" and {len(units) - 4} more" if len(units) > 4 else "")
    line = f"{PREFIX} {len(units)} scale-invariant unit{'s' * (len(units) != 1)} ({method})"
    line += f": {shown}" if units else ""
    total = sum(rejected.values())
    if total:
        kinds = ", ".join(f"{n} {kind}" for kind, n in rejected.items())
        line += (
            f"; {total} other parameter{'s' * (total != 1)} not monitored ({kinds}); "
            "callback.report.summary() lists them"
        )
    return line + "."


def predicted(
    groups: Sequence[tuple[str, float | tuple[float, float] | None, float | None]],
) -> str:
    """What theory predicts, one line: per param group ``(label, angle, relaxation steps)``.

    ``angle``: a value, or ``(lowest, highest)`` over the group's matrix shapes (Muon).

    Example::

        >>> print(predicted([("SGD group 0", 0.0229416, 52.6)]))
        [lightning_sdm] predicted equilibrium: SGD group 0: 0.02294 rad/step, reached in a few times 53 steps; callback.advice.table() has every phase of the schedule.
        >>> print(predicted([("Adafactor group 0", 0.01, 1.0)]))  # relative steps, at step 1
        [lightning_sdm] predicted equilibrium: Adafactor group 0: 0.01 rad/step, reached within a few steps; callback.advice.table() has every phase of the schedule.
        >>> print(predicted([("Muon group 0", (0.0115, 0.01231), None)]))
        [lightning_sdm] predicted equilibrium: Muon group 0: 0.0115-0.01231 rad/step (by matrix shape); callback.advice.table() has every phase of the schedule.
    """  # noqa: E501
    parts = []
    for label, angle, tau in groups:
        if isinstance(angle, tuple):
            value = f"{angle[0]:.4g}-{angle[1]:.4g} rad/step (by matrix shape)"
        else:
            value = "no prediction" if angle is None else f"{angle:.4g} rad/step"
        within = "" if tau is None else f", reached in a few times {tau:,.0f} steps"
        if tau is not None and tau < 2:  # Adafactor's relative steps at step 1: M = 1
            within = ", reached within a few steps"
        parts.append(f"{label}: {value}{within}")
    return (
        f"{PREFIX} predicted equilibrium: {'; '.join(parts)}; callback.advice.table() has every "
        "phase of the schedule."
    )


def fit_summary(
    rows: Sequence[tuple[str, float, float, float, int, bool]], fraction: float, global_step: int
) -> str:
    """The end-of-fit table: per unit ``(name, measured, predicted, ratio, step, in equilibrium)``.

    ``step``: when the unit last entered equilibrium (-1: never); NaN where there is no value.
    A unit that left equilibrium before the end says so (``lightning-sdm report`` gives the
    first step instead, and says the same).

    Example::

        >>> nan = float("nan")
        >>> print(fit_summary([("net.0.weight", 0.0231, 0.0229, 1.0087, 240, True),
        ...                    ("net.3.weight", 0.031, 0.0229, 1.35, 180, False),
        ...                    ("net.6.weight", 0.05, nan, nan, -1, False)], 1 / 3, 660))
        [lightning_sdm] end of fit at global step 660: 33% of the units in equilibrium
          unit          rad/step  predicted  ratio  equilibrium
          net.0.weight  0.0231    0.0229     1.01   since step 240
          net.3.weight  0.031     0.0229     1.35   left it (entered at step 180)
          net.6.weight  0.05      -          -      not reached
    """

    def number(value: float, digits: str) -> str:
        return format(value, digits) if math.isfinite(value) else "-"

    table = [("unit", "rad/step", "predicted", "ratio", "equilibrium")]
    for name, measured, theory, ratio, step, now in rows:
        if step < 0:
            reached = "not reached"
        else:
            reached = f"since step {step}" if now else f"left it (entered at step {step})"
        table.append(
            (name, number(measured, ".3g"), number(theory, ".3g"), number(ratio, ".2f"), reached)
        )
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = [
        f"{PREFIX} end of fit at global step {global_step}: {fraction:.0%} of the units in "
        "equilibrium"
    ]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  " + "  ".join([*cells, row[4]]))
    return "\n".join(lines)


def bad_log_level(value: object, levels: Sequence[str]) -> str:
    """An unknown ``log_level``."""
    return (
        f"`log_level` must be one of {', '.join(map(repr, levels))}, got {value!r}: 'summary' "
        "logs the per-unit angular update, prediction, ratio, weight norm, equilibrium flag and "
        "regime; 'detailed' adds the number of units per regime."
    )


def patience_too_short(patience: int) -> str:
    """``patience`` below 2: why the detector needs two windows (not EarlyStopping's meaning)."""
    return (
        f"`patience` must be an integer >= 2, got {patience}: it counts the windows of evidence "
        "before a unit gets a verdict (not EarlyStopping's checks without improvement), and a "
        "verdict rests on the trend of the weight norm and of the ratio over them, which one "
        "window cannot give. For an early verdict use patience=2 with a small `every_n_steps`."
    )


def lr_motion(how: str, percent: float | None, factor: float | None) -> str:
    """How fast the prediction's LR moves now, per relaxation time (the detector's notes)."""
    if how == "still":
        return "the LR stands still now"
    if factor is not None:
        return f"the LR {how} by a factor of {factor:.3g} per relaxation time"
    return f"the LR {how} by {percent:.0%} per relaxation time"


def lag_note(how: str, every: float, tau: float, ratio: float, steady: float | None) -> str:
    """``lagging``: the prediction moves faster than the weights follow (the detector's note)."""
    text = (
        f"the predicted angle {how} every {every:.0f} steps, the weights need {tau:.0f} to "
        f"follow: ratio {ratio:.2f}"
    )
    if steady is None:
        return text + " (faster than the weights can follow at all)"
    return text + f" (at this rate held steady, the lag model puts the ratio at {steady:.2f})"


def lag_against_schedule(ratio: float, measured: float, motion: str) -> str:
    """``tracking`` off the static prediction on the side the schedule does not lag to."""
    side = "above" if measured > 1 else "below"
    return (
        f"at {ratio:.3f} of the predicted trajectory, {measured:.2f} of the static prediction: "
        f"{side} it while {motion}, a lag the schedule does not give: not in equilibrium (the "
        "update size moved the equilibrium norm; the weights relax along their trajectory)"
    )


def window_clamped(window: int, every_n_steps: int) -> str:
    """A window longer than the interval it closes: every step of the interval is measured."""
    return (
        f"{PREFIX} window={window} is longer than every_n_steps={every_n_steps}: a window is "
        f"the last steps of its interval, so every step is measured (window={every_n_steps})."
    )


def partial_placement(where: str, placements: str) -> str:
    """A DTensor whose local values are partial sums: no statistic of it can be taken locally."""
    return (
        f"{where} is a DTensor with placements {placements}: a Partial placement holds partial "
        "sums, whose squares do not add up to the tensor's. Angular updates need each element's "
        "value on some rank: keep the parameter Shard(d) or Replicate() (as tensor parallelism "
        "and FSDP2 do), or `redistribute` it before measuring."
    )


STEP_COUNTS_DIFFER = "the ranks held the statistics of different numbers of steps in the window"


# -------------------------------------------------------------------------- advice (before step 1)


def whole_units_under_channel(units: Sequence[str], shown: int = 4) -> str:
    """``granularity="channel"``: units invariant only as a whole are measured as a whole.

    Example::

        >>> print(whole_units_under_channel(["net.0.weight"]))
        [lightning_sdm] granularity="channel": net.0.weight are invariant only as a whole (a LayerNorm or RMSNorm normalizes across their channels; a QK-norm per head): measured per unit, without the /mean, /std, ... channel summaries.
    """  # noqa: E501
    more = f" and {len(units) - shown} more" if len(units) > shown else ""
    return (
        f'{PREFIX} granularity="channel": {", ".join(units[:shown])}{more} are invariant only '
        "as a whole (a LayerNorm or RMSNorm normalizes across their channels; a QK-norm per "
        "head): measured per unit, without the /mean, /std, ... channel summaries."
    )


def audit_decay_lost_to_rounding(
    lost: Sequence[tuple[str, float, str, float]], shown: int = 4
) -> str:
    """Decoupled weight decay below the resolution of the weights' dtype.

    ``lost``: ``(weight, lr * wd, dtype name, the dtype's half epsilon)`` per weight.

    Example::

        >>> print(audit_decay_lost_to_rounding([("net.0.weight", 1e-3, "bfloat16", 0.00390625)]))
        weight decay lost to rounding: net.0.weight (lr*wd = 0.001 per step, bfloat16 weights, which resolve relative changes down to 0.0039). w * (1 - lr*wd) rounds back to w for some or all of their elements, so they are not decayed as set: their norm is not held where the prediction and the radial balance assume it. Keep the weights in float32 (Lightning: precision="bf16-mixed", not "bf16-true"), or raise lr*wd to at least 0.0039.
    """  # noqa: E501
    names = [name for name, _, _, _ in lost]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    decays = sorted({decay for _, decay, _, _ in lost})
    dtypes = sorted({dtype for _, _, dtype, _ in lost})
    floor = max(half_eps for _, _, _, half_eps in lost)
    decay_text = f"{decays[0]:.3g}" if len(decays) == 1 else f"{decays[0]:.3g} to {decays[-1]:.3g}"
    return (
        f"weight decay lost to rounding: {', '.join(names[:shown])}{more} (lr*wd = {decay_text} "
        f"per step, {'/'.join(dtypes)} weights, which resolve relative changes down to "
        f"{floor:.2g}). w * (1 - lr*wd) rounds back to w for some or all of their elements, so "
        "they are not decayed as set: their norm is not held where the prediction and the "
        "radial balance assume it. "
        'Keep the weights in float32 (Lightning: precision="bf16-mixed", not "bf16-true"), or '
        f"raise lr*wd to at least {floor:.2g}."
    )


def audit_split_unit(units: Sequence[str], undecayed: Sequence[str], shown: int = 4) -> str:
    """Units whose parameters sit in different param groups; ``undecayed``: those without decay.

    One message for both: a unit's bias in the usual no-decay group splits the unit, and the
    unit is decayed in part (through its weight), not left without an equilibrium.

    Example::

        >>> print(audit_split_unit(["0.weight", "3.weight"], ["0.bias", "3.bias"]))
        units whose weight and bias sit in different param groups: 0.weight, 3.weight. Their parts 0.bias, 3.bias sit in a group without weight decay (the usual 'no decay on biases' recipe): in front of a normalization a bias is part of the scale-invariant unit, which is then decayed through its weight only. They are monitored with the prediction of the weight's group (lr, weight decay): close when the bias is small or its gradient is 0 (a bias right before a BatchNorm), approximate otherwise. Put each unit in one group, or build its layer without a bias (bias=False: the normalization's shift does its work), for a prediction that holds as it is.
    """  # noqa: E501

    def listing(names: Sequence[str]) -> str:
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    text = f"units whose weight and bias sit in different param groups: {listing(units)}."
    if undecayed:
        text += (
            f" Their parts {listing(undecayed)} sit in a group without weight decay (the usual "
            "'no decay on biases' recipe): in front of a normalization a bias is part of the "
            "scale-invariant unit, which is then decayed through its weight only."
        )
    return text + (
        " They are monitored with the prediction of the weight's group (lr, weight decay): "
        "close when the bias is small or its gradient is 0 (a bias right before a BatchNorm), "
        "approximate otherwise. Put each unit in one group"
        + (
            ", or build its layer without a bias (bias=False: the normalization's shift does its "
            "work),"
            if undecayed
            else ""
        )
        + " for a prediction that holds as it is."
    )


def percent(fraction: float) -> str:
    """A fraction as a percentage with three significant digits: a tolerance of 1e-12 is not 0%.

    Example::

        >>> [percent(f) for f in (0.1, 0.05, 0.125, 1 / 3, 1e-12)]
        ['10%', '5%', '12.5%', '33.3%', '1e-10%']
    """
    return f"{fraction * 100:.3g}%"


def _near_one(ratio: float) -> str:
    """A ratio with the digits that show its distance to 1.

    Two significant digits, more where that would round it to 1 (beyond a small tolerance).

    Example::

        >>> _near_one(0.41), _near_one(0.9995), _near_one(1 + 3e-9)
        ('0.41', '0.9995', '1.000000003')
    """
    gap = abs(ratio - 1)
    digits = 2 if gap <= 0 or gap >= 0.05 else 2 + math.ceil(-math.log10(gap))
    return f"{ratio:.{min(digits, 15)}g}"


def advice_bad_total_steps(value: object) -> str:
    """``advise(total_steps=...)`` is not a budget: what it must be, and the fix.

    Example::

        >>> print(advice_bad_total_steps(0))
        `total_steps` must be a positive integer (the optimizer steps in the budget) or None when the budget is unknown, got 0: a budget of no steps has nothing to advise on. Pass the steps the optimizer will take (Lightning: trainer.estimated_stepping_batches), or None.
    """  # noqa: E501
    return (
        "`total_steps` must be a positive integer (the optimizer steps in the budget) or None "
        f"when the budget is unknown, got {value!r:.40}"
        + (
            ": a budget of no steps has nothing to advise on"
            if isinstance(value, int) and not isinstance(value, bool) and value == 0
            else ""
        )
        + ". Pass the steps the optimizer will take (Lightning: "
        "trainer.estimated_stepping_batches), or None."
    )


def advice_unknown_budget(shown: int, steps_per_epoch: int | None = None) -> str:
    """The advice's note when the budget (``max_steps``, epochs) is unknown.

    Example::

        >>> print(advice_unknown_budget(20_000, 100))
        the budget is unknown (no max_steps, no epoch limit, or batches of unknown number): the schedule is shown over its first 20,000 steps (200.0 epochs) as sampled ahead, the last phase may go on past them, and nothing is said about the end of the run.
    """  # noqa: E501
    epochs = f" ({shown / steps_per_epoch:.1f} epochs)" if steps_per_epoch else ""
    return (
        "the budget is unknown (no max_steps, no epoch limit, or batches of unknown number): the "
        f"schedule is shown over its first {shown:,} steps{epochs} as sampled ahead, the last "
        "phase may go on past them, and nothing is said about the end of the run."
    )


def advice_manual_optimization(
    budget: int | None, shared_max_steps: int | None = None, optimizers: int = 1
) -> str:
    """The advice's note under manual optimization: the step rates it assumes.

    ``shared_max_steps``: Lightning's ``max_steps`` where it ends the run and counts the steps
    of all ``optimizers`` together (the global step): one that steps less often leaves the
    others more of it.

    Example::

        >>> print(advice_manual_optimization(400))
        manual optimization: training_step decides how often each optimizer and each scheduler steps, unknown before step 1. This advice assumes that each optimizer steps once per batch (400 steps each) and each scheduler as its configuration says; an optimizer that steps every k batches (a GAN's second network, accumulation by hand) takes 1/k of those steps and reaches each phase k times later.
        >>> print(advice_manual_optimization(31, 61, 2))
        manual optimization: training_step decides how often each optimizer and each scheduler steps, unknown before step 1. This advice assumes that each optimizer steps once per batch (31 steps each) and each scheduler as its configuration says. max_steps=61 counts the steps of all 2 optimizers together (Lightning's global step): an optimizer that steps every k batches leaves the others more of it. With r_i steps per batch, optimizer i takes about 61 * r_i / sum(r) steps: one every batch and one every 2nd batch take 41 and 21.
    """  # noqa: E501
    each = f" ({budget:,} steps each)" if budget is not None else ""
    text = (
        "manual optimization: training_step decides how often each optimizer and each scheduler "
        "steps, unknown before step 1. This advice assumes that each optimizer steps once per "
        f"batch{each} and each scheduler as its configuration says"
    )
    if shared_max_steps is None or optimizers < 2:
        return text + (
            "; an optimizer that steps every k batches (a GAN's second network, accumulation by "
            "hand) takes 1/k of those steps and reaches each phase k times later."
        )
    m = shared_max_steps
    example = (
        f": one every batch and one every 2nd batch take {math.ceil(m * 2 / 3):,} and "
        f"{math.ceil(m / 3):,}"
        if optimizers == 2
        else ""
    )
    return text + (
        f". max_steps={m:,} counts the steps of all {optimizers} optimizers together "
        "(Lightning's global step): an optimizer that steps every k batches leaves the others "
        f"more of it. With r_i steps per batch, optimizer i takes about {m:,} * r_i / sum(r) "
        f"steps{example}."
    )


def advice_bad_shapes(value: object) -> str:
    """``advise(shapes=...)`` is not a map of unit names to shapes."""
    return (
        "`shapes` must map each unit's name to the shape of its weight (a tuple of integers, "
        f"e.g. {{'blocks.0.attn.q_proj.weight': (64, 64)}}), got {value!r:.80}."
    )


def advice_by_shape(shapes: Sequence[tuple[tuple[int, int], float | None, Sequence[str]]]) -> str:
    """The equilibrium per matrix shape, where it depends on the shape (Muon's, at the peak LR).

    Example::

        >>> print(advice_by_shape([((64, 64), 0.01279, ["q", "k"]), ((64, 256), 0.01103, ["up"])]))
          per matrix shape (Muon's equilibrium depends on its aspect ratio): 64x64: 0.01279 rad/step (q, k); 64x256: 0.01103 rad/step (up)
    """  # noqa: E501

    def units(names: Sequence[str]) -> str:
        return ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")

    parts = [
        f"{rows}x{cols}: "
        + ("no prediction" if value is None else f"{value:.4g} rad/step")
        + f" ({units(names)})"
        for (rows, cols), value, names in shapes
    ]
    return "  per matrix shape (Muon's equilibrium depends on its aspect ratio): " + "; ".join(
        parts
    )


def advice_settles_header(near: float) -> str:
    """The advice table's column: whether the angle gets within ``near`` after a jump, in time.

    Example::

        >>> advice_settles_header(0.05)
        're-equilibrates (within 5%)'
    """
    return f"re-equilibrates (within {percent(near)})"


def advice_within_header(tolerance: float) -> str:
    """The advice table's column: when the norm balance puts the angle within tolerance."""
    return f"within {percent(tolerance)} (norm balance)"


def advice_within_cell(
    within: int | None, leaves: int | None, off: tuple[int | None, int | None], factor: float
) -> str:
    """One phase's cell: from which step the angle is within tolerance, and for how long.

    ``within``/``leaves``: from the reference start (the initial norm at the equilibrium of the
    first phase's peak LR); ``off``: the first step within it from a start ``factor`` x above and
    below (shown where they differ from ``within``).

    Example::

        >>> advice_within_cell(0, 80_000, (1_640, 3_530), 3.0)
        'from 0, lags from 80,000 (3x above: from 1,640; below: from 3,530)'
        >>> advice_within_cell(145, 1_286, (17, None), 3.0)
        'from 145, lags from 1,286 (3x above: from 17; below: not in this phase)'
        >>> advice_within_cell(None, None, (None, None), 3.0)
        'not in this phase'
    """

    def when(step: int | None) -> str:
        return "not in this phase" if step is None else f"from {step:,}"

    text = when(within)
    if within is not None and leaves is not None:
        text += f", lags from {leaves:,}"
    above, below = off
    if (above, below) != (within, within):
        text += f" ({factor:g}x above: {when(above)}; below: {when(below)})"
    return text


def advice_start_line(
    factor: float, tolerance: float, off: tuple[int | None, int | None], tau: float | None
) -> str:
    """How the first phase's catch-up depends on where the initial norm starts.

    Example::

        >>> print(advice_start_line(3.0, 0.1, (1_640, 3_530), 1_000.0))
          from initialisation: the update size is unknown before step 1, so the start is stated: a first angle 3x above its equilibrium at the first phase's peak LR gets within 10% from step 1,640 (1.6 tau), 3x below from step 3,530 (3.5 tau); table: from the initial norm at that equilibrium. From the first measured window on, each unit's predicted trajectory starts from its measured angle and norm (sdm/angular_update_trajectory/<unit>, what the detector's 'tracking' compares with): this stated start is for planning only.
    """  # noqa: E501

    def when(step: int | None) -> str:
        if step is None:
            return "not in the first phase"
        return f"from step {step:,}" + (f" ({step / tau:.2g} tau)" if tau else "")

    above, below = off
    return (
        "  from initialisation: the update size is unknown before step 1, so the start is "
        f"stated: a first angle {factor:g}x above its equilibrium at the first phase's peak LR "
        f"gets within {percent(tolerance)} {when(above)}, {factor:g}x below {when(below)}; table: "
        "from the initial norm at that equilibrium. From the first measured window on, each "
        "unit's predicted trajectory starts from its measured angle and norm "
        f"({Keys.TRAJECTORY}<unit>, what the detector's 'tracking' compares with): this stated "
        "start is for planning only."
    )


def advice_lag_model(within: int | None, leaves: int | None, tolerance: float) -> str:
    """After the rule of thumb for a falling LR, where the norm balance puts the lag.

    ``within``/``leaves``: the phase's steps within tolerance and beyond it again (``within``
    ``None``: never within, or no model; nothing to add).

    Example::

        >>> advice_lag_model(1_565, 46_383, 0.1)
        ' The norm balance along this schedule puts the angle beyond 10% of its equilibrium from step 46,383.'
    """  # noqa: E501
    if within is None:
        return ""
    if leaves is None:
        band = percent(tolerance)
        return f" The norm balance along this schedule keeps the angle within {band}."
    return (
        f" The norm balance along this schedule puts the angle beyond {percent(tolerance)} of its "
        f"equilibrium from step {leaves:,}."
    )


def advice_expected_ratios(ratios: Sequence[float | None]) -> str:
    """The trajectory's angle over the equilibrium at each phase's last step, one line."""
    return (
        "  expected angle / equilibrium at each phase's end (the norm balance along this "
        "schedule, from the initial norm at the equilibrium): "
        + ", ".join("n/a" if r is None else f"{r:.2g}" for r in ratios)
    )


def advice_lagging_at_end(
    units: Sequence[str],
    step: int,
    lr: float,
    ratio: float,
    spread: tuple[float, float],
    tolerance: float,
    catch_up: float | None,
    tau: float | None,
    tail: bool,
    factor: float,
) -> str:
    """The units whose angle the norm balance leaves beyond tolerance at the end of the budget.

    Example::

        >>> print(advice_lagging_at_end(["a", "b"], 449_999, 1e-3, 0.41, (0.40, 0.42), 0.1,
        ...                             2.4e6, 2.5e5, False, 3.0))
        at the end of the budget (step 449,999, lr 0.001) the angular update of 2 units (a, b) is expected at 0.41x its equilibrium at that LR (0.4 to 0.42 from a start 3x off), beyond the 10% tolerance: they will still be lagging. At this LR they need 2,400,000 more steps (9.6 tau) to get within 10%.
    """  # noqa: E501
    shown = ", ".join(units[:5]) + (f", ... ({len(units) - 5} more)" if len(units) > 5 else "")
    count = f"{len(units)} unit{'s' if len(units) != 1 else ''}"
    low, high = (_near_one(value) for value in spread)
    off = "" if low == high else f" ({low} to {high} from a start {factor:g}x off)"
    way = "lagging" if ratio < 1 else "ahead of it (the LR rose faster than the norm follows)"
    text = (
        f"at the end of the budget (step {step:,}, lr {lr:.3g}) the angular update of {count} "
        f"({shown}) is expected at {_near_one(ratio)}x its equilibrium at that "
        f"LR{off}, beyond the "
        f"{percent(tolerance)} tolerance: they will still be {way}."
    )
    if catch_up is not None and not tail:  # an annealing LR is not meant to be waited out
        times = f" ({catch_up / tau:.2g} tau)" if tau else ""
        text += f" At this LR they need {catch_up:,.0f} more steps{times} to get within "
        text += f"{percent(tolerance)}."
    if tail:
        text += " The schedule anneals (below 1% of its peak LR): this lag is what it intends."
    return text
