"""The results of the invariance analysis: units and rejected parameters, with reasons."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lightning_sdm.units import Unit

__all__ = ["InvarianceReport", "RejectedParameter"]

TRACE = "trace"
REGISTRATION_ORDER = "registration_order"

NORM_AFFINE_REASON = "normalization affine parameter (applied after the statistics are taken)"
EMBEDDING_REASON = "embedding table: a lookup, not a linear map followed by a normalization"
UNUSED_REASON = "not used in the traced forward"
HEURISTIC_NOTE = (
    "heuristic: registration order is not execution order; confirm every unit with gradient "
    "orthogonality (<w, dL/dw> ~ 0 per unit) before trusting it"
)


# Why parameters are rejected, in a few words (first match wins), for short summaries.
_CATEGORIES = (
    ("normalization affine parameter", "normalization affine"),
    ("embedding table", "embedding"),
    ("not used in the traced forward", "unused"),
    ("bias of '", "bias of a rejected weight"),
    ("running statistics", "norm in eval mode"),
    ("multi_head_attention", "attention"),
    ("softmax", "attention"),
    ("scaled_dot_product", "attention"),
    ("added to", "residual connection"),
    ("returned by the model", "reaches the output"),
    ("leaves the traced code", "reaches the output"),
    ("not positively homogeneous", "non-homogeneous operation (GELU, SiLU, sigmoid, ...)"),
)


# The loss functions a traced training step ends in (torch.nn.functional names): a weight that
# reaches one of them before any normalization is the model's head, not a non-homogeneous layer.
_LOSS = re.compile(r"^reaches (\w*(?:cross_entropy|_loss|log_softmax|kl_div))\b")


def reason_category(reason: str) -> str:
    """A few words for a rejection reason (``"residual connection"``, ``"attention"``, ...).

    Example::

        >>> reason_category("reaches cross_entropy in the top-level forward, which is not "
        ...                 "positively homogeneous, before any normalization")
        'reaches the loss'
        >>> reason_category("reaches gelu in net.1, which is not positively homogeneous, ...")
        'non-homogeneous operation (GELU, SiLU, sigmoid, ...)'
    """
    if _LOSS.match(reason):
        return "reaches the loss"
    return next((short for key, short in _CATEGORIES if key in reason), "other")


@dataclass(frozen=True)
class RejectedParameter:
    """A parameter that is not (or could not be shown to be) scale-invariant, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class InvarianceReport:
    """Every parameter of a module, either in an invariant unit or rejected with a reason.

    Attributes:
        units: the scale-invariant units, in parameter registration order.
        rejected: every other parameter, in registration order.
        method: ``"trace"`` (a recorded forward pass) or ``"registration_order"`` (heuristic).
        notes: caveats, e.g. why a trace fell back to the heuristic.
    """

    units: tuple[Unit, ...]
    rejected: tuple[RejectedParameter, ...]
    method: str
    notes: tuple[str, ...] = ()

    @property
    def invariant_parameters(self) -> tuple[str, ...]:
        """Names of all parameters that belong to an invariant unit."""
        return tuple(name for unit in self.units for name in unit.params)

    def rejection_counts(self) -> dict[str, int]:
        """How many parameters were rejected for each kind of reason, most frequent first."""
        counts: dict[str, int] = {}
        for item in self.rejected:
            key = reason_category(item.reason)
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    @property
    def failed(self) -> bool:
        """Whether the trace failed and the units are the registration-order guess."""
        return self.method != TRACE

    def short_summary(self) -> str:
        """The units in one line each, the rejections as counts per kind of reason, the notes.

        Example::

            >>> import torch
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
            >>> from lightning_sdm.invariance import find_scale_invariant_units
            >>> print(find_scale_invariant_units(net, torch.randn(16, 4)).short_summary())
            Scale-invariant units (method: trace): 1
              0.weight + 0.bias  <-  1 (BatchNorm1d); per output channel
            Rejected parameters: 4 (normalization affine: 2, reaches the output: 1, bias of a rejected weight: 1); report.summary() lists them
        """  # noqa: E501
        lines = self._unit_lines(with_dim=False)
        counts = ", ".join(f"{key}: {n}" for key, n in self.rejection_counts().items())
        listing = f" ({counts}); report.summary() lists them" if counts else ""
        lines.append(f"Rejected parameters: {len(self.rejected)}{listing}")
        lines.extend(f"Note: {note}" for note in self.notes)
        return "\n".join(lines)

    @property
    def unused(self) -> tuple[str, ...]:
        """Parameters the traced forward did not use (their verdict is still open)."""
        return tuple(item.name for item in self.rejected if item.reason == UNUSED_REASON)

    def completed_by(self, later: InvarianceReport) -> InvarianceReport:
        """This report, with ``later``'s verdicts for the parameters this trace saw unused.

        Several networks trained in turn (a GAN in manual optimization) are traced one forward
        at a time: the first forward decides its own network, and a later forward decides the
        parameters that were unused so far. Verdicts already given are kept.

        Example::

            >>> import torch
            >>> from torch import nn
            >>> from lightning_sdm.invariance import find_scale_invariant_units
            >>> class Two(nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.a = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
            ...         self.b = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
            ...     def forward(self, x, net):
            ...         return getattr(self, net)(x)
            >>> two, x = Two(), torch.randn(8, 4)
            >>> first = find_scale_invariant_units(two, x, "a")
            >>> [u.name for u in first.units], first.unused[:2]
            (['a.0.weight'], ('b.0.weight', 'b.0.bias'))
            >>> both = first.completed_by(find_scale_invariant_units(two, x, "b"))
            >>> [u.name for u in both.units], both.unused
            (['a.0.weight', 'b.0.weight'], ())
        """
        open_names = set(self.unused)
        new_units = tuple(u for u in later.units if open_names.issuperset(u.params))
        decided = {name for unit in new_units for name in unit.params}
        later_rejected = {
            item.name: item
            for item in later.rejected
            if item.name in open_names and item.reason != UNUSED_REASON
        }
        rejected = tuple(
            later_rejected.get(item.name, item)
            for item in self.rejected
            if item.name not in decided
        )
        notes = self.notes + tuple(note for note in later.notes if note not in self.notes)
        method = self.method if later.method == self.method else REGISTRATION_ORDER
        return InvarianceReport(self.units + new_units, rejected, method, notes)

    def summary(self) -> str:
        """Multi-line human-readable report: units, their granularity, rejections and why.

        Example::

            >>> import torch
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
            >>> from lightning_sdm.invariance import find_scale_invariant_units
            >>> print(find_scale_invariant_units(net, torch.randn(16, 4)).summary())
            Scale-invariant units (method: trace): 1
              0.weight + 0.bias  <-  1 (BatchNorm1d); per output channel (dim 0)
            Rejected parameters: 4
              1.weight: normalization affine parameter (applied after the statistics are taken)
              1.bias: normalization affine parameter (applied after the statistics are taken)
              3.weight: output does not reach a normalization: it is returned by the model
              3.bias: bias of '3.weight', which is not scale-invariant
        """
        lines = self._unit_lines(with_dim=True)
        lines.append(f"Rejected parameters: {len(self.rejected)}")
        lines.extend(f"  {item.name}: {item.reason}" for item in self.rejected)
        lines.extend(f"Note: {note}" for note in self.notes)
        return "\n".join(lines)

    def _unit_lines(self, with_dim: bool) -> list[str]:
        """The header and one line per unit (shared by :meth:`summary` and the short one)."""
        lines = [f"Scale-invariant units (method: {self.method}): {len(self.units)}"]
        for unit in self.units:
            grain = "whole unit only"
            if unit.channel_invariant:
                grain = "per output channel" + (f" (dim {unit.channel_dim})" if with_dim else "")
            lines.append(f"  {' + '.join(unit.params)}  <-  {unit.norm}; {grain}")
        return lines
