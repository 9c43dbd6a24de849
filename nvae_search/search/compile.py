"""Compile a validated :class:`~nvae_search.spaces.Space` into Optuna objects.

One define-by-run function serves both backends: ``study.optimize`` calls it directly, and Ray Tune's
``OptunaSearch(space=fn)`` calls the variant that returns None, then hands the trial the flat parameters, which
:func:`resolve_flat_params` turns back into recipe values. Optuna is imported inside the functions only, so this
module imports without it.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ..config_io import ConfigError
from ..spaces import (
    BranchSpec,
    CategoricalSpec,
    FixedSpec,
    FloatSpec,
    IntSpec,
    PerScaleSpec,
    Space,
    grid_values,
)

if TYPE_CHECKING:
    import optuna

__all__ = [
    "all_specs",
    "directions",
    "enqueue_points",
    "grid_search_space",
    "make_define_by_run",
    "make_pruner",
    "make_ray_space_fn",
    "make_sampler",
    "per_scale_paths",
    "resolve_flat_params",
    "sampler_exhausted",
    "trial_seed",
]


class _Suggester(Protocol):
    """The part of an Optuna trial the tree needs; ``optuna.trial.BaseTrial`` and Ray's wrapper provide it."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def _suggest(trial: _Suggester, name: str, spec: FloatSpec | IntSpec | CategoricalSpec) -> Any:
    if isinstance(spec, FloatSpec):
        return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    if isinstance(spec, IntSpec):
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return trial.suggest_categorical(name, list(spec.choices))


def _sample(trial: _Suggester, tree: Mapping[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Suggest the tree in order, filling ``values`` with what goes into the recipe (branch labels excluded)."""
    for path, spec in tree.items():
        if isinstance(spec, FixedSpec):
            values[path] = copy.deepcopy(spec.value)
        elif isinstance(spec, BranchSpec):
            label = trial.suggest_categorical(path, list(spec.choices))
            _sample(trial, spec.choices[label], values)
        elif isinstance(spec, PerScaleSpec):
            count = spec.count if isinstance(spec.count, int) else values[spec.count]
            values[path] = [_suggest(trial, f"{path}.{i}", spec.each) for i in range(count)]
        else:
            values[path] = _suggest(trial, path, spec)
    return values


def make_define_by_run(space: Space) -> Callable[[optuna.trial.BaseTrial], dict[str, Any]]:
    """``fn(trial) -> {dotted recipe path: value}`` with fixed values and per-scale lists; pass it to
    :func:`nvae_search.spaces.apply_params`. Works with ``FixedTrial`` too."""

    def define_by_run(trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        return _sample(trial, space.space, {})

    return define_by_run


def make_ray_space_fn(space: Space) -> Callable[[optuna.trial.BaseTrial], None]:
    """The same suggestions for Ray's ``OptunaSearch(space=fn)``, which wants None or a dict of constants.

    Ray then gives the trainable the flat parameters as its config; :func:`resolve_flat_params` rebuilds the
    recipe values from them.
    """

    def ray_space(trial: optuna.trial.BaseTrial) -> None:
        _sample(trial, space.space, {})

    return ray_space


class _FlatParams:
    """Replays a flat ``{parameter name: value}`` dict (``trial.params``) through the suggest interface."""

    def __init__(self, flat: Mapping[str, Any]) -> None:
        self.flat = flat

    def _get(self, name: str) -> Any:
        if name not in self.flat:
            raise ValueError(f"the flat parameters lack {name!r}, which this space samples")
        return self.flat[name]

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return self._get(name)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return self._get(name)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        value = self._get(name)
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {list(choices)}")
        return value


def resolve_flat_params(space: Space, flat: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe values of a trial from its flat Optuna parameters (extra keys, e.g. Ray constants, are ignored)."""
    return _sample(_FlatParams(flat), space.space, {})


def enqueue_points(space: Space) -> list[dict[str, Any]]:
    """``study.enqueue`` as flat dicts for ``study.enqueue_trial``; a per-scale list becomes ``<path>.<i>``."""
    per_scale = per_scale_paths(space)
    points = []
    for point in space.study.enqueue:
        flat: dict[str, Any] = {}
        for key, value in point.items():
            if key in per_scale and isinstance(value, list):
                flat.update({f"{key}.{i}": v for i, v in enumerate(value)})
            else:
                flat[key] = value
        points.append(flat)
    return points


def per_scale_paths(space: Space) -> set[str]:
    """The paths of the space's per-scale specs: their Optuna parameters are named ``<path>.<i>``."""
    return {path for path, spec in all_specs(space.space) if isinstance(spec, PerScaleSpec)}


def all_specs(tree: Mapping[str, Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for path, spec in tree.items():
        out.append((path, spec))
        if isinstance(spec, BranchSpec):
            for sub in spec.choices.values():
                out += all_specs(sub)
    return out


def grid_search_space(space: Space) -> dict[str, list[Any]]:
    """The ``GridSampler`` search space: every top-level parameter with its finite list of values."""
    return grid_values(space)


def directions(space: Space) -> list[str]:
    return [objective.direction for objective in space.study.objectives]


def make_sampler(space: Space) -> optuna.samplers.BaseSampler:
    """The space's sampler, seeded per trial from ``study.seed`` and the trial number (see :class:`TrialSeeded`)."""
    if space.sampler.type == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise ConfigError(
            str(space.source or "<space>"),
            [("sampler.type", "cmaes needs the optional 'cmaes' package (pip install cmaes), which is not installed")],
        )
    sampler = _trial_seeded_class()(space)
    _base_sampler(space, space.study.seed)  # options Optuna rejects or warns about: here, once, not per trial
    return sampler


def _base_sampler(space: Space, seed: int | None) -> optuna.samplers.BaseSampler:
    import optuna

    cfg = space.sampler
    if cfg.type == "tpe":
        return optuna.samplers.TPESampler(
            n_startup_trials=cfg.n_startup_trials, multivariate=cfg.multivariate, group=cfg.group, seed=seed
        )
    if cfg.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.type == "grid":
        # The seed shuffles the order of the cells, which grid ids in the study refer to: it must be the same for
        # every trial and process. Finished and running cells are skipped, so a continued grid still goes on.
        return optuna.samplers.GridSampler(grid_search_space(space), seed=space.study.seed)
    if cfg.type == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=cfg.population_size, seed=seed)
    return optuna.samplers.CmaEsSampler(n_startup_trials=cfg.n_startup_trials, seed=seed)


def trial_seed(study_seed: int | None, trial_number: int) -> int | None:
    """The sampler seed of one trial: a fresh run is reproducible, and no two trials of a study share a seed."""
    if study_seed is None:
        return None
    return (study_seed * 1_000_003 + trial_number) % 2**32


@functools.cache
def _trial_seeded_class() -> type:
    import optuna

    class TrialSeeded(optuna.samplers.BaseSampler):
        """The space's sampler, built afresh for each trial with :func:`trial_seed` of its number.

        A sampler seeded once per process replays its draws whenever a study is continued (and every concurrent
        worker draws the same points). All Optuna samplers used here keep their state in the study (trial and
        system attributes), so a per-trial instance loses nothing; the trial number is unique across processes.
        """

        def __init__(self, space: Space) -> None:
            self._space = space
            self._by_trial: dict[int, optuna.samplers.BaseSampler] = {}

        def _for(self, trial: optuna.trial.FrozenTrial) -> optuna.samplers.BaseSampler:
            sampler = self._by_trial.get(trial.number)
            if sampler is None:
                with warnings.catch_warnings():
                    # e.g. "multivariate is experimental": said once by make_sampler, not again for every trial
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    sampler = _base_sampler(self._space, trial_seed(self._space.study.seed, trial.number))
                self._by_trial[trial.number] = sampler
            return sampler

        def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(
            self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict
        ) -> dict[str, Any]:
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(
            self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str, param_distribution: Any
        ) -> Any:
            return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: Any, values: Any) -> None:
            sampler = self._for(trial)
            # GridSampler.after_trial only calls study.stop() once the grid is done, which raises outside
            # study.optimize (ask-and-tell, Ray); the search loops ask sampler_exhausted() instead.
            if not isinstance(sampler, optuna.samplers.GridSampler):
                sampler.after_trial(study, trial, state, values)
            self._by_trial.pop(trial.number, None)

        def reseed_rng(self) -> None:
            pass  # every trial's seed is fixed by its number

    return TrialSeeded


def sampler_exhausted(study: optuna.Study) -> bool:
    """Whether the study's sampler has nothing new left to draw (a grid whose cells are all finished or running)."""
    import optuna

    sampler = study.sampler
    if not isinstance(sampler, _trial_seeded_class()) or sampler._space.sampler.type != "grid":
        return False
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        return False  # queued points (warm start, re-runs of interrupted trials) come first
    grid = _base_sampler(sampler._space, None)
    assert isinstance(grid, optuna.samplers.GridSampler)
    return grid.is_exhausted(study)


def make_pruner(space: Space) -> optuna.pruners.BasePruner:
    import optuna

    cfg = space.pruner
    if cfg.type == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps, interval_steps=cfg.interval_steps
        )
    if cfg.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor
        )
    if cfg.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource, max_resource=cfg.max_resource, reduction_factor=cfg.reduction_factor
        )
    if cfg.type == "threshold":
        return optuna.pruners.ThresholdPruner(lower=cfg.lower, upper=cfg.upper, n_warmup_steps=cfg.n_warmup_steps)
    # none, and instability: a rule over the logged metrics (grad norm too) that the backends apply themselves
    return optuna.pruners.NopPruner()
