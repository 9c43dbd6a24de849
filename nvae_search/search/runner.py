"""Training one trial, and the in-process Optuna backend.

A study directory ``runs/<study>/`` holds ``study.json`` (where the study is stored), ``space.yaml`` (the space
file as run), the Optuna journal, and one training run per trial under ``trials/NNNN/``. Every trial's outcome
is stored as Optuna user attributes (see :data:`.trial.OUTCOME_KEYS`), so ``report`` works the same for both
backends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config_io import ConfigError, atomic_write_text
from ..rundir import TRIALS_DIR
from ..spaces import Space, apply_params
from ..status import BROKE, TrialStatus
from ..tracking import study_tracking
from .constraints import out_of_memory_as_over_memory
from .instability import with_instability
from .seeds import run_configuration
from .storage import check_storage, fail_as_interrupted, open_storage, resolve_storage_url, workers_lock
from .trial import (
    STUDY_FILE,
    InvalidCombination,
    TrialDiverged,
    TrialInterrupted,
    TrialOutcome,
    outcome_from_summary,
    raised_divergence_outcome,
)
from .trial import load_study as load_study  # where callers of the Optuna backend have always found it

if TYPE_CHECKING:
    import optuna

    from ..schema import Recipe, TrackingConfig


_clock = time.monotonic  # the study's time budget is measured on this (a test replaces it)


def run_trial(
    space: Space,
    values: Mapping[str, Any],
    run_dir: Path,
    report: Callable[[int, dict[str, Any]], bool] | None = None,
    resume: bool = False,
) -> TrialOutcome:
    """Train one configuration into ``run_dir``. ``report(step, metrics)`` returning True stops it as pruned; so
    does the study's instability pruner (the outcome's cause then says why). A search trial (one with ``report``)
    that a signal stops raises :class:`TrialInterrupted`: it was not pruned; seed repeats return it as stopped."""
    from ..train import TrainingDiverged, train

    start = time.perf_counter()
    quiet = trial_recipe(space, values)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "params.json", json.dumps(dict(values), indent=2, default=str))
    # a search trial (one with a reporter) also answers to the instability pruner; seed repeats run to their end
    reporter, instability = with_instability(space, report) if report is not None else (None, lambda: None)
    noting = _NotingStops(reporter) if reporter is not None else None
    try:
        with out_of_memory_as_over_memory():
            summary = train(quiet, run_dir, resume=resume, reporter=noting)
    except TrainingDiverged as err:  # `nonfinite: raise` in a search: an outcome of the configuration, as on Ray
        if noting is None:
            raise  # a seed repeat records it as its error (repeat_error.json), having no summary to read back
        return raised_divergence_outcome(values, str(err), err.step, run_dir, time.perf_counter() - start)
    if noting is not None and summary.status == TrialStatus.STOPPED and not noting.asked:
        raise TrialInterrupted(summary.cause or "stopped", summary.steps)  # by a signal, not by the search
    outcome = outcome_from_summary(space, summary, values, time.perf_counter() - start)
    if outcome.status == TrialStatus.STOPPED and instability():
        outcome.cause = instability()
    return outcome


class _NotingStops:
    """A search trial's reporter that notes whether it asked the run to stop: a run that stopped without being asked
    was stopped by a signal (SIGINT, SIGTERM), which is not an outcome of the configuration."""

    def __init__(self, inner: Callable[[int, dict[str, Any]], bool]) -> None:
        self.inner, self.asked = inner, False

    def __call__(self, step: int, metrics: dict[str, Any]) -> bool:
        stop = self.inner(step, metrics)
        self.asked = self.asked or stop
        return stop


def trial_recipe(space: Space, values: Mapping[str, Any], workers: int = 1, **train_updates: Any) -> Recipe:
    """The recipe a trial trains (both backends): the values applied to the base recipe (a combination the schema
    rejects raises :class:`InvalidCombination`), checked against the space's memory constraint at the batch of one
    of ``workers`` processes before anything is written or built on the device, quiet, logging at the report
    interval; ``train_updates`` are further ``train`` fields."""
    try:
        recipe = apply_params(space, values)
    except ConfigError as err:
        reason = "; ".join(f"{p}: {m}" if p else m for p, m in err.problems)
        raise InvalidCombination(reason) from None
    from .constraints import check_memory_constraint

    check_memory_constraint(space, recipe, workers)
    update = {"progress": False, "log_every": space.budget.report_every_steps, **train_updates}
    return recipe.model_copy(update={"train": recipe.train.model_copy(update=update)})


# ------------------------------------------------------------------------------------------ the study
def study_dir_for(space: Space, root: str | Path = "runs") -> Path:
    return Path(root) / space.study.name


def write_study_file(space: Space, study_dir: Path, storage_url: str, backend: str) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(space.source, study_dir / "space.yaml")
    info = {
        "study_name": space.study.name,
        "space_file": str(Path(space.source).resolve()),
        "storage": storage_url,
        "backend": backend,
    }
    atomic_write_text(study_dir / STUDY_FILE, json.dumps(info, indent=2))


def storage_url(space: Space, study_dir: Path, override: str | None) -> str:
    """A string form of the study's storage, recorded in study.json so `report` finds it."""
    return resolve_storage_url(space, study_dir, override)[0]


def create_study(space: Space, url: str, storage: Any = None) -> optuna.Study:
    """Create or load the study; a storage that cannot be opened is a :class:`ConfigError` naming the URL."""
    import optuna

    from .compile import directions, make_pruner, make_sampler

    try:
        return optuna.create_study(
            study_name=space.study.name,
            storage=storage if storage is not None else open_storage(url),
            sampler=make_sampler(space),
            pruner=make_pruner(space),
            directions=directions(space),
            load_if_exists=True,
        )
    except ConfigError:
        raise
    except ValueError as err:  # e.g. the stored study has other directions than the space
        raise ConfigError(str(space.source or "<space>"), [("storage", f"storage {url!r}: {err}")]) from None
    except Exception as err:
        if type(err).__module__.startswith("sqlalchemy"):
            raise ConfigError(str(space.source or "<space>"), [("storage", f"storage {url!r}: {err}")]) from None
        raise


def finished_trials(study: optuna.Study) -> int:
    """Trials that count towards n_trials: every real outcome, but not trials cut off by a kill."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("interrupted"))


def recover_interrupted(study: optuna.Study, storage: Any, *, unowned_are_stale: bool = True) -> int:
    """Mark trials left RUNNING by a dead worker as failed (interrupted, not counted) and queue their parameters
    again, once (a retry that is itself interrupted is not queued again). Live workers' trials are left alone:
    see :func:`nvae_search.search.workers.is_stale`."""
    import optuna

    from .workers import is_stale

    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not is_stale(trial, unowned_are_stale=unowned_are_stale):
            continue
        if not fail_as_interrupted(study, storage, trial.number):
            continue  # another worker recovered it first, or its owner finished it after all
        recovered += 1
        if trial.params and "retry_of" not in trial.user_attrs:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
    return recovered


def _enqueue_warm_start(study: optuna.Study, space: Space, study_dir: Path) -> None:
    """The promoted configurations of an earlier rung (``study.promote``), then ``study.enqueue``, once."""
    from .compile import enqueue_points
    from .promote import promoted_points

    if study.trials:
        return  # a resumed study already holds its warm-start points
    for point in promoted_points(space, study_dir) + enqueue_points(space):
        study.enqueue_trial(point, skip_if_exists=True)  # a hand-made point may be one of the promoted


def _train_one(space: Space) -> Callable[[Mapping[str, Any], Path, Any, bool], TrialOutcome]:
    return lambda values, run_dir, report, resume: run_trial(space, values, run_dir, report, resume)


def make_objective(space: Space, study_dir: Path) -> Callable[[optuna.Trial], Any]:
    """The Optuna objective: sample, train, and turn the outcome into values, PRUNED or FAIL."""
    import optuna

    from .compile import make_define_by_run

    define = make_define_by_run(space)
    can_prune = not space.study.multi_objective and space.pruner.type != "none"

    def objective(trial: optuna.Trial) -> Any:
        values = define(trial)
        run_dir = study_dir / TRIALS_DIR / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))

        def report(step: int, metrics: dict[str, Any]) -> bool:
            trial.set_user_attr("progress", step)  # the live view's "step k of n" for running trials
            nelbo = float(metrics["nelbo"])
            if not can_prune or not math.isfinite(nelbo):
                return False
            trial.report(nelbo, step)
            return trial.should_prune()

        try:
            outcome = run_configuration(space, values, run_dir, _train_one(space), report)  # once, or per seed
        except InvalidCombination as err:
            trial.set_user_attr("status", getattr(err, "status", TrialStatus.INVALID))  # or over_memory
            trial.set_user_attr("cause", str(err))
            for key, value in getattr(err, "attrs", {}).items():
                trial.set_user_attr(key, value)
            raise optuna.TrialPruned(f"invalid combination: {err}") from None
        for key, value in outcome.attrs.items():
            trial.set_user_attr(key, value)
        if outcome.status in BROKE:  # diverged or exploded: a failure of the configuration
            raise TrialDiverged(
                f"trial {trial.number} {outcome.status} at step {outcome.diverged_step}: {outcome.cause}"
            )
        if outcome.status == TrialStatus.STOPPED:
            trial.set_user_attr("status", TrialStatus.PRUNED)
            raise optuna.TrialPruned()
        assert outcome.values is not None
        return outcome.values[0] if len(outcome.values) == 1 else outcome.values

    return objective


def open_study(space: Space, study_dir: Path, override: str | None, backend: str) -> tuple[optuna.Study, Any, str]:
    """Check the storage, open (or create) the study on it, then record ``study.json``: (study, storage, URL).
    Nothing is written when the storage is unusable (a :class:`ConfigError` naming the URL)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # until optuna_log_file takes over: no INFO lines
    url, source, field = resolve_storage_url(space, study_dir, override)
    check_storage(url, source, field)
    storage = optuna.storages.get_storage(open_storage(url)) if url.startswith("journal:") else None
    if storage is None:
        try:
            storage = optuna.storages.get_storage(url)
        except Exception as err:  # SQLAlchemy cannot connect or create the tables
            raise ConfigError(source, [(field, f"storage {url!r}: {err}")]) from None
    study = create_study(space, url, storage)
    write_study_file(space, study_dir, url, backend)
    return study, storage, url


@contextlib.contextmanager
def optuna_log_file(study_dir: Path) -> Iterator[None]:
    """Optuna's own log lines (warnings such as "Trial 1 failed ...") go to ``optuna.log`` in the study
    directory instead of the terminal, where they would break the live view."""
    import optuna

    logger = logging.getLogger("optuna")
    handler = logging.FileHandler(study_dir / "optuna.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    optuna.logging.disable_default_handler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        optuna.logging.enable_default_handler()


def _run_one(study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], Any]) -> None:
    """Run the objective on an asked trial and tell its outcome, as ``study.optimize`` would; a trial that this
    process is stopped in (Ctrl-C, SIGTERM: :class:`TrialInterrupted`) is left as interrupted and queued again."""
    import optuna

    state, values = optuna.trial.TrialState.COMPLETE, None
    try:
        values = objective(trial)
    except optuna.TrialPruned:
        state = optuna.trial.TrialState.PRUNED
    except TrialDiverged:
        state = optuna.trial.TrialState.FAIL
    except (KeyboardInterrupt, SystemExit):
        trial.set_user_attr("interrupted", True)
        trial.set_user_attr("status", TrialStatus.INTERRUPTED)
        study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        if trial.params and "retry_of" not in trial.user_attrs:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
        raise
    except Exception:
        trial.set_user_attr("status", TrialStatus.FAILED)
        study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        raise
    study.tell(trial, values, state=state, skip_if_finished=True)


def run_optuna_search(
    space: Space,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    root: str | Path = "runs",
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    on_start: Callable[[optuna.Study, int], None] | None = None,
    tracking: TrackingConfig | None = None,
) -> Path:
    """Run (or continue) the study in this process; returns the study directory. ``tracking`` replaces the
    space's ``tracking:`` (e.g. from ``--track``).

    Several processes (on one machine, or on machines sharing the journal file or RDB URL) may run this on one
    study at the same time: ``n_trials`` (default ``study.n_trials``) is the study's total, each worker starts a
    trial only while fewer than that are finished or running, and trials of dead workers are failed as
    interrupted and re-run once (see :mod:`nvae_search.search.workers`).
    """
    import optuna

    from .compile import sampler_exhausted
    from .workers import Heartbeat

    study_dir = study_dir_for(space, root)
    study, store, url = open_study(space, study_dir, storage, "optuna")
    target = n_trials if n_trials is not None else space.study.n_trials
    deadline = _clock() + space.study.timeout_minutes * 60 if space.study.timeout_minutes else None
    from .retention import checkpoint_callback  # budget.keep_checkpoints, after every trial

    objective, callbacks, close_tracker = study_tracking(
        tracking or space.tracking,
        space,
        study_dir,
        make_objective(space, study_dir),
        [checkpoint_callback(space, study_dir), *([on_trial] if on_trial else [])],
    )
    if on_start is not None:
        on_start(study, target)
    with optuna_log_file(study_dir):
        with workers_lock(url):
            _enqueue_warm_start(study, space, study_dir)
        try:
            while deadline is None or _clock() < deadline:  # a trial that started runs to its end
                with workers_lock(url):
                    recover_interrupted(study, store, unowned_are_stale=False)
                    running = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
                    if finished_trials(study) + running >= target or sampler_exhausted(study):
                        break
                    trial = study.ask()
                    heartbeat = Heartbeat(trial).claim()
                with heartbeat:
                    try:
                        _run_one(study, trial, objective)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        # Another worker failed it as stale (no heartbeat for a grace period: storage unreachable
                        # from here); it has been queued again, so this result is dropped and the search goes on.
                        logging.getLogger("optuna").warning("trial %d was taken over by another worker", trial.number)
                        continue
                frozen = study.get_trials(deepcopy=False)[trial.number]
                for callback in callbacks or []:
                    callback(study, frozen)
        finally:
            close_tracker()
    return study_dir
