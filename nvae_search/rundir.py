"""Names of the files and folders in run and study directories, shared by training, loading, tracking and search.

Torch-free and free of imports beyond ``os``, so that any floor of the package may use them.
"""

from __future__ import annotations

import os

__all__ = ["RAY_TRIAL_PREFIX", "RESOLVED_RECIPE", "TRIALS_DIR", "ray_trial_dir"]

RESOLVED_RECIPE = "recipe.resolved.yaml"  # the recipe a run directory was trained with (load_run reads it)
TRIALS_DIR = "trials"  # a study directory's trial runs: <study>/trials/NNNN/
RAY_TRIAL_PREFIX = "ray_"  # a Ray trial's run: <study>/trials/ray_<tune trial id>/


def ray_trial_dir(study_dir: str | os.PathLike[str], tune_trial_id: str) -> str:
    """The run directory of the Ray Tune trial ``tune_trial_id`` in a study directory."""
    return os.path.join(os.fspath(study_dir), TRIALS_DIR, f"{RAY_TRIAL_PREFIX}{tune_trial_id}")
