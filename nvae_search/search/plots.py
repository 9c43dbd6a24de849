"""The report's PNG plots (matplotlib, imported inside the functions): optimisation history, seed stability per
configuration and the Pareto front (params.png is :mod:`.param_plots`), with the helpers both modules share.
Diverged trials, divergence rates and seed spread are drawn here because Optuna's own plots leave them out."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..spaces import Space
from ..status import BROKE, WITH_VALUE, TrialStatus
from .report_rows import STATUS_ORDER, Run, finite, fmt_num, unit_of

if TYPE_CHECKING:
    import optuna
    from matplotlib.axes import Axes

COLOURS = {
    "completed": "#1f77b4",
    "best": "#2ca02c",
    "pruned": "#9e9e9e",
    "diverged": "#d62728",
    "pareto": "#ff7f0e",
    "rate": "#d62728",
}


def axis_label(metric: str, unit: str, direction: str | None = None) -> str:
    u = unit_of(metric, unit)
    label = f"{metric} [{u}]" if u else metric
    return f"{label} ({'lower' if direction == 'minimize' else 'higher'} is better)" if direction else label


def wide_range(values: Iterable[float]) -> bool:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 30


def plot_outcomes(ax: Any, xs: list[Any], ys: list[float], diverged_xs: list[Any]) -> None:
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


def log_ticks(ax: Axes, axis: str = "x") -> None:
    """Readable ticks on a log axis: 1-2-5 steps with short labels, no crowded minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=8))
    target.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_num(v, 2)))
    target.set_minor_formatter(NullFormatter())


def no_completed_trials(ax: Any, *, fontsize: float = 10, y: float = 0.45, keep_ticks: bool = False) -> None:
    """Say so on an objective axis that has no completed trial to show."""
    if not keep_ticks:
        ax.set_yticks([])
    ax.text(
        0.5,
        y,
        "no completed trials",
        transform=ax.transAxes,
        ha="center",
        va="center",
        color="#666666",
        fontsize=fontsize,
    )


def legend_below_title(fig: Any, axes: Iterable[Axes]) -> None:
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


def plot_history(path: Path, runs: Sequence[Run], space: Space, unit: str, title: str) -> None:
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
            (r.trial, v) for r in study_runs if r.status in WITH_VALUE and (v := finite(r.objectives[i])) is not None
        )
        pruned = [
            (r.trial, v)
            for r in study_runs
            if r.status == TrialStatus.PRUNED and i == 0 and (v := finite(r.objectives[0])) is not None
        ]
        diverged = [r.trial for r in study_runs if r.status in BROKE | {TrialStatus.FAILED}]
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
        if wide_range([v for _t, v in done] + [v for _t, v in pruned]):
            ax.set_yscale("log")
            log_ticks(ax, "y")
        if not done:
            no_completed_trials(ax, fontsize=11)
        _diverged_marks(ax, diverged)
        ax.set_ylabel(axis_label(objective.metric, unit, objective.direction), fontsize=9)
        ax.grid(alpha=0.3)
    ax = axes[-1, 0]
    ax.set_xlabel("trial number")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if trials:
        ax.set_xlim(min(trials) - 0.6, max(trials) + 0.6)
    fig.suptitle(f"{title}: objective per trial ({summary})", fontsize=11)
    legend_below_title(fig, axes[:, 0])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(path: Path, study: optuna.Study, runs: Sequence[Run], space: Space, unit: str, title: str) -> None:
    import matplotlib.pyplot as plt

    o1, o2 = space.study.objectives[:2]
    done = [
        (r.trial, x, y)
        for r in runs
        if r.source == "study"
        and r.status in WITH_VALUE
        and (x := finite(r.objectives[0])) is not None
        and (y := finite(r.objectives[1])) is not None
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
        no_completed_trials(ax, y=0.5, keep_ticks=True)
    if wide_range(x for _t, x, _y in done):
        ax.set_xscale("log")
        log_ticks(ax, "x")
    if wide_range(y for _t, _x, y in done):
        ax.set_yscale("log")
        log_ticks(ax, "y")
    ax.set_xlabel(axis_label(o1.metric, unit, o1.direction))
    ax.set_ylabel(axis_label(o2.metric, unit, o2.direction))
    ax.set_title(f"{title}: Pareto front ({len(front)} of {len(done)} completed trials optimal)", fontsize=11)
    ax.grid(alpha=0.3)
    if done:
        ax.legend(fontsize=9, loc="best")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stability(path: Path, configs: Sequence[Mapping[str, Any]], space: Space, unit: str, title: str) -> None:
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
            text = fmt_num(c["mean"], 4, measured=True) + (f" ± {fmt_num(c['std'])}" if c["std"] is not None else "")
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
        if c.get("divergence_ci_low") is not None:  # the 95 % Wilson interval over the finished seeds
            rate, low, high = c["divergence_rate"], c["divergence_ci_low"], c["divergence_ci_high"]
            right.errorbar(rate, y, xerr=[[rate - low], [high - rate]], fmt="none", ecolor="#333333", capsize=3)
        at = max(c["divergence_rate"], c.get("divergence_ci_high") or 0.0)  # right of the interval's bar
        right.text(min(at, 1.0) + 0.03, y, f"{c['diverged']}/{c['finished']}", va="center", fontsize=8)
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
        f"{axis_label(objective.metric, unit, objective.direction)}: mean ± std over completed runs", fontsize=9
    )
    left.grid(axis="x", alpha=0.3)
    right.set_xlabel("divergence rate, 95% CI\n(diverged or exploded / finished)", fontsize=9)
    right.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{title}: seed stability per configuration", fontsize=12)
    legend_below_title(fig, [left])
    fig.savefig(path, dpi=110)
    plt.close(fig)
