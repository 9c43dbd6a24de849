"""Checks of a search space's tree against the recipe schema (does each path name a recipe field, do the values
fit it) and against itself (overlaps, parameter names reused with another distribution, counts set in time).
Torch-free and Optuna-free.
"""

from __future__ import annotations

import difflib
import functools
import math
import types
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError

from ..config_io import get_dotted
from .recipe import Recipe
from .specs import (
    PATH_RE,
    BranchSpec,
    CategoricalSpec,
    FixedSpec,
    FloatSpec,
    IntSpec,
    PerScaleSpec,
    probe_counts,
    walk_tree,
)

__all__ = ["TreeChecker", "recipe_path_suggestions"]

Problem = tuple[str, str]


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


@functools.lru_cache(maxsize=4)
def _field_paths(root: type[BaseModel]) -> tuple[str, ...]:
    paths: list[str] = []

    def visit(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            paths.append(prefix + name)
            for member in _members(field.annotation):
                if _is_model(member):
                    visit(member, f"{prefix}{name}.")

    visit(root, "")
    return tuple(dict.fromkeys(paths))


def field_path_suggestions(root: type[BaseModel], path: str) -> list[str]:
    """Field paths of ``root``'s schema close to a mistyped one (for "did you mean" in errors): first the fields
    beside it whose initials it is (``train.lr``: ``train.learning_rate``) or whose name is close, then any path."""
    paths = _field_paths(root)
    parent, _, key = path.rpartition(".")
    siblings = {p.rpartition(".")[2]: p for p in paths if p.rpartition(".")[0] == parent}
    initials = [p for name, p in siblings.items() if "_" in name and "".join(w[:1] for w in name.split("_")) == key]
    near = [siblings[name] for name in difflib.get_close_matches(key, siblings, n=3, cutoff=0.6)]
    anywhere = difflib.get_close_matches(path, paths, n=3, cutoff=0.6)
    found = [p for p in dict.fromkeys([*initials, *near, *anywhere]) if not path.startswith(p + ".")]  # no parents
    return found[:3]


def recipe_path_suggestions(path: str) -> list[str]:
    """Recipe field paths close to a mistyped one (for "did you mean" in space and recipe errors)."""
    return field_path_suggestions(Recipe, path)


def did_you_mean(matches: list[str]) -> str:
    """`` (did you mean a, b?)`` to append to a reason, or nothing without matches."""
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def with_suggestions(root: type[BaseModel], problems: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Unknown keys' reasons with the closest field paths of ``root``'s schema."""
    unknown = "unknown key"
    return [
        (path, reason + did_you_mean(field_path_suggestions(root, path)) if reason.startswith(unknown) else reason)
        for path, reason in problems
    ]


def _not_a_field(path: str) -> str:
    matches = recipe_path_suggestions(path)
    return "not a recipe field" + did_you_mean(matches)


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


class TreeChecker:
    """Checks a validated tree against the recipe schema and itself; collects located problems."""

    def __init__(self, budget_paths: list[str], base: tuple[str, dict[str, Any]] | None = None) -> None:
        self.problems: list[Problem] = []
        self.names: dict[str, tuple[Any, str]] = {}
        self.budget_paths = budget_paths
        self.base = base  # (file, validated recipe) when the base recipe is valid: list lengths come from it
        self.all_paths: set[str] = set()
        self.seen: set[str] = set()

    def run(self, tree: Mapping[str, Any]) -> list[Problem]:
        self.all_paths = {path for path, _loc, _spec in walk_tree(tree, "space")}
        self._scope(tree, "space", {}, {})
        return self.problems

    def _scope(self, tree: Mapping[str, Any], loc: str, written: dict[str, str], known: dict[str, Any]) -> None:
        for path, spec in tree.items():
            here = f"{loc}.{path}"
            self.seen.add(path)
            if not PATH_RE.match(path):
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
        value = get_dotted(validated, prefix.split("."))
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
        counts = probe_counts(ref)
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
