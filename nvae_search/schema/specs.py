"""The spec kinds of a search space's tree (``float``, ``int``, ``categorical``, branch, ``fixed``, ``per_scale``)
and the walks over a tree of them. Torch-free and Optuna-free; the format is described in ``nvae_search.spaces``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from .cells import Strict

__all__ = [
    "BranchSpec",
    "CategoricalSpec",
    "FixedSpec",
    "FloatSpec",
    "IntSpec",
    "LeafSpec",
    "PerScaleSpec",
    "SearchedSpec",
    "SpaceTree",
    "Spec",
    "grid_problems",
    "parameter_specs",
    "probe_counts",
    "spec_tag",
    "walk_tree",
]

PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*$")
_PRIMITIVES = (str, int, float, bool, type(None))


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(low: float, high: float) -> None:
    if low >= high:
        raise ValueError(f"low ({low}) must be below high ({high})")


# ------------------------------------------------------------------------------------------------ leaf specs
class FloatSpec(Strict):
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
        if not is_number(value) or not self.low <= value <= self.high:
            return False
        return self.step is None or abs((value - self.low) / self.step - round((value - self.low) / self.step)) < 1e-9


class IntSpec(Strict):
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
        return is_int(value) and self.low <= value <= self.high and (value - self.low) % self.step == 0


class CategoricalSpec(Strict):
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


class FixedSpec(Strict):
    """A constant written to the recipe in every trial; not a searched parameter."""

    tag: ClassVar[str] = "fixed"
    type: Literal["fixed"]
    value: Any


class PerScaleSpec(Strict):
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
        if isinstance(count, str) and not PATH_RE.match(count):
            raise ValueError(f"count {count!r} is neither an integer nor a dotted path")
        return count


class BranchSpec(Strict):
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


def spec_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "categorical" and isinstance(value.get("choices"), dict):
            return "branch"
        return kind if isinstance(kind, str) else None
    return getattr(value, "tag", None)


SPEC_TYPES = ("float", "int", "categorical", "fixed", "per_scale")  # what a spec's `type:` may say
Spec = Annotated[
    Annotated[FloatSpec, Tag("float")]
    | Annotated[IntSpec, Tag("int")]
    | Annotated[CategoricalSpec, Tag("categorical")]
    | Annotated[BranchSpec, Tag("branch")]
    | Annotated[FixedSpec, Tag("fixed")]
    | Annotated[PerScaleSpec, Tag("per_scale")],
    Discriminator(
        spec_tag,
        custom_error_type="invalid_spec",
        custom_error_message="expected a mapping with type: float, int, categorical (a list of choices, or a "
        "mapping of labels to sub-spaces), fixed or per_scale",
    ),
]
SpaceTree = dict[str, Spec]
SearchedSpec = FloatSpec | IntSpec | CategoricalSpec | BranchSpec
BranchSpec.model_rebuild()


# --------------------------------------------------------------------------------------------- tree walks
def walk_tree(tree: Mapping[str, Any], loc: str) -> Iterator[tuple[str, str, Any]]:
    """Every (path, location, spec) of the tree, branches' sub-spaces included, in sampling order."""
    for path, spec in tree.items():
        here = f"{loc}.{path}"
        yield path, here, spec
        if isinstance(spec, BranchSpec):
            for label, sub in spec.choices.items():
                yield from walk_tree(sub, f"{here}.choices.{label}")


def probe_counts(spec: Any) -> list[int] | None:
    """The integers a count spec can give (its bounds for an int), or None when it does not give integers."""
    if isinstance(spec, IntSpec):
        return [spec.low, spec.high]
    if isinstance(spec, CategoricalSpec) and all(is_int(c) for c in spec.choices):
        return list(spec.choices)
    if isinstance(spec, FixedSpec) and is_int(spec.value):
        return [spec.value]
    return None


def parameter_specs(tree: Mapping[str, Any]) -> dict[str, SearchedSpec]:
    """Every Optuna parameter name the tree can sample → its spec (first definition wins).

    ``per_scale`` entries contribute ``<path>.<i>`` up to the largest count they can take.
    """
    specs: dict[str, Any] = {}
    written: dict[str, Any] = {}
    for path, _loc, spec in walk_tree(tree, "space"):
        written.setdefault(path, spec)
        if isinstance(spec, (FloatSpec, IntSpec, CategoricalSpec, BranchSpec)):
            specs.setdefault(path, spec)
        elif isinstance(spec, PerScaleSpec):
            counts = [spec.count] if isinstance(spec.count, int) else probe_counts(written.get(spec.count))
            top = max(counts) if counts else 0
            for i in range(top):
                specs.setdefault(f"{path}.{i}", spec.each)
    return specs


def grid_problems(tree: Mapping[str, Any], loc: str) -> list[str]:
    problems = []
    for path, spec in tree.items():
        here = f"{loc}.{path}"
        if isinstance(spec, FloatSpec) and spec.step is None:
            problems.append(f"{here} is a continuous float (give it a step, or make it categorical)")
        elif isinstance(spec, PerScaleSpec):
            if not isinstance(spec.count, int):
                problems.append(f"{here} has a sampled count, so its parameters differ between grid points")
            problems += grid_problems({path: spec.each}, loc)
        elif isinstance(spec, BranchSpec):
            for label, sub in spec.choices.items():
                searched = [p for p, s in sub.items() if not isinstance(s, FixedSpec)]
                if searched:
                    problems.append(f"{here}.choices.{label} searches {', '.join(searched)} (only fixed values)")
    return problems
