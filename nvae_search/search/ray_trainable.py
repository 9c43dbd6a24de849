"""The Ray Tune trainable: one trial trains its configuration in ``<study>/trials/ray_<tune trial id>/`` and reports.

- **A trial never reports NaN.** It reports the training NELBO (per-dim unit) every ``budget.report_every_steps``
  as ``train_nelbo`` (ASHA's metric and Optuna's intermediate value) and a final result flagged ``final: 1`` that
  carries the objective values and the outcome. Divergence is an outcome (``diverged: 1`` plus a finite
  placeholder), so Ray never retries it; ``max_failures`` retries are for dead workers and nodes.
- **Restarted trials resume.** Each report carries a Ray checkpoint holding a copy of the run's ``checkpoint.pt``
  (the trainer's exact-resume state). A trial restarted after a worker or node failure (or after the driver was
  killed and the search re-run) copies it back into its run directory and continues with ``resume=True``.
- **Data-parallel trials.** ``ray.workers_per_trial > 1`` trains each trial with torch DDP over that many local
  processes (:func:`nvae_search.distributed.train_data_parallel`) inside one placement-group bundle.

Ray is imported inside functions only.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config_io import atomic_write_text
from ..rundir import RAY_TRIAL_PREFIX as TRIAL_PREFIX
from ..rundir import ray_trial_dir
from ..status import BROKE, TrialStatus
from .constraints import OutOfDeviceMemory, out_of_memory_as_over_memory
from .instability import with_instability
from .ray_searcher import METRIC, PLACEHOLDER
from .retention import CHECKPOINT_FILE as CHECKPOINT_NAME
from .seeds import run_configuration
from .trial import InvalidCombination, TrialOutcome, config_id, outcome_from_summary, raised_divergence_outcome

if TYPE_CHECKING:
    from ..schema import Recipe
    from ..spaces import Space
    from ..train import RunSummary

__all__ = [
    "ATTEMPTS_LOG",
    "RANKS_LOG",
    "TRIAL_PREFIX",
    "prepare_worker",
    "ray_trial",
    "reports_per_trial",
    "trial_recipe",
    "trial_threads",
]

RAY_STATE = "ray_state.json"  # inside each Ray checkpoint, next to the copy of checkpoint.pt
ATTEMPTS_LOG = "ray_attempts.jsonl"  # in each trial's run directory: one line per (re)start
RANKS_LOG = "ray_ranks.jsonl"  # in a data-parallel trial's run directory: one line per rank started
STOP_GRACE_S = 300  # how long a reused actor may take to finish the trial that Ray stopped
UNBOUNDED_REPORTS = 10**9  # ASHA's max_t when the number of reports is not known in advance


def reports_per_trial(space: Space) -> int:
    """Tune results one full trial produces: a report at step 1 and every ``report_every_steps``, plus the final
    result. Exact for a step budget; an epoch or minute budget gives an upper bound (ASHA only needs one)."""
    steps, every = space.budget.steps, space.budget.report_every_steps
    if steps is None:
        return UNBOUNDED_REPORTS
    return steps // every + (0 if every == 1 else 1) + 1


def trial_recipe(space: Space, values: Mapping[str, Any], driver_cwd: str) -> Recipe:
    """The trial's recipe (see :func:`.runner.trial_recipe`), checkpointing at every report so that each report
    can hand Ray a fresh copy (a restarted trial loses < 2 reports), its data root absolute: Ray runs trials in
    other directories."""
    from .runner import trial_recipe as shared_trial_recipe

    every = space.budget.report_every_steps
    recipe = shared_trial_recipe(space, values, space.ray.workers_per_trial, checkpoint_every_steps=every)
    data = recipe.data
    if data.root and not Path(data.root).expanduser().is_absolute():
        return recipe.model_copy(update={"data": data.model_copy(update={"root": str(Path(driver_cwd) / data.root)})})
    return recipe


def _restore_run_dir(run_dir: Path) -> tuple[bool, int, float]:
    """Seed the run directory from Ray's checkpoint of this trial: (resume?, last reported step, earlier trial_s)."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / RAY_STATE).read_text())
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(folder) / CHECKPOINT_NAME, run_dir / (CHECKPOINT_NAME + ".restore"))
            os.replace(run_dir / (CHECKPOINT_NAME + ".restore"), run_dir / CHECKPOINT_NAME)
        return True, int(state["reported_step"]), float(state.get("trial_s", 0.0))
    if run_dir.exists():  # an earlier attempt that never handed Ray a checkpoint: start over (keep the log)
        for item in run_dir.iterdir():
            if item.name != ATTEMPTS_LOG:
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    return False, 0, 0.0


def _append_line(path: Path, line: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


def _log_attempt(run_dir: Path, resumed_after_step: int | None) -> None:
    """One line per start of the trial in ``ray_attempts.jsonl``: restarts (worker or node lost, driver killed and
    the search re-run) and where each one resumed are visible in the run directory."""
    import ray

    line = {
        "time": time.time(),
        "node": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "resumed_after_step": resumed_after_step,
    }
    _append_line(run_dir / ATTEMPTS_LOG, line)


def _log_rank(run_dir: str, rank: int) -> None:
    """One line per DDP rank that started in ``ray_ranks.jsonl``: which ranks really trained, in which world."""
    line = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "pid": os.getpid()}
    _append_line(Path(run_dir) / RANKS_LOG, line)


def _final(ident: dict[str, Any], outcome: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A final result: never NaN, flagged ``final``, ``invalid`` and ``diverged`` explicitly."""
    return {METRIC: PLACEHOLDER, "final": 1, "invalid": 0, "diverged": 0, **fields, "outcome": outcome, **ident}


class _Reporter:
    """The trainer's report hook: each new report goes to Tune, with a copy of ``checkpoint.pt`` when the trainer
    wrote a new one. A report Ray refuses (it stopped the trial) stops the run gracefully instead."""

    def __init__(
        self, run_dir: Path, ident: dict[str, Any], unit: str, reported: int, clock: Callable[[], float]
    ) -> None:
        self.run_dir, self.ident, self.unit, self.clock = run_dir, ident, unit, clock
        self.reported = reported
        self.signature: tuple[int, int] | None = None
        self.stopped = False

    def __call__(self, step: int, metrics: dict[str, Any]) -> bool:
        if step <= self.reported:
            return False  # replayed after a restart: Ray and Optuna already have it
        nelbo = float(metrics["nelbo"])
        payload = {
            METRIC: nelbo if math.isfinite(nelbo) else PLACEHOLDER,
            "step": step,
            "final": 0,
            "diverged": 0,
            "invalid": 0,
            "train_s": float(metrics.get("time", 0.0)),
            "trial_s": self.clock(),
            "unit": self.unit,
            **self.ident,
        }
        self.reported = step
        try:
            self._send(step, payload)
        except SystemExit:
            # Ray stopped the trial (ASHA, time budget, end of the experiment): tune.report raises SystemExit in
            # the trial's thread. Stop the run gracefully instead (every DDP rank at the same step), so the run
            # directory gets its checkpoint and a summary.json (status stopped), as a pruned Optuna trial does.
            self.stopped = True
            return True
        return False

    def _send(self, step: int, payload: dict[str, Any]) -> None:
        from ray import tune

        saved = self.run_dir / CHECKPOINT_NAME
        signature = (saved.stat().st_mtime_ns, saved.stat().st_size) if saved.exists() else None
        if signature is None or signature == self.signature:
            tune.report(payload)
            return
        self.signature = signature
        with tempfile.TemporaryDirectory(prefix="nvae-ray-ckpt-") as folder:
            shutil.copyfile(saved, Path(folder) / CHECKPOINT_NAME)
            progress = {"reported_step": step, "trial_s": self.clock()}
            atomic_write_text(Path(folder) / RAY_STATE, json.dumps(progress))
            tune.report(payload, checkpoint=tune.Checkpoint.from_directory(folder))


def _train(space: Space, recipe: Recipe, run_dir: Path, resume: bool, reporter: _Reporter) -> RunSummary:
    """Train in this process, or data-parallel over ``ray.workers_per_trial`` local processes."""
    workers = space.ray.workers_per_trial
    if workers <= 1:
        from ..train import train

        return train(recipe, run_dir, resume=resume, reporter=reporter)
    from ..distributed import train_data_parallel

    gpu = space.ray.resources_per_trial.gpu
    return train_data_parallel(
        recipe,
        run_dir,
        workers,
        backend="nccl" if gpu >= 1 else "gloo",
        resume=resume,
        on_report=reporter,
        device="cuda" if gpu > 0 else "cpu",
        worker_init=functools.partial(_log_rank, str(run_dir)),
    )


def trial_threads(space: Space) -> int:
    """The torch threads of a trial's process: the CPUs Ray reserved for it (``ray.resources_per_trial.cpu``, times
    ``ray.workers_per_trial``, whose data-parallel workers then share them), at least one."""
    return max(1, int(space.ray.resources_per_trial.cpu * max(1, space.ray.workers_per_trial)))


def prepare_worker(space: Space) -> None:
    """What a Ray worker (a fresh process that did not come through the CLI) sets up before training."""
    import torch

    from ..runtime import tune_allocator

    tune_allocator()
    # Ray sets OMP_NUM_THREADS to the trial's CPUs only when the driver's environment does not set it; a driver run
    # with OMP_NUM_THREADS=N gave every concurrent trial N threads (2 trials of 2 threads on 2 cores: 7x slower steps).
    torch.set_num_threads(trial_threads(space))
    # A stopped trial finishes gracefully (checkpoint, summary.json); when Tune reuses this actor it waits for that
    # only TUNE_FUNCTION_THREAD_TIMEOUT_S (default 2 s) before giving up, and then aborts the *next* trial.
    if int(os.environ.get("TUNE_FUNCTION_THREAD_TIMEOUT_S", "0")) < STOP_GRACE_S:
        os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = str(STOP_GRACE_S)


def _train_seeds(
    space: Space, values: Mapping[str, Any], run_dir: Path, driver_cwd: str, reporter: _Reporter, ident: dict[str, Any]
) -> None:
    """A trial of a study with ``study.aggregate``: its seeds one after the other in this worker (no data-parallel
    workers, no Ray checkpoints: a restarted trial reuses its finished seeds and resumes the others from their own
    checkpoints), then the final result with the aggregated values."""
    from ray import tune

    from ..train import TrainingDiverged, train

    def train_one(seed_values: Mapping[str, Any], seed_dir: Path, report: Any, resume: bool) -> TrialOutcome:
        start = time.perf_counter()
        on_report, instability = with_instability(space, report)  # a fresh rule per seed run
        try:
            recipe = trial_recipe(space, seed_values, driver_cwd)
            summary = train(recipe, seed_dir, resume=resume, reporter=on_report)
        except TrainingDiverged as err:  # `nonfinite: raise` recipes: still an outcome
            return raised_divergence_outcome(seed_values, str(err), err.step, seed_dir, time.perf_counter() - start)
        outcome = outcome_from_summary(space, summary, seed_values, time.perf_counter() - start)
        outcome.cause = instability() or outcome.cause
        return outcome

    outcome = run_configuration(space, values, run_dir, train_one, reporter)
    if reporter.stopped:
        raise SystemExit(0)  # stopped by Ray (see ray_trial)
    last = outcome.train_nelbo
    tune.report(
        _final(
            ident,
            outcome.attrs,
            **{METRIC: last if last is not None and math.isfinite(last) else PLACEHOLDER},
            step=outcome.steps,
            diverged=int(outcome.status in BROKE),
            objective=outcome.values,
        )
    )


def _report_invalid(ident: dict[str, Any], err: InvalidCombination, trial_s: float) -> None:
    """The final result of a trial the schema rejects or that does not fit in memory (PRUNED in Optuna)."""
    from ray import tune

    status = getattr(err, "status", TrialStatus.INVALID)  # or over_memory, with the prediction or the error in attrs
    outcome = {**ident, **getattr(err, "attrs", {}), "status": status, "cause": str(err), "trial_s": trial_s}
    tune.report(_final(ident, outcome, invalid=1))


def ray_trial(config: dict[str, Any], *, space: Space, study_dir: str, driver_cwd: str) -> None:
    """One Ray Tune trial: train the configuration in ``<study>/trials/ray_<trial id>/`` and report."""
    from ray import tune

    from ..evaluate import unit_for
    from ..train import TrainingDiverged
    from .compile import resolve_flat_params

    start = time.perf_counter()
    prepare_worker(space)
    run_dir = Path(ray_trial_dir(study_dir, tune.get_context().get_trial_id()))
    values = resolve_flat_params(space, config)
    ident = {
        "run_dir": str(run_dir),
        "config_id": config_id(values),
        "seed": values.get("train.seed"),
        "values": json.dumps(values, default=str),
    }
    try:
        recipe = trial_recipe(space, values, driver_cwd)
    except InvalidCombination as err:
        _report_invalid(ident, err, time.perf_counter() - start)
        return

    resume, reported_step, earlier_s = _restore_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _log_attempt(run_dir, resumed_after_step=reported_step if resume else None)
    atomic_write_text(run_dir / "params.json", json.dumps(dict(values), indent=2, default=str))

    def trial_s() -> float:
        return earlier_s + time.perf_counter() - start

    reporter = _Reporter(run_dir, ident, unit_for(recipe.model.output.distribution), reported_step, trial_s)
    try:
        with out_of_memory_as_over_memory():
            if space.study.aggregate is not None:  # objectives over seeds: the driver shared with the Optuna backend
                return _train_seeds(space, values, run_dir, driver_cwd, reporter, ident)
            on_report, instability = with_instability(space, reporter)  # the study's instability pruner, if any
            summary = _train(space, recipe, run_dir, resume, on_report)  # type: ignore[arg-type]
    except OutOfDeviceMemory as err:
        _report_invalid(ident, err, trial_s())
        return
    except TrainingDiverged as err:  # `nonfinite: raise` recipes: still an outcome, not a Ray error to retry
        outcome = raised_divergence_outcome(values, str(err), err.step, run_dir, trial_s())
        tune.report(_final(ident, outcome.attrs, diverged=1))
        return
    if reporter.stopped:
        # Ray already holds the outcome (the last result it saw). Leave by SystemExit(0), as Ray's own stop does:
        # a normal return would make Tune report once more, and that report would never be consumed.
        raise SystemExit(0)
    outcome_obj = outcome_from_summary(space, summary, values, trial_s())
    outcome_obj.cause = instability() or outcome_obj.cause
    attrs = outcome_obj.attrs
    last = summary.train_nelbo
    tune.report(
        _final(
            ident,
            attrs,
            **{METRIC: last if last is not None and math.isfinite(last) else PLACEHOLDER},
            step=summary.steps,
            diverged=int(attrs["status"] in BROKE),
            objective=outcome_obj.values,
        )
    )
