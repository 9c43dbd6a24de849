"""The Ray Tune searcher: Ray's public ``Searcher`` API driving Optuna's public ``ask``/``tell`` on the study's own
storage (the journal or database of the Optuna backend), so ``report``, ``repeat``, optuna-dashboard and resumes see
Ray trials like any other.

:class:`StudyBridge` holds all the logic and imports no Ray: ``suggest`` asks the study for a trial and samples
the space's define-by-run function on it; ``on_trial_result`` stores the training NELBO as Optuna's intermediate
value; ``on_trial_complete`` tells Optuna the outcome honestly (:func:`decide`): a diverged trial FAIL (never a
NaN value, which Optuna refuses and would leave RUNNING for good), a trial that ASHA stopped early PRUNED with its
last intermediate value (Ray's stock searcher tells COMPLETE, so TPE would mistake low-fidelity losses for final
ones), an invalid combination PRUNED (status ``invalid``), a completed trial with its objective value(s); every
trial gets the outcome user attributes. ``save``/``restore`` keep which Optuna trial each Ray trial is (by number,
as JSON), so a restored experiment tells its trials' outcomes to the right Optuna trials.

:func:`make_searcher` returns it as a ``ray.tune.search.Searcher``; the class is built on first use so that
importing this module costs nothing, and instances pickle through :func:`make_searcher` (Tune pickles the searcher
with the experiment and unpickles it on restore, then calls ``restore`` with the saved state).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..rundir import ray_trial_dir
from ..status import BROKE, WITH_VALUE, TrialStatus
from .storage import open_storage, trial_id
from .trial import OUTCOME_KEYS

if TYPE_CHECKING:
    import optuna

    from ..spaces import Space

__all__ = ["METRIC", "PLACEHOLDER", "StudyBridge", "after_each_trial", "decide", "make_searcher"]

logger = logging.getLogger(__name__)

METRIC = "train_nelbo"
"""The intermediate metric every report carries: training NELBO in the run's unit (ASHA's metric, minimised)."""
PLACEHOLDER = 1.0e12
"""The finite value reported for ``train_nelbo`` when there is none (diverged, invalid): never NaN."""
RESULT_KEYS = ("run_dir", "config_id", "seed", "values", "unit", "train_s", "trial_s")
"""Keys of a Ray result copied into the trial's outcome attributes as they are."""

TrialCallback = Callable[["optuna.Study", "optuna.trial.FrozenTrial"], None]
_AFTER_EACH_TRIAL: list[TrialCallback] = []


@contextlib.contextmanager
def after_each_trial(callbacks: list[TrialCallback]) -> Iterator[None]:
    """While the block runs, the searcher calls each ``callback(study, trial)`` in this process once it has told
    Optuna a trial's outcome, as the Optuna backend calls its study callbacks (``budget.keep_checkpoints``, the
    tracker). Not part of the searcher's state: a searcher restored with an experiment gets them too."""
    _AFTER_EACH_TRIAL.extend(callbacks)
    try:
        yield
    finally:
        for callback in callbacks:
            _AFTER_EACH_TRIAL.remove(callback)


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


def _final_state(result: Mapping[str, Any], attrs: dict[str, Any]) -> tuple[Any, Any]:
    """(Optuna state, values) of a trial's final result; updates ``attrs`` with its outcome."""
    from optuna.trial import TrialState

    attrs.update(_outcome_from_result(result))
    status = attrs.get("status")
    if result.get("invalid") or status == TrialStatus.INVALID:
        attrs["status"] = TrialStatus.OVER_MEMORY if status == TrialStatus.OVER_MEMORY else TrialStatus.INVALID
        return TrialState.PRUNED, None
    if result.get("diverged") or status in BROKE:
        attrs["status"] = status if status in BROKE else TrialStatus.DIVERGED
        return TrialState.FAIL, None
    if status == TrialStatus.STOPPED:
        attrs["status"] = TrialStatus.PRUNED
        return TrialState.PRUNED, None
    values = result.get("objective")
    if status in WITH_VALUE and isinstance(values, (list, tuple)) and values:
        floats = [float(v) for v in values]
        if all(math.isfinite(v) for v in floats):
            return TrialState.COMPLETE, (floats[0] if len(floats) == 1 else floats)
    attrs.update(status=TrialStatus.DIVERGED, cause=attrs.get("cause") or "no finite objective at the end of the run")
    return TrialState.FAIL, None


def decide(result: Mapping[str, Any] | None, error: bool, last: Mapping[str, Any]) -> tuple[Any, Any, dict]:
    """(Optuna state, values, user attributes) for a finished Ray trial. ``last`` is the trial's last result."""
    from optuna.trial import TrialState

    result = dict(result or {})
    attrs: dict[str, Any] = dict.fromkeys(OUTCOME_KEYS)
    seen = result or dict(last)
    attrs.update({key: seen[key] for key in RESULT_KEYS if key in seen})
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
        state, values = _final_state(result, attrs)
        return state, values, attrs
    # Stopped by the scheduler (ASHA) or by the study's time budget before it reported its final result.
    attrs.update(status=TrialStatus.PRUNED, cause=f"stopped early by Ray at step {attrs.get('steps')}")
    return TrialState.PRUNED, None, attrs


class StudyBridge:
    """Ray's searcher calls on an Optuna study in a storage: ``suggest`` asks, ``on_trial_complete`` tells.

    ``METRIC`` is the intermediate metric every report carries; the study's objectives (one or more) come from the
    final result's ``objective`` list, so reports need not carry the objective metrics (Tune requires the
    searcher's metric in every result). Only the mapping below is saved; the study is opened on first use.
    """

    def __init__(self, space: Space, url: str, study_dir: str | None = None) -> None:
        self.space = space
        self.url = url
        self.study_dir = study_dir  # where trial runs go; None in a searcher pickled before it was recorded
        self.numbers: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self.completed: set[str] = set()
        self.last: dict[str, dict[str, Any]] = {}  # the last result of each running trial
        self.reported: dict[str, int] = {}  # the last step told to Optuna as an intermediate value
        self._study: optuna.Study | None = None
        self._study_storage: Any = None

    # ------------------------------------------------------------------------------------------ the study
    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._open()
        assert self._study is not None
        return self._study

    @property
    def storage(self) -> Any:
        if self._study_storage is None:
            self._open()
        return self._study_storage

    def _open(self) -> None:
        import optuna

        from .runner import create_study

        self._study_storage = optuna.storages.get_storage(open_storage(self.url))
        self._study = create_study(self.space, self.url, self._study_storage)

    def _trial_id(self, ray_trial_id: str) -> int:
        return trial_id(self.storage, self.study, self.numbers[ray_trial_id])

    # ------------------------------------------------------------------------------- Ray's Searcher calls
    def suggest(self, ray_trial_id: str) -> dict[str, Any] | None:
        from .compile import make_ray_space_fn

        trial = self.study.ask()  # a queued (enqueued or retried) point first, as in the Optuna backend
        self.numbers[ray_trial_id] = trial.number
        if self.study_dir is not None:
            # Known from the start, so that a trial whose driver dies (no outcome told) still names its run for
            # budget.keep_checkpoints, as an Optuna-backend trial does.
            trial.set_user_attr("run_dir", ray_trial_dir(self.study_dir, ray_trial_id))
        try:
            make_ray_space_fn(self.space)(trial)
        except Exception:
            self.study.tell(trial, state=_state("FAIL"))
            self.completed.add(ray_trial_id)
            raise
        return dict(trial.params)

    def on_trial_result(self, ray_trial_id: str, result: dict) -> None:
        if ray_trial_id in self.completed or ray_trial_id not in self.numbers:
            return
        keep = (*RESULT_KEYS, "step", METRIC)
        self.last[ray_trial_id] = {k: _plain(result[k]) for k in keep if k in result}
        self._report(ray_trial_id, result)

    def on_trial_complete(self, ray_trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if ray_trial_id in self.completed or ray_trial_id not in self.numbers:
            return
        number = self.numbers[ray_trial_id]
        try:
            state, values, attrs = decide(result, error, self.last.get(ray_trial_id, {}))
            if attrs.get("run_dir") is None and self.study_dir is not None:  # it never reported
                attrs["run_dir"] = ray_trial_dir(self.study_dir, ray_trial_id)
            if result and state == _state("PRUNED"):
                # Tune does not pass the result that made ASHA stop the trial to on_trial_result: record it, so
                # the PRUNED value is the one the trial was stopped at.
                self._report(ray_trial_id, result)
            tid = self._trial_id(ray_trial_id)
            for key, value in attrs.items():
                self.storage.set_trial_user_attr(tid, key, _plain(value))
            self.study.tell(number, values, state=state)
        except Exception:  # never leave the Optuna trial RUNNING
            logger.exception("could not tell Optuna the outcome of Ray trial %s; marking it FAIL", ray_trial_id)
            self._fail(ray_trial_id)
        self.completed.add(ray_trial_id)
        self.last.pop(ray_trial_id, None)
        self.reported.pop(ray_trial_id, None)
        self._after(number)

    def save(self, checkpoint_path: str) -> None:
        state = {
            "numbers": self.numbers,
            "completed": sorted(self.completed),
            "last": self.last,
            "reported": self.reported,
        }
        with open(checkpoint_path, "w", encoding="utf-8") as fh:  # Tune writes a temporary file, then renames it
            json.dump(state, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, encoding="utf-8") as fh:
            state = json.load(fh)
        self.numbers = {str(k): int(v) for k, v in state["numbers"].items()}
        self.completed = set(state["completed"])
        self.last = {str(k): dict(v) for k, v in state["last"].items()}
        self.reported = {str(k): int(v) for k, v in state["reported"].items()}

    # ------------------------------------------------------------------------------------------ helpers
    def _report(self, ray_trial_id: str, result: Mapping[str, Any]) -> None:
        """The training NELBO as Optuna's intermediate value at its training step (single objective only)."""
        if self.space.study.multi_objective or result.get("final"):
            return
        step, value = result.get("step"), result.get(METRIC)
        if step is None or value is None or not math.isfinite(float(value)) or value >= PLACEHOLDER:
            return
        if int(step) <= self.reported.get(ray_trial_id, 0):
            return  # a restarted trial re-reporting a step Optuna already holds
        self.storage.set_trial_intermediate_value(self._trial_id(ray_trial_id), int(step), float(value))
        self.reported[ray_trial_id] = int(step)

    def _after(self, number: int) -> None:
        """The callbacks of :func:`after_each_trial`; a failing one (a disk clean-up, a tracker) is logged and the
        search goes on: the trial's outcome is already recorded."""
        for callback in list(_AFTER_EACH_TRIAL):
            try:
                callback(self.study, self.study.get_trials(deepcopy=False)[number])
            except Exception:
                logger.exception("a callback after trial %d failed", number)

    def _fail(self, ray_trial_id: str) -> None:
        try:
            self.storage.set_trial_user_attr(self._trial_id(ray_trial_id), "status", TrialStatus.ERROR)
            self.study.tell(self.numbers[ray_trial_id], state=_state("FAIL"), skip_if_finished=True)
        except Exception:
            logger.exception("could not mark the Optuna trial of Ray trial %s as FAIL", ray_trial_id)


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


@functools.cache
def searcher_class() -> type:
    """:class:`StudyBridge` as a ``ray.tune.search.Searcher``; built on first use so this module imports no Ray."""
    from ray.tune.search import Searcher

    class StudySearcher(StudyBridge, Searcher):  # type: ignore[misc]
        def __init__(self, space: Space, url: str, study_dir: str | None = None) -> None:
            Searcher.__init__(self, metric=METRIC, mode="min")
            StudyBridge.__init__(self, space, url, study_dir)

        def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
            # Pickled with the experiment (tuner.pkl) by name of this module-level factory, not of the class;
            # the mapping of trials is saved and restored by Tune through save/restore.
            return make_searcher, (self.space, self.url, self.study_dir)

    return StudySearcher


def make_searcher(space: Space, url: str, study_dir: str | None = None) -> Any:
    """A ``ray.tune.search.Searcher`` over the study of ``space`` in the storage at ``url``; with ``study_dir``,
    each trial's ``run_dir`` attribute is set when it is suggested."""
    return searcher_class()(space, url, study_dir)
