"""When a RUNNING trial of a shared study counts as stale: its owner's process is gone (same host), or its
heartbeat is older than the grace period (another host). A live worker's trial is never taken."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time

import optuna

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
