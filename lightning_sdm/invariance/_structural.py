"""The forward-free fallback: invariant units guessed from registration order alone."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm

from lightning_sdm.invariance._graph import _LINEAR_KINDS, _NORM_KINDS, _join, _module_kind, _own
from lightning_sdm.invariance._report import (
    EMBEDDING_REASON,
    HEURISTIC_NOTE,
    NORM_AFFINE_REASON,
    REGISTRATION_ORDER,
    InvarianceReport,
    RejectedParameter,
)
from lightning_sdm.units import Unit


def structural_candidates(module: nn.Module) -> InvarianceReport:
    """Guess the invariant units from registration order alone, without running a forward.

    A ``Linear`` / ``ConvNd`` / ``ConvTransposeNd`` counts as invariant when the next module in
    ``named_modules()`` order (skipping containers and ReLU / LeakyReLU / dropout / pooling /
    identity modules) is a normalization whose feature count matches its output channels. This is
    a heuristic (``method="registration_order"``): modules may be registered in another order than
    they run, and a residual add before the norm is invisible here (a pre-activation block fools
    it). Confirm each unit with gradient orthogonality before using it.

    Args:
        module: the model.

    Returns:
        An :class:`InvarianceReport` with ``method="registration_order"``.

    Example::

        >>> from torch import nn
        >>> from lightning_sdm.invariance import structural_candidates
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        >>> report = structural_candidates(net)
        >>> [(u.name, u.norm, u.channel_invariant) for u in report.units], report.method
        ([('0.weight', '1 (BatchNorm2d)', True)], 'registration_order')
    """
    modules = list(module.named_modules())
    owner = {id(param): (qual, local) for qual, sub in modules for local, param in _own(sub)}
    found: dict[str, Unit] = {}
    reasons: dict[str, str] = {}
    for index, (qual, sub) in enumerate(modules):
        kind = _module_kind(sub)
        if kind in _NORM_KINDS:
            for local, _ in _own(sub):
                reasons[_join(qual, local)] = NORM_AFFINE_REASON
        elif kind == "embedding":
            for local, _ in _own(sub):
                reasons[_join(qual, local)] = EMBEDDING_REASON
        elif kind in _LINEAR_KINDS:
            _structural_unit(qual, sub, modules[index + 1 :], found, reasons)
    units, rejected = [], []
    for name, param in module.named_parameters():
        qual, local = owner.get(id(param), ("", name))
        if name in found:
            units.append(found[name])
        elif name not in {p for unit in found.values() for p in unit.params}:
            default = "not the weight of a Linear/Conv layer followed by a normalization"
            rejected.append(RejectedParameter(name, reasons.get(_join(qual, local), default)))
    return InvarianceReport(tuple(units), tuple(rejected), REGISTRATION_ORDER, (HEURISTIC_NOTE,))


_PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.RReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


def _structural_unit(
    qual: str,
    layer: nn.Module,
    following: list[tuple[str, nn.Module]],
    found: dict[str, Unit],
    reasons: dict[str, str],
) -> None:
    weight = _join(qual, "weight")
    out = int(getattr(layer, "out_features", getattr(layer, "out_channels", -1)))
    nxt = next(
        (
            (name, sub)
            for name, sub in following
            if next(sub.children(), None) is None and not isinstance(sub, _PASS_THROUGH)
        ),
        None,
    )
    kind = _module_kind(nxt[1]) if nxt is not None else None
    if nxt is None or kind not in _NORM_KINDS or out not in _norm_features(nxt[1]):
        if nxt is None:
            reasons[weight] = "no normalization follows it in registration order"
        else:
            what = f"'{nxt[0]}' ({type(nxt[1]).__name__})"
            reasons[weight] = f"next module in registration order is {what}, not a matching norm"
        if getattr(layer, "bias", None) is not None:
            reasons[_join(qual, "bias")] = f"bias of '{weight}', which is not scale-invariant"
        return
    name, norm = nxt
    if kind == "group_norm":
        per_channel = getattr(norm, "num_groups", 0) == getattr(norm, "num_channels", -1)
    else:
        per_channel = kind in ("batch_norm", "instance_norm")
    params = tuple(_join(qual, local) for local, _ in _own(layer))
    channel_dim = int(isinstance(layer, _ConvTransposeNd))
    norm_label = f"{name} ({type(norm).__name__})"
    found[weight] = Unit(
        weight, params, channel_dim, per_channel, norm=norm_label, source="registration_order"
    )


def _norm_features(norm: nn.Module) -> tuple[int, ...]:
    if isinstance(norm, (_BatchNorm, _InstanceNorm)):
        return (int(norm.num_features),)
    if isinstance(norm, nn.GroupNorm):
        return (int(norm.num_channels),)
    shape = getattr(norm, "normalized_shape", None)
    if isinstance(shape, int):
        return (shape,)
    if isinstance(shape, (tuple, list)) and shape:
        return (int(shape[0]), int(shape[-1]))
    return ()
