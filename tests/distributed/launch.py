"""Run a function or a script in several CPU processes joined by a gloo process group.

Two entry points, both usable from a plain pytest test:

* :func:`run_distributed` runs a picklable (module-level) function in ``world_size`` processes
  started with the ``spawn`` method and returns each rank's return value, in rank order. By default
  each process joins a gloo process group first (``dist.init_process_group``) and leaves it after
  the function returns (a ``dist.barrier()`` before ``destroy_process_group`` avoids aborts at
  shutdown). With ``init_process_group=False`` the processes only get the torchrun-style
  environment (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``LOCAL_WORLD_SIZE``, ``NODE_RANK``), which Lightning reads as "already launched".
* :func:`run_script` runs a Python script, either once per rank with that environment (as torchrun
  would) or once in total for scripts that launch their own ranks (Lightning ``strategy="ddp"``
  re-executes ``sys.argv``).

Both select a free localhost port, set ``OMP_NUM_THREADS=1`` in the children (a 2-core CI machine
is otherwise oversubscribed), kill every child when the time limit passes, and turn a failure in
any child into an exception in the parent that carries the child's own traceback (every failing
rank's, since the first rank to die is often only reporting that its peer disappeared; a rank that
hangs until the time limit reports where it was stuck). The children of :func:`run_distributed`
print to the parent's stdout/stderr (pytest shows them with a failure); :func:`run_script`
captures each process's output.

Spawned children import the module that defines ``fn``: keep test modules light at import time,
and return plain tensors (``DTensor.full_tensor()`` or ``.to_local()``), numbers or dicts.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as torch_mp

__all__ = [
    "DistributedLaunchError",
    "DistributedTimeoutError",
    "ScriptResult",
    "distributed_env",
    "find_free_port",
    "run_distributed",
    "run_script",
]

LOCALHOST = "127.0.0.1"
# Substrings of a child's error that mean the rendezvous port was taken in the meantime: retried.
_PORT_IN_USE = ("EADDRINUSE", "Address already in use", "address already in use")
_PORT_ATTEMPTS = 3
_GRACE_S = 3.0  # after a first failure, how long the other ranks get to fail on their own


class DistributedLaunchError(RuntimeError):
    """A child process failed; the message holds every failing rank's traceback or output."""


class DistributedTimeoutError(DistributedLaunchError, TimeoutError):
    """The children did not finish within the time limit; they have been killed."""


def find_free_port() -> int:
    """A TCP port on localhost that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def distributed_env(rank: int | None, world_size: int, port: int) -> dict[str, str]:
    """The torchrun-style variables for one rank (``rank=None``: rendezvous address only)."""
    env = {"MASTER_ADDR": LOCALHOST, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    if rank is not None:
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            NODE_RANK="0",
            GROUP_RANK="0",
        )
    return env


# --------------------------------------------------------------------------------------------
# Functions


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    timeout: float = 60.0,
    backend: str = "gloo",
    init_process_group: bool = True,
    env: Mapping[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` in ``world_size`` spawned processes; return the results by rank.

    Args:
        fn: a module-level (picklable) function. Inside it the rank is ``dist.get_rank()`` (or
            ``int(os.environ["RANK"])`` without a process group).
        world_size: number of processes.
        args: positional arguments, the same for every rank (picklable).
        kwargs: keyword arguments, the same for every rank (picklable).
        timeout: seconds for the whole run, start-up included; also the process group's timeout,
            so a rank stuck in a collective fails instead of hanging.
        backend: process-group backend.
        init_process_group: join a process group before calling ``fn`` (and leave it after).
        env: extra environment variables for the children.

    Returns:
        ``[result of rank 0, result of rank 1, ...]``. Results travel through ``torch.save`` files,
        so they may hold tensors, dicts, numbers.

    Raises:
        DistributedLaunchError: if a child raised (the message holds its traceback) or died.
        DistributedTimeoutError: if the time limit passed (the children are killed first).
    """
    if world_size < 1:
        raise ValueError(f"`world_size` must be positive, got {world_size}.")
    try:
        pickle.dumps(fn)
    except Exception as err:
        raise TypeError(
            f"{fn!r} cannot be sent to a spawned process: use a module-level function."
        ) from err
    for attempt in range(_PORT_ATTEMPTS):
        try:
            job = _Job(
                fn=fn,
                args=tuple(args),
                kwargs=dict(kwargs or {}),
                world_size=world_size,
                port=find_free_port(),
                backend=backend,
                init_process_group=init_process_group,
                timeout=timeout,
                env=dict(env or {}),
            )
            return _run_once(job)
        except DistributedLaunchError as err:
            port_taken = any(marker in str(err) for marker in _PORT_IN_USE)
            if not port_taken or attempt == _PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    world_size: int
    port: int
    backend: str
    init_process_group: bool
    timeout: float
    env: dict[str, str]
    workdir: str = ""
    deadline_wall: float = 0.0  # time.time() at which the parent kills the children


def _run_once(job: _Job) -> list[Any]:
    deadline = time.monotonic() + job.timeout
    with tempfile.TemporaryDirectory(prefix="sdm-dist-") as workdir:
        job.workdir = workdir
        job.deadline_wall = time.time() + job.timeout
        context = torch_mp.get_context("spawn")
        processes: list[Any] = []
        try:
            # A spawned child inherits the parent's environment when it starts, before it
            # imports torch: the only moment at which OMP_NUM_THREADS still takes effect.
            with _patched_environ({"OMP_NUM_THREADS": "1", **job.env}):
                for rank in range(job.world_size):
                    process = context.Process(
                        target=_child_main, args=(rank, job), name=f"rank{rank}", daemon=False
                    )
                    process.start()  # raises here if an argument cannot be pickled
                    processes.append(process)
            _wait(processes, deadline, job.timeout, workdir)
        finally:
            _kill(processes)
        return [_load_result(workdir, rank) for rank in range(job.world_size)]


def _child_main(rank: int, job: _Job) -> None:
    _die_with_parent()
    os.environ.update(distributed_env(rank, job.world_size, job.port))
    os.environ.update(job.env)
    torch.set_num_threads(1)
    # If this rank hangs, its Python stacks are dumped shortly before the parent kills it: the
    # report then says where each rank was stuck.
    with Path(job.workdir, f"rank{rank}.stacks").open("w") as stacks:
        seconds_left = job.deadline_wall - time.time()
        faulthandler.dump_traceback_later(max(seconds_left - 1.5, 0.5), file=stacks)
        try:
            result = _call_in_process_group(rank, job)
        except BaseException:
            Path(job.workdir, f"rank{rank}.error").write_text(traceback.format_exc())
            sys.stdout.flush()
            sys.stderr.flush()
            # Leave without tearing anything down: the peers may be stuck in a collective with us.
            os._exit(1)
        finally:
            faulthandler.cancel_dump_traceback_later()
    path = Path(job.workdir, f"rank{rank}.pt")
    torch.save(result, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)


def _call_in_process_group(rank: int, job: _Job) -> Any:
    import torch.distributed as dist

    if not job.init_process_group:
        return job.fn(*job.args, **job.kwargs)
    dist.init_process_group(
        job.backend, rank=rank, world_size=job.world_size, timeout=timedelta(seconds=job.timeout)
    )
    result = job.fn(*job.args, **job.kwargs)
    if dist.is_initialized():  # ``fn`` may have left the group itself
        dist.barrier()  # without it, a rank leaving early made the others abort at shutdown
        dist.destroy_process_group()
    return result


def _die_with_parent() -> None:
    # Linux only: a child whose parent is killed (say, by pytest-timeout) gets SIGKILLed too.
    with contextlib.suppress(Exception):
        import signal

        from torch.multiprocessing.spawn import _prctl_pr_set_pdeathsig

        _prctl_pr_set_pdeathsig(signal.SIGKILL)


def _wait(processes: list[Any], deadline: float, timeout: float, workdir: str) -> None:
    from multiprocessing.connection import wait

    pending = {process.sentinel: process for process in processes}
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            alive = [p.name for p in processes if p.is_alive()]
            _kill(processes)
            raise DistributedTimeoutError(
                f"Distributed run did not finish within {timeout:.0f} s; killed {alive}."
                + _errors_report(processes, workdir)
            )
        for sentinel in wait(list(pending), timeout=remaining):
            process = pending.pop(sentinel)
            process.join()
            if process.exitcode != 0:
                # Give the other ranks a moment to fail on their own (and write their tracebacks).
                _join_all(processes, _GRACE_S)
                _kill(processes)
                raise DistributedLaunchError(
                    f"{process.name} exited first, with code {process.exitcode}."
                    + _errors_report(processes, workdir, first=processes.index(process))
                )


def _join_all(processes: list[Any], seconds: float) -> None:
    end = time.monotonic() + seconds
    for process in processes:
        process.join(max(end - time.monotonic(), 0.0))


def _kill(processes: list[Any]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    _join_all(processes, 2.0)
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()


def _errors_report(processes: list[Any], workdir: str, first: int = 0) -> str:
    """Every rank's traceback (the rank that failed first leads), or its stacks if it hung."""
    parts = []
    order = [first, *(rank for rank in range(len(processes)) if rank != first)]
    for rank in order:
        process = processes[rank]
        error = Path(workdir, f"rank{rank}.error")
        stacks = Path(workdir, f"rank{rank}.stacks")
        if error.exists():
            parts.append(f"\n\n-- rank {rank} raised:\n{error.read_text()}")
        elif stacks.exists() and stacks.stat().st_size:
            parts.append(f"\n\n-- rank {rank} was still running here:\n{stacks.read_text()}")
        elif process.exitcode not in (0, None):
            parts.append(f"\n\n-- rank {rank} exited with code {process.exitcode} (no traceback)")
    return "".join(parts)


def _load_result(workdir: str, rank: int) -> Any:
    path = Path(workdir, f"rank{rank}.pt")
    if not path.exists():
        raise DistributedLaunchError(f"rank {rank} exited cleanly but wrote no result.")
    return torch.load(path, weights_only=False)


@contextlib.contextmanager
def _patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------
# Scripts


@dataclass
class ScriptResult:
    """What one process of :func:`run_script` printed."""

    rank: int | None
    returncode: int
    stdout: str
    stderr: str


def run_script(
    script: str | os.PathLike[str],
    world_size: int = 2,
    args: Sequence[str] = (),
    *,
    timeout: float = 120.0,
    per_rank: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    python: str = sys.executable,
) -> list[ScriptResult]:
    """Run ``python script *args`` in ``world_size`` processes (or in one that launches its ranks).

    Args:
        script: path of the Python script.
        world_size: number of ranks.
        args: command-line arguments, the same for every rank.
        timeout: seconds for the whole run; every process is killed when it passes.
        per_rank: ``True``: start one process per rank with ``RANK``, ``LOCAL_RANK``,
            ``WORLD_SIZE``... set, as torchrun does. ``False``: start a single process with only
            ``MASTER_ADDR``/``MASTER_PORT`` set, for a script that starts its own ranks (Lightning
            ``strategy="ddp"`` re-executes ``sys.argv`` for the other ranks).
        env: extra environment variables.
        cwd: working directory (default: the current one).
        python: the interpreter.

    Returns:
        One :class:`ScriptResult` per process started, in rank order (stdout and stderr captured).

    Raises:
        DistributedLaunchError: if a process exits with a non-zero code (the message holds the
            output of every failing process).
        DistributedTimeoutError: if the time limit passed.
    """
    deadline = time.monotonic() + timeout
    port = find_free_port()
    ranks: list[int | None] = list(range(world_size)) if per_rank else [None]
    with tempfile.TemporaryDirectory(prefix="sdm-dist-") as workdir:
        procs: list[tuple[int | None, subprocess.Popen[bytes], Path, Path]] = []
        try:
            for rank in ranks:
                child_env = {**os.environ, **distributed_env(rank, world_size, port), **(env or {})}
                out, err = Path(workdir, f"{rank}.out"), Path(workdir, f"{rank}.err")
                with out.open("wb") as out_fh, err.open("wb") as err_fh:
                    proc = subprocess.Popen(
                        [python, str(script), *args],
                        env=child_env,
                        cwd=cwd,
                        stdout=out_fh,
                        stderr=err_fh,
                        start_new_session=True,  # so that the script's own children die with it
                    )
                procs.append((rank, proc, out, err))
            status, first = _wait_popen([proc for _, proc, _, _ in procs], deadline)
        finally:
            killed = [_kill_session(proc) for _, proc, _, _ in procs]
        results = [
            ScriptResult(rank, proc.returncode, out.read_text(), err.read_text())
            for rank, proc, out, err in procs
        ]
    if status == "timeout":
        message = f"{script} did not finish within {timeout:.0f} s; every process was killed."
        raise DistributedTimeoutError(message + _script_report(results, killed, first=0))
    if status == "failed":
        name = _process_name(results[first])
        message = f"{script} failed: {name} exited first, with code {results[first].returncode}."
        raise DistributedLaunchError(message + _script_report(results, killed, first=first))
    return results


def _wait_popen(procs: list[subprocess.Popen[bytes]], deadline: float) -> tuple[str, int]:
    """``("ok", -1)``, ``("failed", index of the first process that failed)`` or "timeout"."""
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [i for i, code in enumerate(codes) if code not in (0, None)]
        if failed:
            # Give the others a moment to fail on their own (their output then says why).
            grace_end = min(time.monotonic() + _GRACE_S, deadline)
            while time.monotonic() < grace_end and any(proc.poll() is None for proc in procs):
                time.sleep(0.05)
            return "failed", failed[0]
        if all(code is not None for code in codes):
            return "ok", -1
        if time.monotonic() >= deadline:
            return "timeout", -1
        time.sleep(0.05)


def _kill_session(proc: subprocess.Popen[bytes]) -> bool:
    """End the process and whatever it started; whether it had to be killed."""
    import signal

    killed = proc.poll() is None
    if killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Children the script left behind (its own session, so nothing else is hit).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return killed


def _process_name(result: ScriptResult) -> str:
    return "the launcher process" if result.rank is None else f"rank {result.rank}"


def _script_report(results: list[ScriptResult], killed: list[bool], first: int) -> str:
    parts = []
    order = [first, *(i for i in range(len(results)) if i != first)]
    for i in order:
        result = results[i]
        how = "killed by the launcher" if killed[i] else f"exit code {result.returncode}"
        parts.append(
            f"\n\n-- {_process_name(result)} ({how})\n"
            f"stdout:\n{result.stdout[-5000:]}\nstderr:\n{result.stderr[-10000:]}"
        )
    return "".join(parts)
