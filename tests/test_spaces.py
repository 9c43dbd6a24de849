"""Search-space files: loading, validation errors, compiling to Optuna, and applying samples to recipes."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from nvae_search.config_io import ConfigError
from nvae_search.schema import Recipe
from nvae_search.search.compile import (
    directions,
    enqueue_points,
    grid_search_space,
    make_define_by_run,
    make_pruner,
    make_ray_space_fn,
    make_sampler,
    resolve_flat_params,
)
from nvae_search.spaces import Space, apply_params, load_space, space_json_schema

REPO = Path(__file__).resolve().parents[1]
SPACE_FILES = sorted((REPO / "spaces").glob("*.yaml"))

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE_RECIPE: dict[str, Any] = {
    "name": "test-base",
    "model": {
        "num_channels_enc": 8,
        "num_channels_dec": 8,
        "num_latent_scales": 2,
        "num_groups_per_scale": 2,
        "num_preprocess_blocks": 1,
        "num_postprocess_blocks": 1,
        "num_preprocess_cells": 1,
        "num_postprocess_cells": 1,
    },
}

MBCONV = [{"type": "mbconv", "expansion": 3, "kernel": 5}]

SPACE: dict[str, Any] = {
    "base_recipe": "base.yaml",
    "study": {"name": "unit", "n_trials": 20, "seed": 3},
    "budget": {"steps": 10},
    "sampler": {"type": "random"},
    "space": {
        "train.learning_rate": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
        "model.num_latent_per_group": {"type": "int", "low": 2, "high": 5},
        "model.use_se": {"type": "categorical", "choices": [True, False]},
        "model.num_latent_scales": {"type": "int", "low": 1, "high": 3},
        "model.ada_groups": {"type": "fixed", "value": False},
        "model.num_groups_per_scale": {
            "type": "per_scale",
            "count": "model.num_latent_scales",
            "each": {"type": "int", "low": 1, "high": 3},
        },
        "model.decoder_cell": {
            "type": "categorical",
            "choices": {
                "mbconv": {
                    "model.cells.normal_dec": {"type": "fixed", "value": MBCONV},
                    "model.num_cell_per_cond_dec": {"type": "int", "low": 1, "high": 2},
                },
                "res": {"model.cells.normal_dec": {"type": "fixed", "value": ["res_bnswish", "res_bnswish"]}},
            },
        },
    },
}


def write_space(folder: Path, data: dict[str, Any], name: str = "space.yaml") -> Path:
    (folder / "base.yaml").write_text(yaml.safe_dump(BASE_RECIPE))
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def space(tmp_path: Path) -> Space:
    return load_space(write_space(tmp_path, SPACE))


def random_trials(space: Space, n: int, seed: int = 0) -> list[tuple[optuna.trial.Trial, dict[str, Any]]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), directions=directions(space))
    fn = make_define_by_run(space)
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((trial, fn(trial)))
    return out


# ------------------------------------------------------------------------------------------ shipped files
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # TPE's group option
@pytest.mark.parametrize("path", SPACE_FILES, ids=[p.name for p in SPACE_FILES])
def test_space_file_loads_and_samples_valid_recipes(path: Path) -> None:
    base = path.parent / yaml.safe_load(path.read_text())["base_recipe"]
    if not base.is_file():
        pytest.skip(f"base recipe {base} does not exist yet")
    space = load_space(path)
    make_sampler(space), make_pruner(space)
    for trial, values in random_trials(space, 8):
        assert isinstance(apply_params(space, values), Recipe)
        assert resolve_flat_params(space, trial.params) == values


def test_shipped_files_exist() -> None:
    names = {p.name for p in SPACE_FILES}
    assert {"quickstart.yaml", "ablation.yaml", "cifar10_paper.yaml", "celeba64_paper.yaml"} <= names


# ------------------------------------------------------------------------------------- compile and sample
def test_fixed_trial_gives_a_valid_recipe(space: Space) -> None:
    params = {
        "train.learning_rate": 5e-3,
        "model.num_latent_per_group": 4,
        "model.use_se": False,
        "model.num_latent_scales": 3,
        "model.num_groups_per_scale.0": 3,
        "model.num_groups_per_scale.1": 2,
        "model.num_groups_per_scale.2": 1,
        "model.decoder_cell": "mbconv",
        "model.num_cell_per_cond_dec": 1,
    }
    values = make_define_by_run(space)(optuna.trial.FixedTrial(params))
    assert values["model.num_groups_per_scale"] == [3, 2, 1]
    assert "model.decoder_cell" not in values  # a branch label is not a recipe value
    recipe = apply_params(space, values)
    assert recipe.model.num_groups_per_scale == (3, 2, 1)
    assert recipe.model.cells.normal_dec[0].type == "mbconv"
    assert recipe.model.use_se is False and recipe.train.learning_rate == 5e-3
    assert (recipe.train.steps, recipe.train.epochs, recipe.train.minutes) == (10, None, None)
    assert (recipe.train.eval_iw_samples, recipe.train.eval_at_end) == (10, True)


def test_random_study_samples_apply_to_valid_recipes(space: Space) -> None:
    seen_ints, seen_labels = set(), set()
    for trial, values in random_trials(space, 60):
        recipe = apply_params(space, values)
        params = trial.params
        seen_ints.add(params["model.num_latent_per_group"])
        assert len(values["model.num_groups_per_scale"]) == params["model.num_latent_scales"]
        assert recipe.model.num_latent_scales == len(recipe.model.groups_per_scale())
        label = params["model.decoder_cell"]
        seen_labels.add(label)
        assert ("model.num_cell_per_cond_dec" in params) == (label == "mbconv")
        assert resolve_flat_params(space, params) == values
        assert 1e-3 <= values["train.learning_rate"] <= 1e-2
    assert seen_ints == {2, 3, 4, 5}  # inclusive bounds: both ends are sampled
    assert seen_labels == {"mbconv", "res"}


def test_ray_space_fn_suggests_the_same_parameters(space: Space) -> None:
    trial, values = random_trials(space, 1, seed=5)[0]
    fixed = optuna.trial.FixedTrial(trial.params)
    assert make_ray_space_fn(space)(fixed) is None
    assert fixed.params == trial.params
    assert resolve_flat_params(space, {**trial.params, "ray_constant": 1}) == values


def test_resolve_flat_params_names_a_missing_parameter(space: Space) -> None:
    with pytest.raises(ValueError, match=r"model\.num_latent_scales"):
        resolve_flat_params(space, {"train.learning_rate": 1e-3, "model.num_latent_per_group": 2, "model.use_se": True})


def test_preset_and_index_paths_apply_over_the_base_file(tmp_path: Path) -> None:
    data = copy.deepcopy(SPACE)
    data["space"] = {
        "model.preset": {"type": "categorical", "choices": ["res_elu", "res_bnswish"]},
        "model.cells.normal_enc.0.kernel": {"type": "categorical", "choices": [3, 5]},
    }
    space = load_space(write_space(tmp_path, data))
    fn = make_define_by_run(space)
    values = fn(optuna.trial.FixedTrial({"model.preset": "res_elu", "model.cells.normal_enc.0.kernel": 5}))
    recipe = apply_params(space, values)
    # The base file lists no cells, so the sampled preset fills every role; the index path edits one op of it.
    assert {op["type"] for ops in recipe.model.cells.model_dump().values() for op in ops} == {"res_elu"}
    assert [op.kernel for op in recipe.model.cells.normal_enc] == [5, 3]


def test_combination_rejected_by_the_schema(tmp_path: Path) -> None:
    data = copy.deepcopy(SPACE)
    data["space"] = {"model.num_latent_scales": {"type": "int", "low": 1, "high": 6}}
    space = load_space(write_space(tmp_path, data))
    values = make_define_by_run(space)(optuna.trial.FixedTrial({"model.num_latent_scales": 6}))
    with pytest.raises(ConfigError) as err:
        apply_params(space, values)
    assert any("divisible" in reason for _path, reason in err.value.problems)


def test_grid_enumerates_the_product(tmp_path: Path) -> None:
    data = copy.deepcopy(SPACE)
    data["sampler"] = {"type": "grid"}
    data["space"] = {
        "model.use_se": {"type": "categorical", "choices": [True, False]},
        "model.num_latent_per_group": {"type": "int", "low": 1, "high": 3},
        "model.loss.kl_anneal_portion": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.25},
        "model.decoder_cell": {
            "type": "categorical",
            "choices": {"mbconv": {"model.cells.normal_dec": {"type": "fixed", "value": MBCONV}}, "default": {}},
        },
    }
    space = load_space(write_space(tmp_path, data))
    grid = grid_search_space(space)
    expected = set(itertools.product(*grid.values()))
    assert len(expected) == 2 * 3 * 3 * 2
    study = optuna.create_study(sampler=make_sampler(space), directions=directions(space))
    fn = make_define_by_run(space)

    def objective(trial: optuna.trial.Trial) -> float:
        apply_params(space, fn(trial))
        return 0.0

    study.optimize(objective, n_trials=len(expected))
    seen = {tuple(t.params[k] for k in grid) for t in study.trials}
    assert seen == expected


def test_enqueue_points_expand_per_scale_lists(tmp_path: Path) -> None:
    data = copy.deepcopy(SPACE)
    data["study"]["enqueue"] = [
        {"model.num_latent_scales": 2, "model.num_groups_per_scale": [3, 1], "model.decoder_cell": "res"}
    ]
    space = load_space(write_space(tmp_path, data))
    study = optuna.create_study(sampler=make_sampler(space))
    for point in enqueue_points(space):
        study.enqueue_trial(point)
    values = make_define_by_run(space)(study.ask())
    assert values["model.num_groups_per_scale"] == [3, 1]
    assert values["model.cells.normal_dec"] == ["res_bnswish", "res_bnswish"]


def test_multi_objective_defaults_to_no_pruning(tmp_path: Path) -> None:
    data = copy.deepcopy(SPACE)
    data["study"]["objectives"] = [{"metric": "nll", "direction": "minimize"}, {"metric": "params"}]
    space = load_space(write_space(tmp_path, data))
    assert space.pruner.type == "none" and space.ray.scheduler.type == "none"
    assert directions(space) == ["minimize", "minimize"]
    assert isinstance(make_pruner(space), optuna.pruners.NopPruner)


@pytest.mark.skipif(importlib.util.find_spec("cmaes") is not None, reason="cmaes is installed")
def test_cmaes_without_the_package_is_a_clear_error(tmp_path: Path) -> None:
    data = copy.deepcopy(SPACE)
    data["sampler"] = {"type": "cmaes"}
    space = load_space(write_space(tmp_path, data))
    with pytest.raises(ConfigError, match="cmaes"):
        make_sampler(space)


def test_json_schema_and_lazy_imports() -> None:
    schema = space_json_schema()
    assert {"base_recipe", "study", "budget", "space"} <= set(schema["required"])
    code = (
        "import sys, nvae_search.spaces, nvae_search.search.compile; "
        "assert not {'optuna', 'torch', 'ray'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ----------------------------------------------------------------------------------------- bad space files
def _edit(path: str, value: Any) -> Any:
    """A mutation setting ``path`` (a tuple of keys) of the good space dict to ``value``."""

    def mutate(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


LR = ("space", "train.learning_rate")
LR_LOC = "space.train.learning_rate"
BAD_SPACES: list[tuple[str, Any, str, str]] = [
    ("unknown-top-level-key", _edit(("searcher",), "tpe"), "searcher", "unknown key"),
    ("mistyped-study-key", _edit(("study", "n_trails"), 3), "study.n_trails", "did you mean study.n_trials"),
    ("mistyped-spec-type", _edit((*LR, "type"), "flot"), LR_LOC, "unknown type 'flot' (did you mean float?)"),
    ("unknown-key-in-leaf", _edit((*LR, "lo"), 1), "space.train.learning_rate.lo", "unknown key"),
    (
        "path-not-in-recipe",
        _edit(("space", "model.num_latent_per_grup"), {"type": "int", "low": 1, "high": 2}),
        "space.model.num_latent_per_grup",
        "did you mean model.num_latent_per_group",
    ),
    ("low-not-below-high", _edit((*LR, "low"), 0.1), "space.train.learning_rate", "must be below high"),
    ("log-with-low-0", _edit(LR, {"type": "float", "low": 0.0, "high": 1.0, "log": True}), LR_LOC, "low > 0"),
    (
        "log-and-step",
        _edit(LR, {"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}),
        LR_LOC,
        "cannot be combined",
    ),
    (
        "list-choice",
        _edit(("space", "model.use_se"), {"type": "categorical", "choices": [[1, 2], 3]}),
        "space.model.use_se.choices",
        "is a list",
    ),
    ("empty-choices", _edit(("space", "model.use_se", "choices"), []), "space.model.use_se.choices", "empty"),
    (
        "duplicate-choices",
        _edit(("space", "model.use_se", "choices"), [1, 1.0]),
        "space.model.use_se.choices",
        "repeats",
    ),
    (
        "count-unknown-path",
        _edit(("space", "model.num_groups_per_scale", "count"), "model.num_nf"),
        "space.model.num_groups_per_scale.count",
        "not set earlier",
    ),
    ("unknown-spec-type", _edit((*LR, "type"), "normal"), LR_LOC, "expected a mapping with type"),
    (
        "same-name-two-kinds",
        _edit(
            ("space", "model.decoder_cell", "choices", "res", "model.num_cell_per_cond_dec"),
            {"type": "categorical", "choices": [1, 2]},
        ),
        "space.model.decoder_cell.choices.res.model.num_cell_per_cond_dec",
        "another kind",
    ),
    (
        "branch-label-is-a-recipe-field",
        _edit(("space", "model.preset"), {"type": "categorical", "choices": {"a": {}, "b": {}}}),
        "space.model.preset",
        "must not be a recipe field",
    ),
    (
        "outside-recipe-bounds",
        _edit(("space", "model.num_latent_per_group", "high"), 1000),
        "space.model.num_latent_per_group",
        "less than or equal to 512",
    ),
    ("set-by-budget", _edit(("space", "train.steps"), {"type": "fixed", "value": 5}), "space.train.steps", "budget"),
    (
        "multi-objective-with-pruner",
        lambda d: d.update(
            study={**d["study"], "objectives": [{"metric": "nll"}, {"metric": "params"}]},
            pruner={"type": "median"},
        ),
        "pruner",
        "cannot prune",
    ),
    ("grid-with-continuous-float", _edit(("sampler",), {"type": "grid"}), "sampler", "continuous float"),
    ("missing-base-recipe", _edit(("base_recipe",), "nope/missing.yaml"), "base_recipe", "file not found"),
    ("steps-and-epochs", _edit(("budget", "epochs"), 3), "budget", "exactly one of steps, epochs or minutes"),
    ("unknown-metric", _edit(("study", "objectives"), [{"metric": "bpd"}]), "study.objectives.0.metric", "Input"),
    (
        "enqueue-unknown-parameter",
        _edit(("study", "enqueue"), [{"train.batch_size": 3}]),
        "study.enqueue.0.train.batch_size",
        "not a searched parameter",
    ),
    ("bad-storage", _edit(("storage",), "study.db"), "storage", "storage URL"),
    (
        "count-is-bool",
        _edit(("space", "model.num_groups_per_scale", "count"), True),
        "space.model.num_groups_per_scale.count",
        "positive integer",
    ),
    (
        "overwrites-a-branch-value",
        _edit(("space", "model.cells"), {"type": "fixed", "value": {}}),
        "space.model.cells",
        "overlaps model.cells.normal_dec",
    ),
    (
        "float-for-an-int-field",
        _edit(("space", "model.num_nf"), {"type": "float", "low": 0, "high": 2}),
        "space.model.num_nf",
        "valid integer",
    ),
    (
        "choice-outside-a-literal",
        _edit(("space", "model.preset"), {"type": "categorical", "choices": ["res_mbconv", "res_mbconvv"]}),
        "space.model.preset",
        "choice 1='res_mbconvv' is not accepted",
    ),
    (
        "index-past-the-end",
        _edit(("space", "model.cells.normal_enc.2.kernel"), {"type": "categorical", "choices": [3, 5]}),
        "space.model.cells.normal_enc.2.kernel",
        "index 2 is past the end of model.cells.normal_enc: it has 2 items in the base recipe base.yaml",
    ),
    (
        "index-into-a-number",
        _edit(("space", "model.num_channels_dec.0"), {"type": "int", "low": 4, "high": 8}),
        "space.model.num_channels_dec.0",
        "model.num_channels_dec is 8 in the base recipe base.yaml, not a list",
    ),
    (
        "branch-in-per-scale",
        _edit(("space", "model.num_groups_per_scale", "each"), {"type": "categorical", "choices": {"a": {}}}),
        "space.model.num_groups_per_scale.each.choices",
        "valid list",
    ),
]


@pytest.mark.parametrize(("mutate", "path", "reason"), [b[1:] for b in BAD_SPACES], ids=[b[0] for b in BAD_SPACES])
def test_bad_space_is_reported(tmp_path: Path, mutate: Any, path: str, reason: str) -> None:
    data = copy.deepcopy(SPACE)
    mutate(data)
    with pytest.raises(ConfigError) as err:
        load_space(write_space(tmp_path, data))
    problems = err.value.problems
    assert any(p == path and reason in r for p, r in problems), problems
    assert str(tmp_path / "space.yaml") in str(err.value)


def test_an_index_inside_the_base_list_is_accepted(tmp_path: Path) -> None:
    data = copy.deepcopy(SPACE)
    data["space"] = {"model.cells.normal_enc.1.kernel": {"type": "categorical", "choices": [3, 5]}}
    space = load_space(write_space(tmp_path, data))
    values = make_define_by_run(space)(optuna.trial.FixedTrial({"model.cells.normal_enc.1.kernel": 5}))
    assert [op.kernel for op in apply_params(space, values).model.cells.normal_enc] == [3, 5]


def test_count_sampled_later_is_reported(tmp_path: Path) -> None:
    data = copy.deepcopy(SPACE)
    tree = data["space"]
    count = tree.pop("model.num_latent_scales")
    tree["model.num_latent_scales"] = count  # now after the per_scale entry that reads it
    with pytest.raises(ConfigError) as err:
        load_space(write_space(tmp_path, data))
    assert (
        "space.model.num_groups_per_scale.count",
        "model.num_latent_scales is sampled later in the space (order matters: move it above)",
    ) in err.value.problems


@pytest.mark.parametrize(
    "text",
    [
        'base_recipe: !!python/object/apply:os.system ["echo hi"]\n',
        "study: {name: x, n_trials: [1, 2\nbudget: {steps: 1}\n",
    ],
    ids=["python-tag", "malformed"],
)
def test_unsafe_or_malformed_yaml_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert [(p, r.split(":")[0]) for p, r in err.value.problems] == [("", "not valid YAML")]
