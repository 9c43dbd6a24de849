"""Objectives over seeds (``study.aggregate: {seeds, how, k}``): one trial trains its configuration on several seeds,
each in a sub-run ``seed_<s>/`` of the trial's directory, and its objective values aggregate theirs. A seed that
diverges or explodes fails the whole configuration (the trial takes that seed's status, its cause names the seed),
and so does a seed stopped by a pruner; the remaining seeds are not trained.

:func:`run_configuration` is shared by both backends: each passes its own way of training one run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..spaces import Space
from ..status import BROKE, WITH_VALUE, TrialStatus
from .trial import TrialOutcome, config_id, outcome_from_summary

__all__ = ["aggregate", "run_configuration", "seeds_of", "step_offset"]

SEED = "train.seed"
Reporter = Callable[[int, dict[str, Any]], bool]
TrainOne = Callable[[Mapping[str, Any], Path, "Reporter | None", bool], TrialOutcome]
"""Train one run: (recipe values, run directory, reporter or None, resume) -> its outcome."""
FALLBACK_OFFSET = 1_000_000  # step offset between seeds when the budget is not in steps


def seeds_of(space: Space, values: Mapping[str, Any]) -> list[int]:
    """The seeds of a trial: its train.seed (sampled, or the base recipe's) and the next ``seeds - 1``."""
    agg = space.study.aggregate
    base = values.get(SEED)
    if base is None:
        base = space.base_recipe_data()[1]["train"]["seed"]
    return [int(base) + i for i in range(agg.seeds if agg is not None else 1)]


def step_offset(space: Space) -> int:
    """Seed i reports its step s as i x offset + s, so that intermediate values of different trials stay
    comparable step for step (seed 0 of every trial at the same steps, then seed 1, ...)."""
    return space.budget.steps or FALLBACK_OFFSET


def aggregate(values: Sequence[float], how: str, k: float, direction: str) -> float:
    """One objective's aggregate over seeds; ``worst`` and the std penalty lean against the direction."""
    mean = statistics.fmean(values)
    sign = 1.0 if direction == "minimize" else -1.0
    if how == "worst":
        return max(values) if direction == "minimize" else min(values)
    if how == "mean_plus_std":
        return mean + sign * k * (statistics.stdev(values) if len(values) >= 2 else 0.0)
    return mean


def _finished(space: Space, values: Mapping[str, Any], run_dir: Path) -> TrialOutcome | None:
    """The outcome of a seed run that already ended (a trial restarted by Ray or resumed); None otherwise."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("status") not in WITH_VALUE | BROKE:
            return None
        return outcome_from_summary(space, SimpleNamespace(**data), values, float(data.get("wall_s") or 0.0))  # type: ignore[arg-type]
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return None


def run_configuration(
    space: Space, values: Mapping[str, Any], run_dir: Path, train_one: TrainOne, report: Reporter | None
) -> TrialOutcome:
    """Train the trial's configuration: once, or on each of ``study.aggregate.seeds`` seeds (see the module)."""
    agg = space.study.aggregate
    if agg is None:
        return train_one(values, run_dir, report, False)
    offset = step_offset(space)
    done: list[tuple[int, TrialOutcome]] = []
    for i, seed in enumerate(seeds_of(space, values)):
        seed_values = {**values, SEED: seed}
        sub = run_dir / f"seed_{seed}"
        outcome = _finished(space, seed_values, sub)
        if outcome is None:
            shifted = None if report is None else _shifted(report, i * offset)
            outcome = train_one(seed_values, sub, shifted, (sub / "checkpoint.pt").exists())
        done.append((seed, outcome))
        if outcome.status not in WITH_VALUE:
            break  # diverged, exploded or pruned: the configuration fails here, the other seeds are not trained
    return combine(space, values, run_dir, done)


def _shifted(report: Reporter, offset: int) -> Reporter:
    return lambda step, metrics: report(offset + step, metrics)


def combine(
    space: Space, values: Mapping[str, Any], run_dir: Path, done: Sequence[tuple[int, TrialOutcome]]
) -> TrialOutcome:
    """The trial's outcome from its seed runs' outcomes (in seed order; the last may have failed)."""
    agg = space.study.aggregate
    assert agg is not None and done
    outs = [o for _, o in done]
    seed_runs = [{"seed": s, "status": str(o.status), "values": o.values, "run_dir": o.run_dir} for s, o in done]
    base = dataclasses.replace(
        outs[-1],
        steps=sum(o.steps or 0 for o in outs),
        train_s=sum(o.train_s or 0.0 for o in outs),
        trial_s=sum(o.trial_s or 0.0 for o in outs),
        grad_norm_max=_max(o.grad_norm_max for o in outs),
        loss_spikes=sum(o.loss_spikes or 0 for o in outs),
        skipped_steps=sum(o.skipped_steps or 0 for o in outs),
        run_dir=str(run_dir),
        config_id=config_id(values),
        seed=seeds_of(space, values)[0],
        recipe_values=json.dumps(dict(values), default=str),
        seed_runs=json.dumps(seed_runs, default=str),
        values=None,
    )
    last_seed, last = done[-1]
    if last.status not in WITH_VALUE:  # the configuration failed on this seed
        return dataclasses.replace(base, cause=f"seed {last_seed} of {agg.seeds}: {last.cause}")
    directions = [o.direction for o in space.study.objectives]
    per_objective = list(zip(*(o.values or [] for o in outs), strict=True))
    flagged = next(((s, o) for s, o in done if o.status == TrialStatus.COLLAPSED), None)
    flagged = flagged or next(((s, o) for s, o in done if o.status == TrialStatus.SPIKY), None)
    return dataclasses.replace(
        base,
        status=flagged[1].status if flagged else TrialStatus.COMPLETED,
        cause=f"seed {flagged[0]}: {flagged[1].cause}" if flagged else None,
        diverged_step=None,
        train_nelbo=_mean(o.train_nelbo for o in outs),
        eval_nelbo=_mean(o.eval_nelbo for o in outs),
        eval_nll=_mean(o.eval_nll for o in outs),
        values=[aggregate(v, agg.how, agg.k, d) for v, d in zip(per_objective, directions, strict=True)],
    )


def _numbers(items: Any) -> list[float]:
    return [float(x) for x in items if isinstance(x, (int, float)) and math.isfinite(x)]


def _max(items: Any) -> float | None:
    numbers = _numbers(items)
    return max(numbers) if numbers else None


def _mean(items: Any) -> float | None:
    numbers = _numbers(items)
    return statistics.fmean(numbers) if numbers else None
