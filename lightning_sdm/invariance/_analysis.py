"""Following a scaling of one unit through the recorded graph.

The transfer functions of the individual ops are in :mod:`lightning_sdm.invariance._rules`.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_sdm.invariance._graph import (
    _LINEAR_KINDS,
    _NORM_KINDS,
    _PYTHON_READS,
    _VALUE_INDEPENDENT,
    _arg,
    _Graph,
    _Node,
    _Ref,
)
from lightning_sdm.invariance._roles import _Roles
from lightning_sdm.units import Unit


@dataclass(frozen=True)
class _Scaled:
    """The value is multiplied by ``k**degree`` where the unit is scaled by ``k``.

    ``axis=None``: the whole tensor is. ``axis=a``: some indices along dimension ``a`` are (all
    elements with those indices, uniformly), everything else is unchanged.
    """

    degree: float
    axis: int | None = None
    #: Plus a small positive constant: a normalization's ``eps`` (``var + eps``), allowed only on
    #: its way into the root or the division that normalizes (see ``_EPS_CONSUMERS``).
    shifted: bool = False
    #: With ``axis``: the scaled indices are whole blocks of ``group`` consecutive ones (the
    #: channels of one attention head). A rule that does not know it builds a new state with
    #: ``group=1`` (any subset), which assumes less: sound, only less precise.
    group: int = 1
    #: Known to be >= 0 (a square, an absolute value, a variance, a norm) and the result of a
    #: reduction (a mean, a sum, a norm): what a norm's root is taken of. Only such a value may
    #: take an eps (``mean(h**2) + eps``): added to anything else, a constant is a shift.
    nonneg: bool = False
    reduced: bool = False


_State = _Scaled | None

#: Ops that may take a value shifted by an eps: casts and copies (HF's RMSNorm computes in
#: float32), the root, the reciprocal, and a division by it. Whatever else meets it breaks, as
#: any constant added before a normalization does. The convention is the norms' own: the
#: ``eps`` of ``nn.LayerNorm``/``nn.RMSNorm`` is ignored, so the same ``eps`` written by hand is.
_EPS_CONSUMER_NAMES = (
    "float double half bfloat16 to type type_as clone contiguous detach expand expand_as "
    "broadcast_to pow __pow__ float_power sqrt rsqrt reciprocal div __truediv__ divide true_divide"
)
_EPS_CONSUMERS = frozenset(_EPS_CONSUMER_NAMES.split())


class _Break(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Step:
    outputs: list[_State]
    absorbed: tuple[str, ...] = ()


class _Analysis:
    def __init__(self, graph: _Graph, rules: Mapping[str, Rule]) -> None:
        self.graph = graph
        self.rules = rules
        self._blocks: dict[int, set[int]] | None = None

    def classify(self, name: str, roles: _Roles, ndim: int) -> tuple[Unit | None, str]:
        params = roles.units.get(name, [name])
        channel_dim = roles.channel_dim.get(name, 0)
        vids = [self.graph.param_values[p] for p in params if p in self.graph.param_values]
        whole = {vid: _Scaled(1.0) for vid in vids}
        reason, absorbed = self.propagate(whole)
        if reason is not None:
            return None, reason
        per_channel, group = False, 1
        if ndim > channel_dim:
            channels = self.graph.values[vids[0]].shape[channel_dim] if vids else 0
            # One output channel on its own, else the smallest block of channels that a reshape
            # splits off (the q/k projection's heads, normalised each by a QK-norm).
            for size in [1, *self._block_sizes(channels)]:
                seeds = {
                    vid: _Scaled(1.0, channel_dim if i == 0 else 0, group=size)
                    for i, vid in enumerate(vids)
                }
                if self.propagate(seeds)[0] is None:
                    per_channel, group = True, size
                    break
        norm = ", ".join(dict.fromkeys(absorbed))
        unit = Unit(
            name, tuple(params), channel_dim, per_channel, norm=norm, source="trace",
            channel_group=group,
        )  # fmt: skip
        return unit, ""

    def _block_sizes(self, channels: int) -> list[int]:
        """Block sizes a reshape may have split the channels into (attention heads).

        The sizes ``g`` with ``channels = h * g`` (``h > 1``) that some recorded value's shape
        holds as ``(..., h, g, ...)``.
        """
        if self._blocks is None:  # the graph's (h, g) pairs, read once for all units
            self._blocks = {}
            for value in self.graph.values:
                for h, g in itertools.pairwise(value.shape):
                    if h > 1 and g > 1:
                        self._blocks.setdefault(h * g, set()).add(g)
        return sorted(self._blocks.get(channels, ()))

    def propagate(self, seeds: dict[int, _Scaled]) -> tuple[str | None, list[str]]:
        """Follow the scaling of the seeds; return (reason it is not invariant, absorbers)."""
        absorbed: list[str] = []
        try:
            self._follow(seeds, absorbed)
        except _Break as broken:
            return broken.reason, absorbed
        if not absorbed:
            return "scaling it does not reach a normalization in the traced forward", absorbed
        return None, absorbed

    def _follow(self, seeds: dict[int, _Scaled], absorbed: list[str]) -> None:
        """Visit, in recording order, every node reached by the scaled values (raises _Break)."""
        values, nodes = self.graph.values, self.graph.nodes
        state: dict[int, _Scaled] = {}
        pending: list[int] = []

        def assign(vid: int, new: _State) -> None:
            new = self._normalize(vid, new)
            if new is None:
                state.pop(vid, None)
                return
            state[vid] = new
            value = values[vid]
            if value.root_output and not value.consumers:
                raise _Break("output does not reach a normalization: it is returned by the model")
            if not value.consumers and not value.superseded and value.alive:
                raise _Break("output leaves the traced code un-normalized (still referenced)")
            for consumer in value.consumers:
                heapq.heappush(pending, consumer)

        for vid, seed in seeds.items():
            assign(vid, seed)
        done: set[int] = set()
        while pending:
            index = heapq.heappop(pending)
            if index in done:
                continue
            done.add(index)
            node = nodes[index]
            try:
                step = self._transfer(node, state)
                after = step.outputs[0] if step.outputs else None
                aliases = [
                    (new, self._alias_state(node, state, old, after)) for old, new in node.aliases
                ]
            except _Break:
                raise
            except Exception as error:  # a rule met arguments it does not understand
                raise _Break(f"could not follow {node.label} ({type(error).__name__})") from None
            absorbed.extend(step.absorbed)
            if any(out is not None and out.degree == 0 for out in step.outputs):
                # A ratio of scaled values (weight standardisation, a hand-written norm): the
                # scale cancels, which is an invariance of its own.
                absorbed.append(f"{node.label} (the scale cancels)")
            for vid, new in [*zip(node.outputs, step.outputs, strict=True), *aliases]:
                assign(vid, new)

    def _normalize(self, vid: int, new: _State) -> _State:
        if new is None or new.degree == 0:
            return None
        shape = self.graph.values[vid].shape
        if new.axis is not None:
            if not 0 <= new.axis < len(shape):
                raise _Break("lost track of the scaled channels")
            if shape[new.axis] == 1:  # a subset of a size-1 axis is all of it
                return _Scaled(new.degree)
        return new

    def _alias_state(
        self, node: _Node, state: dict[int, _Scaled], old: int, after: _State
    ) -> _State:
        """State of another view of the memory that ``node`` changed in place."""
        before = state.get(node.inputs[0]) if node.inputs else None
        if node.outputs and before == self._normalize(node.outputs[0], after):
            return state.get(old)
        raise _Break(f"{node.label} changes it in place through another view of the same memory")

    # -- transfer functions -----------------------------------------------------------------

    def _transfer(self, node: _Node, state: dict[int, _Scaled]) -> _Step:
        if not any(vid in state for vid in node.inputs):
            return _Step([None] * len(node.outputs))
        shifted = any(state[vid].shifted for vid in node.inputs if vid in state)
        if shifted and (node.module is not None or node.op not in _EPS_CONSUMERS):
            raise _Break(
                f"is shifted by a constant before any normalization (then used by {node.label}; "
                "a small constant is ignored only as an eps inside a normalization's root)"
            )
        if node.module is not None:
            return self._module_rule(node, state)
        rule = self.rules.get(node.op)
        if rule is None:
            if node.op in _VALUE_INDEPENDENT:
                return _Step([None] * len(node.outputs))
            if node.op in _PYTHON_READS:
                raise _Break(f"its value is read into Python by {node.label} before normalization")
            raise _Break(_not_homogeneous(node))
        return rule(self, node, state)

    def _module_rule(self, node: _Node, state: dict[int, _Scaled]) -> _Step:
        info = node.module
        assert info is not None
        x = _arg(node, 0, "input")
        if info.kind in _LINEAR_KINDS:
            weight = _Ref(node.params["weight"]) if "weight" in node.params else None
            bias = _Ref(node.params["bias"]) if "bias" in node.params else None
            spatial = int(info.attrs.get("spatial", 0))
            groups = int(info.attrs.get("groups", 1))
            return self._linear(node, state, info.kind, x, weight, bias, spatial, groups)
        if info.kind in _NORM_KINDS:
            for vid in node.params.values():
                if vid in state:
                    raise _Break(f"reaches the affine parameters of {node.label}")
            ndim = self._ndim(x)
            if info.kind == "batch_norm":
                kept, ok = {1}, bool(info.attrs["normalizing"])
            elif info.kind == "instance_norm":
                ok = bool(info.attrs["normalizing"])
                kept = {0} if ndim == info.attrs["unbatched_ndim"] else {0, 1}
            elif info.kind == "group_norm":
                groups = int(info.attrs["num_groups"])
                kept = {0, 1} if ndim >= 2 and self._shape(x)[1] == groups else {0}
                ok = True
            else:
                kept, ok = set(range(ndim - int(info.attrs["normalized_ndim"]))), True
            label = f"{info.qual} ({info.cls})" if info.qual else f"the model ({info.cls})"
            return self._normalized(node, state, x, kept, ok, label)
        raise _Break(_not_homogeneous(node))

    # Helpers shared by the rules.

    def _st(self, state: dict[int, _Scaled], obj: Any) -> _State:
        return state.get(obj.vid) if isinstance(obj, _Ref) else None

    def _shape(self, obj: Any) -> tuple[int, ...]:
        if not isinstance(obj, _Ref):
            raise _Break("lost track of a tensor argument")
        return self.graph.values[obj.vid].shape

    def _ndim(self, obj: Any) -> int:
        return len(self._shape(obj))

    def _out_ndim(self, node: _Node, index: int = 0) -> int:
        return len(self.graph.values[node.outputs[index]].shape)

    def _others_unaffected(self, node: _Node, state: dict[int, _Scaled], data: Any) -> None:
        skip = data.vid if isinstance(data, _Ref) else -1
        if any(vid in state for vid in node.inputs if vid != skip):
            raise _Break(_not_homogeneous(node))

    def _fill(self, node: _Node, new: _State, *, integers_invariant: bool = False) -> _Step:
        outputs: list[_State] = []
        for vid in node.outputs:
            dtype = self.graph.values[vid].dtype
            if new is None or dtype.is_floating_point or dtype.is_complex:
                outputs.append(new)
            elif integers_invariant:
                outputs.append(None)  # indices / masks: unchanged by a positive scale
            else:
                raise _Break(f"is converted to {dtype} by {node.label}")
        return _Step(outputs)

    def _normalized(
        self,
        node: _Node,
        state: dict[int, _Scaled],
        x: Any,
        kept: set[int],
        normalizing: bool,
        label: str,
    ) -> _Step:
        self._others_unaffected(node, state, x)
        scaled = self._st(state, x)
        if scaled is None:
            return _Step([None] * len(node.outputs))
        if not normalizing:
            raise _Break(
                f"reaches {node.label}, which uses running statistics here (eval mode): an affine "
                "map, not a normalization"
            )
        if scaled.axis is not None and scaled.axis not in kept:
            raise _Break(f"is mixed with unscaled values in the statistics of {node.label}")
        return _Step([None] * len(node.outputs), (label,))

    def _linear(
        self,
        node: _Node,
        state: dict[int, _Scaled],
        kind: str,
        x: Any,
        weight: Any,
        bias: Any,
        spatial: int,
        groups: int,
    ) -> _Step:
        sx, sw, sb = self._st(state, x), self._st(state, weight), self._st(state, bias)
        has_bias = isinstance(bias, _Ref)
        out_ndim = self._out_ndim(node)
        if sx is not None:
            if has_bias:
                raise _Break(f"output gets a bias that does not scale with it in {node.label}")
            if sw is not None:
                if sx.axis is None and sw.axis is None:
                    return self._fill(node, _Scaled(sx.degree + sw.degree))
                raise _Break(_not_homogeneous(node))
            if sx.axis is None:
                return self._fill(node, sx)
            x_ndim = self._ndim(x)
            if kind == "linear" and sx.axis < x_ndim - 1:
                return self._fill(node, _Scaled(sx.degree, sx.axis + out_ndim - x_ndim))
            if kind != "linear" and sx.axis == 0 and x_ndim == spatial + 2:
                return self._fill(node, sx)
            raise _Break(f"its channels are mixed by {node.label}")
        if sw is None:
            raise _Break(f"is added as a bias in {node.label} whose weight does not scale")
        if has_bias and (sb is None or sb.degree != sw.degree):
            raise _Break(f"a bias that does not scale with it is added in {node.label}")
        if sw.axis is None and (sb is None or sb.axis is None):
            return self._fill(node, sw)
        channel_dim = 1 if kind == "conv_transpose" else 0
        aligned = sb is None or sb.axis == 0
        if sw.axis == channel_dim and aligned and (kind != "conv_transpose" or groups == 1):
            out_axis = out_ndim - 1 if kind == "linear" else out_ndim - spatial - 1
            return self._fill(node, _Scaled(sw.degree, out_axis, group=sw.group))
        raise _Break(f"its output channels are not separable in {node.label}")


#: A transfer function: the scaling of a node's outputs, given that of its inputs.
Rule = Callable[[_Analysis, _Node, dict[int, _Scaled]], _Step]


def _not_homogeneous(node: _Node) -> str:
    return f"reaches {node.label}, which is not positively homogeneous, before any normalization"
