"""The study's storage: one URL form, checked before anything is written, opened with a repaired journal.

A storage is ``journal:PATH`` (an Optuna journal file; the default is ``study.journal`` in the study directory) or
an Optuna RDB URL (``sqlite:///study.db``, ``postgresql://...``). Every problem with it is a :class:`ConfigError`
naming the URL and the reason, raised before the study directory, ``study.json`` or the journal are created.
Optuna and SQLAlchemy are imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config_io import ConfigError
from ..spaces import storage_form_problem
from ..status import TrialStatus

if TYPE_CHECKING:
    import optuna

JOURNAL_PREFIX = "journal:"
SQLITE_HEADER = b"SQLite format 3\x00"
WORKERS_LOCK_SUFFIX = ".workers.lock"


def storage_error(source: str, field: str, url: str, reason: str) -> ConfigError:
    return ConfigError(source, [(field, f"storage {url!r}: {reason}")])


def resolve_storage_url(space: Any, study_dir: Path, override: str | None) -> tuple[str, str, str]:
    """(URL recorded in study.json, source, field) of the study's storage; a relative journal path is made
    absolute (``--storage``: from the working directory; the space's ``storage:``: from the space file)."""
    if override is not None:
        problem = storage_form_problem(override)
        if problem:
            raise storage_error("--storage", "--storage", override, problem)
        if override.startswith(JOURNAL_PREFIX):
            return (
                f"{JOURNAL_PREFIX}{Path(override.removeprefix(JOURNAL_PREFIX).strip()).resolve()}",
                "--storage",
                "--storage",
            )
        return _absolute_sqlite(override), "--storage", "--storage"
    source = str(space.source or "<space>")
    if space.storage is None:
        return f"{JOURNAL_PREFIX}{(study_dir / 'study.journal').resolve()}", source, "storage"
    if space.storage.startswith(JOURNAL_PREFIX):
        path = space.resolve_path(space.storage.removeprefix(JOURNAL_PREFIX).strip())
        return f"{JOURNAL_PREFIX}{Path(path).resolve()}", source, "storage"
    return _absolute_sqlite(space.storage), source, "storage"


def _absolute_sqlite(url: str) -> str:
    """``sqlite:///rel/x.db`` (relative to the working directory) with the path made absolute, so that study.json
    finds the same file from any directory; other URLs unchanged."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url.startswith(prefix + "/") or url[len(prefix) :] in ("", ":memory:"):
        return url
    return prefix + str(Path(url[len(prefix) :]).resolve())


def _writable_location(path: Path) -> str | None:
    """Why a file cannot be created at ``path`` (its folder may still be missing); None when it can."""
    if path.is_dir():
        return f"{path} is a directory, not a file"
    if path.exists():
        if not path.is_file():
            return f"{path} is not a regular file"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"{path} is not readable and writable by this user"
        return None
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory, so {path} cannot be created"
    try:  # os.access says yes to root everywhere, also on read-only file systems and /proc
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        return f"{ancestor} is not writable ({err.strerror}), so {path} cannot be created"
    return None


def _journal_problem(path: Path) -> str | None:
    problem = _writable_location(path)
    if problem or not path.exists() or path.stat().st_size == 0:
        return problem
    with open(path, "rb") as fh:
        first = fh.readline(1 << 20)
    try:
        record = json.loads(first)
    except (UnicodeDecodeError, ValueError):
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        return f"{path} is not an Optuna journal (its first line is not a journal record); refusing to append to it"
    return None


def _rdb_problem(url: str) -> str | None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        return f"unknown database kind {url.split('://', 1)[0]!r} (use journal:PATH, sqlite:///PATH, postgresql://...)"
    except (ArgumentError, ValueError) as err:
        return f"not a valid database URL ({err})"
    try:
        dialect.import_dbapi()
    except ImportError as err:
        return f"the database driver is not installed ({err})"
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:"):
        return "an in-memory SQLite database would lose the study when the process ends; give a file path"
    path = Path(database)
    if not path.parent.is_dir():
        return f"the folder {path.parent} does not exist (SQLite does not create it)"
    problem = _writable_location(path)
    if problem or not path.exists() or path.stat().st_size == 0:
        return problem
    with open(path, "rb") as fh:
        if fh.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            return f"{path} is not an SQLite database"
    return None


def check_storage(url: str, source: str, field: str = "storage") -> None:
    """Raise a :class:`ConfigError` naming ``url`` if the study cannot be stored there; writes nothing."""
    if url.startswith(JOURNAL_PREFIX):
        problem = _journal_problem(Path(url.removeprefix(JOURNAL_PREFIX)))
    else:
        problem = _rdb_problem(url)
    if problem:
        raise storage_error(source, field, url, problem)


def journal_path(url: str) -> Path | None:
    return Path(url.removeprefix(JOURNAL_PREFIX)) if url.startswith(JOURNAL_PREFIX) else None


def repair_journal_tail(path: Path) -> Path | None:
    """Move a torn last record (bytes after the last newline: a write cut by power loss or a full disk) into a
    backup file beside the journal, under the journal's own lock; returns the backup path, None when intact.

    Optuna skips such a tail when reading but appends the next record straight after it, which makes one
    undecodable line and ends the study for good.
    """
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file() or path.stat().st_size == 0:
        return None
    lock = JournalFileSymlinkLock(str(path))
    acquired = lock.acquire()
    try:
        with open(path, "rb+") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(0, size - (1 << 20))
            fh.seek(start)
            tail = fh.read()
            if tail.endswith(b"\n"):
                return None
            cut = tail.rfind(b"\n")
            if cut < 0 and start > 0:
                return None  # a record longer than 1 MiB: leave it to Optuna
            keep = start + cut + 1
            backup = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            backup.write_bytes(tail[cut + 1 :])
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        if acquired:
            lock.release()
    print(
        f"warning: {path} ended in a torn record ({size - keep} bytes without a newline); moved them to {backup}",
        file=sys.stderr,
    )
    return backup


def open_storage(url: str) -> Any:
    """The Optuna storage behind ``url`` (a journal's folder is created and its torn tail repaired)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path = journal_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_journal_tail(path)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    return url


@contextlib.contextmanager
def workers_lock(url: str) -> Iterator[None]:
    """Serialise "count the study's trials, then ask for one" among the workers of a journal study (an advisory
    ``flock`` on a file beside the journal), so that N workers never start more than ``n_trials`` in total. RDB
    storages have no such lock: there a race may start up to N - 1 extra trials."""
    path = journal_path(url)
    if path is None:
        yield
        return
    import fcntl

    with open(path.with_name(path.name + WORKERS_LOCK_SUFFIX), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def trial_id(storage: Any, study: optuna.Study, number: int) -> int:
    """The storage's id of trial ``number`` of ``study``, through the public storage API (a trial's number is
    per study; its id, which the storage calls take, is per storage)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def fail_as_interrupted(study: optuna.Study, storage: Any, number: int) -> bool:
    """Mark the RUNNING trial ``number`` FAIL with status ``interrupted`` (not counted towards ``n_trials``);
    False when it had already finished (another worker, or its owner, got there first)."""
    import optuna

    tid = trial_id(storage, study, number)
    try:
        storage.set_trial_user_attr(tid, "interrupted", True)
        storage.set_trial_user_attr(tid, "status", TrialStatus.INTERRUPTED)
        storage.set_trial_state_values(tid, optuna.trial.TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True
