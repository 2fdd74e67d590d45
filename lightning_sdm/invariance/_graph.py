"""The recorded forward pass: values, nodes, module kinds, and ops that carry no value."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm


class _OpaqueArg:
    def __repr__(self) -> str:
        return "<opaque>"


_OPAQUE = _OpaqueArg()


@dataclass(frozen=True)
class _Ref:
    vid: int


@dataclass
class _Value:
    shape: tuple[int, ...]
    dtype: torch.dtype
    producer: int | None
    param: str | None = None
    consumers: list[int] = field(default_factory=list)
    superseded: bool = False
    alive: bool = False
    root_output: bool = False


@dataclass
class _ModuleInfo:
    kind: str
    qual: str
    cls: str
    attrs: dict[str, Any]


@dataclass
class _Node:
    op: str
    label: str
    args: Any
    kwargs: Any
    module: _ModuleInfo | None = None
    where: str = ""
    params: dict[str, int] = field(default_factory=dict)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    aliases: list[tuple[int, int]] = field(default_factory=list)
    inputs_objects: list[Tensor] = field(default_factory=list)  # only while the call runs


@dataclass
class _Graph:
    nodes: list[_Node] = field(default_factory=list)
    values: list[_Value] = field(default_factory=list)
    param_values: dict[str, int] = field(default_factory=dict)


@dataclass
class _Frame:
    module: nn.Module
    counted: bool
    node: _Node | None = None


def _op_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", type(func).__name__)
    if name == "__get__":  # attribute access such as ``x.T`` or ``x.shape``
        owner = getattr(func, "__self__", None)
        return "get:" + str(getattr(owner, "__name__", "?"))
    if func is torch.batch_norm or func is torch.instance_norm:
        return "aten_" + name  # argument order differs from the torch.nn.functional version
    if name.startswith("_") and not name.startswith("__"):
        name = name.lstrip("_")  # F.max_pool2d dispatches through ``_max_pool2d``
    return name


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _refs(obj: Any) -> Iterator[int]:
    if isinstance(obj, _Ref):
        yield obj.vid
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _refs(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _refs(item)


def _arg(node: _Node, index: int, name: str, default: Any = None) -> Any:
    if isinstance(node.kwargs, dict) and name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Module kinds

_LINEAR_KINDS = ("linear", "conv", "conv_transpose")
_NORM_KINDS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")
_RMSNorm: type[nn.Module] | None = getattr(nn, "RMSNorm", None)


def _stock_forwards() -> set[Any]:
    classes: list[Any] = [
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
        _BatchNorm,
        nn.SyncBatchNorm,
        _InstanceNorm,
        nn.GroupNorm,
        nn.LayerNorm,
        nn.Embedding,
        nn.EmbeddingBag,
    ]
    if _RMSNorm is not None:
        classes.append(_RMSNorm)
    return {cls.forward for cls in classes}


_STOCK_FORWARDS = _stock_forwards()


def _module_kind(module: nn.Module) -> str | None:
    """Modules recorded as one node: leaves whose ``forward`` is PyTorch's own.

    A subclass with its own ``forward`` (timm's ``LayerNorm2d`` permutes NCHW to NHWC and
    normalises over the channels; a weight-standardised conv; a LoRA linear) is followed inside,
    op by op, so what is decided is what actually runs, not what the class suggests. A
    parametrized layer is followed inside too (it has children).
    """
    if next(module.children(), None) is not None:
        return None
    if type(module).forward not in _STOCK_FORWARDS:
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _ConvTransposeNd):
        return "conv_transpose"
    if isinstance(module, _ConvNd):
        return "conv"
    if isinstance(module, _BatchNorm):
        return "batch_norm"
    if isinstance(module, _InstanceNorm):
        return "instance_norm"
    if isinstance(module, nn.GroupNorm):
        return "group_norm"
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if _RMSNorm is not None and isinstance(module, _RMSNorm):
        return "rms_norm"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return None


def _module_info(module: nn.Module, kind: str, qual: str) -> _ModuleInfo:
    attrs: dict[str, Any] = {}
    if kind in ("conv", "conv_transpose"):
        attrs["spatial"] = len(getattr(module, "kernel_size", ()))
        attrs["groups"] = int(getattr(module, "groups", 1))
    elif kind == "batch_norm":
        # nn.BatchNorm normalises with batch statistics in training, or without running stats.
        no_stats = getattr(module, "running_mean", None) is None
        attrs["normalizing"] = bool(module.training or no_stats)
    elif kind == "instance_norm":
        tracked = bool(getattr(module, "track_running_stats", False))
        attrs["normalizing"] = bool(module.training or not tracked)
        attrs["unbatched_ndim"] = int(module._get_no_batch_dim())  # type: ignore[operator]
    elif kind == "group_norm":
        attrs["num_groups"] = int(getattr(module, "num_groups", 1))
    elif kind in ("layer_norm", "rms_norm"):
        shape = getattr(module, "normalized_shape", ())
        attrs["normalized_ndim"] = 1 if isinstance(shape, int) else len(shape)
    return _ModuleInfo(kind, qual, type(module).__name__, attrs)


# The tensors the stock forward of a recorded module reads (a computed ``weight``, e.g. set by the
# old ``torch.nn.utils.weight_norm`` hook, included; other parameters are read elsewhere).
MODULE_INPUTS = ("weight", "bias")


def _own(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters(recurse=False) if p is not None]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# Ops whose result does not depend on the values of their inputs, and ops that read a value into
# Python.
_VALUE_INDEPENDENT = set(
    _names(
        "zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros "
        "new_ones new_empty new_full size dim ndimension numel nelement stride storage_offset "
        "is_contiguous is_floating_point is_complex element_size data_ptr untyped_storage "
        "__len__ get_device __repr__ __str__ __format__ dim_order fill_ zero_ register_hook "
        "retain_grad __hash__ normal_ uniform_"
    )
)
_VALUE_INDEPENDENT |= {
    "get:" + name
    for name in _names(
        "shape dtype device ndim requires_grad is_leaf grad grad_fn layout names is_cuda is_cpu "
        "is_sparse is_quantized is_meta is_nested itemsize nbytes output_nr _version"
    )
}
_PYTHON_READS = set(
    _names(
        "item tolist __bool__ __float__ __int__ __index__ __complex__ numpy __array__ equal "
        "allclose is_nonzero"
    )
)
