"""The live view of a running search: a rich ``Live`` panel on stderr, refreshed from the study itself.

Everything is read from the Optuna study (by a polling thread), so the same view serves the in-process backend,
the Ray driver and a worker that shares its study with others: trials done / running / pruned / failed of N,
the best value so far and its parameters, each running trial's step, elapsed time and an ETA. ``quiet`` prints
one line per finished trial instead; ``verbose`` adds each trial's parameters to its line.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .report_rows import fmt_num

if TYPE_CHECKING:
    import optuna

POLL_S = 1.0


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _objective(value: float) -> str:
    return fmt_num(value, 4, measured=True)  # as the report shows it: 252.0 beside 241.6, not 252


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('model.').removeprefix('train.')}={_short(v)}" for k, v in params.items())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def trial_line(trial: optuna.trial.FrozenTrial, verbose: bool = False) -> str:
    attrs = trial.user_attrs
    value = "" if trial.values is None else " ".join(map(_objective, trial.values)) + f" {attrs.get('unit') or ''}"
    status = attrs.get("status", trial.state.name.lower())
    extra = f"at step {attrs['diverged_step']}" if attrs.get("diverged_step") else ""
    line = f"trial {trial.number:3d}  {status:<11} {value or extra}  ({float(attrs.get('trial_s') or 0):.1f} s)"
    return line + (f"  {_params(trial.params)}" if verbose else "")


class SearchView:
    """Start with :meth:`start` (the study and its ``n_trials``), end with :meth:`stop`."""

    def __init__(self, console: Console, *, steps: int | None, quiet: bool = False, verbose: bool = False) -> None:
        self.console = console
        self.steps = steps
        self.quiet = quiet
        self.verbose = verbose
        self.study: optuna.Study | None = None
        self.target = 0
        self.started = time.monotonic()
        self._seen: set[int] = set()
        self._done_here = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None

    def start(self, study: optuna.Study, target: int) -> None:
        self.study, self.target = study, target
        self.started = time.monotonic()
        self._seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        if not self.quiet:
            self._live = Live(self._render([]), console=self.console, refresh_per_second=2, transient=False)
            self._live.start()
        self._thread = threading.Thread(target=self._poll, name="search-view", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.study is not None:
            self._update()
        if self._live is not None:
            self._live.stop()
            if not self.console.is_terminal:
                self.console.line()  # rich ends a live display with a newline on terminals only: not in a log file

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._update()
            except Exception:  # a storage hiccup must not end the search; the next poll tries again
                continue

    def _update(self) -> None:
        assert self.study is not None
        trials = self.study.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state.is_finished() and trial.number not in self._seen:
                self._seen.add(trial.number)
                self._done_here += 1
                (self._live.console if self._live else self.console).print(
                    Text(trial_line(trial, self.verbose)), highlight=False
                )
        if self._live is not None:
            self._live.update(self._render(trials))

    def _render(self, trials: list[optuna.trial.FrozenTrial]) -> Group:
        from optuna.trial import TrialState

        counted = [t for t in trials if t.state.is_finished() and not t.user_attrs.get("interrupted")]
        states = [t.state for t in counted]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        elapsed = time.monotonic() - self.started
        left = max(0, self.target - len(counted))
        eta = _duration(elapsed / self._done_here * left) if self._done_here and left else "-"
        head = Text.assemble(
            ("search ", "bold"),
            f"{len(counted)} of {self.target} done ("
            if len(counted) <= self.target
            else f"{len(counted)} done, more than the {self.target} asked for (",
            (f"{states.count(TrialState.COMPLETE)} completed", "green"),
            ", ",
            (f"{states.count(TrialState.PRUNED)} pruned", "yellow"),
            ", ",
            (f"{states.count(TrialState.FAIL)} failed", "red"),
            f"), {len(running)} running · elapsed {_duration(elapsed)} · ETA {eta}",
        )
        parts: list[Any] = [head]
        best = self._best(trials)
        if best is not None:
            values = " ".join(map(_objective, best.values or []))
            parts.append(Text(f"best: trial {best.number}  {values}  {_params(best.params)}"))
        if running:
            table = Table(box=None, show_header=True, pad_edge=False)
            table.add_column("trial", justify="right")
            table.add_column("step")
            table.add_column("parameters", overflow="fold")
            for trial in running:
                table.add_row(str(trial.number), self._progress(trial), _params(trial.params))
            parts.append(table)
        return Group(*parts)

    def _progress(self, trial: optuna.trial.FrozenTrial) -> str:
        step = trial.user_attrs.get("progress")
        if step is None and trial.intermediate_values:
            step = max(trial.intermediate_values)
        of = f" of {self.steps}" if self.steps else ""
        return f"{step or 0}{of}"

    def _best(self, trials: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
        from optuna.trial import TrialState

        assert self.study is not None
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
        if not complete:
            return None
        if len(self.study.directions) > 1:
            return None  # several objectives: no single best (the report shows the Pareto front)
        sign = 1.0 if self.study.direction.name == "MINIMIZE" else -1.0
        return min(complete, key=lambda t: sign * t.values[0])
