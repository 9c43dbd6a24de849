"""Experiment trackers: MLflow and Weights & Biases, behind one small interface.

A training run is one tracked run (parameters, per-step metrics, final values, status, the resolved recipe and a
sample grid as artifacts). A search is a parent MLflow run (or a W&B group) with one child run per trial.
``train.py`` calls :func:`on_step` at every log step; it is a no-op unless a tracker is active. The Optuna
integrations (optuna-integration's MLflow and W&B callbacks) are deprecated since its 4.9 and moving to OptunaHub,
which loads code at run time, so both trackers use their library's own API.

mlflow, wandb and optuna are imported only when a tracker is opened; a missing extra is a :class:`TrackingError`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .status import TrialStatus

if TYPE_CHECKING:
    import optuna

    from .schema import Recipe, TrackingConfig
    from .spaces import Space

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"  # in a study directory: the parent run to reuse when the search continues
# MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE=true: the local default is a SQLite file with
# the artifacts in a folder beside it (what `mlflow ui --backend-store-uri sqlite:///mlflow.db` shows).
DEFAULT_MLFLOW_DB = "mlflow.db"
DEFAULT_MLFLOW_ARTIFACTS = "mlartifacts"
DEFAULT_PROJECT = "nvae-search"
# A run's or trial's status → MLflow run status (FINISHED, FAILED or KILLED; W&B: exit code 1 for FAILED, else 0).
# Ended on purpose (pruned, stopped, rejected untrained, cut off by a kill) is KILLED; a status missing here (one
# added to TrialStatus later) is FAILED, as is a string that is no status at all.
MLFLOW_STATUS: dict[TrialStatus, str] = {
    TrialStatus.COMPLETED: "FINISHED",
    TrialStatus.COLLAPSED: "FINISHED",  # trained to the end: flagged, with its values
    TrialStatus.SPIKY: "FINISHED",
    TrialStatus.PRUNED: "KILLED",
    TrialStatus.STOPPED: "KILLED",
    TrialStatus.INVALID: "KILLED",
    TrialStatus.OVER_MEMORY: "KILLED",
    TrialStatus.INTERRUPTED: "KILLED",
    TrialStatus.RUNNING: "RUNNING",
    TrialStatus.WAITING: "SCHEDULED",
    TrialStatus.DIVERGED: "FAILED",
    TrialStatus.EXPLODED: "FAILED",
    TrialStatus.FAILED: "FAILED",
    TrialStatus.ERROR: "FAILED",
}
DEFAULT_MLFLOW_STATUS = "FAILED"
# No sample grid for a run whose weights are not worth sampling, or that never trained.
NO_SAMPLES = frozenset({TrialStatus.DIVERGED, TrialStatus.EXPLODED, TrialStatus.INVALID, TrialStatus.OVER_MEMORY})
FINAL_KEYS = ("train_nelbo", "steps", "grad_norm_max", "loss_spikes", "skipped_steps", "active_groups", "params")
SAMPLE_GRID_IMAGES = 16
EXTRAS = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


class TrackingError(Exception):
    """A tracker that cannot be used (its extra is not installed): a user error, exit code 2."""


class StepSink(Protocol):
    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None: ...


class RunTracker(StepSink, Protocol):
    """One training run."""

    def finish(self, run_dir: Path, summary: Mapping[str, Any] | None) -> None: ...


class StudyTracker(Protocol):
    """One search: wraps the objective (each trial a tracked run) and adds study callbacks."""

    def wrap(self, objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]: ...

    def callbacks(self) -> list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]]: ...

    def log_finished(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Track a trial that trained in another process (a Ray worker), once it has ended."""

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------- the step hook
_SINKS: list[StepSink] = []


def on_step(step: int, metrics: Mapping[str, Any]) -> None:
    """Called by the training loop at every log step (main rank only)."""
    for sink in _SINKS:
        sink.log_step(step, metrics)


@contextmanager
def sending_steps_to(sink: StepSink) -> Iterator[None]:
    _SINKS.append(sink)
    try:
        yield
    finally:
        _SINKS.remove(sink)


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics line, per-group lists spread out as ``kl_per_group/03``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
        elif isinstance(value, list):
            out.update({f"{key}/{i:02d}": float(v) for i, v in enumerate(value) if isinstance(v, (int, float))})
    return out


def final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    values = {f"final/{k}": summary.get(k) for k in FINAL_KEYS}
    for key, value in (summary.get("eval") or {}).items():
        values[f"final/eval_{key}"] = value
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else value
    return out


def as_status(value: Any, default: TrialStatus = TrialStatus.FAILED) -> TrialStatus:
    """The :class:`TrialStatus` a summary or user attribute holds; ``default`` for none or an unknown string."""
    try:
        return TrialStatus(str(value))
    except ValueError:
        return default


def mlflow_status(status: TrialStatus) -> str:
    return MLFLOW_STATUS.get(status, DEFAULT_MLFLOW_STATUS)


def _require(backend: str) -> Any:
    module, extra = EXTRAS[backend]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackingError(f"--track {backend} needs the {extra} extra: pip install 'nvae-search[{extra}]'") from None


def sample_grid(run_dir: Path) -> Path | None:
    """A PNG grid of samples from the run's checkpoint (at the recipe's eval temperature), for the tracker."""
    if not (run_dir / "checkpoint.pt").is_file():
        return None
    from .outputs import write_samples
    from .runs import load_run

    run = load_run(run_dir)
    return write_samples(run, n=SAMPLE_GRID_IMAGES, temperatures=[run.recipe.eval.temperature], fmt="grid", out=None)


def _artifacts(run_dir: Path, with_samples: bool) -> list[Path]:
    from .rundir import RESOLVED_RECIPE

    found = [run_dir / name for name in (RESOLVED_RECIPE, "summary.json", "params.json") if (run_dir / name).is_file()]
    if with_samples:
        grid = sample_grid(run_dir)
        if grid is not None:
            found.append(grid)
    return found


def _read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _run_dir(trial: optuna.trial.FrozenTrial) -> Path | None:
    recorded = trial.user_attrs.get("run_dir")
    return Path(str(recorded)) if recorded else None


def _logged_steps(run_dir: Path | None) -> list[dict[str, Any]]:
    """The log lines of a run directory's ``metrics.jsonl`` (for a trial that trained in another process)."""
    from .config_io import read_jsonl

    path = None if run_dir is None else run_dir / "metrics.jsonl"
    if path is None or not path.is_file():
        return []
    return [row for row in read_jsonl(path) if isinstance(row.get("step"), int)]


# ------------------------------------------------------------------------------------------------ MLflow
def mlflow_uri(cfg: TrackingConfig, base: Path) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else a local SQLite store ``mlflow.db`` in ``base``."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(base / DEFAULT_MLFLOW_DB).resolve()}"


def _use_experiment(mlflow: Any, name: str, uri: str) -> Any:
    """Select (creating if needed) the experiment; a local SQLite store keeps its artifacts beside the file."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / DEFAULT_MLFLOW_ARTIFACTS).as_uri()
        mlflow.create_experiment(name, artifact_location=location)
    return mlflow.set_experiment(name)


class MlflowRun:
    """A training run as one MLflow run."""

    def __init__(self, cfg: TrackingConfig, recipe: Recipe, base: Path) -> None:
        self.mlflow = _require("mlflow")
        uri = mlflow_uri(cfg, base)
        self.mlflow.set_tracking_uri(uri)
        _use_experiment(self.mlflow, cfg.project or DEFAULT_PROJECT, uri)
        self.run = self.mlflow.start_run(run_name=recipe.name)
        params = flat_params(recipe.model_dump(mode="json", exclude={"tracking"}))
        self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics(scalar_metrics(metrics), step=step)

    def finish(self, run_dir: Path, summary: Mapping[str, Any] | None) -> None:
        summary = summary or _read_summary(run_dir) or {}
        status = as_status(summary.get("status"))
        self.mlflow.log_metrics(final_metrics(summary))
        self.mlflow.set_tags({"status": status, "cause": str(summary.get("cause"))})
        for path in _artifacts(run_dir, with_samples=status not in NO_SAMPLES):
            self.mlflow.log_artifact(str(path))
        self.mlflow.end_run(status=mlflow_status(status))


class MlflowStudy:
    """The study as a parent MLflow run and each trial as a child run, with MLflow's own API.

    (optuna-integration's MLflowCallback is deprecated since optuna-integration 4.9 and logs a trial only after it
    ends, so the per-step metrics would need a second mechanism anyway.)
    """

    def __init__(self, cfg: TrackingConfig, space: Space, study_dir: Path) -> None:
        self.mlflow = _require("mlflow")
        self.study_dir, self.space = study_dir, space
        uri = mlflow_uri(cfg, study_dir.parent)
        self.mlflow.set_tracking_uri(uri)
        self.experiment = _use_experiment(self.mlflow, cfg.project or space.study.name, uri)
        self.parent = self.mlflow.start_run(run_name=space.study.name, run_id=self._previous_parent(uri))
        atomic_json(study_dir / TRACKING_FILE, {"mlflow_uri": uri, "mlflow_parent_run_id": self.parent.info.run_id})
        self.mlflow.set_tags({"optuna.study": space.study.name, "kind": "study"})
        if space.source is not None:
            self.mlflow.log_artifact(str(space.source))

    def _previous_parent(self, uri: str) -> str | None:
        path = self.study_dir / TRACKING_FILE
        if not path.is_file():
            return None
        info = json.loads(path.read_text())
        return info.get("mlflow_parent_run_id") if info.get("mlflow_uri") == uri else None

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics(scalar_metrics(metrics), step=step)

    def wrap(self, objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
        import optuna

        def tracked(trial: optuna.Trial) -> Any:
            self._start_child(trial.number)
            status = TrialStatus.FAILED  # the objective raised before it recorded a status
            try:
                with sending_steps_to(self):
                    result = objective(trial)
                self._log_values(result)
                status = TrialStatus.COMPLETED
                return result
            except optuna.TrialPruned:
                status = as_status(trial.user_attrs.get("status"), default=TrialStatus.PRUNED)
                raise
            except Exception:
                status = as_status(trial.user_attrs.get("status"))
                raise
            finally:
                self._log_trial(trial)
                self.mlflow.end_run(status=mlflow_status(status))

        return tracked

    def _start_child(self, number: int) -> None:
        self.mlflow.start_run(
            run_name=f"{self.space.study.name}-{number:04d}",
            nested=True,
            experiment_id=self.experiment.experiment_id,
            tags={"optuna.study": self.space.study.name, "optuna.trial": str(number)},
        )

    def log_finished(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """The child run of a trial that trained elsewhere: its steps read back from ``metrics.jsonl``, then what
        :meth:`wrap` logs."""
        self._start_child(trial.number)
        try:
            for metrics in _logged_steps(_run_dir(trial)):
                self.log_step(metrics["step"], metrics)
            if trial.values:
                self._log_values(trial.values)
            self._log_trial(trial)
        finally:
            self.mlflow.end_run(status=mlflow_status(as_status(trial.user_attrs.get("status"))))

    def _log_values(self, result: Any) -> None:
        values = list(result) if isinstance(result, (list, tuple)) else [result]
        names = [f"objective/{objective.metric}" for objective in self.space.study.objectives]
        self.mlflow.log_metrics(dict(zip(names, map(float, values), strict=True)))

    def _log_trial(self, trial: optuna.Trial | optuna.trial.FrozenTrial) -> None:
        self.mlflow.log_params({k: str(v)[:500] for k, v in trial.params.items()})
        attrs = {k: str(v)[:5000] for k, v in trial.user_attrs.items() if k != "values"}
        self.mlflow.set_tags(attrs)  # status (completed, diverged, pruned, invalid), cause, step, ...
        run_dir = Path(trial.user_attrs.get("run_dir", ""))
        summary = _read_summary(run_dir) if run_dir.is_dir() else None
        if summary is None:
            return  # an invalid combination never trained
        self.mlflow.log_metrics(final_metrics(summary))
        for path in _artifacts(run_dir, with_samples=as_status(summary.get("status")) not in NO_SAMPLES):
            self.mlflow.log_artifact(str(path))

    def callbacks(self) -> list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]]:
        return []

    def close(self) -> None:
        self.mlflow.end_run()


# ----------------------------------------------------------------------------------------- W&B
class WandbRun:
    """A training run, or one trial of a search (grouped by study), as one W&B run. Offline with WANDB_MODE."""

    def __init__(self, cfg: TrackingConfig, name: str, config: Mapping[str, Any], run_dir: Path, **kwargs: Any):
        self.wandb = _require("wandb")
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(
            project=cfg.project or DEFAULT_PROJECT,
            name=name,
            config=dict(config),
            dir=str(run_dir),
            reinit="create_new",
            **({"settings": self.wandb.Settings(base_url=cfg.uri)} if cfg.uri else {}),
            **kwargs,
        )

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log(scalar_metrics(metrics), step=step)

    def finish(self, run_dir: Path, summary: Mapping[str, Any] | None, state: TrialStatus | None = None) -> None:
        summary = summary or _read_summary(run_dir) or {}
        status = state or as_status(summary.get("status"))
        self.run.summary.update({**final_metrics(summary), "status": str(status), "cause": summary.get("cause")})
        for path in _artifacts(run_dir, with_samples=status not in NO_SAMPLES):
            if path.suffix == ".png":
                self.run.log({"samples": self.wandb.Image(str(path))})
            self.run.save(str(path), base_path=str(run_dir), policy="now")
        self.run.finish(exit_code=1 if mlflow_status(status) == "FAILED" else 0)


class WandbStudy:
    """Each trial a W&B run in a group named after the study (W&B has no parent runs)."""

    def __init__(self, cfg: TrackingConfig, space: Space, study_dir: Path) -> None:
        _require("wandb")
        self.cfg, self.space, self.study_dir = cfg, space, study_dir

    def wrap(self, objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
        from .rundir import TRIALS_DIR

        def tracked(trial: optuna.Trial) -> Any:
            run_dir = self.study_dir / TRIALS_DIR / f"{trial.number:04d}"
            run = self._trial_run(trial.number, run_dir)
            state = TrialStatus.FAILED
            try:
                with sending_steps_to(run):
                    result = objective(trial)
                run.run.config.update(trial.params)
                state = TrialStatus.COMPLETED
                return result
            except BaseException as exc:
                run.run.config.update(trial.params)
                cut_off = isinstance(exc, (KeyboardInterrupt, SystemExit))
                state = as_status(trial.user_attrs.get("status"), TrialStatus.INTERRUPTED if cut_off else state)
                raise
            finally:
                run.finish(run_dir, _read_summary(run_dir), state)

        return tracked

    def _trial_run(self, number: int, run_dir: Path) -> WandbRun:
        name = f"{self.space.study.name}-{number:04d}"
        return WandbRun(self.cfg, name, {}, run_dir, group=self.space.study.name, job_type="trial")

    def log_finished(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """The W&B run of a trial that trained elsewhere: its steps read back from ``metrics.jsonl``."""
        from .rundir import TRIALS_DIR

        run_dir = _run_dir(trial) or self.study_dir / TRIALS_DIR / f"{trial.number:04d}"
        run = self._trial_run(trial.number, run_dir)
        for metrics in _logged_steps(run_dir):
            run.log_step(metrics["step"], metrics)
        run.run.config.update(trial.params)
        run.finish(run_dir, _read_summary(run_dir), as_status(trial.user_attrs.get("status")))

    def callbacks(self) -> list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]]:
        return []

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------- opening
def atomic_json(path: Path, payload: Mapping[str, Any]) -> None:
    from .config_io import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2))


def open_run_tracker(cfg: TrackingConfig | None, recipe: Recipe, run_dir: Path) -> RunTracker | None:
    """The tracker of a `train` run, or None when tracking is off."""
    if cfg is None or cfg.backend == "none":
        return None
    if cfg.backend == "mlflow":
        return MlflowRun(cfg, recipe, Path.cwd())
    return WandbRun(cfg, recipe.name, flat_params(recipe.model_dump(mode="json", exclude={"tracking"})), run_dir)


def open_study_tracker(cfg: TrackingConfig | None, space: Space, study_dir: Path) -> StudyTracker | None:
    if cfg is None or cfg.backend == "none":
        return None
    study_dir.mkdir(parents=True, exist_ok=True)
    if cfg.backend == "mlflow":
        return MlflowStudy(cfg, space, study_dir)
    return WandbStudy(cfg, space, study_dir)


def study_tracking(
    cfg: TrackingConfig | None,
    space: Space,
    study_dir: Path,
    objective: Callable[[optuna.Trial], Any],
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] | None,
) -> tuple[Callable[[optuna.Trial], Any], list[Callable[..., None]] | None, Callable[[], None]]:
    """The objective and callbacks of a search with its tracker added, and the function that closes it."""
    tracker = open_study_tracker(cfg, space, study_dir)
    if tracker is None:
        return objective, callbacks, lambda: None
    return tracker.wrap(objective), [*(callbacks or []), *tracker.callbacks()], tracker.close


@contextmanager
def tracked_run(cfg: TrackingConfig | None, recipe: Recipe, run_dir: Path) -> Iterator[Callable[[Any], None]]:
    """For `train`: a tracker that receives the steps while the block runs; call the yielded function with the
    run's summary (a dict) to close it. A run that raises is closed as failed."""
    tracker = open_run_tracker(cfg, recipe, run_dir)
    if tracker is None:
        yield lambda summary: None
        return
    done = False

    def finish(summary: Any) -> None:
        nonlocal done
        done = True
        tracker.finish(run_dir, summary)

    with sending_steps_to(tracker):
        try:
            yield finish
        finally:
            if not done:
                tracker.finish(run_dir, {"status": TrialStatus.FAILED})
