"""The Ray Tune backend: the same study, space and trial directories as the Optuna backend, run on a Ray cluster.

``run_ray_search(space)`` drives Ray Tune with Ray's ``OptunaSearch`` over the space's define-by-run function,
told into the **same Optuna storage** as the in-process backend (``study.json``, ``report`` and optuna-dashboard
see Ray trials like any other). What this module adds to stock Ray:

- **Outcomes reach Optuna honestly.** :class:`_OutcomeAwareOptunaSearch` (an ``OptunaSearch``) tells a diverged
  trial as FAIL (never a NaN value, which Ray 2.60 would lose and leave the Optuna trial RUNNING for good), a
  trial that ASHA stopped early as PRUNED with its last intermediate value (stock Ray tells COMPLETE, so TPE would
  mistake low-fidelity losses for final ones), a completed trial with its objective value(s), and an invalid
  combination as PRUNED (status ``invalid``), as the Optuna backend does. Every trial gets the outcome user
  attributes of :data:`nvae_search.search.trial.OUTCOME_KEYS`.
- **A trial never reports NaN.** The trainable reports the training NELBO (per-dim unit) every
  ``budget.report_every_steps`` as ``train_nelbo`` (ASHA's metric and Optuna's intermediate value) and a final
  result flagged ``final: 1`` that carries the objective values and the outcome. Divergence is an outcome
  (``diverged: 1`` plus a finite placeholder), so Ray never retries it; ``max_failures`` retries are for dead
  workers and nodes.
- **Restarted trials resume.** Each report carries a Ray checkpoint holding a copy of the run's ``checkpoint.pt``
  (the trainer's exact-resume state). A trial restarted after a worker or node failure (or after the driver was
  killed and the search re-run) copies it back into its run directory and continues with ``resume=True``.
- **Re-running the command resumes the search.** The Tune experiment lives in ``<study dir>/ray/<name>``; if it
  did not finish, ``Tuner.restore(..., resume_unfinished=True, resume_errored=True)`` continues it.
- **Data-parallel trials.** ``ray.workers_per_trial > 1`` trains each trial with torch DDP over that many local
  processes (:func:`nvae_search.distributed.train_data_parallel`) inside one placement-group bundle.

Ray (and Optuna) are imported inside functions only, so importing this module costs nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config_io import ConfigError, atomic_write_text
from ..status import BROKE, WITH_VALUE, TrialStatus
from .instability import with_instability
from .runner import (
    TRIALS_DIR,
    _enqueue_warm_start,
    finished_trials,
    open_study,
    optuna_log_file,
    recover_interrupted,
    study_dir_for,
)
from .seeds import run_configuration
from .storage import open_storage
from .trial import OUTCOME_KEYS, InvalidCombination, TrialOutcome, config_id, outcome_from_summary

if TYPE_CHECKING:
    import optuna

    from ..schema import Recipe
    from ..spaces import Space

__all__ = [
    "ATTEMPTS_LOG",
    "METRIC",
    "RANKS_LOG",
    "RAY_DIR",
    "TRIAL_PREFIX",
    "init_ray",
    "reports_per_trial",
    "run_ray_search",
]

logger = logging.getLogger(__name__)

METRIC = "train_nelbo"
"""The intermediate metric every report carries: training NELBO in the run's unit (ASHA's metric, minimised)."""
PLACEHOLDER = 1.0e12
"""The finite value reported for ``train_nelbo`` when there is none (diverged, invalid): never NaN."""
RAY_DIR = "ray"
TRIAL_PREFIX = "ray_"
RAY_STATE = "ray_state.json"  # inside each Ray checkpoint, next to the copy of checkpoint.pt
ATTEMPTS_LOG = "ray_attempts.jsonl"  # in each trial's run directory: one line per (re)start
RANKS_LOG = "ray_ranks.jsonl"  # in a data-parallel trial's run directory: one line per rank started
EXPERIMENT_INFO = "{name}.nvae.json"  # next to each Tune experiment folder: what it was started for
STOP_GRACE_S = 300  # how long a reused actor may take to finish the trial that Ray stopped
UNBOUNDED_REPORTS = 10**9  # ASHA's max_t when the number of reports is not known in advance


# ---------------------------------------------------------------------------------------------- Ray setup
def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _export_package_path() -> None:
    """Put this package on PYTHONPATH so the workers of a local cluster (which inherit the environment) can
    import it even when it is not installed; on an existing cluster it must be installed on every node."""
    root = _package_root()
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


def init_ray(address: str | None = "local", **kwargs: Any) -> bool:
    """Connect to (or start) Ray unless this process already did; True when this call initialised it.

    ``local`` (or None): a fresh single-machine instance, ``ray.init(address="local", num_cpus=os.cpu_count(),
    include_dashboard=False)``; ``address="local"`` also sidesteps a stale ``ray_current_cluster`` file.
    ``auto``: the cluster started on this machine by ``ray start``. ``HOST:PORT``: a remote head; Ray ≥ 2.59 has
    token authentication on, so ``RAY_AUTH_MODE=token`` is set when unset (the token comes from
    ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``), otherwise ``ray.init`` retries ``InvalidAuthToken`` forever.
    """
    import ray

    if ray.is_initialized():
        return False
    _export_package_path()
    address = address or "local"
    if address == "local":
        options: dict[str, Any] = {"num_cpus": os.cpu_count(), "include_dashboard": False, **kwargs}
        ray.init(address="local", **options)
    elif address == "auto" or address.startswith("ray://"):
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        ray.init(address=address, **kwargs)
    return True


# ------------------------------------------------------------------------------------------ the searcher
def _plain(value: Any) -> Any:
    """A JSON-friendly value for an Optuna user attribute (Ray may hand back numpy scalars)."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _outcome_from_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """The ``outcome`` dict of a (possibly flattened) result."""
    nested = result.get("outcome")
    if isinstance(nested, Mapping):
        return dict(nested)
    return {k.split("/", 1)[1]: v for k, v in result.items() if k.startswith("outcome/")}


def _decide(result: Mapping[str, Any] | None, error: bool, last: Mapping[str, Any]) -> tuple[Any, Any, dict]:
    """(Optuna state, values, user attributes) for a finished Ray trial. ``last`` is the trial's last result."""
    from optuna.trial import TrialState

    result = dict(result or {})
    attrs: dict[str, Any] = dict.fromkeys(OUTCOME_KEYS)
    seen = result or dict(last)
    for key in ("run_dir", "config_id", "seed", "values", "unit", "train_s", "trial_s"):
        if key in seen:
            attrs[key] = seen[key]
    if "step" in seen:
        attrs["steps"] = seen["step"]
    if seen.get(METRIC) is not None and not seen.get("final"):
        attrs["train_nelbo"] = seen[METRIC]

    if error:
        attrs.update(
            status=TrialStatus.ERROR, cause="the trial raised or its worker died, after Ray's retries; see the Ray log"
        )
        return TrialState.FAIL, None, attrs
    if not result:
        # Tune ended it before it ever reported (e.g. a pending trial at the end of an interrupted experiment).
        attrs.update(status=TrialStatus.INTERRUPTED, cause="ended by Ray before its first report", interrupted=True)
        return TrialState.FAIL, None, attrs
    if result.get("final"):
        attrs.update(_outcome_from_result(result))
        status = attrs.get("status")
        if result.get("invalid") or status == TrialStatus.INVALID:
            attrs["status"] = TrialStatus.OVER_MEMORY if status == TrialStatus.OVER_MEMORY else TrialStatus.INVALID
            return TrialState.PRUNED, None, attrs
        if result.get("diverged") or status in BROKE:
            attrs["status"] = status if status in BROKE else TrialStatus.DIVERGED
            return TrialState.FAIL, None, attrs
        if status == TrialStatus.STOPPED:
            attrs["status"] = TrialStatus.PRUNED
            return TrialState.PRUNED, None, attrs
        values = result.get("objective")
        if status in WITH_VALUE and isinstance(values, (list, tuple)) and values:
            floats = [float(v) for v in values]
            if all(math.isfinite(v) for v in floats):
                return TrialState.COMPLETE, (floats[0] if len(floats) == 1 else floats), attrs
        attrs.update(
            status=TrialStatus.DIVERGED, cause=attrs.get("cause") or "no finite objective value at the end of the run"
        )
        return TrialState.FAIL, None, attrs
    # Stopped by the scheduler (ASHA) or by the study's time budget before it reported its final result.
    attrs.update(status=TrialStatus.PRUNED, cause=f"stopped early by Ray at step {attrs.get('steps')}")
    return TrialState.PRUNED, None, attrs


class _RaySpaceFn:
    """``make_ray_space_fn(space)`` in a form that pickles: Ray's OptunaSearch is saved with the stdlib pickle
    at every experiment snapshot, and a closure cannot be (``Can't pickle local object``)."""

    def __init__(self, space: Space) -> None:
        self.space = space

    def __call__(self, trial: Any) -> None:
        from .compile import make_ray_space_fn

        return make_ray_space_fn(self.space)(trial)


@functools.cache
def _searcher_class() -> type:
    """``OptunaSearch`` with honest outcomes; built on first use so that this module does not import Ray."""
    from ray.tune.search.optuna import OptunaSearch

    class _OutcomeAwareOptunaSearch(OptunaSearch):  # type: ignore[misc]
        """Ray's OptunaSearch on our study, telling FAIL / PRUNED / COMPLETE with the outcome user attributes.

        ``metric`` is the intermediate metric every report carries (``train_nelbo``); the study's objectives
        (one or more, ``directions``) come from the final result's ``objective`` list instead, so reports need not
        carry the objective metrics (Tune requires the searcher's metric in every result).
        """

        def __init__(self, space: Any, *, directions: list[str], report_intermediate: bool, **kwargs: Any) -> None:
            self._directions = list(directions)
            self._report_intermediate = report_intermediate
            self._last_results: dict[str, dict[str, Any]] = {}
            self._reported_steps: dict[str, int] = {}
            super().__init__(space=space, metric=METRIC, mode="min", **kwargs)

        def _setup_study(self, mode: Any) -> None:
            import optuna

            self._ot_study = optuna.create_study(
                storage=self._storage,
                sampler=self._sampler,
                pruner=optuna.pruners.NopPruner(),
                study_name=self._study_name,
                load_if_exists=True,
                directions=self._directions,
            )

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            keep = ("run_dir", "config_id", "seed", "values", "unit", "train_s", "trial_s", "step", METRIC)
            self._last_results[trial_id] = {k: result[k] for k in keep if k in result}
            self._report(trial_id, result)

        def _report(self, trial_id: str, result: Mapping[str, Any]) -> None:
            """The training NELBO as Optuna's intermediate value at its training step (single objective only)."""
            if not self._report_intermediate or result.get("final"):
                return
            step, value = result.get("step"), result.get(METRIC)
            if step is None or value is None or not math.isfinite(float(value)) or value >= PLACEHOLDER:
                return
            if int(step) <= self._reported_steps.get(trial_id, 0):
                return  # a restarted trial re-reporting a step Optuna already holds
            self._ot_trials[trial_id].report(float(value), int(step))
            self._reported_steps[trial_id] = int(step)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            import optuna

            from .retention import after_ray_trial as _after_trial

            ot_trial = self._ot_trials[trial_id]
            try:
                state, values, attrs = _decide(result, error, self._last_results.get(trial_id, {}))
                if result and state == optuna.trial.TrialState.PRUNED:
                    # Tune does not pass the result that made ASHA stop the trial to on_trial_result: record it,
                    # so the PRUNED value is the one the trial was stopped at.
                    self._report(trial_id, result)
                for key, value in attrs.items():
                    ot_trial.set_user_attr(key, _plain(value))
                self._ot_study.tell(ot_trial, values, state=state)
                _after_trial(self._ot_study, self._space, attrs.get("run_dir"))  # budget.keep_checkpoints
            except Exception:  # never leave the Optuna trial RUNNING
                logger.exception("could not tell Optuna the outcome of Ray trial %s; marking it FAIL", trial_id)
                try:
                    ot_trial.set_user_attr("status", TrialStatus.ERROR)
                    self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.FAIL)
                except Exception:
                    logger.exception("could not mark the Optuna trial of Ray trial %s as FAIL", trial_id)
            self._completed_trials.add(trial_id)
            self._last_results.pop(trial_id, None)
            self._reported_steps.pop(trial_id, None)

    _OutcomeAwareOptunaSearch.__module__ = __name__
    _OutcomeAwareOptunaSearch.__qualname__ = "_OutcomeAwareOptunaSearch"
    return _OutcomeAwareOptunaSearch


def __getattr__(name: str) -> Any:
    # Pickle finds the searcher class by name when Tune restores an experiment (PEP 562 module attribute).
    if name == "_OutcomeAwareOptunaSearch":
        return _searcher_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------- the trainable
def reports_per_trial(space: Space) -> int:
    """Tune results one full trial produces: a report at step 1 and every ``report_every_steps``, plus the final
    result. Exact for a step budget; an epoch or minute budget gives an upper bound (ASHA only needs one)."""
    steps, every = space.budget.steps, space.budget.report_every_steps
    if steps is None:
        return UNBOUNDED_REPORTS
    return steps // every + (0 if every == 1 else 1) + 1


def _trial_recipe(space: Space, values: Mapping[str, Any], driver_cwd: str) -> Recipe:
    from ..spaces import apply_params

    try:
        recipe = apply_params(space, values)
    except ConfigError as err:
        reason = "; ".join(f"{p}: {m}" if p else m for p, m in err.problems)
        raise InvalidCombination(reason) from None
    every = space.budget.report_every_steps
    # Checkpoint at every report, so each report can hand Ray a fresh copy (a restarted trial loses < 2 reports).
    train_cfg = recipe.train.model_copy(update={"progress": False, "log_every": every, "checkpoint_every_steps": every})
    data = recipe.data
    if data.root and not Path(data.root).expanduser().is_absolute():  # Ray runs trials in other directories
        data = data.model_copy(update={"root": str(Path(driver_cwd) / data.root)})
    recipe = recipe.model_copy(update={"train": train_cfg, "data": data})
    from .constraints import check_memory_constraint

    check_memory_constraint(
        space, recipe, space.ray.workers_per_trial
    )  # raises OverMemory (an InvalidCombination) before anything is built
    return recipe


def _restore_run_dir(run_dir: Path) -> tuple[bool, int, float]:
    """Seed the run directory from Ray's checkpoint of this trial: (resume?, last reported step, earlier trial_s)."""
    from ray import tune

    from ..checkpoint import CHECKPOINT_NAME

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
    with open(run_dir / ATTEMPTS_LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


def _log_rank(run_dir: str, rank: int) -> None:
    """One line per DDP rank that started in ``ray_ranks.jsonl``: which ranks really trained, in which world."""
    line = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "pid": os.getpid()}
    with open(Path(run_dir) / RANKS_LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


def _train_seeds(
    space: Space,
    values: Mapping[str, Any],
    run_dir: Path,
    driver_cwd: str,
    on_report: Callable[[int, dict[str, Any]], bool],
    state: dict[str, Any],
    ident: dict[str, Any],
) -> None:
    """A trial of a study with ``study.aggregate``: its seeds one after the other in this worker (no data-parallel
    workers, no Ray checkpoints: a restarted trial reuses its finished seeds and resumes the others from their own
    checkpoints), then the final result with the aggregated values."""
    from ray import tune

    from ..train import TrainingDiverged, train

    def train_one(seed_values: Mapping[str, Any], seed_dir: Path, report: Any, resume: bool) -> TrialOutcome:
        start = time.perf_counter()
        reporter, instability = with_instability(space, report)  # a fresh rule per seed run
        try:
            recipe = _trial_recipe(space, seed_values, driver_cwd)
            summary = train(recipe, seed_dir, resume=resume, reporter=reporter)
        except TrainingDiverged as err:  # `nonfinite: raise` recipes: still an outcome
            return TrialOutcome(status=TrialStatus.DIVERGED, cause=str(err), run_dir=str(seed_dir))
        outcome = outcome_from_summary(space, summary, seed_values, time.perf_counter() - start)
        outcome.cause = instability() or outcome.cause
        return outcome

    outcome = run_configuration(space, values, run_dir, train_one, on_report)
    if state["stopped"]:
        raise SystemExit(0)  # stopped by Ray (see _ray_trial)
    last = outcome.train_nelbo
    tune.report(
        {
            METRIC: last if last is not None and math.isfinite(last) else PLACEHOLDER,
            "step": outcome.steps,
            "final": 1,
            "invalid": 0,
            "diverged": int(outcome.status in BROKE),
            "objective": outcome.values,
            "outcome": outcome.attrs,
            **ident,
        }
    )


def _ray_trial(config: dict[str, Any], *, space: Space, study_dir: str, driver_cwd: str) -> None:
    """One Ray Tune trial: train the configuration in ``<study>/trials/ray_<trial id>/`` and report."""
    from ray import tune

    from ..checkpoint import CHECKPOINT_NAME
    from ..evaluate import unit_for
    from ..runtime import tune_allocator
    from ..train import TrainingDiverged
    from .compile import resolve_flat_params

    start = time.perf_counter()
    tune_allocator()  # a Ray worker is a fresh process that did not come through the CLI
    # A stopped trial finishes gracefully (checkpoint, summary.json); when Tune reuses this actor it waits for that
    # only TUNE_FUNCTION_THREAD_TIMEOUT_S (default 2 s) before giving up, and then aborts the *next* trial.
    if int(os.environ.get("TUNE_FUNCTION_THREAD_TIMEOUT_S", "0")) < STOP_GRACE_S:
        os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = str(STOP_GRACE_S)
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(study_dir) / TRIALS_DIR / f"{TRIAL_PREFIX}{trial_id}"
    values = resolve_flat_params(space, config)
    ident = {
        "run_dir": str(run_dir),
        "config_id": config_id(values),
        "seed": values.get("train.seed"),
        "values": json.dumps(values, default=str),
    }
    try:
        recipe = _trial_recipe(space, values, driver_cwd)
    except InvalidCombination as err:
        status = getattr(err, "status", TrialStatus.INVALID)  # or over_memory, with the prediction in attrs
        outcome = {**ident, **getattr(err, "attrs", {}), "status": status, "cause": str(err)}
        outcome["trial_s"] = time.perf_counter() - start
        tune.report({METRIC: PLACEHOLDER, "final": 1, "invalid": 1, "diverged": 0, "outcome": outcome, **ident})
        return

    resume, reported_step, earlier_s = _restore_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _log_attempt(run_dir, resumed_after_step=reported_step if resume else None)
    atomic_write_text(run_dir / "params.json", json.dumps(dict(values), indent=2, default=str))
    state: dict[str, Any] = {"reported": reported_step, "signature": None, "stopped": False}
    unit = unit_for(recipe.model.output.distribution)

    def trial_s() -> float:
        return earlier_s + time.perf_counter() - start

    def on_report(step: int, metrics: dict[str, Any]) -> bool:
        if step <= state["reported"]:
            return False  # replayed after a restart: Ray and Optuna already have it
        nelbo = float(metrics["nelbo"])
        payload = {
            METRIC: nelbo if math.isfinite(nelbo) else PLACEHOLDER,
            "step": step,
            "final": 0,
            "diverged": 0,
            "invalid": 0,
            "train_s": float(metrics.get("time", 0.0)),
            "trial_s": trial_s(),
            "unit": unit,
            **ident,
        }
        saved = run_dir / CHECKPOINT_NAME
        signature = (saved.stat().st_mtime_ns, saved.stat().st_size) if saved.exists() else None
        state["reported"] = step
        try:
            if signature is None or signature == state["signature"]:
                tune.report(payload)
                return False
            state["signature"] = signature
            with tempfile.TemporaryDirectory(prefix="nvae-ray-ckpt-") as folder:
                shutil.copyfile(saved, Path(folder) / CHECKPOINT_NAME)
                progress = {"reported_step": step, "trial_s": trial_s()}
                atomic_write_text(Path(folder) / RAY_STATE, json.dumps(progress))
                tune.report(payload, checkpoint=tune.Checkpoint.from_directory(folder))
            return False
        except SystemExit:
            # Ray stopped the trial (ASHA, time budget, end of the experiment): tune.report raises SystemExit in
            # the trial's thread. Stop the run gracefully instead (every DDP rank at the same step), so the run
            # directory gets its checkpoint and a summary.json (status stopped), as a pruned Optuna trial does.
            state["stopped"] = True
            return True

    if space.study.aggregate is not None:  # objectives over seeds: the driver shared with the Optuna backend
        return _train_seeds(space, values, run_dir, driver_cwd, on_report, state, ident)
    on_report, instability = with_instability(space, on_report)  # type: ignore[assignment]  # pruner: instability
    workers = space.ray.workers_per_trial
    try:
        if workers > 1:
            from ..distributed import train_data_parallel

            gpu = space.ray.resources_per_trial.gpu
            summary = train_data_parallel(
                recipe,
                run_dir,
                workers,
                backend="nccl" if gpu >= 1 else "gloo",
                resume=resume,
                on_report=on_report,
                device="cuda" if gpu > 0 else "cpu",
                worker_init=functools.partial(_log_rank, str(run_dir)),
            )
        else:
            from ..train import train

            summary = train(recipe, run_dir, resume=resume, reporter=on_report)
    except TrainingDiverged as err:  # `nonfinite: raise` recipes: still an outcome, not a Ray error to retry
        outcome = {**ident, "status": TrialStatus.DIVERGED, "cause": str(err), "trial_s": trial_s()}
        tune.report({METRIC: PLACEHOLDER, "final": 1, "invalid": 0, "diverged": 1, "outcome": outcome, **ident})
        return
    if state["stopped"]:
        # Ray already holds the outcome (the last result it saw). Leave by SystemExit(0), as Ray's own stop does:
        # a normal return would make Tune report once more, and that report would never be consumed.
        raise SystemExit(0)
    outcome_obj = outcome_from_summary(space, summary, values, trial_s())
    outcome_obj.cause = instability() or outcome_obj.cause
    attrs = outcome_obj.attrs
    last = summary.train_nelbo
    tune.report(
        {
            METRIC: last if last is not None and math.isfinite(last) else PLACEHOLDER,
            "step": summary.steps,
            "final": 1,
            "invalid": 0,
            "diverged": int(attrs["status"] in BROKE),
            "objective": outcome_obj.values,
            "outcome": attrs,
            **ident,
        }
    )


# ------------------------------------------------------------------------------------------- the search
def _experiments(exp_root: Path) -> list[tuple[int, str, dict[str, Any]]]:
    found = []
    for info_file in exp_root.glob(EXPERIMENT_INFO.format(name="*")):
        try:
            info = json.loads(info_file.read_text())
            found.append((int(info["index"]), str(info["name"]), info))
        except (OSError, ValueError, KeyError):
            continue
    return sorted(found)


def _write_experiment_info(exp_root: Path, info: dict[str, Any]) -> None:
    exp_root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(exp_root / EXPERIMENT_INFO.format(name=info["name"]), json.dumps(info, indent=2))


def _fit_completed(results: Any) -> bool:
    """Whether ``Tuner.fit`` ran its experiment to the end (every trial TERMINATED or ERROR), rather than
    returning early after a SIGINT."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None)
    if trials is None:
        return True
    return all(str(t.status) in ("TERMINATED", "ERROR") for t in trials)


def _fail_orphans(study: optuna.Study, storage: Any) -> int:
    """After a finished fit, RUNNING Optuna trials of this study were asked by a driver that died before Tune
    recorded them (Tune has since run replacements): mark them FAIL, not counted, not re-queued."""
    import optuna

    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in stale:
        storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        storage.set_trial_user_attr(trial._trial_id, "status", "interrupted")
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return len(stale)


def _make_trainable(space: Space, study_dir: Path) -> Any:
    from ray import tune

    space.base_recipe_data()  # read the base recipe here, so the workers need not see the file
    fn = tune.with_parameters(_ray_trial, space=space, study_dir=str(study_dir), driver_cwd=os.getcwd())
    res = space.ray.resources_per_trial
    workers = space.ray.workers_per_trial
    if workers > 1:
        total_gpu = res.gpu * workers
        if total_gpu > 1 and total_gpu != int(total_gpu):
            raise ConfigError(
                str(space.source or "<space>"),
                [
                    (
                        "ray.resources_per_trial.gpu",
                        f"{workers} workers × {res.gpu} GPU = {total_gpu} GPUs per trial: Ray accepts fractional GPUs "
                        "only below 1 (give each worker a whole GPU, or use fewer workers)",
                    )
                ],
            )
        # One bundle: the trial's DDP workers are local processes of the trial, so they share one node.
        bundle = {"CPU": res.cpu * workers, **({"GPU": res.gpu * workers} if res.gpu else {})}
        return tune.with_resources(fn, tune.PlacementGroupFactory([bundle]))
    return tune.with_resources(fn, {"cpu": res.cpu, "gpu": res.gpu})


def _make_tuner(
    space: Space, study_dir: Path, url: str, name: str, num_samples: int, trainable: Any, *, verbose: bool = False
) -> Any:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from .compile import directions, make_sampler

    cfg = space.ray
    searcher = _searcher_class()(
        _RaySpaceFn(space),
        directions=directions(space),
        report_intermediate=not space.multi_objective,
        sampler=make_sampler(space),
        study_name=space.study.name,
        storage=optuna.storages.get_storage(open_storage(url)),
    )
    if cfg.scheduler.type == "asha":
        scheduler: Any = ASHAScheduler(
            time_attr="training_iteration",
            metric=METRIC,
            mode="min",
            max_t=reports_per_trial(space),
            grace_period=cfg.scheduler.grace_period,
            reduction_factor=cfg.scheduler.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    timeout = space.study.timeout_minutes * 60 if space.study.timeout_minutes else None
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.max_concurrent),
            scheduler=scheduler,
            num_samples=num_samples,
            reuse_actors=cfg.reuse_actors,
            time_budget_s=timeout,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str((study_dir / RAY_DIR).resolve()),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=1 if verbose else 0,  # Ray's own tables only on request: the driver shows the search view
        ),
    )


def run_ray_search(
    space: Space,
    *,
    address: str | None = None,
    n_trials: int | None = None,
    storage: str | None = None,
    root: str | Path = "runs",
    on_start: Callable[[optuna.Study, int], None] | None = None,
    verbose: bool = False,
) -> Path:
    """Run (or continue) the study on Ray Tune; returns the study directory (same layout as the Optuna backend,
    trial runs in ``trials/ray_<tune trial id>/``, the Tune experiment in ``ray/<study name>``).

    ``address``: ``local`` (default: ``space.ray.address``), ``auto`` or ``HOST:PORT``; a process that already
    called ``ray.init`` keeps its instance. Re-running after the driver was killed restores the unfinished Tune
    experiment (trials continue from their last checkpoint); re-running after it finished starts a new
    experiment for the trials still missing from ``n_trials`` (default ``study.n_trials``).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_dir = study_dir_for(space, root).resolve()
    study, store, url = open_study(space, study_dir, storage, "ray")
    target = n_trials if n_trials is not None else space.study.n_trials
    exp_root = study_dir / RAY_DIR

    from ray import tune  # reading the experiment folder needs no running Ray

    experiments = _experiments(exp_root)
    latest = experiments[-1] if experiments else None
    restore = bool(latest and not latest[2].get("done") and tune.Tuner.can_restore(str(exp_root / latest[1])))
    if not restore:
        recover_interrupted(study, store)  # RUNNING trials of a search that left nothing to restore
        _enqueue_warm_start(study, space)
        remaining = target - finished_trials(study)
        if remaining <= 0:
            return study_dir

    if on_start is not None:
        on_start(study, target)
    quiet: dict[str, Any] = {}
    if not verbose:
        # The driver shows the search view; Ray's own experiment table, INFO lines and the trials' forwarded
        # output only with -v (trial errors stay in Ray's result files and the trials' status).
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter is silent at verbose=0
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    owns = init_ray(address or space.ray.address, **quiet)
    try:
        trainable = _make_trainable(space, study_dir)
        if restore:
            assert latest is not None
            index, name, info = latest
            tuner = tune.Tuner.restore(
                str(exp_root / name), trainable=trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            index = latest[0] + 1 if latest else 1
            name = space.study.name if index == 1 else f"{space.study.name}-{index}"
            info = {"index": index, "name": name, "num_samples": remaining, "done": False}
            _write_experiment_info(exp_root, info)
            tuner = _make_tuner(space, study_dir, url, name, remaining, trainable, verbose=verbose)
        with optuna_log_file(study_dir):
            results = tuner.fit()
        if _fit_completed(results):
            _write_experiment_info(exp_root, {**info, "done": True})
            _fail_orphans(study, store)
    finally:
        if owns:
            import ray

            ray.shutdown()
    return study_dir
