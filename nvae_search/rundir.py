"""Names of the files and folders in run and study directories, shared by training, loading, tracking and search.

Torch-free and import-free, so that any floor of the package may use them.
"""

from __future__ import annotations

__all__ = ["RESOLVED_RECIPE", "TRIALS_DIR"]

RESOLVED_RECIPE = "recipe.resolved.yaml"  # the recipe a run directory was trained with (load_run reads it)
TRIALS_DIR = "trials"  # a study directory's trial runs: <study>/trials/NNNN/
