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

Layout of the package (private modules, the public names are re-exported here): ``_report``
(results), ``_recorder`` (:class:`ScaleInvarianceTracer`: hooks and a TorchFunctionMode record
one pass), ``_graph`` (the recorded values and nodes), ``_roles`` (what each parameter is used
as), ``_analysis`` (following a scaling through the graph), ``_rules`` (the ops' transfer
functions), ``_structural`` (the fallback), ``_sharing`` (one trace shared by several callbacks).

Limitations:
    * One pass is seen: a branch not taken (data-dependent control flow) is not analysed, and its
      parameters are reported as unused. Control flow that depends on a scaled value (other than
      its sign) rejects the unit.
    * Scale invariance ignores the ``eps`` of the norms (the usual convention), also of a norm
      written by hand (``h * rsqrt(mean(h**2) + eps)``, ``x / (std + eps)``: a small constant on
      its way into the root or the divisor); a constant anywhere else is a shift.
    * A norm's own affine parameters and embedding tables are rejected by role, not analysed.
    * A unit is rejected at the first operation that is not positively homogeneous, even if its
      result were later discarded. A constant added right before a mean-subtracting norm is
      removed by it, but is rejected here.
    * In-place changes are followed through views (``Tensor._base``), not through ``detach()``
      or ``.data`` aliases, nor through ops run in other threads or compiled graphs.
    * Granularity is decided per output channel of the weight (``channel_dim``), or per block of
      channels that a reshape splits off and a norm then normalises on its own (per-head QK-norm:
      ``Unit.channel_group`` is the head size); other splits are followed as a whole unit.
"""

from lightning_sdm.invariance._recorder import ScaleInvarianceTracer, find_scale_invariant_units
from lightning_sdm.invariance._report import (
    EMBEDDING_REASON,
    HEURISTIC_NOTE,
    NORM_AFFINE_REASON,
    REGISTRATION_ORDER,
    TRACE,
    UNUSED_REASON,
    InvarianceReport,
    RejectedParameter,
)
from lightning_sdm.invariance._sharing import SharedTrace
from lightning_sdm.invariance._structural import structural_candidates
from lightning_sdm.units import Unit

__all__ = [
    "EMBEDDING_REASON",
    "HEURISTIC_NOTE",
    "NORM_AFFINE_REASON",
    "REGISTRATION_ORDER",
    "TRACE",
    "UNUSED_REASON",
    "InvarianceReport",
    "RejectedParameter",
    "ScaleInvarianceTracer",
    "SharedTrace",
    "Unit",
    "find_scale_invariant_units",
    "structural_candidates",
]
