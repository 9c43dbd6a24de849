"""``study.promote``: successive halving run as studies (a rung trains the best configurations of the rung before
it on a longer budget). Real tiny trainings (recipes/cpu/tiny.yaml)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from nvae_search.cli import app
from nvae_search.search.promote import promoted_points
from nvae_search.search.runner import create_study, run_optuna_search, storage_url, write_study_file
from nvae_search.search.trial import config_id
from nvae_search.spaces import load_space

TINY = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"
LEARNING_RATES = [0.001, 0.003, 0.01]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_rung(tmp_path: Path, name: str, steps: int, n_trials: int, **study: Any) -> Path:
    doc = {
        "base_recipe": str(TINY),
        "study": {"name": name, "n_trials": n_trials, "seed": 0, **study},
        "budget": {"steps": steps, "eval_iw_samples": 2, "eval_images": 32, "report_every_steps": 5},
        "sampler": {"type": "grid"},
        "pruner": {"type": "none"},
        "space": {"train.learning_rate": {"type": "categorical", "choices": LEARNING_RATES}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def finished(study_dir: Path) -> list[optuna.trial.FrozenTrial]:
    info = json.loads((study_dir / "study.json").read_text())
    study = optuna.load_study(
        study_name=info["study_name"],
        storage=optuna.storages.journal.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(study_dir / "study.journal"))
        ),
    )
    return sorted(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.number)


def test_a_rung_trains_the_best_configurations_of_the_rung_before_on_its_own_budget(
    tmp_path: Path, torch_single_thread: None
) -> None:
    root = tmp_path / "runs"
    rung1 = run_optuna_search(load_space(write_rung(tmp_path, "r1", steps=10, n_trials=3)), root=root)
    ranked = sorted(finished(rung1), key=lambda t: t.value)
    assert len(ranked) == 3
    best_two = [t.params["train.learning_rate"] for t in ranked[:2]]

    space = load_space(write_rung(tmp_path, "r2", steps=15, n_trials=2, promote={"study": "r1", "top_k": 2}))
    rung2 = run_optuna_search(space, root=root)
    trials = finished(rung2)
    assert [t.params["train.learning_rate"] for t in trials] == best_two  # best first
    for trial in trials:
        summary = json.loads((Path(trial.user_attrs["run_dir"]) / "summary.json").read_text())
        assert summary["steps"] == 15  # the rung's own budget, not the promoted trial's
    # A continued rung does not promote the same configurations again.
    again = run_optuna_search(space, n_trials=3, root=root)
    assert len(finished(again)) == 3


@pytest.mark.parametrize(
    ("promote", "message"),
    [
        ({"study": "never-run", "top_k": 1}, "run the earlier rung first"),
        ({"study": "other", "top_k": 1}, "parameters this space does not search: train.batch_size"),
    ],
)
def test_a_rung_that_cannot_promote_says_why_in_one_screen(
    tmp_path: Path, promote: dict[str, Any], message: str, torch_single_thread: None
) -> None:
    root = tmp_path / "runs"
    other = yaml.safe_load(write_rung(tmp_path, "other", steps=5, n_trials=1).read_text())
    other["space"] = {"train.batch_size": {"type": "categorical", "choices": [8]}}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    run_optuna_search(load_space(tmp_path / "other.yaml"), root=root)

    path = write_rung(tmp_path, "r2", steps=5, n_trials=1, promote=promote)
    result = CliRunner().invoke(app, ["search", str(path), "-q", "--root", str(root)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split()) and "study.promote.study" in result.output
    assert not list((root / "r2").glob("trials/*"))  # nothing trained


def test_every_shipped_rung_searches_the_parameters_of_the_rung_it_promotes_from() -> None:
    spaces = [load_space(p) for p in sorted((TINY.parents[2] / "spaces").glob("*.yaml"))]
    by_name = {s.study.name: s for s in spaces}
    rungs = [s for s in spaces if s.study.promote is not None]
    assert rungs, "spaces/mnist_30min_r2.yaml promotes from spaces/mnist_30min.yaml"
    for rung in rungs:
        assert rung.study.promote is not None
        assert rung.space == by_name[rung.study.promote.study].space, rung.source


def test_a_maximised_rung_promotes_its_highest_values(tmp_path: Path) -> None:
    """Hand-made rung (no training): the source study's own direction decides which configurations are best."""
    up = load_space(
        write_rung(tmp_path, "up", steps=10, n_trials=3, objectives=[{"metric": "nelbo", "direction": "maximize"}])
    )
    root = tmp_path / "runs"
    url = storage_url(up, root / "up", None)
    write_study_file(up, root / "up", url, "optuna")
    study = create_study(up, url)
    lr = "train.learning_rate"
    for rate, value in zip(LEARNING_RATES, [1.0, 3.0, 2.0], strict=True):
        study.add_trial(
            optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE,
                value=value,
                params={lr: rate},
                distributions={lr: optuna.distributions.CategoricalDistribution(LEARNING_RATES)},
                user_attrs={"status": "completed", "config_id": config_id({lr: rate})},
            )
        )
    nxt = load_space(write_rung(tmp_path, "next", steps=15, n_trials=2, promote={"study": "up", "top_k": 2}))
    assert promoted_points(nxt, root / "next") == [{lr: 0.003}, {lr: 0.01}]  # values 3.0 and 2.0
