"""Parameter-group audit: weight-decay set-ups at odds with Spherical Motion Dynamics.

Checked once, before the first step, from the optimizers' param groups and the invariance report:

* ``invariant_without_decay``: scale-invariant weights in a group without weight decay. They
  have no equilibrium: their norm grows like ``sqrt(t)``, so their effective learning rate
  ``lr / |w|^2`` decays like ``1/t`` (Arora et al. 2019; SMD section 3) instead of settling.
  Not for Adafactor: its steps are relative to the weight, so it turns by ``rho_t`` per step
  whatever the norm (an equilibrium angle without decay, which the package predicts).
* ``decay_on_norm_affine``, ``decay_on_embedding``, ``decay_on_bias``: weight decay on
  normalisation gains and shifts, embedding tables or biases. Not an error, but these are not
  scale-invariant: decay only pulls them towards 0 (a frequent grouping bug, e.g. decaying
  BatchNorm's gamma).
* ``adam_coupled_l2``: ``torch.optim.Adam`` (or NAdam/RAdam without decoupling) with
  ``weight_decay > 0`` adds ``wd * w`` to the gradient before the adaptive scaling, so the
  decay of each weight depends on its gradient history and no prediction follows from the
  hyper-parameters alone; ``AdamW`` decouples it.
* ``decay_lost_to_rounding``: decoupled weight decay per step (``lr * wd``) under half the
  machine epsilon of the weights' dtype (bfloat16 weights, ``bf16-true``): ``w * (1 - lr wd)``
  rounds back to ``w``, so the decay does not happen and no equilibrium holds the norm.
* ``split_unit``: a unit's weight and the bias before its norm in groups of one optimizer with
  different hyper-parameters, the weight's decayed: monitored with the weight's group
  prediction (approximate). A bias in the usual no-decay group is said here, once: the unit is
  decayed through its weight, so it is not also an ``invariant_without_decay`` (kept for units
  whose weight has no decay, whatever their bias's group: they have no prediction). A unit
  split across optimizers is not monitored; the monitor says so with the fix, not the audit.

:func:`audit_param_groups` returns :class:`Finding` records; the callback prints each once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_sdm import _messages
from lightning_sdm.invariance import EMBEDDING_REASON, NORM_AFFINE_REASON, InvarianceReport
from lightning_sdm.theory._balance import decay_lost_to_rounding
from lightning_sdm.theory._optimizers import check_optimizers, family_of, recognise, unwrap
from lightning_sdm.theory._predictions import predict_param_group
from lightning_sdm.units import Unit

__all__ = ["Finding", "FindingKind", "audit_param_groups"]

FindingKind = Literal[
    "invariant_without_decay",
    "decay_on_norm_affine",
    "decay_on_embedding",
    "decay_on_bias",
    "adam_coupled_l2",
    "split_unit",
    "decay_lost_to_rounding",
]

# Names shown per finding before "and N more".
_SHOWN = 4


@dataclass(frozen=True)
class Finding:
    """One audit finding: what, for which parameters, and what to do."""

    kind: FindingKind
    params: tuple[str, ...]
    message: str


def audit_param_groups(
    module: nn.Module,
    optimizers: Sequence[Optimizer],
    units: Iterable[Unit],
    report: InvarianceReport | None = None,
) -> list[Finding]:
    """Findings about the param groups of ``optimizers`` (empty when nothing is wrong).

    Args:
        module: the model (parameter names are taken from it).
        optimizers: its optimizers.
        units: the scale-invariant units (monitored or found).
        report: the invariance report, to recognise norm affine parameters and embeddings.
            Without one (units restored from a checkpoint are not traced again) they are
            recognised by the module that owns them: PyTorch's normalisation layers, a module
            whose class name ends in ``Norm`` (hand-written RMSNorm), embeddings.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_sdm.invariance import find_scale_invariant_units
        >>> net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> report = find_scale_invariant_units(net, torch.randn(16, 4))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=1e-4)
        >>> [f.kind for f in audit_param_groups(net, [opt], report.units, report)]
        ['decay_on_norm_affine', 'decay_on_bias']
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
    check_optimizers(optimizers)
    if isinstance(units, (str, Unit)) or not isinstance(units, Iterable):
        raise ValueError(f"`units` must be a list of lightning_sdm.Unit, got {units!r:.80}.")
    unit_list = list(units)
    if not all(isinstance(unit, Unit) for unit in unit_list):
        raise ValueError(f"`units` must hold lightning_sdm.Unit objects, got {unit_list!r:.80}.")
    names = {id(p): name for name, p in module.named_parameters()}
    in_units = {name for unit in unit_list for name in unit.params}
    # The report's roles, and the owning module's where it has one: a hand-written RMSNorm's
    # gain is 'other' to the tracer (it multiplies after the normalisation) but a norm gain.
    roles = {**(_roles(report) if report is not None else {}), **_structural_roles(module)}
    found: dict[FindingKind, list[str]] = {}
    coupled: list[str] = []
    group_of: dict[str, tuple[int, int, float]] = {}
    lost: list[tuple[str, float, str, float]] = []  # (weight, lr * wd, dtype, half its eps)
    for opt_index, optimizer in enumerate(optimizers):
        optimizer = unwrap(optimizer)
        # Adafactor's steps are relative to the weight: without decay its angle still settles.
        relative = family_of(recognise(optimizer)[0]) == "adafactor"
        for group_index, group in enumerate(optimizer.param_groups):
            wd = float(group.get("weight_decay", 0.0) or 0.0)
            for param in group["params"]:
                name = names.get(id(param))
                if name is None:
                    continue
                group_of[name] = (opt_index, group_index, wd)
                kind = _kind(name, wd, in_units, roles)
                if kind == "invariant_without_decay" and relative:
                    kind = None
                if kind is not None:
                    found.setdefault(kind, []).append(name)
            if wd > 0:
                lost.extend(_lost_decay(optimizer, group, names, in_units))
            if wd > 0 and _couples_l2(optimizer, group):
                coupled.extend(names[id(p)] for p in group["params"] if id(p) in names)
    # A unit whose parts sit in different optimizers is not monitored at all: the monitor
    # says so with the fix (SPLIT_ACROSS_OPTIMIZERS); a split_unit or no-decay finding about
    # the same unit would contradict it.
    apart = {
        name for unit in unit_list if _optimizers_of(unit, group_of) > 1 for name in unit.params
    }
    # Split within one optimizer, it is monitored with its weight's group's prediction: that
    # holds approximately when the weight is decayed. A weight without decay has no
    # prediction, whatever its bias's group: the unit is one without decay.
    split_units = [
        unit
        for unit in unit_list
        if _is_split(unit, group_of)
        and unit.params[0] not in apart
        and group_of.get(unit.params[0], (0, 0, 1.0))[2] > 0
    ]
    # A unit split between a decayed group and one without decay (its bias in the usual
    # no-decay group) is decayed in part: its split_unit finding says so, rather than an
    # invariant_without_decay for the bias as well, which reads "no equilibrium at all".
    in_split = {name for unit in split_units for name in unit.params}
    without = [name for name in found.pop("invariant_without_decay", []) if name not in apart]
    undecayed = [name for name in without if name in in_split]
    whole = [name for name in without if name not in in_split]
    if whole:
        found["invariant_without_decay"] = whole
    findings = [
        Finding(kind, tuple(params), _MESSAGES[kind](params)) for kind, params in found.items()
    ]
    if coupled:
        findings.append(Finding("adam_coupled_l2", tuple(coupled), _coupled_message(coupled)))
    if split_units:
        split = [unit.name for unit in split_units]
        message = _messages.audit_split_unit(split, undecayed, _SHOWN)
        findings.append(Finding("split_unit", tuple(split), message))
    if lost:
        message = _messages.audit_decay_lost_to_rounding(lost, _SHOWN)
        names_lost = tuple(name for name, _, _, _ in lost)
        findings.append(Finding("decay_lost_to_rounding", names_lost, message))
    order = [*_MESSAGES, "adam_coupled_l2", "split_unit", "decay_lost_to_rounding"]
    return sorted(findings, key=lambda f: order.index(f.kind))


def _roles(report: InvarianceReport) -> dict[str, str]:
    return {item.name: item.reason for item in report.rejected}


# Normalisation layers by type; a hand-written one (Llama's, Qwen3's, T5's RMSNorm) by its
# class name, the convention of every model family we know of.
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _structural_roles(module: nn.Module) -> dict[str, str]:
    """Roles from the owning module's type, when no invariance report is at hand."""
    roles: dict[str, str] = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, _NORMS) or type(sub).__name__.endswith("Norm"):
            reason = NORM_AFFINE_REASON
        elif isinstance(sub, (nn.Embedding, nn.EmbeddingBag)):
            reason = EMBEDDING_REASON
        else:
            continue
        for name, _ in sub.named_parameters(recurse=False):
            roles[f"{prefix}.{name}" if prefix else name] = reason
    return roles


def _kind(name: str, wd: float, in_units: set[str], roles: dict[str, str]) -> FindingKind | None:
    if name in in_units:
        return "invariant_without_decay" if wd == 0 else None
    if wd == 0:
        return None
    reason = roles.get(name, "")
    if reason == NORM_AFFINE_REASON:
        return "decay_on_norm_affine"
    if reason == EMBEDDING_REASON:
        return "decay_on_embedding"
    if name.rsplit(".", 1)[-1] == "bias":
        return "decay_on_bias"
    return None


def _lost_decay(
    optimizer: Optimizer, group: dict, names: dict[int, str], in_units: set[str]
) -> list[tuple[str, float, str, float]]:
    """The group's unit weights whose dtype cannot hold its decoupled decay per step."""
    try:
        prediction = predict_param_group(optimizer, group)
    except (TypeError, ValueError):  # an optimizer the theory does not read: nothing to say
        return []
    out = []
    for param in group["params"]:
        name = names.get(id(param))
        if name in in_units:
            decay = decay_lost_to_rounding(prediction, param.dtype)
            if decay is not None:
                dtype = str(param.dtype).removeprefix("torch.")
                out.append((name, decay, dtype, torch.finfo(param.dtype).eps / 2))
    return out


def _couples_l2(optimizer: Optimizer, group: dict) -> bool:
    name = type(optimizer).__name__
    if name == "Adam":
        return not group.get("decoupled_weight_decay", False)
    if name in ("NAdam", "RAdam"):
        return not group.get("decoupled_weight_decay", False)
    return name in ("Adagrad", "Adamax", "RMSprop")


def _is_split(unit: Unit, group_of: dict[str, tuple[int, int, float]]) -> bool:
    places = {group_of[name][:2] for name in unit.params if name in group_of}
    return len(places) > 1


def _optimizers_of(unit: Unit, group_of: dict[str, tuple[int, int, float]]) -> int:
    return len({group_of[name][0] for name in unit.params if name in group_of})


def _listing(params: Sequence[str]) -> str:
    shown = ", ".join(params[:_SHOWN])
    more = f" and {len(params) - _SHOWN} more" if len(params) > _SHOWN else ""
    return shown + more


_MESSAGES = {
    "invariant_without_decay": lambda p: (
        f"scale-invariant weights without weight decay: {_listing(p)}. They have no "
        "equilibrium: their norm grows like sqrt(t) and their effective learning rate "
        "lr/|w|^2 decays like 1/t. Give their param group a weight decay (if that was meant)."
    ),
    "decay_on_norm_affine": lambda p: (
        f"weight decay on normalization gains/shifts: {_listing(p)}. They are not "
        "scale-invariant; decay only pulls them towards 0. Usual practice: a group with "
        "weight_decay=0 for norm parameters and biases."
    ),
    "decay_on_embedding": lambda p: (
        f"weight decay on embedding tables: {_listing(p)} (not scale-invariant; often "
        "excluded from decay)."
    ),
    "decay_on_bias": lambda p: (
        f"weight decay on biases that are not part of an invariant unit: {_listing(p)} "
        "(not scale-invariant; often excluded from decay)."
    ),
}


def _coupled_message(params: Sequence[str]) -> str:
    return (
        f"Adam-style optimizer with coupled L2 weight decay on {_listing(params)}: the decay is "
        "rescaled by each weight's gradient history, so no equilibrium follows from the "
        "hyper-parameters. Use torch.optim.AdamW (decoupled decay) to get a prediction."
    )
