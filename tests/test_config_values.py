"""Config reading by value: where a bad recipe's problem is reported, how `--set` paths and budgets are applied,
which JSON bookkeeping files are refused, and what counts as a change between two resolved recipes. Each case
came from a hand-made mutation that the rest of the suite let through."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from nvae_search.cli.common import parse_sets
from nvae_search.config_io import (
    ConfigError,
    differences,
    get_dotted,
    parse_yaml_text,
    read_json_mapping,
    set_dotted,
)
from nvae_search.schema import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes/cpu/tiny.yaml"


def tiny_file(tmp_path: Path, edit: Any) -> Path:
    data = yaml.safe_load(TINY.read_text())
    edit(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def problems_of(path: Path, overrides: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as err:
        load_recipe(path, overrides=overrides)
    return err.value.problems


def test_a_bad_cell_field_is_one_problem_at_the_path_written_in_the_file(tmp_path: Path) -> None:
    # pydantic reports the op's tag inside the location and a "too short" for the list the bad item left empty;
    # neither is something the user wrote.
    path = tiny_file(
        tmp_path, lambda d: d["model"].update(cells={"normal_enc": [{"type": "res_bnswish", "kernel": 4}]})
    )
    assert problems_of(path) == [("model.cells.normal_enc.0.kernel", "kernel must be odd, got 4")]


def test_a_duplicate_key_names_both_lines_as_the_editor_numbers_them() -> None:
    text = "a: 1\nb: 2\nc: 3\nb: 4\n"
    with pytest.raises(ConfigError) as err:
        parse_yaml_text(text, "f.yaml")
    [(field, reason)] = err.value.problems
    assert field == "b" and "first at line 2, again at line 4" in reason


def test_an_override_below_an_empty_section_creates_it(tmp_path: Path) -> None:
    path = tiny_file(tmp_path, lambda d: d.update(eval=None))  # `eval:` written with nothing under it
    recipe = load_recipe(path, overrides={"eval.iw_samples": 7})
    assert recipe.eval.iw_samples == 7


def test_dotted_paths_through_lists_stop_at_their_end() -> None:
    tree: dict[str, Any] = {"a": [{"b": 1}], "c": None}
    assert get_dotted(tree, ["a", "0", "b"]) == 1
    assert get_dotted(tree, ["a", "1", "b"]) is None  # one past the end: absent, not an IndexError
    assert get_dotted(tree, ["a", "1"]) is None
    set_dotted(tree, "c.d", "x")  # a None on the way is replaced by a mapping
    assert tree["c"] == {"d": "x"}
    set_dotted(tree, "a.0.b", 2)
    assert tree["a"] == [{"b": 2}]


@pytest.mark.parametrize(
    ("sets", "budget"),
    [
        (["train.steps=10"], {"epochs": None, "steps": 10, "minutes": None}),
        (["train.minutes=5"], {"epochs": None, "steps": None, "minutes": 5}),
        (["train.steps=10", "train.minutes=5"], {"epochs": None, "steps": 10, "minutes": 5}),
        (["train.epochs=2", "train.minutes=5"], {"epochs": 2, "steps": None, "minutes": 5}),
        (["train.minutes=null"], {"epochs": 400, "steps": None, "minutes": None}),  # only clears: the rest stays
        (["train.learning_rate=0.01"], {"epochs": 400, "steps": None, "minutes": None}),
    ],
)
def test_budget_sets_replace_the_recipes_budget(sets: list[str], budget: dict[str, Any]) -> None:
    # paper/mnist trains for 400 epochs; a budget given on the command line replaces it, whole.
    recipe = load_recipe(ROOT / "recipes/paper/mnist.yaml", overrides=parse_sets(sets))
    assert {key: getattr(recipe.train, key) for key in budget} == budget


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ('{"study_name": "s", "space_file": "x.yaml", "storage": ""}', "storage"),
        ('{"study_name": "s", "space_file": "x.yaml", "storage": 3}', "storage"),
        ('{"study_name": "s", "space_file": "x.yaml"}', "storage"),
    ],
)
def test_a_bookkeeping_file_needs_non_empty_strings(tmp_path: Path, content: str, field: str) -> None:
    path = tmp_path / "study.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_json_mapping(path, required=("study_name", "space_file", "storage"))
    assert [f for f, _reason in err.value.problems] == [field]
    good = '{"study_name": "s", "space_file": "x.yaml", "storage": "journal"}'
    path.write_text(good)
    assert read_json_mapping(path, required=("study_name", "space_file", "storage"))["storage"] == "journal"


def test_differences_between_resolved_recipes() -> None:
    old = {"a": 1, "l": [1, 2], "m": {"x": 1}}
    assert differences(old, old) == []
    assert differences(old, {**old, "a": True}) == [("a", 1, True)]  # equal in Python, not the same setting
    assert differences(old, {**old, "l": [1, 3]}) == [("l.1", 2, 3)]
    assert differences(old, {**old, "l": [1, 2, 3]}) == [("l", [1, 2], [1, 2, 3])]
    assert differences(old, {**old, "n": 5}) == [("n", None, 5)]  # a key only the new tree has
    assert differences(old, {"l": [1, 2], "m": {"x": 1}}) == [("a", 1, None)]
