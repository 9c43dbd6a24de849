"""Data-parallel training (torch DDP over gloo, spawned local workers): equivalence with one process, and clean
stops. No Ray needed."""

from __future__ import annotations

import importlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DATA_PARALLEL_EQUIVALENCE

from nvae_search.checkpoint import load_checkpoint
from nvae_search.distributed import train_data_parallel
from nvae_search.schema import load_recipe
from nvae_search.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"
STEPS = 5


def deterministic_latents(rank: int = 0) -> None:
    """Sample every latent at its mean. Each rank draws its own noise, so with sampling on, a 2 × 4 run and a 1 × 8
    run see different noise for the same images and their losses differ by ~1 % whatever DDP does; without it, the
    two runs must follow the same trajectory. Module-level, so the spawned workers can unpickle it."""
    from nvae_search.model.distributions import LatentNormal

    LatentNormal.sample = lambda self: self.mu  # type: ignore[method-assign]


@pytest.fixture
def no_latent_noise(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from nvae_search.model.distributions import LatentNormal

    monkeypatch.setattr(LatentNormal, "sample", lambda self: self.mu)
    yield


def recipe(batch_size: int, **overrides: Any) -> Any:
    """Tiny under the data-parallel equivalence overrides (see conftest), STEPS steps at this per-process batch."""
    return load_recipe(
        TINY,
        overrides={**DATA_PARALLEL_EQUIVALENCE, "train.steps": STEPS, "train.batch_size": batch_size, **overrides},
    )


def logged(run_dir: Path) -> dict[int, dict[str, float]]:
    return {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_two_gloo_workers_of_batch_4_match_one_process_of_batch_8(
    tmp_path: Path, torch_single_thread: None, no_latent_noise: None
) -> None:
    single = train(recipe(8), tmp_path / "single")
    seen: list[int] = []

    def on_report(step: int, metrics: dict[str, Any]) -> bool:
        seen.append(step)
        return False

    ddp = train_data_parallel(
        recipe(4),
        tmp_path / "ddp",
        workers=2,
        backend="gloo",
        on_report=on_report,
        threads_per_worker=1,
        worker_init=deterministic_latents,
    )
    assert single.status == ddp.status == "completed" and ddp.steps == STEPS
    assert ddp.out_dir == str(tmp_path / "ddp") and ddp.params == single.params
    assert seen == list(range(1, STEPS + 1)), "rank 0's reports reach the caller"
    a, b = logged(tmp_path / "single"), logged(tmp_path / "ddp")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        # Measured: ~1e-5. Not ~1e-7 because the data-dependent init of the ELU cells' convolutions averages the
        # per-rank standard deviations instead of taking the global one (nvae_search/model/ops.py).
        for key in ("loss", "nelbo", "recon", "kl"):
            rel = abs(a[step][key] - b[step][key]) / abs(a[step]["loss"])
            assert rel < 1e-4, (step, key, a[step][key], b[step][key])
    assert a[STEPS]["loss"] < a[1]["loss"], "the runs did train"
    # Only rank 0 writes the run directory.
    assert (tmp_path / "ddp" / "summary.json").is_file() and (tmp_path / "ddp" / "checkpoint.pt").is_file()


def test_an_error_in_the_report_callback_stops_every_worker_at_that_step(tmp_path: Path) -> None:
    """The caller gives up mid-run (an exception, a Ctrl-C): every rank stops at the same step, rank 0 writes the
    checkpoint and a summary (status stopped), and no worker outlives the call."""
    import multiprocessing

    def on_report(step: int, metrics: dict[str, Any]) -> bool:
        if step >= 2:
            raise KeyboardInterrupt("stop")  # not an Exception, like Ray's SystemExit: it must still clean up
        return False

    with pytest.raises(KeyboardInterrupt):
        train_data_parallel(
            recipe(4, **{"train.steps": 50}), tmp_path / "run", workers=2, on_report=on_report, threads_per_worker=1
        )
    assert not multiprocessing.active_children()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["cause"] == "pruned" and summary["steps"] == 2


def test_a_killed_data_parallel_run_resumes_with_each_ranks_own_noise(tmp_path: Path) -> None:
    """Latent noise on: each rank draws its own. A run stopped at step 3 and resumed must log the same losses at
    steps 4-6 as an uninterrupted run, which holds only if every rank gets its own random stream back."""
    steps = 6
    kwargs: dict[str, Any] = {"workers": 2, "backend": "gloo", "threads_per_worker": 1}
    train_data_parallel(recipe(4, **{"train.steps": steps}), tmp_path / "whole", **kwargs)

    def stop_after_3(step: int, metrics: dict[str, Any]) -> bool:
        return step >= 3

    cut = train_data_parallel(recipe(4, **{"train.steps": steps}), tmp_path / "cut", on_report=stop_after_3, **kwargs)
    assert cut.status == "stopped" and cut.steps == 3
    resumed = train_data_parallel(recipe(4, **{"train.steps": steps}), tmp_path / "cut", resume=True, **kwargs)
    assert resumed.status == "completed" and resumed.steps == steps
    whole, again = logged(tmp_path / "whole"), logged(tmp_path / "cut")
    assert sorted(again) == list(range(1, steps + 1))
    for step in range(4, steps + 1):
        assert again[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-5, abs=1e-5), step


def fake_clock_rank_speeds(rank: int) -> None:
    """Worker init: the trainer's clock is fake and moves 0.25 s per step on rank 0 and 0.375 s on rank 1 (binary
    fractions, so the sums are exact)."""
    trainer_module = importlib.import_module("nvae_search.train")
    now = [0.0]
    real_step = trainer_module.Trainer.train_step

    def timed_step(self: Any, x: Any) -> Any:
        now[0] += 0.25 if rank == 0 else 0.375
        return real_step(self, x)

    trainer_module.clock = lambda: now[0]
    trainer_module.Trainer.train_step = timed_step  # type: ignore[method-assign]
    _record_the_last_step(rank)


def sigterm_rank_1_before_step_4(rank: int) -> None:
    """Worker init: rank 1 (not rank 0, which writes the files) gets a SIGTERM just before its fourth step."""
    trainer_module = importlib.import_module("nvae_search.train")
    real_step = trainer_module.Trainer.train_step

    def step(self: Any, x: Any) -> Any:
        if rank == 1 and self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, x)

    trainer_module.Trainer.train_step = step  # type: ignore[method-assign]
    _record_the_last_step(rank)


def _record_the_last_step(rank: int) -> None:
    """Each rank writes the step and status it ends with to rank<r>.json in the run directory."""
    trainer_module = importlib.import_module("nvae_search.train")
    real_finish = trainer_module.Trainer._finish

    def finish(self: Any, status: str, cause: str | None, diverged_step: int | None) -> Any:
        record = {"step": self.step, "total_steps": self.total_steps, "status": status, "cause": cause}
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(record))
        return real_finish(self, status, cause, diverged_step)

    trainer_module.Trainer._finish = finish  # type: ignore[method-assign]


def rank_records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_minutes_budget_ends_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """Each rank times its own steps; the planned step count is rank 0's (24 steps of 0.25 s in 6 s), so no rank
    waits for a step the others never take (the call would hang), and the clock of any rank stays a hard cap:
    rank 1's steps take 0.375 s, so its 6 s are spent after 16 steps and every rank ends there."""
    run = recipe(4, **{"train.steps": None, "train.minutes": 0.1, "train.log_every": 50})
    summary = train_data_parallel(
        run, tmp_path / "run", workers=2, backend="gloo", threads_per_worker=1, worker_init=fake_clock_rank_speeds
    )
    assert summary.status == "completed" and summary.steps == 16 and summary.total_steps == 24
    assert summary.wall_s == 16 * 0.25  # rank 0's own time in steps
    assert [(r["step"], r["total_steps"]) for r in rank_records(tmp_path / "run")] == [(16, 24), (16, 24)]


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path: Path) -> None:
    run = recipe(4, **{"train.steps": 50})
    summary = train_data_parallel(
        run, tmp_path / "run", workers=2, backend="gloo", threads_per_worker=1, worker_init=sigterm_rank_1_before_step_4
    )
    assert summary.status == "stopped" and summary.steps == 4
    assert [(r["step"], r["status"], r["cause"]) for r in rank_records(tmp_path / "run")] == [
        (4, "stopped", "interrupted on another rank"),
        (4, "stopped", "interrupted by SIGTERM"),
    ]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 4


def fp16_on_cpu_without_latent_noise(rank: int) -> None:
    """Worker init: the CUDA recipes' fp16 autocast and gradient scaler allowed on the CPU (see
    tests/test_train.py::fp16_on_cpu), latents at their mean."""
    importlib.import_module("nvae_search.training.step").FP16_DEVICES = ("cuda", "cpu")
    deterministic_latents(rank)


def test_fp16_data_parallel_ranks_skip_the_same_overflowed_steps_as_one_process(
    tmp_path: Path, torch_single_thread: None, no_latent_noise: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16 with the official scaler (2^10) overflows in the tiny recipe's first steps. Each rank has its own scaler;
    gradients are averaged before unscaling, so an overflow on one rank is an overflow on all: every rank must skip
    the same steps and lower its scale alike, or the ranks' weights part ways. Two ranks of batch 4 follow one process
    of batch 8: the same overflowed steps, the same final scale, the same losses."""
    monkeypatch.setattr(importlib.import_module("nvae_search.training.step"), "FP16_DEVICES", ("cuda", "cpu"))
    fp16 = {"model.numerics.precision": "fp16", "train.steps": 8}
    single = train(recipe(8, **fp16), tmp_path / "single")
    ddp = train_data_parallel(
        recipe(4, **fp16),
        tmp_path / "ddp",
        workers=2,
        backend="gloo",
        threads_per_worker=1,
        worker_init=fp16_on_cpu_without_latent_noise,
    )
    assert single.status == ddp.status == "completed" and single.steps == ddp.steps == 8
    a, b = logged(tmp_path / "single"), logged(tmp_path / "ddp")
    overflowed = [step for step in sorted(a) if a[step].get("scaler_skipped")]
    assert len(overflowed) >= 3, "the test needs overflows to compare"
    assert [step for step in sorted(b) if b[step].get("scaler_skipped")] == overflowed
    scales = [load_checkpoint(tmp_path / run / "checkpoint.pt")["scaler"]["scale"] for run in ("single", "ddp")]
    assert scales[0] == scales[1] == 2.0 ** (10 - len(overflowed))
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4), step  # measured: <= 2.3e-6
    assert a[8]["loss"] < a[overflowed[-1] + 1]["loss"], "the runs did train after the overflows"
