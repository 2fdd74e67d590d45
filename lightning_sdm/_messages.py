"""The texts the callback shows users, in one place (each is shown once per run)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lightning_sdm.theory import Prediction

PREFIX = "[lightning_sdm]"


def no_units_found(model: str) -> str:
    """The model has no scale-invariant weight: nothing will be measured."""
    return (
        f"SphericalDynamicsCallback found no scale-invariant weights in {model} (no weight "
        "reaches a BatchNorm/GroupNorm/LayerNorm/InstanceNorm through positively homogeneous "
        "operations only). Nothing will be measured; pass `params=[...]` to monitor weights "
        "explicitly."
    )


def skipped_units(skipped: Mapping[str, str]) -> str:
    """Units no optimizer updates."""
    listing = ", ".join(f"{name} ({why})" for name, why in skipped.items())
    return f"SphericalDynamicsCallback does not monitor: {listing}."


def missing_predictions(predictions: Mapping[str, Prediction]) -> dict[str, str]:
    """Per distinct reason: the units without a prediction and why (key -> message)."""
    reasons: dict[str, list[str]] = {}
    for name, prediction in predictions.items():
        if prediction.angular_update is None:
            reasons.setdefault(prediction.reason, []).append(name)
    return {
        f"no_prediction:{reason}": (
            f"SphericalDynamicsCallback has no predicted equilibrium for {', '.join(names)}: "
            f"{reason}. Measured angular updates are still logged; equilibrium is then judged "
            "by stationarity alone."
        )
        for reason, names in reasons.items()
    }


def not_orthogonal(name: str, cosine: float, tolerance: float) -> str:
    """A monitored unit failed the gradient-orthogonality cross-check."""
    return (
        f"SphericalDynamicsCallback: {name} is monitored but its gradient is not orthogonal to "
        f"it (|cos(w, grad)| = {cosine:.2e} > {tolerance:g}), so it is probably not "
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
