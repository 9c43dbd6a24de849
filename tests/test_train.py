"""Training, exact resume, divergence handling, evaluation and sampling on the tiny CPU recipe."""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nvae_search.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nvae_search.objectives import balanced_kl, kl_balance_alpha, kl_coefficient, spectral_lambda
from nvae_search.runs import evaluate_run, load_run, sample_run
from nvae_search.schema import load_recipe
from nvae_search.train import LRSchedule, RunDirError, TrainingDiverged, train

# The module, not the ``train`` function that the package re-exports under the same name.
TRAINER_MODULE = importlib.import_module("nvae_search.train")
STEP_MODULE = importlib.import_module("nvae_search.training.step")
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"
QUIET = {"train.progress": False}


def tiny(**overrides: Any) -> Any:
    return load_recipe(TINY, overrides={**QUIET, **overrides})


def read_metrics(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) per line, in file order: a duplicated or missing step row shows (a dict would hide it)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_run")
    summary = train(tiny(**{"train.steps": 30, "train.ema_decay": 0.9}), out)
    assert summary.status == "completed"
    return out


def test_run_directory_holds_every_artifact(tiny_run: Path) -> None:
    for name in ("recipe.resolved.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (tiny_run / name).is_file(), name
    assert list((tiny_run / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 30
    assert summary["unit"] == "nats" and summary["params"] > 0
    assert math.isfinite(summary["eval"]["nll"]) and summary["eval"]["nll"] <= summary["eval"]["nelbo"] + 1.0
    assert len(summary["kl_per_group"]) == summary["num_groups"] == 3
    assert load_recipe(tiny_run / "recipe.resolved.yaml").train.steps == 30


def test_checkpoint_loads_weights_only_and_rejects_bad_files(tiny_run: Path, tmp_path: Path) -> None:
    state = load_checkpoint(tiny_run / "checkpoint.pt")
    assert state["step"] == 30 and "spectral" in state and "rng_cpu" in state and state["ema"] is not None
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tiny_run / "checkpoint.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or foreign"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not an nvae-search checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


class _CreatesAFile:
    """Unpickling this runs ``open(path, "w")``: the side effect an untrusted checkpoint could carry."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    from nvae_search.checkpoint import FORMAT

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "checkpoint.pt"
    torch.save({"format": FORMAT, "step": 1, "model": _CreatesAFile(marker)}, evil)
    with pytest.raises(CheckpointError, match="truncated or foreign"):
        load_checkpoint(evil)
    assert not marker.exists(), "the pickled payload ran while loading the checkpoint"
    torch.load(evil, weights_only=False)  # the payload is live: a full unpickle does run it
    assert marker.exists()


class FakeClock:
    """The trainer's clock (``nvae_search.train.clock``) made deterministic: time moves only when a test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_minutes_budget_is_filled_although_the_first_steps_are_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step count of a minutes-only budget comes from timing the first steps; those are slower than the rest
    (here 0.5 s, then 0.25 s on a fake clock), so the plan is revised as the run goes and the run uses its budget:
    a plan fixed after five steps would stop at 2.5 + 7 × 0.25 = 4.25 of the 6 seconds."""
    clock = FakeClock()
    real_step = TRAINER_MODULE.Trainer.train_step

    def timed_step(self: Any, x: torch.Tensor) -> Any:
        clock.now += 0.5 if self.step < 5 else 0.25
        return real_step(self, x)

    monkeypatch.setattr(TRAINER_MODULE, "clock", clock)
    monkeypatch.setattr(TRAINER_MODULE.Trainer, "train_step", timed_step)
    budget_s = 6.0
    summary = train(tiny(**{"train.steps": None, "train.minutes": budget_s / 60, "train.eval_at_end": False}), tmp_path)
    assert summary.status == "completed" and summary.steps <= summary.total_steps
    assert summary.wall_s == pytest.approx(clock.now)  # time in steps, read from the trainer's clock
    # Filled to within one step, and the clock stays a hard cap (it ends the run at most one step late).
    assert budget_s - 0.25 <= summary.wall_s < budget_s + 0.25, (summary.wall_s, summary.steps)
    assert summary.steps == 5 + round((summary.wall_s - 2.5) / 0.25)


def test_a_minutes_budget_keeps_revising_its_plan_through_the_first_half() -> None:
    """Measured on 30-minute MNIST runs: steps 150-300 took 0.33 s, the rest 0.30 s, so a plan fixed at step 320
    stopped the run after 27.4 of its 30 minutes. Here the first 1,000 steps take 0.4 s and the rest 0.3 s: the
    revisions through the first half of the plan fill the budget, and the run still ends on its planned step (its
    cosine and KL schedules finished), not on the clock."""
    from nvae_search.training.budget import CLOCK_REPLAN_UNTIL, Budget
    from nvae_search.training.control import Ranks

    recipe = load_recipe(TINY, overrides={"train.steps": None, "train.minutes": 30.0})
    budget, ranks = Budget(recipe.train, iters_per_epoch=3750), Ranks(1, 0, torch.device("cpu"))
    step, elapsed, times, plans = 0, 0.0, [], set()
    while not budget.reached(step, elapsed, ranks):
        times.append(0.4 if step < 1000 else 0.3)
        elapsed += times[-1]
        step += 1
        budget.replan(step, elapsed, times, ranks)
        if step > CLOCK_REPLAN_UNTIL:
            plans.add(budget.total_steps)
    assert step == budget.total_steps and elapsed <= 1800
    assert elapsed >= 1800 - 0.3 * 100, elapsed  # the last revision is at most 100 steps of budget off
    assert len(plans) > 1  # revised after step 320 ...
    assert budget.schedule.total_steps == budget.total_steps  # ... and the schedule with it


def test_checkpoints_every_so_many_minutes_on_the_trainers_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps of 40 s on a fake clock and a checkpoint every minute: saved after steps 2 and 4 (80 s since the last
    save each time), and at the end."""
    clock = FakeClock()
    real_step, real_save = TRAINER_MODULE.Trainer.train_step, TRAINER_MODULE.Trainer.save
    saved: list[int] = []

    def timed_step(self: Any, x: torch.Tensor) -> Any:
        clock.now += 40.0
        return real_step(self, x)

    def save(self: Any) -> None:
        saved.append(self.step)
        real_save(self)

    monkeypatch.setattr(TRAINER_MODULE, "clock", clock)
    monkeypatch.setattr(TRAINER_MODULE.Trainer, "train_step", timed_step)
    monkeypatch.setattr(TRAINER_MODULE.Trainer, "save", save)
    overrides = {"train.steps": 5, "train.checkpoint_every_minutes": 1.0, "train.checkpoint_every_steps": 1000}
    summary = train(tiny(**overrides, **{"train.eval_at_end": False}), tmp_path)
    assert summary.status == "completed" and saved == [2, 4, 5]


def test_existing_run_needs_resume(tiny_run: Path) -> None:
    with pytest.raises(RunDirError, match="--resume"):
        train(tiny(**{"train.steps": 30}), tiny_run)


_CHILD = """
import os, signal, sys
from nvae_search.schema import load_recipe
from nvae_search.train import Trainer, train
recipe, out, mode = sys.argv[1:4]
if "@" in mode:  # e.g. SIGKILL@14: the child signals itself just before it takes step 15
    name, at = mode.split("@")
    real_step = Trainer.train_step
    def step(self, x):
        if self.step == int(at):
            os.kill(os.getpid(), getattr(signal, name))
        return real_step(self, x)
    Trainer.train_step = step
overrides = {"train.steps": 24, "train.log_every": 1, "train.checkpoint_every_steps": 4,
             "train.progress": False, "train.eval_at_end": False, "train.image_every_steps": 1000}
train(load_recipe(recipe, overrides=overrides), out, resume=mode == "resume")
"""


def _run_child(out: Path, mode: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _CHILD, str(TINY), str(out), mode], env=env, timeout=300).returncode


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, float]]:
    out = tmp_path_factory.mktemp("straight")
    assert _run_child(out, "run") == 0
    metrics = read_metrics(out)
    assert [step for step, _ in metrics] == list(range(1, 25))
    return metrics


def assert_same_losses(resumed: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [step for step, _ in resumed] == [step for step, _ in expected] == list(range(1, 25))
    for (step, loss), (_, want) in zip(resumed, expected, strict=True):
        assert loss == pytest.approx(want, abs=1e-5), step


def test_sigkill_then_resume_repeats_the_same_losses(tmp_path: Path, straight_run: list[tuple[int, float]]) -> None:
    """Killed just before step 15, after the checkpoint of step 12: the resume re-does steps 13 and 14."""
    killed = tmp_path / "killed"
    assert _run_child(killed, "SIGKILL@14") == -signal.SIGKILL
    assert not (killed / "summary.json").exists()
    assert [step for step, _ in read_metrics(killed)] == list(range(1, 15))
    assert load_checkpoint(killed / "checkpoint.pt")["step"] == 12  # so the resume below is not a fresh run
    assert _run_child(killed, "resume") == 0
    assert_same_losses(read_metrics(killed), straight_run)


def test_sigterm_stops_the_run_with_a_checkpoint(tmp_path: Path) -> None:
    """SIGTERM arrives during step 7 (not a checkpoint step): the step finishes, the run saves its checkpoint at
    that step and ends as stopped, exit code 0. (Resuming from a checkpoint: the SIGKILL test above.)"""
    out = tmp_path / "termed"
    assert _run_child(out, "SIGTERM@6") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["cause"] == "interrupted by SIGTERM"
    assert summary["steps"] == 7 and load_checkpoint(out / "checkpoint.pt")["step"] == 7
    assert [step for step, _ in read_metrics(out)] == list(range(1, 8))


@pytest.mark.parametrize(
    ("overrides", "cause"),
    [({"train.learning_rate": 1e3}, "non-finite"), ({"train.learning_rate": 10.0}, "non-finite")],
)
def test_divergence_ends_the_run_with_step_and_cause(tmp_path: Path, overrides: dict[str, Any], cause: str) -> None:
    recipe = tiny(**{"train.steps": 40, "train.warmup_epochs": 0, "train.eval_at_end": False, **overrides})
    summary = train(recipe, tmp_path)
    assert summary.status == "diverged" and cause in (summary.cause or "")
    assert summary.diverged_step is not None and summary.diverged_step < 40
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "diverged" and on_disk["diverged_step"] == summary.diverged_step


def test_divergence_policies_raise_and_skip(tmp_path: Path) -> None:
    base = {"train.steps": 40, "train.warmup_epochs": 0, "train.eval_at_end": False, "train.learning_rate": 1e3}
    with pytest.raises(TrainingDiverged) as raised:
        train(tiny(**base, **{"train.nonfinite": "raise"}), tmp_path / "raise")
    stopped = train(tiny(**base, **{"train.nonfinite": "stop"}), tmp_path / "stop")
    assert stopped.status == "diverged" and raised.value.step == stopped.diverged_step  # one numbering of steps
    summary = train(tiny(**base, **{"train.nonfinite": "skip", "train.max_skipped_steps": 3}), tmp_path / "skip")
    assert summary.status == "diverged" and "consecutive" in (summary.cause or "")
    assert summary.skipped_steps >= 3


def test_reporter_can_stop_a_run(tmp_path: Path) -> None:
    seen: list[int] = []

    def reporter(step: int, metrics: dict[str, float]) -> bool:
        seen.append(step)
        assert math.isfinite(metrics["nelbo"])
        return step >= 20

    summary = train(tiny(**{"train.steps": 60, "train.eval_at_end": False}), tmp_path, reporter=reporter)
    assert summary.status == "stopped" and summary.cause == "pruned" and summary.steps == 20
    assert seen[0] == 1 and seen[-1] == 20


def test_checkpointing_repeats_the_losses_and_bf16_stays_close(tmp_path: Path) -> None:
    """Activation checkpointing recomputes the same forward (same latent noise): the same losses step for step.
    bf16 autocast changes the arithmetic: close to fp32, but not the same numbers, so it did run in bf16 (measured:
    0.01-0.08 % apart over six steps)."""
    base = {"train.steps": 6, "train.log_every": 1, "train.eval_at_end": False, "train.image_every_steps": 1000}
    losses = {}
    for name, numerics in (
        ("fp32", {}),
        ("checkpointing", {"model.numerics.checkpointing": "cell"}),
        ("bf16", {"model.numerics.precision": "bf16"}),
    ):
        summary = train(tiny(**base, **numerics), tmp_path / name)
        assert summary.status == "completed" and summary.steps == 6, name
        losses[name] = read_metrics(tmp_path / name)
    assert [step for step, _ in losses["fp32"]] == list(range(1, 7))
    for (step, plain), (_, checkpointed) in zip(losses["fp32"], losses["checkpointing"], strict=True):
        assert checkpointed == pytest.approx(plain, rel=1e-5), step
    for (step, plain), (_, bf16) in zip(losses["fp32"], losses["bf16"], strict=True):
        assert bf16 == pytest.approx(plain, rel=0.01), step
    assert any(abs(b - a) > 1e-4 * abs(a) for (_, a), (_, b) in zip(losses["fp32"], losses["bf16"], strict=True))


def test_fp16_on_cpu_is_refused_clearly(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on CUDA")
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        train(tiny(**{"model.numerics.precision": "fp16"}), tmp_path)


@pytest.fixture
def fp16_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA recipes' fp16 autocast and gradient scaler, run on the CPU (torch has both there, slowly; users are
    sent to bf16 on a CPU, the tests are not)."""
    monkeypatch.setattr(STEP_MODULE, "FP16_DEVICES", ("cuda", "cpu"))


FP16 = {
    "model.numerics.precision": "fp16",
    "train.steps": 8,
    "train.log_every": 1,
    "train.eval_at_end": False,
    "train.image_every_steps": 1000,
    "train.checkpoint_every_steps": 1000,
}


def grad_norms(run_dir: Path) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fp16_overflows_lower_the_scale_and_a_stopped_run_resumes_exactly(tmp_path: Path, fp16_on_cpu: None) -> None:
    """With the official scaler (2^10) the tiny recipe's first steps overflow in fp16: the scaler skips each and
    halves its scale, which is neither a divergence nor a skipped step. The scale is in the checkpoint: a run stopped
    after step 3 (scale 2^7) and resumed repeats the uninterrupted run's losses (from 2^10 it would overflow again)."""
    recipe = tiny(**FP16)
    straight = train(recipe, tmp_path / "straight")
    assert straight.status == "completed" and straight.steps == 8 and straight.skipped_steps == 0
    norms = grad_norms(tmp_path / "straight")
    overflows = sum(not math.isfinite(n) for n in norms)
    assert overflows >= 3 and math.isfinite(norms[-1])
    rows = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    flagged = [json.loads(row).get("scaler_skipped", False) for row in rows]
    assert flagged == [not math.isfinite(n) for n in norms]  # what the instability pruner passes over
    assert load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["scaler"]["scale"] == 2.0 ** (10 - overflows)
    cut = tmp_path / "cut"
    stopped = train(recipe, cut, reporter=lambda step, _metrics: step >= 3)
    assert stopped.status == "stopped" and load_checkpoint(cut / "checkpoint.pt")["scaler"]["scale"] == 2.0**7
    resumed = train(recipe, cut, resume=True)
    assert resumed.status == "completed"
    expected = read_metrics(tmp_path / "straight")
    assert [step for step, _ in read_metrics(cut)] == [step for step, _ in expected] == list(range(1, 9))
    for (step, loss), (_, want) in zip(read_metrics(cut), expected, strict=True):
        assert loss == pytest.approx(want, abs=1e-4), step


def test_fp16_with_checkpointing_repeats_the_fp16_losses(
    tmp_path: Path, fp16_on_cpu: None, torch_single_thread: None
) -> None:
    """Checkpointed cells recompute their forward under the same autocast: step for step the same losses and
    gradient norms, and the same overflowed steps, as fp16 without checkpointing (a recompute outside autocast fails at
    once: half activations meet float weights). Equal to the last bit on torch 2.13 and 2.14 at one thread; with two
    threads, or on torch 2.4's CPU kernels, the recomputation may round differently (measured: up to 5.5e-5 apart in
    relative terms by step 7, from one rounding at step 5 that fp16 amplifies)."""
    runs = {}
    for name, extra in (("plain", {}), ("cell", {"model.numerics.checkpointing": "cell"})):
        assert train(tiny(**FP16, **extra), tmp_path / name).status == "completed"
        runs[name] = read_metrics(tmp_path / name), grad_norms(tmp_path / name)
    (plain_losses, plain_norms), (cell_losses, cell_norms) = runs["plain"], runs["cell"]
    assert [step for step, _ in cell_losses] == [step for step, _ in plain_losses]
    assert [loss for _, loss in cell_losses] == pytest.approx([loss for _, loss in plain_losses], rel=1e-4)
    finite = [math.isfinite(n) for n in plain_norms]
    assert [math.isfinite(n) for n in cell_norms] == finite and sum(finite) >= 3  # overflows at the same steps
    assert [n for n, f in zip(cell_norms, finite, strict=True) if f] == pytest.approx(
        [n for n, f in zip(plain_norms, finite, strict=True) if f], rel=1e-4
    )


def test_fp16_with_a_skip_threshold_leaves_overflows_to_the_scaler(tmp_path: Path, fp16_on_cpu: None) -> None:
    """An overflow's gradient norm is infinite, above any threshold: the threshold used to take the step from the
    scaler, whose next ``unscale_`` then raised (every fp16 run with a skip threshold crashed at its first skip).
    Now overflows go to the scaler and finite norms above the threshold are skipped."""
    summary = train(tiny(**FP16, **{"train.skip_threshold": 100.0}), tmp_path)
    assert summary.status == "completed" and summary.steps == 8
    norms = grad_norms(tmp_path)  # logged steps: overflows and updates, not the skipped ones
    assert any(not math.isfinite(n) for n in norms) and summary.skipped_steps >= 1
    assert all(n <= 100.0 for n in norms if math.isfinite(n))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["scaler"]["scale"] < 2.0**10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a gradient scaler needs CUDA")
def test_fp16_with_grad_scaler_on_cuda(tmp_path: Path) -> None:
    summary = train(tiny(**{"train.steps": 10, "model.numerics.precision": "fp16"}), tmp_path, device="cuda")
    assert summary.status == "completed"


class SeededLatentNoise:
    """Latent noise that depends only on (importance sample k, latent group): the batched evaluation (one pass of
    ``chunk`` samples, sample-major rows) and the sequential one (one pass per sample) then draw the same ε for
    the same sample of the same image, and must give the same log-weights up to float rounding."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, iw_samples: int) -> None:
        evaluate_module = importlib.import_module("nvae_search.evaluate")  # the package re-exports evaluate()
        from nvae_search.model.distributions import LatentNormal

        self.iw_samples, self.first, self.samples, self.group = iw_samples, 0, 1, 0
        real_log_weights = evaluate_module._log_weights

        def log_weights(model: Any, x: torch.Tensor, samples: int) -> Any:
            self.samples, self.group = samples, 0
            try:
                return real_log_weights(model, x, samples)
            finally:
                self.first = (self.first + samples) % self.iw_samples  # next image batch starts at sample 0

        def sample(latent: LatentNormal) -> torch.Tensor:
            per_sample = (latent.mu.shape[0] // self.samples, *latent.mu.shape[1:])
            eps = [
                torch.randn(per_sample, generator=torch.Generator().manual_seed(1000 * self.group + k))
                for k in range(self.first, self.first + self.samples)
            ]
            self.group += 1
            return latent.mu + latent.sigma * torch.cat(eps)

        monkeypatch.setattr(evaluate_module, "_log_weights", log_weights)
        monkeypatch.setattr(LatentNormal, "sample", sample)


def test_batched_and_sequential_iw_agree(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = load_run(tiny_run)
    SeededLatentNoise(monkeypatch, iw_samples=40)
    torch.manual_seed(0)  # the same dynamic binarisation of the images in both passes
    batched = evaluate_run(run, iw_samples=40, images=32, chunk=20, batch_size=16, progress=False)
    torch.manual_seed(0)
    sequential = evaluate_run(run, iw_samples=40, images=32, sequential=True, batch_size=16, progress=False)
    assert batched.images == sequential.images == 32
    assert batched.nll == pytest.approx(sequential.nll, abs=1e-4)
    assert batched.nelbo == pytest.approx(sequential.nelbo, abs=1e-4)
    assert batched.nll <= batched.nelbo + 1e-6
    assert list(tiny_run.glob("eval_iw40_32.json"))


def test_sample_writes_a_png_and_readjusts_bn(tiny_run: Path, tmp_path: Path) -> None:
    run = load_run(tiny_run)
    before = [bn.running_mean.clone() for bn in run.model.batch_norms()]
    path = sample_run(run, n=9, temperature=0.6, readjust_bn=3, out=tmp_path / "grid.png", seed=0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after = [bn.running_mean for bn in run.model.batch_norms()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not run.model.training


def test_kl_schedule_and_balancing_follow_the_paper() -> None:
    assert kl_coefficient(0, 1000, 0.3, 1e-4, 1e-4) == pytest.approx(1e-4)
    assert kl_coefficient(150, 1000, 0.3, 0.0, 1e-4) == pytest.approx(0.5)
    assert kl_coefficient(900, 1000, 0.3, 1e-4, 1e-4) == 1.0
    alpha = kl_balance_alpha([5, 10], "square")  # decoder order: coarse scale (5 groups) first
    assert alpha.min() == 1.0 and alpha[-1] / alpha[0] == pytest.approx((4 / 10) / (1 / 5))
    kl = [torch.tensor([1.0, 3.0]), torch.tensor([10.0, 30.0])]
    _, coeffs = balanced_kl(kl, 0.5, torch.ones(2))
    assert coeffs.sum() == pytest.approx(2.0) and coeffs[1] > coeffs[0]
    # κ is the batch mean of |KL| (one-sample KL estimates of flows can be negative), not |mean KL|.
    _, signed = balanced_kl([torch.tensor([-2.0, 2.0]), torch.tensor([1.0, 1.0])], 0.5, torch.ones(2))
    assert signed[0] / signed[1] == pytest.approx(2.01 / 1.01)
    plain, ones = balanced_kl(kl, 1.0, torch.ones(2))
    assert torch.allclose(plain, torch.tensor([11.0, 33.0])) and torch.equal(ones, torch.ones(2))
    assert spectral_lambda(0.0, 1e-2, True, 1.0) == pytest.approx(1.0)
    assert spectral_lambda(1.0, 1e-2, True, 1.0) == pytest.approx(1e-2)


def test_lr_schedule_warms_up_per_step_and_decays_per_epoch() -> None:
    schedule = LRSchedule(
        1e-2, 1e-4, warmup_steps=100, total_steps=1000, iters_per_epoch=50, warmup_epochs=2, per="epoch"
    )
    assert schedule.factor(0) == 0 and schedule.factor(50) == pytest.approx(0.5)
    assert schedule.factor(100) == pytest.approx(1.0) and schedule.factor(149) == pytest.approx(1.0)
    assert schedule.factor(150) < 1.0 and schedule.factor(150) == schedule.factor(199)  # constant within an epoch
    assert schedule.factor(999) * 1e-2 == pytest.approx(1e-4)


def test_atomic_checkpoint_never_leaves_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "checkpoint.pt"
    save_checkpoint(target, {"step": 1})

    def explode(*_: Any, **__: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", explode)
    with pytest.raises(OSError):
        save_checkpoint(target, {"step": 2})
    assert load_checkpoint(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
