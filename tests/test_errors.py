"""Bad recipe files give one clean screen: the file, the field path and a reason, exit code 2, no traceback."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from nvae_search.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes/cpu/tiny.yaml"
MARKER = "pwned.marker"
WIDE = {"COLUMNS": "200"}  # one line per problem, so that the assertions see whole reasons


def tiny_with(path: str, value: Any, **more: Any) -> dict[str, Any]:
    """The tiny recipe with dotted keys set: ``path`` to ``value``, and ``a__b=v`` for each extra key ``a.b``."""
    data = copy.deepcopy(yaml.safe_load(TINY.read_text()))
    for dotted, new in {path: value, **{k.replace("__", "."): v for k, v in more.items()}}.items():
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = new
    return data


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@dataclass
class Case:
    name: str
    content: str | dict[str, Any] | list[Any] | None  # None: the file does not exist
    field: str  # the field path the screen must name ("<file>" for the whole file)
    reason: str  # a fragment of the reason
    extra_args: list[str] = field(default_factory=list)


CASES = [
    Case("unknown_top_level_key", tiny_with("bogus", 1), "bogus", "unknown key"),
    Case(
        "unknown_nested_key",
        tiny_with("model.norm", {"batchnorm": {"momentum": 0.1}}),
        "model.norm.batchnorm",
        "unknown key",
    ),
    Case(
        "wrong_type", tiny_with("model.num_latent_per_group", "twenty"), "model.num_latent_per_group", "valid integer"
    ),
    Case("resolution_not_divisible", tiny_with("model.resolution", 30), "model", "resolution 30 must be divisible"),
    Case(
        "groups_list_wrong_length",
        tiny_with("model.num_groups_per_scale", [2, 2, 2], model__ada_groups=False),
        "model",
        "num_groups_per_scale lists 3 counts",
    ),
    Case(
        "min_groups_above_groups",
        tiny_with("model.min_groups_per_scale", 5),
        "model",
        "min_groups_per_scale (5) must be <=",
    ),
    Case("ada_groups_with_list", tiny_with("model.num_groups_per_scale", [2, 1]), "model", "ada_groups must be false"),
    Case("unknown_preset", tiny_with("model.preset", "res_foo"), "model.preset", "Input should be"),
    Case(
        "unknown_op_type",
        tiny_with("model.cells", {"normal_enc": [{"type": "res_foo"}]}),
        "model.cells.normal_enc.0",
        "res_foo",
    ),
    Case(
        "even_kernel",
        tiny_with("model.cells", {"normal_enc": [{"type": "res_bnswish", "kernel": 4}]}),
        "model.cells.normal_enc.0",
        "kernel must be odd",
    ),
    Case(
        "mbconv_groups_not_dividing",
        tiny_with("model.cells", {"normal_pre": [{"type": "mbconv", "expansion": 3, "groups": 5}]}),
        "model",
        "groups=5 does not divide the hidden width 12",
    ),
    Case(
        "dmol_with_one_channel",
        tiny_with("model.output", {"distribution": "dmol"}),
        "model",
        "input_channels must be 3",
    ),
    Case(
        "cifar10_without_root",
        {"data": {"dataset": "cifar10"}, "model": {"input_channels": 3, "output": {"distribution": "dmol"}}},
        "data",
        "needs data.root",
    ),
    Case("grey_dataset_with_rgb", tiny_with("model.input_channels", 3), "<file>", "grey-level"),
    Case("steps_and_epochs", tiny_with("train.epochs", 3), "train", "either train.epochs or train.steps"),
    Case("negative_learning_rate", tiny_with("train.learning_rate", -0.1), "train.learning_rate", "greater than 0"),
    Case(
        "channels_list_wrong_length",
        tiny_with("model.num_channels_enc", [4, 8, 16, 32]),
        "model",
        "num_channels_enc lists 4 widths",
    ),
    Case("top_level_list", ["model", "data"], "<file>", "expected a mapping"),
    Case("malformed_yaml", "model: {resolution: 32\ndata: [\n", "<file>", "not valid YAML"),
    Case("python_tag", f'!!python/object/apply:os.system ["touch {MARKER}"]\n', "<file>", "not valid YAML"),
    Case("alias_bomb", alias_bomb(), "<file>", "alias bomb"),
    Case("duplicate_key", "name: a\nmodel: {use_se: true}\nname: b\n", "name", "first at line 1, again at line 3"),
    Case("empty_file", "# a recipe, one day\n", "<file>", "the file is empty"),
    Case("missing_file", None, "<file>", "file not found"),
    Case(
        "bad_set_override",
        tiny_with("name", "ok"),
        "model.num_latent_per_group",
        "greater than or equal to 1",
        ["--set", "model.num_latent_per_group=-3"],
    ),
    Case(
        "set_override_through_a_scalar",
        tiny_with("name", "ok"),
        "name.x",
        "cannot set this path",
        ["--set", "name.x=1"],
    ),
]


def write_case(case: Case, folder: Path) -> str:
    name = f"{case.name}.yaml"
    if isinstance(case.content, str):
        (folder / name).write_text(case.content)
    elif case.content is not None:
        (folder / name).write_text(yaml.safe_dump(case.content, sort_keys=False))
    return name


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(app, args, env=WIDE)


def assert_clean_failure(result: Result) -> None:
    assert result.exit_code == 2, result.output
    # CliRunner keeps an escaped exception in result.exception (never prints a traceback into the output).
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def test_at_least_fifteen_kinds() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_recipe_gives_one_clean_screen(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # short relative names: the screen shows them whole
    name = write_case(case, tmp_path)
    start = time.perf_counter()
    result = invoke(["validate", name, *case.extra_args])
    elapsed = time.perf_counter() - start
    assert_clean_failure(result)
    assert name in result.output
    # Field names appear almost anywhere on the screen; the problem row holds the field and its reason together.
    assert any(case.field in line and case.reason in line for line in result.output.splitlines()), result.output
    if case.name == "python_tag":
        assert not (tmp_path / MARKER).exists(), "the YAML tag ran a command"
    if case.name == "alias_bomb":
        assert elapsed < 2.0


def test_malformed_set_option_is_a_clean_error() -> None:
    result = invoke(["validate", str(TINY), "--set", "model.use_se"])
    assert_clean_failure(result)
    assert "dotted.key=value" in result.output


def test_every_bad_file_is_reported_and_good_ones_still_summarised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = [write_case(c, tmp_path) for c in CASES if c.name in ("wrong_type", "missing_file")]
    result = invoke(["validate", str(TINY), *bad])
    assert_clean_failure(result)
    assert all(name in result.output for name in bad)
    assert "cpu-tiny" in result.output  # the good file's summary


def test_the_real_process_prints_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(tiny_with("model.resolution", 30)))
    proc = subprocess.run(
        [sys.executable, "-m", "nvae_search", "validate", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "resolution 30 must be divisible" in proc.stderr


def test_a_run_directory_given_for_a_recipe_names_the_recipe_inside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("plain").mkdir()
    Path("run").mkdir()
    Path("run", "recipe.resolved.yaml").write_text(yaml.safe_dump(tiny_with("name", "ok")))
    plain, run = invoke(["validate", "plain"]), invoke(["validate", "run"])
    assert_clean_failure(plain)
    assert_clean_failure(run)
    assert "is a directory, expected a YAML file" in plain.output and "recipe.resolved.yaml" not in plain.output
    assert "its recipe is run/recipe.resolved.yaml" in " ".join(run.output.replace("│", " ").split())
