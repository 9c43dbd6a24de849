"""What a trial is, for both search backends and the report: its status, its outcome, its configuration id, and
the study directory it belongs to. Reads and describes only: training a trial is :func:`.runner.run_trial`.

Every trial's outcome is stored as Optuna user attributes named by :data:`OUTCOME_KEYS`, so that ``report`` reads
studies of both backends the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config_io import ConfigError, read_json_mapping
from ..spaces import Space, load_space
from ..status import WITH_VALUE, TrialStatus
from .storage import open_storage

if TYPE_CHECKING:
    import optuna

    from ..train import RunSummary

__all__ = [
    "OUTCOME_KEYS",
    "STUDY_FILE",
    "InvalidCombination",
    "TrialDiverged",
    "TrialInterrupted",
    "TrialOutcome",
    "TrialStatus",
    "config_id",
    "load_study",
    "outcome_from_summary",
    "raised_divergence_outcome",
]

STUDY_FILE = "study.json"


class TrialDiverged(Exception):
    """A trial whose training diverged: Optuna records it as FAIL (never as a NaN value) and the study goes on."""


class TrialInterrupted(KeyboardInterrupt):
    """The worker was told to stop (SIGINT, SIGTERM) while it trained a trial: the run checkpointed and stopped.
    Not the trial's outcome: it is failed as interrupted (not counted) and its point queued again, and the search
    ends as after a Ctrl-C (a KeyboardInterrupt, so no ``except Exception`` on the way swallows it)."""

    def __init__(self, cause: str, step: int) -> None:
        super().__init__(f"{cause} at step {step}")
        self.cause, self.step = cause, step

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        return type(self), (self.cause, self.step)


class InvalidCombination(Exception):
    """A sampled combination that the recipe schema rejects."""


def _src(source: str | None = None, *, key: str | None = None) -> dict[str, Any]:
    """The metadata of an outcome field stored as a user attribute named ``key`` (default: the field's name),
    filled from the run summary's attribute ``source`` (``eval.X``: from its evaluation; None: by the caller)."""
    return {"source": source, "key": key}


@dataclass
class TrialOutcome:
    """The outcome of a trial: THE definition of what is stored on it. Every field except ``values`` (the objective
    values) is an Optuna user attribute (:data:`OUTCOME_KEYS`), which both backends write and the report reads; a
    new trial metric is a field here (with its RunSummary source) and a field of RunSummary."""

    status: TrialStatus = field(metadata={"source": "status", "key": None})
    cause: str | None = field(default=None, metadata=_src("cause"))
    diverged_step: int | None = field(default=None, metadata=_src("diverged_step"))
    steps: int | None = field(default=None, metadata=_src("steps"))
    grad_norm_max: float | None = field(default=None, metadata=_src("grad_norm_max"))
    grad_norm_mean: float | None = field(default=None, metadata=_src("grad_norm_mean"))
    loss_spikes: int | None = field(default=None, metadata=_src("loss_spikes"))
    skipped_steps: int | None = field(default=None, metadata=_src("skipped_steps"))
    active_groups: int | None = field(default=None, metadata=_src("active_groups"))
    num_groups: int | None = field(default=None, metadata=_src("num_groups"))
    params: int | None = field(default=None, metadata=_src("params"))
    step_time: float | None = field(default=None, metadata=_src("step_time_s"))
    peak_memory: float | None = field(default=None, metadata=_src("peak_memory_mb"))
    train_nelbo: float | None = field(default=None, metadata=_src("train_nelbo"))
    eval_nelbo: float | None = field(default=None, metadata=_src("eval.nelbo"))
    eval_nll: float | None = field(default=None, metadata=_src("eval.nll"))
    unit: str | None = field(default=None, metadata=_src("unit"))
    train_s: float | None = field(default=None, metadata=_src("wall_s"))
    trial_s: float | None = field(default=None, metadata=_src())
    run_dir: str | None = field(default=None, metadata=_src("out_dir"))
    config_id: str | None = field(default=None, metadata=_src())
    seed: Any = field(default=None, metadata=_src())
    recipe_values: str | None = field(default=None, metadata=_src(key="values"))  # the trial's recipe values as JSON
    seed_runs: str | None = field(default=None, metadata=_src())  # study.aggregate: JSON list of the seed runs
    values: list[float] | None = field(default=None, metadata={"stored": False})  # objective values, if any

    @property
    def attrs(self) -> dict[str, Any]:
        """The user attributes of the trial (JSON-safe: a non-finite float is written as its string)."""
        return {_key(f): _jsonable(getattr(self, f.name)) for f in _stored_fields()}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], values: list[float] | None = None) -> TrialOutcome:
        """The outcome stored as ``attrs`` (keys it lacks are None, unknown keys are ignored)."""
        fields_ = {f.name: attrs.get(_key(f)) for f in _stored_fields()}
        return cls(**{**fields_, "status": TrialStatus(attrs["status"])}, values=values)


def _key(f: Field[Any]) -> str:
    return f.metadata.get("key") or f.name


def _stored_fields() -> list[Field[Any]]:
    return [f for f in fields(TrialOutcome) if f.metadata.get("stored", True)]


OUTCOME_KEYS = tuple(_key(f) for f in _stored_fields())


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


def _from_summary(summary: RunSummary, source: str) -> Any:
    if source.startswith("eval."):
        return (getattr(summary, "eval", None) or {}).get(source[len("eval.") :])
    return getattr(summary, source, None)


def _identity(values: Mapping[str, Any]) -> dict[str, Any]:
    """The outcome fields that name the configuration a run trained."""
    return {
        "config_id": config_id(values),
        "seed": values.get("train.seed"),
        "recipe_values": json.dumps(values, default=str),
    }


def outcome_from_summary(space: Space, summary: RunSummary, values: Mapping[str, Any], trial_s: float) -> TrialOutcome:
    filled = {f.name: _from_summary(summary, f.metadata["source"]) for f in _stored_fields() if f.metadata["source"]}
    outcome = TrialOutcome(**{**filled, "status": TrialStatus(summary.status)}, trial_s=trial_s, **_identity(values))
    if outcome.status in WITH_VALUE:  # completed, collapsed or spiky: the objective values count
        metrics = [_metric(summary, o.metric) for o in space.study.objectives]
        if all(m is not None and math.isfinite(m) for m in metrics):
            outcome.values = [float(m) for m in metrics]  # type: ignore[arg-type]
        else:
            outcome.status, outcome.cause = TrialStatus.DIVERGED, "non-finite objective at the end of the run"
    return outcome


def raised_divergence_outcome(
    values: Mapping[str, Any], cause: str, step: int, run_dir: str | Path, trial_s: float
) -> TrialOutcome:
    """The outcome of a run whose training raised at its first non-finite loss or gradient (``train.nonfinite:
    raise``, ``TrainingDiverged``): diverged at that step, with no summary to read the other figures from."""
    return TrialOutcome(
        status=TrialStatus.DIVERGED,
        cause=cause,
        diverged_step=step,
        run_dir=str(run_dir),
        trial_s=trial_s,
        **_identity(values),
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def load_study(study_dir: str | Path) -> tuple[optuna.Study, Space, dict[str, Any]]:
    """The Optuna study and the space behind a study directory (for `report` and resumes)."""
    import optuna

    root = Path(study_dir)
    info_path = root / STUDY_FILE
    if not info_path.is_file():
        raise ConfigError(str(root), [("", f"not a study directory: {STUDY_FILE} is missing")])
    info = read_json_mapping(info_path, required=("study_name", "space_file", "storage"))
    space_file = Path(info["space_file"])
    space = load_space(space_file if space_file.is_file() else root / "space.yaml")
    try:
        study = optuna.load_study(study_name=info["study_name"], storage=open_storage(info["storage"]))
    except KeyError:  # Optuna's "Record does not exist"
        problem = ("study_name", f"no study {info['study_name']!r} in the storage {info['storage']}")
        raise ConfigError(str(info_path), [problem]) from None
    return study, space, info
