"""The in-process Optuna backend: trials, divergence as an outcome, invalid combinations, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from nvae_search.search.compile import make_define_by_run
from nvae_search.search.runner import create_study, load_study, run_optuna_search
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
            # the gradient-norm figures of the steps before the divergence reach the study too
            assert trial.user_attrs["grad_norm_max"] >= trial.user_attrs["grad_norm_mean"] > 0
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


# A worker process as a user starts it, with two test-only hooks (monkeypatching the runner in the child):
# NVAE_TEST_DIE_AT="k:s" SIGKILLs the process at the first report at step >= s of its k-th trial (after the
# checkpoint of that report), and NVAE_TEST_WAIT_FOR=FILE holds it after each finished trial until FILE exists.
_DRIVER = """
import os, signal, sys, time
from pathlib import Path
from nvae_search.spaces import load_space
from nvae_search.search import runner

die_at = os.environ.get("NVAE_TEST_DIE_AT")
if die_at:
    die_trial, die_step = (int(x) for x in die_at.split(":"))
    real_run_trial, started = runner.run_trial, []

    def run_trial(space, values, run_dir, report=None, resume=False):
        started.append(run_dir)

        def dying_report(step, nelbo):
            if len(started) == die_trial and step >= die_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return report(step, nelbo)

        return real_run_trial(space, values, run_dir, dying_report, resume)

    runner.run_trial = run_trial

wait_for = os.environ.get("NVAE_TEST_WAIT_FOR")


def on_trial(study, trial):
    while wait_for and not Path(wait_for).exists():
        time.sleep(0.05)


runner.run_optuna_search(load_space(sys.argv[1]), root=sys.argv[2], on_trial=on_trial)
"""


def start_worker(path: Path, root: Path, **env: str) -> subprocess.Popen:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-c", _DRIVER, str(path), str(root)], env=full, start_new_session=True)


def learning_rates(study: optuna.Study) -> list[float]:
    return [t.params["train.learning_rate"] for t in study.trials if not t.user_attrs.get("interrupted")]


LR = {"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}


def test_sigkill_mid_trial_then_rerun_completes_without_lost_or_duplicated_trials(tmp_path: Path) -> None:
    path = write_space(tmp_path, "killed", LR, 3, steps=12)
    root = tmp_path / "runs"
    proc = start_worker(path, root, NVAE_TEST_DIE_AT="2:8")  # dies at step 8 of its second trial
    assert proc.wait(timeout=300) == -signal.SIGKILL
    study = load_study(root / "killed")[0]
    (killed,) = study.get_trials(states=(State.RUNNING,))
    assert killed.number == 1 and killed.user_attrs["progress"] == 4  # its last report before step 8
    assert start_worker(path, root).wait(timeout=300) == 0
    study = load_study(root / "killed")[0]
    counted = [t for t in study.trials if not t.user_attrs.get("interrupted")]
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert len(counted) == 3 and all(t.state == State.COMPLETE for t in counted)
    assert [t.number for t in interrupted] == [1] and interrupted[0].state == State.FAIL
    # The interrupted configuration was re-run once, and every counted trial has distinct parameters.
    (retry,) = [t for t in counted if t.user_attrs.get("retry_of") == 1]
    assert retry.params == killed.params
    assert len(set(learning_rates(study))) == 3
    assert len({t.user_attrs["run_dir"] for t in counted}) == 3


# The real `search` command, in a process that sends itself SIGNAL at its first report at step >= 4 of its first
# trial: as a Ctrl-C or a scheduler's SIGTERM arrives while a trial trains.
_SIGNALLED_CLI = """
import os, signal, sys
from nvae_search.cli import app
from nvae_search.search import runner

real_run_trial, started = runner.run_trial, []

def run_trial(space, values, run_dir, report=None, resume=False):
    started.append(run_dir)

    def signalled_report(step, metrics):
        if len(started) == 1 and step >= 4 and not os.environ.get("SIGNALLED"):
            os.environ["SIGNALLED"] = "1"
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        return report(step, metrics)

    return real_run_trial(space, values, run_dir, signalled_report, resume)

runner.run_trial = run_trial
app(["search", *sys.argv[2:], "--quiet"])
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_during_a_trial_stops_the_search_and_the_trial_runs_again_not_as_pruned(
    tmp_path: Path, signal_name: str
) -> None:
    """The trainer checkpoints and stops on SIGINT/SIGTERM. A search trial stopped so was recorded as PRUNED (a
    counted result, its point lost) and the search went on to the next trial, ignoring the signal."""
    path = write_space(tmp_path, "signalled", LR, 1, steps=8)
    root = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    command = [sys.executable, "-c", _SIGNALLED_CLI, signal_name, str(path), "--root", str(root)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "search stopped" in proc.stdout and f"interrupted by {signal_name} at step" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    study = load_study(root / "signalled")[0]
    stopped, retry = study.trials
    assert stopped.state == State.FAIL and stopped.user_attrs["status"] == "interrupted"
    assert stopped.user_attrs["interrupted"] is True and "steps" not in stopped.user_attrs  # no outcome recorded
    assert json.loads((Path(stopped.user_attrs["run_dir"]) / "summary.json").read_text())["status"] == "stopped"
    assert retry.state == State.WAITING and retry.user_attrs["retry_of"] == stopped.number
    # Running the command again trains the interrupted point, and the study then holds its one counted trial.
    again = subprocess.run(
        [sys.executable, "-m", "nvae_search", "search", str(path), "--root", str(root), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert again.returncode == 0, again.stderr
    stopped, retry = load_study(root / "signalled")[0].trials
    assert retry.state == State.COMPLETE and retry.params == stopped.params and retry.user_attrs["steps"] == 8


def test_a_continued_study_draws_new_points(tmp_path: Path) -> None:
    path = write_space(tmp_path, "resumed", LR, 3, steps=2)
    root = tmp_path / "runs"
    study_dir = run_optuna_search(load_space(path), root=root)
    first = learning_rates(load_study(study_dir)[0])
    run_optuna_search(load_space(path), root=root, n_trials=6)
    rates = learning_rates(load_study(study_dir)[0])
    assert rates[:3] == first and len(rates) == 6 and len(set(rates)) == 6


SAMPLERS = {
    "tpe": {"type": "tpe", "n_startup_trials": 2},
    "random": {"type": "random"},
    "nsga2": {"type": "nsga2", "population_size": 2},
    "grid": {"type": "grid"},
    "cmaes": {"type": "cmaes", "n_startup_trials": 2},
}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_every_sampler_continues_where_it_left_off_and_a_fresh_run_is_reproducible(tmp_path: Path, kind: str) -> None:
    if kind == "cmaes":
        pytest.importorskip("cmaes")
    grid = {"train.learning_rate": {"type": "categorical", "choices": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3]}}
    cont = {
        "train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "train.weight_decay": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    }
    path = write_space(tmp_path, kind, grid if kind == "grid" else cont, 6, sampler=SAMPLERS[kind])
    space = load_space(path)

    def draw(journal: Path, count: int) -> list[tuple]:
        # A new process's view of the study: a new sampler object on the stored trials.
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        study = create_study(space, f"journal:{journal}", storage)
        for _ in range(count):
            trial = study.ask()
            define(trial)
            study.tell(trial, trial.params["train.learning_rate"])
        return [tuple(sorted(t.params.items())) for t in study.trials]

    define = make_define_by_run(space)
    draw(tmp_path / "a.journal", 3)
    points = draw(tmp_path / "a.journal", 3)
    assert len(set(points)) == 6, points
    assert draw(tmp_path / "b.journal", 3) == points[:3]


@pytest.mark.parametrize("workers", [2, 3])
def test_concurrent_workers_share_one_study(tmp_path: Path, workers: int) -> None:
    target = workers + 2
    path = write_space(tmp_path, "shared", LR, target, steps=2)
    root = tmp_path / "runs"
    procs = [start_worker(path, root) for _ in range(workers)]
    assert [p.wait(timeout=300) for p in procs] == [0] * workers
    study = load_study(root / "shared")[0]
    assert len(study.trials) == target and all(t.state == State.COMPLETE for t in study.trials)
    assert len(set(learning_rates(study))) == target
    assert {t.user_attrs["owner"]["pid"] for t in study.trials} <= {p.pid for p in procs}


def test_a_worker_killed_mid_trial_is_replaced_by_a_live_one(tmp_path: Path) -> None:
    path = write_space(tmp_path, "lost", LR, 3, steps=12)
    root = tmp_path / "runs"
    released = tmp_path / "released"
    live = start_worker(path, root, NVAE_TEST_WAIT_FOR=str(released))  # holds after its first trial
    doomed = start_worker(path, root, NVAE_TEST_DIE_AT="1:4")
    assert doomed.wait(timeout=300) == -signal.SIGKILL
    released.touch()
    assert live.wait(timeout=300) == 0
    study = load_study(root / "lost")[0]
    (lost,) = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert lost.state == State.FAIL and lost.user_attrs["owner"]["pid"] == doomed.pid
    counted = [t for t in study.trials if not t.user_attrs.get("interrupted")]
    assert len(counted) == 3 and all(t.state == State.COMPLETE for t in counted)
    assert {t.user_attrs["owner"]["pid"] for t in counted} == {live.pid}
    (retry,) = [t for t in counted if t.user_attrs.get("retry_of") == lost.number]
    assert retry.params == lost.params and len(set(learning_rates(study))) == 3


def test_a_trial_another_worker_took_over_is_dropped_and_the_search_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker cut off from the storage for the grace period has its trial failed as stale and re-queued by
    another worker; when it comes back and finishes, its late result is dropped (a warning) and it goes on."""
    from nvae_search.search import runner
    from nvae_search.search.storage import fail_as_interrupted, open_storage

    real_run_trial, started = runner.run_trial, []

    def run_trial(space: Any, values: Any, run_dir: Path, report: Any = None, resume: bool = False) -> Any:
        started.append(run_dir)
        if len(started) == 1:  # what another worker's recover_interrupted does to it meanwhile
            study, _space, info = load_study(tmp_path / "runs" / "taken")
            assert fail_as_interrupted(study, open_storage(info["storage"]), 0)
            study.enqueue_trial(dict(values), user_attrs={"retry_of": 0})
        return real_run_trial(space, values, run_dir, report, resume)

    monkeypatch.setattr(runner, "run_trial", run_trial)
    path = write_space(tmp_path, "taken", LR, 2, steps=2)
    study = load_study(run_optuna_search(load_space(path), root=tmp_path / "runs"))[0]
    taken, retry, other = study.trials
    assert taken.state == State.FAIL and taken.user_attrs["status"] == "interrupted" and taken.value is None
    assert retry.state == State.COMPLETE and retry.user_attrs["retry_of"] == 0 and retry.params == taken.params
    assert other.state == State.COMPLETE and len(started) == 3


def test_a_trial_whose_training_raises_is_failed_and_the_error_reaches_the_caller(
    tmp_path: Path, before_train_step: Callable[[Any], None]
) -> None:
    """An unexpected error (a bug, a broken device) is not an outcome of the configuration: as in Optuna's optimize,
    the trial is FAIL (status failed) and the error ends the worker, so it is seen rather than repeated per trial."""

    def broken_step(_trainer: Any, _x: Any) -> None:
        raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")

    before_train_step(broken_step)
    path = write_space(tmp_path, "broken", LR, 2, steps=2)
    with pytest.raises(RuntimeError, match="CUDNN_STATUS_INTERNAL_ERROR"):
        run_optuna_search(load_space(path), root=tmp_path / "runs")
    (trial,) = load_study(tmp_path / "runs" / "broken")[0].trials
    assert trial.state == State.FAIL and trial.user_attrs["status"] == "failed"


def test_the_study_time_budget_stops_starting_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nvae_search.search import runner

    finished: list[int] = []
    monkeypatch.setattr(runner, "_clock", lambda: 61.0 * len(finished))  # each trial "takes" 61 s
    path = write_space(tmp_path, "timed", LR, 5, steps=2, study={"name": "timed", "n_trials": 5, "timeout_minutes": 2})
    study_dir = run_optuna_search(
        load_space(path), root=tmp_path / "runs", on_trial=lambda study, trial: finished.append(trial.number)
    )
    # Trial 0 starts at 0 s, trial 1 at 61 s; at 122 s the 2-minute budget is spent: no third trial.
    assert finished == [0, 1] and len(load_study(study_dir)[0].trials) == 2
