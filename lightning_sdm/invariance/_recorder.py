"""Recording one forward pass (module hooks and a TorchFunctionMode), and the report built on it."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_sdm._compile import outside_compile
from lightning_sdm.invariance._analysis import _Analysis
from lightning_sdm.invariance._graph import (
    _OPAQUE,
    _VALUE_INDEPENDENT,
    MODULE_INPUTS,
    _Frame,
    _Graph,
    _join,
    _module_info,
    _module_kind,
    _Node,
    _op_name,
    _own,
    _Ref,
    _refs,
    _tensors,
    _Value,
)
from lightning_sdm.invariance._report import (
    EMBEDDING_REASON,
    NORM_AFFINE_REASON,
    TRACE,
    UNUSED_REASON,
    InvarianceReport,
    RejectedParameter,
)
from lightning_sdm.invariance._roles import _Roles
from lightning_sdm.invariance._rules import RULES
from lightning_sdm.invariance._structural import structural_candidates
from lightning_sdm.units import Unit

#: Ops that return their input itself when there is nothing to do (a cast to the dtype or device
#: it has, an already contiguous tensor): never an in-place change.
_RETURN_SELF_UNCHANGED = frozenset(
    {"to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda", "contiguous"}
)


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
        module: the model (for DDP pass the wrapped ``.module``; FSDP2, tensor-parallel and 2-D
            mesh modules work as they are, parallelized: tested through ``ModelParallelStrategy``).
        *args: positional inputs of ``module.forward``.
        **kwargs: keyword inputs of ``module.forward``.

    Returns:
        The :class:`InvarianceReport` (``method="trace"``, or the registration-order fallback
        with a note if recording failed).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from lightning_sdm.invariance import find_scale_invariant_units
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        >>> report = find_scale_invariant_units(net, torch.randn(4, 3, 8, 8))
        >>> [(u.name, u.params, u.norm, u.channel_invariant) for u in report.units]
        [('0.weight', ('0.weight', '0.bias'), '2 (BatchNorm2d)', True)]
        >>> net.training, int(net[2].num_batches_tracked)  # nothing changed
        (True, 0)
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
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


class ScaleInvarianceTracer:
    """Context manager that records one forward pass and finds the scale-invariant units in it.

    Usage::

        with ScaleInvarianceTracer(model) as tracer:
            loss = model.training_step(batch, 0)   # or just model(x)
        report = tracer.report()

    Enter it around the forward (and the loss, if wanted) only: not around ``backward()`` or the
    optimizer step, whose in-place updates of the parameters are not part of the model's function.
    Recording starts at the first forward of one of ``module``'s modules: operations run before it
    (other callbacks, optimizer step pre-hooks) are not part of the model's function either.
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
        # Nothing is recorded before the first forward of a module of the model: what runs
        # earlier (optimizer step pre-hooks such as another monitor's snapshot, an EMA callback,
        # zero_grad) is not the model's function.
        self._started = False

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
                    sub.register_forward_pre_hook(outside_compile(self._pre_hook), with_kwargs=True)
                )
                self._handles.append(
                    sub.register_forward_hook(
                        outside_compile(self._post_hook), with_kwargs=True, always_call=True
                    )
                )
            self._index_parameters()
            self._mode = _recording_mode_class()(self)
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
        self._started = True
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
        owned = dict(_own(module))
        for local in MODULE_INPUTS:
            param = owned.get(local)
            if param is not None:
                name = _join(qual, local)  # by module name: FSDP2 swaps the tensors in forward
                if name not in self._all_names:  # a tied parameter listed under another name
                    name = self._param_name(param) or name
                node.params[local] = self._param_value(param, name)
                continue
            computed = getattr(module, local, None)
            if isinstance(computed, Tensor):  # e.g. weight = g v / |v| set by a forward pre-hook
                node.params[local] = self._lookup(computed)
        node.inputs_objects = list(_tensors((args, kwargs)))
        return node

    # -- recording: functions -------------------------------------------------------------

    def _recording(self) -> bool:
        return (
            self._active
            and self._started
            and self._failure is None
            and not self._opaque_depth
            and not self._busy
        )

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
            # A cast to the dtype or device a tensor already has (``h.to(torch.float32)`` of
            # a float32 ``h``, as HF's RMSNorm does) returns the tensor itself: the same
            # values, not an in-place change of the memory its other views share.
            mutated = node.op not in _RETURN_SELF_UNCHANGED and any(
                tensor is source for source in node.inputs_objects
            )
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
        analysis = _Analysis(graph, RULES)
        units: list[Unit] = []
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


def _recording_mode_class() -> type[_RecordingMode]:
    """:class:`_RecordingMode`, with its handler kept out of dynamo when dynamo is in use."""
    global _OUTSIDE_COMPILE_MODE
    if "torch._dynamo" not in sys.modules:
        return _RecordingMode
    if _OUTSIDE_COMPILE_MODE is None:
        handler = outside_compile(_RecordingMode.__torch_function__)
        _OUTSIDE_COMPILE_MODE = type(
            "_RecordingModeOutsideCompile", (_RecordingMode,), {"__torch_function__": handler}
        )
    return _OUTSIDE_COMPILE_MODE


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


# Built on first use when dynamo is in use (see _recording_mode_class).
_OUTSIDE_COMPILE_MODE: type[_RecordingMode] | None = None
