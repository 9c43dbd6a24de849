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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config_io import ConfigError, read_json_mapping
from ..spaces import Space, load_space
from ..status import TrialStatus
from .storage import open_storage

if TYPE_CHECKING:
    import optuna

    from ..train import RunSummary

__all__ = [
    "OUTCOME_KEYS",
    "STUDY_FILE",
    "InvalidCombination",
    "TrialDiverged",
    "TrialOutcome",
    "TrialStatus",
    "config_id",
    "load_study",
    "outcome_from_summary",
]

STUDY_FILE = "study.json"
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
    def status(self) -> TrialStatus:
        return TrialStatus(self.attrs["status"])


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
        "status": TrialStatus(summary.status),
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
    if summary.status == TrialStatus.COMPLETED:
        metrics = [_metric(summary, o.metric) for o in space.study.objectives]
        if all(m is not None and math.isfinite(m) for m in metrics):
            objective = [float(m) for m in metrics]  # type: ignore[arg-type]
        else:
            attrs.update(status=TrialStatus.DIVERGED, cause="non-finite objective at the end of the run")
    return TrialOutcome({k: _jsonable(v) for k, v in attrs.items()}, objective)


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
