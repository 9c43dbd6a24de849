"""``nvae-search repeat``: train the seed repeats of a study's best configurations, resumably.

The space's ``repeats: {top_k, seeds}`` asks for the top ``top_k`` configurations (by the first objective) to be
run again on each seed of ``seeds`` that the study's own trials do not already cover. :func:`run_repeats` trains
the missing ones into ``<study>/repeats/<config id>/seed_<seed>/`` (the runs ``report`` reads):

- a run whose ``summary.json`` says ``completed`` or ``diverged`` is done and is skipped;
- a run cut off before its end (a ``checkpoint.pt`` but no summary, or a ``stopped`` summary) resumes from its
  checkpoint;
- a run cut off before its first checkpoint starts over in an emptied directory;
- a run another `repeat` process is training (it holds the run's lock file) is left to it, so several processes
  (one per core or GPU) can share one study's repeats.

A repeat needs only the configuration's recipe values (the trial's ``values`` attribute, or its parameters
resolved through the space): it trains from scratch on its own seed, so it works after ``budget.keep_checkpoints``
removed the trials' checkpoints. Training is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config_io import ConfigError, atomic_write_text
from ..status import TrialStatus
from .report_rows import REPEAT_DONE_STATUSES, RepeatJob, plan_repeats, read_repeat_summary, study_rows
from .runner import run_trial
from .trial import InvalidCombination, load_study

if TYPE_CHECKING:
    from ..spaces import Space

__all__ = ["RepeatResult", "run_repeats"]

BACKENDS = ("optuna", "ray")
FAILED_FILE = "repeat_error.json"  # in a repeat's run directory: why its last attempt raised


@dataclass
class RepeatResult:
    """What :func:`run_repeats` did: repeats already done before, run now (finished), and those that raised."""

    study_dir: Path
    already_done: list[RepeatJob] = field(default_factory=list)
    ran: list[tuple[RepeatJob, str]] = field(default_factory=list)  # (job, final status)
    failed: list[tuple[RepeatJob, str]] = field(default_factory=list)  # (job, reason)
    busy: list[RepeatJob] = field(default_factory=list)  # being trained by another `repeat` process
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def claimed(job: RepeatJob) -> Iterator[bool]:
    """Hold the repeat's lock file (``.seed_<s>.lock`` beside its run directory) while training it; yields False
    when another process holds it. The operating system releases the lock of a process that dies, so a killed
    `repeat` leaves nothing to clean up."""
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(job.run_dir.parent / f".{job.run_dir.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare(job: RepeatJob) -> bool:
    """Make the run directory ready; True to resume from its checkpoint, False to start from scratch."""
    from ..checkpoint import CHECKPOINT_NAME

    if (job.run_dir / CHECKPOINT_NAME).is_file():
        return True
    if job.run_dir.exists():
        # Cut off before its first checkpoint: its metrics and events would mix with the new run's.
        shutil.rmtree(job.run_dir)
    return False


def _drop_checkpoint(space: Space, job: RepeatJob) -> None:
    """With ``budget.keep_checkpoints: none`` a finished repeat keeps no checkpoint either."""
    from ..checkpoint import CHECKPOINT_NAME

    if space.budget.keep_checkpoints == "none":
        (job.run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)


def run_one(space: Space, job: RepeatJob) -> str:
    """Train (or resume) one repeat run; returns its final status. Raises what training raises."""
    resume = _prepare(job)
    (job.run_dir / FAILED_FILE).unlink(missing_ok=True)
    outcome = run_trial(space, job.values, job.run_dir, resume=resume)
    if outcome.status in REPEAT_DONE_STATUSES:
        _drop_checkpoint(space, job)
    return outcome.status


def _train_repeat(space: Space, job: RepeatJob) -> tuple[str, str | None]:
    """(final status, error or None): one broken repeat must not stop the others."""
    try:
        return run_one(space, job), None
    except InvalidCombination as err:  # or out of CUDA memory while training: over_memory
        return getattr(err, "status", TrialStatus.INVALID), str(err)
    except Exception as err:
        return TrialStatus.FAILED, f"{type(err).__name__}: {err}"


def _record(result: RepeatResult, job: RepeatJob, status: str, error: str | None) -> None:
    if error is None:
        result.ran.append((job, status))
        return
    result.failed.append((job, error))
    job.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job.run_dir / FAILED_FILE, json.dumps({"status": status, "error": error}, indent=2))


def run_repeats(
    study_dir: str | Path,
    *,
    backend: str = "optuna",
    address: str | None = None,
    on_start: Callable[[RepeatJob, int, int, bool], None] | None = None,
    on_end: Callable[[RepeatJob, str, str | None], None] | None = None,
) -> RepeatResult:
    """Run every missing repeat of the study: in this process one after the other (``optuna``, until one is
    stopped by a signal: it checkpointed, and the next call resumes it), or as Ray Tune trials with fixed
    configurations (``ray``, ``address`` as for ``search``; run directories must be on storage every node sees).

    ``on_start(job, index, total, resumed)`` and ``on_end(job, status, error)`` let the CLI show progress. One
    repeat that raises is recorded (``repeat_error.json`` in its directory) and the others still run.
    """
    if backend not in BACKENDS:
        raise ConfigError("--backend", [("backend", f"expected one of {', '.join(BACKENDS)}, got {backend!r}")])
    root = Path(study_dir)
    study, space, _info = load_study(root)
    if backend == "ray":
        root = root.resolve()  # Ray workers run in other directories
    result = RepeatResult(study_dir=root)
    if space.repeats.top_k <= 0:
        result.notes.append("the space asks for no repeats (add `repeats: {top_k: K, seeds: [...]}` to it)")
    plan = plan_repeats(root, space, study_rows(study, space), result.notes)
    result.already_done = [job for job, _outcome in plan.done]
    from ..checkpoint import CHECKPOINT_NAME

    for index, job in enumerate(plan.missing, 1):
        if backend == "ray":
            if on_start is not None:
                on_start(job, index, len(plan.missing), (job.run_dir / CHECKPOINT_NAME).is_file())
            continue  # all of them start together below
        # Several `repeat` processes may share the list: each trains the repeats no other one holds.
        with claimed(job) as mine:
            if not mine:
                result.busy.append(job)
                continue
            if read_repeat_summary(space, job) is not None:
                result.already_done.append(job)  # another process finished it since the plan was read
                continue
            if on_start is not None:
                on_start(job, index, len(plan.missing), (job.run_dir / CHECKPOINT_NAME).is_file())
            status, error = _train_repeat(space, job)
        _record(result, job, status, error)
        if on_end is not None:
            on_end(job, status, error)
        if status == TrialStatus.STOPPED:
            break  # SIGINT/SIGTERM: the run checkpointed and stopped; the next `repeat` resumes it
    if backend == "ray" and plan.missing:
        for job, status, error in _run_on_ray(space, plan.missing, root, address):
            _record(result, job, status, error)
            if on_end is not None:
                on_end(job, status, error)
    return result


# ------------------------------------------------------------------------------------------------- Ray
RAY_REPEATS = "repeats-{stamp}"  # the Tune experiment of one `repeat --backend ray`, under <study>/ray/


@contextlib.contextmanager
def _working_dir(path: str) -> Iterator[None]:
    """Run in the driver's directory (Ray starts trials elsewhere), so that relative data roots still resolve."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _ray_repeat(config: dict[str, Any], *, space: Space, jobs: list[RepeatJob], driver_cwd: str) -> None:
    """One Ray Tune trial: train (or resume, after a lost worker) one repeat run, then report its status."""
    from ray import tune

    from .ray_trainable import prepare_worker

    prepare_worker(space)
    index = int(config["job"])
    error: str | None = None
    with _working_dir(driver_cwd):
        try:
            status = run_one(space, jobs[index])
        except InvalidCombination as err:  # not worth a retry; other errors are Ray's to retry (max_failures)
            status, error = getattr(err, "status", TrialStatus.INVALID), str(err)
    tune.report({"job": index, "status": status, "error": error})


def _run_on_ray(
    space: Space, jobs: list[RepeatJob], study_dir: Path, address: str | None
) -> list[tuple[RepeatJob, str, str | None]]:
    """The repeats as one Tune experiment over fixed configurations (a grid over the job index)."""
    from ray import tune

    from .ray_backend import RAY_DIR, init_ray

    cfg = space.ray
    if cfg.workers_per_trial > 1:
        raise ConfigError(
            str(space.source or "<space>"),
            [
                (
                    "ray.workers_per_trial",
                    "repeats train each run in one process; data-parallel repeats are not supported",
                )
            ],
        )
    owns = init_ray(address or cfg.address)
    try:
        fn = tune.with_parameters(_ray_repeat, space=space, jobs=jobs, driver_cwd=os.getcwd())
        trainable = tune.with_resources(fn, {"cpu": cfg.resources_per_trial.cpu, "gpu": cfg.resources_per_trial.gpu})
        tuner = tune.Tuner(
            trainable,
            param_space={"job": tune.grid_search(list(range(len(jobs))))},
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=cfg.max_concurrent, reuse_actors=False),
            run_config=tune.RunConfig(
                name=RAY_REPEATS.format(stamp=time.strftime("%Y%m%d-%H%M%S")),
                storage_path=str(study_dir / RAY_DIR),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                verbose=0,
            ),
        )
        results = tuner.fit()
        out: dict[int, tuple[str, str | None]] = {}
        for res in results:
            index = (res.config or {}).get("job")
            if index is None:
                continue
            metrics = res.metrics or {}
            if res.error is not None:
                out[int(index)] = (TrialStatus.FAILED, f"{type(res.error).__name__}: {res.error}")
            elif "status" in metrics:
                out[int(index)] = (str(metrics["status"]), metrics.get("error"))
    finally:
        if owns:
            import ray

            ray.shutdown()
    # A job with no result was cut off (the driver stopped): like a stopped run, the next `repeat` resumes it.
    return [(job, *out.get(i, (TrialStatus.STOPPED, None))) for i, job in enumerate(jobs)]
