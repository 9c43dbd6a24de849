"""The Ray Tune backend: outcomes in the shared Optuna storage, a lost worker node, a killed driver.

Ray's fixed costs (≈7 s to import and start, seconds per trial) are paid once: the suite shares one local Ray
instance (``ray_session`` in conftest.py), and the two tests that need their own Ray (a two-node cluster, a driver
killed with SIGKILL) run it in subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml

from nvae_search.rundir import ray_trial_dir
from nvae_search.search.ray_backend import (
    ATTEMPTS_LOG,
    RANKS_LOG,
    RESTORED_FILES,
    init_ray,
    reports_per_trial,
    run_ray_search,
    unrestorable_reason,
)
from nvae_search.search.ray_trainable import prepare_worker
from nvae_search.search.runner import finished_trials, load_study
from nvae_search.search.storage import open_storage
from nvae_search.spaces import load_space

pytest.importorskip("ray.tune", reason="the Ray backend needs the optional extra: pip install 'nvae-search[ray]'")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"
State = optuna.trial.TrialState


def write_space(
    tmp_path: Path, name: str, space: dict, n_trials: int, *, steps: int, every: int, ray: dict, **extra: Any
) -> Path:
    doc = {
        "base_recipe": str(TINY),
        "study": {"name": name, "n_trials": n_trials, "seed": 0, **extra.pop("study", {})},
        "budget": {"steps": steps, "eval_iw_samples": 2, "eval_images": 32, "report_every_steps": every},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "space": space,
        "ray": ray,
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def one_trial_space(tmp_path: Path, name: str, **ray: Any) -> Path:
    """One trial at a fixed learning rate, 2 steps: for what happens around a search rather than in it."""
    lr = {"train.learning_rate": {"type": "fixed", "value": 0.01}}
    return write_space(tmp_path, name, lr, 1, steps=2, every=2, ray=ray)


def learning_rate_space(tmp_path: Path, name: str, n_trials: int) -> Path:
    """A search over the learning rate alone, two trials at a time, 2 steps each."""
    return write_space(
        tmp_path,
        name,
        {"train.learning_rate": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
        n_trials,
        steps=2,
        every=2,
        ray={"max_concurrent": 2, "scheduler": {"type": "none"}},
    )


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def no_nan(trial: optuna.trial.FrozenTrial) -> bool:
    numbers = [*(trial.values or []), *trial.intermediate_values.values()]
    return all(math.isfinite(v) for v in numbers)


def test_reports_per_trial_counts_step_one_and_the_final_result(tmp_path: Path) -> None:
    space = load_space(
        write_space(
            tmp_path, "count", {"train.learning_rate": {"type": "fixed", "value": 0.01}}, 1, steps=12, every=4, ray={}
        )
    )
    assert reports_per_trial(space) == 5  # steps 1, 4, 8, 12, then the final result
    assert space.ray.scheduler.type == "asha"


def test_the_searcher_survives_pickling_and_restores_which_optuna_trial_each_ray_trial_is(tmp_path: Path) -> None:
    """What Tune does with the searcher across a killed driver, without Ray running: pickle it with the experiment,
    save its state, unpickle it in the next driver and restore the state; the restored searcher then tells each
    Ray trial's outcome to that trial's Optuna trial (the study's own storage, public Optuna and Ray APIs only)."""
    import pickle

    from nvae_search.search.ray_searcher import METRIC, make_searcher

    space = load_space(
        write_space(
            tmp_path,
            "bridge",
            {"train.learning_rate": {"type": "float", "low": 1.0e-3, "high": 1.0e-2}},
            3,
            steps=8,
            every=4,
            ray={},
        )
    )
    url = f"journal:{tmp_path / 'study.journal'}"
    first = make_searcher(space, url, str(tmp_path / "study"))
    params = {trial: first.suggest(trial) for trial in ("a", "b", "c")}
    running = optuna.load_study(study_name="bridge", storage=open_storage(url)).trials
    assert [t.user_attrs["run_dir"] for t in running] == [ray_trial_dir(tmp_path / "study", t) for t in "abc"]
    first.on_trial_result("a", {METRIC: 5.0, "step": 1, "run_dir": "ra"})
    first.on_trial_result("b", {METRIC: 6.0, "step": 1, "run_dir": "rb"})
    first.on_trial_result("b", {METRIC: 4.0, "step": 4, "run_dir": "rb"})
    first.save(str(tmp_path / "searcher-state"))
    pickled = pickle.dumps(first)  # the searcher class is built in a function: this goes through its factory

    second = pickle.loads(pickled)
    second.restore(str(tmp_path / "searcher-state"))
    outcome = {"status": "completed", "eval_nelbo": 3.0}
    final = {METRIC: 3.5, "step": 8, "final": 1, "objective": [3.0], "outcome": outcome, "run_dir": "ra"}
    second.on_trial_complete("a", final)
    second.on_trial_complete("b", {METRIC: 3.9, "step": 8, "run_dir": "rb"})  # stopped by ASHA: no final result
    second.on_trial_complete("c", None)  # ended by Tune before its first report
    trials = optuna.load_study(study_name="bridge", storage=open_storage(url)).trials  # read back from the file
    assert [t.params for t in trials] == [params["a"], params["b"], params["c"]]
    a, b, c = trials
    assert a.state == State.COMPLETE and a.value == 3.0 and a.intermediate_values == {1: 5.0}
    assert a.user_attrs["status"] == "completed" and a.user_attrs["run_dir"] == "ra"
    assert b.state == State.PRUNED and b.value == 3.9 and b.intermediate_values == {1: 6.0, 4: 4.0, 8: 3.9}
    assert b.user_attrs["status"] == "pruned" and b.user_attrs["steps"] == 8
    assert c.state == State.FAIL and c.user_attrs["status"] == "interrupted" and c.user_attrs["interrupted"]
    assert c.user_attrs["run_dir"] == ray_trial_dir(tmp_path / "study", "c")  # known without a report
    second.on_trial_complete("a", None, error=True)  # Tune repeating itself changes nothing
    assert optuna.load_study(study_name="bridge", storage=open_storage(url)).trials[0].state == State.COMPLETE


# ----------------------------------------------------------------------------------------- local Ray
def test_local_search_tells_optuna_complete_pruned_and_diverged(ray_session: None, tmp_path: Path) -> None:
    """One trial per outcome, in this order (warm-start queue, one at a time, so ASHA's decision is certain):
    lr 1e-2 completes; lr 1e-4 equals it at step 1, then lags at ASHA's second rung and is stopped (PRUNED, not
    COMPLETE); lr 1e3 diverges (FAIL with status diverged, not a NaN value and not left RUNNING); lr 1e-5 is
    below the recipe's learning_rate_min, an invalid combination (PRUNED with status invalid, as in Optuna)."""
    lrs = [1.0e-2, 1.0e-4, 1.0e3, 1.0e-5]
    path = write_space(
        tmp_path,
        "local",
        {"train.learning_rate": {"type": "categorical", "choices": lrs}},
        4,
        steps=12,
        every=4,
        ray={"max_concurrent": 1, "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}},
        study={"enqueue": [{"train.learning_rate": lr} for lr in lrs]},
    )
    study_dir = run_ray_search(load_space(path), root=tmp_path / "runs")
    assert study_dir == (tmp_path / "runs" / "local").resolve()
    study, _, info = load_study(study_dir)
    assert info["backend"] == "ray" and info["storage"].startswith("journal:")
    assert len(study.trials) == 4 and not study.get_trials(states=(State.RUNNING,))
    by_lr = {t.params["train.learning_rate"]: t for t in study.trials}
    assert all(no_nan(t) for t in study.trials)

    done = by_lr[1.0e-2]
    assert done.state == State.COMPLETE and done.user_attrs["status"] == "completed"
    assert done.value == done.user_attrs["eval_nelbo"] and done.user_attrs["steps"] == 12
    assert done.user_attrs["train_s"] > 0 and done.user_attrs["trial_s"] >= done.user_attrs["train_s"]
    assert sorted(done.intermediate_values) == [1, 4, 8, 12]
    run_dir = Path(done.user_attrs["run_dir"])
    assert run_dir.parent == study_dir / "trials" and run_dir.name.startswith("ray_")
    for name in ("params.json", "summary.json", "metrics.jsonl", "checkpoint.pt", ATTEMPTS_LOG):
        assert (run_dir / name).is_file(), name

    pruned = by_lr[1.0e-4]
    assert pruned.state == State.PRUNED and pruned.user_attrs["status"] == "pruned"
    assert pruned.user_attrs["steps"] < 12 and pruned.value == pruned.intermediate_values[pruned.user_attrs["steps"]]
    assert pruned.value > done.intermediate_values[pruned.user_attrs["steps"]]
    # The trial stopped gracefully at ASHA's word: its run directory is complete up to there.
    summary = json.loads((Path(pruned.user_attrs["run_dir"]) / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] >= pruned.user_attrs["steps"]

    diverged = by_lr[1.0e3]
    assert diverged.state == State.FAIL and diverged.values is None
    assert diverged.user_attrs["status"] == "diverged" and "non-finite" in diverged.user_attrs["cause"]
    assert diverged.user_attrs["diverged_step"] >= 1

    invalid = by_lr[1.0e-5]
    assert invalid.state == State.PRUNED and invalid.user_attrs["status"] == "invalid"
    assert "learning_rate_min" in invalid.user_attrs["cause"]

    # Running the same command again finds the study complete: nothing is re-run or counted twice.
    run_ray_search(load_space(path), root=tmp_path / "runs")
    assert len(load_study(study_dir)[0].trials) == 4


def test_ray_trials_are_tracked_as_mlflow_child_runs(ray_session: None, tmp_path: Path) -> None:
    """``tracking: mlflow`` on the Ray backend, as on the Optuna one: a parent run for the study and a child run per
    trial, logged by the driver once the trial ended (its steps read back from the run's metrics.jsonl)."""
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lrs = [1.0e-2, 1.0e3]
    path = write_space(
        tmp_path,
        "tracked",
        {
            "train.learning_rate": {"type": "categorical", "choices": lrs},
            "train.warmup_epochs": {"type": "fixed", "value": 0},
        },
        2,
        steps=8,
        every=4,
        ray={"max_concurrent": 1, "scheduler": {"type": "none"}},
        study={"enqueue": [{"train.learning_rate": lr} for lr in lrs]},
        tracking={"backend": "mlflow", "uri": uri},
    )
    run_ray_search(load_space(path), root=tmp_path / "runs")
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.params["train.learning_rate"]: r for r in runs if r is not parent}
    assert parent.info.run_name == "tracked" and set(children) == {"0.01", "1000.0"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    good, bad = children["0.01"], children["1000.0"]
    assert good.info.status == "FINISHED" and good.data.tags["status"] == "completed"
    assert "objective/nelbo" in good.data.metrics and "final/eval_nll" in good.data.metrics
    assert [m.step for m in client.get_metric_history(good.info.run_id, "nelbo")] == [1, 4, 8]
    assert bad.info.status == "FAILED" and bad.data.tags["status"] == "diverged"
    assert {"recipe.resolved.yaml", "summary.json"} <= {a.path for a in client.list_artifacts(good.info.run_id)}


def test_an_unfinished_experiment_of_an_older_version_is_a_clear_error(ray_session: None, tmp_path: Path) -> None:
    """An experiment pickled with a searcher class that no longer exists (the OptunaSearch subclass of earlier
    versions) cannot be restored: one error naming the experiment and the way on, no traceback from pickle."""
    from nvae_search.config_io import ConfigError

    path = one_trial_space(tmp_path, "older")
    ray_dir = tmp_path / "runs" / "older" / "ray"
    (ray_dir / "older").mkdir(parents=True)
    (ray_dir / "older.nvae.json").write_text(json.dumps({"index": 1, "name": "older", "done": False}))
    # What pickle wrote for the old searcher: a reference to a class by module and name; the other files Tune
    # restores from are whole.
    (ray_dir / "older" / "tuner.pkl").write_bytes(b"cnvae_search.search.ray_backend\n_OutcomeAwareOptunaSearch\n.")
    session = "2026-01-01_00-00-00"
    (ray_dir / "older" / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": []}))
    (ray_dir / "older" / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"counter": 1}))
    (ray_dir / "older" / f"searcher-state-{session}.pkl").write_text(json.dumps({"numbers": {}}))
    assert unrestorable_reason(ray_dir / "older") is None
    with pytest.raises(ConfigError) as caught:
        run_ray_search(load_space(path), root=tmp_path / "runs")
    (problem,) = caught.value.problems
    assert problem[0] == "ray" and "cannot be restored" in problem[1] and '"done": true' in problem[1]
    assert str(ray_dir / "older.nvae.json") in problem[1]


def test_a_data_parallel_trial_trains_with_two_ddp_workers(ray_session: None, tmp_path: Path) -> None:
    import multiprocessing

    path = write_space(
        tmp_path,
        "ddp",
        {"train.learning_rate": {"type": "fixed", "value": 1.0e-2}},
        1,
        steps=8,
        every=4,
        ray={"max_concurrent": 1, "workers_per_trial": 2, "scheduler": {"type": "none"}},
    )
    study = load_study(run_ray_search(load_space(path), root=tmp_path / "runs"))[0]
    (trial,) = study.trials
    assert trial.state == State.COMPLETE and trial.user_attrs["status"] == "completed"
    assert sorted(trial.intermediate_values) == [1, 4, 8] and no_nan(trial)
    run_dir = Path(trial.user_attrs["run_dir"])
    assert (
        json.loads((run_dir / "recipe.resolved.yaml").exists() and (run_dir / "summary.json").read_text())["steps"] == 8
    )
    ranks = [json.loads(line) for line in (run_dir / RANKS_LOG).read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert len({r["pid"] for r in ranks}) == 2
    assert not multiprocessing.active_children()


# --------------------------------------------------------------------------------- two-node cluster
def test_losing_a_worker_node_mid_trial_resumes_the_trial_elsewhere(tmp_path: Path) -> None:
    path = write_space(
        tmp_path,
        "cluster",
        {"train.learning_rate": {"type": "float", "low": 5.0e-3, "high": 1.0e-2}},
        2,
        steps=20,
        every=2,
        ray={"max_concurrent": 2, "max_failures": 1, "scheduler": {"type": "none"}},
    )
    out = tmp_path / "cluster.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ray_cluster_script.py"), str(path), str(tmp_path / "runs"), str(out)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["removed"], "the worker node was never removed mid-trial"
    states = {t["state"] for t in report["trials"]}
    assert len(report["trials"]) == 2 and "RUNNING" not in states
    assert all(t["state"] == "COMPLETE" and t["status"] == "completed" for t in report["trials"]), report["trials"]
    # The trial on the lost node ran exactly twice: first there, then on the head node, resumed from the
    # checkpoint it had handed Ray before the node went (not from scratch).
    first, second = report["attempts"][report["victim"]]
    assert first["node_id"] == report["worker_node_id"] and first["resumed_after_step"] is None
    assert second["node_id"] != report["worker_node_id"] and second["resumed_after_step"] >= 2
    assert report["removed_after_checkpoint_of_step"] >= 2


# ------------------------------------------------------------------------------------ killed driver
# The driver kills itself (SIGKILL) when it receives the first result at step >= 6 of any trial: that trial handed
# Ray a checkpoint with its step-4 report, and with TUNE_GLOBAL_CHECKPOINT_S=0 Tune saved the experiment state
# (which now refers to that checkpoint) at the end of the event loop step that processed it, before this result.
DRIVER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from nvae_search.spaces import load_space
from nvae_search.search import ray_backend
from nvae_search.search.ray_searcher import StudyBridge as searcher

kill_at = int(os.environ.get("NVAE_TEST_KILL_DRIVER_AT_STEP", "0"))
real_on_trial_result = searcher.on_trial_result


def on_trial_result(self, trial_id, result):
    if kill_at and not result.get("final") and result.get("step", 0) >= kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_on_trial_result(self, trial_id, result)


searcher.on_trial_result = on_trial_result
ray_backend.run_ray_search(load_space({space!r}), root={runs!r})
"""


def test_sigkill_of_the_driver_then_rerun_resumes_without_duplicates(tmp_path: Path) -> None:
    path = write_space(
        tmp_path,
        "killed",
        {
            "train.learning_rate": {"type": "float", "low": 5.0e-3, "high": 1.0e-2},
            "train.batch_size": {"type": "fixed", "value": 32},  # slower steps: time to kill a trial mid-run
        },
        3,
        steps=16,
        every=2,
        ray={"max_concurrent": 2, "scheduler": {"type": "none"}},
    )
    runs = tmp_path / "runs"
    command = [sys.executable, "-c", DRIVER.format(root=str(ROOT), space=str(path), runs=str(runs))]
    trials_dir = runs / "killed" / "trials"
    # OMP_NUM_THREADS=2 in the driver's environment reaches every Ray worker: each trial must still take only the
    # one CPU it reserved (two trials of two threads on two cores ran 7x slower).
    env = {**subprocess_env(), "TUNE_GLOBAL_CHECKPOINT_S": "0", "OMP_NUM_THREADS": "2"}
    first = subprocess.Popen(
        command,
        env={**env, "NVAE_TEST_KILL_DRIVER_AT_STEP": "6"},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert first.wait(timeout=300) == -signal.SIGKILL, "the driver should have killed itself at step 6"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # the local Ray instance the driver started
    killed_dirs = {d.name for d in trials_dir.glob("ray_*")}
    running_at_kill = sorted(
        t.params["train.learning_rate"] for t in load_study(runs / "killed")[0].trials if t.state == State.RUNNING
    )
    assert running_at_kill, "the kill left no trial running"
    assert any((trials_dir / d / "checkpoint.pt").exists() for d in killed_dirs), "no checkpoint before the kill"
    experiment_dir = runs / "killed" / "ray" / "killed"
    snapshot = tmp_path / "snapshot"
    shutil.copytree(runs, snapshot, symlinks=True)
    # Tune copies its experiment state to the study folder in a background thread: now and then the kill tears it.
    torn_by_the_kill = unrestorable_reason(experiment_dir)

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    study = load_study(runs / "killed")[0]
    assert finished_trials(study) == 3 and not study.get_trials(states=(State.RUNNING,))
    counted = [t for t in study.trials if not t.user_attrs.get("interrupted")]
    assert all(t.state == State.COMPLETE and t.user_attrs["status"] == "completed" for t in counted)
    run_dirs = sorted(t.user_attrs["run_dir"] for t in counted)
    if torn_by_the_kill is None:
        assert len(set(run_dirs)) == 3 and sorted(str(d) for d in trials_dir.glob("ray_*")) == run_dirs
        assert killed_dirs <= {Path(d).name for d in run_dirs}, "the restored experiment kept its trials"
        resumed = [
            json.loads(line)["resumed_after_step"]
            for d in trials_dir.glob("ray_*")
            for line in (d / ATTEMPTS_LOG).read_text().splitlines()[1:]
        ]
        assert any(step and step >= 2 for step in resumed), "no trial continued from its checkpoint"
    else:
        assert_abandoned_and_retried(runs / "killed", killed_dirs, running_at_kill)
    threads = {json.loads((d / "summary.json").read_text())["provenance"]["threads"] for d in trials_dir.glob("ray_*")}
    assert threads == {1}  # ray.resources_per_trial.cpu: 1

    # The same kill, with the experiment state torn as a kill during Tune's copy leaves it: Tune would restart the
    # experiment from its saved searcher (too few trials, or a wait for ever); the rerun starts a new one instead.
    shutil.rmtree(runs)
    shutil.copytree(snapshot, runs, symlinks=True)
    for state_file in experiment_dir.glob("experiment_state-*.json"):
        state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "cannot restore the Ray experiment killed:" in third.stderr and "Failed to restore" not in third.stderr
    assert_abandoned_and_retried(runs / "killed", killed_dirs, running_at_kill)


def assert_abandoned_and_retried(study_dir: Path, killed_dirs: set[str], running_at_kill: list[float]) -> None:
    """The torn experiment is marked done with its reason; the trials it was running are failed as interrupted
    and their points run again, once, in a new experiment; the study has its three finished trials."""
    study = load_study(study_dir)[0]
    assert finished_trials(study) == 3 and not study.get_trials(states=(State.RUNNING,))
    info = json.loads((study_dir / "ray" / "killed.nvae.json").read_text())
    assert info["done"] and "experiment_state-" in info["abandoned"]
    assert json.loads((study_dir / "ray" / "killed-2.nvae.json").read_text())["done"]
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert sorted(t.params["train.learning_rate"] for t in interrupted) == running_at_kill
    retries = [t for t in study.trials if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == sorted(t.number for t in interrupted)
    assert sorted(t.params["train.learning_rate"] for t in retries) == running_at_kill
    counted = [t for t in study.trials if not t.user_attrs.get("interrupted")]
    assert len(counted) == 3 and all(t.state == State.COMPLETE for t in counted)
    run_dirs = {Path(t.user_attrs["run_dir"]).name for t in counted}
    assert len(run_dirs) == 3 and not run_dirs & killed_dirs
    # The killed trials' checkpoints (theirs and Ray's copies) go by budget.keep_checkpoints (best: one kept).
    for trial in interrupted:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir.name in killed_dirs and not (run_dir / "checkpoint.pt").exists()
        tune_id = run_dir.name.removeprefix("ray_")
        assert not list((study_dir / "ray").glob(f"*/*_{tune_id}_*/checkpoint_*/checkpoint.pt"))


@pytest.mark.parametrize(("pattern", "kind"), RESTORED_FILES)
@pytest.mark.parametrize("damage", ["missing", "empty", "truncated"])
def test_an_experiment_folder_missing_or_truncating_a_file_tune_restores_from_is_unrestorable(
    tmp_path: Path, pattern: str, kind: str, damage: str
) -> None:
    def body(kind: str) -> bytes:
        state = {"trials": list(range(50)), "name": "killed"}
        return json.dumps(state).encode() if kind == "json" else pickle.dumps(state)

    for other, other_kind in RESTORED_FILES:
        if "*" in other:  # a torn file of an older session is not read
            (tmp_path / other.replace("*", "2026-12-01_10-00-00")).write_bytes(b"")
        (tmp_path / other.replace("*", "2026-12-03_10-00-00")).write_bytes(body(other_kind))
    assert unrestorable_reason(tmp_path) is None
    newest = tmp_path / pattern.replace("*", "2026-12-03_10-00-00")
    if damage == "missing":
        for path in tmp_path.glob(pattern):
            path.unlink()
    else:
        newest.write_bytes(b"" if damage == "empty" else body(kind)[:-5])
    reason = unrestorable_reason(tmp_path)
    assert reason is not None
    assert (pattern in reason) if damage == "missing" else (str(newest) in reason and "truncated" in reason)


# ------------------------------------------------------------------------------------------ resume / address
def test_a_continued_ray_study_draws_new_points(ray_session: None, tmp_path: Path) -> None:
    path = learning_rate_space(tmp_path, "again", 3)
    study_dir = run_ray_search(load_space(path), root=tmp_path / "runs")
    first = [t.params["train.learning_rate"] for t in load_study(study_dir)[0].trials]
    orphans: list[int] = []

    def orphan(study: optuna.Study, target: int) -> None:
        """A trial asked by a driver that died before Tune recorded it: RUNNING, and no Ray trial will end it."""
        orphans.append(study.ask().number)

    run_ray_search(load_space(path), root=tmp_path / "runs", n_trials=6, on_start=orphan)
    study = load_study(study_dir)[0]
    left = study.trials[orphans[0]]
    assert left.state == State.FAIL and left.user_attrs["status"] == "interrupted"  # not left RUNNING
    rates = [t.params["train.learning_rate"] for t in study.trials if t.number != left.number]
    assert len(rates) == 6 and len(set(rates)) == 6 and set(first) <= set(rates)
    assert all(t.state == State.COMPLETE for t in study.trials if t.number != left.number)


def test_a_trial_that_raises_fails_and_the_experiment_still_ends(ray_session: None, tmp_path: Path) -> None:
    """A trial whose training raises (here: a torn image file in the worker) ends as a Ray ERROR, FAIL in Optuna,
    and the experiment it ran in counts as ended."""
    data = tmp_path / "mnist"
    data.mkdir()
    embedded = Path(str(resources.files("nvae_search.datasets.mnist")))  # the copy the package ships
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        shutil.copyfile(embedded / name, data / name)
    (data / "torn-images-idx3-ubyte.gz").write_bytes((embedded / "train-images-idx3-ubyte.gz").read_bytes()[:4096])
    files = ["train-images-idx3-ubyte.gz", "torn-images-idx3-ubyte.gz"]
    path = write_space(
        tmp_path,
        "raises",
        {
            "data.dataset": {"type": "fixed", "value": "idx"},
            "data.root": {"type": "fixed", "value": str(data)},
            "data.train_images": {"type": "categorical", "choices": files},
        },
        2,
        steps=2,
        every=2,
        ray={"max_concurrent": 1, "max_failures": 0, "scheduler": {"type": "none"}},
        study={"enqueue": [{"data.train_images": name} for name in files]},
    )
    study_dir = run_ray_search(load_space(path), root=tmp_path / "runs")
    study = load_study(study_dir)[0]
    by_file = {t.params["data.train_images"]: t for t in study.trials}
    assert by_file[files[0]].state == State.COMPLETE and by_file[files[1]].state == State.FAIL
    assert json.loads((study_dir / "ray" / "raises.nvae.json").read_text())["done"]
    # Running the command again finds the study complete (a failed trial counts, as in Optuna): the ended
    # experiment is not restored, so Tune does not start the trial that raised again.
    run_ray_search(load_space(path), root=tmp_path / "runs")
    assert len(load_study(study_dir)[0].trials) == 2
    attempts = Path(by_file[files[1]].user_attrs["run_dir"]) / ATTEMPTS_LOG
    assert len(attempts.read_text().splitlines()) == 1


def test_a_restored_experiment_that_ran_fewer_trials_than_owed_is_followed_by_a_new_one(
    ray_session: None, tmp_path: Path
) -> None:
    """A driver killed between two of Tune's snapshots can leave an experiment that restores with fewer trials than
    the study still owes. Here: an experiment of 2 trials that ended, its end not recorded (the driver killed
    right after the fit), re-run for 3 trials: Tune restores it (nothing left to run), then a new experiment runs
    the third trial."""
    path = learning_rate_space(tmp_path, "owed", 2)
    study_dir = run_ray_search(load_space(path), root=tmp_path / "runs")
    info_file = study_dir / "ray" / "owed.nvae.json"
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "done": False}))
    run_ray_search(load_space(path), root=tmp_path / "runs", n_trials=3)
    study = load_study(study_dir)[0]
    assert [t.state for t in study.trials] == [State.COMPLETE] * 3
    assert json.loads(info_file.read_text())["done"]  # restored, then recorded as ended
    assert json.loads((study_dir / "ray" / "owed-2.nvae.json").read_text())["num_samples"] == 1


def test_a_finished_experiment_whose_end_was_never_recorded_is_restored_once_per_command(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop of experiments must make progress even when an experiment's "done" mark is lost for good: a
    restored experiment that completes has ended, so the driver does not restore it again (it did, for ever)."""
    from nvae_search.search import ray_backend

    write_info, restore_tuner = ray_backend._write_experiment_info, ray_backend._restore_tuner
    restored: list[str] = []

    def lose_done_marks(exp_root: Path, info: dict[str, Any]) -> None:
        write_info(exp_root, {**info, "done": False} if "abandoned" not in info else info)

    def restore_once(space: Any, exp_root: Path, name: str, trainable: Any) -> Any:
        assert name not in restored, f"{name} restored a second time by one command"
        restored.append(name)
        return restore_tuner(space, exp_root, name, trainable)

    monkeypatch.setattr(ray_backend, "_write_experiment_info", lose_done_marks)
    monkeypatch.setattr(ray_backend, "_restore_tuner", restore_once)
    path = learning_rate_space(tmp_path, "lost", 2)
    study_dir = run_ray_search(load_space(path), root=tmp_path / "runs")
    assert restored == []
    run_ray_search(load_space(path), root=tmp_path / "runs", n_trials=3)
    assert restored == ["lost"]
    assert [t.state for t in load_study(study_dir)[0].trials] == [State.COMPLETE] * 3
    assert json.loads((study_dir / "ray" / "lost-2.nvae.json").read_text())["num_samples"] == 1


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (None, {"address": "local", "num_cpus": os.cpu_count(), "include_dashboard": False}),
        ("local", {"address": "local", "num_cpus": os.cpu_count(), "include_dashboard": False}),
        ("auto", {"address": "auto"}),
        ("ray://head:10001", {"address": "ray://head:10001"}),
        ("10.0.0.5:6379", {"address": "10.0.0.5:6379"}),
    ],
)
def test_ray_address_reaches_ray_init(monkeypatch: pytest.MonkeyPatch, address: str | None, expected: dict) -> None:
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert init_ray(address) is True
    assert calls == [expected]
    # A remote head (Ray >= 2.59) needs token auth, or ray.init retries InvalidAuthToken for ever.
    assert os.environ.get("RAY_AUTH_MODE") == ("token" if address == "10.0.0.5:6379" else None)


class RayStarting(Exception):
    """Raised where a command would start Ray (see ``ray_starts``)."""


@pytest.fixture
def ray_starts(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The addresses the Ray backend asks ``init_ray`` for; the stand-in raises :class:`RayStarting` instead."""
    from nvae_search.search import ray_backend

    started: list[str | None] = []

    def fake_init(address: str | None = "local", **kwargs: Any) -> bool:
        started.append(address)
        raise RayStarting

    monkeypatch.setattr(ray_backend, "init_ray", fake_init)
    return started


def test_search_address_option_is_passed_to_ray(tmp_path: Path, ray_starts: list[str | None]) -> None:
    from typer.testing import CliRunner

    from nvae_search.cli import app

    path = one_trial_space(tmp_path, "addr")
    root = ["--root", str(tmp_path / "runs"), "--backend", "ray", "-q"]
    result = CliRunner().invoke(app, ["search", str(path), *root, "--address", "10.0.0.5:6379"])
    assert isinstance(result.exception, RayStarting)
    result = CliRunner().invoke(app, ["search", str(path), *root])
    assert isinstance(result.exception, RayStarting)
    assert ray_starts == ["10.0.0.5:6379", "local"]  # without --address: the space's ray.address (default local)


def test_a_second_driver_on_a_study_is_refused_until_the_first_has_ended(
    tmp_path: Path, ray_starts: list[str | None]
) -> None:
    """Two drivers on one study would both restore its unfinished experiment and train its trials twice: while one
    holds the study's driver lock, another exits 2 naming it, before Ray starts; once it is gone, a driver runs."""
    import fcntl
    import socket

    from typer.testing import CliRunner

    from nvae_search.cli import app
    from nvae_search.search import ray_backend

    path = one_trial_space(tmp_path, "one")
    command = ["search", str(path), "--root", str(tmp_path / "runs"), "--backend", "ray", "-q"]
    lock = tmp_path / "runs" / "one" / "ray" / ray_backend.DRIVER_LOCK
    lock.parent.mkdir(parents=True)
    with open(lock, "a+") as first:  # the first driver, as its process holds it
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        first.write("pid 4242 on node-a\n")
        first.flush()
        refused = CliRunner().invoke(app, command, env={"COLUMNS": "200"})
    assert refused.exit_code == 2, refused.output
    assert "another driver (pid 4242 on node-a) is running the Ray search of this study" in refused.output
    assert "Traceback" not in refused.output and ray_starts == []
    assert lock.read_text() == "pid 4242 on node-a\n"  # the holder's line stays for the next one to read
    second = CliRunner().invoke(app, command)  # the first has ended (its lock released, as by a kill)
    assert isinstance(second.exception, RayStarting) and ray_starts == ["local"]
    assert lock.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


def test_a_quiet_ray_search_hides_rays_notices_but_not_its_security_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """-q promises one line per trial: Ray's advice about checkpoint syncing and its notice that token authentication
    is on (the default) are kept out; its warning that authentication is off still shows."""
    import logging

    from nvae_search.search import ray_backend

    for name in ("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "RAY_AIR_NEW_OUTPUT"):
        monkeypatch.delenv(name, raising=False)  # restored afterwards: _quiet_ray sets both
    ray_backend._quiet_ray(verbose=False)
    assert os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] == "0"
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def shown(message: str) -> bool:
        return logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, (), None))

    assert not shown("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
    assert shown("Token authentication is disabled for this Ray cluster. Anyone with network access ...")


@pytest.mark.parametrize(("cpu", "workers", "threads"), [(1, 1, 1), (0.5, 1, 1), (2, 1, 2), (2, 2, 4)])
def test_a_ray_trial_takes_the_threads_of_the_cpus_it_reserved(
    tmp_path: Path, cpu: float, workers: int, threads: int
) -> None:
    space = load_space(
        one_trial_space(tmp_path, "threads", resources_per_trial={"cpu": cpu}, workers_per_trial=workers)
    )
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        prepare_worker(space)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(("given", "expected"), [(None, "300"), ("2", "300"), ("900", "900")])
def test_a_ray_worker_gives_a_stopped_trial_time_to_finish_before_reusing_its_actor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str | None, expected: str
) -> None:
    """Tune waits ``TUNE_FUNCTION_THREAD_TIMEOUT_S`` (2 s by default) for a stopped trial to end before it gives the
    actor the next trial; a trial writing its final checkpoint needs longer, so workers raise it to at least 300 s
    and keep a longer one the user set."""
    space = load_space(one_trial_space(tmp_path, "grace"))
    if given is None:
        monkeypatch.delenv("TUNE_FUNCTION_THREAD_TIMEOUT_S", raising=False)
    else:
        monkeypatch.setenv("TUNE_FUNCTION_THREAD_TIMEOUT_S", given)
    previous = torch.get_num_threads()
    try:
        prepare_worker(space)
    finally:
        torch.set_num_threads(previous)
    assert os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] == expected
