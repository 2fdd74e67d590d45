"""Transfer functions of the recorded ops (~35 rules): how scaling a unit reaches the outputs.

Each rule receives the analysis, the node and the current scaling state, and returns the state of
the node's outputs (or raises ``_Break`` with the reason the unit is not invariant).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from lightning_sdm.invariance._analysis import (
    Rule,
    _Analysis,
    _Break,
    _not_homogeneous,
    _Scaled,
    _Step,
)
from lightning_sdm.invariance._graph import _arg, _names, _Node, _Ref, _refs
from lightning_sdm.invariance._roles import _LINEAR_FUNCTIONS, _MATMUL, _NORM_FUNCTIONS

#: Transfer function of each recorded op name: how a scaling of its inputs reaches its outputs.
RULES: dict[str, Rule] = {}


def _rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for name in names:
            RULES[name] = fn
        return fn

    return register


def _added(node: _Node, what: str = "a tensor that does not scale with it") -> str:
    return (
        f"output is added to {what} ({node.label}) before any normalization "
        "(e.g. a residual connection)"
    )


def _is_zero(obj: Any) -> bool:
    return isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj == 0


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


_CASTS = {"float", "double", "half", "bfloat16", "to", "type", "type_as", "cpu", "cuda"}


@_rule(
    *_CASTS,
    *_names(
        "relu relu_ leaky_relu leaky_relu_ rrelu rrelu_ prelu dropout dropout_ dropout1d "
        "dropout2d dropout3d feature_dropout feature_dropout_ clone contiguous detach detach_ "
        "requires_grad_ neg neg_ negative negative_ __neg__ positive __pos__ abs abs_ "
        "absolute flip fliplr flipud roll get:data get:real conj resolve_conj resolve_neg "
        "pin_memory channel_shuffle native_channel_shuffle clamp clamp_ clip clip_ clamp_min "
        "clamp_min_ threshold threshold_ masked_fill masked_fill_"
    ),
)
def _elementwise(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    """Ops with f(k x) = k f(x) for k > 0, element by element."""
    x = _arg(node, 0, "input")
    op = node.op.rstrip("_")
    if op in ("clamp", "clip", "clamp_min"):
        low, high = _arg(node, 1, "min"), _arg(node, 2, "max")
        if not _is_zero(low) or (op != "clamp_min" and high is not None):
            raise _Break(_not_homogeneous(node))  # clamp(min=0) is ReLU; other bounds are not
    elif op == "threshold":
        if not (_is_zero(_arg(node, 1, "threshold")) and _is_zero(_arg(node, 2, "value"))):
            raise _Break(_not_homogeneous(node))  # threshold(x, 0, 0) is ReLU
    elif op == "masked_fill" and not _is_zero(_arg(node, 2, "value")):
        raise _Break(_not_homogeneous(node))
    if node.op not in _CASTS:  # a cast's second tensor argument only supplies dtype / device
        an._others_unaffected(node, state, x)
    scaled = an._st(state, x)
    if op in ("abs", "absolute") and scaled is not None:
        scaled = replace(scaled, nonneg=True, reduced=False)
    elif op not in _CASTS and op not in ("clone", "contiguous", "detach") and scaled is not None:
        scaled = replace(scaled, nonneg=False, reduced=False)  # e.g. neg, flip: not what it was
    return an._fill(node, scaled)


@_rule(
    *_names(
        "view reshape flatten unflatten view_as reshape_as ravel squeeze squeeze_ unsqueeze "
        "unsqueeze_ reshape_alias unsafe_view"
    ),
)
def _reshape(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    """Reshapes: a scaled set of indices along one axis stays one along an axis if it can."""
    x = _arg(node, 0, "input")
    scaled = an._st(state, x)
    if scaled is None:
        return _Step([None] * len(node.outputs))
    out = an.graph.values[node.outputs[0]]
    if out.dtype != an.graph.values[x.vid].dtype:
        raise _Break(f"is reinterpreted as {out.dtype} by {node.label}")
    if scaled.axis is None:
        return an._fill(node, scaled)
    axis = _reshape_axis(an._shape(x), out.shape, scaled.axis)
    if axis is not None:
        return an._fill(node, _Scaled(scaled.degree, axis, group=scaled.group))
    # Channels in whole blocks of `group`, split into (blocks, group): the blocks' axis.
    axis = _reshape_axis(an._shape(x), out.shape, scaled.axis, block=scaled.group)
    if scaled.group > 1 and axis is not None:
        return an._fill(node, _Scaled(scaled.degree, axis))
    raise _Break(f"its channels are split across dimensions by {node.label}")


def _reshape_axis(
    shape: Sequence[int], out: Sequence[int], axis: int, block: int = 1
) -> int | None:
    """Output axis whose index determines the input index along ``axis`` (row-major order).

    With ``block > 1``: the axis whose index determines which block of ``block`` consecutive
    indices along ``axis`` an element is in (the blocks' axis after a split into heads).
    """
    size, rest = shape[axis], math.prod(shape[axis + 1 :])
    if block > 1:
        if size % block:
            return None
        size, rest = size // block, rest * block
    for b in range(len(out)):
        out_rest = math.prod(out[b + 1 :])
        if out_rest == 0 or rest % out_rest:
            continue
        if out[b] % ((rest // out_rest) * size) == 0:
            return b
    return None


@_rule(
    *_names(
        "permute transpose transpose_ swapaxes swapaxes_ swapdims swapdims_ t t_ get:T get:mT "
        "get:H get:mH adjoint movedim moveaxis"
    ),
)
def _permute(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    x = _arg(node, 0, "input")
    scaled = an._st(state, x)
    an._others_unaffected(node, state, x)
    if scaled is None or scaled.axis is None:
        return an._fill(node, scaled)
    ndim = an._ndim(x)
    perm = _permutation(node, ndim)  # perm[j] = input dimension placed at output position j
    return an._fill(node, _Scaled(scaled.degree, perm.index(scaled.axis), group=scaled.group))


def _permutation(node: _Node, ndim: int) -> list[int]:
    op = node.op.rstrip("_")
    perm = list(range(ndim))
    if op == "permute":
        dims = node.args[1:] if len(node.args) > 2 else _arg(node, 1, "dims")
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        return [_norm_dim(int(d), ndim) for d in dims]
    if op in ("transpose", "swapaxes", "swapdims"):
        i = _norm_dim(int(_arg(node, 1, "dim0")), ndim)
        j = _norm_dim(int(_arg(node, 2, "dim1")), ndim)
    elif op == "t":
        i, j = (0, 1) if ndim >= 2 else (0, 0)
    elif op == "get:T":
        return perm[::-1]
    elif op in ("get:mT", "get:H", "get:mH", "adjoint"):
        i, j = ndim - 2, ndim - 1
    else:  # movedim / moveaxis
        source, destination = _arg(node, 1, "source"), _arg(node, 2, "destination")
        source = [source] if isinstance(source, int) else list(source)
        destination = [destination] if isinstance(destination, int) else list(destination)
        source = [_norm_dim(int(d), ndim) for d in source]
        destination = [_norm_dim(int(d), ndim) for d in destination]
        rest = iter(d for d in range(ndim) if d not in source)
        placed = dict(zip(destination, source, strict=True))
        return [placed[j] if j in placed else next(rest) for j in range(ndim)]
    perm[i], perm[j] = perm[j], perm[i]
    return perm


@_rule("expand", "expand_as", "broadcast_to", "repeat", "tile")
def _expand(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    """Broadcasting copies: new leading dimensions shift the scaled axis."""
    x = _arg(node, 0, "input")
    scaled = an._st(state, x)
    if scaled is None or scaled.axis is None:
        return an._fill(node, scaled)
    axis = scaled.axis + an._out_ndim(node) - an._ndim(x)
    return an._fill(node, replace(scaled, axis=axis, group=1))


_SLICES = "__getitem__ narrow select index_select chunk split split_with_sizes tensor_split unbind"


@_rule(*_SLICES.split())
def _slice(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    x = _arg(node, 0, "input")
    scaled = an._st(state, x)
    an._others_unaffected(node, state, x)
    if scaled is None or scaled.axis is None:
        return an._fill(node, scaled)
    ndim, axis, op = an._ndim(x), scaled.axis, node.op
    if op == "__getitem__":
        axis = _getitem_axis(node.args[1], ndim, axis)
    elif op in ("select", "unbind"):
        dim = _norm_dim(int(_arg(node, 1, "dim", 0)), ndim)
        if dim == axis:
            raise _Break(f"single channels are picked by {node.label}")
        axis -= int(axis > dim)
    # narrow / index_select / chunk / split keep a set of indices along the same axis.
    return an._fill(node, _Scaled(scaled.degree, axis))


def _getitem_axis(index: Any, ndim: int, axis: int) -> int:
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        basic = item is None or item is Ellipsis or isinstance(item, slice)
        if not basic and (not isinstance(item, int) or isinstance(item, bool)):
            raise _Break("its channels are gathered by advanced indexing")
    consumed = sum(1 for item in items if item is not None and item is not Ellipsis)
    i = j = 0
    for item in items:
        if item is None:
            j += 1
        elif item is Ellipsis:
            count = ndim - consumed
            if i <= axis < i + count:
                return j + axis - i
            i, j = i + count, j + count
        elif isinstance(item, slice):
            if i == axis:
                return j
            i, j = i + 1, j + 1
        else:
            if i == axis:
                raise _Break("single channels are picked by integer indexing")
            i += 1
    return j + axis - i


@_rule("cat", "concat", "concatenate", "stack")
def _cat(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    tensors = _arg(node, 0, "tensors")
    if not isinstance(tensors, tuple):
        raise _Break(f"could not follow {node.label}")
    states = [an._st(state, t) for t in tensors]
    scaled = [s for s in states if s is not None]
    if len({s.degree for s in scaled}) != 1:
        raise _Break(f"is joined with tensors scaled differently by {node.label}")
    degree = scaled[0].degree
    dim = _norm_dim(int(_arg(node, 1, "dim", 0)), an._out_ndim(node))
    if len(scaled) == len(states) and all(s.axis is None for s in scaled):
        return an._fill(node, _Scaled(degree))
    if node.op == "stack":
        if all(s.axis is None for s in scaled):
            return an._fill(node, _Scaled(degree, dim))
    elif all(s.axis in (None, dim) for s in scaled):
        return an._fill(node, _Scaled(degree, dim))
    raise _Break(f"is joined with unscaled tensors by {node.label}")


_POOL_PREFIXES = ("max", "avg", "adaptive_max", "adaptive_avg", "lp", "fractional_max")
_POOLS = {
    f"{prefix}_pool{n}d{suffix}": n
    for n in (1, 2, 3)
    for prefix in _POOL_PREFIXES
    for suffix in ("", "_with_indices")
}


@_rule(*_POOLS)
def _pool(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    """Max / average / adaptive / Lp pooling: positively homogeneous over the spatial dims."""
    x = _arg(node, 0, "input")
    scaled = an._st(state, x)
    an._others_unaffected(node, state, x)
    spatial = an._ndim(x) - _POOLS[node.op]
    if scaled is not None and scaled.axis is not None and scaled.axis >= spatial:
        raise _Break(f"its spatial positions are mixed by {node.label}")
    return an._fill(node, scaled, integers_invariant=True)


@_rule(
    "interpolate",
    "upsample",
    "upsample_nearest",
    "upsample_bilinear",
    "pixel_shuffle",
    "pixel_unshuffle",
)
def _resample(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    """Interpolation is linear in its input; pixel (un)shuffle moves channels into space."""
    x = _arg(node, 0, "input")
    scaled = an._st(state, x)
    an._others_unaffected(node, state, x)
    if scaled is not None and scaled.axis is not None:
        limit = 1 if node.op.startswith("pixel") else 2  # batch (and channel) axes survive
        if scaled.axis >= limit:
            raise _Break(f"its positions are mixed by {node.label}")
    return an._fill(node, scaled)


@_rule("pad", "constant_pad_nd")
def _pad(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    x = _arg(node, 0, "input")
    an._others_unaffected(node, state, x)
    if node.op == "pad":
        mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value")
        if mode == "constant" and value is not None and not _is_zero(value):
            raise _Break(f"is padded with a non-zero constant by {node.label}")
    elif not _is_zero(_arg(node, 2, "value", 0)):
        raise _Break(f"is padded with a non-zero constant by {node.label}")
    return an._fill(node, an._st(state, x))


_MULTIPLY = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "multiply_"}
_DIVIDE = set(
    _names(
        "div div_ __truediv__ __itruediv__ __div__ divide divide_ true_divide true_divide_ "
        "__rdiv__ __rtruediv__"
    )
)


def _output_axis(an: _Analysis, node: _Node, operand: Any, scaled: _Scaled) -> int | None:
    """The output axis of an operand's scaled axis under broadcasting (None: whole tensor)."""
    if scaled.axis is None:
        return None
    return scaled.axis + an._out_ndim(node) - an._ndim(operand)


@_rule(*_MULTIPLY, *_DIVIDE)
def _product(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    """Products and quotients: the degrees add (a / b: subtract)."""
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if node.op in ("__rdiv__", "__rtruediv__"):
        a, b = b, a
    divide = node.op not in _MULTIPLY
    if divide and _arg(node, 2, "rounding_mode") is not None:
        raise _Break(_not_homogeneous(node))
    sa, sb = an._st(state, a), an._st(state, b)
    if (sa is not None and sa.shifted) or (sb is not None and sb.shifted and not divide):
        raise _Break(f"is shifted by a constant ({node.label}) before any normalization")
    if sb is not None and sb.shifted:  # x / (std + eps): the eps of a hand-written norm
        sb = _Scaled(sb.degree, sb.axis)
    sign = -1.0 if divide else 1.0
    out_ndim = an._out_ndim(node)
    if sa is not None and sb is not None:
        square = not divide and isinstance(a, _Ref) and isinstance(b, _Ref) and a.vid == b.vid
        if sa.axis is None and sb.axis is None:
            return an._fill(node, _Scaled(sa.degree + sign * sb.degree, nonneg=square))
        axes = {_output_axis(an, node, a, sa), _output_axis(an, node, b, sb)}
        if len(axes) == 1 and None not in axes:  # the same channels of both (e.g. w / std(w))
            degree = sa.degree + sign * sb.degree
            return an._fill(node, _Scaled(degree, axes.pop(), nonneg=square))
        raise _Break(f"is multiplied by a tensor scaled on other channels in {node.label}")
    operand, scaled, factor = (a, sa, 1.0) if sa is not None else (b, sb, sign)
    assert scaled is not None
    axis = None if scaled.axis is None else scaled.axis + out_ndim - an._ndim(operand)
    return an._fill(node, _Scaled(factor * scaled.degree, axis))


@_rule(
    *_names(
        "add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ subtract "
        "subtract_ rsub"
    ),
)
def _sum(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    sa, sb = an._st(state, a), an._st(state, b)
    if sa is not None and sb is not None:
        if sa.axis is None and sb.axis is None and sa.degree == sb.degree:
            return an._fill(node, sa)
        axes = {_output_axis(an, node, a, sa), _output_axis(an, node, b, sb)}
        if sa.degree == sb.degree and len(axes) == 1 and None not in axes:  # e.g. w - mean(w)
            return an._fill(node, _Scaled(sa.degree, axes.pop()))
        raise _Break(_added(node, "a tensor scaled differently"))
    other = b if sa is not None else a
    scaled = sa if sa is not None else sb
    if _is_zero(other):
        return an._fill(node, scaled)
    if isinstance(other, _Ref):
        raise _Break(_added(node))
    subtract = node.op.strip("_").rstrip("_") in ("sub", "subtract", "rsub")
    assert scaled is not None
    eps_target = scaled.reduced and scaled.nonneg and scaled.degree > 0 and not scaled.shifted
    if _is_eps(other) and eps_target and not subtract:
        # `var + eps` in a hand-written norm: followed by its root or a division, or nothing.
        return an._fill(node, _Scaled(scaled.degree, scaled.axis, shifted=True))
    raise _Break(f"is shifted by a constant ({node.label}) before any normalization")


#: The largest constant read as a normalization's eps (PyTorch's norms default to 1e-5, HF's
#: RMSNorm to 1e-6; some Gemma and T5 copies use 1e-3).
_MAX_EPS = 1e-2


def _is_eps(value: Any) -> bool:
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    return real and 0 < value <= _MAX_EPS


@_rule(
    *_names(
        "pow pow_ __pow__ __ipow__ float_power square square_ sqrt sqrt_ rsqrt rsqrt_ "
        "reciprocal reciprocal_"
    ),
)
def _power(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    x = _arg(node, 0, "input")
    scaled = an._st(state, x)
    op = node.op.strip("_").rstrip("_")
    fixed = {"square": 2.0, "sqrt": 0.5, "rsqrt": -0.5, "reciprocal": -1.0}
    exponent = fixed.get(op, _arg(node, 1, "exponent"))
    if scaled is None or isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
        raise _Break(_not_homogeneous(node))
    if scaled.shifted and not (exponent < 0 or 0 < exponent < 1):  # a root or a reciprocal
        raise _Break(f"is shifted by a constant ({node.label}) before any normalization")
    even = float(exponent) % 2 == 0
    nonneg = (even or scaled.nonneg) and not scaled.shifted
    return an._fill(node, _Scaled(scaled.degree * float(exponent), scaled.axis, nonneg=nonneg))


_COMPARISONS = set(_names("gt lt ge le eq ne greater less greater_equal less_equal not_equal"))


@_rule(
    *_COMPARISONS,
    *(f"__{op}__" for op in ("gt", "lt", "ge", "le", "eq", "ne")),
    *_names(
        "sign sgn signbit isnan isinf isfinite isposinf isneginf logical_not nonzero "
        "count_nonzero argwhere any all bool"
    ),
)
def _sign_only(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    """Results that only depend on signs (comparison with zero) do not change at all."""
    op = node.op.strip("_")
    if op in _COMPARISONS:
        a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
        sa, sb = an._st(state, a), an._st(state, b)
        same = sa is not None and sa == sb and sa.axis is None
        if not (same or (sa is not None and _is_zero(b)) or (sb is not None and _is_zero(a))):
            raise _Break(f"is compared with a value that does not scale in {node.label}")
    return _Step([None] * len(node.outputs), (f"{node.label} (sign only)",))


@_rule("where")
def _where(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    if len(node.args) < 3:
        return _Step([None] * len(node.outputs))
    condition, a, b = node.args[0], node.args[1], node.args[2]
    sa, sb = an._st(state, a), an._st(state, b)
    if an._st(state, condition) is not None:
        raise _Break(_not_homogeneous(node))
    if sa is not None and sb is not None and sa == sb and sa.axis is None:
        return an._fill(node, sa)
    if (sa is not None and _is_zero(b)) or (sb is not None and _is_zero(a)):
        scaled = sa if sa is not None else sb
        assert scaled is not None
        if scaled.axis is None:
            return an._fill(node, scaled)
    raise _Break(_not_homogeneous(node))


_REDUCE_DIM_INDEX = {
    **dict.fromkeys(_names("sum nansum mean nanmean amax amin max min median nanmedian std"), 1),
    **dict.fromkeys(_names("var argmax argmin logsumexp"), 1),
    **dict.fromkeys(_names("norm linalg_vector_norm vector_norm"), 2),
}


@_rule(*_REDUCE_DIM_INDEX, "cumsum", "cumsum_", "sort", "argsort", "topk")
def _reduce(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    """Sums, means, maxima, norms, std: homogeneous of degree 1 (var: 2) over reduced dims."""
    x = _arg(node, 0, "input")
    scaled = an._st(state, x)
    an._others_unaffected(node, state, x)
    op = node.op
    if op == "logsumexp" or scaled is None:
        raise _Break(_not_homogeneous(node))
    if op in ("max", "min") and isinstance(_arg(node, 1, "other"), _Ref):
        raise _Break(_not_homogeneous(node))  # elementwise max with a tensor that does not scale
    degree = scaled.degree * (2.0 if op == "var" else 1.0)
    # What a norm's root may be taken of: a reduction of a value >= 0, or a variance or norm.
    base = op.rstrip("_")
    flags = {
        "reduced": base in ("sum", "nansum", "mean", "nanmean", "var", "std", "norm",
                            "linalg_vector_norm", "vector_norm"),
        "nonneg": base in ("var", "std", "norm", "linalg_vector_norm", "vector_norm")
        or (base in ("sum", "nansum", "mean", "nanmean", "amax", "max") and scaled.nonneg),
    }  # fmt: skip
    if op in ("argmax", "argmin"):
        return _Step([None] * len(node.outputs)) if scaled.axis is None else _raise(node)
    if scaled.axis is None:
        return an._fill(node, _Scaled(degree, **flags), integers_invariant=True)
    ndim = an._ndim(x)
    if op in ("cumsum", "cumsum_", "sort", "argsort", "topk"):
        index = {"cumsum": 1, "cumsum_": 1, "sort": 1, "argsort": 1, "topk": 2}[op]
        if _norm_dim(int(_arg(node, index, "dim", -1)), ndim) == scaled.axis:
            _raise(node)
        if op == "argsort":
            return _Step([None] * len(node.outputs))
        return an._fill(node, _Scaled(degree, scaled.axis), integers_invariant=True)
    dim = _arg(node, _REDUCE_DIM_INDEX[op], "dim")
    if isinstance(dim, bool) or (op in ("amax", "amin") and dim == ()):
        dim = None
    if dim is None or (isinstance(dim, tuple) and not dim):
        return _raise(node)
    dims = {_norm_dim(int(d), ndim) for d in (dim if isinstance(dim, tuple) else (dim,))}
    if scaled.axis in dims:
        _raise(node)
    out_ndim = an._out_ndim(node)
    if out_ndim == ndim:
        axis = scaled.axis
    elif out_ndim == ndim - len(dims):
        axis = scaled.axis - sum(1 for d in dims if d < scaled.axis)
    else:
        raise _Break(f"could not follow {node.label}")
    return an._fill(node, _Scaled(degree, axis, **flags), integers_invariant=True)


def _raise(node: _Node) -> _Step:
    raise _Break(f"its channels are mixed with unscaled ones by {node.label}")


@_rule(*_LINEAR_FUNCTIONS)
def _linear_function(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    kind, _, spatial = _LINEAR_FUNCTIONS[node.op]
    groups = _arg(node, 6, "groups", 1)  # same position for conv and conv_transpose
    groups = int(groups) if isinstance(groups, int) else 0
    x, weight, bias = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    return an._linear(node, state, kind, x, weight, bias, spatial, groups)


@_rule(*_MATMUL)
def _matmul(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    a, b = _arg(node, 0, "input"), _arg(node, 1, "other")
    if node.op == "__rmatmul__":
        a, b = b, a
    return an._fill(node, _product_state(an, node, state, a, b))


def _product_state(
    an: _Analysis, node: _Node, state: dict[int, _Scaled], a: Any, b: Any
) -> _Scaled | None:
    """The state of ``a @ b`` (``None``: neither operand is scaled)."""
    sa, sb = an._st(state, a), an._st(state, b)
    nd_a, nd_b, nd_out = an._ndim(a), an._ndim(b), an._out_ndim(node)
    if sa is not None and sb is not None:
        if sa.axis is None and sb.axis is None:
            return _Scaled(sa.degree + sb.degree)
        _raise(node)
    if sa is not None:
        if sa.axis is None:
            return sa
        if nd_a >= 2 and nd_b >= 2 and sa.axis == nd_a - 2:
            return _Scaled(sa.degree, nd_out - 2)
        if nd_a >= 3 and nd_b >= 2 and sa.axis < nd_a - 2:
            return _Scaled(sa.degree, sa.axis + nd_out - nd_a)
        _raise(node)
    if sb is None:
        return None
    if sb.axis is None:
        return sb
    if nd_b >= 2 and sb.axis == nd_b - 1:
        return _Scaled(sb.degree, nd_out - 1)
    if nd_b >= 3 and nd_a >= 2 and sb.axis < nd_b - 2:
        return _Scaled(sb.degree, sb.axis + nd_out - nd_b)
    _raise(node)
    return None


@_rule("addmm", "addmm_", "baddbmm", "baddbmm_", "addbmm", "addbmm_")
def _addmm(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    """``beta * input + alpha * (mat1 @ mat2)`` (GPT-2's ``Conv1D``): a linear map and its bias."""
    bias, a, b = _arg(node, 0, "input"), _arg(node, 1, "mat1"), _arg(node, 2, "mat2")
    beta, alpha = _arg(node, 3, "beta", 1), _arg(node, 4, "alpha", 1)
    if node.op.startswith("addbmm"):  # sums over the batch: channels of a batch are mixed
        scaled = [state[vid] for vid in node.inputs if vid in state]
        if any(s.axis is not None for s in scaled):
            _raise(node)
    for factor in (beta, alpha):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
            raise _Break(_not_homogeneous(node))
    product = _product_state(an, node, state, a, b) if alpha != 0 else None
    shift = an._st(state, bias) if beta != 0 else None
    if product is None and shift is None:
        return _Step([None] * len(node.outputs))
    if product is not None and shift is not None:
        axes = {product.axis, _output_axis(an, node, bias, shift)}
        if product.degree == shift.degree and len(axes) == 1:
            return an._fill(node, product)
        raise _Break(_added(node, "a tensor scaled differently"))
    if beta != 0 and not _is_zero(bias):  # the bias, or the product, does not scale
        raise _Break(_added(node))
    return an._fill(node, product if product is not None else shift)


@_rule("scaled_dot_product_attention")
def _attention(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    """``softmax(q k^T / s) v``: homogeneous in ``v``; ``q``, ``k`` and the mask are not.

    A channel set of ``v`` (its features, or its heads) stays one of the output.
    """
    q, k, v = _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")
    mask = _arg(node, 3, "attn_mask")
    if any(an._st(state, x) is not None for x in (q, k, mask)):
        raise _Break(f"goes through the softmax of {node.label} (scaled_dot_product attention)")
    scaled = an._st(state, v)
    assert scaled is not None
    if scaled.axis is None:
        return an._fill(node, scaled)
    nd_v, nd_out = an._ndim(v), an._out_ndim(node)
    if scaled.axis == nd_v - 2:  # the sequence: weighted sums mix its positions
        _raise(node)
    return an._fill(node, _Scaled(scaled.degree, scaled.axis + nd_out - nd_v))


@_rule("einsum")
def _einsum(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    """Multilinear in its operands: degrees add, channel sets are not followed."""
    scaled = [state[vid] for vid in node.inputs if vid in state]
    if any(s.axis is not None for s in scaled):
        _raise(node)
    return an._fill(node, _Scaled(sum(s.degree for s in scaled)))


@_rule("weight_norm")
def _weight_norm(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    """``torch._weight_norm(v, g, dim) = g * v / |v|``: invariant in ``v``, linear in ``g``."""
    v, g = _arg(node, 0, "v"), _arg(node, 1, "g")
    sv, sg = an._st(state, v), an._st(state, g)
    absorbed: tuple[str, ...] = ()
    if sv is not None:
        dim = _arg(node, 2, "dim", 0)
        whole = dim == -1 or dim is None
        if not (sv.axis is None or (not whole and sv.axis == _norm_dim(int(dim), an._ndim(v)))):
            _raise(node)
        absorbed = (f"weight norm ({node.label})",)
    return _Step(an._fill(node, sg).outputs, absorbed)


@_rule(*_NORM_FUNCTIONS)
def _norm_function(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    x = _arg(node, 0, "input")
    ndim = an._ndim(x)
    op = node.op
    for key, index in _NORM_FUNCTIONS[op].items():
        if an._st(state, _arg(node, index, key)) is not None:
            raise _Break(f"reaches the affine parameters or statistics of {node.label}")
    normalizing = True
    if op in ("batch_norm", "aten_batch_norm"):
        stats = _arg(node, 1 if op == "batch_norm" else 3, "running_mean")
        normalizing = bool(_arg(node, 5, "training", False)) or stats is None
        kept = {1}
    elif op in ("instance_norm", "aten_instance_norm"):
        stats = _arg(node, 1 if op == "instance_norm" else 3, "running_mean")
        normalizing = bool(_arg(node, 5, "use_input_stats", True)) or stats is None
        kept = {0, 1}
    elif op == "group_norm":
        groups = _arg(node, 1, "num_groups")
        kept = {0, 1} if ndim >= 2 and an._shape(x)[1] == groups else {0}
    elif op in ("layer_norm", "rms_norm"):
        shape = _arg(node, 1, "normalized_shape")
        count = len(shape) if isinstance(shape, tuple) else 1
        kept = set(range(ndim - count))
    else:  # normalize: x / |x|_p along ``dim``
        kept = set(range(ndim)) - {_norm_dim(int(_arg(node, 2, "dim", 1)), ndim)}
    name = op.removeprefix("aten_")
    label = f"F.{name} in '{node.where}'" if node.where else f"F.{name}"
    return an._normalized(node, state, x, kept, normalizing, label)


@_rule("copy_")
def _copy(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    source = _arg(node, 1, "src")
    scaled = an._st(state, source)
    if scaled is not None and scaled.axis is not None:
        axis = scaled.axis + an._out_ndim(node) - an._ndim(source)
        return an._fill(node, _Scaled(scaled.degree, axis))
    return an._fill(node, scaled)


@_rule("__setitem__")
def _setitem(an: _Analysis, node: _Node, state: dict[int, _Scaled]) -> _Step:
    target, index, value = node.args[0], node.args[1], node.args[2]
    st, sv = an._st(state, target), an._st(state, value)
    if any(vid in state for vid in _refs(index)):
        raise _Break(_not_homogeneous(node))
    if sv is None:
        if _is_zero(value):
            return an._fill(node, st)  # zeroing entries keeps f(k x) = k f(x)
        raise _Break(f"is partly overwritten with values that do not scale ({node.label})")
    if st is not None:
        if st == sv and st.axis is None:
            return an._fill(node, st)
        raise _Break(_not_homogeneous(node))
    items = index if isinstance(index, tuple) else (index,)
    if sv.axis is None and all(isinstance(i, slice) or i is Ellipsis for i in items):
        restricted = [i for i in items if isinstance(i, slice) and i != slice(None)]
        if Ellipsis not in items and len(restricted) == 1:
            return an._fill(node, _Scaled(sv.degree, items.index(restricted[0])))
        if not restricted:
            return an._fill(node, sv)
    raise _Break(f"is written into part of an unscaled tensor by {node.label}")
