"""Outcomes beyond NaN: exploded (stopped early, a failure like a divergence), collapsed and spiky (completed runs
that keep their values but carry the flag), in training, in both search backends and in the report; and the one
definition of a trial's outcome fields."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import trials_by_learning_rate
from typer.testing import CliRunner

from nvae_search.cli import app
from nvae_search.schema.recipe import TrainConfig
from nvae_search.search.report import build_report
from nvae_search.search.trajectories import read_trajectory, wilson_interval
from nvae_search.search.trial import OUTCOME_KEYS, TrialOutcome, config_id
from nvae_search.spaces import load_space
from nvae_search.status import BROKE, WITH_VALUE, TrialStatus, completed_outcome
from nvae_search.telemetry import StabilityTracker
from nvae_search.train import RunSummary

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"
State = optuna.trial.TrialState

# Logged NELBO (nats, every 10 steps from step 1) of the pilot runs of the stability map: deep 2-scale x 8-group
# MNIST NVAE, width 8, batch 16, no warm-up. Every run at lr >= 0.05 ended "completed" before outcome kinds existed.
PILOT_EXPLODED = {
    "lr 0.05, no SR, no residual Normal": [4187, 12855, 9563, 7908, 6856, 6180, 5671, 5290, 5139, 4942, 4859],
    "lr 0.05, SR, residual Normal": [2055, 44708, 19527, 18796, 18580, 18178, 17577, 16999, 16230, 15879],
    "lr 0.05, SR, no residual Normal": [4187, 118984, 15687, 14764, 13469, 12145, 10115, 9377, 8951, 8191],
    "lr 0.05, no SR, residual Normal": [2055, 9906628, 37280, 186776, 23075, 20156, 17685, 16641, 15924],
    "lr 0.1, SR, residual Normal": [2055, 704924, 54834, 57083, 54976, 52395, 48917, 45706, 43323, 41120],
    "lr 0.3, no SR, no residual Normal": [4187, 1497320, 1083899, 1034322, 998043, 1026764, 902926, 800572],
}
PILOT_HEALTHY = [2055, 1181, 526, 328, 243, 181, 188, 170, 169, 152, 155, 148, 154, 151, 139, 138, 133, 130, 129]
PILOT_HEALTHY += [125, 137, 121, 133, 137, 133, 130, 137, 118, 120, 123, 124]  # lr 0.03, SR + residual Normal


def first_explosion(nelbos: list[float], factor: float | None) -> int | None:
    tracker = StabilityTracker(explode_factor=factor)
    for i, nelbo in enumerate(nelbos):
        if tracker.observe_nelbo(1 + 10 * i if i else 1, nelbo):
            return i
    return None


@pytest.mark.parametrize("name", list(PILOT_EXPLODED))
def test_default_explode_factor_flags_every_pilot_run_at_a_high_learning_rate(name: str) -> None:
    default = TrainConfig.model_fields["explode_factor"].default
    nelbos = PILOT_EXPLODED[name]
    assert first_explosion(nelbos, default) == 1  # at its first log after step 1: nine tenths of its steps saved
    # ...also when logged every 20 steps only (the worst of them peaks at 2.3x its start there)
    assert first_explosion(nelbos[::2], default) == 1


def test_default_explode_factor_leaves_the_healthy_pilot_run_alone() -> None:
    assert first_explosion(PILOT_HEALTHY, TrainConfig.model_fields["explode_factor"].default) is None
    assert first_explosion(PILOT_EXPLODED["lr 0.05, SR, residual Normal"], None) is None  # null: never


def test_explosion_cause_names_the_numbers_and_the_threshold() -> None:
    tracker = StabilityTracker(explode_factor=2.0)
    assert tracker.observe_nelbo(1, 900.0) is None and tracker.observe_nelbo(10, 400.0) is None
    assert tracker.observe_nelbo(20, 790.0) is None  # 1.98x the lowest so far
    cause = tracker.observe_nelbo(30, 810.0)
    assert cause is not None and "step 30" in cause and "2.02x" in cause and "400 at step 10" in cause
    assert "train.explode_factor 2" in cause
    # the reference survives a resume (saved with the tracker in the checkpoint)
    restored = StabilityTracker(explode_factor=2.0)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.observe_nelbo(40, 810.0) is not None


def test_explode_patience_spares_a_run_that_spikes_once_and_recovers() -> None:
    recovers = [904, 1960, 540, 374, 332]  # the tiny recipe at lr 1, logged every 5 steps: 2.2x at step 5
    assert first_explosion(recovers, 2.0) == 1

    def first(nelbos: list[float], patience: int) -> int | None:
        tracker = StabilityTracker(explode_factor=2.0, explode_patience=patience)
        return next((i for i, n in enumerate(nelbos) if tracker.observe_nelbo(i, n)), None)

    assert first(recovers, 2) is None
    assert first(PILOT_EXPLODED["lr 0.05, no SR, no residual Normal"], 2) == 2  # 3.1x, then 2.3x at step 20
    for name, nelbos in PILOT_EXPLODED.items():
        assert first(nelbos, 2) == 2, name


def test_a_run_that_ends_blown_up_without_crossing_the_rule_in_a_row_ends_exploded() -> None:
    """Seen in the stability map: at lr 0.05 without warm-up some runs jump to 10^4 nats and oscillate, never two
    logs in a row above 2x their lowest; they used to end "completed" at thousands of nats."""

    def final(nelbos: list[float], patience: int = 2) -> str | None:
        tracker = StabilityTracker(explode_factor=2.0, explode_patience=patience)
        assert all(tracker.observe_nelbo(5 * i + 1, n) is None for i, n in enumerate(nelbos))
        return tracker.final_explosion(5 * len(nelbos))

    assert "above its first logged 903" in str(final([903, 3000, 1700, 2500, 1600, 1591]))  # worse than at step 1
    assert "2.2x its lowest" in str(final([900, 400, 900, 500, 880], patience=3))  # blown up at its last log
    assert final(PILOT_HEALTHY) is None and final([904, 1960, 540, 374, 332]) is None  # a spike that recovered
    off = StabilityTracker(explode_factor=None)
    off.observe_nelbo(1, 100.0), off.observe_nelbo(2, 1e6)
    assert off.final_explosion(2) is None  # the rule off: never


def test_negative_nelbos_are_never_compared() -> None:
    tracker = StabilityTracker(explode_factor=2.0)
    assert tracker.observe_nelbo(1, -500.0) is None and tracker.observe_nelbo(2, 1e6) is None


def test_end_of_run_precedence_collapsed_over_spiky_over_completed() -> None:
    assert completed_outcome(1, 100, 10, 100, 0.05, 0.02)[0] == TrialStatus.COLLAPSED
    assert completed_outcome(5, 100, 10, 100, 0.05, 0.02)[0] == TrialStatus.SPIKY  # 5 % active is not collapsed
    assert completed_outcome(5, 100, 2, 100, 0.05, 0.02) == (TrialStatus.COMPLETED, None)
    status, cause = completed_outcome(0, 12, 0, 60, 0.05, 0.02)
    assert status == TrialStatus.COLLAPSED and "0 of 12 latent units" in str(cause)
    assert TrialStatus.EXPLODED in BROKE and {TrialStatus.COLLAPSED, TrialStatus.SPIKY} <= WITH_VALUE


# ------------------------------------------------------------------------------------------ training
def test_tiny_recipe_at_lr_3_stops_early_as_exploded(tmp_path: Path) -> None:
    """Before outcome kinds, lr 3 on the tiny recipe trained its 60 steps and ended "completed" at ~10^3-10^7 nats."""
    result = CliRunner().invoke(
        app, ["train", str(TINY), "--out", str(tmp_path / "r"), "--set", "train.learning_rate=3"]
    )
    assert result.exit_code == 3, result.output  # a failure, like a divergence
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "exploded" and summary["diverged_step"] == summary["steps"] == 20  # 2 logs: 10, 20
    assert "explode_factor" in summary["cause"] and summary["eval"] is None
    assert "exploded" in result.output and "at step 20" in result.output  # the summary screen


def test_a_run_that_ends_above_its_first_nelbo_is_exploded_even_when_the_rule_never_fired(tmp_path: Path) -> None:
    out = tmp_path / "r"
    args = [
        "train",
        str(TINY),
        "--out",
        str(out),
        "--set",
        "train.learning_rate=3",
        "--set",
        "train.explode_patience=100",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "exploded" and summary["diverged_step"] == summary["steps"] == summary["total_steps"]
    assert summary["cause"].startswith("ended at step") and summary["eval"] is None


def test_a_run_with_few_active_units_ends_collapsed_and_keeps_its_evaluation(tmp_path: Path) -> None:
    # by step 20 one of the 12 latent units is inactive (KL < 0.1 nats): collapsed when every unit must be active
    sets = ["train.steps=20", "train.log_every=20", "train.collapse_fraction=1.0", "train.eval_iw_samples=1"]
    args = [arg for s in [*sets, "train.eval_images=8"] for arg in ("--set", s)]
    result = CliRunner().invoke(app, ["train", str(TINY), "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "collapsed" and "train.collapse_fraction 1" in summary["cause"]
    assert summary["eval"] is not None and summary["steps"] == 20 and sum(summary["active_units"]) < 12
    assert "collapsed" in result.output


# ------------------------------------------------------------------------------------- one vocabulary
def test_outcome_keys_attrs_and_reading_back_come_from_one_definition() -> None:
    outcome = TrialOutcome(status=TrialStatus.EXPLODED, cause="x", diverged_step=4, recipe_values="{}")
    assert tuple(outcome.attrs) == OUTCOME_KEYS and "values" in OUTCOME_KEYS
    assert TrialOutcome.from_attrs(outcome.attrs) == outcome
    summary_fields = {f.name for f in dataclasses.fields(RunSummary)}
    sources = [f.metadata["source"] for f in dataclasses.fields(TrialOutcome) if f.metadata.get("source")]
    assert all(s.startswith("eval.") or s in summary_fields for s in sources)


# -------------------------------------------------------------------------------------- both backends
def outcome_space(tmp_path: Path, backend: str) -> Path:
    lrs = [3.0, 0.01]
    doc: dict[str, Any] = {
        "base_recipe": str(TINY),
        "study": {"name": f"outcomes_{backend}", "n_trials": 2, "seed": 0},
        "budget": {"steps": 20, "eval_iw_samples": 2, "eval_images": 32, "report_every_steps": 4},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "space": {
            "train.learning_rate": {"type": "categorical", "choices": lrs},
            "train.collapse_fraction": {"type": "fixed", "value": 1.0},  # any inactive unit: collapsed
            "train.explode_patience": {"type": "fixed", "value": 1},  # stopped at its first blown-up log
        },
    }
    doc["study"]["enqueue"] = [{"train.learning_rate": lr} for lr in lrs]
    if backend == "ray":
        doc["ray"] = {"max_concurrent": 1, "scheduler": {"type": "none"}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("backend", ["optuna", "ray"])
def test_both_backends_record_exploded_as_failed_and_collapsed_with_its_value(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    space = load_space(outcome_space(tmp_path, backend))
    study_dir, by_lr = trials_by_learning_rate(space, backend, tmp_path, request)

    exploded = by_lr[3.0]
    assert exploded.state == State.FAIL and exploded.values is None
    assert exploded.user_attrs["status"] == "exploded" and exploded.user_attrs["diverged_step"] == 4
    assert exploded.user_attrs["steps"] == 4 and "explode_factor" in exploded.user_attrs["cause"]

    collapsed = by_lr[0.01]
    assert collapsed.state == State.COMPLETE and collapsed.value == collapsed.user_attrs["eval_nelbo"]
    assert collapsed.user_attrs["status"] == "collapsed" and "latent units" in collapsed.user_attrs["cause"]

    report = build_report(study_dir)
    statuses = {row["trial"]: row["status"] for row in report.rows}
    assert statuses[exploded.number] == "exploded" and statuses[collapsed.number] == "collapsed"
    assert report.rows[0]["trial"] == collapsed.number  # a collapsed run keeps its place by value


@pytest.mark.parametrize("backend", ["optuna", "ray"])
def test_both_backends_record_a_raised_divergence_as_diverged_at_its_step_and_go_on(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """`train.nonfinite: raise` makes training raise at the first non-finite loss. In a search that is the trial's
    outcome (diverged, at the step a `stop` policy names); the Optuna backend let it end the whole search."""
    lrs = [1000.0, 0.01]
    doc: dict[str, Any] = {
        "base_recipe": str(TINY),
        "study": {
            "name": f"raised_{backend}",
            "n_trials": 2,
            "seed": 0,
            "enqueue": [{"train.learning_rate": lr} for lr in lrs],
        },
        "budget": {"steps": 6, "eval_iw_samples": 2, "eval_images": 8, "report_every_steps": 2},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "space": {
            "train.learning_rate": {"type": "categorical", "choices": lrs},
            "train.nonfinite": {"type": "fixed", "value": "raise"},
        },
        **(
            {"ray": {"max_concurrent": 1, "max_failures": 0, "scheduler": {"type": "none"}}} if backend == "ray" else {}
        ),
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    _study_dir, by_lr = trials_by_learning_rate(load_space(tmp_path / "space.yaml"), backend, tmp_path, request)
    diverged, healthy = by_lr[1000.0], by_lr[0.01]
    assert diverged.state == State.FAIL and diverged.user_attrs["status"] == "diverged"
    step = diverged.user_attrs["diverged_step"]
    assert 1 <= step <= 6 and diverged.user_attrs["cause"] == f"non-finite loss at step {step}"
    assert diverged.user_attrs["config_id"] == config_id({"train.learning_rate": 1000.0, "train.nonfinite": "raise"})
    assert healthy.state == State.COMPLETE and healthy.user_attrs["status"] in WITH_VALUE


def exceptions_that_carry_an_outcome() -> list[BaseException]:
    from nvae_search.search.constraints import OutOfDeviceMemory
    from nvae_search.search.trial import TrialInterrupted
    from nvae_search.train import TrainingDiverged

    return [
        TrainingDiverged("loss", 3),
        TrialInterrupted("interrupted by SIGTERM", 4),
        OutOfDeviceMemory("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ]


@pytest.mark.parametrize("err", exceptions_that_carry_an_outcome(), ids=lambda e: type(e).__name__)
def test_exceptions_that_carry_an_outcome_cross_processes_whole(err: BaseException) -> None:
    """Ray and spawned ranks pickle what a trial raises; an exception whose constructor takes its fields would not
    be rebuilt from its message alone."""
    import pickle

    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    assert {k: v for k, v in vars(back).items()} == {k: v for k, v in vars(err).items()}


# ---------------------------------------------------------------------------------------------- the report
def test_wilson_interval_of_small_seed_counts() -> None:
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(0, 5)  # type: ignore[misc]
    assert low == 0.0 and high == pytest.approx(0.4345, abs=1e-4)
    assert wilson_interval(5, 5) == pytest.approx((0.5655, 1.0), abs=1e-4)
    assert wilson_interval(2, 5) == pytest.approx((0.1176, 0.7693), abs=1e-4)


def seeded_study(tmp_path: Path) -> Path:
    """Ten trials, five seeds of two learning rates, with run directories holding metrics.jsonl: lr 0.1 explodes on
    three seeds (steps 10, 20, 30), collapses on one and completes on one; lr 0.01 completes on all five."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from nvae_search.search.runner import create_study, storage_url, write_study_file
    from nvae_search.search.trial import config_id

    doc = {
        "base_recipe": str(TINY),
        "study": {"name": "seeded", "n_trials": 10},
        "budget": {"steps": 40},
        "pruner": {"type": "none"},
        "space": {
            "train.learning_rate": {"type": "categorical", "choices": [0.01, 0.1]},
            "train.seed": {"type": "categorical", "choices": [1, 2, 3, 4, 5]},
        },
    }
    path = tmp_path / "seeded.yaml"
    path.write_text(yaml.safe_dump(doc))
    space = load_space(path)
    study_dir = tmp_path / "runs" / "seeded"
    url = storage_url(space, study_dir, None)
    write_study_file(space, study_dir, url, "optuna")
    study = create_study(space, url)
    dists = {
        "train.learning_rate": CategoricalDistribution([0.01, 0.1]),
        "train.seed": CategoricalDistribution([1, 2, 3, 4, 5]),
    }
    plan = [(0.1, 1, "exploded", 10), (0.1, 2, "exploded", 20), (0.1, 3, "exploded", 30), (0.1, 4, "collapsed", None)]
    plan += [(0.1, 5, "completed", None)] + [(0.01, s, "completed", None) for s in range(1, 6)]
    for i, (lr, seed, status, broke_at) in enumerate(plan):
        values = {"train.learning_rate": lr, "train.seed": seed}
        run_dir = study_dir / "trials" / f"{i:04d}"
        run_dir.mkdir(parents=True)
        last = broke_at or 40
        rows = [{"step": s, "nelbo": 900.0 - 10 * s, "grad_norm": 100.0 + s} for s in range(1, last, 5)]
        if broke_at:
            rows.append({"step": broke_at, "nelbo": 1.0e5, "grad_norm": 1.0e8})
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        outcome = TrialOutcome(
            status=TrialStatus(status),
            diverged_step=broke_at,
            steps=last,
            eval_nelbo=None if broke_at else 100.0 + 10 * lr + seed,
            unit="nats",
            run_dir=str(run_dir),
            config_id=config_id(values),
            seed=seed,
            recipe_values=json.dumps(values),
        )
        state = State.FAIL if broke_at else State.COMPLETE
        study.add_trial(
            create_trial(
                state=state, params=values, distributions=dists, user_attrs=outcome.attrs, value=outcome.eval_nelbo
            )
        )
    return study_dir


def test_report_gives_divergence_rate_interval_median_step_and_trajectories(tmp_path: Path) -> None:
    from rich.console import Console

    report = build_report(seeded_study(tmp_path), console=Console(file=io.StringIO(), width=200))
    by_lr = {c["params"]["train.learning_rate"]: c for c in report.configs}
    bad, good = by_lr[0.1], by_lr[0.01]
    assert bad["finished"] == 5 and bad["diverged"] == bad["exploded"] == 3 and bad["collapsed"] == 1
    assert bad["divergence_rate"] == pytest.approx(0.6) and bad["median_divergence_step"] == 20
    assert (bad["divergence_ci_low"], bad["divergence_ci_high"]) == pytest.approx((0.2307, 0.8824), abs=1e-4)
    assert bad["completed"] == 2  # the collapsed seed keeps its value
    assert good["divergence_rate"] == 0.0 and good["divergence_ci_high"] == pytest.approx(0.4345, abs=1e-4)
    assert good["median_divergence_step"] is None
    png = report.files["trajectories.png"]
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    rows = [r for r in report.rows if r["status"] == "exploded"]
    assert len(rows) == 3 and len(read_trajectory(rows[0]["run_dir"])) >= 2


@pytest.mark.parametrize(
    ("by_time", "xs", "label"), [(False, [10, 20], "training step"), (True, [0.5, 1.5], "training minutes")]
)
def test_trajectories_of_a_clock_budget_are_drawn_against_minutes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, by_time: bool, xs: list[float], label: str
) -> None:
    import matplotlib.figure

    from nvae_search.search.report_rows import Run
    from nvae_search.search.trajectories import plot_trajectories

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = [
        {"step": 10, "time": 30.0, "nelbo": 200.0, "grad_norm": 5.0},
        {"step": 20, "time": 90.0, "nelbo": 150.0, "grad_norm": 4.0},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    run = Run(None, "study", "COMPLETE", TrialStatus.COMPLETED, [150.0], {}, {"run_dir": str(run_dir)}, {}, "c", 0)
    drawn: list[Any] = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    assert plot_trajectories(tmp_path / "t.png", [run], "nats", "t", by_time=by_time) == 1
    bottom = drawn[0].axes[1]
    assert list(bottom.lines[0].get_xdata()) == pytest.approx(xs) and bottom.get_xlabel() == label
