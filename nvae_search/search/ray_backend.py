"""The Ray Tune backend: the same study, space and trial directories as the Optuna backend, run on a Ray cluster.

``run_ray_search(space)`` drives Ray Tune with :mod:`.ray_searcher` (Ray's public ``Searcher`` API on Optuna's
``ask``/``tell``, told into the **same Optuna storage** as the in-process backend: ``study.json``, ``report`` and
optuna-dashboard see Ray trials like any other) over trials trained by :mod:`.ray_trainable`. This module adds:

- **Re-running the command resumes the search.** The Tune experiment lives in ``<study dir>/ray/<name>``; if it
  did not finish, ``Tuner.restore(..., resume_unfinished=True, resume_errored=True)`` continues it; if it did,
  or if a file Tune restores from is missing or torn (:func:`unrestorable_reason`), a new experiment runs the
  trials still missing from ``n_trials``.
- **Connecting to Ray** (:func:`init_ray`): a local instance, the cluster of this machine, or a remote head.
- **Resources**: ``ray.resources_per_trial`` per trial, or one placement-group bundle for a data-parallel trial.

Ray (and Optuna) are imported inside functions only, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickletools
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config_io import ConfigError, atomic_write_text
from .ray_searcher import METRIC, PLACEHOLDER, after_each_trial, make_searcher
from .ray_searcher import decide as _decide  # noqa: F401 - where tests have always found it
from .ray_trainable import ATTEMPTS_LOG, RANKS_LOG, TRIAL_PREFIX, ray_trial, reports_per_trial
from .ray_trainable import trial_recipe as _trial_recipe  # noqa: F401 - where tests have always found it
from .retention import RAY_DIR
from .runner import (
    _enqueue_warm_start,
    finished_trials,
    open_study,
    optuna_log_file,
    recover_interrupted,
    study_dir_for,
)
from .storage import fail_as_interrupted

if TYPE_CHECKING:
    import optuna

    from ..schema import TrackingConfig
    from ..spaces import Space
    from ..tracking import StudyTracker

__all__ = [
    "ATTEMPTS_LOG",
    "METRIC",
    "PLACEHOLDER",
    "RANKS_LOG",
    "RAY_DIR",
    "TRIAL_PREFIX",
    "init_ray",
    "reports_per_trial",
    "run_ray_search",
]

DRIVER_LOCK = ".driver.lock"  # in <study>/ray/: held by the one driver of the study's Ray experiments
EXPERIMENT_INFO = "{name}.nvae.json"  # next to each Tune experiment folder: what it was started for
# What Tune reads to restore an experiment: (file pattern, format); for each pattern the newest file (by name) counts.
# ``search_gen_state`` is a pickle despite its name; our searcher's own state is JSON (``StudyBridge.save``).
RESTORED_FILES = (
    ("tuner.pkl", "pickle"),
    ("experiment_state-*.json", "json"),
    ("search_gen_state-*.json", "pickle"),
    ("searcher-state-*.pkl", "json"),
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- Ray setup
def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _export_package_path() -> None:
    """Put this package on PYTHONPATH so the workers of a local cluster (which inherit the environment) can
    import it even when it is not installed; on an existing cluster it must be installed on every node."""
    root = _package_root()
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


def init_ray(address: str | None = "local", **kwargs: Any) -> bool:
    """Connect to (or start) Ray unless this process already did; True when this call initialised it.

    ``local`` (or None): a fresh single-machine instance, ``ray.init(address="local", num_cpus=os.cpu_count(),
    include_dashboard=False)``; ``address="local"`` also sidesteps a stale ``ray_current_cluster`` file.
    ``auto``: the cluster started on this machine by ``ray start``. ``HOST:PORT``: a remote head; Ray ≥ 2.59 has
    token authentication on, so ``RAY_AUTH_MODE=token`` is set when unset (the token comes from
    ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``), otherwise ``ray.init`` retries ``InvalidAuthToken`` forever.
    """
    import ray

    if ray.is_initialized():
        return False
    _export_package_path()
    address = address or "local"
    if address == "local":
        options: dict[str, Any] = {"num_cpus": os.cpu_count(), "include_dashboard": False, **kwargs}
        ray.init(address="local", **options)
    elif address == "auto" or address.startswith("ray://"):
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        ray.init(address=address, **kwargs)
    return True


# ------------------------------------------------------------------------------------------- the search
def _experiments(exp_root: Path) -> list[tuple[int, str, dict[str, Any]]]:
    found = []
    for info_file in exp_root.glob(EXPERIMENT_INFO.format(name="*")):
        try:
            info = json.loads(info_file.read_text())
            found.append((int(info["index"]), str(info["name"]), info))
        except (OSError, ValueError, KeyError):
            continue
    return sorted(found)


def _write_experiment_info(exp_root: Path, info: dict[str, Any]) -> None:
    exp_root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(exp_root / EXPERIMENT_INFO.format(name=info["name"]), json.dumps(info, indent=2))


def unrestorable_reason(experiment_dir: Path) -> str | None:
    """Why Tune could not restore this experiment folder, or None when every file it reads is there and whole.

    Tune copies its experiment state from the driver's staging folder to ``<study>/ray/<name>`` in a background
    thread, so a driver killed mid-copy leaves a truncated file; one killed before the first copy leaves none.
    ``Tuner.restore`` then logs "Failed to restore the run state" and restarts the experiment from its saved
    searcher, which has run too few trials or waited for ever. Checking first lets the search start a new
    experiment for the missing trials instead. Pickles are parsed (``pickletools``), never loaded.
    """
    for pattern, kind in RESTORED_FILES:
        candidates = sorted(experiment_dir.glob(pattern))
        if not candidates:
            return f"{experiment_dir / pattern} is missing"
        newest = candidates[-1]
        try:
            data = newest.read_bytes()
            if kind == "json":
                json.loads(data)
            else:
                for _ in pickletools.genops(data):
                    pass
        except (OSError, ValueError) as err:
            return f"{newest} is unreadable or truncated ({type(err).__name__}: {err})"
    return None


def _fit_completed(results: Any) -> bool:
    """Whether ``Tuner.fit`` ran its experiment to the end (every trial TERMINATED or ERROR), rather than
    returning early after a SIGINT."""
    return results.num_terminated + results.num_errors == len(results)


def _fail_orphans(study: optuna.Study, storage: Any) -> int:
    """After a finished fit, RUNNING Optuna trials of this study were asked by a driver that died before Tune
    recorded them (Tune has since run replacements): mark them FAIL, not counted, not re-queued."""
    import optuna

    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return sum(fail_as_interrupted(study, storage, trial.number) for trial in stale)


def _make_trainable(space: Space, study_dir: Path) -> Any:
    from ray import tune

    space.base_recipe_data()  # read the base recipe here, so the workers need not see the file
    fn = tune.with_parameters(ray_trial, space=space, study_dir=str(study_dir), driver_cwd=os.getcwd())
    res = space.ray.resources_per_trial
    workers = space.ray.workers_per_trial
    if workers > 1:
        total_gpu = res.gpu * workers
        if total_gpu > 1 and total_gpu != int(total_gpu):
            raise ConfigError(
                str(space.source or "<space>"),
                [
                    (
                        "ray.resources_per_trial.gpu",
                        f"{workers} workers × {res.gpu} GPU = {total_gpu} GPUs per trial: Ray accepts fractional GPUs "
                        "only below 1 (give each worker a whole GPU, or use fewer workers)",
                    )
                ],
            )
        # One bundle: the trial's DDP workers are local processes of the trial, so they share one node.
        bundle = {"CPU": res.cpu * workers, **({"GPU": res.gpu * workers} if res.gpu else {})}
        return tune.with_resources(fn, tune.PlacementGroupFactory([bundle]))
    return tune.with_resources(fn, {"cpu": res.cpu, "gpu": res.gpu})


def _make_tuner(
    space: Space, study_dir: Path, url: str, name: str, num_samples: int, trainable: Any, *, verbose: bool = False
) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    cfg = space.ray
    searcher = make_searcher(space, url, str(study_dir.resolve()))
    if cfg.scheduler.type == "asha":
        scheduler: Any = ASHAScheduler(
            time_attr="training_iteration",
            metric=METRIC,
            mode="min",
            max_t=reports_per_trial(space),
            grace_period=cfg.scheduler.grace_period,
            reduction_factor=cfg.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    timeout = space.study.timeout_minutes * 60 if space.study.timeout_minutes else None
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent),
            scheduler=scheduler,
            num_samples=num_samples,
            reuse_actors=cfg.reuse_actors,
            time_budget_s=timeout,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str((study_dir / RAY_DIR).resolve()),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=1 if verbose else 0,  # Ray's own tables only on request: the driver shows the search view
        ),
    )


def _restore_tuner(space: Space, exp_root: Path, name: str, trainable: Any) -> Any:
    """The unfinished Tune experiment ``name``; one saved by a version whose searcher no longer exists is a
    :class:`ConfigError` saying how to start a new experiment for the missing trials instead."""
    from ray import tune

    try:
        return tune.Tuner.restore(
            str(exp_root / name), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    except (AttributeError, ImportError) as err:  # pickle cannot find a class of the saved experiment
        info_file = exp_root / EXPERIMENT_INFO.format(name=name)
        reason = (
            f"the unfinished Ray experiment {exp_root / name} was saved by another version of nvae-search and cannot "
            f'be restored ({err}); set "done": true in {info_file} to run the missing trials in a new experiment'
        )
        raise ConfigError(str(space.source or "<space>"), [("ray", reason)]) from None


def _quiet_ray(verbose: bool) -> dict[str, Any]:
    """``ray.init`` options: the driver shows the search view; Ray's own experiment table, INFO lines and the
    trials' forwarded output only with -v (trial errors stay in Ray's result files and the trials' status)."""
    if verbose:
        return {}
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter is silent at verbose=0
    # Advice to checkpoint less often, printed whenever trials report quickly (a 3-line warning every few seconds
    # through the trial lines); 0 is Ray's documented switch to turn it off.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    token_setup = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if _token_auth_notice not in token_setup.filters:
        token_setup.addFilter(_token_auth_notice)
    return {"log_to_driver": False, "logging_level": logging.WARNING}


def _token_auth_notice(record: logging.LogRecord) -> bool:
    # Ray says at every local start that token authentication is on (a notice, the default); the warning that it
    # is off, a security matter, still shows.
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _fit(tuner: Any, space: Space, study_dir: Path, tracker: StudyTracker | None) -> Any:
    """``tuner.fit()`` with the Optuna backend's callbacks after each trial: ``budget.keep_checkpoints`` and, with a
    tracker, the trial as a tracked run once it has ended."""
    from .retention import checkpoint_callback

    callbacks = [checkpoint_callback(space, study_dir), *([tracker.log_finished] if tracker is not None else [])]
    with optuna_log_file(study_dir), after_each_trial(callbacks):
        return tuner.fit()


@contextlib.contextmanager
def sole_driver(space: Space, exp_root: Path) -> Iterator[None]:
    """Hold ``<study>/ray/.driver.lock`` while this process drives the study's Ray experiments. A second driver
    would restore the experiment the first is running and train its trials twice; it gets a :class:`ConfigError`
    naming the holder instead. The operating system releases the lock of a driver that dies, so a killed driver
    leaves nothing to clean up. (``flock``: one host, or a shared file system that supports it.)"""
    import fcntl

    exp_root.mkdir(parents=True, exist_ok=True)
    with open(exp_root / DRIVER_LOCK, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process"
            reason = (
                f"another driver ({holder}) is running the Ray search of this study ({exp_root.parent}); "
                "wait for it to end, or stop it, and run the command again"
            )
            raise ConfigError(str(space.source or "<space>"), [("ray", reason)]) from None
        try:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_ray_search(
    space: Space,
    *,
    address: str | None = None,
    n_trials: int | None = None,
    storage: str | None = None,
    root: str | Path = "runs",
    on_start: Callable[[optuna.Study, int], None] | None = None,
    verbose: bool = False,
    tracking: TrackingConfig | None = None,
) -> Path:
    """Run (or continue) the study on Ray Tune; returns the study directory (same layout as the Optuna backend,
    trial runs in ``trials/ray_<tune trial id>/``, the Tune experiment in ``ray/<study name>``).

    ``address``: ``local`` (default: ``space.ray.address``), ``auto`` or ``HOST:PORT``; a process that already
    called ``ray.init`` keeps its instance. Re-running after the driver was killed restores the unfinished Tune
    experiment (trials continue from their last checkpoint); re-running after it finished starts a new
    experiment for the trials still missing from ``n_trials`` (default ``study.n_trials``). ``tracking``
    replaces the space's ``tracking:`` (e.g. from ``--track``); each trial is tracked once it has ended. One
    driver per study: while one runs, another gets a :class:`ConfigError` (:func:`sole_driver`).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_dir = study_dir_for(space, root).resolve()
    study, store, url = open_study(space, study_dir, storage, "ray")  # nothing written if the storage is unusable
    target = n_trials if n_trials is not None else space.study.n_trials
    driver = _Driver(space, study_dir, study, store, url, target, address, verbose, tracking)
    with sole_driver(space, driver.exp_root):
        while driver.run_experiment(on_start):
            on_start = None
    return study_dir


@dataclasses.dataclass(frozen=True)
class _Driver:
    """What the Tune experiments of one :func:`run_ray_search` call share."""

    space: Space
    study_dir: Path
    study: optuna.Study
    store: Any
    url: str
    target: int  # finished trials the study must reach
    address: str | None
    verbose: bool
    tracking: TrackingConfig | None
    # Experiments this call restored. One is never restored twice: a restored experiment that completes has ended,
    # whatever its info file says, so the loop of experiments always makes progress (a lost "done" mark would
    # otherwise restore the same finished experiment for ever).
    restored: set[str] = dataclasses.field(default_factory=set)

    @property
    def exp_root(self) -> Path:
        return self.study_dir / RAY_DIR

    def latest_experiment(self) -> tuple[tuple[int, str, dict[str, Any]] | None, bool]:
        """The study's newest Tune experiment (index, name, info) and whether to restore it: not done, not restored
        before by this call, and every file Tune restores from there and whole (else it is recorded as abandoned)."""
        from ray import tune  # reading the experiment folder needs no running Ray

        experiments = _experiments(self.exp_root)
        if not experiments:
            return None, False
        latest = experiments[-1]
        _index, name, info = latest
        if info.get("done") or name in self.restored or not tune.Tuner.can_restore(str(self.exp_root / name)):
            return latest, False
        reason = unrestorable_reason(self.exp_root / name)
        if reason is None:
            return latest, True
        # The trials it was running are failed as interrupted and queued again by recover_interrupted.
        logger.warning("cannot restore the Ray experiment %s: %s; starting a new one", name, reason)
        _write_experiment_info(self.exp_root, {**info, "done": True, "abandoned": reason})
        return latest, False

    def run_experiment(self, on_start: Callable[[optuna.Study, int], None] | None) -> bool:
        """One Tune experiment (restored or new), this process being the study's only driver; True when another
        experiment must follow."""
        space, study_dir, study, store, exp_root = self.space, self.study_dir, self.study, self.store, self.exp_root
        latest, restore = self.latest_experiment()
        if not restore:
            recover_interrupted(study, store)  # RUNNING trials of a search that left nothing to restore
            _enqueue_warm_start(study, space, study_dir)
            remaining = self.target - finished_trials(study)
            if remaining <= 0:
                return False

        from ..tracking import open_study_tracker

        # A tracker whose extra is missing fails here, before Ray starts.
        tracker = open_study_tracker(self.tracking or space.tracking, space, study_dir)
        if on_start is not None:
            on_start(study, self.target)
        owns = completed = False
        try:
            owns = init_ray(self.address or space.ray.address, **_quiet_ray(self.verbose))
            trainable = _make_trainable(space, study_dir)
            if restore:
                assert latest is not None
                _index, name, info = latest
                self.restored.add(name)
                tuner = _restore_tuner(space, exp_root, name, trainable)
            else:
                index = latest[0] + 1 if latest else 1
                name = space.study.name if index == 1 else f"{space.study.name}-{index}"
                info = {"index": index, "name": name, "num_samples": remaining, "done": False}
                _write_experiment_info(exp_root, info)
                tuner = _make_tuner(space, study_dir, self.url, name, remaining, trainable, verbose=self.verbose)
            results = _fit(tuner, space, study_dir, tracker)
            completed = _fit_completed(results)
            if completed:
                _write_experiment_info(exp_root, {**info, "done": True})
                _fail_orphans(study, store)
        finally:
            if tracker is not None:
                tracker.close()
            if owns:
                import ray

                ray.shutdown()
        # A driver killed between two of Tune's experiment snapshots can leave an experiment that restores fewer
        # trials than it owed; the experiment is now done, so a new one runs the missing trials.
        return restore and completed and finished_trials(study) < self.target
