"""The rows of a study's report: one per trial (and per seed repeat), read from the study and the repeat runs,
with the formatting helpers that the tables and plots share, the repeat plan and the per-configuration stability.

Reads only (the seed repeats are trained by :mod:`nvae_search.search.repeats`); Optuna is imported inside the
functions only.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ..spaces import Space
from ..status import BROKE, WITH_VALUE, TrialStatus
from .trajectories import wilson_interval
from .trial import OUTCOME_KEYS, TrialOutcome, config_id, outcome_from_summary

if TYPE_CHECKING:
    import optuna

REPEATS_DIR = "repeats"
# The leaderboard's order of statuses: trained runs first, then what never trained or has not finished.
STATUS_ORDER = (
    TrialStatus.COMPLETED,
    TrialStatus.SPIKY,
    TrialStatus.COLLAPSED,
    TrialStatus.PRUNED,
    TrialStatus.EXPLODED,
    TrialStatus.DIVERGED,
    TrialStatus.FAILED,
    TrialStatus.INVALID,
    TrialStatus.OVER_MEMORY,
    TrialStatus.INTERRUPTED,
    TrialStatus.RUNNING,
    TrialStatus.WAITING,
)
# trained: they count as runs
RUN_STATUSES = WITH_VALUE | BROKE | {TrialStatus.PRUNED, TrialStatus.FAILED}
# finished seeds: the denominator of a configuration's divergence rate (pruned and failed runs say nothing)
FINISHED_STATUSES = WITH_VALUE | BROKE
SEED_PARAM = "train.seed"


@dataclass
class Run:
    """One trial of the study, or one repeat run of a configuration on another seed."""

    trial: int | None  # None for a repeat run
    source: str  # "study" | "repeat"
    state: str  # Optuna state name ("REPEAT" for repeat runs)
    status: TrialStatus
    objectives: list[float | None]  # a pruned trial carries its last intermediate value
    params: dict[str, Any]  # flat searched parameters (trial.params)
    attrs: dict[str, Any]  # the outcome user attributes
    values: dict[str, Any] | None  # the recipe values the trial wrote
    config: str | None
    seed: Any
    last_step: int | None = None
    rank: int = 0

    @property
    def label(self) -> str:
        return str(self.trial) if self.trial is not None else f"rep s{self.seed}"


# ----------------------------------------------------------------------------------------- formatting
def _float(value: Any) -> float | None:
    """A number from an attribute value (non-finite values are stored as strings such as "inf")."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def finite(value: Any) -> float | None:
    x = _float(value)
    return x if x is not None and math.isfinite(x) else None


def fmt_num(value: Any, digits: int = 3, *, measured: bool = False) -> str:
    """A short number: 3 significant digits, exponent form for big or tiny values (1.2e+03). ``measured``: a
    column of measurements, every one to ``digits`` digits with its trailing zeros (252.0 beside 241.6), never cut
    to an integer."""
    x = _float(value)
    if x is None:
        return "–" if value is None else str(value)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if measured:
        return f"{x:#.{digits}g}".rstrip(".")  # '#' leaves "252." for 252 at 3 digits: no bare point
    if x == int(x) and abs(x) < 10**digits:
        return str(int(x))
    return f"{x:.{digits}g}"


def fmt_count(value: Any) -> str:
    """A parameter count: 812, 35.1k, 1.23M."""
    x = finite(value)
    if x is None:
        return "–"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= limit:
            return f"{x / limit:.3g}{suffix}"
    return str(int(x))


def fmt_value(value: Any) -> str:
    """A searched parameter value."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return str(value)
    return fmt_num(value)


def short_names(names: Sequence[str]) -> dict[str, str]:
    """The last two components of each dotted name, more where two names would collide."""
    out: dict[str, str] = {}
    for name in names:
        parts = name.split(".")
        k = min(2, len(parts))
        while k < len(parts):
            if sum(1 for other in names if other.split(".")[-k:] == parts[-k:]) == 1:
                break
            k += 1
        out[name] = ".".join(parts[-k:])
    return out


def unit_of(metric: str, unit: str) -> str:
    if metric in ("nll", "nelbo", "train_nelbo"):
        return unit
    return {"params": "count", "step_time": "s", "peak_memory": "MB"}.get(metric, "")


def jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ collecting
def _status(trial: optuna.trial.FrozenTrial) -> TrialStatus:
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    recorded = attrs.get("status")
    if attrs.get("interrupted") or recorded == TrialStatus.INTERRUPTED:
        return TrialStatus.INTERRUPTED
    if trial.state == TrialState.COMPLETE:
        return TrialStatus(recorded) if recorded in WITH_VALUE else TrialStatus.COMPLETED
    if trial.state == TrialState.PRUNED:
        return (
            TrialStatus(recorded) if recorded in (TrialStatus.INVALID, TrialStatus.OVER_MEMORY) else TrialStatus.PRUNED
        )
    if trial.state == TrialState.FAIL:
        return TrialStatus(recorded) if recorded in BROKE | {TrialStatus.INVALID} else TrialStatus.FAILED
    return TrialStatus.RUNNING if trial.state == TrialState.RUNNING else TrialStatus.WAITING


def _base_seed(space: Space) -> Any:
    try:
        return space.base_recipe_data()[1]["train"]["seed"]
    except Exception:  # a missing base recipe only costs the seed of seedless trials
        return None


def _recipe_values(space: Space, trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    raw = trial.user_attrs.get("values")
    if isinstance(raw, str):
        try:
            values = json.loads(raw)
            if isinstance(values, dict):
                return values
        except json.JSONDecodeError:
            pass
    if not trial.params:
        return None
    from .compile import resolve_flat_params

    try:
        return resolve_flat_params(space, trial.params)
    except Exception:  # parameters of another version of the space
        return None


def _row_from_trial(space: Space, trial: optuna.trial.FrozenTrial, n_obj: int, base_seed: Any) -> Run:
    from optuna.trial import TrialState

    attrs = {k: trial.user_attrs.get(k) for k in OUTCOME_KEYS}
    status = _status(trial)
    values = _recipe_values(space, trial)
    objectives: list[float | None] = [None] * n_obj
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and trial.values is not None:
        objectives = [*trial.values, *[None] * n_obj][:n_obj]
    cid = attrs.get("config_id") or (config_id(values) if values is not None else None)
    seed = attrs.get("seed")
    if seed is None:
        seed = values.get(SEED_PARAM, base_seed) if values is not None else base_seed
    return Run(
        trial=trial.number,
        source="study",
        state=trial.state.name,
        status=status,
        objectives=objectives,
        params=dict(trial.params),
        attrs=attrs,
        values=values,
        config=cid,
        seed=seed,
        last_step=trial.last_step,
    )


def row_from_outcome(outcome: TrialOutcome, values: dict[str, Any], params: dict[str, Any], n_obj: int) -> Run:
    attrs = {k: outcome.attrs.get(k) for k in OUTCOME_KEYS}
    status = {TrialStatus.STOPPED: TrialStatus.PRUNED}.get(outcome.status, outcome.status)
    objectives = list(outcome.values) if outcome.values else [None] * n_obj
    return Run(
        trial=None,
        source="repeat",
        state="REPEAT",
        status=status,
        objectives=objectives,
        params=params,
        attrs={**attrs, "status": status},
        values=values,
        config=attrs.get("config_id") or config_id(values),
        seed=values.get(SEED_PARAM),
    )


def sort_key(direction: str) -> Callable[[Run], tuple[Any, ...]]:
    sign = -1.0 if direction == "maximize" else 1.0

    def key(run: Run) -> tuple[Any, ...]:
        group = STATUS_ORDER.index(run.status) if run.status in STATUS_ORDER else len(STATUS_ORDER)
        group = 0 if run.status in WITH_VALUE else group  # collapsed and spiky runs rank by their values too
        first = finite(run.objectives[0]) if run.objectives else None
        score = sign * first if run.status in WITH_VALUE and first is not None else math.inf
        trial = run.trial if run.trial is not None else math.inf
        seed = run.seed if isinstance(run.seed, (int, float)) else math.inf
        return (group, score, trial, seed)

    return key


# -------------------------------------------------------------------------------------------- repeats
@dataclass(frozen=True)
class RepeatJob:
    """One repeat run the space asks for: a top configuration on one of ``repeats.seeds``."""

    config: str
    trial: int | None  # the study trial the configuration's values come from
    seed: int
    values: dict[str, Any]  # recipe values, with train.seed set to ``seed``
    params: dict[str, Any]  # the searched parameters, shown in the leaderboard
    run_dir: Path


@dataclass
class RepeatPlan:
    """The repeat runs of a study: ``done`` (read from their summary.json) and ``missing`` (never run, or cut off
    before their summary; ``nvae-search repeat`` runs or resumes them)."""

    done: list[tuple[RepeatJob, TrialOutcome]] = field(default_factory=list)
    missing: list[RepeatJob] = field(default_factory=list)


# a stopped repeat was cut off: it is resumed
REPEAT_DONE_STATUSES = WITH_VALUE | BROKE


def best_configs(rows: Sequence[Run], k: int, direction: str) -> list[Run]:
    """The best completed trial of each of the k best configurations (by the first objective)."""
    best: dict[str, Run] = {}
    key = sort_key(direction)
    for run in sorted((r for r in rows if r.status in WITH_VALUE and r.config and r.values is not None), key=key):
        best.setdefault(run.config, run)  # type: ignore[arg-type]
    return list(best.values())[:k]


def repeat_dir(study_dir: Path, config: str, seed: int) -> Path:
    return study_dir / REPEATS_DIR / config / f"seed_{seed}"


def read_repeat_summary(space: Space, job: RepeatJob) -> TrialOutcome | None:
    """The outcome of a finished repeat run; None while it has no summary.json or was stopped before its end."""
    path = job.run_dir / "summary.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("status") not in REPEAT_DONE_STATUSES:
        return None
    return outcome_from_summary(space, SimpleNamespace(**data), job.values, float(data.get("wall_s") or 0.0))  # type: ignore[arg-type]


def plan_repeats(study_dir: Path, space: Space, rows: Sequence[Run], notes: list[str]) -> RepeatPlan:
    """Which repeat runs exist and which are missing; reads files only (training them is ``nvae-search repeat``)."""
    plan = RepeatPlan()
    repeats = space.repeats
    if repeats.top_k <= 0:
        return plan
    for best in best_configs(rows, repeats.top_k, space.study.objectives[0].direction):
        have = {r.seed for r in rows if r.source == "study" and r.config == best.config and r.status in RUN_STATUSES}
        for seed in repeats.seeds:
            if seed in have:
                continue
            job = RepeatJob(
                config=str(best.config),
                trial=best.trial,
                seed=seed,
                values={**(best.values or {}), SEED_PARAM: seed},
                params={**best.params, **({SEED_PARAM: seed} if SEED_PARAM in best.params else {})},
                run_dir=repeat_dir(study_dir, str(best.config), seed),
            )
            try:
                outcome = read_repeat_summary(space, job)
            except (OSError, ValueError, TypeError, AttributeError, KeyError) as err:
                notes.append(f"repeat {job.run_dir}: unreadable summary.json ({err}); `repeat` runs it again")
                outcome = None
            if outcome is None:
                plan.missing.append(job)
            else:
                plan.done.append((job, outcome))
    return plan


def missing_repeats_lines(plan: RepeatPlan, study_dir: Path) -> list[str]:
    """What the report says about missing repeats: per configuration, the seeds it lacks, then the command."""
    if not plan.missing:
        return []
    per_config: dict[str, list[RepeatJob]] = {}
    for job in plan.missing:
        per_config.setdefault(job.config, []).append(job)
    lines = [f"Seed repeats missing: {len(plan.missing)} run(s) of {len(per_config)} configuration(s)"]
    for config, jobs in per_config.items():
        started = sum(job.run_dir.exists() for job in jobs)
        seeds = ", ".join(str(job.seed) for job in jobs)
        origin = f" (trial {jobs[0].trial})" if jobs[0].trial is not None else ""
        lines.append(
            f"  config {config}{origin} lacks {len(jobs)} seed(s): {seeds}"
            + (f" ({started} started, not finished)" if started else "")
        )
    lines.append(f"  run them with: nvae-search repeat {study_dir}")
    return lines


# ------------------------------------------------------------------------------------- configurations
def config_table(rows: Sequence[Run], direction: str, short: Mapping[str, str]) -> list[dict[str, Any]]:
    groups: dict[str, list[Run]] = {}
    for run in rows:
        if run.config and run.status in RUN_STATUSES:
            groups.setdefault(run.config, []).append(run)
    multi = {cid: runs for cid, runs in groups.items() if len(runs) >= 2}
    params_of = {cid: {k: v for k, v in runs[0].params.items() if k != SEED_PARAM} for cid, runs in multi.items()}
    names = list(dict.fromkeys(k for p in params_of.values() for k in p))
    varying = [n for n in names if len({json.dumps(p.get(n), default=str) for p in params_of.values()}) > 1]
    shown = varying or names
    out = []
    for cid, runs in multi.items():
        done = [x for r in runs if r.status in WITH_VALUE and (x := finite(r.objectives[0])) is not None]
        grads = [x for r in runs if (x := finite(r.attrs.get("grad_norm_max"))) is not None]
        spikes = [x for r in runs if (x := finite(r.attrs.get("loss_spikes"))) is not None]
        diverged = sum(r.status in BROKE for r in runs)  # diverged or exploded
        finished = sum(r.status in FINISHED_STATUSES for r in runs)
        broke_at = [s for r in runs if r.status in BROKE and isinstance(s := r.attrs.get("diverged_step"), int)]
        ci = wilson_interval(diverged, finished)
        params = params_of[cid]
        out.append(
            {
                "config_id": cid,
                "label": ", ".join(f"{short.get(n, n)}={fmt_value(params[n])}" for n in shown if n in params) or cid,
                "params": params,
                "runs": len(runs),
                "completed": len(done),
                "pruned": sum(r.status == TrialStatus.PRUNED for r in runs),
                "diverged": diverged,
                "exploded": sum(r.status == TrialStatus.EXPLODED for r in runs),
                "collapsed": sum(r.status == TrialStatus.COLLAPSED for r in runs),
                "spiky": sum(r.status == TrialStatus.SPIKY for r in runs),
                "finished": finished,
                "failed": sum(r.status == TrialStatus.FAILED for r in runs),
                "mean": statistics.fmean(done) if done else None,
                "std": statistics.stdev(done) if len(done) >= 2 else None,
                "min": min(done) if done else None,
                "max": max(done) if done else None,
                "objective_values": done,
                "divergence_rate": diverged / finished if finished else 0.0,
                "divergence_ci_low": ci[0] if ci else None,  # 95 % Wilson interval over the finished seeds
                "divergence_ci_high": ci[1] if ci else None,
                "median_divergence_step": statistics.median(broke_at) if broke_at else None,
                "grad_norm_max_mean": statistics.fmean(grads) if grads else None,
                "loss_spikes_mean": statistics.fmean(spikes) if spikes else None,
                "trials": [r.trial for r in runs if r.trial is not None],
                "repeat_runs": sum(r.source == "repeat" for r in runs),
                "seeds": [r.seed for r in runs],
            }
        )
    sign = -1.0 if direction == "maximize" else 1.0
    out.sort(
        key=lambda c: (
            c["mean"] is None,
            sign * c["mean"] if c["mean"] is not None else 0.0,
            c["divergence_rate"],
            c["config_id"],
        )
    )
    return out


def study_rows(study: optuna.Study, space: Space) -> list[Run]:
    """One row per trial of the study, in trial order."""
    n_obj = len(space.study.objectives)
    base_seed = _base_seed(space)
    return [_row_from_trial(space, t, n_obj, base_seed) for t in study.get_trials(deepcopy=False)]
