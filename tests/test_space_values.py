"""Values of the search-space rules, computed here by hand or by Optuna's own objects: the defaults and refusals of a
space file (each rule on both sides of its boundary), its grid and size, warm-start points, the checks of the tree
(overlaps, reused names, counts), the pruners and samplers it builds, the instability rule at its thresholds, the
Ray searcher's bridge to Optuna, the seed repeats around training, and the importances note of the report.

Nothing is trained and no Ray is started: studies are in memory or hand-made journals, and training is replaced by
a stand-in that records what it was asked to do.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from nvae_search.config_io import ConfigError
from nvae_search.search import instability as instability_module
from nvae_search.search import repeats as repeats_module
from nvae_search.search.compile import (
    directions,
    make_define_by_run,
    make_pruner,
    make_sampler,
    resolve_flat_params,
    sampler_exhausted,
)
from nvae_search.search.instability import (
    InstabilityRule,
    PrunerReplay,
    ReplayedRun,
    replay_pruners,
    rule_for,
    with_instability,
)
from nvae_search.search.ray_searcher import METRIC, PLACEHOLDER, StudyBridge, decide
from nvae_search.search.report import build_report
from nvae_search.search.runner import create_study, storage_url, write_study_file
from nvae_search.search.storage import open_storage
from nvae_search.search.trial import InvalidCombination, config_id
from nvae_search.spaces import (
    Space,
    apply_params,
    budget_overrides,
    grid_values,
    load_space,
    space_size,
    storage_form_problem,
)

TINY = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"
LR = "train.learning_rate"
LR_SPEC: dict[str, Any] = {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}
TWO_OBJECTIVES = [{"metric": "nelbo"}, {"metric": "params"}]

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------------------------------------ helpers
def doc(tree: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A space file as a dict over the tiny recipe; ``sections`` replace or add top-level keys (``study`` merges)."""
    data: dict[str, Any] = {
        "base_recipe": str(TINY),
        "study": {"name": "values", "n_trials": 4},
        "budget": {"steps": 10},
        "sampler": {"type": "random"},
        "space": tree or {LR: LR_SPEC},
    }
    for key, value in sections.items():
        data[key] = {**data["study"], **value} if key == "study" else value
    return {k: v for k, v in data.items() if v is not None}


def make(tmp_path: Path, tree: dict[str, Any] | None = None, **sections: Any) -> Space:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc(tree, **sections), sort_keys=False))
    return load_space(path)


def problems(tmp_path: Path, tree: dict[str, Any] | None = None, **sections: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as err:
        make(tmp_path, tree, **sections)
    return err.value.problems


def refused(tmp_path: Path, where: str, reason: str, tree: dict[str, Any] | None = None, **sections: Any) -> None:
    found = problems(tmp_path, tree, **sections)
    assert any(p == where and reason in r for p, r in found), found


# ------------------------------------------------------------------------------------- space-file sections
def test_only_a_study_with_two_objectives_defaults_to_no_pruning_and_no_scheduler(tmp_path: Path) -> None:
    for one in ({}, {"objectives": [{"metric": "nelbo"}]}):  # the default objective, or one listed
        single = make(tmp_path, pruner=None, study=one)
        assert (single.pruner.type, single.ray.scheduler.type) == ("median", "asha")
    pareto = make(tmp_path, pruner=None, study={"objectives": TWO_OBJECTIVES}, ray={"max_concurrent": 3})
    assert (pareto.pruner.type, pareto.ray.scheduler.type, pareto.ray.max_concurrent) == ("none", "none", 3)


def test_cmaes_is_refused_for_two_objectives_only(tmp_path: Path) -> None:
    assert make(tmp_path, sampler={"type": "cmaes"}).sampler.type == "cmaes"
    refused(
        tmp_path,
        "sampler",
        "cmaes optimises a single objective",
        sampler={"type": "cmaes"},
        study={"objectives": TWO_OBJECTIVES},
    )


def test_a_pareto_study_may_use_the_instability_pruner_but_no_other(tmp_path: Path) -> None:
    pareto = {"objectives": TWO_OBJECTIVES}
    assert make(tmp_path, study=pareto, pruner={"type": "instability"}).pruner.type == "instability"
    refused(tmp_path, "pruner", "cannot prune", study=pareto, pruner={"type": "threshold", "upper": 5.0})


def test_a_pareto_study_refuses_an_asha_scheduler_it_sets_explicitly(tmp_path: Path) -> None:
    pareto = {"objectives": TWO_OBJECTIVES}
    assert make(tmp_path, study=pareto, ray={"scheduler": {"type": "none"}}).ray.scheduler.type == "none"
    refused(tmp_path, "ray", "scheduler must be {type: none}", study=pareto, ray={"scheduler": {"type": "asha"}})


def test_a_budget_needs_exactly_one_of_steps_epochs_or_minutes(tmp_path: Path) -> None:
    refused(tmp_path, "budget", "exactly one of steps, epochs or minutes (got none)", budget={"eval_iw_samples": 2})
    assert make(tmp_path, budget={"minutes": 0.5}).budget.minutes == 0.5


@pytest.mark.parametrize(
    ("repeats", "reason"),
    [
        ({"top_k": 2, "seeds": [3, 4, 3]}, "seeds must be unique"),
        ({"top_k": 2, "seeds": []}, "needs at least one seed"),
        ({"top_k": 0, "seeds": [3]}, "no effect while top_k is 0"),
    ],
)
def test_inconsistent_repeats_are_refused(tmp_path: Path, repeats: dict[str, Any], reason: str) -> None:
    refused(tmp_path, "repeats", reason, repeats=repeats)


def test_consistent_repeats_are_accepted(tmp_path: Path) -> None:
    assert make(tmp_path, repeats={"top_k": 2, "seeds": [3, 4]}).repeats.seeds == [3, 4]


def test_each_metric_may_be_an_objective_once(tmp_path: Path) -> None:
    twice = [{"metric": "nelbo"}, {"metric": "nelbo", "direction": "maximize"}]
    refused(tmp_path, "study.objectives", "each metric may appear once", study={"objectives": twice})


def test_tpe_group_needs_multivariate(tmp_path: Path) -> None:
    refused(
        tmp_path, "sampler", "group needs multivariate", sampler={"type": "tpe", "group": True, "multivariate": False}
    )
    assert make(tmp_path, sampler={"type": "tpe", "group": True, "multivariate": True}).sampler.group is True


@pytest.mark.parametrize(("high", "ok"), [(1, False), (2, True)])
def test_hyperband_max_resource_must_exceed_min_resource(tmp_path: Path, high: int, ok: bool) -> None:
    pruner = {"type": "hyperband", "min_resource": 1, "max_resource": high}
    if ok:
        assert make(tmp_path, pruner=pruner).pruner.max_resource == high
    else:
        refused(tmp_path, "pruner", "must exceed min_resource", pruner=pruner)


@pytest.mark.parametrize(("lower", "ok"), [(5.0, False), (4.999, True)])
def test_threshold_lower_must_be_below_upper(tmp_path: Path, lower: float, ok: bool) -> None:
    pruner = {"type": "threshold", "upper": 5.0, "lower": lower}
    if ok:
        assert make(tmp_path, pruner=pruner).pruner.lower == lower
    else:
        refused(tmp_path, "pruner", "must be below upper", pruner=pruner)


@pytest.mark.parametrize(("gpu", "ok"), [(0.5, True), (1.0, True), (1.5, False), (2.0, True), (2.5, False)])
def test_fractional_gpus_only_below_one(tmp_path: Path, gpu: float, ok: bool) -> None:
    ray = {"resources_per_trial": {"gpu": gpu}}
    if ok:
        assert make(tmp_path, ray=ray).ray.resources_per_trial.gpu == gpu
    else:
        refused(tmp_path, "ray.resources_per_trial.gpu", "fractional GPUs only below 1", ray=ray)


@pytest.mark.parametrize(
    ("storage", "ok"),
    [
        ("journal:", False),
        ("journal:   ", False),
        ("journal:s.journal", True),
        ("sqlite:///s.db", True),
        ("s.db", False),
    ],
)
def test_storage_forms(storage: str, ok: bool) -> None:
    assert (storage_form_problem(storage) is None) == ok


# --------------------------------------------------------------------------------------- grid, size, budget
PER_SCALE_GRID: dict[str, Any] = {
    "model.use_se": {"type": "categorical", "choices": [True, False]},
    "model.num_latent_scales": {"type": "fixed", "value": 3},
    "model.num_groups_per_scale": {"type": "per_scale", "count": 3, "each": {"type": "int", "low": 1, "high": 3}},
}


def test_a_per_scale_grid_has_one_axis_per_scale_and_the_size_is_the_product(tmp_path: Path) -> None:
    space = make(tmp_path, PER_SCALE_GRID, sampler={"type": "grid"})
    grid = grid_values(space)
    assert grid == {
        "model.use_se": [True, False],
        "model.num_groups_per_scale.0": [1, 2, 3],
        "model.num_groups_per_scale.1": [1, 2, 3],
        "model.num_groups_per_scale.2": [1, 2, 3],
    }
    assert space_size(space)["grid_points"] == 2 * 3 * 3 * 3
    assert space_size(make(tmp_path))["grid_points"] is None  # a continuous float has no grid


def test_the_budget_sets_eval_images_only_when_it_gives_them(tmp_path: Path) -> None:
    given = make(tmp_path, budget={"steps": 10, "eval_images": 16})
    assert budget_overrides(given)["train.eval_images"] == 16
    assert apply_params(given, {LR: 0.01}).train.eval_images == 16
    assert "train.eval_images" not in budget_overrides(make(tmp_path))


# ----------------------------------------------------------------------------------- warm starts and replays
BRANCH_TREE: dict[str, Any] = {
    LR: LR_SPEC,
    "decoder_choice": {
        "type": "categorical",
        "choices": {
            "deep": {"model.num_cell_per_cond_dec": {"type": "int", "low": 1, "high": 2}},
            "shallow": {"model.num_cell_per_cond_dec": {"type": "fixed", "value": 1}},
        },
    },
}


def test_a_warm_start_label_must_be_one_of_the_branch_labels(tmp_path: Path) -> None:
    assert make(tmp_path, BRANCH_TREE, study={"enqueue": [{"decoder_choice": "deep"}]}).study.enqueue
    refused(
        tmp_path,
        "study.enqueue.0.decoder_choice",
        "'medium' is outside the distribution of decoder_choice",
        BRANCH_TREE,
        study={"enqueue": [{"decoder_choice": "medium"}]},
    )


def test_flat_parameters_outside_the_choices_are_refused(tmp_path: Path) -> None:
    space = make(tmp_path, BRANCH_TREE)
    assert resolve_flat_params(space, {LR: 0.01, "decoder_choice": "shallow"}) == {
        LR: 0.01,
        "model.num_cell_per_cond_dec": 1,
    }
    with pytest.raises(ValueError, match=r"decoder_choice='medium' is not one of \['deep', 'shallow'\]"):
        resolve_flat_params(space, {LR: 0.01, "decoder_choice": "medium"})


# ------------------------------------------------------------------------------------------- tree checks
def test_a_parent_set_before_its_child_is_an_overlap(tmp_path: Path) -> None:
    tree = {
        "model.cells": {"type": "fixed", "value": {}},
        "model.cells.normal_dec": {"type": "fixed", "value": ["res_bnswish", "res_bnswish"]},
    }
    refused(tmp_path, "space.model.cells.normal_dec", "overlaps model.cells, already set at space.model.cells", tree)


def branch_of_lr(log_a: bool, log_b: bool) -> dict[str, Any]:
    lr = {"type": "float", "low": 1e-4, "high": 1e-1}
    return {
        "lr_choice": {
            "type": "categorical",
            "choices": {"a": {LR: {**lr, "log": log_a}}, "b": {LR: {**lr, "log": log_b}}},
        }
    }


def test_a_name_reused_with_another_log_flag_is_refused(tmp_path: Path) -> None:
    assert make(tmp_path, branch_of_lr(True, True))
    refused(
        tmp_path, "space.lr_choice.choices.b.train.learning_rate", "another kind, log flag", branch_of_lr(True, False)
    )


@pytest.mark.parametrize(("low", "ok"), [(0, False), (1, True)])
def test_a_per_scale_count_parameter_must_start_at_one(tmp_path: Path, low: int, ok: bool) -> None:
    tree = {
        "model.num_latent_scales": {"type": "int", "low": low, "high": 2},
        "model.num_groups_per_scale": {
            "type": "per_scale",
            "count": "model.num_latent_scales",
            "each": {"type": "int", "low": 1, "high": 2},
        },
    }
    if ok:
        assert make(tmp_path, tree)
    else:
        refused(
            tmp_path,
            "space.model.num_groups_per_scale.count",
            "model.num_latent_scales must be an integer parameter or fixed integer >= 1",
            tree,
        )


def test_a_count_set_only_in_another_branch_label_is_refused(tmp_path: Path) -> None:
    groups = {"type": "per_scale", "count": "model.num_latent_scales", "each": {"type": "int", "low": 1, "high": 2}}
    tree = {
        "scales_choice": {
            "type": "categorical",
            "choices": {
                "a": {"model.num_latent_scales": {"type": "int", "low": 1, "high": 2}},
                "b": {"model.num_groups_per_scale": groups},
            },
        }
    }
    reason = "model.num_latent_scales is set only inside another branch, so not in every trial that needs it"
    refused(tmp_path, "space.scales_choice.choices.b.model.num_groups_per_scale.count", reason, tree)
    after = {**tree, "model.num_groups_per_scale": groups}  # after the branch: label b never sets the count
    after["scales_choice"] = {"type": "categorical", "choices": {"a": tree["scales_choice"]["choices"]["a"], "b": {}}}
    refused(tmp_path, "space.model.num_groups_per_scale.count", reason, after)


def test_a_per_scale_element_name_reused_by_an_index_path_is_refused(tmp_path: Path) -> None:
    """Per-scale values are named <path>.0, <path>.1, ...: an int at <path>.1 in one label and a categorical at
    <path>.1 in another are one Optuna name with two kinds."""
    tree = {
        "groups_choice": {
            "type": "categorical",
            "choices": {
                "a": {
                    "model.num_groups_per_scale": {
                        "type": "per_scale",
                        "count": 2,
                        "each": {"type": "int", "low": 1, "high": 2},
                    }
                },
                "b": {"model.num_groups_per_scale.1": {"type": "categorical", "choices": [1, 2]}},
            },
        }
    }
    found = problems(tmp_path, tree)
    assert any(
        p == "space.groups_choice.choices.b.model.num_groups_per_scale.1" and "another kind" in r for p, r in found
    ), found


def test_an_index_into_cells_is_left_to_a_sampled_preset(tmp_path: Path) -> None:
    """The tiny recipe's cells come from its preset (two ops per role); a sampled preset decides the lists, so an
    index past the base recipe's lists is not refused when the space samples model.preset."""
    index = {"model.cells.normal_enc.3.kernel": {"type": "categorical", "choices": [3, 5]}}
    preset = {"model.preset": {"type": "categorical", "choices": ["res_mbconv", "res_bnswish"]}}
    assert make(tmp_path, {**preset, **index})
    refused(tmp_path, "space.model.cells.normal_enc.3.kernel", "past the end of model.cells.normal_enc", index)


# --------------------------------------------------------------------------------------- samplers and pruners
def test_a_grid_is_exhausted_only_when_every_cell_ran_and_nothing_is_queued(tmp_path: Path) -> None:
    space = make(tmp_path, {LR: {"type": "categorical", "choices": [0.01, 0.02]}}, sampler={"type": "grid"})
    study = optuna.create_study(sampler=make_sampler(space), directions=directions(space))
    fn = make_define_by_run(space)
    seen = []
    for _ in range(2):
        assert not sampler_exhausted(study)
        trial = study.ask()
        seen.append(fn(trial)[LR])
        study.tell(trial, 0.0)
    assert sorted(seen) == [0.01, 0.02] and sampler_exhausted(study)
    study.enqueue_trial({LR: 0.02})  # a re-run queued by hand still comes first
    assert not sampler_exhausted(study)


def prune_steps(pruner: optuna.pruners.BasePruner, runs: list[list[tuple[int, float]]]) -> list[int | None]:
    """Where ``pruner`` stops each run of an in-memory minimised study, the runs told in order (None: not stopped;
    a run not stopped is told COMPLETE with its last value)."""
    study = optuna.create_study(pruner=pruner, direction="minimize")
    out: list[int | None] = []
    for run in runs:
        trial = study.ask()
        stop = None
        for step, value in run:
            trial.report(value, step)
            if trial.should_prune():
                stop = step
                break
        if stop is None:
            study.tell(trial, run[-1][1])
        else:
            study.tell(trial, state=TrialState.PRUNED)
        out.append(stop)
    return out


def flat(value: float, steps: range) -> list[tuple[int, float]]:
    return [(s, value) for s in steps]


def test_the_median_pruner_takes_its_warmup_and_interval_from_the_space(tmp_path: Path) -> None:
    """Optuna's median pruner compares a run's best value so far with the median of the completed runs at that
    step, from the warm-up step on, at the first report in each interval. The completed run falls 10 - step; with
    warm-up 3 and interval 2 a run stuck at 7.5 is judged first at step 3 (7.5 > 7), one stuck at 5 at steps 3, 5
    (5 is not above 5) and 7 (5 > 3)."""
    space = make(tmp_path, pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 3, "interval_steps": 2})
    runs = [[(s, 10.0 - s) for s in range(1, 9)], flat(7.5, range(1, 9)), flat(5.0, range(1, 9))]
    assert prune_steps(make_pruner(space), runs) == [None, 3, 7]
    reference = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=3, interval_steps=2)
    assert prune_steps(reference, runs) == [None, 3, 7]


def test_the_threshold_pruner_uses_both_bounds_of_the_space(tmp_path: Path) -> None:
    space = make(tmp_path, pruner={"type": "threshold", "upper": 10.0, "lower": 1.0})
    runs = [[(1, 10.0), (2, 10.5)], [(1, 5.0), (2, 0.5)], [(1, 10.0), (2, 1.0)]]
    assert prune_steps(make_pruner(space), runs) == [2, 2, None]  # above upper, below lower, on both bounds


def test_successive_halving_uses_the_spaces_reduction_factor(tmp_path: Path) -> None:
    """Rung 0 at step 1 keeps the best len // reduction_factor values (at least one). Values 1, 2, 3, 1.5: with
    factor 2 the fourth run is the 2nd best of 4 and goes on; with factor 4 only the best does."""
    space = make(tmp_path, pruner={"type": "successive_halving", "min_resource": 1, "reduction_factor": 2})
    runs = [[(1, v)] for v in (1.0, 2.0, 3.0, 1.5)]
    assert prune_steps(make_pruner(space), runs) == [None, 1, 1, None]
    factor4 = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=4)
    assert prune_steps(factor4, runs) == [None, 1, 1, 1]  # the rule above tells the two factors apart


def test_nsga2_breeds_a_new_generation_every_population_size_trials(tmp_path: Path) -> None:
    space = make(tmp_path, study={"objectives": TWO_OBJECTIVES}, sampler={"type": "nsga2", "population_size": 4})
    study = optuna.create_study(sampler=make_sampler(space), directions=directions(space))
    fn = make_define_by_run(space)
    for _ in range(6):
        trial = study.ask()
        lr = fn(trial)[LR]
        study.tell(trial, [lr, 1.0 / lr])
    generations = [next(v for k, v in t.system_attrs.items() if k.endswith("generation")) for t in study.trials]
    assert generations == [0, 0, 0, 0, 1, 1]


# ------------------------------------------------------------------------------------- the instability rule
NAN = float("nan")


def grad_rule(baseline_steps: int = 5) -> InstabilityRule:
    return InstabilityRule(grad_factor=10.0, nelbo_factor=None, baseline_steps=baseline_steps, patience=1)


def nelbo_rule() -> InstabilityRule:
    return InstabilityRule(grad_factor=None, nelbo_factor=1.5, patience=1)


@pytest.mark.parametrize(("step", "stops"), [(9, False), (10, True)])
def test_the_rule_may_stop_a_trial_from_the_last_warmup_step_on(step: int, stops: bool) -> None:
    rule = InstabilityRule(patience=1, n_warmup_steps=10)
    assert (rule.observe(step, {"nelbo": NAN}) is not None) == stops


def test_a_first_gradient_report_after_the_baseline_steps_becomes_the_baseline() -> None:
    rule = grad_rule(baseline_steps=5)
    assert rule.observe(50, {"grad_norm": 2.0}) is None  # report_every_steps 50: no report before step 5
    said = rule.observe(100, {"grad_norm": 25.0})
    assert said is not None and "gradient norm 25 is 12.5x its early median 2" in said


def test_a_zero_gradient_baseline_never_flags_a_gradient() -> None:
    rule = grad_rule(baseline_steps=2)
    assert [rule.observe(s, {"grad_norm": 0.0}) for s in (1, 2)] == [None, None]
    assert rule.observe(3, {"grad_norm": 5.0}) is None


@pytest.mark.parametrize(("grad", "stops"), [(20.0, False), (20.000001, True)])
def test_a_gradient_norm_must_exceed_grad_factor_times_the_baseline(grad: float, stops: bool) -> None:
    rule = grad_rule(baseline_steps=1)
    assert rule.observe(1, {"grad_norm": 2.0}) is None
    assert (rule.observe(2, {"grad_norm": grad}) is not None) == stops  # 10 x 2 = 20


@pytest.mark.parametrize(("nelbo", "stops"), [(150.0, False), (150.001, True)])
def test_a_nelbo_must_exceed_nelbo_factor_times_its_lowest(nelbo: float, stops: bool) -> None:
    rule = nelbo_rule()
    assert rule.observe(1, {"nelbo": 100.0}) is None
    assert (rule.observe(2, {"nelbo": nelbo}) is not None) == stops  # 1.5 x 100 = 150


def test_a_negative_nelbo_is_never_compared_by_ratio() -> None:
    rule = nelbo_rule()  # a continuous-density NELBO may be negative: -40 is above 1.5 x -100 but no explosion
    assert [rule.observe(s, {"nelbo": v}) for s, v in ((1, -100.0), (2, -40.0), (3, 10.0))] == [None, None, None]


def test_booleans_in_a_report_are_not_numbers() -> None:
    rule = grad_rule(baseline_steps=5)
    assert rule.observe(1, {"grad_norm": True}) is None  # not a gradient norm of 1
    assert rule.observe(6, {"grad_norm": 20.0}) is None  # so 20 is the first norm, the baseline


def test_the_rule_of_a_space_has_every_configured_setting(tmp_path: Path) -> None:
    pruner = {
        "type": "instability",
        "grad_factor": 4.0,
        "nelbo_factor": 2.0,
        "baseline_steps": 3,
        "patience": 3,
        "n_warmup_steps": 7,
    }
    rule = rule_for(make(tmp_path, pruner=pruner))
    assert rule is not None
    got = (rule.grad_factor, rule.nelbo_factor, rule.baseline_steps, rule.patience, rule.n_warmup_steps)
    assert got == (4.0, 2.0, 3, 3, 7)
    assert rule_for(make(tmp_path, pruner={"type": "median"})) is None


def test_once_the_rule_stops_a_run_every_later_report_stops_it_too(tmp_path: Path) -> None:
    space = make(tmp_path, pruner={"type": "instability", "patience": 1})
    inner_calls: list[int] = []

    def inner(step: int, metrics: dict[str, Any]) -> bool:
        inner_calls.append(step)
        return False

    report, cause = with_instability(space, inner)
    assert report is not None
    assert report(1, {"nelbo": 100.0}) is False and inner_calls == [1]
    assert report(2, {"nelbo": NAN}) is True
    assert report(3, {"nelbo": 90.0}) is True  # a stable report after the stop does not undo it
    assert inner_calls == [1]
    said = cause()
    assert said is not None and "non-finite NELBO" in said and "at step 2" in said


def test_a_replays_summary_counts_by_hand() -> None:
    runs = [
        ReplayedRun(0, "diverged", 10, 10),  # stopped where it broke by itself: not earlier
        ReplayedRun(1, "exploded", 10, 4),
        ReplayedRun(2, "completed", 10, 5),  # a false stop
        ReplayedRun(3, "completed", 10, None),
    ]
    summary = PrunerReplay("x", runs).summary()
    assert summary["runs"] == 4 and summary["stopped"] == 3
    assert summary["total_steps"] == 40 and summary["saved_steps"] == 0 + 6 + 5
    assert summary["saved_fraction"] == pytest.approx(11 / 40)
    assert summary["false_stops"] == 1 and summary["false_stop_trials"] == [2]
    assert (summary["broken_runs"], summary["broken_stopped"], summary["broken_stopped_earlier"]) == (2, 2, 1)


def test_the_median_replay_uses_the_spaces_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A completed run whose NELBO falls 10, 9, 8, 7, 6, then one stuck at 9.5: with interval 3 the median pruner
    judges it at steps 1 (9.5 < 10) and 3 (9.5 > 8), not at step 2 (9.5 > 9)."""
    space = make(tmp_path, pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0, "interval_steps": 3})
    falling = [{"step": s, "nelbo": 11.0 - s} for s in range(1, 6)]
    stuck = [{"step": s, "nelbo": 9.5} for s in range(1, 6)]
    rows = [falling, stuck]
    runs = [(0, "completed", 5, rows[0]), (1, "completed", 5, rows[1])]
    monkeypatch.setattr(instability_module, "_finished_runs", lambda study_dir: (space, runs))
    (median,) = replay_pruners(tmp_path, ["median"])
    assert [r["stop_step"] for r in median["per_run"]] == [None, 3]


# ------------------------------------------------------------------------------------- the Ray searcher
def final(status: str, objective: list[float] | None = None, **extra: Any) -> dict[str, Any]:
    return {"final": 1, "step": 10, METRIC: 50.0, "outcome": {"status": status}, "objective": objective, **extra}


@pytest.mark.parametrize(
    ("result", "state", "values", "status"),
    [
        (final("completed", [3.0]), TrialState.COMPLETE, 3.0, "completed"),
        (final("spiky", [3.0, 7.0]), TrialState.COMPLETE, [3.0, 7.0], "spiky"),
        (final("completed", [float("inf")]), TrialState.FAIL, None, "diverged"),
        (final("completed", [3.0, float("nan")]), TrialState.FAIL, None, "diverged"),
        (final("exploded"), TrialState.FAIL, None, "exploded"),
        (final("diverged"), TrialState.FAIL, None, "diverged"),
        (final("completed", [3.0], diverged=True), TrialState.FAIL, None, "diverged"),
        (final("stopped"), TrialState.PRUNED, None, "pruned"),
        (final("invalid", invalid=True), TrialState.PRUNED, None, "invalid"),
        (final("over_memory", invalid=True), TrialState.PRUNED, None, "over_memory"),
    ],
)
def test_a_final_ray_result_becomes_the_optuna_state_and_status(
    result: dict[str, Any], state: TrialState, values: Any, status: str
) -> None:
    got_state, got_values, attrs = decide(result, False, {})
    assert (got_state, got_values, attrs["status"]) == (state, values, status)


def test_an_infinite_objective_says_why_the_trial_failed() -> None:
    _state, _values, attrs = decide(final("completed", [float("inf")]), False, {})
    assert attrs["cause"] == "no finite objective at the end of the run"


def test_the_training_nelbo_attribute_comes_from_reports_not_from_the_final_placeholder() -> None:
    _state, _values, attrs = decide(final("invalid", invalid=True, **{METRIC: PLACEHOLDER}), False, {})
    assert attrs["train_nelbo"] is None
    state, _values, attrs = decide({"step": 8, METRIC: 4.0}, False, {})  # stopped by ASHA after this report
    assert (state, attrs["train_nelbo"], attrs["steps"]) == (TrialState.PRUNED, 4.0, 8)


def bridge(tmp_path: Path, **sections: Any) -> StudyBridge:
    space = make(tmp_path, {LR: {"type": "float", "low": 1e-3, "high": 1e-2}}, pruner={"type": "none"}, **sections)
    return StudyBridge(space, f"journal:{tmp_path / 'study.journal'}")


def stored(b: StudyBridge) -> list[optuna.trial.FrozenTrial]:
    """The trials as another process reads them from the study's journal."""
    return optuna.load_study(study_name=b.space.study.name, storage=open_storage(b.url)).trials


def test_the_placeholder_value_is_never_an_intermediate_value(tmp_path: Path) -> None:
    b = bridge(tmp_path)
    b.suggest("a")
    b.on_trial_result("a", {METRIC: PLACEHOLDER, "step": 1})
    b.on_trial_result("a", {METRIC: 0.99 * PLACEHOLDER, "step": 2})
    assert stored(b)[0].intermediate_values == {2: 0.99 * PLACEHOLDER}


def test_a_restarted_trial_re_reporting_a_step_keeps_the_first_value_also_after_a_restore(tmp_path: Path) -> None:
    b = bridge(tmp_path)
    b.suggest("a")
    b.on_trial_result("a", {METRIC: 4.0, "step": 4})
    b.on_trial_result("a", {METRIC: 9.0, "step": 4})
    b.on_trial_result("a", {METRIC: 8.0, "step": 3})
    assert stored(b)[0].intermediate_values == {4: 4.0}
    b.save(str(tmp_path / "searcher-state"))
    restored = StudyBridge(b.space, b.url)
    restored.restore(str(tmp_path / "searcher-state"))
    restored.on_trial_result("a", {METRIC: 7.0, "step": 4})
    restored.on_trial_result("a", {METRIC: 6.0, "step": 5})
    assert stored(restored)[0].intermediate_values == {4: 4.0, 5: 6.0}


def test_a_pareto_study_gets_no_intermediate_values(tmp_path: Path) -> None:
    b = bridge(tmp_path, study={"objectives": TWO_OBJECTIVES})
    b.suggest("a")
    b.on_trial_result("a", {METRIC: 4.0, "step": 4})
    assert stored(b)[0].intermediate_values == {}


def test_a_result_after_the_trial_completed_is_ignored(tmp_path: Path) -> None:
    b = bridge(tmp_path)
    b.suggest("a")
    b.on_trial_result("a", {METRIC: 4.0, "step": 4})
    b.on_trial_complete("a", final("completed", [3.0]))
    b.on_trial_result("a", {METRIC: 2.0, "step": 9})  # Tune delivering a late result
    (trial,) = stored(b)
    assert (trial.state, trial.value, trial.intermediate_values) == (TrialState.COMPLETE, 3.0, {4: 4.0})


# ----------------------------------------------------------------------------------------------- repeats
class Training:
    """Stands in for ``run_trial``: records each run's seed, resume flag and the files of its directory, and
    answers a status per seed (or raises the exception given for it)."""

    def __init__(self, answers: dict[int, str | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[int, bool, list[str] | None]] = []

    def __call__(self, space: Space, values: dict[str, Any], run_dir: Path, resume: bool = False) -> Any:
        seed = values["train.seed"]
        files = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else None
        self.calls.append((seed, resume, files))
        answer = self.answers.get(seed, "completed")
        if isinstance(answer, Exception):
            raise answer
        run_dir.mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(status=answer)


def repeat_study(tmp_path: Path, seeds: list[int]) -> tuple[Path, Callable[[int], Path], Callable[[float], None]]:
    """A study with one completed trial at lr 0.01 (never trained here) whose configuration the space repeats on
    ``seeds``; returns its folder, the run directory of the repeat on a seed, and a function adding another
    completed trial at a learning rate."""
    space = make(
        tmp_path, {LR: {"type": "categorical", "choices": [0.003, 0.01]}}, repeats={"top_k": 1, "seeds": seeds}
    )
    study_dir = tmp_path / "runs" / "values"
    url = storage_url(space, study_dir, None)
    write_study_file(space, study_dir, url, "optuna")
    study = create_study(space, url)

    def add_trial(lr: float) -> None:
        values = {LR: lr}
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                value=150.0 + 1000 * lr,
                params=values,
                distributions={LR: CategoricalDistribution([0.003, 0.01])},
                user_attrs={"status": "completed", "config_id": config_id(values), "values": json.dumps(values)},
            )
        )

    add_trial(0.01)
    return study_dir, lambda seed: study_dir / "repeats" / config_id({LR: 0.01}) / f"seed_{seed}", add_trial


def test_a_repeat_cut_off_before_its_checkpoint_restarts_in_an_empty_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_dir, run_dir, _add_trial = repeat_study(tmp_path, [6, 7])
    run_dir(6).mkdir(parents=True)
    (run_dir(6) / "metrics.jsonl").write_text('{"step": 1}\n')  # killed before its first checkpoint
    run_dir(7).mkdir(parents=True)
    for name in ("checkpoint.pt", "metrics.jsonl", "repeat_error.json"):  # stopped, after an earlier attempt raised
        (run_dir(7) / name).write_text("x")
    training = Training({})
    monkeypatch.setattr(repeats_module, "run_trial", training)
    result = repeats_module.run_repeats(study_dir)
    assert training.calls == [(6, False, None), (7, True, ["checkpoint.pt", "metrics.jsonl"])]
    assert [(job.seed, status) for job, status in result.ran] == [(6, "completed"), (7, "completed")]
    assert not (run_dir(7) / "repeat_error.json").exists()


def test_a_repeat_stopped_by_a_signal_ends_the_repeat_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study_dir, _run_dir, _add = repeat_study(tmp_path, [6, 7])
    training = Training({6: "stopped"})
    monkeypatch.setattr(repeats_module, "run_trial", training)
    result = repeats_module.run_repeats(study_dir)
    assert [seed for seed, _resume, _files in training.calls] == [6]
    assert [(job.seed, status) for job, status in result.ran] == [(6, "stopped")]


def test_a_repeat_that_raises_is_recorded_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_dir, run_dir, _add_trial = repeat_study(tmp_path, [6, 7, 8])
    training = Training({6: RuntimeError("boom"), 7: InvalidCombination("depth 9 is odd")})
    monkeypatch.setattr(repeats_module, "run_trial", training)
    result = repeats_module.run_repeats(study_dir)
    assert [seed for seed, _resume, _files in training.calls] == [6, 7, 8]
    assert [(job.seed, error) for job, error in result.failed] == [(6, "RuntimeError: boom"), (7, "depth 9 is odd")]
    assert [(job.seed, status) for job, status in result.ran] == [(8, "completed")]
    assert json.loads((run_dir(6) / "repeat_error.json").read_text()) == {
        "status": "failed",
        "error": "RuntimeError: boom",
    }
    assert json.loads((run_dir(7) / "repeat_error.json").read_text()) == {
        "status": "invalid",
        "error": "depth 9 is odd",
    }


# ------------------------------------------------------------------------------------------------ report
def test_the_importances_count_only_the_studys_own_completed_trials(tmp_path: Path) -> None:
    """Repeat runs are leaderboard rows but not trials of the study: one completed trial and two finished repeats
    of it still make too few trials for importances; two completed trials (and their repeats) count as two."""
    from test_report import fake_summary

    study_dir, run_dir, add_trial = repeat_study(tmp_path, [7, 8])
    for seed, nelbo in ((7, 151.0), (8, 152.0)):
        run_dir(seed).mkdir(parents=True)
        (run_dir(seed) / "summary.json").write_text(json.dumps(fake_summary(run_dir(seed), nelbo)))
    quiet = Console(file=io.StringIO(), width=200, color_system=None)
    one = build_report(study_dir, console=quiet)
    assert sum(1 for r in one.rows if r["source"] == "repeat") == 2
    assert "importances skipped: needs at least 2 completed trials, the study has 1" in one.notes
    assert json.loads((study_dir / "report" / "importances.json").read_text())["completed_trials"] == 1

    add_trial(0.003)
    two = build_report(study_dir, console=quiet)
    assert json.loads((study_dir / "report" / "importances.json").read_text())["completed_trials"] == 2
    assert set(two.importances["nelbo"]) == {LR}
