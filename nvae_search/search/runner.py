"""Backend-neutral trials, and the in-process Optuna backend.

A study directory ``runs/<study>/`` holds ``study.json`` (where the study is stored), ``space.yaml`` (the space
file as run), the Optuna journal, and one training run per trial under ``trials/NNNN/``. Every trial's outcome
is stored as Optuna user attributes (see :data:`OUTCOME_KEYS`), so ``report`` works the same for both backends.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config_io import ConfigError, atomic_write_text
from ..spaces import Space, apply_params, load_space

if TYPE_CHECKING:
    import optuna

    from ..train import RunSummary

STUDY_FILE = "study.json"
TRIALS_DIR = "trials"
OUTCOME_KEYS = (
    "status",
    "cause",
    "diverged_step",
    "steps",
    "grad_norm_max",
    "grad_norm_mean",
    "loss_spikes",
    "skipped_steps",
    "active_groups",
    "num_groups",
    "params",
    "step_time",
    "peak_memory",
    "train_nelbo",
    "eval_nelbo",
    "eval_nll",
    "unit",
    "train_s",
    "trial_s",
    "run_dir",
    "config_id",
    "seed",
    "values",
)


class TrialDiverged(Exception):
    """A trial whose training diverged: Optuna records it as FAIL (never as a NaN value) and the study goes on."""


class InvalidCombination(Exception):
    """A sampled combination that the recipe schema rejects."""


@dataclass
class TrialOutcome:
    attrs: dict[str, Any]
    values: list[float] | None  # objective values; None unless the run completed

    @property
    def status(self) -> str:
        return str(self.attrs["status"])


def config_id(values: Mapping[str, Any]) -> str:
    """A short stable id of a configuration, ignoring the seed (so repeats of one config share it)."""
    key = json.dumps({k: v for k, v in sorted(values.items()) if k != "train.seed"}, sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _metric(summary: RunSummary, metric: str) -> float | None:
    ev = summary.eval or {}
    table: dict[str, Any] = {
        "nll": ev.get("nll"),
        "nelbo": ev.get("nelbo"),
        "train_nelbo": summary.train_nelbo,
        "params": summary.params,
        "step_time": summary.step_time_s,
        "peak_memory": summary.peak_memory_mb,
    }
    value = table[metric]
    return None if value is None else float(value)


def outcome_from_summary(space: Space, summary: RunSummary, values: Mapping[str, Any], trial_s: float) -> TrialOutcome:
    ev = summary.eval or {}
    attrs = {
        "status": summary.status,
        "cause": summary.cause,
        "diverged_step": summary.diverged_step,
        "steps": summary.steps,
        "grad_norm_max": summary.grad_norm_max,
        "grad_norm_mean": summary.grad_norm_mean,
        "loss_spikes": summary.loss_spikes,
        "skipped_steps": summary.skipped_steps,
        "active_groups": summary.active_groups,
        "num_groups": summary.num_groups,
        "params": summary.params,
        "step_time": summary.step_time_s,
        "peak_memory": summary.peak_memory_mb,
        "train_nelbo": summary.train_nelbo,
        "eval_nelbo": ev.get("nelbo"),
        "eval_nll": ev.get("nll"),
        "unit": summary.unit,
        "train_s": summary.wall_s,
        "trial_s": trial_s,
        "run_dir": summary.out_dir,
        "config_id": config_id(values),
        "seed": values.get("train.seed"),
        "values": json.dumps(values, default=str),
    }
    objective = None
    if summary.status == "completed":
        metrics = [_metric(summary, o.metric) for o in space.study.objectives]
        if all(m is not None and math.isfinite(m) for m in metrics):
            objective = [float(m) for m in metrics]  # type: ignore[arg-type]
        else:
            attrs.update(status="diverged", cause="non-finite objective at the end of the run")
    return TrialOutcome({k: _jsonable(v) for k, v in attrs.items()}, objective)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def run_trial(
    space: Space,
    values: Mapping[str, Any],
    run_dir: Path,
    report: Callable[[int, float], bool] | None = None,
    resume: bool = False,
) -> TrialOutcome:
    """Train one configuration into ``run_dir``. ``report(step, nelbo)`` returning True stops it as pruned."""
    from ..train import train

    start = time.perf_counter()
    try:
        recipe = apply_params(space, values)
    except ConfigError as err:
        reason = "; ".join(f"{p}: {m}" if p else m for p, m in err.problems)
        raise InvalidCombination(reason) from None
    from ..memory import check_memory_constraint

    check_memory_constraint(space, recipe)  # before anything is written or built on the device
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "params.json", json.dumps(dict(values), indent=2, default=str))
    reporter = None if report is None else (lambda step, metrics: report(step, float(metrics["nelbo"])))
    quiet = recipe.model_copy(
        update={
            "train": recipe.train.model_copy(update={"progress": False, "log_every": space.budget.report_every_steps})
        }
    )
    summary = train(quiet, run_dir, resume=resume, reporter=reporter)
    return outcome_from_summary(space, summary, values, time.perf_counter() - start)


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
    if override:
        return override
    if space.storage is None:
        return f"journal:{(study_dir / 'study.journal').resolve()}"
    if space.storage.startswith("journal:"):
        return f"journal:{space.resolve_path(space.storage.removeprefix('journal:'))}"
    return space.storage


def open_storage(url: str) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    return url


def load_study(study_dir: str | Path) -> tuple[optuna.Study, Space, dict[str, Any]]:
    """The Optuna study and the space behind a study directory (for `report` and resumes)."""
    import optuna

    root = Path(study_dir)
    info_path = root / STUDY_FILE
    if not info_path.is_file():
        raise ConfigError(str(root), [("", f"not a study directory: {STUDY_FILE} is missing")])
    info = json.loads(info_path.read_text())
    space_file = Path(info["space_file"])
    space = load_space(space_file if space_file.is_file() else root / "space.yaml")
    study = optuna.load_study(study_name=info["study_name"], storage=open_storage(info["storage"]))
    return study, space, info


def create_study(space: Space, url: str) -> optuna.Study:
    import optuna

    from .compile import directions, make_pruner, make_sampler

    return optuna.create_study(
        study_name=space.study.name,
        storage=open_storage(url),
        sampler=make_sampler(space),
        pruner=make_pruner(space),
        directions=directions(space),
        load_if_exists=True,
    )


def finished_trials(study: optuna.Study) -> int:
    """Trials that count towards n_trials: every real outcome, but not trials cut off by a kill."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("interrupted"))


def recover_interrupted(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed search as failed (interrupted) and queue their parameters again."""
    import optuna

    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study._storage.set_trial_user_attr(trial._trial_id, "status", "interrupted")
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
    return len(stale)


def _enqueue_warm_start(study: optuna.Study, space: Space) -> None:
    from .compile import enqueue_points

    if study.trials:
        return  # a resumed study already holds its warm-start points
    for point in enqueue_points(space):
        study.enqueue_trial(point)


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

        def report(step: int, nelbo: float) -> bool:
            if not can_prune or not math.isfinite(nelbo):
                return False
            trial.report(nelbo, step)
            return trial.should_prune()

        try:
            outcome = run_trial(space, values, run_dir, report)
        except InvalidCombination as err:
            trial.set_user_attr("status", getattr(err, "status", "invalid"))  # or over_memory
            trial.set_user_attr("cause", str(err))
            for key, value in getattr(err, "attrs", {}).items():
                trial.set_user_attr(key, value)
            raise optuna.TrialPruned(f"invalid combination: {err}") from None
        for key, value in outcome.attrs.items():
            trial.set_user_attr(key, value)
        if outcome.status == "diverged":
            raise TrialDiverged(
                f"trial {trial.number} diverged at step {outcome.attrs['diverged_step']}: {outcome.attrs['cause']}"
            )
        if outcome.status == "stopped":
            trial.set_user_attr("status", "pruned")
            raise optuna.TrialPruned()
        assert outcome.values is not None
        return outcome.values[0] if len(outcome.values) == 1 else outcome.values

    return objective


def run_optuna_search(
    space: Space,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    root: str | Path = "runs",
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> Path:
    """Run (or continue) the study in this process; returns the study directory."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_dir = study_dir_for(space, root)
    url = storage_url(space, study_dir, storage)
    write_study_file(space, study_dir, url, "optuna")
    study = create_study(space, url)
    recover_interrupted(study)
    _enqueue_warm_start(study, space)
    target = n_trials if n_trials is not None else space.study.n_trials
    remaining = target - finished_trials(study)
    if remaining <= 0:
        return study_dir
    timeout = space.study.timeout_minutes * 60 if space.study.timeout_minutes else None
    callbacks = [on_trial] if on_trial else None
    study.optimize(
        make_objective(space, study_dir),
        n_trials=remaining,
        timeout=timeout,
        catch=(TrialDiverged,),
        callbacks=callbacks,
        gc_after_trial=True,
    )
    return study_dir
