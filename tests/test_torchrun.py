"""``torchrun … -m nvae_search train RECIPE``: the ranks come from torch's launcher and its environment variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DATA_PARALLEL_EQUIVALENCE

from nvae_search.distributed import free_port
from nvae_search.schema import dump_recipe, load_recipe
from nvae_search.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"
STEPS = 4


@pytest.fixture
def no_latent_noise(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from nvae_search.model.distributions import LatentNormal

    monkeypatch.setattr(LatentNormal, "sample", lambda self: self.mu)
    yield


def recipe(**overrides: Any) -> Any:
    """As the --workers equivalence test (conftest's overrides): a global batch of 8 that each of 2 ranks takes half
    of."""
    return load_recipe(
        TINY,
        overrides={**DATA_PARALLEL_EQUIVALENCE, "train.steps": STEPS, "train.global_batch_size": 8, **overrides},
    )


def logged(run_dir: Path) -> dict[int, dict[str, float]]:
    return {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def torchrun_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    # ROOT first, the rest kept: dependencies may come from PYTHONPATH too (.ci/gpu-check's wheels)
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]))
    return {**env, "OMP_NUM_THREADS": "1"}


def torchrun_command(nnodes: int, nproc: int, endpoint: str, recipe_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "nvae-test",
        str(ROOT / "tests" / "torchrun_worker.py"),
        "train", str(recipe_file), "--out", str(out), *extra,
    ]  # fmt: skip


def assert_same_trajectory(a_dir: Path, b_dir: Path) -> None:
    a, b = logged(a_dir), logged(b_dir)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss", "nelbo", "recon", "kl"):
            rel = abs(a[step][key] - b[step][key]) / abs(a[step]["loss"])
            assert rel < 1e-4, (step, key, a[step][key], b[step][key])


def test_two_torchrun_ranks_stop_resume_and_match_one_process_at_twice_the_batch(
    tmp_path: Path, torch_single_thread: None, no_latent_noise: None
) -> None:
    single = train(recipe(), tmp_path / "single")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(dump_recipe(recipe()))
    env = torchrun_env()

    def torchrun(*extra: str, **more_env: str) -> subprocess.CompletedProcess[str]:
        command = torchrun_command(1, 2, f"127.0.0.1:{free_port()}", recipe_file, tmp_path / "torchrun", *extra)
        done = subprocess.run(
            command, env={**env, **more_env}, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert done.stdout.count("time in steps") == 1, "rank 0 alone prints the summary"
        return done

    # A SIGTERM to rank 0 after step 2 (a scheduler's preemption) stops both ranks there with a checkpoint ...
    torchrun(NVAE_TEST_SIGTERM_AFTER_STEP="2")
    cut = json.loads((tmp_path / "torchrun" / "summary.json").read_text())
    assert (cut["status"], cut["steps"]) == ("stopped", 2), cut
    # ... and --resume finishes the run: step for step the losses of one process at twice the batch.
    torchrun("--resume")
    summary = json.loads((tmp_path / "torchrun" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS and summary["global_batch"] == 8
    # The record of where the run came from stays the first process's, with the resume listed after it.
    assert summary["provenance"]["started"] == cut["provenance"]["started"]
    assert [r["from_step"] for r in summary["provenance"]["resumes"]] == [2]
    assert_same_trajectory(tmp_path / "single", tmp_path / "torchrun")
    assert single.global_batch == 8


def test_two_torchrun_nodes_of_one_rank_each_train_as_one_process_at_twice_the_batch(
    tmp_path: Path, torch_single_thread: None, no_latent_noise: None
) -> None:
    """Multi-node: two torchrun agents (two "nodes" on this host) meet at one c10d rendezvous endpoint; each rank is
    its node's local rank 0, and only the global rank 0 writes the run and prints its summary."""
    train(recipe(), tmp_path / "single")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(dump_recipe(recipe()))
    command = torchrun_command(2, 1, f"127.0.0.1:{free_port()}", recipe_file, tmp_path / "torchrun")
    nodes = [
        subprocess.Popen(command, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (out, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-3000:] + err[-3000:]
    assert sorted(out.count("time in steps") for out, _ in outputs) == [0, 1], "the global rank 0 alone prints it"
    summary = json.loads((tmp_path / "torchrun" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS and summary["global_batch"] == 8
    assert_same_trajectory(tmp_path / "single", tmp_path / "torchrun")
