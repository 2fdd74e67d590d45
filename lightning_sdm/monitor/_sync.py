"""The monitor's collectives: a process group of their own, with a bounded wait.

Why not the default group: the monitor reduces when *its* window closes, on each rank after that
rank's N-th optimizer step. If ranks disagree on N (a user bug: one rank skips
``optimizer.step()`` in manual optimization), one rank enters the monitor's reduction while the
other enters DDP's gradient all-reduce of its next backward. On the default group the two
collectives would be matched with each other: a hang until the default timeout (30 minutes in
Lightning) or, worse, buffers of different meaning summed together. On a group of its own, the
monitor's collective can only meet the monitor's collective, and its timeout (``sync_timeout``,
5 minutes by default) bounds the wait.

What happens then (measured with gloo, ``tests/distributed``): the waiting rank's collective
times out and closes the group's connections; the other rank's next monitor collective fails at
once ("connection closed by peer"). Each rank's monitor stops with one warning naming the
optimizer step where it waited, and training goes on: the default group was never touched. With
NCCL, a timed-out collective is handled by NCCL's watchdog (it ends the process after
``sync_timeout`` instead of the default group's 30 minutes); that path has not been run here.

One collective per closed window (:func:`reduce_window`): everything a window needs from the other
ranks (its per-step and multi-step statistics of every unit row, the rows of the gradient-
orthogonality checks taken in it) is summed in one all-reduce of a float64 buffer whose size the
configuration fixes, whatever the number of units, tensors or mesh dimensions. What each rank
adds is decided by the engine (``lightning_sdm._engine``): each element of a sharded tensor once
(``Shard(d)`` on any dimension, ``_StridedShard`` included: a local shard is one box of the global
tensor), a ``Replicate()`` copy only at coordinate 0 of that mesh dimension, ``Partial()``
refused. Tensors replicated outside their mesh (plain tensors under DDP or TP, a DTensor on a
sub-mesh) add one copy per rank: the coverage column counts the copies, the norms divide by it
and the angle does not depend on a common factor. The equilibrium decision of the callback is
one more collective (:func:`all_agree`, one integer), after the window's values are known.

One group per process and timeout, created on the first distributed monitor: ``new_group`` must
be called by every rank in the same order, and every rank builds its monitor at the same point
(the callback at the first training batch; a plain loop before it starts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch

from lightning_sdm import _messages

__all__ = [
    "RanksOutOfStepError",
    "all_agree",
    "monitor_group",
    "reduce_window",
    "run_collective",
]

T = TypeVar("T")

_GROUPS: dict[tuple[int, float], Any] = {}


class RanksOutOfStepError(RuntimeError):
    """A monitor collective failed or timed out: the ranks did not reach it together."""


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def monitor_group(timeout_s: float) -> Any | None:
    """The monitor's process group over all ranks, or ``None`` outside a distributed run.

    Cached per default group (a new ``init_process_group`` gets a new one) and timeout.
    """
    if not _distributed():
        return None
    import torch.distributed as dist

    key = (id(dist.group.WORLD), float(timeout_s))
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(timeout=timedelta(seconds=timeout_s))
    return _GROUPS[key]


def all_agree(flag: bool, group: Any, device: torch.device | None = None) -> bool:
    """Whether ``flag`` holds on every rank of ``group`` (a MIN all-reduce of one integer)."""
    import torch.distributed as dist

    value = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


def run_collective(fn: Callable[[], T], what: str, timeout_s: float) -> T:
    """``fn()``, a collective on the monitor's group; its failure as :class:`RanksOutOfStepError`.

    ``what`` names the point in training ("the window closing at optimizer step 8") for the
    message. Errors that are not the backend's (a shape mismatch found by our own checks, a bug)
    pass through unchanged.
    """
    try:
        return fn()
    except (RuntimeError, torch.distributed.DistError) as err:
        if isinstance(err, RanksOutOfStepError) or not _is_backend_error(err):
            raise
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        message = _messages.ranks_out_of_step(rank, what, timeout_s, _first_line(err))
        raise RanksOutOfStepError(message) from err


def _is_backend_error(err: BaseException) -> bool:
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err).lower()
    markers = ("timed out", "timeout", "connection closed", "connection reset", "gloo", "nccl")
    return any(marker in text for marker in markers)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "] " in text and text.startswith("["):  # gloo prefixes the C++ source location
        text = text.split("] ", 1)[1]
    return text[:160]


def reduce_window(
    parts: Sequence[tuple[torch.Tensor, int, int]],
    group: Any,
    device: torch.device,
    what: str,
    timeout_s: float,
) -> list[torch.Tensor]:
    """Sum a closing window's statistics over ``group`` in one all-reduce; return them summed.

    Each part is ``(statistics, capacity, rows)``: a ``[steps, rows, 4]`` tensor (the window's
    per-step statistics, its multi-step ones, its orthogonality checks) and the most steps it can
    hold, fixed by the configuration. Every part is padded with zeros to its capacity, so the
    buffer has the same size on every rank whatever a rank holds: a rank that measured fewer steps
    cannot make the collective mismatch. A header of ``(steps, steps**2)`` per part, summed with
    the rest, tells whether every rank held the same number of steps (the sums are ``W * n`` and
    ``W * n**2`` only if all ``W`` counts are ``n``); if not, :class:`RanksOutOfStepError`.

    The buffer is on ``device`` (the weights': an NCCL group reduces CUDA tensors only).
    """
    import torch.distributed as dist

    sizes = [capacity * rows * 4 for _, capacity, rows in parts]
    header = len(parts) * 2
    buffer = torch.zeros(header + sum(sizes), dtype=torch.float64, device=device)
    offset = header
    for index, ((stats, capacity, rows), size) in enumerate(zip(parts, sizes, strict=True)):
        steps = stats.shape[0]
        if steps > capacity or (steps and tuple(stats.shape[1:]) != (rows, 4)):
            raise RanksOutOfStepError(_out_of_step(what, timeout_s))
        buffer[2 * index] = steps
        buffer[2 * index + 1] = steps * steps
        flat = stats.reshape(-1).to(device=device, dtype=torch.float64)
        buffer[offset : offset + flat.numel()] = flat
        offset += size
    dist.all_reduce(buffer, group=group)
    world = dist.get_world_size(group)
    counts = buffer[:header].view(-1, 2).tolist()
    if any(total * total != world * squares for total, squares in counts):
        raise RanksOutOfStepError(_out_of_step(what, timeout_s))
    results, offset = [], header
    for (stats, capacity, rows), size, (total, _) in zip(parts, sizes, counts, strict=True):
        steps = int(total) // world
        summed = buffer[offset : offset + size].view(capacity, rows, 4)[:steps]
        results.append(summed.to(stats.device) if steps else stats)
        offset += size
    return results


def _out_of_step(what: str, timeout_s: float) -> str:
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    return _messages.ranks_out_of_step(rank, what, timeout_s, _messages.STEP_COUNTS_DIFFER)
