"""Stability figures read from the trials' own run directories: the Wilson interval of a divergence rate, and the
gradient-norm and NELBO trajectories of every trained run coloured by its outcome (``trajectories.png``).

Reads files only (``metrics.jsonl`` of each run); no torch, no training, no search backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config_io import read_jsonl
from ..status import TrialStatus

if TYPE_CHECKING:
    from .report_rows import Run

__all__ = ["OUTCOME_COLOURS", "plot_trajectories", "read_trajectory", "wilson_interval"]

OUTCOME_COLOURS = {
    TrialStatus.COMPLETED: "#1f77b4",
    TrialStatus.SPIKY: "#ff7f0e",
    TrialStatus.COLLAPSED: "#9467bd",
    TrialStatus.PRUNED: "#9e9e9e",
    TrialStatus.EXPLODED: "#d62728",
    TrialStatus.DIVERGED: "#8c1515",
    TrialStatus.FAILED: "#000000",
}
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (95 % by default); None without trials. Unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0/n or n/n, which is what 5-seed rates need."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def read_trajectory(run_dir: str | Path | None) -> list[dict[str, Any]]:
    """The logged rows (step, nelbo, grad_norm, ...) of a run; empty when the run has no readable log."""
    if not run_dir:
        return []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        return [r for r in read_jsonl(path) if isinstance(r.get("step"), int)]
    except Exception:  # a damaged log only costs this run's curve
        return []


def run_logs(run_dir: str | Path | None, broke: bool) -> list[tuple[list[dict[str, Any]], bool]]:
    """The logs of a trial's runs with whether each broke: its own, or those of its seed runs (``seed_<s>/``,
    ``study.aggregate``), of which only the last can have broken."""
    own = read_trajectory(run_dir)
    if own or not run_dir:
        return [(own, broke)] if own else []
    seeds = sorted(Path(run_dir).glob("seed_*"), key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else 0)
    logs = [log for d in seeds if (log := read_trajectory(d))]
    return [(log, broke and i == len(logs) - 1) for i, log in enumerate(logs)]


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None


def plot_trajectories(path: Path, rows: Sequence[Run], unit: str, title: str, *, by_time: bool = False) -> int:
    """Gradient norm (log) and NELBO (log) against the step (or, ``by_time``, the training minutes: how a study
    with a clock budget compares its runs) for each trained run, coloured by outcome; the point where a run
    diverged or exploded is marked with an x. Returns how many runs were drawn."""
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True, layout="constrained")
    drawn, seen = 0, set()
    for run in rows:
        for log, broke in run_logs(run.attrs.get("run_dir"), bool(run.attrs.get("diverged_step"))):
            colour = OUTCOME_COLOURS.get(run.status, "#7f7f7f")
            label = None if run.status in seen else str(run.status)
            seen.add(run.status)
            steps = [float(r.get("time") or 0.0) / 60 if by_time else r["step"] for r in log]
            for ax, key in ((top, "grad_norm"), (bottom, "nelbo")):
                ys = [_positive(r.get(key)) for r in log]
                ys_plot = [math.nan if y is None else y for y in ys]
                ax.plot(steps, ys_plot, color=colour, alpha=0.55, lw=1.0, label=label)
                if broke and ys and ys[-1] is not None:
                    ax.scatter([steps[-1]], [ys[-1]], marker="x", color=colour, s=36, zorder=3)
            drawn += 1
    for ax, name in ((top, "gradient norm"), (bottom, f"training NELBO [{unit}]")):
        ax.set_yscale("log")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
    bottom.set_xlabel("training minutes" if by_time else "training step")
    if drawn:
        top.legend(fontsize=8, ncols=4, loc="upper right")
    else:
        top.text(0.5, 0.5, "no run has a metrics.jsonl", transform=top.transAxes, ha="center", color="#666666")
    fig.suptitle(f"{title}: gradient-norm and NELBO trajectories by outcome (x: where a run broke)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn
