"""``nvae-search repeat``: the seed repeats of the best configurations, trained as their own resumable step.

Real tiny trainings (recipes/cpu/tiny.yaml, 10 steps): a search whose trials keep no checkpoint, `report` saying
what is missing, `repeat` training it, `report` reading it, and `repeat` resuming or restarting cut-off runs.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from nvae_search.cli import app
from nvae_search.search.repeats import run_repeats
from nvae_search.search.runner import create_study, run_optuna_search, storage_url, write_study_file
from nvae_search.search.trial import config_id
from nvae_search.spaces import Space, load_space

TINY = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"
StepInstaller = Callable[[Any], None]  # the before_train_step fixture (conftest)
runner = CliRunner()

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_space(tmp_path: Path, name: str, budget: dict[str, Any], repeats: dict[str, Any]) -> Space:
    doc = {
        "base_recipe": str(TINY),
        "study": {"name": name, "n_trials": 2, "seed": 0, "objectives": [{"metric": "nelbo", "direction": "minimize"}]},
        "budget": {"steps": 10, "eval_iw_samples": 2, "eval_images": 32, "report_every_steps": 5, **budget},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "repeats": repeats,
        "space": {"train.learning_rate": {"type": "categorical", "choices": [0.003, 0.01]}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_space(path)


def invoke(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_repeat_then_report_after_keep_checkpoints_none(tmp_path: Path, torch_single_thread: None) -> None:
    space = write_space(tmp_path, "rep-none", {"keep_checkpoints": "none"}, {"top_k": 1, "seeds": [5]})
    study_dir = run_optuna_search(space, n_trials=2, root=tmp_path / "runs")
    trial_dirs = sorted((study_dir / "trials").iterdir())
    assert len(trial_dirs) == 2
    for run_dir in trial_dirs:  # `none`: no checkpoint left, everything else kept
        assert not (run_dir / "checkpoint.pt").exists()
        for file in ("summary.json", "metrics.jsonl", "recipe.resolved.yaml", "params.json"):
            assert (run_dir / file).is_file()
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"

    before = invoke("report", str(study_dir))
    assert before.exit_code == 0, before.output
    assert "lacks 1 seed(s): 5" in before.output
    assert f"nvae-search repeat {study_dir}" in before.output
    assert not (study_dir / "repeats").exists()

    done = invoke("repeat", str(study_dir))
    assert done.exit_code == 0, done.output
    assert "repeat 1/1: config" in done.output and "seed 5: training" in done.output
    (repeat_dir,) = (study_dir / "repeats").glob("*/seed_5")
    summary = json.loads((repeat_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 10
    assert not (repeat_dir / "checkpoint.pt").exists()  # `none` holds for repeats too
    params = json.loads((repeat_dir / "params.json").read_text())
    assert params["train.seed"] == 5 and repeat_dir.parent.name == config_id(params)
    assert "0 already done, 1 run now" in done.output

    after = invoke("report", str(study_dir))
    assert after.exit_code == 0, after.output
    assert "rep s5" in after.output and "Seed repeats missing" not in after.output
    rows = json.loads((study_dir / "report" / "leaderboard.json").read_text())
    (row,) = [r for r in rows if r["source"] == "repeat"]
    assert row["seed"] == 5 and row["status"] == "completed" and row["config_id"] == repeat_dir.parent.name

    stamp = (repeat_dir / "summary.json").stat().st_mtime_ns
    again = invoke("repeat", str(study_dir))
    assert again.exit_code == 0 and "1 already done, 0 run now" in again.output
    assert (repeat_dir / "summary.json").stat().st_mtime_ns == stamp  # nothing trained again


@pytest.fixture
def handmade_study(tmp_path: Path) -> tuple[Path, Space]:
    """A study whose one completed trial never trained here (only its outcome was recorded): a repeat needs
    nothing from the trial but its configuration."""
    return make_handmade_study(tmp_path, {"top_k": 1, "seeds": [6]})


def make_handmade_study(tmp_path: Path, repeats: dict[str, Any]) -> tuple[Path, Space]:
    space = write_space(tmp_path, "rep-resume", {}, repeats)
    study_dir = tmp_path / "runs" / "rep-resume"
    url = storage_url(space, study_dir, None)
    write_study_file(space, study_dir, url, "optuna")
    study = create_study(space, url)
    values = {"train.learning_rate": 0.01}
    study.add_trial(
        create_trial(
            state=TrialState.COMPLETE,
            value=150.0,
            params=values,
            distributions={"train.learning_rate": CategoricalDistribution([0.003, 0.01])},
            user_attrs={"status": "completed", "config_id": config_id(values), "values": json.dumps(values)},
        )
    )
    return study_dir, space


def test_repeat_resumes_a_stopped_run_and_restarts_one_cut_off_before_its_checkpoint(
    handmade_study: tuple[Path, Space], torch_single_thread: None
) -> None:
    study_dir, _space = handmade_study
    started: list[tuple[int, bool]] = []

    def on_start(job: Any, index: int, total: int, resumed: bool) -> None:
        started.append((job.seed, resumed))

    first = run_repeats(study_dir, on_start=on_start)
    assert [(job.seed, status) for job, status in first.ran] == [(6, "completed")] and not first.failed
    run_dir = study_dir / "repeats" / config_id({"train.learning_rate": 0.01}) / "seed_6"
    assert (run_dir / "checkpoint.pt").is_file()  # the default policy keeps a repeat's checkpoint
    logged = steps_logged(run_dir)
    metrics = (run_dir / "metrics.jsonl").read_bytes()  # with each step's timing: a retrained run differs

    # Stopped by a signal at its last checkpoint: the summary says "stopped"; `repeat` resumes, trains nothing.
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "stopped"}))
    resumed = run_repeats(study_dir, on_start=on_start)
    assert [status for _job, status in resumed.ran] == ["completed"]
    assert started[-1] == (6, True)
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # resumed at its last step: nothing retrained
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"

    # Killed before its first checkpoint: a fresh start in an emptied directory (no duplicated metric rows).
    (run_dir / "checkpoint.pt").unlink()
    (run_dir / "summary.json").unlink()
    restarted = run_repeats(study_dir, on_start=on_start)
    assert [status for _job, status in restarted.ran] == ["completed"]
    assert started[-1] == (6, False)
    assert steps_logged(run_dir) == logged
    assert len(list((run_dir / "tb").glob("events.*"))) == 1  # the cut-off attempt's files went with it
    assert run_repeats(study_dir).ran == []  # done: nothing left to run


def test_a_repeat_that_runs_out_of_cuda_memory_is_recorded_as_over_memory_and_the_others_still_run(
    tmp_path: Path, before_train_step: StepInstaller, torch_single_thread: None
) -> None:
    import torch

    study_dir, _space = make_handmade_study(tmp_path, {"top_k": 1, "seeds": [6, 7]})

    def oom_for_seed_6(trainer: Any, _x: Any) -> None:
        if trainer.recipe.train.seed == 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    before_train_step(oom_for_seed_6)
    result = run_repeats(study_dir)
    assert [job.seed for job, _status in result.ran] == [7]
    ((failed, error),) = result.failed
    assert failed.seed == 6 and "out of CUDA memory while training" in error
    recorded = json.loads((failed.run_dir / "repeat_error.json").read_text())
    assert recorded["status"] == "over_memory"  # not "invalid": the configuration is valid, the device too small
    # On a larger device the same command trains it, and its error record goes.
    before_train_step(None)
    again = run_repeats(study_dir)
    assert [(job.seed, status) for job, status in again.ran] == [(6, "completed")] and not again.failed
    assert not (failed.run_dir / "repeat_error.json").exists()


def sigterm_at_step_3(seed: int | None = None) -> Callable[[Any, Any], None]:
    """A step hook sending this process SIGTERM (a scheduler's, before preemption) at step 3 of ``seed`` (any)."""

    def hook(trainer: Any, _x: Any) -> None:
        if trainer.step == 3 and seed in (None, trainer.recipe.train.seed):
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def test_a_signal_during_a_repeat_stops_the_command_there_and_the_next_call_resumes_it(
    tmp_path: Path, before_train_step: StepInstaller, torch_single_thread: None
) -> None:
    """SIGTERM while seed 6 trains: it checkpoints and stops, and the command ends there instead of going on to
    seed 7."""
    study_dir, _space = make_handmade_study(tmp_path, {"top_k": 1, "seeds": [6, 7]})
    before_train_step(sigterm_at_step_3(seed=6))
    stopped = run_repeats(study_dir)
    assert [(job.seed, status) for job, status in stopped.ran] == [(6, "stopped")]
    before_train_step(None)
    resumed: list[tuple[int, bool]] = []
    rest = run_repeats(
        study_dir, on_start=lambda job, i, n, from_checkpoint: resumed.append((job.seed, from_checkpoint))
    )
    assert resumed == [(6, True), (7, False)]
    assert [status for _job, status in rest.ran] == ["completed", "completed"]


def test_a_repeat_that_failed_after_its_checkpoint_loses_its_error_record_once_it_completes(
    tmp_path: Path, before_train_step: StepInstaller, torch_single_thread: None
) -> None:
    """Stopped (checkpointed), resumed into an error, resumed again to its end: the error record is not left to
    contradict the finished run."""

    def broken(_trainer: Any, _x: Any) -> None:
        raise RuntimeError("NCCL error: unhandled system error")

    study_dir, _space = make_handmade_study(tmp_path, {"top_k": 1, "seeds": [6]})
    before_train_step(sigterm_at_step_3())
    assert [status for _job, status in run_repeats(study_dir).ran] == ["stopped"]
    before_train_step(broken)
    ((job, error),) = run_repeats(study_dir).failed
    assert "NCCL error" in error and (job.run_dir / "repeat_error.json").is_file()
    assert (job.run_dir / "checkpoint.pt").is_file()  # the stop's checkpoint: the next call resumes from it
    before_train_step(None)
    assert [status for _job, status in run_repeats(study_dir).ran] == ["completed"]
    assert not (job.run_dir / "repeat_error.json").exists()


def test_repeat_command_errors_are_one_screen_exit_2(handmade_study: tuple[Path, Space], tmp_path: Path) -> None:
    study_dir, _space = handmade_study
    bad = invoke("repeat", str(study_dir), "--backend", "dask")
    assert bad.exit_code == 2 and "expected one of optuna, ray" in " ".join(bad.output.split())
    nowhere = invoke("repeat", str(tmp_path / "nowhere"))
    assert nowhere.exit_code == 2 and "not a study directory" in nowhere.output
    assert not (study_dir / "repeats").exists()


def test_repeat_on_a_space_without_repeats_says_so(tmp_path: Path) -> None:
    study_dir, _space = make_handmade_study(tmp_path, {})
    result = invoke("repeat", str(study_dir))
    assert result.exit_code == 0 and "the space asks for no repeats" in " ".join(result.output.split())
    assert not (study_dir / "repeats").exists()


def test_two_repeat_processes_share_the_repeats_and_train_each_once(
    handmade_study: tuple[Path, Space], torch_single_thread: None
) -> None:
    study_dir, space = handmade_study
    doc = yaml.safe_load(Path(str(space.source)).read_text())
    Path(str(space.source)).write_text(yaml.safe_dump({**doc, "repeats": {"top_k": 1, "seeds": [6, 7]}}))
    other: list[Any] = []

    def start_another_process(job: Any, *_: Any) -> None:
        # While this process trains seed 6 (holding its lock), a second `repeat` reads the same plan.
        if job.seed == 6:
            other.append(run_repeats(study_dir))

    first = run_repeats(study_dir, on_start=start_another_process)
    (second,) = other
    assert [job.seed for job in second.busy] == [6]  # held by the first: left to it
    assert [(job.seed, status) for job, status in second.ran] == [(7, "completed")]
    # The first reaches seed 7 after the second finished it: it sees the summary and does not train it again.
    assert [(job.seed, status) for job, status in first.ran] == [(6, "completed")]
    assert [job.seed for job in first.already_done] == [7]
    seed_dirs = [study_dir / "repeats" / config_id({"train.learning_rate": 0.01}) / f"seed_{s}" for s in (6, 7)]
    logged = [steps_logged(d) for d in seed_dirs]
    assert logged[0] == logged[1] and logged[0] and len(set(logged[0])) == len(logged[0])  # each trained once


@pytest.mark.slow
def test_repeat_on_ray_runs_each_repeat_as_a_tune_trial(
    ray_session: None, handmade_study: tuple[Path, Space], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ray.tune", reason="the Ray backend needs the optional extra: pip install 'nvae-search[ray]'")
    study_dir, space = handmade_study
    # Ask for two seeds: rewrite the space file that study.json points at.
    doc = yaml.safe_load(Path(space.source).read_text())
    doc["repeats"]["seeds"] = [6, 7]
    Path(space.source).write_text(yaml.safe_dump(doc, sort_keys=False))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a local test instance: no token

    result = run_repeats(study_dir, backend="ray")
    assert sorted((job.seed, status) for job, status in result.ran) == [(6, "completed"), (7, "completed")]
    assert not result.failed
    cid = config_id({"train.learning_rate": 0.01})
    for seed in (6, 7):
        run_dir = study_dir / "repeats" / cid / f"seed_{seed}"
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
        assert json.loads((run_dir / "params.json").read_text())["train.seed"] == seed
    assert list((study_dir / "ray").glob("repeats-*"))  # the Tune experiment of the repeats
    assert run_repeats(study_dir, backend="ray").ran == []  # all done: Ray is not even started
