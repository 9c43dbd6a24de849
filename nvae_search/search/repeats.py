"""``nvae-search repeat``: train the seed repeats of a study's best configurations, resumably.

The space's ``repeats: {top_k, seeds}`` asks for the top ``top_k`` configurations (by the first objective) to be
run again on each seed of ``seeds`` that the study's own trials do not already cover. :func:`run_repeats` trains
the missing ones into ``<study>/repeats/<config id>/seed_<seed>/`` (the runs ``report`` reads):

- a run whose ``summary.json`` says ``completed`` or ``diverged`` is done and is skipped;
- a run cut off before its end (a ``checkpoint.pt`` but no summary, or a ``stopped`` summary) resumes from its
  checkpoint;
- a run cut off before its first checkpoint starts over in an emptied directory.

A repeat needs only the configuration's recipe values (the trial's ``values`` attribute, or its parameters
resolved through the space): it trains from scratch on its own seed, so it works after ``budget.keep_checkpoints``
removed the trials' checkpoints. Training is imported inside the functions only.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..config_io import ConfigError, atomic_write_text
from ..report import RepeatJob, plan_repeats, study_rows
from .runner import InvalidCombination, load_study, run_trial

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
    notes: list[str] = field(default_factory=list)


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
    if outcome.status in ("completed", "diverged"):
        _drop_checkpoint(space, job)
    return outcome.status


def run_repeats(
    study_dir: str | Path,
    *,
    backend: str = "optuna",
    on_start: Callable[[RepeatJob, int, int, bool], None] | None = None,
    on_end: Callable[[RepeatJob, str, str | None], None] | None = None,
) -> RepeatResult:
    """Run every missing repeat of the study in this process, one after the other (until one is stopped by a
    signal: it checkpointed, and the next call resumes it).

    ``on_start(job, index, total, resumed)`` and ``on_end(job, status, error)`` let the CLI show progress. One
    repeat that raises is recorded (``repeat_error.json`` in its directory) and the others still run.
    """
    if backend not in BACKENDS:
        raise ConfigError("--backend", [("backend", f"expected one of {', '.join(BACKENDS)}, got {backend!r}")])
    if backend == "ray":
        raise ConfigError(
            "--backend", [("backend", "repeats run on the in-process backend only for now (use --backend optuna)")]
        )
    root = Path(study_dir)
    study, space, _info = load_study(root)
    result = RepeatResult(study_dir=root)
    plan = plan_repeats(root, space, study_rows(study, space), result.notes)
    result.already_done = [job for job, _outcome in plan.done]
    from ..checkpoint import CHECKPOINT_NAME

    for index, job in enumerate(plan.missing, 1):
        if on_start is not None:
            on_start(job, index, len(plan.missing), (job.run_dir / CHECKPOINT_NAME).is_file())
        error: str | None = None
        try:
            status = run_one(space, job)
        except InvalidCombination as err:
            status, error = "invalid", str(err)
        except Exception as err:  # one broken repeat must not stop the others
            status, error = "failed", f"{type(err).__name__}: {err}"
        if error is None:
            result.ran.append((job, status))
        else:
            result.failed.append((job, error))
            job.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(job.run_dir / FAILED_FILE, json.dumps({"status": status, "error": error}, indent=2))
        if on_end is not None:
            on_end(job, status, error)
        if status == "stopped":
            break  # SIGINT/SIGTERM: the run checkpointed and stopped; the next `repeat` resumes it
    return result
