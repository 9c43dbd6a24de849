"""The report of a study directory: leaderboard, seed stability per configuration, importances and plots.

:func:`build_report` reads a study written by either backend (``study.json`` + the Optuna storage, every trial's
outcome in its user attributes, see :data:`~nvae_search.search.trial.OUTCOME_KEYS`) and the seed repeats of the
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
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from ..spaces import Space
from ..status import WITH_VALUE, TrialStatus
from .param_plots import plot_params
from .plots import plot_history, plot_pareto, plot_stability
from .report_rows import (
    RepeatJob,
    Run,
    config_table,
    jsonable,
    missing_repeats_lines,
    plan_repeats,
    row_from_outcome,
    short_names,
    sort_key,
    study_rows,
)
from .report_tables import configs_table, importance_tables, leaderboard_tables, objective_headers
from .trajectories import plot_trajectories
from .trial import OUTCOME_KEYS, load_study

if TYPE_CHECKING:
    import optuna

__all__ = ["REPORT_DIR", "Report", "build_report"]

REPORT_DIR = "report"


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


# ---------------------------------------------------------------------------------------- importances
def _importances(
    study: optuna.Study, rows: Sequence[Run], space: Space, notes: list[str]
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    import warnings

    import optuna

    objectives = space.study.objectives
    done = [r for r in rows if r.source == "study" and r.status in WITH_VALUE]
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


# -------------------------------------------------------------------------------------------- writing
def _row_dict(run: Run, metrics: Sequence[str]) -> dict[str, Any]:
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
    return jsonable(row)


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
        "exploded",
        "collapsed",
        "spiky",
        "finished",
        "failed",
        "mean",
        "std",
        "min",
        "max",
        "divergence_rate",
        "divergence_ci_low",
        "divergence_ci_high",
        "median_divergence_step",
        "grad_norm_max_mean",
        "loss_spikes_mean",
        "repeat_runs",
        "trials",
        "seeds",
        "objective_values",
        "params",
    ]
    _write_csv(report_dir / "configs.csv", configs, config_cols)
    (report_dir / "configs.json").write_text(json.dumps(jsonable(configs), indent=2, default=str))
    for name in ("leaderboard.csv", "leaderboard.json", "configs.csv", "configs.json"):
        files[name] = report_dir / name


def _over_memory_lines(trials: Sequence[optuna.trial.FrozenTrial]) -> list[str]:
    """One line per trial pruned as over memory: predicted over the space's GPU memory limit (not trained), or
    out of CUDA memory while it trained (``oom``)."""
    return [
        f"trial {t.number}: "
        + ("" if t.user_attrs.get("oom") else "not trained, ")
        + str(t.user_attrs.get("cause") or "predicted over the memory limit")
        for t in trials
        if t.user_attrs.get("status") == TrialStatus.OVER_MEMORY
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
    rows += [row_from_outcome(outcome, job.values, job.params, len(objectives)) for job, outcome in plan.done]
    rows.sort(key=sort_key(objectives[0].direction))
    for i, run in enumerate(rows, 1):
        run.rank = i
    unit = next((str(u) for r in rows if (u := r.attrs.get("unit"))), "nats")
    param_names = list(dict.fromkeys(k for t in trials for k in t.params))
    short = short_names(param_names)
    headers = objective_headers(space, unit)

    title = (
        f"Leaderboard: {space.study.name} ({len(trials)} trials"
        + (
            f" + {sum(r.source == 'repeat' for r in rows)} repeat runs"
            if any(r.source == "repeat" for r in rows)
            else ""
        )
        + ")"
    )
    for i, table in enumerate(leaderboard_tables(console, title, rows, param_names, short, headers)):
        if i:
            console.print()
        console.print(table)

    for line in _over_memory_lines(trials):
        console.print(f"[dim]over memory: {line}[/]")
    configs = config_table(rows, objectives[0].direction, short)
    console.print()
    if configs:
        console.print(configs_table(console, configs, headers[0]))
    else:
        console.print(
            "[dim]Stability: no configuration has 2 or more runs (set repeats: {top_k, seeds} in the "
            "space, or search train.seed).[/]"
        )

    importances, meta = _importances(study, rows, space, notes)
    console.print()
    if importances:
        for table in importance_tables(importances, meta["evaluator"]):
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

    clock = space.budget.minutes is not None  # runs of a clock budget compare at equal minutes, not steps
    plots: list[tuple[str, Callable[[Path], None]]] = [
        ("history.png", lambda p: plot_history(p, rows, space, unit, space.study.name)),
        ("params.png", lambda p: plot_params(p, study, rows, space, unit, space.study.name, param_names, short)),
        ("stability.png", lambda p: plot_stability(p, configs, space, unit, space.study.name)),
        ("trajectories.png", lambda p: plot_trajectories(p, rows, unit, space.study.name, by_time=clock)),
    ]
    if len(objectives) >= 2:
        plots.append(("pareto.png", lambda p: plot_pareto(p, study, rows, space, unit, space.study.name)))
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
        configs=jsonable(configs),
        importances=importances,
        files=files,
        notes=notes,
        missing_repeats=plan.missing,
    )
