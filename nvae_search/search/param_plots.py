"""The report's ``params.png``: the first objective against each searched parameter, with the divergence rate of
each bin (or choice) below it: how a parameter's value relates to the quality and the stability of its trials."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..spaces import Space
from ..status import BROKE, WITH_VALUE, TrialStatus
from .plots import COLOURS, axis_label, legend_below_title, log_ticks, no_completed_trials, plot_outcomes, wide_range
from .report_rows import RUN_STATUSES, Run, finite, fmt_num, fmt_value

if TYPE_CHECKING:
    import optuna
    from matplotlib.axes import Axes


def _param_info(study_runs: Sequence[Run], distributions: Mapping[str, Any], name: str) -> tuple[str, bool, list]:
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


def _tally(members: Sequence[Run], rates: list[float], counts: list[int]) -> None:
    """Append the run count and the divergence rate of one parameter value (or bin)."""
    counts.append(len(members))
    bad = sum(r.status in BROKE | {TrialStatus.FAILED} for r in members)
    rates.append(bad / len(members) if members else 0.0)


def _divergence_bars(ax: Axes, xs: Sequence[float], rates: Sequence[float], **bar: Any) -> None:
    ax.bar(xs, rates, color=COLOURS["rate"], alpha=0.75, edgecolor="white", **bar)


def plot_params(
    path: Path,
    study: optuna.Study,
    runs: Sequence[Run],
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
    all_done = [v for r in study_runs if r.status in WITH_VALUE and (v := finite(r.objectives[0])) is not None]
    log_y = wide_range(all_done)
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
            (r.params[name], v) for r in have if r.status in WITH_VALUE and (v := finite(r.objectives[0])) is not None
        ]
        diverged = [r.params[name] for r in have if r.status in BROKE | {TrialStatus.FAILED}]
        if log_y:
            top.set_yscale("log")
            log_ticks(top, "y")
        rates: list[float] = []
        counts: list[int] = []
        centres: list[float] = []

        if kind == "categorical":
            pos = {json.dumps(c, default=str): i for i, c in enumerate(choices)}

            def at(v: Any, pos: dict[str, int] = pos) -> int:
                return pos.get(json.dumps(v, default=str), -1)

            def jitter(n: int) -> Any:
                return rng.uniform(-0.18, 0.18, n)

            plot_outcomes(
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
            plot_outcomes(top, [p for p, _v in done], [v for _p, v in done], diverged)
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
                log_ticks(bottom, "x")
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
        top.set_ylabel(axis_label(objective.metric, unit), fontsize=8)
        top.tick_params(axis="y", labelsize=8)
        if not done:
            no_completed_trials(top, fontsize=9)
    fig.suptitle(f"{title}: {objective.metric} per parameter value (top) and divergence rate (bottom)", fontsize=11)
    legend_below_title(fig, tops)
    fig.savefig(path, dpi=100)
    plt.close(fig)
