"""The report of a study directory: leaderboard, seed stability per configuration, importances and plots.

:func:`build_report` reads a study written by either backend (``study.json`` + the Optuna storage, every trial's
outcome in its user attributes, see :data:`~nvae_search.search.runner.OUTCOME_KEYS`) and the seed repeats of the
best configurations that ``nvae-search repeat`` wrote (:mod:`nvae_search.search.repeats`; the report never
trains, and says which repeats are missing), prints rich tables and writes into ``<study>/report/``:

- ``leaderboard.csv`` / ``leaderboard.json``: one row per trial (and per repeat run), best first;
- ``configs.csv`` / ``configs.json``: mean ± std of the first objective, divergence rate, mean max gradient norm
  and loss spikes of every configuration (trials sharing a ``config_id``, i.e. equal up to ``train.seed``) with
  two or more runs;
- ``importances.json``: Optuna's parameter importances (PED-ANOVA by default in Optuna 5.0) per objective;
- ``history.png``, ``params.png``, ``stability.png`` and, with two or more objectives, ``pareto.png``.

What counts as a *run* of a configuration: a completed, pruned, diverged or failed trial or repeat. Invalid
combinations never trained, and interrupted trials were cut off by a kill: both are listed, never counted.
Optuna and matplotlib are imported inside the functions only.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .search.runner import (
    OUTCOME_KEYS,
    TrialOutcome,
    config_id,
    load_study,
    outcome_from_summary,
)
from .spaces import Space

if TYPE_CHECKING:
    import optuna
    from matplotlib.axes import Axes

__all__ = ["REPEATS_DIR", "REPORT_DIR", "RepeatJob", "RepeatPlan", "Report", "build_report", "plan_repeats"]

REPORT_DIR = "report"
REPEATS_DIR = "repeats"
STATUS_ORDER = (
    "completed",
    "pruned",
    "diverged",
    "failed",
    "invalid",
    "over_memory",
    "interrupted",
    "running",
    "waiting",
)
RUN_STATUSES = frozenset({"completed", "pruned", "diverged", "failed"})  # trained: they count as runs
STATUS_STYLE = {
    "completed": "green",
    "pruned": "yellow",
    "diverged": "bold red",
    "failed": "red",
    "invalid": "dim",
    "over_memory": "dim",
    "interrupted": "dim",
    "running": "cyan",
    "waiting": "dim",
}
COLOURS = {
    "completed": "#1f77b4",
    "best": "#2ca02c",
    "pruned": "#9e9e9e",
    "diverged": "#d62728",
    "pareto": "#ff7f0e",
    "rate": "#d62728",
}
SEED_PARAM = "train.seed"


@dataclass
class Report:
    """What :func:`build_report` produced. ``rows``/``configs`` are the rows of leaderboard.json/configs.json."""

    study_dir: Path
    report_dir: Path
    rows: list[dict[str, Any]]
    configs: list[dict[str, Any]]
    importances: dict[str, dict[str, float]]
    files: dict[str, Path] = field(default_factory=dict)  # file name -> path
    notes: list[str] = field(default_factory=list)  # what was skipped, and why
    missing_repeats: list[RepeatJob] = field(default_factory=list)  # what `nvae-search repeat` would run


@dataclass
class _Run:
    """One trial of the study, or one repeat run of a configuration on another seed."""

    trial: int | None  # None for a repeat run
    source: str  # "study" | "repeat"
    state: str  # Optuna state name ("REPEAT" for repeat runs)
    status: str
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


def _finite(value: Any) -> float | None:
    x = _float(value)
    return x if x is not None and math.isfinite(x) else None


def fmt_num(value: Any, digits: int = 3) -> str:
    """A short number: 3 significant digits, exponent form for big or tiny values (1.2e+03)."""
    x = _float(value)
    if x is None:
        return "–" if value is None else str(value)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == int(x) and abs(x) < 10**digits:
        return str(int(x))
    return f"{x:.{digits}g}"


def fmt_count(value: Any) -> str:
    """A parameter count: 812, 35.1k, 1.23M."""
    x = _finite(value)
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


def _unit_of(metric: str, unit: str) -> str:
    if metric in ("nll", "nelbo", "train_nelbo"):
        return unit
    return {"params": "count", "step_time": "s", "peak_memory": "MB"}.get(metric, "")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ collecting
def _status(trial: optuna.trial.FrozenTrial) -> str:
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    recorded = attrs.get("status")
    if attrs.get("interrupted") or recorded == "interrupted":
        return "interrupted"
    if trial.state == TrialState.COMPLETE:
        return "completed"
    if trial.state == TrialState.PRUNED:
        return recorded if recorded in ("invalid", "over_memory") else "pruned"
    if trial.state == TrialState.FAIL:
        return recorded if recorded in ("diverged", "invalid") else "failed"
    return "running" if trial.state == TrialState.RUNNING else "waiting"


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
    from .search.compile import resolve_flat_params

    try:
        return resolve_flat_params(space, trial.params)
    except Exception:  # parameters of another version of the space
        return None


def _row_from_trial(space: Space, trial: optuna.trial.FrozenTrial, n_obj: int, base_seed: Any) -> _Run:
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
    return _Run(
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


def _row_from_outcome(outcome: TrialOutcome, values: dict[str, Any], params: dict[str, Any], n_obj: int) -> _Run:
    attrs = {k: outcome.attrs.get(k) for k in OUTCOME_KEYS}
    status = {"stopped": "pruned"}.get(outcome.status, outcome.status)
    objectives = list(outcome.values) if outcome.values else [None] * n_obj
    return _Run(
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


def _sort_key(direction: str) -> Callable[[_Run], tuple[Any, ...]]:
    sign = -1.0 if direction == "maximize" else 1.0

    def key(run: _Run) -> tuple[Any, ...]:
        group = STATUS_ORDER.index(run.status) if run.status in STATUS_ORDER else len(STATUS_ORDER)
        first = _finite(run.objectives[0]) if run.objectives else None
        score = sign * first if run.status == "completed" and first is not None else math.inf
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


REPEAT_DONE_STATUSES = frozenset({"completed", "diverged"})  # a "stopped" repeat was cut off: it is resumed


def _top_configs(rows: Sequence[_Run], k: int, direction: str) -> list[_Run]:
    """The best completed trial of each of the k best configurations (by the first objective)."""
    best: dict[str, _Run] = {}
    key = _sort_key(direction)
    for run in sorted((r for r in rows if r.status == "completed" and r.config and r.values is not None), key=key):
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


def plan_repeats(study_dir: Path, space: Space, rows: Sequence[_Run], notes: list[str]) -> RepeatPlan:
    """Which repeat runs exist and which are missing; reads files only (training them is ``nvae-search repeat``)."""
    plan = RepeatPlan()
    repeats = space.repeats
    if repeats.top_k <= 0:
        return plan
    for best in _top_configs(rows, repeats.top_k, space.study.objectives[0].direction):
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
def _config_table(rows: Sequence[_Run], direction: str, short: Mapping[str, str]) -> list[dict[str, Any]]:
    groups: dict[str, list[_Run]] = {}
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
        done = [x for r in runs if r.status == "completed" and (x := _finite(r.objectives[0])) is not None]
        grads = [x for r in runs if (x := _finite(r.attrs.get("grad_norm_max"))) is not None]
        spikes = [x for r in runs if (x := _finite(r.attrs.get("loss_spikes"))) is not None]
        diverged = sum(r.status == "diverged" for r in runs)
        params = params_of[cid]
        out.append(
            {
                "config_id": cid,
                "label": ", ".join(f"{short.get(n, n)}={fmt_value(params[n])}" for n in shown if n in params) or cid,
                "params": params,
                "runs": len(runs),
                "completed": len(done),
                "pruned": sum(r.status == "pruned" for r in runs),
                "diverged": diverged,
                "failed": sum(r.status == "failed" for r in runs),
                "mean": statistics.fmean(done) if done else None,
                "std": statistics.stdev(done) if len(done) >= 2 else None,
                "min": min(done) if done else None,
                "max": max(done) if done else None,
                "objective_values": done,
                "divergence_rate": diverged / len(runs),
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


# ---------------------------------------------------------------------------------------- importances
def _importances(
    study: optuna.Study, rows: Sequence[_Run], space: Space, notes: list[str]
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    import warnings

    import optuna

    objectives = space.study.objectives
    done = [r for r in rows if r.source == "study" and r.status == "completed"]
    meta: dict[str, Any] = {"evaluator": None, "completed_trials": len(done), "skipped": None}
    if len(done) < 2:
        meta["skipped"] = f"needs at least 2 completed trials, the study has {len(done)}"
    else:
        common = set.intersection(*(set(r.params) for r in done))
        varying = [n for n in common if len({json.dumps(r.params[n], default=str) for r in done}) > 1]
        if not varying:
            meta["skipped"] = "no searched parameter varies across the completed trials"
    if meta["skipped"]:
        notes.append(f"importances skipped: {meta['skipped']}")
        return {}, meta
    result: dict[str, dict[str, float]] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            meta["evaluator"] = type(evaluator).__name__
            for i, objective in enumerate(objectives):
                sign = -1.0 if objective.direction == "maximize" else 1.0  # PED-ANOVA ranks low target values
                target = None if len(objectives) == 1 else (lambda t, i=i, s=sign: s * t.values[i])
                found = optuna.importance.get_param_importances(study, target=target, evaluator=evaluator)
                result[objective.metric] = {k: float(v) for k, v in found.items()}
    except Exception as err:  # importances are a bonus: say why they are missing
        meta["skipped"] = f"{type(err).__name__}: {err}"
        notes.append(f"importances failed: {meta['skipped']}")
        return {}, meta
    return result, meta


# ------------------------------------------------------------------------------------------- printing
def _objective_headers(space: Space, unit: str) -> list[tuple[str, str]]:
    """(name with direction arrow, unit) per objective."""
    out = []
    for o in space.study.objectives:
        out.append((f"{o.metric} {'↓' if o.direction == 'minimize' else '↑'}", _unit_of(o.metric, unit)))
    return out


def _fits(console: Console, table: Table) -> bool:
    from rich.measure import Measurement

    natural = Measurement.get(console, console.options.update_width(100_000), table).maximum
    return natural <= console.width


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", header_style="bold", pad_edge=False, show_edge=False)


def _objective_cells(run: _Run) -> list[Text]:
    cells = []
    for value in run.objectives:
        text = Text(fmt_num(value, 4) if value is not None else "–")
        if run.status == "pruned" and value is not None:
            text.stylize("dim")
            if run.last_step is not None:
                text.append(f" @{run.last_step}", style="dim")
        cells.append(text)
    return cells


def _label(run: _Run) -> Text:
    return Text(run.label, style="dim" if run.source == "repeat" else "")


def _leaderboard_tables(
    console: Console,
    title: str,
    rows: Sequence[_Run],
    param_names: Sequence[str],
    short: Mapping[str, str],
    headers: Sequence[tuple[str, str]],
) -> list[Table]:
    """One table with a column per searched parameter when it fits the console; else a stability table and, in
    the same order, a table of the parameters (wrapped into one column) and model sizes."""
    wide = _leaderboard_table(title, rows, param_names, short, headers, compact=False)
    if _fits(console, wide):
        return [wide]
    main = _leaderboard_table(title, rows, [], short, headers, compact=True)
    extra = _table("Searched parameters of the trials above (same order)")
    extra.add_column("#", justify="right", no_wrap=True)
    extra.add_column("active", justify="right", no_wrap=True)
    extra.add_column("params", justify="right", no_wrap=True)
    extra.add_column("searched parameters", style="cyan", ratio=1)
    for run in rows:
        a = run.attrs
        groups = a.get("num_groups")
        pairs = [f"{short.get(n, n)}={fmt_value(run.params[n])}" for n in param_names if n in run.params]
        extra.add_row(
            _label(run),
            f"{a.get('active_groups', 0)}/{groups}" if groups else "–",
            fmt_count(a.get("params")),
            Text("  ".join(pairs)),
            style="dim" if run.status in ("invalid", "interrupted") else None,
        )
    return [main, extra]


def _leaderboard_table(
    title: str,
    rows: Sequence[_Run],
    param_names: Sequence[str],
    short: Mapping[str, str],
    headers: Sequence[tuple[str, str]],
    *,
    compact: bool,
) -> Table:
    table = _table(title)
    table.add_column("#", justify="right", no_wrap=True)
    for name in param_names:
        head, _, last = short[name].rpartition(".")
        header = Text(f"{head}.\n", style="dim") + Text(last) if head else Text(last)
        table.add_column(header, justify="right", style="cyan", overflow="fold")
    for name, unit in headers:
        label = f"{name}\n[{unit}]" if compact else f"{name.split()[0]} [{unit}] {name.split()[-1]}"
        table.add_column(Text(label if unit else name), justify="right", style="bold", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("div@", justify="right", no_wrap=True)
    table.add_column("max‖g‖", justify="right", no_wrap=True)
    table.add_column("spikes", justify="right", no_wrap=True)
    if not compact:
        table.add_column("active", justify="right", no_wrap=True)
        table.add_column("params", justify="right", no_wrap=True)
    for run in rows:
        a = run.attrs
        cells: list[Any] = [_label(run)]
        cells += [Text(fmt_value(run.params[n])) if n in run.params else Text("·", style="dim") for n in param_names]
        cells += _objective_cells(run)
        cells.append(Text(run.status, style=STATUS_STYLE.get(run.status, "")))
        cells.append(fmt_num(a.get("diverged_step")) if a.get("diverged_step") is not None else "")
        cells.append(fmt_num(a.get("grad_norm_max")))
        cells.append(fmt_num(a.get("loss_spikes")))
        if not compact:
            groups = a.get("num_groups")
            cells.append(f"{a.get('active_groups', 0)}/{groups}" if groups else "–")
            cells.append(fmt_count(a.get("params")))
        table.add_row(*cells, style="dim" if run.status in ("invalid", "interrupted") else None)
    return table


def _configs_table(console: Console, configs: Sequence[Mapping[str, Any]], header: tuple[str, str]) -> Table:
    def build(compact: bool) -> Table:
        table = _table("Stability per configuration (trials equal up to train.seed, plus repeats)")
        table.add_column("config", overflow="fold", style="cyan", min_width=12, ratio=1 if compact else None)
        if not compact:
            table.add_column("id", style="dim", no_wrap=True)
        name, unit = header
        table.add_column("runs", justify="right", no_wrap=True)
        metric, arrow = name.split()
        table.add_column(
            Text(f"{metric}{f' [{unit}]' if unit else ''} {arrow}\nmean ± std"), justify="right", no_wrap=True
        )
        table.add_column("diverged", justify="right", no_wrap=True)
        table.add_column("mean\nmax‖g‖", justify="right", no_wrap=True)
        table.add_column("mean\nspikes", justify="right", no_wrap=True)
        for c in configs:
            if c["mean"] is None:
                objective = Text("no completed run", style="dim")
            else:
                std = f" ± {fmt_num(c['std'])}" if c["std"] is not None else " (1 run)"
                objective = Text(fmt_num(c["mean"], 4) + std)
            rate = c["divergence_rate"]
            div = Text(
                f"{c['diverged']}/{c['runs']} ({rate:.0%})",
                style="bold red" if rate >= 0.5 else "red" if rate > 0 else "green",
            )
            runs = f"{c['runs']}" + (f" ({c['repeat_runs']} rep)" if c["repeat_runs"] else "")
            cells = [
                Text(c["label"]),
                *([] if compact else [c["config_id"]]),
                runs,
                objective,
                div,
                fmt_num(c["grad_norm_max_mean"]),
                fmt_num(c["loss_spikes_mean"]),
            ]
            table.add_row(*cells)
        return table

    wide = build(compact=False)
    return wide if _fits(console, wide) else build(compact=True)


def _importance_tables(importances: Mapping[str, Mapping[str, float]], evaluator: str | None) -> list[Table]:
    tables = []
    for metric, values in importances.items():
        name = "PED-ANOVA" if evaluator == "PedAnovaImportanceEvaluator" else evaluator
        table = Table(
            title=f"Parameter importances ({name}): {metric}",
            title_justify="left",
            header_style="bold",
            pad_edge=False,
            show_edge=False,
        )
        table.add_column("parameter", style="cyan")
        table.add_column("importance", justify="right")
        table.add_column("", no_wrap=True)
        top = max(values.values(), default=0.0) or 1.0
        for name, value in values.items():
            table.add_row(
                Text(name),
                f"{value:.3f}",
                Text("█" * max(1, round(24 * value / top)) if value > 0 else "", style="magenta"),
            )
        tables.append(table)
    return tables


# -------------------------------------------------------------------------------------------- writing
def _row_dict(run: _Run, metrics: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "rank": run.rank,
        "trial": run.trial,
        "source": run.source,
        "state": run.state,
        "status": run.status,
        "objectives": dict(zip(metrics, run.objectives, strict=False)),
        "search_params": run.params,
        "last_step": run.last_step,
    }
    for key in OUTCOME_KEYS:
        if key == "status":
            continue
        row[key] = run.attrs.get(key)
    row["config_id"] = run.config
    row["seed"] = run.seed
    row["values"] = run.values
    return _jsonable(row)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in columns})


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return "" if value is None else value


def _write_tables(
    report_dir: Path,
    rows: list[dict[str, Any]],
    configs: list[dict[str, Any]],
    metrics: Sequence[str],
    param_names: Sequence[str],
    files: dict[str, Path],
) -> None:
    flat = []
    for row in rows:
        item = {k: v for k, v in row.items() if k not in ("objectives", "search_params")}
        item.update(row["objectives"])
        item.update({f"param:{n}": v for n, v in row["search_params"].items()})
        item["values"] = json.dumps(row["values"], default=str) if row["values"] is not None else None
        flat.append(item)
    head = ["rank", "trial", "source", "state", "status", *metrics, *[f"param:{n}" for n in param_names]]
    tail = [k for k in ("last_step", *OUTCOME_KEYS) if k not in head]
    _write_csv(report_dir / "leaderboard.csv", flat, head + tail)
    (report_dir / "leaderboard.json").write_text(json.dumps(rows, indent=2, default=str))
    config_cols = [
        "config_id",
        "label",
        "runs",
        "completed",
        "pruned",
        "diverged",
        "failed",
        "mean",
        "std",
        "min",
        "max",
        "divergence_rate",
        "grad_norm_max_mean",
        "loss_spikes_mean",
        "repeat_runs",
        "trials",
        "seeds",
        "objective_values",
        "params",
    ]
    _write_csv(report_dir / "configs.csv", configs, config_cols)
    (report_dir / "configs.json").write_text(json.dumps(_jsonable(configs), indent=2, default=str))
    for name in ("leaderboard.csv", "leaderboard.json", "configs.csv", "configs.json"):
        files[name] = report_dir / name


# --------------------------------------------------------------------------------------------- plots
def _axis_label(metric: str, unit: str, direction: str | None = None) -> str:
    u = _unit_of(metric, unit)
    label = f"{metric} [{u}]" if u else metric
    return f"{label} ({'lower' if direction == 'minimize' else 'higher'} is better)" if direction else label


def _wide_range(values: Iterable[float]) -> bool:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 30


def _plot_outcomes(ax: Any, xs: list[Any], ys: list[float], diverged_xs: list[Any]) -> None:
    """Completed trials as points, diverged/failed ones as red marks in the top band."""
    if xs:
        ax.scatter(xs, ys, color=COLOURS["completed"], s=26, alpha=0.8, zorder=3, label="completed")
    _diverged_marks(ax, diverged_xs)


def _diverged_marks(ax: Axes, xs: Sequence[Any]) -> None:
    """Diverged or failed trials have no objective value: red crosses in the top band, at their x positions."""
    _edge_marks(
        ax, xs, marker="x", color=COLOURS["diverged"], s=44, linewidths=1.9, label="diverged / failed (top band)"
    )


def _edge_marks(ax: Axes, xs: Sequence[float], **style: Any) -> None:
    """Markers in a band along the top edge of the axes (kept free of data), at data x positions."""
    if not xs:
        return
    from matplotlib.patches import Rectangle

    if ax.has_data():
        lo, hi = ax.get_ylim()
        if ax.get_yscale() == "log":
            ax.set_ylim(lo, 10 ** (math.log10(hi) + 0.14 * (math.log10(hi) - math.log10(lo))))
        else:
            ax.set_ylim(lo, hi + 0.14 * (hi - lo))
    ax.add_patch(
        Rectangle((0, 0.89), 1, 0.11, transform=ax.transAxes, color=COLOURS["diverged"], alpha=0.07, lw=0, zorder=0)
    )
    ax.scatter(xs, [0.945] * len(xs), transform=ax.get_xaxis_transform(), clip_on=False, zorder=5, **style)


def _log_ticks(ax: Axes, axis: str = "x") -> None:
    """Readable ticks on a log axis: 1-2-5 steps with short labels, no crowded minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
    target.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_num(v, 2)))
    target.set_minor_formatter(NullFormatter())


def _legend_below_title(fig: Any, axes: Iterable[Axes]) -> None:
    """One figure legend for all axes, at the bottom of the figure (never over the data)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncols=len(handles),
            fontsize=8,
            frameon=False,
        )


def _plot_history(path: Path, runs: Sequence[_Run], space: Space, unit: str, title: str) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    objectives = space.study.objectives
    study_runs = [r for r in runs if r.source == "study"]
    trials = [r.trial for r in study_runs if r.trial is not None]
    counts = {s: sum(r.status == s for r in study_runs) for s in STATUS_ORDER}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no trials"
    fig, axes = plt.subplots(
        len(objectives), 1, figsize=(8.5, 1.4 + 3.2 * len(objectives)), sharex=True, squeeze=False, layout="constrained"
    )
    for i, (ax, objective) in enumerate(zip(axes[:, 0], objectives, strict=True)):
        done = sorted(
            (r.trial, v) for r in study_runs if r.status == "completed" and (v := _finite(r.objectives[i])) is not None
        )
        pruned = [
            (r.trial, v)
            for r in study_runs
            if r.status == "pruned" and i == 0 and (v := _finite(r.objectives[0])) is not None
        ]
        diverged = [r.trial for r in study_runs if r.status in ("diverged", "failed")]
        if done:
            xs, ys = zip(*done, strict=True)
            ax.scatter(xs, ys, color=COLOURS["completed"], s=30, zorder=3, label="completed")
            best = min if objective.direction == "minimize" else max
            line: list[float] = []
            for y in ys:
                line.append(y if not line else best(line[-1], y))
            ax.step(
                [*xs, max(trials)],
                [*line, line[-1]],
                where="post",
                color=COLOURS["best"],
                lw=1.8,
                label="best so far",
                zorder=2,
            )
        if pruned:
            px, py = zip(*pruned, strict=True)
            ax.scatter(px, py, color=COLOURS["pruned"], s=20, zorder=3, label="pruned (last reported value)")
        if _wide_range([v for _t, v in done] + [v for _t, v in pruned]):
            ax.set_yscale("log")
            _log_ticks(ax, "y")
        if not done:
            ax.set_yticks([])
            ax.text(
                0.5,
                0.45,
                "no completed trials",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="#666666",
                fontsize=11,
            )
        _diverged_marks(ax, diverged)
        ax.set_ylabel(_axis_label(objective.metric, unit, objective.direction), fontsize=9)
        ax.grid(alpha=0.3)
    ax = axes[-1, 0]
    ax.set_xlabel("trial number")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if trials:
        ax.set_xlim(min(trials) - 0.6, max(trials) + 0.6)
    fig.suptitle(f"{title}: objective per trial ({summary})", fontsize=11)
    _legend_below_title(fig, axes[:, 0])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_pareto(path: Path, study: optuna.Study, runs: Sequence[_Run], space: Space, unit: str, title: str) -> None:
    import matplotlib.pyplot as plt

    o1, o2 = space.study.objectives[:2]
    done = [
        (r.trial, x, y)
        for r in runs
        if r.source == "study"
        and r.status == "completed"
        and (x := _finite(r.objectives[0])) is not None
        and (y := _finite(r.objectives[1])) is not None
    ]
    try:
        front_ids = {t.number for t in study.best_trials}
    except Exception:  # not a multi-objective study after all, or no completed trial
        front_ids = set()
    fig, ax = plt.subplots(figsize=(7.5, 5.5), layout="constrained")
    rest = [(x, y) for t, x, y in done if t not in front_ids]
    front = sorted((x, y, t) for t, x, y in done if t in front_ids)
    if rest:
        ax.scatter(*zip(*rest, strict=True), color=COLOURS["completed"], alpha=0.6, s=30, label="completed")
    if front:
        fx, fy, _ft = zip(*front, strict=True)
        ax.scatter(fx, fy, color=COLOURS["pareto"], edgecolor="black", s=70, zorder=4, label="Pareto-optimal")
        if len(front) > 1:
            ax.step(fx, fy, where="post", color=COLOURS["pareto"], alpha=0.7, zorder=3)
        for x, y, t in front:
            ax.annotate(f"#{t}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if not done:
        ax.text(0.5, 0.5, "no completed trials", transform=ax.transAxes, ha="center", va="center", color="#666666")
    if _wide_range(x for _t, x, _y in done):
        ax.set_xscale("log")
        _log_ticks(ax, "x")
    if _wide_range(y for _t, _x, y in done):
        ax.set_yscale("log")
        _log_ticks(ax, "y")
    ax.set_xlabel(_axis_label(o1.metric, unit, o1.direction))
    ax.set_ylabel(_axis_label(o2.metric, unit, o2.direction))
    ax.set_title(f"{title}: Pareto front ({len(front)} of {len(done)} completed trials optimal)", fontsize=11)
    ax.grid(alpha=0.3)
    if done:
        ax.legend(fontsize=9, loc="best")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _param_info(study_runs: Sequence[_Run], distributions: Mapping[str, Any], name: str) -> tuple[str, bool, list]:
    """(kind, log, categories) of a searched parameter: kind "categorical", "int" or "float"."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    dist = distributions.get(name)
    values = [r.params[name] for r in study_runs if name in r.params]
    if isinstance(dist, CategoricalDistribution) or any(isinstance(v, (str, bool)) or v is None for v in values):
        choices = list(dist.choices) if isinstance(dist, CategoricalDistribution) else list(dict.fromkeys(values))
        return "categorical", False, choices
    kind = "int" if isinstance(dist, IntDistribution) else "float"
    return kind, bool(getattr(dist, "log", False)), []


def _bins(values: Sequence[float], log: bool) -> list[float]:
    """Bar edges for the divergence rate of a numeric parameter: one bar per value when there are at most six
    distinct values, else six equal bins (in log space for a log parameter)."""
    import numpy as np

    distinct = sorted(set(values))
    use_log = log and distinct[0] > 0
    pts = [math.log10(v) if use_log else float(v) for v in distinct]
    if len(pts) == 1:
        half = 0.15 if use_log else 0.5
        edges = [pts[0] - half, pts[0] + half]
    elif len(pts) <= 6:
        mids = [(a + b) / 2 for a, b in itertools.pairwise(pts)]
        edges = [pts[0] - (mids[0] - pts[0]), *mids, pts[-1] + (pts[-1] - mids[-1])]
    else:
        edges = [float(e) for e in np.linspace(pts[0], pts[-1], 7)]
        pad = 1e-9 * (abs(edges[-1] - edges[0]) + 1)
        edges[0], edges[-1] = edges[0] - pad, edges[-1] + pad
    return [10**e for e in edges] if use_log else edges


def _padded(lo: float, hi: float, log: bool, frac: float = 0.04) -> tuple[float, float]:
    """Limits a little wider than [lo, hi] (in log space for a log axis), so edge points stay inside the frame."""
    if log and lo > 0:
        a, b = math.log10(lo), math.log10(hi)
        pad = frac * (b - a)
        return 10 ** (a - pad), 10 ** (b + pad)
    pad = frac * (hi - lo)
    return lo - pad, hi + pad


def _tally(members: Sequence[_Run], rates: list[float], counts: list[int]) -> None:
    """Append the run count and the divergence rate of one parameter value (or bin)."""
    counts.append(len(members))
    bad = sum(r.status in ("diverged", "failed") for r in members)
    rates.append(bad / len(members) if members else 0.0)


def _divergence_bars(ax: Axes, xs: Sequence[float], rates: Sequence[float], **bar: Any) -> None:
    ax.bar(xs, rates, color=COLOURS["rate"], alpha=0.75, edgecolor="white", **bar)


def _plot_params(
    path: Path,
    study: optuna.Study,
    runs: Sequence[_Run],
    space: Space,
    unit: str,
    title: str,
    param_names: Sequence[str],
    short: Mapping[str, str],
) -> None:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    objective = space.study.objectives[0]
    study_runs = [r for r in runs if r.source == "study" and r.status in RUN_STATUSES]
    distributions: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        for k, v in t.distributions.items():
            distributions.setdefault(k, v)
    ncols = max(1, min(3, len(param_names)))
    nrows = max(1, math.ceil(len(param_names) / ncols))
    fig = plt.figure(figsize=(max(4.5 * ncols, 8.5), 0.9 + 4.3 * nrows), layout="constrained")
    subfigs = fig.subfigures(nrows, ncols, squeeze=False, wspace=0.03, hspace=0.04)
    rng = np.random.default_rng(0)
    all_done = [v for r in study_runs if r.status == "completed" and (v := _finite(r.objectives[0])) is not None]
    log_y = _wide_range(all_done)
    tops: list[Axes] = []
    if not param_names:
        ax = subfigs[0, 0].subplots()
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            "no trial has searched parameters yet",
            ha="center",
            va="center",
            color="#666666",
            transform=ax.transAxes,
        )
    for idx, name in enumerate(param_names):
        sub = subfigs[idx // ncols, idx % ncols]
        top, bottom = sub.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
        tops.append(top)
        kind, log, choices = _param_info(study_runs, distributions, name)
        have = [r for r in study_runs if name in r.params]
        done = [
            (r.params[name], v) for r in have if r.status == "completed" and (v := _finite(r.objectives[0])) is not None
        ]
        diverged = [r.params[name] for r in have if r.status in ("diverged", "failed")]
        if log_y:
            top.set_yscale("log")
            _log_ticks(top, "y")
        rates: list[float] = []
        counts: list[int] = []
        centres: list[float] = []

        if kind == "categorical":
            pos = {json.dumps(c, default=str): i for i, c in enumerate(choices)}

            def at(v: Any, pos: dict[str, int] = pos) -> int:
                return pos.get(json.dumps(v, default=str), -1)

            def jitter(n: int) -> Any:
                return rng.uniform(-0.18, 0.18, n)

            _plot_outcomes(
                top,
                list(np.array([at(p) for p, _v in done]) + jitter(len(done))),
                [v for _p, v in done],
                list(np.array([at(p) for p in diverged]) + jitter(len(diverged))),
            )
            for c in choices:
                _tally([r for r in have if at(r.params[name]) == at(c)], rates, counts)
            centres = list(range(len(choices)))
            _divergence_bars(bottom, centres, rates, width=0.6)
            labels = [fmt_value(c) for c in choices]
            bottom.set_xticks(centres)
            crowded = sum(len(s) for s in labels) > 28 or len(labels) > 5
            bottom.set_xticklabels(
                labels, rotation=35 if crowded else 0, ha="right" if crowded else "center", fontsize=8
            )
            bottom.set_xlim(-0.6, len(choices) - 0.4)
        else:
            _plot_outcomes(top, [p for p, _v in done], [v for _p, v in done], diverged)
            numeric = [float(r.params[name]) for r in have]
            if log:
                bottom.set_xscale("log")
            if numeric:
                edges = _bins(numeric, log)
                for lo, hi in itertools.pairwise(edges):
                    _tally(
                        [
                            r
                            for r in have
                            if lo <= float(r.params[name]) < hi or (hi == edges[-1] and float(r.params[name]) == hi)
                        ],
                        rates,
                        counts,
                    )
                    centres.append(math.sqrt(lo * hi) if log and lo > 0 else (lo + hi) / 2)
                _divergence_bars(bottom, edges[:-1], rates, width=np.diff(edges), align="edge")
                bottom.set_xlim(*_padded(edges[0], edges[-1], log))
            if log:
                _log_ticks(bottom, "x")
            elif kind == "int" and 0 < len(set(numeric)) <= 8:
                bottom.set_xticks(sorted(set(numeric)), [fmt_num(v) for v in sorted(set(numeric))])
            elif kind == "int":
                bottom.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
            else:
                bottom.xaxis.set_major_locator(MaxNLocator(nbins=5))
            bottom.tick_params(axis="x", labelsize=8)
        for x, rate, n in zip(centres, rates, counts, strict=False):
            if n:
                bottom.text(x, rate + 0.04, f"{rate:.0%} of {n}", ha="center", va="bottom", fontsize=7, color="#333333")
        bottom.set_ylim(0, 1.3)
        bottom.set_yticks([0, 0.5, 1])
        bottom.set_xlabel(short.get(name, name) + (" (log scale)" if log else ""), fontsize=9)
        bottom.grid(axis="y", alpha=0.3)
        bottom.set_ylabel("divergence rate", fontsize=8)
        top.tick_params(axis="x", which="both", labelbottom=False)
        top.grid(alpha=0.3)
        top.set_title(name, fontsize=9)
        top.set_ylabel(_axis_label(objective.metric, unit), fontsize=8)
        top.tick_params(axis="y", labelsize=8)
        if not done:
            top.set_yticks([])
            top.text(
                0.5,
                0.45,
                "no completed trials",
                transform=top.transAxes,
                ha="center",
                va="center",
                color="#666666",
                fontsize=9,
            )
    fig.suptitle(f"{title}: {objective.metric} per parameter value (top) and divergence rate (bottom)", fontsize=11)
    _legend_below_title(fig, tops)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_stability(path: Path, configs: Sequence[Mapping[str, Any]], space: Space, unit: str, title: str) -> None:
    import matplotlib.pyplot as plt

    objective = space.study.objectives[0]
    n = len(configs)
    fig, (left, right) = plt.subplots(
        1,
        2,
        figsize=(10.5, 1.7 + 0.6 * max(n, 2)),
        sharey=True,
        gridspec_kw={"width_ratios": [3, 1.2]},
        layout="constrained",
    )
    if not configs:
        for ax in (left, right):
            ax.set_xticks([])
            ax.set_yticks([])
        left.text(
            0.5,
            0.5,
            "no configuration has 2 or more runs\n(no repeats and no seed in the search space)",
            transform=left.transAxes,
            ha="center",
            va="center",
            color="#666666",
        )
    ys = list(range(n))[::-1]  # the best configuration at the top
    labels = ["\n".join(textwrap.wrap(f"{c['label']}", 44)[:3]) for c in configs]
    values_all = [v for c in configs for v in c["objective_values"]]
    for y, c in zip(ys, configs, strict=False):
        values = c["objective_values"]
        if c["mean"] is not None:
            left.errorbar(
                c["mean"],
                y,
                xerr=c["std"] or 0.0,
                fmt="o",
                color=COLOURS["completed"],
                ecolor="#555555",
                capsize=4,
                ms=7,
                zorder=3,
                label="mean ± std",
            )
            left.scatter(
                values,
                [y + 0.22] * len(values),
                color=COLOURS["completed"],
                alpha=0.35,
                s=14,
                zorder=2,
                label="single runs",
            )
            text = f"{fmt_num(c['mean'], 4)}" + (f" ± {fmt_num(c['std'])}" if c["std"] is not None else "")
            text += f"  ({c['completed']} completed)"
            left.annotate(
                text,
                (c["mean"], y),
                textcoords="offset points",
                xytext=(0, -15),
                ha="center",
                fontsize=7,
                color="#333333",
            )
        else:
            left.text(
                0.02,
                y,
                "no completed run",
                transform=left.get_yaxis_transform(),
                va="center",
                fontsize=8,
                color=COLOURS["diverged"],
            )
        right.barh(y, c["divergence_rate"], color=COLOURS["rate"], alpha=0.75, height=0.55)
        right.text(min(c["divergence_rate"], 1.0) + 0.03, y, f"{c['diverged']}/{c['runs']}", va="center", fontsize=8)
    if configs:
        left.set_yticks(ys)
        left.set_yticklabels(labels, fontsize=8)
        left.set_ylim(-0.7, n - 0.3)
        if values_all:
            lo, hi = min(values_all), max(values_all)
            pad = 0.12 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 1.0)
            spread = [c["mean"] - (c["std"] or 0) for c in configs if c["mean"] is not None]
            spread += [c["mean"] + (c["std"] or 0) for c in configs if c["mean"] is not None]
            left.set_xlim(min(lo, *spread) - pad, max(hi, *spread) + pad)
        else:
            left.set_xticks([])
        right.set_xlim(0, 1.25)
        right.set_xticks([0, 0.5, 1])
    left.set_xlabel(
        f"{_axis_label(objective.metric, unit, objective.direction)}: mean ± std over completed runs", fontsize=9
    )
    left.grid(axis="x", alpha=0.3)
    right.set_xlabel("divergence rate (diverged / runs)", fontsize=9)
    right.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{title}: seed stability per configuration", fontsize=12)
    _legend_below_title(fig, [left])
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- entry
def study_rows(study: optuna.Study, space: Space) -> list[_Run]:
    """One row per trial of the study, in trial order."""
    n_obj = len(space.study.objectives)
    base_seed = _base_seed(space)
    return [_row_from_trial(space, t, n_obj, base_seed) for t in study.get_trials(deepcopy=False)]


def _over_memory_lines(trials: Sequence[optuna.trial.FrozenTrial]) -> list[str]:
    """One line per trial pruned untrained as predicted over the space's GPU memory limit."""
    return [
        f"trial {t.number}: not trained, {t.user_attrs.get('cause', 'predicted over the memory limit')}"
        for t in trials
        if t.user_attrs.get("status") == "over_memory"
    ]


def build_report(study_dir: str | Path, *, console: Console | None = None) -> Report:
    """Print the leaderboard, the stability table and the importances of a study, and write them (with plots)
    into ``<study_dir>/report/``. Reads only: the seed repeats of the top ``repeats.top_k`` configurations are
    read from ``<study_dir>/repeats/`` where ``nvae-search repeat`` wrote them; missing ones are listed with the
    command that runs them."""
    import matplotlib

    matplotlib.use("Agg")
    console = console or Console()
    root = Path(study_dir)
    study, space, _info = load_study(root)
    objectives = space.study.objectives
    metrics = [o.metric for o in objectives]
    notes: list[str] = []
    trials = study.get_trials(deepcopy=False)
    rows = study_rows(study, space)
    plan = plan_repeats(root, space, rows, notes)
    rows += [_row_from_outcome(outcome, job.values, job.params, len(objectives)) for job, outcome in plan.done]
    rows.sort(key=_sort_key(objectives[0].direction))
    for i, run in enumerate(rows, 1):
        run.rank = i
    unit = next((str(u) for r in rows if (u := r.attrs.get("unit"))), "nats")
    param_names = list(dict.fromkeys(k for t in trials for k in t.params))
    short = short_names(param_names)
    headers = _objective_headers(space, unit)

    title = (
        f"Leaderboard: {space.study.name} ({len(trials)} trials"
        + (
            f" + {sum(r.source == 'repeat' for r in rows)} repeat runs"
            if any(r.source == "repeat" for r in rows)
            else ""
        )
        + ")"
    )
    for i, table in enumerate(_leaderboard_tables(console, title, rows, param_names, short, headers)):
        if i:
            console.print()
        console.print(table)

    for line in _over_memory_lines(trials):
        console.print(f"[dim]over memory: {line}[/]")
    configs = _config_table(rows, objectives[0].direction, short)
    console.print()
    if configs:
        console.print(_configs_table(console, configs, headers[0]))
    else:
        console.print(
            "[dim]Stability: no configuration has 2 or more runs (set repeats: {top_k, seeds} in the "
            "space, or search train.seed).[/]"
        )

    importances, meta = _importances(study, rows, space, notes)
    console.print()
    if importances:
        for table in _importance_tables(importances, meta["evaluator"]):
            console.print(table)
    else:
        console.print(f"[dim]Parameter importances skipped: {meta['skipped']}.[/]")

    report_dir = root / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    row_dicts = [_row_dict(r, metrics) for r in rows]
    _write_tables(report_dir, row_dicts, configs, metrics, param_names, files)
    (report_dir / "importances.json").write_text(
        json.dumps({"objectives": metrics, **meta, "importances": importances}, indent=2)
    )
    files["importances.json"] = report_dir / "importances.json"

    plots: list[tuple[str, Callable[[Path], None]]] = [
        ("history.png", lambda p: _plot_history(p, rows, space, unit, space.study.name)),
        ("params.png", lambda p: _plot_params(p, study, rows, space, unit, space.study.name, param_names, short)),
        ("stability.png", lambda p: _plot_stability(p, configs, space, unit, space.study.name)),
    ]
    if len(objectives) >= 2:
        plots.append(("pareto.png", lambda p: _plot_pareto(p, study, rows, space, unit, space.study.name)))
    for name, plot in plots:
        try:
            plot(report_dir / name)
            files[name] = report_dir / name
        except Exception as err:  # a broken plot must not lose the tables
            notes.append(f"{name} failed: {type(err).__name__}: {err}")

    missing = missing_repeats_lines(plan, root)
    if missing:
        console.print()
        console.print(Text(missing[0], style="bold yellow"))
        for line in missing[1:]:
            console.print(Text(line), soft_wrap=True)  # never wrap a path or a command the user copies
        notes.append(f"{len(plan.missing)} repeat run(s) missing: run `nvae-search repeat {root}`")
    for note in notes:
        if note.startswith("importances ") or note.endswith(f"`nvae-search repeat {root}`"):
            continue  # already said above
        console.print(Text.assemble(("note: ", "yellow"), note))
    console.print(f"\n[bold]Report written to[/] {report_dir}/")
    console.print("  " + "  ".join(sorted(files)))
    return Report(
        study_dir=root,
        report_dir=report_dir,
        rows=row_dicts,
        configs=_jsonable(configs),
        importances=importances,
        files=files,
        notes=notes,
        missing_repeats=plan.missing,
    )
