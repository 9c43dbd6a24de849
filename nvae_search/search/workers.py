"""Many workers on one study: who owns a running trial, when it is stale, and a heartbeat.

Each trial a worker starts records its owner (host, pid and that process's start time) and a heartbeat
timestamp that a thread refreshes every :data:`HEARTBEAT_S`. A RUNNING trial is stale (its worker is gone) when
its owner ran on this host and that process no longer exists (the pid is gone or now belongs to a younger
process), or, for an owner on another host, when its heartbeat is older than :data:`GRACE_S`. Optuna's own
heartbeat exists only on RDB storages; this one works on the journal default and on RDB alike.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

HEARTBEAT_S = 30.0
GRACE_S = 600.0  # ten minutes without a heartbeat: the owner's machine is gone (or cut off from the storage)
OWNER_KEY = "owner"
HEARTBEAT_KEY = "heartbeat"


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``); None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its closing parenthesis.
    return stat.rsplit(")", 1)[1].split()[19]


def current_owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid)}


def process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    if start is None:
        return True
    now = process_start(pid)
    return now is None or now == start


def is_stale(trial: optuna.trial.FrozenTrial, *, unowned_are_stale: bool, now: float | None = None) -> bool:
    """Whether the worker of a RUNNING trial is gone (see the module docstring)."""
    now = time.time() if now is None else now
    owner = trial.user_attrs.get(OWNER_KEY)
    if not isinstance(owner, dict):
        if unowned_are_stale:
            return True
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - started > GRACE_S  # asked but never claimed: the asking process died in between
    if owner.get("host") == socket.gethostname():
        return not process_alive(int(owner["pid"]), owner.get("start"))
    beat = trial.user_attrs.get(HEARTBEAT_KEY)
    last = (
        float(beat)
        if isinstance(beat, (int, float))
        else (trial.datetime_start.timestamp() if trial.datetime_start else now)
    )
    return now - last > GRACE_S


class Heartbeat:
    """Claims a trial for this process and refreshes its heartbeat from a daemon thread while the trial runs."""

    def __init__(self, trial: optuna.Trial, interval: float = HEARTBEAT_S) -> None:
        self.trial = trial
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial.number}", daemon=True)

    def claim(self) -> Heartbeat:
        self.trial.set_user_attr(OWNER_KEY, current_owner())
        self.trial.set_user_attr(HEARTBEAT_KEY, time.time())
        return self

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        import optuna

        while not self._stop.wait(self.interval):
            try:
                self.trial.set_user_attr(HEARTBEAT_KEY, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # finished (by this worker, or failed as stale by another): nothing left to keep alive
