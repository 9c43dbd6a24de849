"""The disk budget of a study: which finished trials keep their checkpoints (``budget.keep_checkpoints``).

A paper-scale trial's ``checkpoint.pt`` is over a gigabyte, so by default (``best``) only the best
``budget.keep_top_k`` trials by the first objective keep theirs (``keep_top_k`` null: ``repeats.top_k``, at least
one); ``none`` keeps none and ``all`` keeps every one. Metrics, summaries, resolved recipes and parameters stay
for every trial: ``report`` and ``repeat`` never need a trial's checkpoint.

:func:`apply_checkpoint_policy` runs after every trial that ends, on either backend. It is safe with several
workers on one study: it only ever touches trials in a finished state (COMPLETE, PRUNED, FAIL), never a RUNNING
or WAITING one, only files named ``checkpoint.pt`` inside the study's ``trials/`` folder (and, for Ray trials,
Ray's copies under the study's ``ray/`` folder), and a file another worker removed first is simply skipped. A
trial that re-enters the top later has lost its checkpoint for good: ranking needs finished trials, so the
policy can only judge a trial once it has ended.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..rundir import RAY_TRIAL_PREFIX
from .runner import TRIALS_DIR

if TYPE_CHECKING:
    import optuna

    from ..spaces import Space

__all__ = ["apply_checkpoint_policy", "checkpoint_callback", "kept_trials"]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"  # = checkpoint.CHECKPOINT_NAME, without importing torch
RAY_DIR = "ray"  # = ray_backend.RAY_DIR


def keep_top_k(space: Space) -> int:
    return space.budget.keep_top_k or max(1, space.repeats.top_k)


def kept_trials(study: optuna.Study, space: Space) -> set[int]:
    """Numbers of the finished trials whose checkpoints the policy keeps."""
    import optuna

    policy = space.budget.keep_checkpoints
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if policy == "all":
        return {t.number for t in study.get_trials(deepcopy=False)}
    if policy == "none":
        return set()
    sign = -1.0 if space.study.objectives[0].direction == "maximize" else 1.0
    scored = [
        (sign * float(t.values[0]), t.number)
        for t in complete
        if t.values and t.values[0] is not None and math.isfinite(float(t.values[0]))
    ]
    return {number for _score, number in sorted(scored)[: keep_top_k(space)]}


def _trial_dir(study_dir: Path, trial: optuna.trial.FrozenTrial) -> Path | None:
    """The trial's run directory, only if it lies inside ``<study_dir>/trials/``."""
    recorded = trial.user_attrs.get("run_dir")
    if not recorded:
        return None
    path = Path(str(recorded))
    if not path.is_absolute() and not path.exists():  # recorded relative to another working directory
        path = study_dir / TRIALS_DIR / path.name
    trials_root = (study_dir / TRIALS_DIR).resolve()
    resolved = path.resolve()
    return resolved if resolved.parent == trials_root else None


def _checkpoint_files(study_dir: Path, run_dir: Path) -> list[Path]:
    files = [run_dir / CHECKPOINT_FILE, *sorted(run_dir.glob(f"seed_*/{CHECKPOINT_FILE}"))]  # study.aggregate
    if run_dir.name.startswith(RAY_TRIAL_PREFIX):
        # Ray keeps its own copies of the trial's checkpoint (a folder per report) under ray/<experiment>/.
        trial_id = run_dir.name.removeprefix(RAY_TRIAL_PREFIX)
        files += sorted((study_dir / RAY_DIR).glob(f"*/*_{trial_id}_*/checkpoint_*/{CHECKPOINT_FILE}"))
    return files


def apply_checkpoint_policy(study: optuna.Study, space: Space, study_dir: str | Path) -> list[Path]:
    """Delete the checkpoints of finished trials outside the kept set; returns the files it deleted."""
    import optuna

    if space.budget.keep_checkpoints == "all":
        return []
    root = Path(study_dir).resolve()
    keep = kept_trials(study, space)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    removed: list[Path] = []
    for trial in study.get_trials(deepcopy=False, states=finished):
        if trial.number in keep:
            continue
        run_dir = _trial_dir(root, trial)
        if run_dir is None:
            continue
        for path in _checkpoint_files(root, run_dir):
            try:
                path.unlink()
            except FileNotFoundError:
                continue  # never written, or another worker removed it first
            removed.append(path)
    return removed


def checkpoint_callback(space: Space, study_dir: str | Path) -> Callable[[optuna.Study, Any], None]:
    """An Optuna ``study.optimize`` callback applying the policy after each trial."""

    def callback(study: optuna.Study, trial: Any) -> None:
        try:
            apply_checkpoint_policy(study, space, study_dir)
        except OSError:  # a disk clean-up problem must not end the search
            logger.exception("could not apply budget.keep_checkpoints after trial %s", trial.number)

    return callback
