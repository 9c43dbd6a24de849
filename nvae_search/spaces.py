"""Search-space files: a base recipe, the study settings, and a tree of searched and fixed recipe values.

A space file maps dotted recipe paths (``train.learning_rate``) to specs under ``space:``. The key order is the
sampling order. ``nvae_search.search.compile`` turns the tree into an Optuna define-by-run function, and
:func:`apply_params` writes the values of one trial over the base recipe and re-validates it. So an impossible
combination is rejected by the same rules that guard hand-written recipes.

Spec kinds (``type``):

- ``float {low, high, log, step}`` and ``int {low, high, log, step}`` (bounds inclusive): ``suggest_float/int``.
- ``categorical {choices: [primitives]}``: ``suggest_categorical``.
- ``categorical {choices: {label: {path: spec, ...}}}``: a *branch*. It samples a label under the branch's own
  dotted name, then the sub-space of that label. The branch name is a search label only: it is never written
  to the recipe, so it must not be a recipe field (put a ``fixed`` spec inside each sub-space to set a field).
- ``fixed {value}``: a constant written to the recipe, not searched.
- ``per_scale {count, each}``: ``count`` values named ``<path>.0``, ``<path>.1`` …, written as a list to
  ``<path>``; ``count`` is an int or the path of an integer sampled (or fixed) earlier in the space.

Parameter names are the full dotted paths, so they are stable across trials.

Imports neither torch nor optuna (a layering test enforces it).
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from .config_io import ConfigError, get_dotted, pydantic_problems, read_yaml_file, set_dotted
from .schema import Recipe, Strict, TrackingConfig, load_recipe, recipe_from_dict
from .schema.space_checks import TreeChecker, did_you_mean, recipe_path_suggestions, with_suggestions
from .schema.specs import (
    SPEC_TYPES,
    BranchSpec,
    CategoricalSpec,
    FixedSpec,
    FloatSpec,
    IntSpec,
    PerScaleSpec,
    SpaceTree,
    grid_problems,
    parameter_specs,
    spec_tag,
    walk_tree,
)
from .schema.study import (
    METRICS,
    Budget,
    Constraints,
    MedianPrunerConfig,
    PrunerConfig,
    RayConfig,
    Repeats,
    SamplerConfig,
    StudyConfig,
    TPESamplerConfig,
    storage_form_problem,
)

__all__ = [
    "METRICS",
    "BranchSpec",
    "Budget",
    "CategoricalSpec",
    "FixedSpec",
    "FloatSpec",
    "IntSpec",
    "PerScaleSpec",
    "Space",
    "apply_params",
    "budget_overrides",
    "grid_values",
    "load_space",
    "parameter_specs",
    "recipe_path_suggestions",
    "space_from_dict",
    "space_json_schema",
    "space_size",
    "storage_form_problem",
]

Problem = tuple[str, str]


# ------------------------------------------------------------------------------------------------- space
class Space(Strict):
    """One search-space file. Build it with :func:`load_space` or :func:`space_from_dict`, which also check the
    tree against the recipe schema and the base recipe; ``Space.model_validate`` alone checks the structure only."""

    base_recipe: str = Field(
        min_length=1, description="Path of the base recipe, relative to the space file, or a built-in name (cpu/tiny)."
    )
    study: StudyConfig
    budget: Budget
    repeats: Repeats = Repeats()
    space: SpaceTree = Field(min_length=1, description="Dotted recipe path -> spec, sampled in this order.")
    sampler: SamplerConfig = TPESamplerConfig(type="tpe")
    pruner: PrunerConfig = Field(
        MedianPrunerConfig(type="median"), description="Default: median, or none for a multi-objective study."
    )
    storage: str | None = Field(
        None, description="Optuna storage URL or journal:PATH; null = journal file study.journal in the study dir."
    )
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    constraints: Constraints = Constraints()

    _source: Path | None = PrivateAttr(None)
    _base: tuple[dict[str, Any], dict[str, Any]] | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if not (v is None and k in ("repeats", "sampler", "pruner", "ray"))}
        study = data.get("study")
        objectives = study.get("objectives") if isinstance(study, dict) else None
        if isinstance(objectives, list) and len(objectives) > 1:
            # Pruning cannot work with 2+ objectives, so the single-objective defaults would only raise errors.
            data.setdefault("pruner", {"type": "none"})
            ray = data.get("ray", {})
            if isinstance(ray, dict) and "scheduler" not in ray:
                data["ray"] = {**ray, "scheduler": {"type": "none"}}
        return data

    @field_validator("sampler")
    @classmethod
    def _sampler_fits(cls, sampler: Any, info: ValidationInfo) -> Any:
        study, tree = info.data.get("study"), info.data.get("space")
        if sampler.type == "cmaes" and study is not None and study.multi_objective:
            raise ValueError("cmaes optimises a single objective; use nsga2 or tpe for a Pareto search")
        if sampler.type == "grid" and tree is not None:
            problems = grid_problems(tree, "space")
            if problems:
                raise ValueError("grid needs finite values for every searched parameter: " + "; ".join(problems))
        return sampler

    @field_validator("pruner")
    @classmethod
    def _pruner_fits(cls, pruner: Any, info: ValidationInfo) -> Any:
        study = info.data.get("study")
        if study is not None and study.multi_objective and pruner.type not in ("none", "instability"):
            raise ValueError(
                f"a study with {len(study.objectives)} objectives cannot prune: in Optuna 5.0 trial.report and "
                "should_prune raise NotImplementedError for multi-objective studies; use {type: none}"
            )
        return pruner

    @field_validator("storage")
    @classmethod
    def _storage_form(cls, storage: str | None) -> str | None:
        problem = None if storage is None else storage_form_problem(storage)
        if problem:
            raise ValueError(problem)
        return storage

    @field_validator("ray")
    @classmethod
    def _ray_fits(cls, ray: RayConfig, info: ValidationInfo) -> RayConfig:
        study = info.data.get("study")
        if study is not None and study.multi_objective and ray.scheduler.type != "none":
            raise ValueError(
                "scheduler must be {type: none} for a multi-objective study: ASHA stops trials on one metric and "
                "Ray tells Optuna their low-fidelity values as complete, which corrupts the Pareto front"
            )
        return ray

    @property
    def source(self) -> Path | None:
        """The space file this was read from (None when built from a dict without a path)."""
        return self._source

    @property
    def base_recipe_path(self) -> Path:
        """The base recipe as an absolute path, resolved against the space file's folder; a path that is not
        there but names a shipped recipe (``cpu/tiny``, or ``../recipes/cpu/tiny.yaml`` in a copied space) is it."""
        from .builtins import shipped_base_recipe

        path = self.resolve_path(self.base_recipe)
        return path if path.is_file() else shipped_base_recipe(self.base_recipe) or path

    @property
    def multi_objective(self) -> bool:
        return self.study.multi_objective

    def resolve_path(self, path: str) -> Path:
        """A path written in the space file, made absolute against the file's folder (or the working directory)."""
        p = Path(path).expanduser()
        return (p if p.is_absolute() else (self._source.parent if self._source else Path.cwd()) / p).resolve()

    def base_recipe_data(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The base recipe as written in its file, and as validated (``model_dump``), both read once."""
        if self._base is None:
            raw = read_yaml_file(self.base_recipe_path) or {}
            recipe = load_recipe(self.base_recipe_path)
            self._base = (raw, recipe.model_dump(mode="json"))
        return self._base


def grid_values(space: Space) -> dict[str, list[Any]]:
    """The grid of a space whose searched parameters are all finite (see ``sampler: grid``)."""
    grid: dict[str, list[Any]] = {}
    for path, spec in space.space.items():
        if isinstance(spec, BranchSpec):
            grid[path] = list(spec.choices)
        elif isinstance(spec, PerScaleSpec) and isinstance(spec.count, int):
            grid.update({f"{path}.{i}": _leaf_grid(spec.each) for i in range(spec.count)})
        elif isinstance(spec, (FloatSpec, IntSpec, CategoricalSpec)):
            grid[path] = _leaf_grid(spec)
    return grid


def space_size(space: Space) -> dict[str, Any]:
    """What `validate` tells about a space: its parameter names, its grid size (None when not finite), trials."""
    finite = not grid_problems(space.space, "space")
    grid = math.prod(len(values) for values in grid_values(space).values()) if finite else None
    return {"parameters": list(parameter_specs(space.space)), "grid_points": grid, "n_trials": space.study.n_trials}


def _leaf_grid(spec: FloatSpec | IntSpec | CategoricalSpec) -> list[Any]:
    values = spec.grid()
    if values is None:
        raise ValueError(f"{spec!r} has no finite grid")
    return values


def _enqueue_problems(space: Space) -> list[Problem]:
    specs = parameter_specs(space.space)
    per_scale = {p for p, _loc, s in walk_tree(space.space, "space") if isinstance(s, PerScaleSpec)}
    problems: list[Problem] = []
    for i, point in enumerate(space.study.enqueue):
        for key, value in point.items():
            loc = f"study.enqueue.{i}.{key}"
            if key in per_scale and isinstance(value, list):
                items = [(f"{key}.{j}", v) for j, v in enumerate(value)]
            else:
                items = [(key, value)]
            for name, item in items:
                problems += _enqueue_item(loc, name, item, specs)
    return problems


def _enqueue_item(loc: str, name: str, value: Any, specs: dict[str, Any]) -> list[Problem]:
    spec = specs.get(name)
    if spec is None:
        return [(loc, f"{name} is not a searched parameter of this space")]
    ok = value in spec.choices if isinstance(spec, BranchSpec) else spec.contains(value)
    if ok:
        return []
    hint = ""
    if isinstance(value, str) and isinstance(spec, (FloatSpec, IntSpec)):
        hint = " (a string: YAML reads 1e-3 as text, write 1.0e-3)"
    return [(loc, f"{value!r} is outside the distribution of {name}{hint}")]


def _base_recipe_problems(space: Space) -> list[Problem]:
    path = space.base_recipe_path
    if not path.is_file():
        return [("base_recipe", f"file not found: {path}")]
    try:
        space.base_recipe_data()
    except ConfigError as exc:
        return [("base_recipe", f"{path} is invalid: {p or '<file>'}: {r}") for p, r in exc.problems]
    return []


def budget_overrides(space: Space) -> dict[str, Any]:
    """The recipe values the budget section sets; the two unused budget fields are cleared so the recipe stays
    valid (a minutes-only budget lets the trainer fit its schedules to the measured step time)."""
    budget = space.budget
    out: dict[str, Any] = {
        "train.steps": budget.steps,
        "train.epochs": budget.epochs,
        "train.minutes": budget.minutes,
        "train.eval_iw_samples": budget.eval_iw_samples,
    }
    if budget.eval_images is not None:
        out["train.eval_images"] = budget.eval_images
    if {o.metric for o in space.study.objectives} & {"nll", "nelbo"}:
        out["train.eval_at_end"] = True  # these objectives are measured by the end-of-run evaluation
    return out


# ----------------------------------------------------------------------------------------------- loading
def _has_child(node: Any, part: Any) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[Any, ...]:
    """Drop the union tags pydantic puts into locations, so paths read like the file (``space.x.low``)."""
    out, node = [], data
    for part in loc:
        if _has_child(node, part):
            node = node[part]
        elif part == "[key]" or (isinstance(node, dict) and part in (spec_tag(node), node.get("type"))):
            continue
        else:
            node = None
        out.append(part)
    return tuple(out)


def _structure_problems(exc: ValidationError, data: Any) -> list[Problem]:
    errors = [
        {**err, "loc": _clean_loc(tuple(err.get("loc", ())), data), "msg": _spec_message(err)} for err in exc.errors()
    ]
    return with_suggestions(Space, dict.fromkeys(pydantic_problems(errors)))


def _spec_message(err: Any) -> str:
    """A spec whose ``type`` names no kind: say which type was given, and the closest kind."""
    given = err.get("input", {}).get("type") if isinstance(err.get("input"), dict) else None
    if err.get("type") != "invalid_spec" or not isinstance(given, str):
        return str(err.get("msg", "invalid"))
    close = difflib.get_close_matches(given, SPEC_TYPES, n=1, cutoff=0.6)
    return f"unknown type {given!r}{did_you_mean(close)}; {err.get('msg')}"


def space_from_dict(data: Any, source: str | os.PathLike[str]) -> Space:
    """Validate a space given as a dict; ``source`` is its file path (relative paths resolve against its folder)."""
    if not isinstance(data, dict):
        raise ConfigError(str(source), [("", f"expected a mapping at the top level, got {type(data).__name__}")])
    try:
        space = Space.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(str(source), _structure_problems(exc, data)) from None
    space._source = Path(source).resolve()
    budget_paths = list(budget_overrides(space))
    base_problems = _base_recipe_problems(space)
    base = None if base_problems else (space.base_recipe, space.base_recipe_data()[1])
    problems = TreeChecker(budget_paths, base).run(space.space) + _enqueue_problems(space) + base_problems
    if problems:
        raise ConfigError(str(source), problems)
    return space


def load_space(path: str | os.PathLike[str]) -> Space:
    """Read and validate a space file, its tree against the recipe schema, and its base recipe."""
    return space_from_dict(read_yaml_file(path), path)


def space_json_schema() -> dict[str, Any]:
    return Space.model_json_schema()


# ---------------------------------------------------------------------------------------------- applying
def _materialize_lists(data: dict[str, Any], validated: dict[str, Any], path: str) -> None:
    """Copy a list the file leaves to a default (e.g. preset cells) before an index into it is written."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if i and part.isdigit() and not isinstance(get_dotted(data, parts[:i]), list):
            default = get_dotted(validated, parts[:i])
            if isinstance(default, list):
                set_dotted(data, ".".join(parts[:i]), copy.deepcopy(default))


def _write(data: dict[str, Any], items: list[tuple[str, Any]], defaults: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    for path, value in items:
        try:
            _materialize_lists(data, defaults, path)
            set_dotted(data, path, copy.deepcopy(value))
        except (TypeError, ValueError, IndexError, AttributeError, KeyError):
            problems.append((path, "cannot set this path in the base recipe"))
    return problems


def _validated_form(data: dict[str, Any], fallback: dict[str, Any]) -> dict[str, Any]:
    try:
        return recipe_from_dict(copy.deepcopy(data)).model_dump(mode="json")
    except ConfigError:
        return fallback


def apply_params(space: Space, params: Mapping[str, Any]) -> Recipe:
    """The base recipe with a trial's values and the budget written in, validated by the recipe schema.

    Values are written over the base recipe *file* (like ``--set`` overrides), not over its validated form:
    a preset set by the space then fills every cell role that the file does not list itself. Paths with a list
    index (``model.cells.normal_enc.0.kernel``) are written last, into the lists that the other values give.
    Raises ``ConfigError`` naming the reason when the schema rejects the combination.
    """
    raw, validated = space.base_recipe_data()
    data = copy.deepcopy(raw)
    source = f"{space.base_recipe_path} with the trial's values"
    direct = [(p, v) for p, v in params.items() if not any(part.isdigit() for part in p.split("."))]
    indexed = [(p, v) for p, v in params.items() if any(part.isdigit() for part in p.split("."))]
    problems = _write(data, direct, validated)
    if indexed:
        problems += _write(data, indexed, _validated_form(data, validated))
    if problems:
        raise ConfigError(source, problems)
    for path, value in budget_overrides(space).items():
        set_dotted(data, path, value)
    return recipe_from_dict(data, source)
