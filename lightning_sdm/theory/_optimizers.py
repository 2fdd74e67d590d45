"""Recognising an optimizer: its class, its formula family and its hyper-parameters.

The one place that decides which optimizer a param group belongs to. :mod:`lightning_sdm.theory`
picks its formula from :func:`recognise`, and everything that depends on the kind of dynamics (the
relaxation time, SMD's rescaling, the optimizer state moved along with it) reads the ``family``
of the resulting :class:`~lightning_sdm.theory.Prediction`, never the class again.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_sdm.theory._muon import DEFAULT_NS

__all__ = [
    "Family",
    "check_optimizers",
    "family_of",
    "has_param_groups",
    "recognise",
    "unwrap",
]

#: The kind of dynamics: ``"sgd"`` (steps proportional to the gradient: SGD, momentum, Nesterov),
#: ``"adam"`` (steps normalised per element: Adam, AdamW, RAdam, NAdam), ``"lion"`` (sign steps),
#: ``"muon"`` (orthogonalised momentum of a whole matrix), ``"adafactor"`` (factored second
#: moment, steps relative to the weight's RMS).
Family = Literal["sgd", "adam", "lion", "muon", "adafactor"]

# LightningOptimizer (and similar wrappers) keep the real optimizer in `.optimizer`; a bound on the
# unwrapping depth guards against a wrapper that points to itself.
MAX_UNWRAP = 16


def unwrap(optimizer: Any) -> Any:
    """The innermost optimizer of wrappers that hold it in ``.optimizer`` (LightningOptimizer)."""
    for _ in range(MAX_UNWRAP):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def has_param_groups(obj: Any) -> bool:
    """Whether ``obj`` (unwrapped) holds param groups: a torch optimizer, a wrapper of one."""
    groups = getattr(unwrap(obj), "param_groups", None)
    return isinstance(groups, list) and all(isinstance(group, Mapping) for group in groups)


def check_optimizers(optimizers: Any) -> None:
    """``ValueError`` naming ``optimizers`` unless it is a list of optimizers (wrapped or not)."""
    if not isinstance(optimizers, Sequence) or not all(map(has_param_groups, optimizers)):
        raise ValueError(
            f"`optimizers` must be a list of torch.optim.Optimizer, got {optimizers!r:.80}."
        )


def _known_classes() -> list[tuple[str, type]]:
    # Most derived first: recent torch makes AdamW a subclass of Adam.
    return [
        ("AdamW", torch.optim.AdamW),
        ("Adam", torch.optim.Adam),
        ("RAdam", torch.optim.RAdam),
        ("NAdam", torch.optim.NAdam),
        ("SGD", torch.optim.SGD),
        # In torch >= 2.9 (Muon) and 2.5 (Adafactor); the package supports older torch.
        *[(name, getattr(torch.optim, name)) for name in _RECENT if hasattr(torch.optim, name)],
    ]


_RECENT = ("Muon", "Adafactor")


def _step_function(cls: type) -> Any:
    # torch wraps `step` in a profiling hook (sometimes by assigning it on a subclass): compare the
    # innermost functions.
    return inspect.unwrap(cls.step)  # type: ignore[attr-defined]


def recognise(optimizer: Any) -> tuple[str | None, str]:
    """(formula key or None or ``"overridden"``, class name) of an unwrapped optimizer.

    The formula key is one of ``"SGD"``, ``"Adam"``, ``"AdamW"``, ``"RAdam"``, ``"NAdam"``,
    ``"Muon"``, ``"Adafactor"``, ``"Lion"``; ``"overridden"`` for a subclass of a known optimizer
    that replaces its ``step``.
    """
    cls = type(optimizer)
    name = cls.__name__
    for family, known in _known_classes():
        if isinstance(optimizer, known):
            if _step_function(cls) is not _step_function(known):
                return "overridden", name
            return family, name
    if name == "Lion":
        return "Lion", name
    return None, name


def as_float(value: Any) -> float:
    """A hyper-parameter as a float (a one-element tensor is read; others give NaN)."""
    if isinstance(value, Tensor):
        return float(value.detach().reshape(-1)[0].item()) if value.numel() == 1 else float("nan")
    return float(value)


def read_hyperparameters(family: str, optimizer: Any, group: Mapping[str, Any]) -> dict[str, float]:
    """The hyper-parameters the formula of ``family`` needs, read from one param group.

    Raises:
        KeyError: a hyper-parameter the formula needs is missing (e.g. ``betas``).
        TypeError, ValueError: a value that cannot be read as a number.
    """
    hyper = {"lr": as_float(group["lr"]), "weight_decay": as_float(group.get("weight_decay", 0))}
    if family == "SGD":
        hyper["momentum"] = as_float(group.get("momentum", 0))
        hyper["dampening"] = as_float(group.get("dampening", 0))
        hyper["nesterov"] = float(bool(group.get("nesterov", False)))
        return hyper
    if family == "Muon":
        hyper["momentum"] = as_float(group["momentum"])
        hyper["nesterov"] = float(bool(group.get("nesterov", True)))
        coefficients, steps = group.get("ns_coefficients"), group.get("ns_steps")
        default = tuple(map(float, coefficients or ())) == DEFAULT_NS[0] and steps == DEFAULT_NS[1]
        hyper["default_newton_schulz"] = float(default)
        return hyper
    if family == "Adafactor":
        hyper["d"] = as_float(group.get("d", 1.0))
        hyper["eps2"] = as_float(group.get("eps2", 1e-3))
        hyper["memory_exponent"] = -as_float(group.get("beta2_decay", -0.8))  # 1-beta2 = step^-x
        hyper["step"] = _adafactor_step(optimizer, group)
        return hyper
    beta1, beta2 = group["betas"]
    hyper["beta1"], hyper["beta2"] = as_float(beta1), as_float(beta2)
    if family in ("Adam", "AdamW", "RAdam"):
        # AdamW (a subclass of Adam in recent torch) decouples by definition; Adam and RAdam do
        # when the group says so (torch >= 2.5 for Adam).
        default = family == "AdamW"
        hyper["decoupled_weight_decay"] = float(bool(group.get("decoupled_weight_decay", default)))
    if family == "Lion" and getattr(optimizer, "decoupled_wd", False):
        # lion-pytorch's `decoupled_weight_decay=True` divides wd by the initial lr:
        # p *= 1 - lr * wd / init_lr.
        hyper["weight_decay"] /= as_float(optimizer._init_lr)
    return hyper


def _adafactor_step(optimizer: Any, group: Mapping[str, Any]) -> float:
    """The step Adafactor takes next, from its first parameter's state (a CPU tensor: no sync)."""
    params = group["params"]
    state = getattr(optimizer, "state", {}).get(params[0], {}) if params else {}
    return as_float(state["step"]) + 1.0 if "step" in state else 1.0


def basic_hyperparameters(group: Mapping[str, Any]) -> dict[str, float]:
    """The lr and weight_decay where readable, for the record of an unknown optimizer."""
    hyper = {}
    for key in ("lr", "weight_decay"):
        try:
            hyper[key] = as_float(group[key])
        except (KeyError, TypeError, ValueError):
            continue
    return hyper


def invalid_reason(hyper: Mapping[str, float]) -> str | None:
    """Why these hyper-parameters admit no equilibrium (negative, non-finite, ...), or None."""
    for key, value in hyper.items():
        if not math.isfinite(value):
            return f"{key} = {value} is not finite: no equilibrium"
        if value < 0:
            return f"{key} = {value} is negative: no equilibrium"
    for key in ("momentum", "beta1", "beta2"):
        if hyper.get(key, 0.0) >= 1.0:
            return f"{key} = {hyper[key]} >= 1: no equilibrium"
    if hyper.get("dampening", 0.0) > 1.0:
        return f"dampening = {hyper['dampening']} > 1 reverses the updates: no equilibrium"
    return None


_FAMILIES: dict[str, Family] = {
    "SGD": "sgd",
    "Adam": "adam",
    "AdamW": "adam",
    "RAdam": "adam",
    "NAdam": "adam",
    "Lion": "lion",
    "Muon": "muon",
    "Adafactor": "adafactor",
}


def family_of(key: str | None) -> Family | None:
    """The family of a formula key from :func:`recognise` (``None``: unknown or overridden)."""
    return _FAMILIES.get(key or "")
