"""The search as a Python call, for notebooks: ``nvae_search.search(space)`` on either backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from ..spaces import Space, load_space

__all__ = ["search"]


def search(
    space: Space | str | os.PathLike[str],
    *,
    backend: Literal["optuna", "ray"] = "optuna",
    n_trials: int | None = None,
    storage: str | None = None,
    root: str | os.PathLike[str] = "runs",
    **options: Any,
) -> Path:
    """Run (or continue) the study of a space (a loaded :class:`Space` or a space file) and return its directory,
    as ``nvae-search search`` does; ``options`` go to the backend (Ray: ``address``; Optuna: ``tracking``)."""
    loaded = space if isinstance(space, Space) else load_space(Path(space))
    common: dict[str, Any] = {"n_trials": n_trials, "storage": storage, "root": root, **options}
    if backend == "ray":
        from .ray_backend import run_ray_search

        return run_ray_search(loaded, **common)
    if backend != "optuna":
        raise ValueError(f"backend must be optuna or ray, got {backend!r}")
    from .runner import run_optuna_search

    return run_optuna_search(loaded, **common)
