"""``budget.keep_checkpoints``: which finished trials keep checkpoint.pt, and what is never touched.

The studies here are hand-made (trials with the runner's ``run_dir`` attribute and placeholder files), so the rule
itself is checked without training; tests/test_report.py and tests/test_repeats.py run it through real searches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from nvae_search.config_io import ConfigError
from nvae_search.search.retention import apply_checkpoint_policy, checkpoint_callback, kept_trials
from nvae_search.search.runner import create_study, storage_url, write_study_file
from nvae_search.spaces import Space, load_space

TINY = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"
LR = FloatDistribution(1e-4, 1e-1, log=True)
KEPT_FILES = ("summary.json", "metrics.jsonl", "recipe.resolved.yaml", "params.json")

optuna.logging.set_verbosity(optuna.logging.WARNING)


def space_with(tmp_path: Path, budget: dict[str, Any], *, direction: str = "minimize", repeats: Any = None) -> Space:
    doc: dict[str, Any] = {
        "base_recipe": str(TINY),
        "study": {"name": "keep", "n_trials": 8, "objectives": [{"metric": "nelbo", "direction": direction}]},
        "budget": {"steps": 10, **budget},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "space": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
    }
    if repeats:
        doc["repeats"] = repeats
    path = tmp_path / "keep.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_space(path)


def run_dir_with_files(study_dir: Path, name: str) -> Path:
    run_dir = study_dir / "trials" / name
    run_dir.mkdir(parents=True)
    for file in ("checkpoint.pt", *KEPT_FILES):
        (run_dir / file).write_text("x")
    return run_dir


def study_of(tmp_path: Path, space: Space) -> tuple[Path, optuna.Study]:
    """Trials 0-2 completed (values 3, 1, 2), 3 pruned, 4 failed, 5 still running; each with its files."""
    study_dir = tmp_path / "runs" / "keep"
    url = storage_url(space, study_dir, None)
    write_study_file(space, study_dir, url, "optuna")
    study = create_study(space, url)
    finished = [
        (TrialState.COMPLETE, 3.0),
        (TrialState.COMPLETE, 1.0),
        (TrialState.COMPLETE, 2.0),
        (TrialState.PRUNED, 5.0),
        (TrialState.FAIL, None),
    ]
    for number, (state, value) in enumerate(finished):
        run_dir = run_dir_with_files(study_dir, f"{number:04d}")
        study.add_trial(
            create_trial(
                state=state,
                value=value,
                params={"train.learning_rate": 0.01},
                distributions={"train.learning_rate": LR},
                user_attrs={"run_dir": str(run_dir)},
            )
        )
    running = study.ask()
    running.set_user_attr("run_dir", str(run_dir_with_files(study_dir, f"{running.number:04d}")))
    return study_dir, study


def with_checkpoint(study_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (study_dir / "trials").glob("*/checkpoint.pt"))


def assert_other_files_kept(study_dir: Path) -> None:
    for run_dir in (study_dir / "trials").iterdir():
        for file in KEPT_FILES:
            assert (run_dir / file).is_file(), run_dir / file


def test_best_keeps_the_top_k_finished_trials_and_never_a_running_one(tmp_path: Path) -> None:
    space = space_with(tmp_path, {"keep_checkpoints": "best", "keep_top_k": 2})
    study_dir, study = study_of(tmp_path, space)
    assert kept_trials(study, space) == {1, 2}
    removed = apply_checkpoint_policy(study, space, study_dir)
    assert sorted(p.parent.name for p in removed) == ["0000", "0003", "0004"]
    assert with_checkpoint(study_dir) == ["0001", "0002", "0005"]  # the two best, and the running trial
    assert_other_files_kept(study_dir)
    assert apply_checkpoint_policy(study, space, study_dir) == []  # files already gone: nothing to do, no error


def test_best_defaults_to_one_trial_or_repeats_top_k(tmp_path: Path) -> None:
    space = space_with(tmp_path, {})
    assert space.budget.keep_checkpoints == "best"
    study_dir, study = study_of(tmp_path, space)
    apply_checkpoint_policy(study, space, study_dir)
    assert with_checkpoint(study_dir) == ["0001", "0005"]

    space = space_with(tmp_path / "rep", {}, repeats={"top_k": 3, "seeds": [1]})
    assert kept_trials(study, space) == {0, 1, 2}


def test_maximize_keeps_the_highest_value(tmp_path: Path) -> None:
    space = space_with(tmp_path, {"keep_top_k": 1}, direction="maximize")
    _study_dir, study = study_of(tmp_path, space)
    assert kept_trials(study, space) == {0}


def test_none_removes_every_finished_trials_checkpoint_and_all_removes_nothing(tmp_path: Path) -> None:
    space = space_with(tmp_path, {"keep_checkpoints": "all"})
    study_dir, study = study_of(tmp_path, space)
    assert kept_trials(study, space) >= {0, 1, 2, 3, 4}  # every finished trial
    assert apply_checkpoint_policy(study, space, study_dir) == []
    assert with_checkpoint(study_dir) == ["0000", "0001", "0002", "0003", "0004", "0005"]

    none = space_with(tmp_path, {"keep_checkpoints": "none"})
    apply_checkpoint_policy(study, none, study_dir)
    assert with_checkpoint(study_dir) == ["0005"]  # only the running trial
    assert_other_files_kept(study_dir)


def test_only_checkpoints_inside_the_study_trials_folder_are_touched(tmp_path: Path) -> None:
    space = space_with(tmp_path, {"keep_checkpoints": "none"})
    study_dir, study = study_of(tmp_path, space)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "checkpoint.pt").write_text("x")
    study.add_trial(
        create_trial(
            state=TrialState.COMPLETE,
            value=0.5,
            params={"train.learning_rate": 0.01},
            distributions={"train.learning_rate": LR},
            user_attrs={"run_dir": str(elsewhere)},
        )
    )
    apply_checkpoint_policy(study, space, study_dir)
    assert (elsewhere / "checkpoint.pt").is_file()


def test_a_relative_run_dir_is_found_inside_the_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    space = space_with(tmp_path, {"keep_checkpoints": "none"})
    study_dir, study = study_of(tmp_path, space)
    run_dir = run_dir_with_files(study_dir, "0009")
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            value=9.0,
            params={"train.learning_rate": 0.01},
            distributions={"train.learning_rate": LR},
            user_attrs={"run_dir": "runs/keep/trials/0009"},  # recorded relative to the search's directory
        )
    )
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # `report`/`repeat` run from another directory than the search
    apply_checkpoint_policy(study, space, study_dir)
    assert not (run_dir / "checkpoint.pt").exists()


def test_ray_trials_lose_ray_copies_of_their_checkpoint_too(tmp_path: Path) -> None:
    space = space_with(tmp_path, {"keep_checkpoints": "best", "keep_top_k": 1})
    study_dir, study = study_of(tmp_path, space)
    copies = {}
    for number, trial_id in ((6, "ab12cd34"), (7, "ab12cd35")):
        run_dir = run_dir_with_files(study_dir, f"ray_{trial_id}")
        folder = study_dir / "ray" / "keep" / f"_ray_trial_{trial_id}_{number}_lr=0.01_2026-12-01_10-00-00"
        for checkpoint in ("checkpoint_000000", "checkpoint_000001"):
            (folder / checkpoint).mkdir(parents=True)
            (folder / checkpoint / "checkpoint.pt").write_text("x")
            (folder / checkpoint / "ray_state.json").write_text("{}")
        copies[number] = folder
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                value=0.5 if number == 6 else 9.0,
                params={"train.learning_rate": 0.01},
                distributions={"train.learning_rate": LR},
                user_attrs={"run_dir": str(run_dir)},
            )
        )
    # As the Ray searcher calls it after telling Optuna each trial's outcome (an Optuna-style study callback).
    checkpoint_callback(space, study_dir)(study, study.trials[-1])
    assert sorted(p.parent.parent.name for p in copies[6].glob("*/checkpoint.pt")) == [copies[6].name] * 2
    assert list(copies[7].glob("*/checkpoint.pt")) == []
    assert len(list(copies[7].glob("*/ray_state.json"))) == 2
    assert with_checkpoint(study_dir) == ["0005", "ray_ab12cd34"]


def test_keep_top_k_needs_best(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        space_with(tmp_path, {"keep_checkpoints": "none", "keep_top_k": 2})
    assert "keep_top_k has no effect with keep_checkpoints: none" in str(err.value.problems)


def test_a_checkpoint_that_cannot_be_removed_is_logged_and_the_search_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    space = space_with(tmp_path, {"keep_checkpoints": "none"})
    study_dir, study = study_of(tmp_path, space)
    blocked = study_dir / "trials" / "0000" / "checkpoint.pt"
    blocked.unlink()
    blocked.mkdir()  # unlink() of a folder fails with an OSError, as a read-only or vanished disk would
    with caplog.at_level("ERROR", logger="nvae_search.search.retention"):
        checkpoint_callback(space, study_dir)(study, study.trials[0])  # must not raise into study.optimize
    assert "could not apply budget.keep_checkpoints after trial 0" in caplog.text
