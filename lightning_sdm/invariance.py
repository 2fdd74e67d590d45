"""Which weights of a model are scale-invariant, found by following one real forward pass.

A weight ``w`` is scale-invariant when ``L(k w) = L(w)`` for every ``k > 0``: its output reaches a
normalization (BatchNorm, GroupNorm, LayerNorm, InstanceNorm, RMSNorm, ``F.normalize``, ...) only
through operations that commute with a positive scale (ReLU, max / average pooling, dropout,
reshapes, zero padding, multiplication by constants, linear maps without bias). The bias added
right after the weight belongs to the same invariant unit: only ``(w, b) -> (k w, k b)`` leaves
the loss unchanged. These units are what Spherical Motion Dynamics speaks about; everything else
(the classifier, normalization affine parameters, a conv whose output is added to a residual
before any norm) is not, and must not be mixed into angular-update figures.

How it is found. :class:`ScaleInvarianceTracer` watches one forward pass, eagerly, while it runs:

* forward hooks on every submodule record calls of ``Linear`` / ``ConvNd`` / ``ConvTransposeNd``,
  of normalization modules and of embeddings as single nodes, identified by the module's qualified
  name (never by parameter identity, so it works under DDP and FSDP2, whose forward uses unsharded
  copies of the parameters);
* a :class:`~torch.overrides.TorchFunctionMode` records every other tensor operation (``F.relu``,
  ``x.view``, ``out += identity``, ``F.layer_norm``, the loss...), so custom modules, functional
  code and Python control flow that ``torch.fx`` cannot trace are followed as they execute.

Then, for each candidate unit, a forward propagation over the recorded graph asks what scaling
the unit by ``k`` does to every recorded value: nothing, a positive scale ``k**d`` of the whole
tensor, a scale of some channels only (to decide per-channel invariance), or something else.
A unit is invariant when every scaled value is absorbed by a normalization and none reaches the
model output, a value read into Python, or an operation that is not positively homogeneous.
The first such operation is reported as the reason (``"... added to a tensor that does not
scale with it (add_ in 'layer1.0') ... (e.g. a residual connection)"``).

Granularity follows the statistics of the norm: BatchNorm and InstanceNorm normalise each channel
on its own, so each output channel of the weight (``w[i]`` with ``b[i]``) is invariant on its own
(``channel_invariant=True``); GroupNorm only invariant per group (per channel when
``num_groups == num_channels``); LayerNorm over the features only as a whole tensor.

Everything here is conservative: an operation the tracer does not know breaks invariance, so a
unit can be missed, but a unit that is reported was checked along every recorded path.
:func:`structural_candidates` is a forward-free fallback that only looks at registration order.

Limitations:
    * One pass is seen: a branch not taken (data-dependent control flow) is not analysed, and its
      parameters are reported as unused. Control flow that depends on a scaled value (other than
      its sign) rejects the unit.
    * Scale invariance ignores the ``eps`` of the norms (the usual convention).
    * A norm's own affine parameters and embedding tables are rejected by role, not analysed.
    * A unit is rejected at the first operation that is not positively homogeneous, even if its
      result were later discarded. A constant added right before a mean-subtracting norm is
      removed by it, but is rejected here.
    * In-place changes are followed through views (``Tensor._base``), not through ``detach()``
      or ``.data`` aliases, nor through ops run in other threads or compiled graphs.
    * Granularity is decided per output channel of the weight (``channel_dim``); a channel set
      split across dimensions (``[N, C] -> [N, G, C/G]``) is only followed as a whole unit.
"""

from __future__ import annotations

import heapq
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.overrides import TorchFunctionMode

__all__ = [
    "InvariantUnit",
    "RejectedParameter",
    "InvarianceReport",
    "ScaleInvarianceTracer",
    "find_scale_invariant_units",
    "structural_candidates",
]

TRACE = "trace"
REGISTRATION_ORDER = "registration_order"

NORM_AFFINE_REASON = "normalization affine parameter (applied after the statistics are taken)"
EMBEDDING_REASON = "embedding table: a lookup, not a linear map followed by a normalization"
UNUSED_REASON = "not used in the traced forward"
HEURISTIC_NOTE = (
    "heuristic: registration order is not execution order; confirm every unit with gradient "
    "orthogonality (<w, dL/dw> ~ 0 per unit) before trusting it"
)


# --------------------------------------------------------------------------------------------
# Public results


@dataclass(frozen=True)
class InvariantUnit:
    """A group of parameters that can be scaled together without changing the loss.

    Attributes:
        name: qualified name of the weight parameter, e.g. ``"net.0.weight"``.
        params: all parameters of the unit: ``(weight,)`` or ``(weight, bias)``.
        norm: where the scale is absorbed, e.g. ``"net.1 (BatchNorm2d)"`` or ``"F.layer_norm"``.
        channel_invariant: each output channel (index along ``channel_dim`` of the weight, with
            the matching bias entry) is invariant on its own.
        channel_dim: dimension of the weight that indexes output channels (0 for ``Linear`` and
            ``ConvNd``, 1 for ``ConvTransposeNd`` and for a weight used as ``x @ w``).
    """

    name: str
    params: tuple[str, ...]
    norm: str
    channel_invariant: bool
    channel_dim: int


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

    units: tuple[InvariantUnit, ...]
    rejected: tuple[RejectedParameter, ...]
    method: str
    notes: tuple[str, ...] = ()

    @property
    def invariant_parameters(self) -> tuple[str, ...]:
        """Names of all parameters that belong to an invariant unit."""
        return tuple(name for unit in self.units for name in unit.params)

    def summary(self) -> str:
        """Multi-line human-readable report: units, their granularity, rejections and why.

        Example::

            >>> import torch
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
            >>> print(find_scale_invariant_units(net, torch.randn(16, 4)).summary())
            Scale-invariant units (method: trace): 1
              0.weight + 0.bias  <-  1 (BatchNorm1d); per output channel (dim 0)
            Rejected parameters: 4
              1.weight: normalization affine parameter (applied after the statistics are taken)
              1.bias: normalization affine parameter (applied after the statistics are taken)
              3.weight: output does not reach a normalization: it is returned by the model
              3.bias: bias of '3.weight', which is not scale-invariant
        """
        lines = [f"Scale-invariant units (method: {self.method}): {len(self.units)}"]
        for unit in self.units:
            grain = (
                f"per output channel (dim {unit.channel_dim})"
                if unit.channel_invariant
                else "whole unit only"
            )
            lines.append(f"  {' + '.join(unit.params)}  <-  {unit.norm}; {grain}")
        lines.append(f"Rejected parameters: {len(self.rejected)}")
        lines.extend(f"  {item.name}: {item.reason}" for item in self.rejected)
        lines.extend(f"Note: {note}" for note in self.notes)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Entry points


def find_scale_invariant_units(module: nn.Module, *args: Any, **kwargs: Any) -> InvarianceReport:
    """Run ``module(*args, **kwargs)`` once under a :class:`ScaleInvarianceTracer` and report.

    The forward runs in training mode, because invariance is a property of the training forward
    (BatchNorm normalises with batch statistics there; in eval mode with running statistics it is
    an affine map, and the tracer reports it as such). It runs under ``torch.no_grad()`` with the
    random number generators forked, and afterwards the ``training`` flag of every submodule and
    every buffer (BatchNorm running statistics, ``num_batches_tracked``) are restored: the model is
    left as it was found, and the training-mode switch cannot change what is detected.

    Only the forward is traced; a loss computed outside it is not seen, so the model output counts
    as the place where un-normalized values leave. To include the loss (e.g. an explicit L2
    penalty in ``training_step``), use the tracer around the training step.

    Args:
        module: the model (for DDP pass the wrapped ``.module``; FSDP2 modules work as they are).
        *args: positional inputs of ``module.forward``.
        **kwargs: keyword inputs of ``module.forward``.

    Returns:
        The :class:`InvarianceReport` (``method="trace"``, or the registration-order fallback
        with a note if recording failed).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        >>> report = find_scale_invariant_units(net, torch.randn(4, 3, 8, 8))
        >>> [(u.name, u.params, u.norm, u.channel_invariant) for u in report.units]
        [('0.weight', ('0.weight', '0.bias'), '2 (BatchNorm2d)', True)]
        >>> net.training, int(net[2].num_batches_tracked)  # nothing changed
        (True, 0)
    """
    flags = [(sub, sub.training) for sub in module.modules()]
    saved = [(name, buf.detach().clone()) for name, buf in module.named_buffers()]
    try:
        module.train()
        with _forked_rng(), torch.no_grad():
            tracer = ScaleInvarianceTracer(module)
            with tracer:
                output = module(*args, **kwargs)
            del output
            return tracer.report()
    finally:
        with torch.no_grad():
            for name, value in saved:
                _restore_buffer(module, name, value)
        for sub, flag in flags:
            sub.training = flag


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
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        >>> report = structural_candidates(net)
        >>> [(u.name, u.norm, u.channel_invariant) for u in report.units], report.method
        ([('0.weight', '1 (BatchNorm2d)', True)], 'registration_order')
    """
    modules = list(module.named_modules())
    owner = {id(param): (qual, local) for qual, sub in modules for local, param in _own(sub)}
    found: dict[str, InvariantUnit] = {}
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


class ScaleInvarianceTracer:
    """Context manager that records one forward pass and finds the scale-invariant units in it.

    Usage::

        with ScaleInvarianceTracer(model) as tracer:
            loss = model.training_step(batch, 0)   # or just model(x)
        report = tracer.report()

    Enter it around the forward (and the loss, if wanted) only: not around ``backward()`` or the
    optimizer step, whose in-place updates of the parameters are not part of the model's function.
    The forward must run eagerly in the calling thread (not ``torch.compile``-d, not
    ``nn.DataParallel``); DDP users pass the wrapped ``.module``. The forward is observed, never
    changed: hooks return nothing, recording errors are caught (the report then falls back to
    :func:`structural_candidates` with a note), and on exit, even when the forward raised, all
    hooks are removed and the function mode is left. No tensor is kept: values are tracked
    through weak references, dropped on exit; the recorded graph holds shapes and names only.

    What is observed counts: a BatchNorm running in eval mode (running statistics) is an affine
    map, not a normalization; parameters not used in the recorded pass are rejected as unused.

    Args:
        module: the model whose parameters are classified (names are relative to it).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.LayerNorm(8), nn.Linear(8, 1))
        >>> with ScaleInvarianceTracer(net) as tracer:
        ...     loss = net(torch.randn(5, 4)).square().mean()
        >>> unit, = tracer.report().units
        >>> unit.name, unit.norm, unit.channel_invariant
        ('0.weight', '1 (LayerNorm)', False)
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._active = False
        self._reset()

    def _reset(self) -> None:
        self._graph = _Graph()
        self._handles: list[Any] = []
        self._mode: _RecordingMode | None = None
        self._done = False
        self._failure: str | None = None
        self._report: InvarianceReport | None = None
        # Recording state, all dropped on exit.
        self._names: dict[int, str] = {}
        self._kinds: dict[int, str] = {}
        self._param_names: dict[int, str] = {}
        self._all_names: set[str] = set()
        self._missed_params: set[int] = set()
        self._current: dict[int, tuple[weakref.ref[Tensor], int]] = {}
        self._alive: list[tuple[int, weakref.ref[Tensor]]] = []
        self._aliases: dict[int, tuple[weakref.ref[Tensor], list[weakref.ref[Tensor]]]] = {}
        self._frames: list[_Frame] = []
        self._opaque_depth = 0
        self._busy = 0

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> ScaleInvarianceTracer:
        if self._active:
            raise RuntimeError("ScaleInvarianceTracer is already active.")
        self._reset()  # a tracer records one pass at a time
        self._active = True
        try:
            self._names = {id(sub): qual for qual, sub in self.module.named_modules()}
            self._all_names = {name for name, _ in self.module.named_parameters()}
            for sub in dict.fromkeys(self.module.modules()):
                kind = _module_kind(sub)
                if kind is not None:
                    self._kinds[id(sub)] = kind
                self._handles.append(
                    sub.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
                )
                self._handles.append(
                    sub.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)
                )
            self._index_parameters()
            self._mode = _RecordingMode(self)
            self._mode.__enter__()
        except Exception as error:  # never break the user's forward: record nothing instead
            self._fail(error)
            self._remove_hooks()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(exc_type, exc, traceback)
        finally:
            self._mode = None
            self._remove_hooks()
            self._active = False
            self._done = True
            if exc_type is not None and self._failure is None:
                self._failure = f"the traced code raised {exc_type.__name__}"
            self._finish_recording()

    def report(self) -> InvarianceReport:
        """Classify every parameter of the module from the recorded pass (call after exit)."""
        if self._active or not self._done:
            raise RuntimeError("report() is available after the `with` block has exited.")
        if self._report is None:
            self._report = self._build_report()
            self._graph = _Graph()  # the report is all that is needed from now on
        return self._report

    # -- recording: modules ---------------------------------------------------------------

    def _pre_hook(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._failure is not None:
            return
        self._busy += 1
        try:
            kind = self._kinds.get(id(module))
            if self._opaque_depth > 0:
                self._frames.append(_Frame(module, counted=True))
                self._opaque_depth += 1
            elif kind is not None:
                node = self._start_module_node(module, kind, args, kwargs)
                self._frames.append(_Frame(module, counted=True, node=node))
                self._opaque_depth += 1
            else:
                self._frames.append(_Frame(module, counted=False))
        except Exception as error:
            self._fail(error)
        finally:
            self._busy -= 1

    def _post_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if self._failure is not None:
            return
        self._busy += 1
        try:
            frame = None
            while self._frames:  # pop up to this module's frame, even after a skipped pre-hook
                candidate = self._frames.pop()
                if candidate.counted:
                    self._opaque_depth -= 1
                if candidate.module is module:
                    frame = candidate
                    break
            if frame is not None and frame.node is not None:
                self._finish_node(frame.node, output)
            if module is self.module:
                for tensor in _tensors(output):
                    self._graph.values[self._lookup(tensor)].root_output = True
        except Exception as error:
            self._fail(error)
        finally:
            self._busy -= 1

    def _start_module_node(self, module: nn.Module, kind: str, args: Any, kwargs: Any) -> _Node:
        qual = self._names.get(id(module), "?")
        node = _Node(
            op=kind,
            label=f"'{qual}' ({type(module).__name__})" if qual else f"the model ({kind})",
            args=self._store(tuple(args)),
            kwargs=self._store(dict(kwargs)),
            module=_module_info(module, kind, qual),
        )
        for local, param in _own(module):
            name = _join(qual, local)  # by module name: FSDP2 swaps the tensors during forward
            if name not in self._all_names:  # a tied parameter listed under another name
                name = self._param_name(param) or name
            node.params[local] = self._param_value(param, name)
        node.inputs_objects = list(_tensors((args, kwargs)))
        return node

    # -- recording: functions -------------------------------------------------------------

    def _recording(self) -> bool:
        return self._active and self._failure is None and not self._opaque_depth and not self._busy

    def _start_function_node(self, func: Callable[..., Any], args: Any, kwargs: Any) -> _Node:
        op = _op_name(func)
        where = self._context()
        label = f"{op} in '{where}'" if where else f"{op} in the top-level forward"
        node = _Node(op=op, label=label, args=self._store(tuple(args)), kwargs=self._store(kwargs))
        node.where = where
        node.inputs_objects = list(_tensors((args, kwargs)))
        return node

    def _finish_node(self, node: _Node, output: Any) -> None:
        if node.op in _VALUE_INDEPENDENT and next(_tensors(output), None) is None:
            node.inputs_objects = []
            return  # ``x.shape``, ``x.dim()``...: nothing to follow, nothing to keep
        graph = self._graph
        index = len(graph.nodes)
        graph.nodes.append(node)
        node.inputs = [*_refs((node.args, node.kwargs)), *node.params.values()]
        for vid in dict.fromkeys(node.inputs):
            graph.values[vid].consumers.append(index)
        outputs = list(_tensors(output))
        if node.op == "__setitem__":  # mutates its first argument and returns None
            outputs = node.inputs_objects[:1]
        for tensor in outputs:
            if isinstance(tensor, nn.Parameter):
                continue  # parameters keep one value each; in-place updates of them are ignored
            mutated = any(tensor is source for source in node.inputs_objects)
            node.outputs.append(self._new_value(tensor, index))
            if mutated:
                self._update_aliases(tensor, node, index)
        node.inputs_objects = []

    def _context(self) -> str:
        for frame in reversed(self._frames):
            if not frame.counted:
                return self._names.get(id(frame.module), "?")
        return ""

    # -- recording: values ----------------------------------------------------------------

    def _store(self, obj: Any) -> Any:
        """Copy of a call's arguments with tensors replaced by value references."""
        if isinstance(obj, Tensor):
            return _Ref(self._lookup(obj))
        if isinstance(obj, (tuple, list)):
            return tuple(self._store(item) for item in obj)
        if isinstance(obj, dict):
            return {key: self._store(value) for key, value in obj.items()}
        if obj is None or obj is Ellipsis or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, slice) and all(
            part is None or isinstance(part, int) for part in (obj.start, obj.stop, obj.step)
        ):
            return obj
        if isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return obj
        return _OPAQUE  # keep no references to arbitrary Python objects

    def _lookup(self, tensor: Tensor) -> int:
        if isinstance(tensor, nn.Parameter):
            name = self._param_name(tensor)
            if name is not None:
                return self._param_value(tensor, name)
        entry = self._current.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        return self._new_value(tensor, None)

    def _new_value(self, tensor: Tensor, producer: int | None, *, alias: bool = True) -> int:
        graph = self._graph
        vid = len(graph.values)
        graph.values.append(_Value(tuple(tensor.shape), tensor.dtype, producer))
        entry = self._current.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            graph.values[entry[1]].superseded = True
        ref = weakref.ref(tensor)
        self._current[id(tensor)] = (ref, vid)
        self._alive.append((vid, ref))
        if alias and tensor._base is not None:
            self._register_alias(tensor, tensor._base)
        return vid

    def _param_value(self, param: Tensor, name: str) -> int:
        graph = self._graph
        vid = graph.param_values.get(name)
        if vid is None:
            vid = len(graph.values)
            graph.values.append(_Value(tuple(param.shape), param.dtype, None, param=name))
            graph.param_values[name] = vid
        return vid

    def _index_parameters(self) -> None:
        self._param_names = {id(p): name for name, p in self.module.named_parameters()}

    def _param_name(self, param: Tensor) -> str | None:
        name = self._param_names.get(id(param))
        if name is None and id(param) not in self._missed_params:
            # FSDP2 swaps unsharded copies into the modules during forward: look again.
            self._index_parameters()
            name = self._param_names.get(id(param))
            if name is None:
                self._missed_params.add(id(param))
        return name

    def _register_alias(self, view: Tensor, base: Tensor) -> None:
        group = self._aliases.get(id(base))
        if group is None or group[0]() is not base:
            group = (weakref.ref(base), [])
            self._aliases[id(base)] = group
        group[1].append(weakref.ref(view))

    def _update_aliases(self, tensor: Tensor, node: _Node, index: int) -> None:
        """An in-place op changed ``tensor``: every other live view of its memory changed too."""
        base = tensor._base if tensor._base is not None else tensor
        group = self._aliases.get(id(base))
        if group is None or group[0]() is not base:
            return
        for ref in [group[0], *group[1]]:
            other = ref()
            if other is None or other is tensor:
                continue
            entry = self._current.get(id(other))
            if entry is None or entry[0]() is not other:
                continue
            old = entry[1]
            new = self._new_value(other, index, alias=False)
            node.aliases.append((old, new))
            self._graph.values[old].consumers.append(index)

    def _finish_recording(self) -> None:
        for vid, ref in self._alive:
            self._graph.values[vid].alive = ref() is not None
        self._current.clear()
        self._alive.clear()
        self._aliases.clear()
        self._frames.clear()
        self._param_names.clear()
        self._missed_params.clear()

    def _fail(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = f"recording failed ({type(error).__name__}: {error})"

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- analysis -------------------------------------------------------------------------

    def _build_report(self) -> InvarianceReport:
        if self._failure is not None:
            fallback = structural_candidates(self.module)
            note = f"trace failed: {self._failure}; fell back to registration order"
            return InvarianceReport(
                fallback.units, fallback.rejected, fallback.method, (note, *fallback.notes)
            )
        graph = self._graph
        roles = _Roles.collect(graph)
        analysis = _Analysis(graph)
        units: list[InvariantUnit] = []
        rejected: list[RejectedParameter] = []
        for name, param in self.module.named_parameters():
            if name in roles.bias_of and name not in roles.norm_affine:
                continue  # classified with its weight below
            if name in roles.norm_affine:
                rejected.append(RejectedParameter(name, NORM_AFFINE_REASON))
            elif name in roles.embedding:
                rejected.append(RejectedParameter(name, EMBEDDING_REASON))
            elif name not in graph.param_values:
                rejected.append(RejectedParameter(name, UNUSED_REASON))
            else:
                unit, reason = analysis.classify(name, roles, param.dim())
                if unit is not None:
                    units.append(unit)
                else:
                    rejected.append(RejectedParameter(name, reason))
        reported = {*(p for unit in units for p in unit.params), *(r.name for r in rejected)}
        for name, _ in self.module.named_parameters():
            if name in reported:
                continue
            weight = roles.bias_of.get(name)
            reason = f"bias of '{weight}', which is not scale-invariant" if weight else "unknown"
            rejected.append(RejectedParameter(name, reason))
        order = {name: i for i, (name, _) in enumerate(self.module.named_parameters())}
        rejected.sort(key=lambda item: order.get(item.name, len(order)))
        notes = () if graph.nodes else ("nothing was recorded: did the forward run inside?",)
        return InvarianceReport(tuple(units), tuple(rejected), TRACE, notes)


# --------------------------------------------------------------------------------------------
# Recorded graph


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


class _RecordingMode(TorchFunctionMode):
    """Records tensor operations run outside the opaque (hooked) modules."""

    def __init__(self, tracer: ScaleInvarianceTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        tracer = self.tracer
        if not tracer._recording():
            return func(*args, **kwargs)
        node = None
        try:  # inputs are resolved before the call: an in-place op changes them
            node = tracer._start_function_node(func, args, kwargs)
        except Exception as error:
            tracer._fail(error)
        output = func(*args, **kwargs)
        if node is not None and tracer._failure is None:
            try:
                tracer._finish_node(node, output)
            except Exception as error:
                tracer._fail(error)
        return output


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


# --------------------------------------------------------------------------------------------
# Module kinds


_LINEAR_KINDS = ("linear", "conv", "conv_transpose")
_NORM_KINDS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")
_RMSNorm: type[nn.Module] | None = getattr(nn, "RMSNorm", None)


def _module_kind(module: nn.Module) -> str | None:
    """Modules recorded as one node (only leaves: a parametrized layer is followed inside)."""
    if next(module.children(), None) is not None:
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


def _own(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters(recurse=False) if p is not None]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --------------------------------------------------------------------------------------------
# Roles of parameters in the recorded graph

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
                names = {local: param[vid] for local, vid in node.params.items()}
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


# --------------------------------------------------------------------------------------------
# Propagation of a scaling through the recorded graph


@dataclass(frozen=True)
class _Scaled:
    """The value is multiplied by ``k**degree`` where the unit is scaled by ``k``.

    ``axis=None``: the whole tensor is. ``axis=a``: some indices along dimension ``a`` are (all
    elements with those indices, uniformly), everything else is unchanged.
    """

    degree: float
    axis: int | None = None


_State = _Scaled | None


class _Break(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Step:
    outputs: list[_State]
    absorbed: tuple[str, ...] = ()


class _Analysis:
    def __init__(self, graph: _Graph) -> None:
        self.graph = graph

    def classify(self, name: str, roles: _Roles, ndim: int) -> tuple[InvariantUnit | None, str]:
        params = roles.units.get(name, [name])
        channel_dim = roles.channel_dim.get(name, 0)
        vids = [self.graph.param_values[p] for p in params if p in self.graph.param_values]
        whole = {vid: _Scaled(1.0) for vid in vids}
        reason, absorbed = self.propagate(whole)
        if reason is not None:
            return None, reason
        per_channel = False
        if ndim > channel_dim:
            seeds = {vid: _Scaled(1.0, channel_dim if i == 0 else 0) for i, vid in enumerate(vids)}
            per_channel = self.propagate(seeds)[0] is None
        norm = ", ".join(dict.fromkeys(absorbed))
        return InvariantUnit(name, tuple(params), norm, per_channel, channel_dim), ""

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
        if node.module is not None:
            return self._module_rule(node, state)
        rule = _RULES.get(node.op)
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
            return self._fill(node, _Scaled(sw.degree, out_axis))
        raise _Break(f"its output channels are not separable in {node.label}")


# -- rules for recorded functions ---------------------------------------------------------

_Rule = Callable[[_Analysis, _Node, dict[int, _Scaled]], _Step]
_RULES: dict[str, _Rule] = {}


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _rule(*names: str) -> Callable[[_Rule], _Rule]:
    def register(fn: _Rule) -> _Rule:
        for name in names:
            _RULES[name] = fn
        return fn

    return register


def _arg(node: _Node, index: int, name: str, default: Any = None) -> Any:
    if isinstance(node.kwargs, dict) and name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


def _not_homogeneous(node: _Node) -> str:
    return f"reaches {node.label}, which is not positively homogeneous, before any normalization"


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
    return an._fill(node, an._st(state, x))


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
    if axis is None:
        raise _Break(f"its channels are split across dimensions by {node.label}")
    return an._fill(node, _Scaled(scaled.degree, axis))


def _reshape_axis(shape: Sequence[int], out: Sequence[int], axis: int) -> int | None:
    """Output axis whose index determines the input index along ``axis`` (row-major order)."""
    size, rest = shape[axis], math.prod(shape[axis + 1 :])
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
    return an._fill(node, _Scaled(scaled.degree, perm.index(scaled.axis)))


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
    return an._fill(node, _Scaled(scaled.degree, scaled.axis + an._out_ndim(node) - an._ndim(x)))


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
    sign = -1.0 if divide else 1.0
    out_ndim = an._out_ndim(node)
    if sa is not None and sb is not None:
        if sa.axis is None and sb.axis is None:
            return an._fill(node, _Scaled(sa.degree + sign * sb.degree))
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
        raise _Break(_added(node, "a tensor scaled differently"))
    other = b if sa is not None else a
    if _is_zero(other):
        return an._fill(node, sa if sa is not None else sb)
    if isinstance(other, _Ref):
        raise _Break(_added(node))
    raise _Break(f"is shifted by a constant ({node.label}) before any normalization")


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
    return an._fill(node, _Scaled(scaled.degree * float(exponent), scaled.axis))


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
    if op in ("argmax", "argmin"):
        return _Step([None] * len(node.outputs)) if scaled.axis is None else _raise(node)
    if scaled.axis is None:
        return an._fill(node, _Scaled(degree), integers_invariant=True)
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
    return an._fill(node, _Scaled(degree, axis), integers_invariant=True)


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
    sa, sb = an._st(state, a), an._st(state, b)
    nd_a, nd_b, nd_out = an._ndim(a), an._ndim(b), an._out_ndim(node)
    if sa is not None and sb is not None:
        if sa.axis is None and sb.axis is None:
            return an._fill(node, _Scaled(sa.degree + sb.degree))
        _raise(node)
    if sa is not None:
        if sa.axis is None:
            return an._fill(node, sa)
        if nd_a >= 2 and nd_b >= 2 and sa.axis == nd_a - 2:
            return an._fill(node, _Scaled(sa.degree, nd_out - 2))
        if nd_a >= 3 and nd_b >= 2 and sa.axis < nd_a - 2:
            return an._fill(node, _Scaled(sa.degree, sa.axis + nd_out - nd_a))
        _raise(node)
    assert sb is not None
    if sb.axis is None:
        return an._fill(node, sb)
    if nd_b >= 2 and sb.axis == nd_b - 1:
        return an._fill(node, _Scaled(sb.degree, nd_out - 1))
    if nd_b >= 3 and nd_a >= 2 and sb.axis < nd_b - 2:
        return an._fill(node, _Scaled(sb.degree, sb.axis + nd_out - nd_b))
    return _raise(node)


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


# --------------------------------------------------------------------------------------------
# Registration-order heuristic

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
    found: dict[str, InvariantUnit],
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
    found[weight] = InvariantUnit(weight, params, norm_label, per_channel, channel_dim)


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


# --------------------------------------------------------------------------------------------
# Side-effect protection for find_scale_invariant_units


def _forked_rng() -> Any:
    devices: list[int] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = [torch.cuda.current_device()]
    return torch.random.fork_rng(devices=devices)


def _restore_buffer(module: nn.Module, name: str, value: Tensor) -> None:
    try:
        buffer = module.get_buffer(name)
    except AttributeError:
        return
    if buffer is not None and buffer.shape == value.shape:
        buffer.copy_(value)
