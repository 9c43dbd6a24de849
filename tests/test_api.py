"""The Python API a notebook uses: recipe → model → train → load → evaluate → sample, and space → search → report,
all from ``import nvae_search``."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nvae_search

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"


def test_importing_the_package_loads_no_torch() -> None:
    code = "import sys, nvae_search; nvae_search.load_space; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_public_name_resolves_to_a_function_or_class() -> None:
    for name in nvae_search.__all__:
        value = getattr(nvae_search, name)
        assert callable(value), name
    # importing the submodules of the same names does not replace the functions
    importlib.import_module("nvae_search.search.runner")
    importlib.import_module("nvae_search.train")
    assert callable(nvae_search.search) and callable(nvae_search.train)
    assert not isinstance(nvae_search.search, type(sys))


def test_a_notebook_session_from_recipe_to_samples(tmp_path: Path) -> None:
    recipe = nvae_search.load_recipe(TINY, overrides={"train.steps": 2, "train.eval_at_end": False})
    model = nvae_search.build_model(recipe.model)
    assert sum(p.numel() for p in model.parameters()) == 27_998
    summary = nvae_search.train(recipe, tmp_path / "run")
    assert summary.status == "completed" and summary.steps == 2
    run = nvae_search.load_run(tmp_path / "run")
    images = nvae_search.sample(run, n=3, temperature=0.5, seed=0)
    assert tuple(images.shape) == (3, 1, 32, 32) and 0.0 <= float(images.min()) <= float(images.max()) <= 1.0
    again = nvae_search.sample(run, n=3, temperature=0.5, seed=0)
    assert bool((images == again).all()), "a seed makes sampling repeatable"


@pytest.mark.parametrize("backend", ["optuna"])
def test_a_notebook_search_and_report(tmp_path: Path, backend: str) -> None:
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        yaml.safe_dump(
            {
                "base_recipe": str(TINY),
                "study": {"name": "api", "n_trials": 2, "seed": 0},
                "budget": {"steps": 2, "eval_iw_samples": 1, "eval_images": 8, "report_every_steps": 1},
                "pruner": {"type": "none"},
                "space": {"train.learning_rate": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
            }
        )
    )
    space = nvae_search.load_space(space_file)
    study_dir = nvae_search.search(space, backend=backend, root=tmp_path / "runs")
    assert study_dir == tmp_path / "runs" / "api"
    report = nvae_search.report(study_dir)
    assert (study_dir / "report" / "leaderboard.csv").is_file()
    assert report is not None
