"""Data-parallel training of one recipe on one machine: ``workers`` processes, torch DDP, one run directory.

:func:`train_data_parallel` spawns the workers with ``torch.multiprocessing`` (spawn), gives each a rank, the
rendezvous address (127.0.0.1 and a free port) and, on CUDA, its own device, initialises the process group
(``gloo`` on CPU, ``nccl`` on CUDA) and calls :func:`nvae_search.train.train` in each. The trainer does the rest:
it wraps the model in DDP, each rank takes its slice of every global batch of ``batch_size × workers`` images, and
only rank 0 writes files. The function returns rank 0's summary, read back from ``summary.json``.

Rank 0's training reports are forwarded to the calling process, so a caller can watch or stop the run
(``on_report(step, metrics) -> bool``, as :data:`nvae_search.train.Reporter`); the decision is broadcast to every
rank so they all stop at the same step. The Ray backend uses this to call ``ray.tune.report`` from the trial's
own process. Workers die with the process that spawned them (``PR_SET_PDEATHSIG`` on Linux), so a killed search
or a pruned Ray trial leaves no orphan trainers behind.

Launched by ``torchrun`` instead (``torchrun --nproc-per-node N -m nvae_search train RECIPE``, any ``--nnodes``), each
process is already a rank: :func:`train_under_torchrun` joins torch's env:// process group and trains the same way.

Not in the search's module graph unless asked for: the Ray backend imports it only for ``workers_per_trial > 1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .schema import Recipe
    from .train import RunSummary

__all__ = [
    "batch_problem",
    "default_backend",
    "free_port",
    "launched_by_torchrun",
    "torchrun_world_size",
    "train_data_parallel",
    "train_under_torchrun",
]

OnReport = Callable[[int, dict[str, Any]], bool]
_POLL_S = 0.2
STOP_GRACE_S = 60.0  # a stopped run saves its checkpoint and summary before the workers are terminated


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port() -> int:
    """A TCP port that was free a moment ago (the rendezvous binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent goes (Linux only; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _worker(
    rank: int,
    world: int,
    port: int,
    backend: str,
    device_kind: str,
    recipe: Recipe,
    out_dir: str,
    resume: bool,
    threads: int,
    parent_pid: int,
    reports: Any,
    replies: Any,
    worker_init: Callable[[int], None] | None,
) -> None:
    """One rank: join the process group, train, leave. Runs in a spawned process."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)
    # The SIGINT of a Ctrl-C reaches the whole process group; the parent decides for everyone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    import torch
    import torch.distributed as dist

    from .runtime import tune_allocator
    from .train import train

    tune_allocator()
    torch.set_num_threads(threads)
    if worker_init is not None:
        worker_init(rank)
    device = torch.device("cpu")
    if device_kind == "cuda":
        index = rank % torch.cuda.device_count()  # nccl: distinct devices (checked); gloo may share one
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        reporter = _rank_reporter(rank, reports, replies, parent_pid, backend)
        train(recipe, out_dir, resume=resume, reporter=reporter, device=device)
        _finish_together(device)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _finish_together(device: Any) -> None:
    """Every rank done before any tears its process group down: rank 0 hosts the store the others' teardown still
    talks to, and a rank left behind by one that exited can abort in gloo's teardown (SIGABRT, seen once in CI)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":  # nccl's barrier runs on the rank's own device; gloo's takes none
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def _rank_reporter(rank: int, reports: Any, replies: Any, parent_pid: int, backend: str) -> OnReport:
    """Rank 0 forwards (step, metrics) to the parent and waits for its stop/go; every rank then takes the same
    decision from a broadcast, so no rank is left waiting in a collective that the others never enter."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def reporter(step: int, metrics: dict[str, Any]) -> bool:
        stop = 0
        if rank == 0:
            reports.put((step, metrics))
            while True:
                try:
                    stop = int(bool(replies.get(timeout=1.0)))
                    break
                except queue.Empty:
                    if os.getppid() != parent_pid:
                        os._exit(1)
        flag = torch.tensor([stop], dtype=torch.int32, device=device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    return reporter


def _summary_from_file(out_dir: Path) -> RunSummary:
    from .train import RunSummary

    data = json.loads((out_dir / "summary.json").read_text())
    return RunSummary(**data)


def train_data_parallel(
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    workers: int,
    backend: str | None = None,
    resume: bool = False,
    *,
    on_report: OnReport | None = None,
    device: str | None = None,
    threads_per_worker: int | None = None,
    worker_init: Callable[[int], None] | None = None,
) -> RunSummary:
    """Train ``recipe`` data-parallel over ``workers`` local processes into ``out_dir``; rank 0's summary.

    ``recipe.train.batch_size`` is the per-rank batch: one step sees ``batch_size × workers`` images.
    ``backend``: ``gloo`` (CPU) or ``nccl`` (one CUDA device per rank; ``workers`` ≤ visible devices); default:
    nccl when CUDA is available. ``workers == 1`` trains in this process. ``on_report(step, metrics)`` is called
    in this process at every report of rank 0; True stops the run on every rank (status ``stopped``). An
    exception raised by ``on_report`` (or a Ctrl-C while it runs) stops every rank the same way, waits for them
    to write their checkpoint and summary, and propagates; other failures terminate the workers.
    ``device``: ``cpu`` or ``cuda`` (default: cuda for nccl, cpu for gloo; rank r uses CUDA device
    r mod the visible devices, so gloo ranks may share a GPU).
    ``threads_per_worker``: torch intra-op threads per rank (default: this process's threads / workers).
    ``worker_init(rank)``: a picklable (module-level) function run in each worker before training.
    """
    from .train import RunDirError, resumable_state, train

    out = Path(out_dir)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        return train(recipe, out, resume=resume, reporter=on_report)
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be gloo or nccl, got {backend!r}")

    import torch
    import torch.multiprocessing as mp

    device = device or ("cuda" if backend == "nccl" else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda (or backend nccl) needs CUDA devices; use gloo on CPU")
    if backend == "nccl":
        if device != "cuda":
            raise ValueError("backend nccl runs on CUDA devices only; use gloo for CPU training")
        if torch.cuda.device_count() < workers:
            raise ValueError(
                f"{workers} nccl workers need {workers} visible CUDA devices, found {torch.cuda.device_count()}"
            )
    from .checkpoint import CHECKPOINT_NAME

    if not resume and (out / CHECKPOINT_NAME).exists():
        raise RunDirError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and (out / CHECKPOINT_NAME).exists():
        resumable_state(out / CHECKPOINT_NAME, recipe)  # a bad checkpoint: one clean error here, not one per rank
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # so a stale summary is never mistaken for this run's

    threads = threads_per_worker or max(1, torch.get_num_threads() // workers)
    ctx = mp.get_context("spawn")
    reports, replies = ctx.Queue(), ctx.Queue()
    args = (
        workers,
        free_port(),
        backend,
        device,
        recipe,
        str(out),
        resume,
        threads,
        os.getpid(),
        reports,
        replies,
        worker_init,
    )
    procs = mp.start_processes(_worker, args=args, nprocs=workers, join=False, start_method="spawn")
    finished = waiting = False
    try:
        while not finished:
            try:
                step, metrics = reports.get(timeout=_POLL_S)
            except queue.Empty:
                finished = procs.join(timeout=0)  # raises ProcessRaisedException/ProcessExitedException on failure
                continue
            waiting = True  # rank 0 waits for this reply, the other ranks in the broadcast after it
            stop = bool(on_report(step, metrics)) if on_report is not None else False
            replies.put(stop)
            waiting = False
    except BaseException:
        if waiting:  # the caller gave up (e.g. Ray stopped the trial): stop every rank at this step, cleanly
            with contextlib.suppress(Exception):
                replies.put(True)
        raise
    finally:
        if not finished:
            _shut_down(procs.processes, grace_s=STOP_GRACE_S if waiting else 0.0)
        for q in (reports, replies):
            q.close()
            q.cancel_join_thread()
    return _summary_from_file(out)


def _shut_down(processes: list[Any], grace_s: float) -> None:
    """Give the workers ``grace_s`` to exit by themselves (they were told to stop), then SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


# ---------------------------------------------------------------------------------------------- torchrun
# torchrun (torch.distributed.run) starts every rank itself and describes it in these variables; a process that
# finds them trains as that rank instead of spawning workers (one node or several, with --nnodes and a rendezvous).
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process is a rank started by torchrun (or any launcher setting torch's env:// variables)."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def torchrun_world_size() -> int | None:
    """WORLD_SIZE of a torchrun launch, else None."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else None


def batch_problem(recipe: Recipe, world: int) -> str | None:
    """Why ``recipe`` cannot run on ``world`` processes (its global batch does not divide), else None."""
    try:
        recipe.train.per_process_batch(world)
    except ValueError as exc:
        return str(exc)
    return None


def train_under_torchrun(
    recipe: Recipe, out_dir: str | os.PathLike[str], *, resume: bool = False, device: str | None = None
) -> tuple[int, RunSummary]:
    """Train as the rank torchrun describes: join its process group (env://), train, leave; (rank, summary).

    The backend is nccl when CUDA is available (each rank on the device LOCAL_RANK), else gloo. Checkpoints,
    budgets and resume are the trainer's, exactly as with ``--workers``: every rank reads the same run directory
    (on a shared file system for several nodes) and rank 0 writes it.
    """
    import torch
    import torch.distributed as dist

    from .runtime import tune_allocator
    from .train import train

    tune_allocator()
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    target = torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it to 1 itself; otherwise share the cores
        torch.set_num_threads(max(1, torch.get_num_threads() // local_world))
    dist.init_process_group(backend, init_method="env://")
    try:
        rank = dist.get_rank()
        summary = train(recipe, out_dir, resume=resume, device=target)
        _finish_together(target)
        return rank, summary
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
