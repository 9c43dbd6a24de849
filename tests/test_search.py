"""The in-process Optuna backend: trials, divergence as an outcome, invalid combinations, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

from nvae_search.search.runner import load_study, run_optuna_search
from nvae_search.spaces import load_space

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"
State = optuna.trial.TrialState


def write_space(tmp_path: Path, name: str, space: dict, n_trials: int, steps: int = 12, **extra: object) -> Path:
    doc = {
        "base_recipe": str(TINY),
        "study": {"name": name, "n_trials": n_trials, "seed": 0},
        "budget": {"steps": steps, "eval_iw_samples": 2, "eval_images": 16, "report_every_steps": 4},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "space": space,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_three_trial_search_records_outcomes(tmp_path: Path) -> None:
    space = load_space(
        write_space(
            tmp_path, "three", {"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}, 3
        )
    )
    study_dir = run_optuna_search(space, root=tmp_path / "runs")
    assert study_dir == tmp_path / "runs" / "three"
    study, _, info = load_study(study_dir)
    assert info["backend"] == "optuna" and info["storage"].startswith("journal:")
    trials = study.get_trials(states=(State.COMPLETE,))
    assert len(trials) == 3
    for trial in trials:
        assert trial.user_attrs["status"] == "completed" and trial.value == trial.user_attrs["eval_nelbo"]
        run_dir = Path(trial.user_attrs["run_dir"])
        assert (
            json.loads((run_dir / "params.json").read_text())["train.learning_rate"]
            == trial.params["train.learning_rate"]
        )
        for name in ("recipe.resolved.yaml", "metrics.jsonl", "summary.json"):
            assert (run_dir / name).is_file()
        # budget.keep_checkpoints defaults to best, one trial: only the best trial keeps its checkpoint.
        assert (run_dir / "checkpoint.pt").is_file() == (trial.number == study.best_trial.number)
    assert (study_dir / "space.yaml").is_file()
    # Running the same search again continues the study: nothing is re-run or counted twice.
    run_optuna_search(load_space(space.source), root=tmp_path / "runs")
    assert len(load_study(study_dir)[0].trials) == 3


def test_divergent_trials_are_failed_with_attributes_and_the_study_goes_on(tmp_path: Path) -> None:
    lrs = {"train.learning_rate": {"type": "categorical", "choices": [1.0e-2, 1.0e3]}}
    space = load_space(write_space(tmp_path, "diverge", lrs, 4))
    study_dir = run_optuna_search(space, root=tmp_path / "runs")
    study = load_study(study_dir)[0]
    assert len(study.trials) == 4 and not study.get_trials(states=(State.RUNNING,))
    by_lr = {t.number: (t.params["train.learning_rate"], t) for t in study.trials}
    assert {lr for lr, _ in by_lr.values()} == {1.0e-2, 1.0e3}, "the seeded sampler should try both rates"
    for lr, trial in by_lr.values():
        if lr == 1.0e3:
            assert trial.state == State.FAIL and trial.user_attrs["status"] == "diverged"
            assert trial.user_attrs["diverged_step"] >= 1 and "non-finite" in trial.user_attrs["cause"]
            assert trial.values is None
        else:
            assert trial.state == State.COMPLETE


def test_a_combination_the_schema_rejects_is_pruned_with_the_reason(tmp_path: Path) -> None:
    # One pre-process block and six latent scales need a resolution divisible by 2^(1 + 6 - 1) = 64; it is 32.
    scales = {"model.num_latent_scales": {"type": "categorical", "choices": [6]}}
    space = load_space(write_space(tmp_path, "invalid", scales, 1))
    study = load_study(run_optuna_search(space, root=tmp_path / "runs"))[0]
    (trial,) = study.trials
    assert trial.state == State.PRUNED and trial.user_attrs["status"] == "invalid"
    assert "divisible" in trial.user_attrs["cause"]


_DRIVER = """
import sys
from nvae_search.spaces import load_space
from nvae_search.search.runner import run_optuna_search
run_optuna_search(load_space(sys.argv[1]), root=sys.argv[2])
"""


def test_sigkill_mid_trial_then_rerun_completes_without_lost_or_duplicated_trials(tmp_path: Path) -> None:
    lr = {"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    path = write_space(tmp_path, "killed", lr, 3, steps=40)
    root = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(path), str(root)], env=env, start_new_session=True)
    second_trial = root / "killed" / "trials" / "0001" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not second_trial.exists():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    study = load_study(root / "killed")[0]
    assert study.get_trials(states=(State.RUNNING,)), "the kill should leave a trial running"
    killed_params = study.get_trials(states=(State.RUNNING,))[0].params
    assert subprocess.run([sys.executable, "-c", _DRIVER, str(path), str(root)], env=env, timeout=300).returncode == 0
    study = load_study(root / "killed")[0]
    counted = [t for t in study.trials if not t.user_attrs.get("interrupted")]
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert len(counted) == 3 and all(t.state == State.COMPLETE for t in counted)
    assert len(interrupted) == 1 and interrupted[0].state == State.FAIL
    assert interrupted[0].params == killed_params
    # The interrupted configuration was re-run, and every counted trial has a distinct run directory.
    assert any(t.params == killed_params for t in counted)
    assert len({t.user_attrs["run_dir"] for t in counted}) == 3
