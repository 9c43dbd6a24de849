"""The one vocabulary of run and trial statuses, low enough for training, both search backends and the report.

A ``str`` enum: a member equals its string (``TrialStatus.DIVERGED == "diverged"``) and is written as that string
to JSON, summary files and Optuna user attributes, so files written before the enum read the same.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["TrialStatus"]


class TrialStatus(str, Enum):
    """How a training run or a search trial ended (or where it stands)."""

    COMPLETED = "completed"  # trained to the end of its budget
    PRUNED = "pruned"  # stopped early by the pruner (a repeat or run stopped early reads as pruned in the report)
    DIVERGED = "diverged"  # non-finite loss, or a non-finite objective at the end
    FAILED = "failed"  # an unexpected error in the trial
    INVALID = "invalid"  # a sampled combination the schema or the builder rejects: never trained
    OVER_MEMORY = "over_memory"  # predicted over the space's memory limit: never trained
    INTERRUPTED = "interrupted"  # cut off by a kill (queued again once); never counted
    RUNNING = "running"
    WAITING = "waiting"
    STOPPED = "stopped"  # a training run cut off by a signal or a clock budget before its planned end
    ERROR = "error"  # Ray: the trial raised or its worker died after Ray's retries (the report counts it as failed)

    # The plain string, also in f-strings and str(): these values are written to files and printed.
    __str__ = str.__str__
    __format__ = str.__format__
