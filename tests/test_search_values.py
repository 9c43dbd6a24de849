"""Values of the search helpers, computed here by hand: the leaderboard order and best configurations for minimised
and maximised objectives, the stability numbers per configuration (divergence rate over finished seeds, median
divergence step, sample std, the configurations' order), which seed repeats are planned, which checkpoints are
kept, the memory limit at its boundary, the seed aggregates, and how a space's specs are sampled into recipe values.

Every test builds its inputs by hand (runs, summaries, fake suggesters): nothing is trained, and each assertion is
a value the documented rule gives (docs/spaces.md, docs/stability.md, README.md), not one read back from the code.
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from nvae_search.search.compile import make_define_by_run, resolve_flat_params
from nvae_search.search.constraints import GIB, OverMemory, check_memory_constraint
from nvae_search.search.report import build_report
from nvae_search.search.report_rows import Run, best_configs, config_table, plan_repeats, sort_key
from nvae_search.search.retention import kept_trials
from nvae_search.search.runner import create_study, storage_url, write_study_file
from nvae_search.search.seeds import aggregate, combine, seeds_of
from nvae_search.search.trial import TrialOutcome
from nvae_search.spaces import Space, budget_overrides, grid_values, load_space
from nvae_search.status import TrialStatus

TINY = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"
LR = "train.learning_rate"

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------------------------------------ helpers
def run(
    trial: int | None,
    status: TrialStatus,
    value: float | None,
    *,
    config: str = "a",
    seed: int = 0,
    attrs: dict[str, Any] | None = None,
    source: str = "study",
) -> Run:
    """One leaderboard row made by hand."""
    return Run(
        trial=trial,
        source=source,
        state="COMPLETE",
        status=status,
        objectives=[value],
        params={LR: {"a": 0.01, "b": 0.001, "c": 0.1}.get(config, 0.5)},
        attrs=dict(attrs or {}),
        values={LR: 0.01},
        config=config,
        seed=seed,
    )


def space_file(tmp_path: Path, extra: dict[str, Any], tree: dict[str, Any] | None = None) -> Space:
    doc: dict[str, Any] = {
        "base_recipe": str(TINY),
        "study": {"name": "values", "n_trials": 4, "objectives": [{"metric": "nelbo", "direction": "minimize"}]},
        "budget": {"steps": 10},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "space": tree or {LR: {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        **extra,
    }
    path = tmp_path / "space.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_space(path)


# --------------------------------------------------------------------------------------------- leaderboard
@pytest.mark.parametrize(("direction", "expected"), [("minimize", [1, 2, 0]), ("maximize", [0, 2, 1])])
def test_leaderboard_puts_the_best_value_first_for_the_objective_direction(direction: str, expected: list[int]) -> None:
    rows = [
        run(0, TrialStatus.COMPLETED, 3.0),
        run(1, TrialStatus.COMPLETED, 1.0),
        run(2, TrialStatus.COMPLETED, 2.0),
        run(3, TrialStatus.DIVERGED, None),
    ]
    ordered = [r.trial for r in sorted(rows, key=sort_key(direction))]
    assert ordered == [*expected, 3]  # a run without a value comes after every valued run


def test_collapsed_and_spiky_runs_rank_by_their_value_among_completed_runs() -> None:
    rows = [
        run(0, TrialStatus.COMPLETED, 5.0),
        run(1, TrialStatus.COLLAPSED, 1.0),
        run(2, TrialStatus.SPIKY, 3.0),
        run(3, TrialStatus.PRUNED, 0.5),  # a pruned run's intermediate value never ranks it
    ]
    assert [r.trial for r in sorted(rows, key=sort_key("minimize"))] == [1, 2, 0, 3]


def test_best_configs_gives_each_configurations_best_trial_and_only_the_top_k() -> None:
    rows = [
        run(0, TrialStatus.COMPLETED, 4.0, config="a"),
        run(1, TrialStatus.COMPLETED, 2.0, config="a"),  # config a's best trial
        run(2, TrialStatus.COMPLETED, 3.0, config="b"),
        run(3, TrialStatus.SPIKY, 1.0, config="c"),  # a spiky run keeps its value: c is the best configuration
        run(4, TrialStatus.DIVERGED, None, config="d"),
    ]
    best = best_configs(rows, 2, "minimize")
    assert [(r.config, r.trial) for r in best] == [("c", 3), ("a", 1)]
    assert [(r.config, r.trial) for r in best_configs(rows, 5, "maximize")] == [("a", 0), ("b", 2), ("c", 3)]


def test_repeats_are_planned_only_for_the_seeds_the_study_lacks(tmp_path: Path) -> None:
    space = space_file(tmp_path, {"repeats": {"top_k": 1, "seeds": [0, 1, 2]}})
    rows = [
        run(0, TrialStatus.COMPLETED, 1.0, config="a", seed=0),
        run(1, TrialStatus.PRUNED, 7.0, config="a", seed=1),  # a pruned run on seed 1 counts as a run of it
        run(2, TrialStatus.COMPLETED, 5.0, config="b", seed=0),
    ]
    notes: list[str] = []
    plan = plan_repeats(tmp_path / "study", space, rows, notes)
    assert plan.done == [] and notes == []
    assert [(job.config, job.trial, job.seed) for job in plan.missing] == [("a", 0, 2)]
    assert plan.missing[0].values["train.seed"] == 2


# ------------------------------------------------------------------------------------------ configurations
def stability_rows() -> list[Run]:
    """Config a: 3 completed, 1 diverged at step 100, 2 exploded at steps 200 and 900, 1 pruned, 1 failed.
    Config b: 2 completed. Config c: one run only (no stability row)."""
    return [
        run(0, TrialStatus.COMPLETED, 10.0, config="a", seed=0, attrs={"grad_norm_max": 2.0, "loss_spikes": 1}),
        run(1, TrialStatus.COMPLETED, 12.0, config="a", seed=1, attrs={"grad_norm_max": 4.0, "loss_spikes": 0}),
        run(2, TrialStatus.COLLAPSED, 17.0, config="a", seed=2),
        run(3, TrialStatus.DIVERGED, None, config="a", seed=3, attrs={"diverged_step": 100}),
        run(4, TrialStatus.EXPLODED, None, config="a", seed=4, attrs={"diverged_step": 200}),
        run(5, TrialStatus.EXPLODED, None, config="a", seed=5, attrs={"diverged_step": 900}),
        run(6, TrialStatus.PRUNED, 30.0, config="a", seed=6),
        run(7, TrialStatus.FAILED, None, config="a", seed=7),
        run(8, TrialStatus.COMPLETED, 20.0, config="b", seed=0),
        run(9, TrialStatus.COMPLETED, 22.0, config="b", seed=1),
        run(10, TrialStatus.COMPLETED, 1.0, config="c", seed=0),
    ]


def test_stability_counts_rates_over_finished_seeds_and_the_median_divergence_step() -> None:
    configs = {c["config_id"]: c for c in config_table(stability_rows(), "minimize", {})}
    assert set(configs) == {"a", "b"}  # c has a single run: nothing to say about its stability
    a = configs["a"]
    assert (a["runs"], a["completed"], a["pruned"], a["failed"]) == (8, 3, 1, 1)
    assert (a["diverged"], a["exploded"], a["collapsed"], a["finished"]) == (3, 2, 1, 6)
    assert a["divergence_rate"] == pytest.approx(3 / 6)  # (diverged + exploded) / finished, pruned/failed aside
    assert a["median_divergence_step"] == 200
    assert a["mean"] == pytest.approx(13.0)
    assert a["std"] == pytest.approx(statistics.stdev([10.0, 12.0, 17.0]))  # sample std (n - 1)
    assert a["std"] == pytest.approx(3.605551, rel=1e-6)
    assert (a["min"], a["max"]) == (10.0, 17.0)
    assert a["grad_norm_max_mean"] == pytest.approx(3.0)
    assert a["loss_spikes_mean"] == pytest.approx(0.5)
    assert configs["b"]["divergence_rate"] == 0.0


@pytest.mark.parametrize(("direction", "expected"), [("minimize", ["a", "b"]), ("maximize", ["b", "a"])])
def test_stability_table_lists_the_best_mean_first(direction: str, expected: list[str]) -> None:
    assert [c["config_id"] for c in config_table(stability_rows(), direction, {})] == expected


def test_configurations_with_equal_means_list_the_lower_divergence_rate_first() -> None:
    rows = [
        run(0, TrialStatus.COMPLETED, 5.0, config="a", seed=0),
        run(1, TrialStatus.DIVERGED, None, config="a", seed=1),
        run(2, TrialStatus.COMPLETED, 5.0, config="b", seed=0),
        run(3, TrialStatus.COMPLETED, 5.0, config="b", seed=1),
    ]
    assert [c["config_id"] for c in config_table(rows, "minimize", {})] == ["b", "a"]


def test_the_written_leaderboard_of_a_maximised_study_ranks_the_highest_value_first(tmp_path: Path) -> None:
    objectives = [{"metric": "nelbo", "direction": "maximize"}]
    space = space_file(tmp_path, {"study": {"name": "v", "n_trials": 4, "objectives": objectives}})
    study_dir = tmp_path / "runs" / "v"
    url = storage_url(space, study_dir, None)
    write_study_file(space, study_dir, url, "optuna")
    study = create_study(space, url)
    for value, lr in ((1.0, 0.001), (3.0, 0.01), (2.0, 0.05)):
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                value=value,
                params={LR: lr},
                distributions={LR: FloatDistribution(1e-4, 1e-1, log=True)},
            )
        )
    report = build_report(study_dir, console=Console(file=io.StringIO(), width=200))
    assert [(row["rank"], row["trial"]) for row in report.rows] == [(1, 1), (2, 2), (3, 0)]


# -------------------------------------------------------------------------------------------- retention
def study_with_values(tmp_path: Path, space: Space, values: list[float]) -> optuna.Study:
    (tmp_path / "study").mkdir()
    study = create_study(space, storage_url(space, tmp_path / "study", None))
    for value in values:
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                value=value,
                params={LR: 0.01},
                distributions={LR: FloatDistribution(1e-4, 1e-1, log=True)},
            )
        )
    return study


@pytest.mark.parametrize(("direction", "kept"), [("minimize", {1, 3}), ("maximize", {0, 2})])
def test_best_policy_keeps_exactly_keep_top_k_checkpoints(tmp_path: Path, direction: str, kept: set[int]) -> None:
    space = space_file(
        tmp_path,
        {
            "study": {"name": "v", "n_trials": 4, "objectives": [{"metric": "nelbo", "direction": direction}]},
            "budget": {"steps": 10, "keep_checkpoints": "best", "keep_top_k": 2},
        },
    )
    study = study_with_values(tmp_path, space, [9.0, 1.0, 7.0, 2.0])
    assert kept_trials(study, space) == kept


# ---------------------------------------------------------------------------------------------- memory
def test_a_prediction_exactly_at_the_memory_limit_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    import nvae_search.memory

    peak = {"bytes": 2 * GIB}
    prediction = SimpleNamespace(
        peak_bytes=0, peak_gib=0.0, batch=4, precision="fp32", checkpointing=False, to_dict=lambda: {}
    )

    def predict(recipe: Any, device: str, batch: int) -> SimpleNamespace:
        prediction.peak_bytes = peak["bytes"]
        prediction.peak_gib = peak["bytes"] / GIB
        return prediction

    monkeypatch.setattr(nvae_search.memory, "predict_step_memory", predict)
    space: Any = SimpleNamespace(constraints=SimpleNamespace(gpu_memory_gib=2.0))
    recipe: Any = SimpleNamespace(train=SimpleNamespace(per_process_batch=lambda workers: 4))
    assert check_memory_constraint(space, recipe) is prediction  # "more than" the limit is pruned, not equal
    peak["bytes"] = 2 * GIB + 1
    with pytest.raises(OverMemory):
        check_memory_constraint(space, recipe)


# ----------------------------------------------------------------------------------------------- seeds
def test_seed_aggregates_follow_the_documented_rules() -> None:
    values = [1.0, 2.0, 6.0]  # mean 3, sample std sqrt(7)
    assert aggregate(values, "worst", 1.0, "minimize") == 6.0
    assert aggregate(values, "worst", 1.0, "maximize") == 1.0
    assert aggregate(values, "mean_plus_std", 2.0, "minimize") == pytest.approx(3.0 + 2.0 * 7**0.5)
    assert aggregate(values, "mean_plus_std", 2.0, "maximize") == pytest.approx(3.0 - 2.0 * 7**0.5)


def aggregate_space(tmp_path: Path) -> Space:
    agg = {"seeds": 3, "how": "mean"}
    objectives = [{"metric": "nelbo", "direction": "minimize"}]
    return space_file(tmp_path, {"study": {"name": "v", "n_trials": 4, "objectives": objectives, "aggregate": agg}})


def test_a_trial_trains_its_own_seed_and_the_next_ones(tmp_path: Path) -> None:
    assert seeds_of(aggregate_space(tmp_path), {"train.seed": 7}) == [7, 8, 9]


def seed_outcome(status: TrialStatus, value: float, spikes: int, grad: float) -> TrialOutcome:
    return TrialOutcome(
        status=status, cause=f"{status} cause", steps=10, loss_spikes=spikes, grad_norm_max=grad, values=[value]
    )


@pytest.mark.parametrize(
    ("third", "status", "cause"),
    [
        (TrialStatus.COMPLETED, TrialStatus.SPIKY, "seed 8: spiky cause"),
        (TrialStatus.COLLAPSED, TrialStatus.COLLAPSED, "seed 9: collapsed cause"),  # collapsed outranks spiky
    ],
)
def test_a_trial_is_spiky_or_collapsed_when_one_of_its_seeds_is(
    tmp_path: Path, third: TrialStatus, status: TrialStatus, cause: str
) -> None:
    done = [
        (7, seed_outcome(TrialStatus.COMPLETED, 10.0, 1, 2.0)),
        (8, seed_outcome(TrialStatus.SPIKY, 12.0, 9, 5.0)),
        (9, seed_outcome(third, 17.0, 0, 3.0)),
    ]
    out = combine(aggregate_space(tmp_path), {"train.seed": 7}, tmp_path / "trial", done)
    assert (out.status, out.cause) == (status, cause)
    assert out.values == [pytest.approx(13.0)]  # mean over the seeds
    assert (out.steps, out.loss_spikes, out.grad_norm_max) == (30, 10, 5.0)  # sums, and the maximum


# ------------------------------------------------------------------------------------------------ spaces
class Recorder:
    """A suggester that records each call and answers a chosen value (else the low bound / first choice)."""

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        self.answers = answers or {}
        self.calls: dict[str, dict[str, Any]] = {}

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False) -> Any:
        self.calls[name] = {"low": low, "high": high, "step": step, "log": log}
        return self.answers.get(name, low)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> Any:
        self.calls[name] = {"low": low, "high": high, "step": step, "log": log}
        return self.answers.get(name, low)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        self.calls[name] = {"choices": list(choices)}
        return self.answers.get(name, next(iter(choices)))


TREE: dict[str, Any] = {
    LR: {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "train.batch_size": {"type": "int", "low": 8, "high": 32, "step": 8},
    "model.ada_groups": {"type": "fixed", "value": False},
    "model.num_latent_scales": {"type": "int", "low": 2, "high": 4},
    "model.num_groups_per_scale": {
        "type": "per_scale",
        "count": "model.num_latent_scales",
        "each": {"type": "int", "low": 2, "high": 20, "step": 2},
    },
}


def test_space_specs_pass_their_range_step_and_log_scale_to_the_sampler(tmp_path: Path) -> None:
    space = space_file(tmp_path, {}, TREE)
    recorder = Recorder({"model.num_latent_scales": 3})
    values = make_define_by_run(space)(recorder)  # type: ignore[arg-type]
    assert recorder.calls[LR] == {"low": 1e-4, "high": 1e-2, "step": None, "log": True}
    assert recorder.calls["train.batch_size"] == {"low": 8, "high": 32, "step": 8, "log": False}
    # a per-scale spec samples as many values as the count sampled before it
    assert [n for n in recorder.calls if n.startswith("model.num_groups_per_scale.")] == [
        "model.num_groups_per_scale.0",
        "model.num_groups_per_scale.1",
        "model.num_groups_per_scale.2",
    ]
    assert recorder.calls["model.num_groups_per_scale.0"] == {"low": 2, "high": 20, "step": 2, "log": False}
    assert values["model.num_groups_per_scale"] == [2, 2, 2]
    assert values["model.ada_groups"] is False
    flat = {LR: 1e-3, "train.batch_size": 16, "model.num_latent_scales": 2}
    flat |= {"model.num_groups_per_scale.0": 4, "model.num_groups_per_scale.1": 6}
    assert resolve_flat_params(space, flat)["model.num_groups_per_scale"] == [4, 6]


def test_grid_values_include_both_bounds(tmp_path: Path) -> None:
    tree = {
        "train.batch_size": {"type": "int", "low": 8, "high": 32, "step": 8},
        LR: {"type": "float", "low": 0.001, "high": 0.003, "step": 0.001},
    }
    space = space_file(tmp_path, {"sampler": {"type": "grid"}}, tree)
    grid = grid_values(space)
    assert grid["train.batch_size"] == [8, 16, 24, 32]
    assert grid[LR] == pytest.approx([0.001, 0.002, 0.003])
    spec = space.space["train.batch_size"]
    assert spec.contains(32) and spec.contains(8) and not spec.contains(40) and not spec.contains(12)


@pytest.mark.parametrize("metric", ["nelbo", "nll"])
def test_likelihood_objectives_turn_on_the_end_of_run_evaluation(tmp_path: Path, metric: str) -> None:
    space = space_file(
        tmp_path,
        {"study": {"name": "v", "n_trials": 4, "objectives": [{"metric": metric, "direction": "minimize"}]}},
    )
    assert budget_overrides(space)["train.eval_at_end"] is True
