"""The rich tables of the report: leaderboard (wide, or compact plus a parameter table), stability per
configuration, and parameter importances."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..spaces import Space
from ..status import TrialStatus
from .report_rows import Run, fmt_count, fmt_num, fmt_value, unit_of

STATUS_STYLE = {
    TrialStatus.COMPLETED: "green",
    TrialStatus.SPIKY: "dark_orange",
    TrialStatus.COLLAPSED: "magenta",
    TrialStatus.PRUNED: "yellow",
    TrialStatus.EXPLODED: "bold red",
    TrialStatus.DIVERGED: "bold red",
    TrialStatus.FAILED: "red",
    TrialStatus.INVALID: "dim",
    TrialStatus.OVER_MEMORY: "dim",
    TrialStatus.INTERRUPTED: "dim",
    TrialStatus.RUNNING: "cyan",
    TrialStatus.WAITING: "dim",
}


def objective_headers(space: Space, unit: str) -> list[tuple[str, str]]:
    """(name with direction arrow, unit) per objective."""
    out = []
    for o in space.study.objectives:
        out.append((f"{o.metric} {'↓' if o.direction == 'minimize' else '↑'}", unit_of(o.metric, unit)))
    return out


def _fits(console: Console, table: Table) -> bool:
    from rich.measure import Measurement

    natural = Measurement.get(console, console.options.update_width(100_000), table).maximum
    return natural <= console.width


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", header_style="bold", pad_edge=False, show_edge=False)


def _objective_cells(run: Run) -> list[Text]:
    cells = []
    for value in run.objectives:
        text = Text(fmt_num(value, 4, measured=True) if value is not None else "–")
        if run.status == TrialStatus.PRUNED and value is not None:
            text.stylize("dim")
            if run.last_step is not None:
                text.append(f" @{run.last_step}", style="dim")
        cells.append(text)
    return cells


def _label(run: Run) -> Text:
    return Text(run.label, style="dim" if run.source == "repeat" else "")


def leaderboard_tables(
    console: Console,
    title: str,
    rows: Sequence[Run],
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
            style="dim" if run.status in (TrialStatus.INVALID, TrialStatus.INTERRUPTED) else None,
        )
    return [main, extra]


def _leaderboard_table(
    title: str,
    rows: Sequence[Run],
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
        table.add_row(*cells, style="dim" if run.status in (TrialStatus.INVALID, TrialStatus.INTERRUPTED) else None)
    return table


def configs_table(console: Console, configs: Sequence[Mapping[str, Any]], header: tuple[str, str]) -> Table:
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
        table.add_column("diverged or exploded\n(rate, 95% CI)", justify="right", no_wrap=True)
        table.add_column("mean\nmax‖g‖", justify="right", no_wrap=True)
        table.add_column("mean\nspikes", justify="right", no_wrap=True)
        for c in configs:
            if c["mean"] is None:
                objective = Text("no completed run", style="dim")
            else:
                std = f" ± {fmt_num(c['std'])}" if c["std"] is not None else " (1 run)"
                objective = Text(fmt_num(c["mean"], 4, measured=True) + std)
            rate = c["divergence_rate"]
            ci = (
                f", {c['divergence_ci_low']:.0%}-{c['divergence_ci_high']:.0%}"
                if c["divergence_ci_low"] is not None
                else ""
            )
            step = f"\nmedian step {c['median_divergence_step']:g}" if c["median_divergence_step"] is not None else ""
            div = Text(
                f"{c['diverged']}/{c['finished']} ({rate:.0%}{ci}){step}",
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


def importance_tables(importances: Mapping[str, Mapping[str, float]], evaluator: str | None) -> list[Table]:
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
