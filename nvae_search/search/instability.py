"""The early-instability pruner (``pruner: {type: instability, ...}``) and its offline replay.

:class:`InstabilityRule` is a pure function of the stream of logged metrics (step, nelbo, grad_norm): both search
backends feed it the training loop's reports (:func:`with_instability`) and stop a trial it flags as PRUNED with the
cause ``instability: ...``; :func:`replay_pruners` feeds it the ``metrics.jsonl`` of a finished study's runs and
says what it would have saved and whom it would have stopped wrongly, beside Optuna's median pruner replayed the
same way and no pruning. Reads files and an in-memory Optuna study only: no torch, no training.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config_io import ConfigError, read_yaml_file
from ..rundir import RESOLVED_RECIPE
from ..schema.recipe import TrainConfig
from ..spaces import Space
from ..status import BROKE, WITH_VALUE, TrialStatus, explosion_cause
from .trajectories import read_trajectory

__all__ = ["InstabilityRule", "replay_pruners", "rule_for", "with_instability"]

Reporter = Callable[[int, dict[str, Any]], bool]
PRUNERS = ("instability", "median", "none")


@dataclass
class InstabilityRule:
    """Says stop when ``patience`` consecutive reports (after ``n_warmup_steps``) are unstable: the gradient norm
    above ``grad_factor`` x its median over the reports of the first ``baseline_steps`` steps, or the NELBO above
    ``nelbo_factor`` x the lowest NELBO reported before. A non-finite NELBO or gradient norm is unstable too.
    Either rule is off when its factor is None."""

    grad_factor: float | None = 10.0
    nelbo_factor: float | None = 1.5
    baseline_steps: int = 5
    patience: int = 2
    n_warmup_steps: int = 0
    _baseline: list[float] = field(default_factory=list, init=False)
    _lowest: float = field(default=math.inf, init=False)
    _streak: int = field(default=0, init=False)

    def observe(self, step: int, metrics: Mapping[str, Any]) -> str | None:
        """Feed one report; returns why the trial should stop (once ``patience`` reports in a row are unstable).
        A report of an fp16 step the gradient scaler skipped (its gradients overflowed; the scaler lowers its scale,
        most often in the first steps) is passed over: an overflow is not an instability of the model."""
        if metrics.get("scaler_skipped"):
            return None
        why = self._unstable(step, _number(metrics.get("nelbo")), _number(metrics.get("grad_norm")))
        self._streak = self._streak + 1 if why else 0
        if why and self._streak >= self.patience and step >= self.n_warmup_steps:
            return f"instability: {why} ({self._streak} report(s) in a row, at step {step})"
        return None

    def _unstable(self, step: int, nelbo: float | None, grad: float | None) -> str | None:
        why = None
        if nelbo is not None and not math.isfinite(nelbo):
            why = "non-finite NELBO"
        elif grad is not None and not math.isfinite(grad):
            why = "non-finite gradient norm"
        if why is None and grad is not None and self.grad_factor is not None:
            if step <= self.baseline_steps or not self._baseline:
                self._baseline.append(grad)
            else:
                base = statistics.median(self._baseline)
                if base > 0 and grad > self.grad_factor * base:
                    why = f"gradient norm {grad:.3g} is {grad / base:.3g}x its early median {base:.3g}"
        lowest, factor = self._lowest, self.nelbo_factor
        rising = nelbo is not None and factor is not None and 0 < lowest < math.inf and nelbo > factor * lowest
        if why is None and rising:
            why = f"NELBO {nelbo:.4g} is {nelbo / lowest:.3g}x its lowest so far {lowest:.4g}"
        if nelbo is not None and math.isfinite(nelbo):
            self._lowest = min(self._lowest, nelbo)
        return why


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # non-finite values are stored as their strings ("nan", "inf")
        try:
            return float(value)
        except ValueError:
            return None
    return None


def rule_for(space: Space) -> InstabilityRule | None:
    """A fresh rule for one trial (or seed run) of a study whose pruner is ``instability``; None otherwise."""
    cfg = space.pruner
    if cfg.type != "instability":
        return None
    return InstabilityRule(
        grad_factor=cfg.grad_factor,
        nelbo_factor=cfg.nelbo_factor,
        baseline_steps=cfg.baseline_steps,
        patience=cfg.patience,
        n_warmup_steps=cfg.n_warmup_steps,
    )


def with_instability(space: Space, inner: Reporter | None) -> tuple[Reporter | None, Callable[[], str | None]]:
    """The training loop's reporter with the study's instability rule in front (both backends use this): the
    wrapped reporter stops the run when the rule says so; the second value returns the rule's cause, if it did."""
    rule = rule_for(space)
    if rule is None:
        return inner, lambda: None
    said: list[str] = []

    def report(step: int, metrics: dict[str, Any]) -> bool:
        if said:
            return True
        cause = rule.observe(step, metrics)
        if cause is not None:
            said.append(cause)
            return True
        return inner(step, metrics) if inner is not None else False

    return report, lambda: said[0] if said else None


# ------------------------------------------------------------------------------------------- the replay
@dataclass
class ReplayedRun:
    trial: int
    status: str
    steps: int  # training steps the run took
    stop_step: int | None = None  # where the replayed pruner would have stopped it


@dataclass
class PrunerReplay:
    """What one pruner would have done to a study's finished runs."""

    pruner: str
    runs: list[ReplayedRun]

    def summary(self) -> dict[str, Any]:
        stopped = [r for r in self.runs if r.stop_step is not None]
        total = sum(r.steps for r in self.runs)
        saved = sum(r.steps - r.stop_step for r in stopped)  # type: ignore[operator]
        false = [r for r in stopped if r.status in WITH_VALUE]
        broke = [r for r in self.runs if r.status in BROKE]
        caught = [r for r in stopped if r.status in BROKE]
        return {
            "pruner": self.pruner,
            "runs": len(self.runs),
            "stopped": len(stopped),
            "total_steps": total,
            "saved_steps": saved,
            "saved_fraction": saved / total if total else 0.0,
            "false_stops": len(false),  # runs it stopped that trained to their end without breaking
            "false_stop_trials": [r.trial for r in false],
            "broken_runs": len(broke),
            "broken_stopped": len(caught),  # diverged/exploded runs it stopped before they broke by themselves
            "broken_stopped_earlier": sum(1 for r in caught if r.stop_step < r.steps),  # type: ignore[operator]
        }


def _finished_runs(study_dir: Path) -> tuple[Space, list[tuple[int, str, int, list[dict[str, Any]]]]]:
    """(trial, status, steps, logged rows) of every unpruned finished trial, in trial order."""
    from .trial import load_study

    study, space, _ = load_study(study_dir)
    out = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        status = t.user_attrs.get("status")
        if status not in WITH_VALUE | BROKE:
            continue
        log = read_trajectory(t.user_attrs.get("run_dir"))
        if not log:
            continue
        steps = t.user_attrs.get("steps")
        if _explosion_rule_was_off(t.user_attrs.get("run_dir")):
            status = _would_explode(str(status), log)
        out.append((t.number, status, int(steps) if isinstance(steps, int) else log[-1]["step"], log))
    return space, out


def _explosion_rule_was_off(run_dir: Any) -> bool:
    """Whether the run trained with ``train.explode_factor: null`` (read from its resolved recipe); a run that
    trained with the rule on has its status from the rule it ran under (its own factor and patience)."""
    try:
        recipe = read_yaml_file(Path(str(run_dir)) / RESOLVED_RECIPE)
        return recipe["train"].get("explode_factor", 0) is None
    except (ConfigError, OSError, KeyError, TypeError, AttributeError):
        return False


def _would_explode(status: str, log: Sequence[Mapping[str, Any]]) -> str:
    """A run that trained to its end but whose log crosses the default explosion rule (a study run with
    ``train.explode_factor: null`` to see the whole trajectories) counts as exploded: stopping it is no false stop."""
    if status not in WITH_VALUE:
        return status
    factor = TrainConfig.model_fields["explode_factor"].default
    lowest, lowest_step = math.inf, 0
    for row in log:
        nelbo = _number(row.get("nelbo"))
        if nelbo is None:
            continue
        if explosion_cause(nelbo, row["step"], lowest, lowest_step, factor):
            return str(TrialStatus.EXPLODED)
        if nelbo < lowest:
            lowest, lowest_step = nelbo, row["step"]
    return status


def _replay_instability(space: Space, runs: Sequence[tuple[int, str, int, list[dict[str, Any]]]]) -> PrunerReplay:
    out = []
    for number, status, steps, log in runs:
        rule = rule_for(space) or InstabilityRule()
        stop = next((row["step"] for row in log if rule.observe(row["step"], row) is not None), None)
        out.append(ReplayedRun(number, status, steps, stop))
    return PrunerReplay("instability", out)


def _replay_median(space: Space, runs: Sequence[tuple[int, str, int, list[dict[str, Any]]]]) -> PrunerReplay:
    """Optuna's MedianPruner on an in-memory study fed the recorded NELBO trajectories in trial order: a run it
    prunes is told PRUNED, the others as they ended (COMPLETE with their last NELBO, or FAIL)."""
    import optuna

    cfg = space.pruner
    kw = {"n_startup_trials": 5, "n_warmup_steps": 0, "interval_steps": 1}
    if cfg.type == "median":
        kw = {"n_startup_trials": cfg.n_startup_trials, "n_warmup_steps": cfg.n_warmup_steps}
        kw["interval_steps"] = cfg.interval_steps
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(**kw), direction="minimize")
    out = []
    for number, status, steps, log in runs:
        trial = study.ask()
        stop = None
        for row in log:
            value = _number(row.get("nelbo"))
            if value is None or not math.isfinite(value):
                break
            trial.report(value, row["step"])
            if trial.should_prune():
                stop = row["step"]
                break
        if stop is not None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif status in WITH_VALUE:
            last = next((v for row in reversed(log) if (v := _number(row.get("nelbo"))) is not None), math.inf)
            study.tell(trial, last if math.isfinite(last) else None, state=optuna.trial.TrialState.COMPLETE)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        out.append(ReplayedRun(number, status, steps, stop))
    return PrunerReplay("median", out)


def replay_pruners(study_dir: str | Path, pruners: Sequence[str] = PRUNERS) -> list[dict[str, Any]]:
    """Replay each pruner over the study's unpruned runs (their metrics.jsonl, in trial order): the steps it would
    have saved and its false stops. Reads only."""
    space, runs = _finished_runs(Path(study_dir))
    table: dict[str, Callable[[], PrunerReplay]] = {
        "instability": lambda: _replay_instability(space, runs),
        "median": lambda: _replay_median(space, runs),
        "none": lambda: PrunerReplay("none", [ReplayedRun(n, s, k) for n, s, k, _ in runs]),
    }
    out = []
    for name in pruners:
        if name not in table:
            raise ValueError(f"unknown pruner {name!r}: expected one of {', '.join(table)}")
        replay = table[name]()
        out.append({**replay.summary(), "per_run": [vars(r) for r in replay.runs]})
    return out
