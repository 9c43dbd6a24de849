"""The one vocabulary of run and trial statuses, low enough for training, both search backends and the report.

A ``str`` enum: a member equals its string (``TrialStatus.DIVERGED == "diverged"``) and is written as that string
to JSON, summary files and Optuna user attributes, so files written before the enum read the same.
"""

from __future__ import annotations

import math
from enum import Enum

__all__ = [
    "BROKE",
    "WITH_VALUE",
    "TrialStatus",
    "completed_outcome",
    "explosion_cause",
]


class TrialStatus(str, Enum):
    """How a training run or a search trial ended (or where it stands)."""

    COMPLETED = "completed"  # trained to the end of its budget
    PRUNED = "pruned"  # stopped early by the pruner (a repeat or run stopped early reads as pruned in the report)
    DIVERGED = "diverged"  # non-finite loss, or a non-finite objective at the end
    EXPLODED = "exploded"  # finite NELBO far above its lowest so far (train.explode_factor): stopped there
    COLLAPSED = "collapsed"  # completed, but few latent units active at the end (train.collapse_fraction)
    SPIKY = "spiky"  # completed, but with loss spikes in more than train.spiky_fraction of its steps
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


# A run that broke: no objective value, a failure of its configuration (Optuna FAIL), counted by divergence rates.
BROKE = frozenset({TrialStatus.DIVERGED, TrialStatus.EXPLODED})
# A run that trained to its end: it keeps its objective values (Optuna COMPLETE) whatever its stability flag.
WITH_VALUE = frozenset({TrialStatus.COMPLETED, TrialStatus.COLLAPSED, TrialStatus.SPIKY})


def explosion_cause(nelbo: float, step: int, lowest: float, lowest_step: int, factor: float | None) -> str | None:
    """Why a finite logged NELBO counts as an explosion (None if it does not): it exceeds ``factor`` times the
    lowest NELBO logged before it. Healthy runs stay within 1.2x of their running minimum; runs that blow up at a
    too-high learning rate jump 3x to 10^5x above it, then often creep back down and end "completed" with a
    useless model. Only positive NELBOs (nats or bits/dim of discrete data) are compared: a ratio means nothing
    for a negative continuous-density NELBO."""
    if factor is None or not (math.isfinite(nelbo) and math.isfinite(lowest)) or lowest <= 0:
        return None
    if nelbo <= factor * lowest:
        return None
    return (
        f"NELBO {nelbo:.4g} at step {step} is {nelbo / lowest:.3g}x its lowest so far "
        f"({lowest:.4g} at step {lowest_step}; train.explode_factor {factor:g})"
    )


def completed_outcome(
    active_units: int,
    latent_units: int,
    loss_spikes: int,
    steps: int,
    collapse_fraction: float,
    spiky_fraction: float,
) -> tuple[TrialStatus, str | None]:
    """The status of a run that trained to its end, with its cause: collapsed before spiky before completed."""
    if latent_units > 0 and active_units < collapse_fraction * latent_units:
        share = active_units / latent_units
        return TrialStatus.COLLAPSED, (
            f"{active_units} of {latent_units} latent units active at the end ({share:.1%} < "
            f"train.collapse_fraction {collapse_fraction:g})"
        )
    if steps > 0 and loss_spikes > spiky_fraction * steps:
        return TrialStatus.SPIKY, (
            f"{loss_spikes} loss spikes in {steps} steps ({loss_spikes / steps:.1%} > "
            f"train.spiky_fraction {spiky_fraction:g})"
        )
    return TrialStatus.COMPLETED, None
