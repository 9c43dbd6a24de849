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
import functools
import math
import os
import re
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .config_io import ConfigError, pydantic_problems, read_yaml_file, set_dotted
from .schema import Recipe, TrackingConfig, load_recipe, recipe_from_dict

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
    "space_from_dict",
    "space_json_schema",
]

Problem = tuple[str, str]
Metric = Literal["nll", "nelbo", "train_nelbo", "params", "step_time", "peak_memory"]
METRICS: tuple[str, ...] = get_args(Metric)
_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*$")
_PRIMITIVES = (str, int, float, bool, type(None))


def storage_form_problem(storage: str) -> str | None:
    """Why ``storage`` (the space's ``storage:`` key or ``--storage``) is not a storage URL; None when it is one."""
    if storage.startswith("journal:") and storage.removeprefix("journal:").strip():
        return None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", storage):
        return None
    return "expected an Optuna storage URL (sqlite:///study.db, postgresql://...) or journal:PATH"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(low: float, high: float) -> None:
    if low >= high:
        raise ValueError(f"low ({low}) must be below high ({high})")


# ------------------------------------------------------------------------------------------------ leaf specs
class FloatSpec(_Strict):
    """A float from ``[low, high]``: Optuna's ``suggest_float``."""

    tag: ClassVar[str] = "float"
    type: Literal["float"]
    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    log: bool = False
    step: float | None = Field(None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _rules(self) -> FloatSpec:
        _check_range(self.low, self.high)
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna has no stepped log distribution)")
        if self.log and self.low <= 0:
            raise ValueError(f"log needs low > 0, got low={self.low}")
        if self.step is not None:
            n = (self.high - self.low) / self.step
            if abs(n - round(n)) > 1e-9 * max(1.0, n):
                # Optuna would silently lower `high` to the last multiple; make the file say what is searched.
                raise ValueError(f"high - low ({self.high - self.low}) must be a multiple of step ({self.step})")
        return self

    def grid(self) -> list[float] | None:
        if self.step is None:
            return None
        n = round((self.high - self.low) / self.step)
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def contains(self, value: Any) -> bool:
        if not _is_number(value) or not self.low <= value <= self.high:
            return False
        return self.step is None or abs((value - self.low) / self.step - round((value - self.low) / self.step)) < 1e-9


class IntSpec(_Strict):
    """An integer from ``[low, high]``, both bounds included: Optuna's ``suggest_int``."""

    tag: ClassVar[str] = "int"
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _rules(self) -> IntSpec:
        _check_range(self.low, self.high)
        if self.log and self.step != 1:
            raise ValueError("log and step cannot be combined (Optuna accepts log only with step 1)")
        if self.log and self.low < 1:
            raise ValueError(f"log needs low >= 1, got low={self.low}")
        if (self.high - self.low) % self.step:
            raise ValueError(f"high - low ({self.high - self.low}) must be a multiple of step ({self.step})")
        return self

    def grid(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))

    def contains(self, value: Any) -> bool:
        return _is_int(value) and self.low <= value <= self.high and (value - self.low) % self.step == 0


class CategoricalSpec(_Strict):
    """One of a list of primitive values: Optuna's ``suggest_categorical``."""

    tag: ClassVar[str] = "categorical"
    type: Literal["categorical"]
    choices: list[Any]

    @field_validator("choices")
    @classmethod
    def _primitive_and_unique(cls, choices: list[Any]) -> list[Any]:
        if not choices:
            raise ValueError("choices is empty: give at least one value")
        for i, choice in enumerate(choices):
            if not isinstance(choice, _PRIMITIVES):
                raise ValueError(
                    f"choice {i} ({choice!r}) is a {type(choice).__name__}: choices must be str, int, float, bool "
                    "or null (for lists such as op lists, use a branch with fixed values)"
                )
            if isinstance(choice, float) and math.isnan(choice):
                raise ValueError(f"choice {i} is NaN, which never equals itself")
        for i, choice in enumerate(choices):
            # Optuna stores a choice as its index, found by ==, so 1, 1.0 and True would collapse into one.
            if any(choice == other for other in choices[:i]):
                raise ValueError(f"choice {i} ({choice!r}) repeats an earlier choice (1, 1.0 and true count as equal)")
        return choices

    def grid(self) -> list[Any]:
        return list(self.choices)

    def contains(self, value: Any) -> bool:
        return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices)


LeafSpec = Annotated[FloatSpec | IntSpec | CategoricalSpec, Field(discriminator="type")]


class FixedSpec(_Strict):
    """A constant written to the recipe in every trial; not a searched parameter."""

    tag: ClassVar[str] = "fixed"
    type: Literal["fixed"]
    value: Any


class PerScaleSpec(_Strict):
    """``count`` values of ``each``, named ``<path>.<i>`` and written as one list to ``<path>``."""

    tag: ClassVar[str] = "per_scale"
    type: Literal["per_scale"]
    count: int | str = Field(description="A positive int, or the dotted path of an integer set earlier.")
    each: LeafSpec

    @field_validator("count", mode="before")
    @classmethod
    def _not_bool(cls, count: Any) -> Any:
        if isinstance(count, bool):  # YAML `true` would otherwise pass as the integer 1
            raise ValueError("count must be a positive integer or a dotted path")
        return count

    @field_validator("count")
    @classmethod
    def _count(cls, count: int | str) -> int | str:
        if isinstance(count, int) and count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if isinstance(count, str) and not _PATH_RE.match(count):
            raise ValueError(f"count {count!r} is neither an integer nor a dotted path")
        return count


class BranchSpec(_Strict):
    """A categorical over labels, each selecting a sub-space; the label itself is not written to the recipe."""

    tag: ClassVar[str] = "branch"
    type: Literal["categorical"]
    choices: dict[str, SpaceTree]

    @field_validator("choices", mode="before")
    @classmethod
    def _empty_subspaces(cls, choices: Any) -> Any:
        # `label:` with nothing after it reads as null in YAML: an empty sub-space.
        if isinstance(choices, dict):
            return {k: ({} if v is None else v) for k, v in choices.items()}
        return choices

    @field_validator("choices")
    @classmethod
    def _labels(cls, choices: dict[str, SpaceTree]) -> dict[str, SpaceTree]:
        if not choices:
            raise ValueError("a branch needs at least one label")
        if any(not label for label in choices):
            raise ValueError("branch labels must be non-empty strings")
        return choices


def _spec_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "categorical" and isinstance(value.get("choices"), dict):
            return "branch"
        return kind if isinstance(kind, str) else None
    return getattr(value, "tag", None)


Spec = Annotated[
    Annotated[FloatSpec, Tag("float")]
    | Annotated[IntSpec, Tag("int")]
    | Annotated[CategoricalSpec, Tag("categorical")]
    | Annotated[BranchSpec, Tag("branch")]
    | Annotated[FixedSpec, Tag("fixed")]
    | Annotated[PerScaleSpec, Tag("per_scale")],
    Discriminator(
        _spec_tag,
        custom_error_type="invalid_spec",
        custom_error_message="expected a mapping with type: float, int, categorical (a list of choices, or a "
        "mapping of labels to sub-spaces), fixed or per_scale",
    ),
]
SpaceTree = dict[str, Spec]
SearchedSpec = FloatSpec | IntSpec | CategoricalSpec | BranchSpec
BranchSpec.model_rebuild()


# ---------------------------------------------------------------------------------------------- sections
class Objective(_Strict):
    metric: Metric = Field(
        description="nll: importance-weighted NLL at the end of the trial; nelbo: evaluation NELBO; train_nelbo; "
        "params: parameter count; step_time: seconds per step; peak_memory: MiB (CUDA allocations, else peak RSS)."
    )
    direction: Literal["minimize", "maximize"] = "minimize"


class StudyConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100, description="Folder runs/<name>/.")
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="nelbo", direction="minimize")],
        min_length=1,
        description="One entry: single-objective; two or more: a Pareto search.",
    )
    n_trials: int = Field(ge=1)
    timeout_minutes: float | None = Field(None, gt=0)
    seed: int = 0
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list, description="Warm-start points {parameter name: value}; unset parameters are sampled."
    )

    @field_validator("objectives")
    @classmethod
    def _unique_metrics(cls, objectives: list[Objective]) -> list[Objective]:
        metrics = [o.metric for o in objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"each metric may appear once, got {metrics}")
        return objectives

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


class Budget(_Strict):
    """The training budget of one trial; it replaces the recipe's train.steps / train.epochs / train.minutes."""

    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    minutes: float | None = Field(None, gt=0)
    eval_iw_samples: int = Field(10, ge=1, description="Importance samples of the end-of-trial evaluation.")
    eval_images: int | None = Field(
        None, ge=1, description="Evaluate on the first N test images; null keeps the recipe's train.eval_images."
    )
    report_every_steps: int = Field(50, ge=1, description="Steps between intermediate values sent to the pruner.")
    keep_checkpoints: Literal["all", "best", "none"] = Field(
        "best",
        description="Which trials keep checkpoint.pt once they end: all, the best keep_top_k by the first objective, "
        "or none. Metrics, summaries, resolved recipes and params stay for every trial.",
    )
    keep_top_k: int | None = Field(
        None, ge=1, description="Trials whose checkpoints `best` keeps; null: repeats.top_k, at least 1."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Budget:
        given = [k for k in ("steps", "epochs", "minutes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of steps, epochs or minutes (got {', '.join(given) or 'none'})")
        if self.keep_top_k is not None and self.keep_checkpoints != "best":
            raise ValueError(f"keep_top_k has no effect with keep_checkpoints: {self.keep_checkpoints}")
        return self


class Repeats(_Strict):
    top_k: int = Field(0, ge=0, description="Re-run the best k configurations on each of `seeds`.")
    seeds: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Repeats:
        if self.top_k and not self.seeds:
            raise ValueError("top_k > 0 needs at least one seed to re-run on")
        if self.seeds and not self.top_k:
            raise ValueError("seeds have no effect while top_k is 0")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be unique, got {self.seeds}")
        return self


class TPESamplerConfig(_Strict):
    type: Literal["tpe"]
    n_startup_trials: int = Field(10, ge=0)
    multivariate: bool = True
    group: bool = Field(False, description="Model each branch's parameters jointly (Optuna: experimental).")

    @model_validator(mode="after")
    def _group_needs_multivariate(self) -> TPESamplerConfig:
        if self.group and not self.multivariate:
            raise ValueError("group needs multivariate: true")
        return self


class RandomSamplerConfig(_Strict):
    type: Literal["random"]


class GridSamplerConfig(_Strict):
    type: Literal["grid"]


class CmaEsSamplerConfig(_Strict):
    type: Literal["cmaes"]
    n_startup_trials: int = Field(1, ge=0)


class NSGA2SamplerConfig(_Strict):
    type: Literal["nsga2"]
    population_size: int = Field(50, ge=2)


SamplerConfig = Annotated[
    TPESamplerConfig | RandomSamplerConfig | GridSamplerConfig | CmaEsSamplerConfig | NSGA2SamplerConfig,
    Field(discriminator="type"),
]


class NoPrunerConfig(_Strict):
    type: Literal["none"]


class MedianPrunerConfig(_Strict):
    type: Literal["median"]
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(0, ge=0, description="Training steps before pruning may start.")
    interval_steps: int = Field(1, ge=1)


class SuccessiveHalvingPrunerConfig(_Strict):
    type: Literal["successive_halving"]
    min_resource: int | Literal["auto"] = "auto"
    reduction_factor: int = Field(4, ge=2)


class HyperbandPrunerConfig(_Strict):
    type: Literal["hyperband"]
    min_resource: int = Field(1, ge=1, description="In training steps, the unit of trial.report.")
    max_resource: int | Literal["auto"] = "auto"
    reduction_factor: int = Field(3, ge=2)

    @model_validator(mode="after")
    def _range(self) -> HyperbandPrunerConfig:
        if isinstance(self.max_resource, int) and self.max_resource <= self.min_resource:
            raise ValueError(f"max_resource ({self.max_resource}) must exceed min_resource ({self.min_resource})")
        return self


class ThresholdPrunerConfig(_Strict):
    type: Literal["threshold"]
    upper: float
    lower: float | None = None
    n_warmup_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _range(self) -> ThresholdPrunerConfig:
        if self.lower is not None and self.lower >= self.upper:
            raise ValueError(f"lower ({self.lower}) must be below upper ({self.upper})")
        return self


PrunerConfig = Annotated[
    NoPrunerConfig | MedianPrunerConfig | SuccessiveHalvingPrunerConfig | HyperbandPrunerConfig | ThresholdPrunerConfig,
    Field(discriminator="type"),
]


class RayResources(_Strict):
    cpu: float = Field(1.0, ge=0)
    gpu: float = Field(0.0, ge=0, description="May be fractional (0.5: two trials share a GPU).")

    @field_validator("gpu")
    @classmethod
    def _whole_above_one(cls, gpu: float) -> float:
        if gpu > 1 and gpu != int(gpu):
            raise ValueError(f"Ray accepts fractional GPUs only below 1, got {gpu}")
        return gpu


class AshaConfig(_Strict):
    type: Literal["asha"]
    grace_period: int = Field(
        2, ge=1, description="Reports a trial makes before it may be stopped (the first report is at step 1)."
    )
    reduction_factor: int = Field(3, ge=2)


class NoSchedulerConfig(_Strict):
    type: Literal["none"]


class Constraints(_Strict):
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Prune (status over_memory, nothing trained) every trial whose training step is predicted to "
        "need more than this many GiB of GPU memory at its batch and precision.",
    )


class RayConfig(_Strict):
    """Settings of the Ray Tune backend; validated with the file, used only when that backend runs."""

    address: str = Field("local", min_length=1, description="local | auto | host:port")
    max_concurrent: int = Field(2, ge=1)
    resources_per_trial: RayResources = RayResources()
    workers_per_trial: int = Field(1, ge=1, description="Data-parallel workers inside one trial.")
    max_failures: int = Field(1, ge=-1, description="-1 retries forever.")
    reuse_actors: bool = True
    scheduler: Annotated[AshaConfig | NoSchedulerConfig, Field(discriminator="type")] = AshaConfig(type="asha")


# ------------------------------------------------------------------------------------------------- space
class Space(_Strict):
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
            problems = _grid_problems(tree, "space")
            if problems:
                raise ValueError("grid needs finite values for every searched parameter: " + "; ".join(problems))
        return sampler

    @field_validator("pruner")
    @classmethod
    def _pruner_fits(cls, pruner: Any, info: ValidationInfo) -> Any:
        study = info.data.get("study")
        if study is not None and study.multi_objective and pruner.type != "none":
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


# --------------------------------------------------------------------------------------------- tree walks
def _walk(tree: Mapping[str, Any], loc: str) -> Iterator[tuple[str, str, Any]]:
    """Every (path, location, spec) of the tree, branches' sub-spaces included, in sampling order."""
    for path, spec in tree.items():
        here = f"{loc}.{path}"
        yield path, here, spec
        if isinstance(spec, BranchSpec):
            for label, sub in spec.choices.items():
                yield from _walk(sub, f"{here}.choices.{label}")


def _max_count(spec: Any) -> int | None:
    if isinstance(spec, IntSpec):
        return spec.high
    if isinstance(spec, CategoricalSpec) and all(_is_int(c) for c in spec.choices):
        return max(spec.choices)
    if isinstance(spec, FixedSpec) and _is_int(spec.value):
        return spec.value
    return None


def parameter_specs(tree: Mapping[str, Any]) -> dict[str, SearchedSpec]:
    """Every Optuna parameter name the tree can sample → its spec (first definition wins).

    ``per_scale`` entries contribute ``<path>.<i>`` up to the largest count they can take.
    """
    specs: dict[str, Any] = {}
    written: dict[str, Any] = {}
    for path, _loc, spec in _walk(tree, "space"):
        written.setdefault(path, spec)
        if isinstance(spec, (FloatSpec, IntSpec, CategoricalSpec, BranchSpec)):
            specs.setdefault(path, spec)
        elif isinstance(spec, PerScaleSpec):
            top = spec.count if isinstance(spec.count, int) else _max_count(written.get(spec.count))
            for i in range(top or 0):
                specs.setdefault(f"{path}.{i}", spec.each)
    return specs


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
    finite = not _grid_problems(space.space, "space")
    grid = math.prod(len(values) for values in grid_values(space).values()) if finite else None
    return {"parameters": list(parameter_specs(space.space)), "grid_points": grid, "n_trials": space.study.n_trials}


def _leaf_grid(spec: FloatSpec | IntSpec | CategoricalSpec) -> list[Any]:
    values = spec.grid()
    if values is None:
        raise ValueError(f"{spec!r} has no finite grid")
    return values


def _grid_problems(tree: Mapping[str, Any], loc: str) -> list[str]:
    problems = []
    for path, spec in tree.items():
        here = f"{loc}.{path}"
        if isinstance(spec, FloatSpec) and spec.step is None:
            problems.append(f"{here} is a continuous float (give it a step, or make it categorical)")
        elif isinstance(spec, PerScaleSpec):
            if not isinstance(spec.count, int):
                problems.append(f"{here} has a sampled count, so its parameters differ between grid points")
            problems += _grid_problems({path: spec.each}, loc)
        elif isinstance(spec, BranchSpec):
            for label, sub in spec.choices.items():
                searched = [p for p, s in sub.items() if not isinstance(s, FixedSpec)]
                if searched:
                    problems.append(f"{here}.choices.{label} searches {', '.join(searched)} (only fixed values)")
    return problems


# --------------------------------------------------------------------------------------- recipe schema walk
def _members(tp: Any) -> list[Any]:
    """The alternatives an annotation allows, without Annotated wrappers and None."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _members(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in get_args(tp) for m in _members(arg)]
    return [] if tp is type(None) else [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _contains_model(tp: Any) -> bool:
    return _is_model(tp) or any(_contains_model(arg) for arg in get_args(tp) if arg is not Ellipsis)


_Target = tuple[Any, Any]  # (annotation, FieldInfo or None for list elements)


def _step(targets: list[_Target], segment: str) -> list[_Target]:
    out: list[_Target] = []
    for annotation, _info in targets:
        for member in _members(annotation):
            if _is_model(member) and segment in member.model_fields:
                field = member.model_fields[segment]
                out.append((field.annotation, field))
            elif get_origin(member) in (list, tuple) and segment.isdigit():
                out += [(arg, None) for arg in get_args(member) if arg is not Ellipsis]
            elif member is Any:
                out.append((Any, None))
    return out


def _recipe_targets(path: str) -> list[_Target]:
    """What ``path`` names in the recipe schema; empty when it names nothing."""
    targets: list[_Target] = [(Recipe, None)]
    for segment in path.split("."):
        targets = _step(targets, segment)
        if not targets:
            return []
    return targets


@functools.lru_cache(maxsize=1)
def _all_recipe_paths() -> tuple[str, ...]:
    paths: list[str] = []

    def visit(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            paths.append(prefix + name)
            for member in _members(field.annotation):
                if _is_model(member):
                    visit(member, f"{prefix}{name}.")

    visit(Recipe, "")
    return tuple(paths)


def recipe_path_suggestions(path: str) -> list[str]:
    """Recipe field paths close to a mistyped one (for "did you mean" in space and recipe errors)."""
    return difflib.get_close_matches(path, _all_recipe_paths(), n=3, cutoff=0.6)


def _not_a_field(path: str) -> str:
    matches = recipe_path_suggestions(path)
    return "not a recipe field" + (f" (did you mean {', '.join(matches)}?)" if matches else "")


def _value_problem(targets: list[_Target], values: list[tuple[str, Any]]) -> str | None:
    """Check example values against the recipe field's own type and bounds, where one plain field is named.

    Fields holding models are skipped: their values pass model-level hooks (op shorthands, presets) that a bare
    type check would not run. The full recipe is validated per trial anyway.
    """
    if len(targets) != 1 or targets[0][1] is None or _contains_model(targets[0][0]):
        return None
    annotation, info = targets[0]
    adapter = TypeAdapter(Annotated[(annotation, *info.metadata)] if info.metadata else annotation)
    for label, value in values:
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            return f"{label}={value!r} is not accepted by the recipe field: {exc.errors()[0]['msg']}"
    return None


def _probe_values(spec: Any) -> list[tuple[str, Any]]:
    if isinstance(spec, FloatSpec):
        probes = [("low", spec.low), ("high", spec.high)]
        # An inner value with a fraction, so that an int field rejects a continuous float here.
        inner = spec.low + (spec.high - spec.low) / math.pi
        return probes if spec.step else [*probes, ("a value in the range", inner)]
    if isinstance(spec, IntSpec):
        return [("low", spec.low), ("high", spec.high)]
    if isinstance(spec, CategoricalSpec):
        return [(f"choice {i}", c) for i, c in enumerate(spec.choices)]
    if isinstance(spec, FixedSpec):
        return [("value", spec.value)]
    if isinstance(spec, PerScaleSpec):
        return [(f"a list of {label}", [value]) for label, value in _probe_values(spec.each)]
    return []


# -------------------------------------------------------------------------------------------- tree checks
def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _same_distribution(a: Any, b: Any) -> bool:
    """Optuna's rule for one name in two places: same kind, same log flag, and same choices for categoricals."""
    kind_a = CategoricalSpec if isinstance(a, BranchSpec) else type(a)
    kind_b = CategoricalSpec if isinstance(b, BranchSpec) else type(b)
    if kind_a is not kind_b:
        return False
    if kind_a is CategoricalSpec:
        return list(a.choices) == list(b.choices)  # a branch's choices are its labels
    return a.log == b.log


class _TreeChecker:
    """Checks a validated tree against the recipe schema and itself; collects located problems."""

    def __init__(self, budget_paths: list[str], base: _Base | None = None) -> None:
        self.problems: list[Problem] = []
        self.names: dict[str, tuple[Any, str]] = {}
        self.budget_paths = budget_paths
        self.base = base  # (file, validated recipe) when the base recipe is valid: list lengths come from it
        self.all_paths: set[str] = set()
        self.seen: set[str] = set()

    def run(self, tree: Mapping[str, Any]) -> list[Problem]:
        self.all_paths = {path for path, _loc, _spec in _walk(tree, "space")}
        self._scope(tree, "space", {}, {})
        return self.problems

    def _scope(self, tree: Mapping[str, Any], loc: str, written: dict[str, str], known: dict[str, Any]) -> None:
        for path, spec in tree.items():
            here = f"{loc}.{path}"
            self.seen.add(path)
            if not _PATH_RE.match(path):
                self.problems.append((here, "not a dotted path (letters, digits and _ separated by dots)"))
                continue
            if isinstance(spec, BranchSpec):
                self._branch(path, here, spec, written, known)
                continue
            self._recipe_value(path, here, spec, written)
            self._list_index(path, here, written)
            if isinstance(spec, PerScaleSpec):
                self._per_scale(path, here, spec, known)
            elif not isinstance(spec, FixedSpec):
                self._name(path, here, spec)
            written[path] = here
            known[path] = spec

    def _branch(self, path: str, here: str, spec: BranchSpec, written: dict[str, str], known: dict[str, Any]) -> None:
        if _recipe_targets(path):
            self.problems.append(
                (
                    here,
                    "a branch name is a search label and is never written to the recipe, so it must not be a recipe "
                    f"field; rename it (e.g. {path}_choice) and set {path} with a fixed value in each sub-space",
                )
            )
        self._name(path, here, spec)
        inside: dict[str, str] = {}
        for label, sub in spec.choices.items():
            scope = dict(written)
            self._scope(sub, f"{here}.choices.{label}", scope, dict(known))
            inside.update({p: w for p, w in scope.items() if p not in written and p not in inside})
        # A later entry must not overwrite what any label writes; counts, though, stay local to the label.
        written.update(inside)

    def _recipe_value(self, path: str, here: str, spec: Any, written: dict[str, str]) -> None:
        targets = _recipe_targets(path)
        if not targets:
            self.problems.append((here, _not_a_field(path)))
            return
        clash = next((w for w in written if _overlaps(w, path)), None)
        if clash is not None:
            self.problems.append((here, f"overlaps {clash}, already set at {written[clash]}"))
        budget = next((b for b in self.budget_paths if _overlaps(b, path)), None)
        if budget is not None:
            self.problems.append((here, f"overlaps {budget}, which the budget section sets"))
        problem = _value_problem(targets, _probe_values(spec))
        if problem:
            self.problems.append((here, problem))

    def _list_index(self, path: str, here: str, written: dict[str, str]) -> None:
        """An index past the end of a list would make every trial invalid: check it against the list it edits."""
        parts = path.split(".")
        at = next((i for i, part in enumerate(parts) if i and part.isdigit()), None)
        if at is None or self.base is None:
            return
        prefix, index = ".".join(parts[:at]), int(parts[at])
        if any(_overlaps(w, prefix) for w in written):
            return  # the space sets the list itself, which _recipe_value reports as an overlap
        if prefix.startswith("model.cells.") and "model.preset" in self.all_paths:
            return  # a sampled preset decides the cell lists that the base file leaves out
        base_file, validated = self.base
        value = _get_dotted(validated, prefix.split("."))
        if not isinstance(value, list):
            self.problems.append(
                (here, f"{prefix} is {value!r} in the base recipe {base_file}, not a list: index {index} cannot be set")
            )
        elif index >= len(value):
            self.problems.append(
                (
                    here,
                    f"index {index} is past the end of {prefix}: it has {len(value)} items in the base recipe "
                    f"{base_file}",
                )
            )

    def _per_scale(self, path: str, here: str, spec: PerScaleSpec, known: dict[str, Any]) -> None:
        for i in range(2):  # two names are enough to register the element kind
            self._name(f"{path}.{i}", here, spec.each)
        if isinstance(spec.count, int):
            return
        if spec.count not in known:
            if spec.count == path:
                reason = "this entry itself: a count must be an integer or a parameter set earlier"
            elif spec.count in self.seen:
                reason = "set only inside another branch, so not in every trial that needs it"
            elif spec.count in self.all_paths:
                reason = "sampled later in the space (order matters: move it above)"
            else:
                reason = "not set earlier in this space"
            self.problems.append((f"{here}.count", f"{spec.count} is {reason}"))
            return
        ref = known[spec.count]
        counts = _probe_counts(ref)
        if counts is None or min(counts) < 1:
            self.problems.append((f"{here}.count", f"{spec.count} must be an integer parameter or fixed integer >= 1"))

    def _name(self, name: str, here: str, spec: Any) -> None:
        if name not in self.names:
            self.names[name] = (spec, here)
            return
        other, where = self.names[name]
        if not _same_distribution(other, spec):
            self.problems.append(
                (
                    here,
                    f"parameter {name} is also defined at {where} with another kind, log flag or choice list; "
                    "Optuna fails a trial that reuses a name that way",
                )
            )


def _probe_counts(spec: Any) -> list[int] | None:
    if isinstance(spec, IntSpec):
        return [spec.low, spec.high]
    if isinstance(spec, CategoricalSpec) and all(_is_int(c) for c in spec.choices):
        return list(spec.choices)
    if isinstance(spec, FixedSpec) and _is_int(spec.value):
        return [spec.value]
    return None


def _enqueue_problems(space: Space) -> list[Problem]:
    specs = parameter_specs(space.space)
    per_scale = {p for p, _loc, s in _walk(space.space, "space") if isinstance(s, PerScaleSpec)}
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


_Base = tuple[str, dict[str, Any]]  # the base recipe's file as written in the space, and its validated form


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
        elif part == "[key]" or (isinstance(node, dict) and part in (_spec_tag(node), node.get("type"))):
            continue
        else:
            node = None
        out.append(part)
    return tuple(out)


def _structure_problems(exc: ValidationError, data: Any) -> list[Problem]:
    errors = [{**err, "loc": _clean_loc(tuple(err.get("loc", ())), data)} for err in exc.errors()]
    return list(dict.fromkeys(pydantic_problems(errors)))


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
    problems = _TreeChecker(budget_paths, base).run(space.space) + _enqueue_problems(space) + base_problems
    if problems:
        raise ConfigError(str(source), problems)
    return space


def load_space(path: str | os.PathLike[str]) -> Space:
    """Read and validate a space file, its tree against the recipe schema, and its base recipe."""
    return space_from_dict(read_yaml_file(path), path)


def space_json_schema() -> dict[str, Any]:
    return Space.model_json_schema()


# ---------------------------------------------------------------------------------------------- applying
def _get_dotted(tree: Any, parts: list[str]) -> Any:
    node = tree
    for part in parts:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _materialize_lists(data: dict[str, Any], validated: dict[str, Any], path: str) -> None:
    """Copy a list the file leaves to a default (e.g. preset cells) before an index into it is written."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if i and part.isdigit() and not isinstance(_get_dotted(data, parts[:i]), list):
            default = _get_dotted(validated, parts[:i])
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
