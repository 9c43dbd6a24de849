"""Experiment tracking with the real tools: MLflow on a local SQLite store, W&B in offline mode (nothing mocked)."""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from nvae_search.cli import app

FAST = [
    "--set",
    "train.steps=6",
    "--set",
    "train.log_every=3",
    "--set",
    "train.progress=false",
    "--set",
    "train.eval_images=8",
    "--set",
    "train.eval_iw_samples=2",
]
runner = CliRunner()


def _space(tmp_path: Path, backend: str) -> Path:
    """Two trials on a grid: one learning rate trains, the other (1000, no warm-up) diverges."""
    space = {
        "base_recipe": "cpu/tiny",
        "study": {"name": f"tracked-{backend}", "n_trials": 2, "seed": 0},
        "budget": {"steps": 6, "eval_iw_samples": 2, "eval_images": 8, "report_every_steps": 3},
        "sampler": {"type": "grid"},
        "pruner": {"type": "none"},
        "tracking": {"backend": backend},
        "space": {
            "train.learning_rate": {"type": "categorical", "choices": [0.01, 1000.0]},
            "train.warmup_epochs": {"type": "fixed", "value": 0},
        },
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ MLflow
@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_single_thread: None) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def _mlflow_runs(uri: str) -> tuple[Any, list[Any]]:
    mlflow = pytest.importorskip("mlflow")
    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments)


def test_train_is_one_mlflow_run_with_steps_final_values_and_artifacts(in_tmp: Path) -> None:
    pytest.importorskip("mlflow")
    result = runner.invoke(app, ["train", "cpu/tiny", *FAST, "--track", "mlflow"])
    assert result.exit_code == 0, result.output
    client, runs = _mlflow_runs(f"sqlite:///{in_tmp / 'mlflow.db'}")  # the local default store
    (run,) = runs
    assert run.info.run_name == "cpu-tiny" and run.info.status == "FINISHED"
    assert run.data.params["model.num_latent_scales"] == "2" and run.data.params["train.steps"] == "6"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "nelbo")] == [1, 3, 6]
    assert "final/eval_nll" in run.data.metrics and run.data.tags["status"] == "completed"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.resolved.yaml", "summary.json", "samples_t0.7_step6.png"} <= artifacts


def test_search_is_a_parent_mlflow_run_with_a_child_per_trial(in_tmp: Path) -> None:
    pytest.importorskip("mlflow")
    result = runner.invoke(app, ["search", str(_space(in_tmp, "mlflow")), "--root", "runs"])
    assert result.exit_code == 0, result.output
    client, runs = _mlflow_runs(f"sqlite:///{in_tmp / 'runs' / 'mlflow.db'}")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.params["train.learning_rate"]: r for r in runs if r not in parents}
    (parent,) = parents
    assert parent.info.run_name == "tracked-mlflow" and set(children) == {"0.01", "1000.0"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    good, bad = children["0.01"], children["1000.0"]
    assert good.info.status == "FINISHED" and good.data.tags["status"] == "completed"
    assert "objective/nelbo" in good.data.metrics and "final/eval_nll" in good.data.metrics
    assert [m.step for m in client.get_metric_history(good.info.run_id, "nelbo")] == [1, 3, 6]
    assert bad.info.status == "FAILED" and bad.data.tags["status"] == "diverged"
    good_files = {a.path for a in client.list_artifacts(good.info.run_id)}
    assert {"recipe.resolved.yaml", "summary.json", "samples_t0.7_step6.png"} <= good_files
    assert "recipe.resolved.yaml" in {a.path for a in client.list_artifacts(bad.info.run_id)}


def test_a_missing_tracker_extra_is_a_clean_error(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets without the extra
    result = runner.invoke(app, ["train", "cpu/tiny", *FAST, "--track", "mlflow"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "pip install 'nvae-search[mlflow]'" in result.output
    assert "Traceback" not in result.output and not (in_tmp / "runs").exists()
    wrong = runner.invoke(app, ["train", "cpu/tiny", "--track", "tensorboard"])
    assert wrong.exit_code == 2 and "Traceback" not in wrong.output
    # The Ray backend tracks too: the same clean error, before Ray is started.
    ray = runner.invoke(app, ["search", "quickstart", "--backend", "ray", "--track", "mlflow"], env={"COLUMNS": "200"})
    assert ray.exit_code == 2 and "pip install 'nvae-search[mlflow]'" in ray.output and "Traceback" not in ray.output


# ---------------------------------------------------------------------------------------------------- W&B
def wandb_records(path: Path) -> Iterator[Any]:
    """The records of an offline ``run-*.wandb`` file: W&B's block log (32 KiB blocks, 7-byte record headers
    ``crc32 | length | type``) of ``Record`` protobufs, read here because wandb ships no reader."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)  # "kl_per_group/00" may come as a nested key


def _wandb_run(run_dir: Path) -> dict[str, Any]:
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out: dict[str, Any] = {"steps": [], "summary": {}, "exit": None, "group": None, "name": None, "kinds": []}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        out["kinds"].append(kind)
        if kind == "history":
            items = {_key(item): item.value_json for item in record.history.item}
            if "nelbo" in items:
                out["steps"].append(int(items["_step"]))
        elif kind == "summary":
            out["summary"].update({_key(item): item.value_json for item in record.summary.update})
        elif kind == "run":
            out["group"], out["name"] = record.run.run_group, record.run.display_name
        elif kind == "exit":
            out["exit"] = record.exit.exit_code
    out["files"] = {p.name for p in log.parent.glob("files/*")}
    return out


@pytest.fixture
def wandb_offline(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(in_tmp / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(in_tmp / "wandb-cache"))
    yield in_tmp
    # One command is one process in real use; here the next test must not reuse this test's W&B service.
    end_of_command()


def end_of_command() -> None:
    """What the end of a command's process does for W&B: wait for its service to write out the run files (a loaded
    machine showed a run file not yet written when ``run.finish()`` had returned)."""
    import wandb

    wandb.teardown()


def test_train_is_one_wandb_run_offline(wandb_offline: Path) -> None:
    result = runner.invoke(app, ["train", "cpu/tiny", *FAST, "--track", "wandb"])
    assert result.exit_code == 0, result.output
    end_of_command()
    run = _wandb_run(wandb_offline / "runs" / "cpu-tiny")
    assert run["name"] == "cpu-tiny" and run["steps"] == [1, 3, 6] and run["exit"] == 0, run
    assert "final/eval_nll" in run["summary"] and run["summary"]["status"] == '"completed"'
    assert {"recipe.resolved.yaml", "summary.json", "samples_t0.7_step6.png"} <= run["files"]


def test_search_is_a_wandb_group_with_a_run_per_trial_offline(wandb_offline: Path) -> None:
    result = runner.invoke(app, ["search", str(_space(wandb_offline, "wandb")), "--root", "runs"])
    assert result.exit_code == 0, result.output
    end_of_command()
    trials = wandb_offline / "runs" / "tracked-wandb" / "trials"
    good, bad = _wandb_run(trials / "0000"), _wandb_run(trials / "0001")
    if bad["exit"] == 0:  # the grid sampler's order is not fixed: find the diverged one by its outcome
        good, bad = bad, good
    assert good["group"] == bad["group"] == "tracked-wandb"
    assert good["exit"] == 0 and good["steps"] == [1, 3, 6] and good["summary"]["status"] == '"completed"'
    assert bad["exit"] == 1 and bad["summary"]["status"] == '"diverged"'


def test_every_trial_status_maps_to_an_mlflow_status_and_unknown_ones_fail() -> None:
    from nvae_search.status import TrialStatus
    from nvae_search.tracking import MLFLOW_STATUS, as_status, mlflow_status

    assert all(isinstance(key, TrialStatus) for key in MLFLOW_STATUS)  # keyed by the enum, not by bare strings
    assert {mlflow_status(s) for s in TrialStatus} <= {"FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED"}
    assert [mlflow_status(as_status(s)) for s in ("completed", "diverged", "pruned", "stopped", "invalid")] == [
        "FINISHED",
        "FAILED",
        "KILLED",
        "KILLED",
        "KILLED",
    ]
    # A status this version does not know (a newer summary.json) or none at all: the run failed.
    assert as_status("some_new_status") is TrialStatus.FAILED and as_status(None) is TrialStatus.FAILED
    assert mlflow_status(as_status("some_new_status")) == "FAILED"
