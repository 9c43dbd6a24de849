"""The early-instability pruner: the pure rule over logged metrics, applied by both backends during training (the
trial ends PRUNED with cause "instability: ..."), and replayed offline on a finished study beside Optuna's median
pruner and no pruning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import trials_by_learning_rate
from typer.testing import CliRunner

from nvae_search.cli import app
from nvae_search.config_io import ConfigError
from nvae_search.search.instability import InstabilityRule, replay_pruners
from nvae_search.spaces import load_space

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"
State = optuna.trial.TrialState

# (step, NELBO nats, gradient norm) logged by the pilot runs of the stability map (2-scale x 8-group MNIST NVAE,
# width 8, batch 16, no warm-up): the first three logs of runs that blew up, and the whole healthy lr 0.03 run.
PILOT_EXPLODED = {
    "lr 0.05 no SR no res": [(1, 4187, 440.0), (10, 12855, 6400.0), (20, 9563, 9750.0), (30, 7908, 9970.0)],
    "lr 0.05 SR res": [(1, 2055, 448.0), (10, 44708, 994000.0), (20, 19527, 21100.0), (30, 18796, 26700.0)],
    "lr 0.1 SR res": [(1, 2055, 448.0), (10, 704924, 2.11e7), (20, 54834, 95500.0), (30, 57083, 144000.0)],
    "lr 0.3 no SR no res": [(1, 4187, 440.0), (10, 1497320, 2.59e6), (20, 1083899, 2.43e6), (30, 1034322, 3.14e6)],
}
PILOT_HEALTHY = [
    (1, 2055, 448.0), (10, 1181, 226.0), (20, 526, 215.0), (30, 328, 118.0), (40, 243, 110.0), (50, 181, 73.5),
    (60, 188, 102.0), (70, 170, 116.0), (80, 169, 278.0), (90, 152, 185.0), (100, 155, 148.0), (110, 148, 125.0),
    (120, 154, 86.5), (130, 151, 66.0), (140, 139, 74.6), (150, 138, 99.9), (160, 133, 45.0), (170, 130, 124.0),
    (180, 129, 63.5), (190, 125, 104.0), (200, 137, 47.8), (210, 121, 68.2), (220, 133, 64.0), (230, 137, 53.6),
    (240, 133, 51.1), (250, 130, 56.0), (260, 137, 81.8), (270, 118, 43.8), (280, 120, 65.2), (290, 123, 44.7),
    (300, 124, 77.0),
]  # fmt: skip


def stop_step(rule: InstabilityRule, log: list[tuple[int, float, float]]) -> int | None:
    return next((s for s, n, g in log if rule.observe(s, {"nelbo": n, "grad_norm": g}) is not None), None)


@pytest.mark.parametrize("name", list(PILOT_EXPLODED))
def test_default_rule_stops_the_pilot_runs_that_blew_up_at_their_second_unstable_report(name: str) -> None:
    assert stop_step(InstabilityRule(), PILOT_EXPLODED[name]) == 20


def test_default_rule_leaves_the_healthy_pilot_run_alone() -> None:
    assert stop_step(InstabilityRule(), PILOT_HEALTHY) is None
    assert stop_step(InstabilityRule(grad_factor=1.5, patience=1), PILOT_HEALTHY) is None  # its norms only fall


def test_fp16_steps_the_gradient_scaler_skipped_are_not_instability() -> None:
    """An fp16 run's first steps overflow while the scaler finds its scale (logged with an infinite gradient norm
    and ``scaler_skipped``): passed over, they neither stop the trial nor start a streak; the same non-finite norms
    without the flag (an fp32 run) do stop it."""
    inf = float("inf")
    overflowed = [(1, {"nelbo": 2055.0, "grad_norm": inf}), (2, {"nelbo": 2050.0, "grad_norm": inf})]
    rule = InstabilityRule()
    assert [rule.observe(s, {**m, "scaler_skipped": True}) for s, m in overflowed] == [None, None]
    assert rule.observe(10, {"nelbo": 1181.0, "grad_norm": inf}) is None  # the first unstable report of a streak
    assert rule.observe(20, {"nelbo": 526.0, "grad_norm": inf}) is not None
    plain = InstabilityRule()
    assert [plain.observe(s, m) is not None for s, m in overflowed] == [False, True]


def test_rule_parameters() -> None:
    log = PILOT_EXPLODED["lr 0.05 no SR no res"]
    assert stop_step(InstabilityRule(patience=1), log) == 10
    assert stop_step(InstabilityRule(patience=1, n_warmup_steps=25), log) == 30
    assert stop_step(InstabilityRule(patience=1, grad_factor=None, nelbo_factor=4.0), log) is None  # 3.07x only
    assert stop_step(InstabilityRule(patience=1, grad_factor=None, nelbo_factor=3.0), log) == 10
    # the baseline is the median over the reports up to baseline_steps: here steps 1 and 10, median 3420
    assert stop_step(InstabilityRule(patience=1, baseline_steps=10, nelbo_factor=None), log) is None
    cause = InstabilityRule(patience=1).observe(1, {"nelbo": float("nan"), "grad_norm": 1.0})
    assert cause is not None and cause.startswith("instability: non-finite NELBO")
    rule = InstabilityRule(nelbo_factor=None)
    rule.observe(1, {"grad_norm": 100.0})
    assert rule.observe(10, {"grad_norm": 2000.0}) is None  # one unstable report, patience 2
    cause = rule.observe(20, {"grad_norm": 5000.0})
    assert cause is not None and "gradient norm 5e+03 is 50x its early median 100" in cause and "step 20" in cause


def test_a_space_with_neither_rule_is_refused(tmp_path: Path) -> None:
    doc = instability_space_doc("none_rule", {"type": "instability", "grad_factor": None, "nelbo_factor": None})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="grad_factor, nelbo_factor or both"):
        load_space(path)


# ------------------------------------------------------------------------------------------ in training
def instability_space_doc(name: str, pruner: dict[str, Any], ray: bool = False) -> dict[str, Any]:
    lrs = [3.0, 0.01]
    doc: dict[str, Any] = {
        "base_recipe": str(TINY),
        "study": {"name": name, "n_trials": 2, "seed": 0, "enqueue": [{"train.learning_rate": lr} for lr in lrs]},
        "budget": {"steps": 12, "eval_iw_samples": 2, "eval_images": 32, "report_every_steps": 4},
        "sampler": {"type": "random"},
        "pruner": pruner,
        "space": {
            "train.learning_rate": {"type": "categorical", "choices": lrs},
            "train.explode_factor": {"type": "fixed", "value": None},  # leave the stopping to the pruner
        },
    }
    if ray:
        doc["ray"] = {"max_concurrent": 1, "scheduler": {"type": "none"}}
    return doc


@pytest.mark.parametrize("backend", ["optuna", "ray"])
def test_both_backends_stop_an_unstable_trial_as_pruned_with_the_rules_cause(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pruner = {"type": "instability", "patience": 1}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(instability_space_doc(f"inst_{backend}", pruner, ray=backend == "ray")))
    space = load_space(path)
    study_dir, by_lr = trials_by_learning_rate(space, backend, tmp_path, request)
    unstable, healthy = by_lr[3.0], by_lr[0.01]
    assert unstable.state == State.PRUNED and unstable.user_attrs["status"] == "pruned"
    assert unstable.user_attrs["cause"].startswith("instability: ") and "at step 4" in unstable.user_attrs["cause"]
    assert unstable.user_attrs["steps"] == 4
    assert healthy.state == State.COMPLETE and healthy.user_attrs["steps"] == 12

    # replayed offline on the same study: the healthy run is the only unpruned one, and no pruner stops it
    replay = {r["pruner"]: r for r in replay_pruners(study_dir)}
    assert replay["instability"]["runs"] == 1 and replay["instability"]["stopped"] == 0


# ---------------------------------------------------------------------------------------------- replay
def replay_study(tmp_path: Path) -> Path:
    """Nine finished runs in trial order: five healthy (the pilot's healthy log, shifted per seed), three that blew
    up like the pilot runs and ended exploded at step 30 (their logs stop there), a pruned trial, and a run that
    blew up but "completed" (as with train.explode_factor: null)."""
    from optuna.distributions import IntDistribution
    from optuna.trial import create_trial

    from nvae_search.search.runner import create_study, storage_url, write_study_file
    from nvae_search.search.trial import TrialOutcome
    from nvae_search.status import TrialStatus

    doc = instability_space_doc("replayed", {"type": "median", "n_startup_trials": 2})
    doc["space"] = {"train.seed": {"type": "int", "low": 0, "high": 99}}
    doc["study"].pop("enqueue")
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    space = load_space(path)
    study_dir = tmp_path / "runs" / "replayed"
    url = storage_url(space, study_dir, None)
    write_study_file(space, study_dir, url, "optuna")
    study = create_study(space, url)
    healthy = [[(s, n + 3 * seed, g) for s, n, g in PILOT_HEALTHY] for seed in range(5)]
    broken = [PILOT_EXPLODED[k] for k in list(PILOT_EXPLODED)[:3]]
    plan = [("completed", healthy[0]), ("completed", healthy[1]), ("exploded", broken[0]), ("completed", healthy[2])]
    plan += [("exploded", broken[1]), ("completed", healthy[3]), ("exploded", broken[2]), ("completed", healthy[4])]
    plan += [("pruned", healthy[0][:3])]
    plan += [("completed", PILOT_EXPLODED["lr 0.3 no SR no res"])]  # trained with explode_factor null: it blew up
    for i, (status, log) in enumerate(plan):
        run_dir = study_dir / "trials" / f"{i:04d}"
        run_dir.mkdir(parents=True)
        rows = [{"step": s, "nelbo": n, "grad_norm": g} for s, n, g in log]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if i == len(plan) - 1:  # the replay judges this run by its log: the rule was off in its recipe
            (run_dir / "recipe.resolved.yaml").write_text("train:\n  explode_factor: null\n")
        done = status == "completed"
        outcome = TrialOutcome(status=TrialStatus(status), steps=log[-1][0], run_dir=str(run_dir), seed=i)
        outcome.diverged_step = None if done or status == "pruned" else log[-1][0]
        state = {"completed": State.COMPLETE, "exploded": State.FAIL, "pruned": State.PRUNED}[status]
        study.add_trial(
            create_trial(
                state=state,
                params={"train.seed": i},
                distributions={"train.seed": IntDistribution(0, 99)},
                user_attrs=outcome.attrs,
                value=float(log[-1][1]) if state != State.FAIL else None,
            )
        )
    return study_dir


def test_replay_reports_saved_steps_and_false_stops_for_each_pruner(tmp_path: Path) -> None:
    study_dir = replay_study(tmp_path)
    replay = {r["pruner"]: r for r in replay_pruners(study_dir)}
    total = 5 * 300 + 4 * 30  # the pruned trial is not replayed
    for r in replay.values():  # the last run "completed" but its log crosses train.explode_factor: it counts as broken
        assert r["runs"] == 9 and r["total_steps"] == total and r["broken_runs"] == 4
        assert r["per_run"][-1]["status"] == "exploded"
    assert replay["none"]["stopped"] == replay["none"]["saved_steps"] == replay["none"]["false_stops"] == 0

    inst = replay["instability"]
    assert inst["stopped"] == 4 and inst["false_stops"] == 0 and inst["broken_stopped"] == 4
    assert inst["saved_steps"] == 4 * (30 - 20)  # stopped at step 20 instead of ending at 30
    assert {r["trial"]: r["stop_step"] for r in inst["per_run"] if r["stop_step"]} == {2: 20, 4: 20, 6: 20, 9: 20}

    # Optuna's median pruner: fed the NELBO trajectories in trial order, it stops the later blown-up runs (their
    # NELBO is above the median of the completed ones) and, with only 2 startup trials, the healthy runs that lag
    # (each seed here is 3 nats above the one before): false stops
    median = replay["median"]
    assert median["broken_stopped"] == 4 and median["false_stop_trials"] == [3, 5, 7]


def test_replay_pruner_command(tmp_path: Path) -> None:
    study_dir = replay_study(tmp_path)
    result = CliRunner().invoke(app, ["replay-pruner", str(study_dir), "--pruner", "instability", "--pruner", "none"])
    assert result.exit_code == 0, result.output
    assert "instability: stopped 4 of 9 runs, saved 40 of 1,620 steps (2%), false stops 0" in result.output
    as_json = CliRunner().invoke(app, ["replay-pruner", str(study_dir), "--json"])
    assert [r["pruner"] for r in json.loads(as_json.output)] == ["instability", "median", "none"]
    bad = CliRunner().invoke(app, ["replay-pruner", str(study_dir), "--pruner", "asha"])
    assert bad.exit_code == 2 and "unknown pruner 'asha'" in bad.output
