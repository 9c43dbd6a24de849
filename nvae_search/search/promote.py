"""``study.promote``: successive halving run as studies.

A rung is a study with its own budget; the next rung's space names the previous rung and how many of its best
configurations to promote. Those are enqueued (before the space's own ``enqueue`` points) when the next rung's
study is created, so its first trials train them on the longer budget; later trials, if ``n_trials`` leaves room,
are sampled as usual. The rungs search the same parameters, so a promoted trial's parameters are used as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config_io import ConfigError
from .compile import all_specs, per_scale_paths

if TYPE_CHECKING:
    from ..spaces import Space

__all__ = ["promoted_points"]


def promoted_points(space: Space, study_dir: Path) -> list[dict[str, Any]]:
    """The parameters of the ``study.promote.top_k`` best configurations of the promoted study (the folder beside
    ``study_dir``), best first; [] without ``study.promote``. A ConfigError when that study cannot be read or
    searched other parameters."""
    promote = space.study.promote
    if promote is None:
        return []
    from .report_rows import best_configs, study_rows
    from .trial import load_study

    source = study_dir.parent / promote.study
    where, field = str(space.source or space.study.name), "study.promote.study"
    if not source.is_dir():
        raise ConfigError(where, [(field, f"no study folder {source} (run the earlier rung first)")])
    study, source_space, _info = load_study(source)
    best = best_configs(study_rows(study, source_space), promote.top_k, source_space.study.objectives[0].direction)
    if not best:
        raise ConfigError(where, [(field, f"the study in {source} has no finished trial with a value")])
    names, per_scale = {path for path, _spec in all_specs(space.space)}, per_scale_paths(space)
    points = []
    for run in best:
        foreign = sorted(k for k in run.params if k not in names and k.rpartition(".")[0] not in per_scale)
        if foreign:
            reason = f"trial {run.trial} of {source} has parameters this space does not search: {', '.join(foreign)}"
            raise ConfigError(where, [(field, reason)])
        points.append(dict(run.params))
    return points
