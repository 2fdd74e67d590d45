"""What each parameter is used as in the recorded graph: a linear map's weight, a bias, ..."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_sdm.invariance._graph import _LINEAR_KINDS, _NORM_KINDS, _arg, _Graph, _Ref

_LINEAR_FUNCTIONS = {
    "linear": ("linear", 0, 0),
    "conv1d": ("conv", 0, 1),
    "conv2d": ("conv", 0, 2),
    "conv3d": ("conv", 0, 3),
    "conv_transpose1d": ("conv_transpose", 1, 1),
    "conv_transpose2d": ("conv_transpose", 1, 2),
    "conv_transpose3d": ("conv_transpose", 1, 3),
}
_MATMUL = {"matmul", "mm", "bmm", "__matmul__", "__rmatmul__"}
# Functional norms: (index of the data-independent affine / statistics arguments).
_NORM_FUNCTIONS = {
    "batch_norm": {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4},
    "aten_batch_norm": {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4},
    "instance_norm": {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4},
    "aten_instance_norm": {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4},
    "group_norm": {"weight": 2, "bias": 3},
    "layer_norm": {"weight": 2, "bias": 3},
    "rms_norm": {"weight": 2},
    "normalize": {},
}


@dataclass
class _Roles:
    """What each parameter is used as: the weight of a linear map (with its biases), etc."""

    units: dict[str, list[str]] = field(default_factory=dict)  # weight -> [weight, *biases]
    channel_dim: dict[str, int] = field(default_factory=dict)
    bias_of: dict[str, str] = field(default_factory=dict)
    norm_affine: set[str] = field(default_factory=set)
    embedding: set[str] = field(default_factory=set)

    @classmethod
    def collect(cls, graph: _Graph) -> _Roles:
        roles = cls()
        param = {vid: v.param for vid, v in enumerate(graph.values) if v.param is not None}

        def name_of(arg: Any) -> str | None:
            return param.get(arg.vid) if isinstance(arg, _Ref) else None

        for node in graph.nodes:
            if node.module is not None:
                # Parameters only (a computed weight is a recorded value: its role comes from
                # the ops that made it).
                names = {local: param[vid] for local, vid in node.params.items() if vid in param}
                kind = node.module.kind
                if kind in _NORM_KINDS:
                    roles.norm_affine.update(names.values())
                elif kind == "embedding":
                    roles.embedding.update(names.values())
                elif kind in _LINEAR_KINDS and "weight" in names:
                    roles.add(names["weight"], names.get("bias"), int(kind == "conv_transpose"))
            elif node.op in _LINEAR_FUNCTIONS:
                weight = name_of(_arg(node, 1, "weight"))
                if weight is not None:
                    bias = name_of(_arg(node, 2, "bias"))
                    roles.add(weight, bias, _LINEAR_FUNCTIONS[node.op][1])
            elif node.op in _MATMUL:
                left, right = _arg(node, 0, "input"), _arg(node, 1, "other")
                if node.op == "__rmatmul__":
                    left, right = right, left
                for operand, offset in ((left, 2), (right, 1)):
                    name = name_of(operand)
                    if name is not None and isinstance(operand, _Ref):
                        ndim = len(graph.values[operand.vid].shape)
                        if ndim >= 2:
                            roles.add(name, None, ndim - offset)
            elif node.op.rstrip("_") in ("addmm", "baddbmm", "addbmm"):
                # beta * bias + mat1 @ mat2 (GPT-2's Conv1D: x @ W with W of shape [in, out]).
                bias = name_of(_arg(node, 0, "input"))
                for index, key, offset in ((2, "mat2", 1), (1, "mat1", 2)):
                    operand = _arg(node, index, key)
                    name = name_of(operand)
                    if name is not None and isinstance(operand, _Ref):
                        ndim = len(graph.values[operand.vid].shape)
                        if ndim >= 2:
                            roles.add(name, bias, ndim - offset)
                            break
            elif node.op in _NORM_FUNCTIONS:
                for key, index in _NORM_FUNCTIONS[node.op].items():
                    name = name_of(_arg(node, index, key))
                    if name is not None:
                        roles.norm_affine.add(name)
            elif node.op in ("embedding", "embedding_bag"):
                name = name_of(_arg(node, 1, "weight"))
                if name is not None:
                    roles.embedding.add(name)
        return roles

    def add(self, weight: str, bias: str | None, channel_dim: int) -> None:
        if weight in self.bias_of:
            return
        unit = self.units.setdefault(weight, [weight])
        self.channel_dim.setdefault(weight, channel_dim)
        if bias is not None and bias != weight and bias not in self.bias_of:
            if bias in self.units:  # used as a weight elsewhere: keep it a unit of its own
                return
            unit.append(bias)
            self.bias_of[bias] = weight
