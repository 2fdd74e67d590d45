"""Weight decay that follows the learning rate: a decaying LR no longer leaves the weights behind.

With normalization layers and weight decay, the equilibrium norm of a scale-invariant weight is
set by ``lr / wd`` (SGD: ``|w|^4`` proportional to ``lr / wd``; AdamW: ``|w|^2`` proportional
to ``lr / wd``; :mod:`lightning_sdm.theory`). A schedule that lowers the LR therefore moves the
equilibrium norm, and the weights need a relaxation time proportional to ``1 / (lr wd)`` to
follow, which grows as the LR falls: late in a cosine or linear decay they lag ever further
(SMD, Wan et al. 2021, Sec. 3; the advice's "lagging" regime), the norm keeps shrinking and the
gradient norm, proportional to ``1/|w|``, rises. Defazio et al. (2025, "AdamC") correct this by
scaling the weight decay with the schedule: ``wd_t = wd * lr_t / lr_max``. Then ``lr / wd`` is
constant, the equilibrium norm stays where it is, and the angular update follows the LR at once:
its prediction (the theory reads the live param group) becomes

* SGD with momentum: ``sqrt(2 lr_t wd_t / (1 + m)) = lr_t sqrt(2 wd / (lr_max (1 + m)))``;
* AdamW: ``sqrt(2 lr_t wd_t) = lr_t sqrt(2 wd / lr_max)``.

:class:`CorrectedWeightDecay` is a Lightning callback that does this to the param groups holding
the units a :class:`~lightning_sdm.SphericalDynamicsCallback` of the same Trainer monitors (or
to every group with weight decay). ``lr_max`` is the largest LR the schedule reaches in the run,
sampled ahead on a copy of the schedulers (warm-up included).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_sdm import _messages
from lightning_sdm.advice._schedule import sample_learning_rates
from lightning_sdm.lightning._trainer import (
    optimizer_budget,
    param_group_count,
    param_groups,
    stepping_optimizers,
    steps_per_epoch,
    trainer_schedules,
)

__all__ = ["CorrectedWeightDecay"]

Groups = Literal["invariant", "all"]
_GROUPS = ("invariant", "all")
#: Optimizer steps of the schedule sampled for ``lr_max`` when the Trainer has no budget.
UNKNOWN_BUDGET_HORIZON = 20_000


class CorrectedWeightDecay(Callback):
    r"""Scale the weight decay of param groups with ``lr_t / lr_max`` at every step (AdamC).

    Args:
        groups: ``"invariant"``: the groups holding the units monitored by the Trainer's
            :class:`~lightning_sdm.SphericalDynamicsCallback` (it must be there); ``"all"``:
            every group whose weight decay is not 0.

    The weight decay each group had at the start of fit is its base; it is written back at the
    end of fit (also after an exception), and kept in the checkpoint with ``lr_max``, so a
    resumed run goes on with the same correction.

    Raises:
        ValueError: for an unknown ``groups``.
        MisconfigurationException: ``groups="invariant"`` without a SphericalDynamicsCallback.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning_sdm import SphericalDynamicsCallback
        >>> from lightning_sdm.lightning import CorrectedWeightDecay
        >>> callbacks = [SphericalDynamicsCallback(), CorrectedWeightDecay()]
        >>> trainer = Trainer(callbacks=callbacks)  # doctest: +SKIP
        >>> CorrectedWeightDecay(groups="all").groups
        'all'
    """

    def __init__(self, groups: Groups = "invariant") -> None:
        if groups not in _GROUPS:
            raise ValueError(f"`groups` must be one of {_GROUPS}, got {groups!r}.")
        self.groups: Groups = groups
        # (optimizer index, group index) -> (base weight decay, lr_max)
        self._bases: dict[tuple[int, int], tuple[float, float]] = {}
        self._restored: dict[tuple[int, int], tuple[float, float]] | None = None
        self._raised: set[tuple[int, int]] = set()  # groups whose lr_max rose (said once)

    @property
    def bases(self) -> dict[tuple[int, int], tuple[float, float]]:
        """Per ``(optimizer index, group index)``: the base weight decay and ``lr_max``."""
        return dict(self._bases)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the set-up (``groups="invariant"`` needs the monitoring callback)."""
        if self.groups == "invariant" and _monitoring_callback(trainer) is None:
            raise MisconfigurationException(
                "CorrectedWeightDecay(groups='invariant') scales the groups that "
                "SphericalDynamicsCallback monitors, and the Trainer has none: add one, or pass "
                "groups='all'."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the bases (or take the checkpoint's) and ``lr_max`` of every group."""
        if self._restored is not None:  # resumed: the first fit's bases and peaks
            self._bases, self._restored = dict(self._restored), None
        else:
            self._bases = {}
        peaks = _schedule_peaks(trainer) if len(self._bases) < param_group_count(trainer) else {}
        for key, group in param_groups(trainer):
            if key not in self._bases:
                lr = float(group["lr"])
                base = float(group.get("weight_decay", 0.0))
                self._bases[key] = (base, max(peaks.get(key, lr), lr))
        self._apply(trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """The schedulers have stepped: set this step's weight decay before its optimizer step."""
        self._apply(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Again just before the update: on the first batch the monitored groups are known now."""
        self._apply(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the groups their base weight decay back."""
        self._restore(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._restore(trainer)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """The optimizer state in the file holds the base weight decay, not this step's value.

        So that a run resumed or fine-tuned from the file without this callback starts from
        the weight decay the user set; with the callback, the correction resumes from its state.
        """
        for o, state in enumerate(checkpoint.get("optimizer_states", [])):
            for g, group in enumerate(state.get("param_groups", [])):
                if (o, g) in self._bases and "weight_decay" in group:
                    group["weight_decay"] = self._bases[(o, g)][0]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "bases": [[*k, *v] for k, v in self._bases.items()]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: for a damaged state (the rows are ``(optimizer, group, wd, peak)``).
        """
        rows = state_dict.get("bases", []) if isinstance(state_dict, dict) else None
        try:
            if not isinstance(rows, (list, tuple)):
                raise TypeError("not a list of rows")
            restored = {(int(o), int(g)): (float(wd), float(peak)) for o, g, wd, peak in rows}
        except (TypeError, ValueError) as error:
            raise ValueError(
                "CorrectedWeightDecay cannot read its state in the checkpoint (`bases` must be "
                f"rows of (optimizer, group, weight decay, peak lr)): {state_dict!r:.120}."
            ) from error
        self._restored = restored

    def _targets(self, trainer: pl.Trainer) -> set[tuple[int, int]]:
        if self.groups == "all":
            return {key for key, (wd, _) in self._bases.items() if wd != 0.0}
        callback = _monitoring_callback(trainer)
        monitor = getattr(callback, "monitor", None)
        if monitor is None:
            # Before the first forward pass the units are not known: nothing is scaled yet, so
            # the advice and audit the monitoring callback prints then see the base weight decay
            # (a provisional scaling would make a warm-up from lr 0 read as "no weight decay").
            # The first update is corrected all the same (on_before_optimizer_step).
            return set()
        index = {id(optimizer): i for i, optimizer in enumerate(trainer.optimizers)}
        return {
            (index[id(optimizer)], group)
            for optimizer, group in monitor.parameter_groups().values()
            if id(optimizer) in index
        }

    def _apply(self, trainer: pl.Trainer) -> None:
        targets = self._targets(trainer)
        for key, group in param_groups(trainer):
            if key not in self._bases or key not in targets:
                continue
            base, peak = self._bases[key]
            lr = float(group["lr"])
            if lr > peak:  # a schedule that could not be sampled ahead went higher
                self._bases[key] = (base, lr)
                peak = lr
                if key not in self._raised:
                    self._raised.add(key)
                    rank_zero_warn(_messages.lr_above_sampled_peak(key, lr))
            group["weight_decay"] = base * lr / peak if peak > 0 else base

    def _restore(self, trainer: pl.Trainer) -> None:
        for key, group in param_groups(trainer):
            if key in self._bases:
                group["weight_decay"] = self._bases[key][0]


def _monitoring_callback(trainer: pl.Trainer) -> Any | None:
    from lightning_sdm.lightning._callback import SphericalDynamicsCallback

    callbacks = getattr(trainer, "callbacks", [])
    return next((c for c in callbacks if isinstance(c, SphericalDynamicsCallback)), None)


def _schedule_peaks(trainer: pl.Trainer) -> dict[tuple[int, int], float]:
    """The largest LR of every group over the run, sampled ahead on copies of the schedulers."""
    budget = optimizer_budget(trainer)  # each optimizer's own steps
    peaks: dict[tuple[int, int], float] = {}
    if budget is not None and budget > 0:  # from the schedulers' state now
        done = int(getattr(trainer, "global_step", 0)) // stepping_optimizers(trainer)
        total = budget - done
    else:  # no budget (max_steps=-1 and no epoch limit): a horizon that covers warm-ups
        total = UNKNOWN_BUDGET_HORIZON
    per_epoch, schedules = steps_per_epoch(trainer), trainer_schedules(trainer)
    for o, optimizer in enumerate(trainer.optimizers):
        own = [entry for entry in schedules if entry.scheduler.optimizer is optimizer]
        trajectory = sample_learning_rates(optimizer, own, total, per_epoch)
        for g, changes in enumerate(trajectory.changes):
            peaks[(o, g)] = max(lr for _, lr in changes)
    return peaks
