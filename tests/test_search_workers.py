"""When a RUNNING trial of a shared study counts as stale: its owner's process is gone (same host), or its
heartbeat is older than the grace period (another host). A live worker's trial is never taken."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from nvae_search.search.runner import recover_interrupted
from nvae_search.search.storage import workers_lock
from nvae_search.search.workers import GRACE_S, Heartbeat, current_owner, is_stale, process_alive, process_start

NOW = 1_000_000.0


def running(owner: object = None, heartbeat: float | None = None, started: float = NOW - 5) -> optuna.trial.FrozenTrial:
    attrs: dict = {}
    if owner is not None:
        attrs["owner"] = owner
    if heartbeat is not None:
        attrs["heartbeat"] = heartbeat
    return optuna.trial.FrozenTrial(
        number=0,
        state=optuna.trial.TrialState.RUNNING,
        value=None,
        datetime_start=datetime.datetime.fromtimestamp(started),
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs=attrs,
        system_attrs={},
        intermediate_values={},
        trial_id=0,
    )


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_same_host_owner_is_stale_exactly_when_its_process_is_gone() -> None:
    me = current_owner()
    assert me["pid"] == os.getpid() and me["start"] is not None
    assert not is_stale(running(me), unowned_are_stale=False, now=NOW + 10 * GRACE_S)  # alive: never stale
    gone = {**me, "pid": dead_pid()}
    assert is_stale(running(gone), unowned_are_stale=False, now=NOW)
    # The pid now belongs to another (younger) process: the owner is gone all the same.
    reused = {**me, "start": str(int(me["start"]) - 1)}
    assert is_stale(running(reused), unowned_are_stale=False, now=NOW)


def test_other_host_owner_is_stale_only_after_the_grace_period_without_heartbeat() -> None:
    remote = {"host": socket.gethostname() + "-elsewhere", "pid": os.getpid(), "start": "1"}
    assert not is_stale(running(remote, heartbeat=NOW - GRACE_S + 1), unowned_are_stale=False, now=NOW)
    assert is_stale(running(remote, heartbeat=NOW - GRACE_S - 1), unowned_are_stale=False, now=NOW)


def test_an_unclaimed_trial_is_stale_only_when_asked_for_it_or_after_the_grace_period() -> None:
    assert not is_stale(running(started=NOW - 5), unowned_are_stale=False, now=NOW)
    assert is_stale(running(started=NOW - GRACE_S - 1), unowned_are_stale=False, now=NOW)
    assert is_stale(running(started=NOW - 5), unowned_are_stale=True, now=NOW)  # Ray: no live driver left


def test_process_start_times_tell_an_older_process_from_a_younger_one() -> None:
    # A pid reused by a younger process is told apart by its start time (clock ticks since boot): it must be the
    # process's own start, later for a process started later, not a field that is the same for every process.
    mine = process_start(os.getpid())
    time.sleep(0.05)  # a few clock ticks (100 per second on Linux)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        theirs = process_start(child.pid)
        assert mine is not None and theirs is not None and int(theirs) > int(mine)
        assert process_alive(child.pid, theirs) and not process_alive(child.pid, mine)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid, theirs)


def test_a_heartbeat_keeps_its_trial_fresh_while_it_runs() -> None:
    study = optuna.create_study()
    trial = study.ask()
    beat = Heartbeat(trial, interval=0.02).claim()
    claimed = study.trials[0].user_attrs["heartbeat"]
    assert study.trials[0].user_attrs["owner"] == current_owner()
    with beat:
        time.sleep(0.2)
    assert study.trials[0].user_attrs["heartbeat"] > claimed  # refreshed by the thread, not only at the claim
    study.tell(trial, 1.0)


def asked_study() -> tuple[optuna.Study, optuna.storages.InMemoryStorage, optuna.Trial]:
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    return study, storage, study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})


def test_a_stale_trial_is_failed_as_interrupted_and_its_point_run_again_once() -> None:
    study, storage, trial = asked_study()
    assert recover_interrupted(study, storage, unowned_are_stale=True) == 1
    failed, retry = study.get_trials(deepcopy=False)
    assert failed.state == optuna.trial.TrialState.FAIL and failed.user_attrs["interrupted"] is True
    assert retry.state == optuna.trial.TrialState.WAITING and retry.user_attrs["retry_of"] == trial.number
    again = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})  # the next worker takes the retry
    assert again.number == retry.number and again.params == failed.params
    # The retry's worker dies too: it is failed as interrupted, but not queued a third time.
    assert recover_interrupted(study, storage, unowned_are_stale=True) == 1
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.FAIL]


def test_a_trial_its_owner_finishes_after_the_stale_check_is_neither_failed_nor_queued_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two workers race: one finds the trial stale in its list of RUNNING trials, the owner tells it before the
    first marks it; the finished result stands and its point is not run a second time."""
    study, storage, trial = asked_study()
    listed = study.get_trials

    def list_then_owner_finishes(*args: object, **kwargs: object) -> list[optuna.trial.FrozenTrial]:
        trials = listed(*args, **kwargs)
        if trial.number not in {t.number for t in listed(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}:
            study.tell(trial, 0.5)
        return trials

    monkeypatch.setattr(study, "get_trials", list_then_owner_finishes)
    assert recover_interrupted(study, storage, unowned_are_stale=True) == 0
    (finished,) = listed(deepcopy=False)
    assert finished.state == optuna.trial.TrialState.COMPLETE and finished.value == 0.5
    assert "interrupted" not in finished.user_attrs


def test_the_workers_lock_lets_one_worker_at_a_time_count_and_ask(tmp_path: Path) -> None:
    """N workers never start more than n_trials between them because "count, then ask" is done under this lock;
    a second worker (here a thread with its own file handle, as another process has) waits for the first."""
    url = f"journal:{tmp_path / 'study.journal'}"
    entered = threading.Event()

    def second_worker() -> None:
        with workers_lock(url):
            entered.set()

    with workers_lock(url):
        other = threading.Thread(target=second_worker)
        other.start()
        assert not entered.wait(0.5)  # held by the first: the second waits
    assert entered.wait(10)
    other.join()
