"""The study report: leaderboard, per-configuration stability, importances, plots and the seed repeats it reads.

Most studies here are built without training: a journal study with hand-made trials that carry the outcome user
attributes the runner writes. One end-to-end test trains two tiny trials and reports on them.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from nvae_search.search.report import Report, build_report
from nvae_search.search.report_rows import fmt_count, fmt_num, short_names
from nvae_search.search.runner import create_study, run_optuna_search, storage_url, write_study_file
from nvae_search.search.trial import OUTCOME_KEYS, config_id
from nvae_search.spaces import Space, load_space

TINY = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LR = CategoricalDistribution([0.001, 0.01, 0.1])
SEED = CategoricalDistribution([1, 2, 3])

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ------------------------------------------------------------------------------------------------ helpers
def write_space(
    tmp_path: Path,
    name: str,
    space: dict[str, Any],
    *,
    objectives: list[dict[str, str]] | None = None,
    repeats: dict[str, Any] | None = None,
    steps: int = 10,
) -> Space:
    doc: dict[str, Any] = {
        "base_recipe": str(TINY),
        "study": {
            "name": name,
            "n_trials": 4,
            "seed": 0,
            "objectives": objectives or [{"metric": "nelbo", "direction": "minimize"}],
        },
        "budget": {"steps": steps, "eval_iw_samples": 2, "eval_images": 32, "report_every_steps": 5},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "space": space,
    }
    if repeats:
        doc["repeats"] = repeats
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_space(path)


def make_study(tmp_path: Path, space: Space) -> tuple[Path, optuna.Study]:
    """An empty study directory laid out as the runner does (study.json, space.yaml, journal)."""
    study_dir = tmp_path / "runs" / space.study.name
    url = storage_url(space, study_dir, None)
    write_study_file(space, study_dir, url, "optuna")
    return study_dir, create_study(space, url)


def outcome(
    status: str,
    values: dict[str, Any],
    *,
    nelbo: float | None = None,
    grad: Any = 100.0,
    spikes: int = 0,
    diverged_step: int | None = None,
    params: int = 28_000,
    active: int = 3,
) -> dict[str, Any]:
    """The user attributes of one trial, as runner.outcome_from_summary writes them."""
    attrs = dict.fromkeys(OUTCOME_KEYS)
    attrs.update(
        status=status,
        diverged_step=diverged_step,
        steps=10,
        grad_norm_max=grad,
        grad_norm_mean=10.0,
        loss_spikes=spikes,
        skipped_steps=0,
        active_groups=active,
        num_groups=3,
        params=params,
        eval_nelbo=nelbo,
        unit="nats",
        config_id=config_id(values),
        seed=values.get("train.seed"),
        values=json.dumps(values),
    )
    if status == "diverged":
        attrs["cause"] = "non-finite loss"
    return attrs


def add(
    study: optuna.Study,
    state: TrialState,
    params: dict[str, Any],
    attrs: dict[str, Any],
    distributions: dict[str, Any],
    value: Any = None,
    intermediate: dict[int, float] | None = None,
) -> None:
    kwargs: dict[str, Any] = {"values": value} if isinstance(value, list) else {"value": value}
    study.add_trial(
        create_trial(
            state=state,
            params=params,
            distributions=distributions,
            user_attrs=attrs,
            intermediate_values=intermediate,
            **kwargs,
        )
    )


def lr_seed_trial(study: optuna.Study, state: TrialState, lr: float, seed: int, status: str, **kw: Any) -> None:
    values = {"train.learning_rate": lr, "train.seed": seed}
    value = kw.pop("value", None)
    intermediate = kw.pop("intermediate", None)
    attrs = outcome(status, values, nelbo=value if state == TrialState.COMPLETE else None, **kw)
    add(
        study,
        state,
        {"train.learning_rate": lr, "train.seed": seed},
        attrs,
        {"train.learning_rate": LR, "train.seed": SEED},
        value,
        intermediate,
    )


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200, color_system=None)


def printed(console: Console) -> str:
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, (path, len(data))


LR_SEED_SPACE = {
    "train.learning_rate": {"type": "categorical", "choices": [0.001, 0.01, 0.1]},
    "train.seed": {"type": "categorical", "choices": [1, 2, 3]},
}


@pytest.fixture
def mixed_study(tmp_path: Path) -> Path:
    """Nine trials over three learning rates × seeds: completed, diverged, pruned, invalid and interrupted."""
    space = write_space(tmp_path, "mixed", LR_SEED_SPACE)
    study_dir, study = make_study(tmp_path, space)
    C, F, P = TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED
    lr_seed_trial(study, C, 0.001, 1, "completed", value=100.0, grad=10.0, spikes=0)  # 0
    lr_seed_trial(study, C, 0.001, 2, "completed", value=104.0, grad=30.0, spikes=2)  # 1
    lr_seed_trial(study, C, 0.01, 1, "completed", value=90.0, grad=50.0, spikes=1)  # 2
    lr_seed_trial(study, F, 0.01, 2, "diverged", grad="inf", spikes=3, diverged_step=5)  # 3
    lr_seed_trial(study, C, 0.01, 3, "completed", value=94.0, grad=70.0, spikes=0)  # 4
    lr_seed_trial(study, F, 0.1, 1, "diverged", grad=1.0e5, spikes=4, diverged_step=2)  # 5
    lr_seed_trial(study, P, 0.1, 2, "pruned", value=150.0, intermediate={5: 150.0}, grad=200.0, spikes=0)  # 6
    interrupted = {"status": "interrupted", "interrupted": True, "run_dir": "x"}
    add(
        study,
        F,
        {"train.learning_rate": 0.001, "train.seed": 3},
        interrupted,
        {"train.learning_rate": LR, "train.seed": SEED},
    )  # 7
    add(
        study,
        P,
        {"train.learning_rate": 0.1, "train.seed": 3},
        {"status": "invalid", "cause": "bad combination"},
        {"train.learning_rate": LR, "train.seed": SEED},
    )  # 8
    return study_dir


# ------------------------------------------------------------------------------------------------- tests
def test_formatting_helpers_keep_numbers_short() -> None:
    assert fmt_num(1234.5) == "1.23e+03"
    assert fmt_num(0.0123456) == "0.0123"
    assert fmt_num(12) == "12"
    assert fmt_num("inf") == "inf"
    assert fmt_num(None) == "–"
    # a column of measurements: the same digits in every row, trailing zeros kept, never cut to an integer
    assert [fmt_num(v, 4, measured=True) for v in (252.0, 241.56, 85.0, 1234.0)] == ["252.0", "241.6", "85.00", "1234"]
    assert fmt_count(27_998) == "28k"
    assert fmt_count(1_234_567) == "1.23M"
    names = short_names(["train.learning_rate", "model.loss.spectral_coeff", "a.x.seed", "b.x.seed"])
    assert names == {
        "train.learning_rate": "train.learning_rate",
        "model.loss.spectral_coeff": "loss.spectral_coeff",
        "a.x.seed": "a.x.seed",
        "b.x.seed": "b.x.seed",
    }


def test_leaderboard_order_statuses_and_files(mixed_study: Path) -> None:
    console = quiet()
    result = build_report(mixed_study, console=console)
    assert isinstance(result, Report)
    assert [r["trial"] for r in result.rows] == [2, 4, 0, 1, 6, 3, 5, 8, 7]
    assert [r["status"] for r in result.rows] == ["completed"] * 4 + [
        "pruned",
        "diverged",
        "diverged",
        "invalid",
        "interrupted",
    ]
    assert [r["rank"] for r in result.rows] == list(range(1, 10))
    first = result.rows[0]
    assert first["objectives"] == {"nelbo": 90.0}
    assert first["search_params"] == {"train.learning_rate": 0.01, "train.seed": 1}
    assert set(OUTCOME_KEYS) <= set(first)
    assert first["values"] == {"train.learning_rate": 0.01, "train.seed": 1}
    assert result.rows[4]["objectives"] == {"nelbo": 150.0} and result.rows[4]["last_step"] == 5  # pruned
    assert result.rows[5]["grad_norm_max"] == "inf" and result.rows[5]["diverged_step"] == 5

    out = printed(console)
    assert "Leaderboard: mixed (9 trials)" in out
    assert "nelbo [nats] ↓" in out
    assert "1e+05" in out  # the big gradient norm, in short exponent form
    assert "150.0 @5" in out  # a pruned trial's last reported value (four digits, like the others) and its step
    assert "Report written to" in out and str(result.report_dir) in out

    report_dir = mixed_study / "report"
    assert result.report_dir == report_dir
    with (report_dir / "leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["2", "4", "0", "1", "6", "3", "5", "8", "7"]
    assert rows[0]["nelbo"] == "90.0" and rows[0]["param:train.learning_rate"] == "0.01"
    assert rows[0]["status"] == "completed" and rows[-1]["status"] == "interrupted"
    assert {"grad_norm_max", "loss_spikes", "config_id", "values", "unit"} <= set(rows[0])
    saved = json.loads((report_dir / "leaderboard.json").read_text())
    assert saved == result.rows
    for name in (
        "leaderboard.csv",
        "leaderboard.json",
        "configs.csv",
        "configs.json",
        "importances.json",
        "history.png",
        "params.png",
        "stability.png",
    ):
        assert result.files[name] == report_dir / name and (report_dir / name).is_file()
    assert "pareto.png" not in result.files and not (report_dir / "pareto.png").exists()


def test_configuration_table_numbers(mixed_study: Path) -> None:
    console = quiet()
    result = build_report(mixed_study, console=console)
    by_lr = {c["params"]["train.learning_rate"]: c for c in result.configs}
    assert [c["params"]["train.learning_rate"] for c in result.configs] == [0.01, 0.001, 0.1]  # by mean, None last

    mid = by_lr[0.01]  # trials 2, 3 (diverged), 4
    assert mid["config_id"] == config_id({"train.learning_rate": 0.01, "train.seed": 9})
    assert mid["runs"] == 3 and mid["completed"] == 2 and mid["diverged"] == 1
    assert mid["mean"] == pytest.approx(92.0)
    assert mid["std"] == pytest.approx(statistics.stdev([90.0, 94.0]))
    assert mid["divergence_rate"] == pytest.approx(1 / 3)
    assert mid["grad_norm_max_mean"] == pytest.approx(60.0)  # the non-finite norm of the diverged run is left out
    assert mid["loss_spikes_mean"] == pytest.approx(4 / 3)
    assert sorted(mid["trials"]) == [2, 3, 4]

    low = by_lr[0.001]  # trials 0, 1; the interrupted trial 7 is not a run
    assert low["runs"] == 2 and sorted(low["trials"]) == [0, 1]
    assert low["mean"] == pytest.approx(102.0) and low["divergence_rate"] == 0.0
    assert low["grad_norm_max_mean"] == pytest.approx(20.0) and low["loss_spikes_mean"] == pytest.approx(1.0)

    high = by_lr[0.1]  # trial 5 diverged, 6 pruned; the invalid trial 8 never trained
    assert high["runs"] == 2 and high["mean"] is None and high["std"] is None
    # the rate is over finished seeds: a pruned run says nothing about divergence
    assert high["divergence_rate"] == pytest.approx(1.0) and high["pruned"] == 1 and high["finished"] == 1
    assert high["label"] == "train.learning_rate=0.1"

    saved = json.loads((mixed_study / "report" / "configs.json").read_text())
    assert [c["config_id"] for c in saved] == [c["config_id"] for c in result.configs]
    with (mixed_study / "report" / "configs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["mean"]) == pytest.approx(92.0)
    assert float(rows[0]["divergence_rate"]) == pytest.approx(1 / 3)
    assert rows[2]["mean"] == ""

    out = printed(console)
    assert "Stability per configuration" in out
    assert "92.00 ± 2.83" in out and "1/3 (33%, 6%-79%)" in out and "no completed run" in out


def test_importances_and_plots_are_written(mixed_study: Path) -> None:
    result = build_report(mixed_study, console=quiet())
    saved = json.loads((mixed_study / "report" / "importances.json").read_text())
    assert saved["evaluator"] == "PedAnovaImportanceEvaluator"
    assert saved["skipped"] is None
    assert set(saved["importances"]["nelbo"]) == {"train.learning_rate", "train.seed"}
    assert saved["importances"] == result.importances
    assert sum(saved["importances"]["nelbo"].values()) == pytest.approx(1.0)
    for name in ("history.png", "params.png", "stability.png"):
        assert_png(mixed_study / "report" / name)
    assert not result.notes


def test_multi_objective_study_gets_a_pareto_plot_and_importances_per_objective(tmp_path: Path) -> None:
    objectives = [{"metric": "nelbo", "direction": "minimize"}, {"metric": "params", "direction": "minimize"}]
    tree = {
        "train.learning_rate": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True},
        "model.use_se": {"type": "categorical", "choices": [True, False]},
    }
    space = write_space(tmp_path, "pareto", tree, objectives=objectives)
    study_dir, study = make_study(tmp_path, space)
    dists = {
        "train.learning_rate": FloatDistribution(1e-3, 1e-1, log=True),
        "model.use_se": CategoricalDistribution([True, False]),
    }
    points = [
        (0.002, True, 120.0, 30_000),
        (0.01, False, 100.0, 40_000),
        (0.05, True, 110.0, 25_000),
        (0.03, False, 130.0, 45_000),
        (0.08, True, 105.0, 35_000),
    ]
    for lr, se, nelbo, size in points:
        values = {"train.learning_rate": lr, "model.use_se": se}
        add(
            study,
            TrialState.COMPLETE,
            values,
            outcome("completed", values, nelbo=nelbo, params=size),
            dists,
            [nelbo, float(size)],
        )
    values = {"train.learning_rate": 0.09, "model.use_se": False}
    add(study, TrialState.FAIL, values, outcome("diverged", values, diverged_step=3), dists)

    result = build_report(study_dir, console=quiet())
    assert [r["trial"] for r in result.rows] == [1, 4, 2, 0, 3, 5]  # by the first objective
    assert result.rows[0]["objectives"] == {"nelbo": 100.0, "params": 40_000.0}
    assert set(result.importances) == {"nelbo", "params"}
    for name in ("history.png", "params.png", "stability.png", "pareto.png"):
        assert_png(study_dir / "report" / name)
    assert {t.number for t in study.best_trials} == {1, 2, 4}


def test_all_diverged_study_still_reports(tmp_path: Path) -> None:
    space = write_space(tmp_path, "alldiv", LR_SEED_SPACE)
    study_dir, study = make_study(tmp_path, space)
    lr_seed_trial(study, TrialState.FAIL, 0.1, 1, "diverged", grad="inf", diverged_step=2, spikes=1)
    lr_seed_trial(study, TrialState.FAIL, 0.1, 2, "diverged", grad=5.0e4, diverged_step=3, spikes=0)
    lr_seed_trial(study, TrialState.FAIL, 0.01, 1, "diverged", grad=7.0e3, diverged_step=9, spikes=2)

    console = quiet()
    result = build_report(study_dir, console=console)  # repeats on, but there is no completed config to repeat
    assert [r["status"] for r in result.rows] == ["diverged"] * 3
    assert [r["trial"] for r in result.rows] == [0, 1, 2]
    assert len(result.configs) == 1
    only = result.configs[0]
    assert only["runs"] == 2 and only["divergence_rate"] == 1.0 and only["mean"] is None
    assert only["grad_norm_max_mean"] == pytest.approx(5.0e4)
    assert result.importances == {}
    assert any("importances skipped" in n for n in result.notes)
    assert "needs at least 2 completed trials" in printed(console)
    for name in ("history.png", "params.png", "stability.png"):
        assert_png(study_dir / "report" / name)
    assert json.loads((study_dir / "report" / "importances.json").read_text())["importances"] == {}


def test_a_narrow_console_gets_the_parameters_in_a_second_table(mixed_study: Path) -> None:
    console = Console(file=io.StringIO(), width=80, color_system=None)
    build_report(mixed_study, console=console)
    out = printed(console)
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "Searched parameters of the trials above" in out
    assert "train.learning_rate=0.01  train.seed=1" in out  # nothing squeezed away
    assert "completed" in out and "interrupted" in out


def test_an_empty_study_reports_without_crashing(tmp_path: Path) -> None:
    space = write_space(tmp_path, "empty", LR_SEED_SPACE)
    study_dir, _study = make_study(tmp_path, space)
    result = build_report(study_dir, console=quiet())
    assert result.rows == [] and result.configs == [] and result.importances == {}
    for name in ("history.png", "params.png", "stability.png"):
        assert_png(study_dir / "report" / name)


def test_no_varying_parameter_skips_importances(tmp_path: Path) -> None:
    space = write_space(tmp_path, "flat", LR_SEED_SPACE)
    study_dir, study = make_study(tmp_path, space)
    lr_seed_trial(study, TrialState.COMPLETE, 0.01, 1, "completed", value=90.0)
    lr_seed_trial(study, TrialState.COMPLETE, 0.01, 1, "completed", value=91.0)
    result = build_report(study_dir, console=quiet())
    assert result.importances == {}
    assert any("no searched parameter varies" in n for n in result.notes)
    assert result.configs[0]["runs"] == 2


# ------------------------------------------------------------------------------------------------ repeats
def fake_summary(run_dir: Path, nelbo: float) -> dict[str, Any]:
    """summary.json as train.RunSummary.to_dict() writes it."""
    return {
        "status": "completed",
        "cause": None,
        "diverged_step": None,
        "steps": 10,
        "total_steps": 10,
        "epochs": 0.01,
        "wall_s": 1.5,
        "params": 28_000,
        "step_time_s": 0.05,
        "peak_memory_mb": 500.0,
        "grad_norm_max": 321.0,
        "grad_norm_mean": 50.0,
        "loss_spikes": 1,
        "skipped_steps": 0,
        "nonfinite_events": 0,
        "unit": "nats",
        "train_nelbo": nelbo + 5,
        "kl_per_group": [],
        "active_units": [],
        "active_groups": 2,
        "num_groups": 3,
        "eval": {"nelbo": nelbo, "nll": nelbo - 3},
        "out_dir": str(run_dir),
    }


def repeat_study(tmp_path: Path, seeds: list[int]) -> tuple[Path, optuna.Study]:
    """Three trials on the recipe's seed; the space asks for the best two configurations on ``seeds``."""
    tree = {"train.learning_rate": {"type": "categorical", "choices": [0.001, 0.01, 0.1]}}
    space = write_space(tmp_path, "rep", tree, repeats={"top_k": 2, "seeds": seeds})
    study_dir, study = make_study(tmp_path, space)
    dists = {"train.learning_rate": LR}
    for lr, nelbo in ((0.01, 90.0), (0.1, 95.0)):
        values = {"train.learning_rate": lr}  # the seed is not searched: trials ran on the recipe's seed
        add(study, TrialState.COMPLETE, values, outcome("completed", values, nelbo=nelbo), dists, nelbo)
    values = {"train.learning_rate": 0.001}
    add(study, TrialState.FAIL, values, outcome("diverged", values, diverged_step=2), dists)
    return study_dir, study


def test_report_lists_missing_repeats_with_the_command_and_reads_finished_ones(tmp_path: Path) -> None:
    study_dir, _study = repeat_study(tmp_path, [7, 8])
    best, second = config_id({"train.learning_rate": 0.01}), config_id({"train.learning_rate": 0.1})

    console = quiet()
    before = build_report(study_dir, console=console)
    out = printed(console)
    assert all(r["source"] == "study" for r in before.rows)
    assert not (study_dir / "repeats").exists()  # nothing was trained, nothing was started
    assert "Seed repeats missing: 4 run(s) of 2 configuration(s)" in out
    assert f"config {best} (trial 0) lacks 2 seed(s): 7, 8" in out
    assert f"config {second} (trial 1) lacks 2 seed(s): 7, 8" in out
    assert f"run them with: nvae-search repeat {study_dir}" in out
    assert [(j.config, j.seed) for j in before.missing_repeats] == [(best, 7), (best, 8), (second, 7), (second, 8)]

    # Three repeat runs as `repeat` leaves them: two finished, one stopped by a signal (resumable, not counted).
    for cid, seed, nelbo, status in (
        (best, 7, 93.0, "completed"),
        (best, 8, 91.0, "completed"),
        (second, 7, 0, "stopped"),
    ):
        run_dir = study_dir / "repeats" / cid / f"seed_{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps({**fake_summary(run_dir, nelbo), "status": status}))
    console = quiet()
    after = build_report(study_dir, console=console)
    out = printed(console)
    repeat_rows = [r for r in after.rows if r["source"] == "repeat"]
    assert [(r["config_id"], r["seed"], r["objectives"]) for r in repeat_rows] == [
        (best, 8, {"nelbo": 91.0}),
        (best, 7, {"nelbo": 93.0}),
    ]
    assert [r["trial"] for r in after.rows] == [0, None, None, 1, 2]  # 90, repeats 91 and 93, 95, diverged
    (config,) = after.configs
    assert config["config_id"] == best and config["runs"] == 3 and config["repeat_runs"] == 2
    assert config["mean"] == pytest.approx(statistics.fmean([90.0, 91.0, 93.0]))
    assert "rep s7" in out and "rep s8" in out
    assert "Seed repeats missing: 2 run(s) of 1 configuration(s)" in out
    assert f"config {second} (trial 1) lacks 2 seed(s): 7, 8 (1 started, not finished)" in out
    assert f"config {best}" not in out.split("Seed repeats missing")[1]
    saved = json.loads((study_dir / "report" / "leaderboard.json").read_text())
    assert saved == after.rows


def test_report_without_repeats_configured_says_nothing_about_them(mixed_study: Path) -> None:
    console = quiet()
    result = build_report(mixed_study, console=console)
    assert result.missing_repeats == [] and "Seed repeats missing" not in printed(console)


def test_report_imports_no_training_code(tmp_path: Path) -> None:
    """`report` must only read: with repeats missing it imports neither torch, nor training, nor `repeat`."""
    study_dir, _study = repeat_study(tmp_path, [7])
    code = (
        "import sys\n"
        "from rich.console import Console\n"
        "from nvae_search.search.report import build_report\n"
        f"r = build_report({str(study_dir)!r}, console=Console(quiet=True))\n"
        "assert len(r.missing_repeats) == 2, r.missing_repeats\n"
        "training = ('torch', 'nvae_search.train', 'nvae_search.search.repeats', 'ray')\n"
        "loaded = [m for m in training if m in sys.modules]\n"
        "print('LOADED', loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout, done.stdout


# ------------------------------------------------------------------------------------------- end to end
def test_end_to_end_two_tiny_trials(tmp_path: Path, torch_single_thread: None) -> None:
    tree = {
        "train.learning_rate": {"type": "float", "low": 3.0e-3, "high": 1.0e-2, "log": True},
        "model.use_se": {"type": "categorical", "choices": [True, False]},
    }
    space = write_space(tmp_path, "e2e", tree, steps=10)
    study_dir = run_optuna_search(space, n_trials=2, root=tmp_path / "runs")
    console = quiet()
    result = build_report(study_dir, console=console)
    assert len(result.rows) == 2
    assert {r["trial"] for r in result.rows} == {0, 1}
    for row in result.rows:
        assert row["status"] == "completed", row  # 10 steps of the tiny recipe at lr <= 1e-2 must not diverge
        assert row["unit"] == "nats" and row["num_groups"] and row["params"] > 0
    out = printed(console)
    assert "Leaderboard: e2e (2 trials)" in out and "learning_rate" in out
    for name in ("history.png", "params.png", "stability.png"):
        assert_png(study_dir / "report" / name)
    assert (study_dir / "report" / "leaderboard.csv").is_file()
    # budget.keep_checkpoints defaults to best with one trial kept: only the best trial still has its checkpoint,
    # every trial keeps its summary, metrics and resolved recipe.
    best = result.rows[0]
    assert sorted((study_dir / "trials").glob("*/checkpoint.pt")) == [Path(best["run_dir"]) / "checkpoint.pt"]
    for run_dir in (study_dir / "trials").iterdir():
        assert {"summary.json", "metrics.jsonl", "recipe.resolved.yaml", "params.json"} <= {
            p.name for p in run_dir.iterdir()
        }


@pytest.mark.parametrize(
    ("diverged", "finished", "style"),
    [(0, 4, "green"), (1, 4, "red"), (2, 4, "bold red"), (3, 4, "bold red"), (4, 4, "bold red")],
)
def test_the_stability_table_colours_the_divergence_rate_by_threshold(diverged: int, finished: int, style: str) -> None:
    """Green for no diverged or exploded run, red for some, bold red from half of them on: the colour a reader of
    the stability table goes by at a glance."""
    from nvae_search.search.report_tables import configs_table

    config = {
        "label": "a",
        "config_id": "c0ffee",
        "runs": finished,
        "repeat_runs": 0,
        "mean": 90.0,
        "std": 1.0,
        "diverged": diverged,
        "finished": finished,
        "divergence_rate": diverged / finished,
        "divergence_ci_low": None,
        "divergence_ci_high": None,
        "median_divergence_step": None,
        "grad_norm_max_mean": 1.0,
        "loss_spikes_mean": 0.0,
    }
    table = configs_table(Console(width=200, file=io.StringIO()), [config], ("nelbo ↓", "nats"))
    (column,) = [c for c in table.columns if "diverged or exploded" in str(c.header)]
    (cell,) = list(column.cells)
    assert str(cell).startswith(f"{diverged}/{finished} (") and cell.style == style
