"""Built-in recipes and spaces: listed, copied, named on the command line, and shipped inside the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nvae_search.builtins import copy_builtin, find_builtin, list_builtins, resolve_config, shipped_base_recipe
from nvae_search.cli import app
from nvae_search.spaces import load_space

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_every_shipped_file_is_listed_with_its_description() -> None:
    recipes = {b.name: b for b in list_builtins("recipes")}
    spaces = {b.name: b for b in list_builtins("spaces")}
    assert {"cpu/tiny", "paper/cifar10", "paper/mnist", "variants/iaf_like_mnist"} <= set(recipes)
    assert {"quickstart", "ablation"} <= set(spaces)
    assert len(recipes) == len(list((ROOT / "recipes").rglob("*.yaml")))
    assert all(b.description for b in [*recipes.values(), *spaces.values()])
    assert recipes["cpu/tiny"].description.startswith("A tiny NVAE on the embedded MNIST")
    for b in [*recipes.values(), *spaces.values()]:  # a long sentence is cut at a clause, never inside a parenthesis
        assert b.description.count("(") == b.description.count(")"), b
    assert spaces["mnist_30min_r2"].description == "Rung 2 of the 30-minute MNIST search"


def test_names_resolve_but_existing_paths_win_and_traversal_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_builtin("cpu/tiny", "recipes") == ROOT / "recipes" / "cpu" / "tiny.yaml"
    assert find_builtin("cpu/tiny.yaml", "recipes") == ROOT / "recipes" / "cpu" / "tiny.yaml"
    assert find_builtin("quickstart", "spaces") == ROOT / "spaces" / "quickstart.yaml"
    assert find_builtin("../spaces/quickstart", "recipes") is None
    assert find_builtin("quickstart", "recipes") is None
    local = tmp_path / "cpu" / "tiny"
    local.parent.mkdir()
    local.write_text("name: mine\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config("cpu/tiny", "recipes") == Path("cpu/tiny")  # the user's own file first
    assert resolve_config("no/such", "recipes") == Path("no/such")  # reported later as "file not found"


def test_a_copied_space_still_finds_its_base_recipe(tmp_path: Path) -> None:
    copied = copy_builtin("quickstart", tmp_path)
    assert copied == tmp_path / "quickstart.yaml"
    space = load_space(copied)  # base_recipe: ../recipes/cpu/tiny.yaml, which is not next to the copy
    assert space.base_recipe_path == ROOT / "recipes" / "cpu" / "tiny.yaml"
    assert shipped_base_recipe("cpu/tiny") == ROOT / "recipes" / "cpu" / "tiny.yaml"
    with pytest.raises(FileExistsError):
        copy_builtin("quickstart", tmp_path)


def test_cli_ls_cp_and_version(tmp_path: Path) -> None:
    listed = runner.invoke(app, ["ls", "--json"])
    assert listed.exit_code == 0, listed.output
    payload = json.loads(listed.output)
    assert "cpu/tiny" in [r["name"] for r in payload["recipes"]] and payload["spaces"]
    only = runner.invoke(app, ["ls", "spaces"])
    assert only.exit_code == 0 and "quickstart" in only.output and "cpu/tiny" not in only.output
    assert runner.invoke(app, ["ls", "models"]).exit_code == 2
    copied = runner.invoke(app, ["cp", "cpu/tiny", str(tmp_path / "mine.yaml")])
    shipped = find_builtin("cpu/tiny", "recipes")
    assert copied.exit_code == 0 and shipped is not None
    assert (tmp_path / "mine.yaml").read_text() == shipped.read_text()
    unknown = runner.invoke(app, ["cp", "cpu/huge", str(tmp_path)])
    assert unknown.exit_code == 2 and "no built-in" in unknown.output and "Traceback" not in unknown.output
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"nvae-search {metadata.version('nvae-search')}"


def test_validate_takes_builtin_names_and_recognises_a_space() -> None:
    result = runner.invoke(app, ["validate", "cpu/tiny", "quickstart", "--json"])
    assert result.exit_code == 0, result.output
    recipe, space = json.loads(result.output)
    assert recipe["name"] == "cpu-tiny" and recipe["params"] > 0
    assert space["space"] == "quickstart" and space["n_trials"] == 10 and space["grid_points"] is None
    assert "train.learning_rate" in space["parameters"]
    assert space["base_recipe"]["name"] == "cpu-tiny"
    grid = runner.invoke(app, ["validate", "ablation", "--json"])
    assert grid.exit_code == 0, grid.output
    assert json.loads(grid.output)["grid_points"] == 24  # 2 x 2 x 2 x 3 seeds


def _setuptools_can_build() -> bool:
    try:
        return int(metadata.version("setuptools").split(".")[0]) >= 77
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _setuptools_can_build(), reason="needs setuptools>=77 to build the wheel offline")
def test_the_wheel_ships_recipes_and_spaces_and_finds_them(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("nvae_search", "recipes", "spaces"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("nvae_search-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "nvae_search/_builtin/recipes/cpu/tiny.yaml" in names
    assert "nvae_search/_builtin/recipes/paper/cifar10.yaml" in names
    assert "nvae_search/_builtin/spaces/quickstart.yaml" in names
    assert "nvae_search/datasets/mnist/train-images-idx3-ubyte.gz" in names
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    # Import the package from the unpacked wheel (not this checkout) and let importlib.resources find the files;
    # a shipped space must find its base recipe inside the wheel too.
    probe = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "import nvae_search.builtins as b; from nvae_search.spaces import load_space;"
        "s = load_space(b.find_builtin('quickstart', 'spaces'));"
        "print(json.dumps([b.__file__, str(b.builtin_root('recipes')), [x.name for x in b.list_builtins('recipes')],"
        " str(s.base_recipe_path)]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", probe, str(unpacked)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    module, root, recipes, base = json.loads(done.stdout)
    assert module.startswith(str(unpacked)) and root.startswith(str(unpacked))
    assert "cpu/tiny" in recipes and base == str(unpacked / "nvae_search/_builtin/recipes/cpu/tiny.yaml")
