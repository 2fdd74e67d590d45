"""Scale-invariant units: the one unit type, and choosing units by name, pattern or module.

A *unit* is a group of parameters that can be scaled together without changing the loss: a
weight, and the bias added right after it when that bias also reaches the normalization. The
detector (:mod:`lightning_sdm.invariance`) produces units, a user may name them
(:func:`select_units`), and the monitor measures them; all three use :class:`Unit`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from lightning_sdm._checks import check_bool, check_record
from lightning_sdm.records import UnitSource

__all__ = ["ParamsSpec", "Unit", "check_params_spec", "select_units"]

#: ``"auto"``, parameter names / glob patterns / ``"re:"`` regular expressions, or modules.
ParamsSpec = str | nn.Module | Sequence[str] | Sequence[nn.Module]

_SOURCES = ("trace", "registration_order", "explicit")


@dataclass(frozen=True)
class Unit:
    """A scale-invariant unit: parameters that scale together without changing the loss.

    Attributes:
        name: the key it is reported under (by convention the weight's qualified name).
        params: qualified names of its parameters: ``(weight,)`` or ``(weight, bias)``.
        channel_dim: dimension of the weight that indexes output channels (0 for ``Linear`` and
            ``ConvNd``, 1 for ``ConvTransposeNd`` and for a weight used as ``x @ w``).
        channel_invariant: each output channel (with the matching bias entry) is invariant on its
            own, as under BatchNorm; ``False`` when only the whole unit is (LayerNorm over the
            features). With ``granularity="channel"`` such a unit is measured as a whole.
        norm: where the scale is absorbed, e.g. ``"net.1 (BatchNorm2d)"`` (empty when unknown).
        source: how the unit was found (:data:`~lightning_sdm.records.UnitSource`).
        channel_group: with ``channel_invariant``, the channels are invariant in blocks of this
            many consecutive ones (an attention head's rows of a q/k projection under QK-norm);
            1: each channel on its own.

    Raises:
        ValueError: for a malformed field (the message names it).

    Example::

        >>> Unit("net.0.weight", ("net.0.weight", "net.0.bias")).channel_invariant
        True
        >>> Unit("net.0.weight", "net.0.weight")
        Traceback (most recent call last):
        ...
        ValueError: `params` must be a tuple of parameter names, got 'net.0.weight' (a str); write ('net.0.weight',).
    """  # noqa: E501

    name: str
    params: tuple[str, ...]
    channel_dim: int = 0
    channel_invariant: bool = True
    norm: str = ""
    source: UnitSource = "explicit"
    channel_group: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"`name` must be a non-empty string, got {self.name!r}.")
        if isinstance(self.params, str):
            raise ValueError(
                f"`params` must be a tuple of parameter names, got {self.params!r} (a str); "
                f"write ({self.params!r},)."
            )
        if not isinstance(self.params, (tuple, list)):
            raise ValueError(f"`params` must be a tuple of parameter names, got {self.params!r}.")
        params = tuple(self.params)
        if not params or not all(isinstance(p, str) and p for p in params):
            raise ValueError(
                f"`params` must be a non-empty tuple of parameter names, got {self.params!r}."
            )
        twice = sorted({p for p in params if params.count(p) > 1})
        if twice:
            raise ValueError(f"`params` names {twice[0]!r} twice; list each parameter once.")
        object.__setattr__(self, "params", params)
        check_bool("channel_invariant", self.channel_invariant)
        if isinstance(self.channel_dim, bool) or not isinstance(self.channel_dim, int):
            raise ValueError(f"`channel_dim` must be an int, got {self.channel_dim!r}.")
        group = self.channel_group
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"`channel_group` must be a positive integer, got {group!r}.")
        if self.source not in _SOURCES:
            raise ValueError(f"`source` must be one of {_SOURCES}, got {self.source!r}.")

    def as_dict(self) -> dict[str, Any]:
        """Plain-type copy (checkpoints load with ``weights_only=True``)."""
        return {**asdict(self), "params": list(self.params)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Unit:
        """Inverse of :meth:`as_dict`.

        Raises:
            ValueError: for a damaged entry (a missing or mistyped field), naming it.
        """
        kept = check_record(cls, values, "a saved unit")
        return cls(**{**kept, "params": tuple(kept["params"])})


def check_params_spec(params: Any) -> ParamsSpec:
    r"""Validate a ``params`` argument at construction; returns it normalised.

    Accepted: ``"auto"``; one name / glob / ``"re:"`` pattern or a list of them (each regular
    expression is compiled here, so a bad one fails now, not at the first step); one module or a
    list of modules. Not accepted: an empty list, a mix of strings and modules, anything else.

    Raises:
        ValueError: naming ``params`` and what is wrong with it.

    Example::

        >>> check_params_spec(["net.*.weight", r"re:layer[0-9]+\.conv"])
        ['net.*.weight', 're:layer[0-9]+\\.conv']
        >>> check_params_spec("re:(")
        Traceback (most recent call last):
        ...
        ValueError: `params` holds an invalid regular expression 're:(': missing ), unterminated subpattern at position 0.
    """  # noqa: E501
    if isinstance(params, str):
        if not params:
            raise ValueError("`params` must be 'auto', names/patterns, or modules; got ''.")
        if params != "auto":
            _compile(params)
        return params
    if isinstance(params, nn.Module):
        return [params]
    if isinstance(params, Sequence) and params:
        items = list(params)
        if "" in items:
            raise ValueError(
                "`params` holds an empty name ''; give parameter names, glob patterns or "
                "'re:' regular expressions."
            )
        if all(isinstance(p, str) and p for p in items):
            for pattern in items:
                _compile(pattern)
            return items
        if all(isinstance(p, nn.Module) for p in items):
            return items
        if all(isinstance(p, (str, nn.Module)) for p in items):
            raise ValueError(
                "`params` mixes names/patterns and modules; pass one kind (e.g. the modules' "
                "parameter names instead)."
            )
    raise ValueError(
        "`params` must be 'auto', a parameter name / glob / 're:' regex (or a non-empty list of "
        f"them), or a module (or a non-empty list of modules); got {params!r}."
    )


def select_units(module: nn.Module, params: ParamsSpec) -> list[Unit]:
    """The units that an explicit ``params`` selection names in ``module``.

    Names and patterns select parameters; a selected weight is one unit, joined by the bias of
    the same module when that bias is selected too. A module selects its ``weight`` (and its
    ``bias``). ``channel_dim`` is 1 for transposed convolutions, else 0.

    Raises:
        ValueError: if nothing matches, or a module is not a submodule or has no ``weight``.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> [(u.name, u.params) for u in select_units(net, ["0.*"])]
        [('0.weight', ('0.weight', '0.bias'))]
        >>> [(u.name, u.params) for u in select_units(net, net[2])]
        [('2.weight', ('2.weight', '2.bias'))]
    """
    params = check_params_spec(params)
    if params == "auto":
        raise ValueError("select_units needs an explicit selection, not 'auto'.")
    items: list[Any] = [params] if isinstance(params, str) else list(params)  # type: ignore[arg-type]
    if all(isinstance(p, str) for p in items):
        names = [name for name, _ in module.named_parameters()]
        selected = _match_names(names, items)
        if not selected:
            raise ValueError(
                f"`params={params!r}` matches no parameter of {type(module).__name__}. "
                f"Available names include: {names[:8]}."
            )
        return _units_from_names(module, selected)
    return _units_from_modules(module, items)


def _compile(pattern: str) -> None:
    if not pattern.startswith("re:"):
        return
    try:
        re.compile(pattern[3:])
    except re.error as error:
        raise ValueError(
            f"`params` holds an invalid regular expression {pattern!r}: {error}."
        ) from None


def _match_names(names: list[str], patterns: list[str]) -> list[str]:
    matched = []
    for name in names:
        for pattern in patterns:
            if pattern.startswith("re:"):
                hit = re.fullmatch(pattern[3:], name) is not None
            else:
                hit = fnmatch.fnmatchcase(name, pattern)
            if hit:
                matched.append(name)
                break
    return matched


def _channel_dim(module: nn.Module | None) -> int:
    return 1 if isinstance(module, _ConvTransposeNd) else 0


def _units_from_names(module: nn.Module, names: list[str]) -> list[Unit]:
    """One unit per selected weight; a selected bias of the same module joins its weight."""
    modules = dict(module.named_modules())
    chosen = set(names)
    units = []
    for name in names:
        owner, _, attr = name.rpartition(".")
        if attr == "bias" and f"{owner}.weight" in chosen:
            continue  # joined to its weight below
        members = [name]
        if attr == "weight" and f"{owner}.bias" in chosen:
            members.append(f"{owner}.bias")
        units.append(Unit(name, tuple(members), channel_dim=_channel_dim(modules.get(owner))))
    return units


def _units_from_modules(module: nn.Module, selected: list[Any]) -> list[Unit]:
    names = {id(sub): name for name, sub in module.named_modules()}
    units = []
    for sub in selected:
        if id(sub) not in names:
            raise ValueError(
                f"`params` holds a {type(sub).__name__} that is not a submodule of "
                f"{type(module).__name__}."
            )
        qual = names[id(sub)]
        if not isinstance(getattr(sub, "weight", None), nn.Parameter):
            raise ValueError(
                f"`params` holds module {qual!r} ({type(sub).__name__}), which has no `weight` "
                "parameter."
            )
        prefix = f"{qual}." if qual else ""
        members = [f"{prefix}weight"]
        if isinstance(getattr(sub, "bias", None), nn.Parameter):
            members.append(f"{prefix}bias")
        units.append(Unit(members[0], tuple(members), channel_dim=_channel_dim(sub)))
    return units
