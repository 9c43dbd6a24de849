"""The [viz] extra with the real tools: TensorBoard's HParams reader sees every trial of a study side by side, and
optuna-dashboard's app opens a study's journal file and lists the study."""

from __future__ import annotations

import io
import json
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest

from nvae_search.schema import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _hparams_sessions(logdir: Path) -> dict[str, dict[str, object]]:
    """Run name → the hparams of its HParams session, read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing import event_multiplexer
    from tensorboard.plugins.hparams import metadata

    mux = event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    sessions = {}
    for run, content in mux.PluginRunToTagToContent(metadata.PLUGIN_NAME).items():
        if metadata.SESSION_START_INFO_TAG in content:
            info = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
            sessions[run] = {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    return sessions


def test_tensorboard_hparams_shows_the_trials_of_a_study_side_by_side(
    tmp_path: Path, torch_single_thread: None
) -> None:
    pytest.importorskip("tensorboard")
    from nvae_search.train import train

    base = load_recipe(ROOT / "recipes" / "cpu" / "tiny.yaml")
    trials = tmp_path / "study" / "trials"  # the layout `search` writes: runs/<study>/trials/NNNN/tb
    for number, lr in enumerate((1e-2, 3e-3)):
        recipe = base.model_copy(
            update={
                "train": base.train.model_copy(
                    update={"steps": 2, "learning_rate": lr, "progress": False, "eval_at_end": False}
                )
            }
        )
        assert train(recipe, trials / f"{number:04d}").status == "completed"
    sessions = _hparams_sessions(trials)
    assert set(sessions) == {"0000/tb/hparams", "0001/tb/hparams"}
    assert {s["train.learning_rate"] for s in sessions.values()} == {1e-2, 3e-3}
    assert all(s["model.num_latent_scales"] == 2 for s in sessions.values())


def _wsgi_get(app: object, path: str) -> tuple[str, bytes]:
    environ: dict[str, object] = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))  # type: ignore[operator]
    return status[0], body


def test_optuna_dashboard_opens_the_study_journal(tmp_path: Path) -> None:
    dashboard = pytest.importorskip("optuna_dashboard")
    from nvae_search.search.runner import create_study, storage_url, study_dir_for, write_study_file
    from nvae_search.spaces import load_space

    space = load_space(ROOT / "spaces" / "quickstart.yaml")
    study_dir = study_dir_for(space, tmp_path / "runs")
    url = storage_url(space, study_dir, None)  # journal:<study_dir>/study.journal, as `search` records it
    write_study_file(space, study_dir, url, "optuna")
    study = create_study(space, url)
    study.add_trial(_finished_trial(study))
    journal = study_dir / "study.journal"
    assert url == f"journal:{journal.resolve()}"
    # `optuna-dashboard runs/quickstart/study.journal` guesses a journal file from an existing path; the same here
    status, body = _wsgi_get(dashboard.wsgi(str(journal)), "/api/studies")
    assert status.startswith("200")
    (summary,) = json.loads(body)["study_summaries"]
    assert summary["study_name"] == "quickstart"


def _finished_trial(study: object) -> object:
    import optuna

    return optuna.trial.create_trial(
        params={"train.learning_rate": 0.005},
        distributions={"train.learning_rate": optuna.distributions.FloatDistribution(1e-3, 2e-2, log=True)},
        value=123.0,
    )
