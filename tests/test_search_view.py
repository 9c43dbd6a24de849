"""What `search` shows: one line per trial with -q, a live panel otherwise, and no Optuna log lines in either."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import optuna
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from nvae_search.cli import app
from nvae_search.search import runner as search_runner
from nvae_search.search.view import SearchView

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"


def test_quiet_search_prints_one_line_per_trial_and_optuna_logs_go_to_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lrs = [1.0e-2, 1.0e3]
    doc = {
        "base_recipe": str(TINY),
        "study": {"name": "quiet", "n_trials": 2, "seed": 0, "enqueue": [{"train.learning_rate": lr} for lr in lrs]},
        "budget": {"steps": 2, "eval_iw_samples": 2, "eval_images": 8, "report_every_steps": 1},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "space": {"train.learning_rate": {"type": "categorical", "choices": lrs}},
    }
    path = tmp_path / "quiet.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    real_run_one = search_runner._run_one

    def run_one(study: optuna.Study, trial: optuna.Trial, objective: object) -> None:
        real_run_one(study, trial, objective)  # type: ignore[arg-type]
        # What study.optimize logs after a failed trial: it must land in optuna.log, not in the view.
        logging.getLogger("optuna.study.study").warning(f"Trial {trial.number} failed with value None.")

    monkeypatch.setattr(search_runner, "_run_one", run_one)
    result = CliRunner().invoke(app, ["search", str(path), "--root", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if re.match(r"^trial +\d+ ", line)]
    assert len(lines) == 2 and "completed" in lines[0] and "diverged" in lines[1], result.output
    assert "failed with value" not in result.output and "[W " not in result.output
    log = (tmp_path / "runs" / "quiet" / "optuna.log").read_text()
    assert "Trial 1 failed with value None." in log
    assert result.output.strip().splitlines()[-1] == str(tmp_path / "runs" / "quiet")


def test_live_panel_shows_counts_best_running_steps_and_eta() -> None:
    study = optuna.create_study(direction="minimize")
    for lr, value in ((1e-2, 5.0), (2e-3, 3.0)):
        study.enqueue_trial({"lr": lr})
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1.0, log=True)
        study.tell(trial, value)
    pruned = study.ask()
    pruned.suggest_float("lr", 1e-4, 1.0, log=True)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    running = study.ask()
    running.suggest_float("lr", 1e-4, 1.0, log=True)
    running.set_user_attr("progress", 40)
    console = Console(record=True, width=200, file=open("/dev/null", "w"))  # noqa: SIM115
    view = SearchView(console, steps=60)
    view.study, view.target, view._done_here = study, 10, 3
    console.print(view._render(study.get_trials()))
    text = console.export_text()
    assert "3 of 10 done (2 completed, 1 pruned, 0 failed), 1 running" in text
    assert "best: trial 1  3.000 " in text and "lr=0.002" in text
    assert re.search(r"\b3\s+40 of 60\b", text), text
    assert "ETA " in text and "ETA -" not in text


def test_trial_lines_show_values_to_the_same_precision() -> None:
    from nvae_search.search.view import trial_line

    def line(value: float) -> str:
        attrs = {"unit": "nats", "trial_s": 5.8, "status": "completed"}
        return trial_line(optuna.trial.create_trial(value=value, user_attrs=attrs))

    assert "252.0 nats" in line(252.0) and "241.6 nats" in line(241.56)  # not "252" beside "241.6"


def test_a_search_view_in_a_log_file_ends_its_last_line_and_says_when_the_study_is_past_its_target() -> None:
    """Not a terminal (a log file, CI): the live display is printed once at the end, and what the command prints
    next must start on a line of its own. A study with more trials than the space's n_trials says so."""
    import io

    study = optuna.create_study(direction="minimize")
    for value in (5.0, 3.0, 4.0):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1.0, log=True)
        study.tell(trial, value)
    out = io.StringIO()
    view = SearchView(Console(file=out, width=200), steps=60)
    view.start(study, target=2)
    view.stop()
    text = out.getvalue()
    assert text.endswith("\n") and "best: trial 1  3.000" in text
    assert "3 done, more than the 2 asked for" in text
