"""A torchmetrics ``Metric`` for angular updates, exact across replicated and sharded ranks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_sdm.functional import (
    NUM_STATISTICS,
    angles_from_statistics,
    angular_update_statistics,
    norms_from_statistics,
)

__all__ = ["AngularUpdate"]

_TensorOrCollection = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
#: What ``compute()`` returns: the dict of every entry, or one scalar (see ``AngularUpdate``).
_Output = Literal["dict", "rms", "mean", "last", "weight_norm"]
_OUTPUTS: tuple[str, ...] = get_args(_Output)


class AngularUpdate(Metric):
    r"""Root-mean-square angular update per unit over the steps accumulated since the last reset.

    Each call to ``update(prev, curr)`` is one optimizer step of the monitored tensors. The angle of
    a step is not linear in the elements, so what the metric stores per step are the
    float64 sufficient statistics of :func:`lightning_sdm.functional.angular_update_statistics`
    (``|w_t|^2``, ``|w_{t+1}-w_t|^2``, ``<w_{t+1}-w_t, w_t>`` and the fraction of each unit held
    locally). They are summed over processes (``dist_reduce_fx="sum"``) before any angle is
    taken, which makes the result exact in both distributed settings:

    * replicated parameters (DDP): every rank contributes the same statistics; a common factor
      cancels in the angle and the norms are divided by the summed coverage;
    * sharded parameters (FSDP2 / ``DTensor``): each rank passes its shard (a ``DTensor`` is
      unwrapped to its local tensor automatically) and the sum over ranks is the statistic of the
      full tensor (a ``Replicate()`` copy adds zeros away from coordinate 0 of its mesh
      dimension, so tensor-parallel and 2-D mesh layouts sum each element once).

    Because every rank reduces the same gathered statistics, all ranks compute identical values.

    ``compute()`` returns a dict of float64 tensors with one entry per unit:

    * ``"rms"``: ``sqrt(mean_t angle_t^2)``, the quantity theory predicts (Wan et al. 2020);
    * ``"mean"``: mean angle (lower than the RMS by Jensen's inequality when angles fluctuate);
    * ``"last"``: the angle of the most recent step;
    * ``"weight_norm"``: ``|w|`` after the most recent step;
    * ``"steps"``: number of steps accumulated (a scalar).

    Scalars replace the unit axis when ``update`` received a single tensor with ``dim=None``.
    NaN marks a unit whose weight was zero, NaN or Inf in some step of the window. Before the first
    update nothing is known, not even the number of units: the tensors are empty.

    The statistics stay float64 whatever the metric is moved to (``.to(torch.float16)``,
    ``set_dtype``): they follow the device only. They are part of ``state_dict()``, with
    :attr:`unit_names`. ``merge_state`` adds another instance's statistics of the same steps (other
    ranks' shards or replicas), as the distributed reduction does.

    Logging: with ``output="rms"`` (or ``"mean"``, ``"last"``, ``"weight_norm"``) ``compute()``
    returns that one value as a scalar tensor, so the metric object itself can be logged the
    torchmetrics way, ``self.log("angle", metric)``: Lightning calls ``forward`` (the value of
    this step) and ``compute`` at the epoch's end. Over several units the scalar pools them: the
    RMS and the mean angle over every step and unit, the units' mean last angle, and the norm of
    all units together. The
    default ``output="dict"`` keeps every entry per unit;
    :class:`~lightning_sdm.SphericalDynamicsCallback` logs every unit.

    Args:
        dim: ``None`` for one unit per tensor, or the dimension indexing units inside each tensor
            (``0``: per output channel); see :mod:`lightning_sdm.functional`.
        output: ``"dict"`` (every entry, per unit) or the entry ``compute()`` returns as one
            scalar: ``"rms"``, ``"mean"``, ``"last"`` or ``"weight_norm"``.
        kwargs: forwarded to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``,
            ``dist_sync_fn`` ...).

    Raises:
        ValueError: if ``dim`` is not ``None`` or an int, or ``output`` is not one of the above.

    Example::

        >>> import torch
        >>> from lightning_sdm import AngularUpdate
        >>> metric = AngularUpdate()
        >>> w = torch.tensor([1.0, 0.0])
        >>> metric.update(w, torch.tensor([0.6, 0.8]))   # 0.9273 rad
        >>> metric.update(w, torch.tensor([0.8, 0.6]))   # 0.6435 rad
        >>> result = metric.compute()
        >>> round(result["rms"].item(), 4), round(result["last"].item(), 4), int(result["steps"])
        (0.7981, 0.6435, 2)
        >>> scalar = AngularUpdate(output="rms")
        >>> scalar.update(w, torch.tensor([0.6, 0.8])); scalar.update(w, torch.tensor([0.8, 0.6]))
        >>> round(scalar.compute().item(), 4)
        0.7981
    """

    is_differentiable = False
    higher_is_better = None
    # Steps are kept apart (the angle is non-linear in the statistics), so merging a batch state
    # into the global one in ``forward`` is a concatenation, not a sum: torchmetrics must run the
    # full update there. ``merge_state`` (the same steps seen by other ranks) is a sum; see below.
    full_state_update = True
    plot_lower_bound = 0.0
    output: _Output

    step_statistics: Tensor

    def __init__(self, dim: int | None = None, output: _Output = "dict", **kwargs: Any) -> None:
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise ValueError(f"`dim` must be None or an int, got {dim!r}.")
        if output not in _OUTPUTS:
            raise ValueError(
                f"`output` must be one of {', '.join(map(repr, _OUTPUTS))}, got {output!r}: "
                "'dict' returns every entry per unit; the others one scalar, which "
                "`LightningModule.log` takes."
            )
        super().__init__(**kwargs)
        self.dim = dim
        self.output = output
        self.unit_names: list[str] | None = None
        self._scalar_result = False
        self.add_state(
            "step_statistics",
            default=torch.zeros(0, 0, NUM_STATISTICS, dtype=torch.float64),
            dist_reduce_fx="sum",
            persistent=True,
        )

    def reset(self) -> None:
        """Forget every step, and what the steps were of (names, scalar result)."""
        super().reset()
        self.unit_names = None
        self._scalar_result = False

    def get_extra_state(self) -> dict[str, Any]:
        """What the statistics are of: the unit names and whether the result is a scalar."""
        return {"unit_names": self.unit_names, "scalar_result": self._scalar_result}

    def set_extra_state(self, state: Any) -> None:
        """Restore :meth:`get_extra_state` (from ``load_state_dict``)."""
        if isinstance(state, Mapping):
            names = state.get("unit_names")
            self.unit_names = list(names) if names is not None else None
            self._scalar_result = bool(state.get("scalar_result", False))

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add the statistics of the same steps seen by another rank (its shard or replica).

        Raises:
            ValueError: if ``incoming_state`` is not an ``AngularUpdate`` (or its state dict),
                or holds another number of steps or units.
        """
        if isinstance(incoming_state, AngularUpdate):
            incoming = incoming_state.step_statistics
        elif isinstance(incoming_state, Mapping) and isinstance(
            incoming_state.get("step_statistics"), Tensor
        ):
            incoming = incoming_state["step_statistics"]
        else:
            raise ValueError(
                "`incoming_state` must be an AngularUpdate or a dict with its `step_statistics`, "
                f"got {type(incoming_state).__name__}."
            )
        if incoming.shape[0] == 0:
            return
        if self.step_statistics.shape[0] == 0:
            self.step_statistics = incoming.to(self.step_statistics)
            return
        _check_same_steps([self.step_statistics.shape, incoming.shape], "merge_state")
        self.step_statistics = self.step_statistics + incoming.to(self.step_statistics)

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plot the RMS angular update per unit, labelled with the unit names and rad/step.

        Args:
            val: a result of ``compute()`` (a dict, or the scalar of ``output="rms"``), or a
                sequence of them (one per epoch, say): then one line per unit over the results.
                ``None``: ``compute()`` now.
            ax: a matplotlib axis to draw on (else a new figure).

        Returns:
            ``(figure, axis)`` from matplotlib.
        """
        import matplotlib.pyplot as plt

        results = [self.compute() if val is None else val]
        if isinstance(val, Sequence) and not isinstance(val, (Tensor, str)):
            results = list(val)
        rows = [_rms_of(result) for result in results]
        width = max((len(row) for row in rows), default=0)
        names = self.unit_names if self.unit_names and len(self.unit_names) == width else None
        if self.output != "dict" and width == 1:
            names = ["all units" if self.unit_names and len(self.unit_names) > 1 else "unit"]
        names = names or [str(i) for i in range(width)]
        figure, ax = plt.subplots() if ax is None else (ax.get_figure(), ax)
        if len(rows) == 1:
            ax.bar(names, rows[0], color="tab:blue")
            ax.set_xlabel("unit")
        else:
            for index, name in enumerate(names):
                values = [row[index] if index < len(row) else math.nan for row in rows]
                ax.plot(range(len(rows)), values, marker="o", label=name)
            ax.set_xlabel("result (compute() call)")
            ax.legend(fontsize="small")
        ax.set_ylabel("RMS angular update (rad/step)")
        ax.set_title("AngularUpdate")
        ax.set_ylim(bottom=0.0)
        return figure, ax

    def _apply(self, fn: Any, exclude_state: Sequence[str] = ()) -> Any:
        # torchmetrics converts float states with ``.to(dtype)``; float64 is what keeps the angles
        # exact (an angle of 1e-4 rad is a 1e-8 relative change of the norm), so the statistics
        # follow the device only.
        this = cast(AngularUpdate, super()._apply(fn, (*exclude_state, "step_statistics")))
        device = fn(torch.zeros(1, device=self.step_statistics.device)).device
        this.step_statistics = this.step_statistics.to(device=device)
        default: Tensor = this._defaults["step_statistics"]  # type: ignore[assignment]
        this._defaults["step_statistics"] = default.to(device=device)
        return this

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        # Sum only statistics of the same steps: ranks that took different numbers of steps
        # (a user's skipped ``optimizer.step()`` on one rank) get a clear error, not a bare
        # size mismatch from ``torch.stack``.
        sync = dist_sync_fn if dist_sync_fn is not None else gather_all_tensors
        shape = torch.tensor(self.step_statistics.shape[:2], device=self.step_statistics.device)
        shapes = [
            tuple(int(v) for v in s) for s in sync(shape, group=process_group or self.process_group)
        ]
        _check_same_steps(shapes, "the distributed reduction")
        super()._sync_dist(sync, process_group)

    def update(
        self,
        prev: _TensorOrCollection | None = None,
        curr: _TensorOrCollection | None = None,
        *,
        statistics: Tensor | None = None,
    ) -> None:
        """Add one step: ``prev`` and ``curr`` are the tensors before and after it.

        Args:
            prev: one tensor, a sequence of tensors, or a mapping name -> tensor.
            curr: the same structure as ``prev`` (same names, same shapes).
            statistics: instead of ``prev``/``curr``, the ``[units, 4]`` statistics of the step,
                as :func:`~lightning_sdm.functional.angular_update_statistics` returns them (rows
                may be sums of several tensors' rows, e.g. a weight and the bias before its norm).
        """
        if statistics is not None:
            if prev is not None or curr is not None:
                raise ValueError("Pass either `prev` and `curr`, or `statistics`, not both.")
            if not isinstance(statistics, Tensor):
                raise ValueError(
                    f"`statistics` must be a tensor of shape [units, {NUM_STATISTICS}], got "
                    f"{type(statistics).__name__}."
                )
            if statistics.dim() != 2 or statistics.shape[1] != NUM_STATISTICS:
                raise ValueError(
                    f"`statistics` must have shape [units, {NUM_STATISTICS}], "
                    f"got {tuple(statistics.shape)}."
                )
            self._append(statistics.to(self.step_statistics))
            return
        if prev is None or curr is None:
            raise ValueError("`prev` and `curr` are both required (or pass `statistics`).")
        names, prev_list = _as_named_list(prev, "prev")
        curr_names, curr_list = _as_named_list(curr, "curr")
        if names != curr_names:
            raise ValueError(
                f"`prev` and `curr` must name the same tensors, got {names} and {curr_names}."
            )
        self._scalar_result = isinstance(prev, Tensor) and self.dim is None
        if self.unit_names is None:
            self.unit_names = names
        stats = angular_update_statistics(prev_list, curr_list, dim=self.dim)
        self._append(stats.to(self.step_statistics.device))

    def compute(self) -> dict[str, Tensor]:
        """RMS, mean and last angle, weight norm, and step count; see the class docstring.

        With ``output`` other than ``"dict"``: that entry as one scalar tensor.
        """
        stats = self.step_statistics
        if stats.dim() != 3 or stats.shape[-1] != NUM_STATISTICS:
            raise ValueError(
                f"AngularUpdate's `step_statistics` has shape {tuple(stats.shape)}, not [steps, "
                f"units, {NUM_STATISTICS}]: the state it was loaded from is damaged. Call "
                "`reset()` to start again."
            )
        steps = torch.tensor(stats.shape[0], dtype=torch.long, device=stats.device)
        if stats.shape[0] == 0:
            empty = torch.full((stats.shape[1],), float("nan"), dtype=torch.float64)
            result = {"rms": empty, "mean": empty, "last": empty, "weight_norm": empty}
        else:
            angles = angles_from_statistics(stats)  # [steps, units]
            _, curr_norm = norms_from_statistics(stats[-1])
            result = {
                "rms": angles.square().mean(dim=0).sqrt(),
                "mean": angles.mean(dim=0),
                "last": angles[-1],
                "weight_norm": curr_norm,
            }
        if self._scalar_result:
            result = {key: value.reshape(()) for key, value in result.items()}
        result["steps"] = steps
        if self.output != "dict":
            return _pooled(result, self.output)  # type: ignore[return-value]
        return result

    def _append(self, stats: Tensor) -> None:
        if self.step_statistics.shape[0] == 0:
            self.step_statistics = stats.unsqueeze(0)
            return
        if self.step_statistics.shape[1:] != stats.shape:
            raise ValueError(
                "The monitored units changed between updates: "
                f"{self.step_statistics.shape[1]} units before, {stats.shape[0]} now. "
                "Call `reset()` when the set of tensors changes."
            )
        self.step_statistics = torch.cat([self.step_statistics, stats.unsqueeze(0)])


def _pooled(result: Mapping[str, Tensor], output: str) -> Tensor:
    """One scalar of ``result[output]`` over its units (see the class docstring).

    The RMS over every step and unit is the root of the units' mean square RMS (each unit has the
    same steps); the mean and the last angle average over the units; the norm of all units
    together is the root of their summed squares. NaN where some unit is NaN.
    """
    value = result[output].reshape(-1)
    if value.numel() == 0:
        return torch.tensor(math.nan, dtype=torch.float64)
    if output == "rms":
        return value.square().mean().sqrt()
    if output == "weight_norm":
        return value.square().sum().sqrt()
    return value.mean()


def _rms_of(result: Any) -> list[float]:
    """The per-unit RMS angles of a ``compute()`` result (a dict or a scalar), as floats."""
    value = result["rms"] if isinstance(result, Mapping) else result
    return [float(v) for v in torch.as_tensor(value).reshape(-1)]


def _check_same_steps(shapes: Sequence[Sequence[int]], where: str) -> None:
    steps = [int(shape[0]) for shape in shapes]
    units = [int(shape[1]) for shape in shapes]
    if len(set(steps)) > 1 or len(set(units)) > 1:
        raise ValueError(
            f"AngularUpdate: {where} needs the statistics of the same steps of the same units, got "
            f"{steps} steps and {units} units. In a distributed job every rank must call "
            "`update` once per optimizer step (a rank that skips `optimizer.step()` desynchronises "
            "them)."
        )


def _as_named_list(tensors: _TensorOrCollection, argument: str) -> tuple[list[str], list[Tensor]]:
    if isinstance(tensors, Tensor):
        return ["0"], [tensors]
    if isinstance(tensors, Mapping):
        return [str(key) for key in tensors], list(tensors.values())
    if isinstance(tensors, Sequence) and all(isinstance(t, Tensor) for t in tensors):
        return [str(i) for i in range(len(tensors))], list(tensors)
    raise TypeError(
        f"`{argument}` must be a tensor, a sequence of tensors or a mapping name -> tensor, "
        f"got {type(tensors).__name__}."
    )
