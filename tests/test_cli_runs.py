"""The run commands as a user types them: train, eval, sample, search, report, bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from nvae_search.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "cpu" / "tiny.yaml")
FAST = [
    "--set",
    "train.steps=8",
    "--set",
    "train.progress=false",
    "--set",
    "train.eval_images=16",
    "--set",
    "train.eval_iw_samples=2",
]
runner = CliRunner(env={"COLUMNS": "300"})  # a message with a long temporary path stays on one line, unwrapped


def assert_clean(result: Result, exit_code: int, *messages: str) -> None:
    """The exit code, no escaped exception (CliRunner keeps a traceback in ``result.exception``, not in the output),
    and the messages a user needs."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for message in messages:
        assert message in result.output, (message, result.output)


def without_timings(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary less what a second process measures anew (its memory peak, the evaluation's seconds)."""
    rest = {k: v for k, v in summary.items() if k != "peak_memory_mb"}
    return rest | {"eval": {k: v for k, v in (summary["eval"] or {}).items() if k != "seconds"}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(app, ["train", TINY, "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "completed" in result.output and "IW-2 NLL" in result.output
    return out


def test_train_writes_a_run_and_refuses_to_overwrite_it(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert summary["status"] == "completed" and summary["steps"] == 8 and summary["train_nelbo"] is not None
    again = runner.invoke(app, ["train", TINY, "--out", str(run_dir), *FAST])
    assert_clean(again, 2, "--resume")
    # Resuming a completed run takes no step and leaves its record as it was.
    resumed = runner.invoke(app, ["train", TINY, "--out", str(run_dir), "--resume", *FAST])
    assert_clean(resumed, 0, "completed")
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert without_timings(json.loads((run_dir / "summary.json").read_text())) == without_timings(summary)


def test_train_reports_divergence_with_exit_code_3(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "train",
            TINY,
            "--out",
            str(tmp_path / "d"),
            *FAST,
            "--set",
            "train.learning_rate=1000.0",
            "--set",
            "train.warmup_epochs=0",
        ],
    )
    assert result.exit_code == 3 and "diverged" in result.output


def test_eval_json_and_sample_png(run_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", str(run_dir), "--iw-samples", "3", "--images", "8", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["iw_samples"] == 3 and payload["images"] == 8 and payload["unit"] == "nats"
    png = tmp_path / "s.png"
    result = runner.invoke(
        app, ["sample", str(run_dir), "--n", "4", "-t", "0.8", "--readjust-bn", "2", "--out", str(png)]
    )
    assert result.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("make", "reason"),
    [(lambda p: p / "nowhere", "no such run directory"), (lambda p: p, "not a run directory")],
)
def test_eval_of_a_non_run_directory_is_a_clean_error(tmp_path: Path, make: object, reason: str) -> None:
    result = runner.invoke(app, ["eval", str(make(tmp_path))])  # type: ignore[operator]
    assert_clean(result, 2, reason)


def test_eval_of_a_truncated_checkpoint_is_a_clean_error(run_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "recipe.resolved.yaml").write_text((run_dir / "recipe.resolved.yaml").read_text())
    (broken / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:1000])
    result = runner.invoke(app, ["eval", str(broken)])
    assert_clean(result, 2, "truncated or foreign")


def test_missing_dataset_is_a_clean_error(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "train",
            TINY,
            "--out",
            str(tmp_path / "r"),
            "--set",
            "data.dataset=idx",
            "--set",
            f"data.root={tmp_path / 'no-data'}",
        ],
    )
    assert_clean(result, 2, "no-data")


def test_search_then_report(tmp_path: Path) -> None:
    space = {
        "base_recipe": TINY,
        "study": {"name": "cli", "n_trials": 2, "seed": 0},
        "budget": {"steps": 6, "eval_iw_samples": 2, "eval_images": 16, "report_every_steps": 3},
        "sampler": {"type": "random"},
        "pruner": {"type": "none"},
        "space": {"model.use_se": {"type": "categorical", "choices": [True, False]}},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    result = runner.invoke(app, ["search", str(path), "--root", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    study_dir = tmp_path / "runs" / "cli"
    assert result.output.strip().splitlines()[-1] == str(study_dir)
    result = runner.invoke(app, ["report", str(study_dir), "--no-repeats"])
    assert result.exit_code == 0, result.output
    assert (study_dir / "report" / "leaderboard.csv").is_file() and (study_dir / "report" / "history.png").is_file()


def test_bad_space_file_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("base_recipe: nope.yaml\nstudy: {name: x, n_trials: 1}\nbudget: {steps: 1}\nspace: {}\n")
    result = runner.invoke(app, ["search", str(path)])
    assert_clean(result, 2, "bad.yaml", "at least 1 item")


def test_bench_step_json() -> None:
    result = runner.invoke(app, ["bench", "step", TINY, "--batch", "4", "--steps", "2", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["params"] == 27998 and len(payload["times_s"]) == 2 and payload["median_s"] > 0


def test_summary_of_a_run_stopped_before_its_step_plan_says_so() -> None:
    from rich.console import Console

    from nvae_search.cli.tables import run_summary_table

    summary = {"out_dir": "runs/x", "status": "stopped", "cause": "SIGTERM", "diverged_step": None, "unit": "nats"}
    summary |= {"steps": 3, "total_steps": 0, "epochs": 0.01, "wall_s": 1.2, "step_time_s": 0.4, "train_nelbo": None}
    summary |= {"grad_norm_max": 9.0, "grad_norm_mean": 5.0, "loss_spikes": 0, "skipped_steps": 0}
    summary |= {"active_groups": 3, "num_groups": 3, "active_units": [2, 1, 1]}
    console = Console(record=True, width=120)
    console.print(run_summary_table(summary))
    text = console.export_text()
    assert "3 of (not planned yet)" in text and "stopped (SIGTERM)" in text and "time in steps" in text


def test_train_with_two_workers_runs_data_parallel(tmp_path: Path) -> None:
    """`--workers 2`: two DDP ranks of batch 8 each, so one step sees 16 images and an epoch takes half the steps
    it takes in one process."""
    from nvae_search.data import build_dataset
    from nvae_search.schema import load_recipe

    out = tmp_path / "ddp"
    steps = ["--set", "train.steps=3", "--set", "train.progress=false", "--set", "train.eval_at_end=false"]
    result = runner.invoke(app, ["train", TINY, "--out", str(out), "--workers", "2", *steps])
    assert_clean(result, 0, "completed")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    recipe = load_recipe(TINY)
    train_set = build_dataset(recipe.data, split="train", resolution=recipe.model.resolution, channels=1)
    assert summary["epochs"] == pytest.approx(3 / (len(train_set) // (2 * recipe.train.batch_size)))


def test_eval_of_a_run_with_ema_uses_the_ema_copy_unless_told_otherwise(tmp_path: Path) -> None:
    out = tmp_path / "ema"
    trained = runner.invoke(app, ["train", TINY, "--out", str(out), *FAST, "--set", "train.ema_decay=0.5"])
    assert trained.exit_code == 0, trained.output
    args = ["eval", str(out), "--iw-samples", "2", "--images", "8", "--json"]
    ema, raw = (json.loads(runner.invoke(app, args + flag).output) for flag in ([], ["--no-ema"]))
    assert (ema["weights"], raw["weights"]) == ("ema", "trained")
    assert ema["nelbo"] != raw["nelbo"]  # two different sets of weights, both kept on disk
    written = {p.name: json.loads(p.read_text())["weights"] for p in out.glob("eval_iw2_8*.json")}
    assert written == {"eval_iw2_8.json": "ema", "eval_iw2_8_trained.json": "trained"}
