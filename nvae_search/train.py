"""One explicit training loop with the paper's objective, optimizer and schedules (NVAE_SPEC §2.8, §3).

``train(recipe, out_dir)`` writes a self-contained run directory: the resolved recipe, metrics.jsonl,
TensorBoard events, atomic checkpoints and summary.json with the run's status and stability figures.

The loop and the summary live here; the trainer's parts live in :mod:`nvae_search.training` (the step, the
checkpoint, the logging, the budget, the ranks) and their public names are importable from here as before.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import CHECKPOINT_NAME
from .config_io import atomic_write_text
from .data import build_dataset, needs_binarize, prepare_batch, random_hflip
from .evaluate import evaluate, unit_for
from .model.builder import build_model
from .model.nvae import NVAE
from .rundir import RESOLVED_RECIPE
from .runtime import pick_device
from .schema import Recipe, dump_recipe, paper_batch_warning
from .status import BROKE, TrialStatus
from .telemetry import end_of_run_status
from .training.budget import CLOCK_REPLAN_UNTIL, DEFAULT_EPOCHS, STEP_TIME_PROBE, Budget, LRSchedule
from .training.control import Ranks, StopFlag
from .training.ema import recalibrate_batch_norm
from .training.logs import Progress, RunLogging, peak_memory_mb
from .training.state import (
    RESUME_FIXED,
    RESUME_FREE,
    RESUME_KEYS,
    CheckpointState,
    RunDirError,
    refuse_changed_recipe,
    resumable_state,
)
from .training.step import MIN_GRAD_SCALE, OptimizerStep, TrainingDiverged

__all__ = [
    "CLOCK_REPLAN_UNTIL",
    "DEFAULT_EPOCHS",
    "MIN_GRAD_SCALE",
    "RESUME_FIXED",
    "RESUME_FREE",
    "RESUME_KEYS",
    "STEP_TIME_PROBE",
    "LRSchedule",
    "Reporter",
    "RunDirError",
    "RunSummary",
    "Trainer",
    "TrainingDiverged",
    "peak_memory_mb",
    "pick_device",
    "refuse_changed_recipe",
    "resumable_state",
    "seed_everything",
    "train",
]

Reporter = Callable[[int, dict[str, float]], bool]
"""Called at every log step with the step and metrics; returning True stops the run (e.g. pruned)."""

# The trainer reads time only through this function (step times, the minutes budget, checkpoint_every_minutes),
# so a test can replace it with a fake clock and check budgets without depending on the machine's speed.
clock: Callable[[], float] = time.perf_counter


@dataclass
class RunSummary:
    status: TrialStatus  # completed | collapsed | spiky | diverged | exploded | stopped
    cause: str | None
    diverged_step: int | None
    steps: int
    total_steps: int
    epochs: float
    wall_s: float
    params: int
    step_time_s: float | None
    peak_memory_mb: float
    grad_norm_max: float
    grad_norm_mean: float
    loss_spikes: int
    skipped_steps: int
    nonfinite_events: int
    unit: str
    train_nelbo: float | None
    kl_per_group: list[float] = field(default_factory=list)
    active_units: list[int] = field(default_factory=list)
    active_groups: int = 0
    num_groups: int = 0
    eval: dict[str, Any] | None = None
    out_dir: str = ""
    precision: str = ""  # what numerics.precision resolved to on this device (``auto`` → fp16 or fp32)
    global_batch: int = 0
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] | None = None  # versions, git commit, host, command line, start time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


class Trainer(CheckpointState, OptimizerStep, RunLogging):
    """Holds the state of one run; :func:`train` is the entry point. Its parts: :class:`OptimizerStep` (one step),
    :class:`CheckpointState` (checkpoints, resuming), :class:`RunLogging` (metrics, images, provenance)."""

    def __init__(self, recipe: Recipe, out_dir: Path, device: torch.device, reporter: Reporter | None) -> None:
        self.recipe, self.out_dir, self.device, self.reporter = recipe, out_dir, device, reporter
        self.cfg = recipe.train
        self.ranks = Ranks.current(device)
        # Plain copies: the data order, the warnings and callers (bench, tests' patched steps) read them.
        self.world, self.rank, self.main = self.ranks.world, self.ranks.rank, self.ranks.main
        seed_everything(self.cfg.seed)
        self.model: NVAE = build_model(recipe.model).to(device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.net: nn.Module = self.ranks.wrap(self.model)
        self.train_set = build_dataset(
            recipe.data, split="train", resolution=recipe.model.resolution, channels=recipe.model.input_channels
        )
        self.binarize = needs_binarize(recipe.data)
        self.batch = self.cfg.per_process_batch(self.world)  # global_batch_size / world when the recipe sets it
        global_batch = self.batch * self.world
        self.warnings = [w for w in [paper_batch_warning(recipe, self.world)] if w]
        if self.main:
            for warning in self.warnings:
                print(f"warning: {warning}", file=sys.stderr)
        self.iters_per_epoch = max(1, len(self.train_set) // global_batch)
        if self.iters_per_epoch * global_batch > len(self.train_set):
            raise ValueError("the training set is smaller than one global batch")
        self.budget = Budget(self.cfg, self.iters_per_epoch)
        self._setup_step()
        self.unit = unit_for(recipe.model.output.distribution)
        self.dims = recipe.model.data_dims()
        self.step = 0
        self.elapsed = 0.0
        self.step_times: list[float] = []
        self.last_metrics: dict[str, Any] = {}
        self.resumed_from: int | None = None  # the checkpoint's step, when resumed
        self.ema_bn_recalibrated = False  # set at the end of the run (``_recalibrate_ema``)
        self.stop = StopFlag()
        self.writer: Any = None
        if self.world > 1:
            # Same initial weights and power-iteration vectors on every rank (built above from one seed), but
            # each rank draws its own latent and binarisation noise from here on.
            torch.manual_seed(self.cfg.seed + self.rank)

    @property
    def total_steps(self) -> int:
        """The planned step count (0 until a minutes-only budget has timed its first steps)."""
        return self.budget.total_steps

    # -------------------------------------------------------------------------------------- data
    def _batches(self) -> Iterator[torch.Tensor]:
        """Batches from the current step on. The order depends only on (seed, epoch), so resuming is exact."""
        global_batch = self.batch * self.world
        while True:
            epoch, offset = divmod(self.step, self.iters_per_epoch)
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.train_set), generator=generator)
            batches = [
                order[i * global_batch : (i + 1) * global_batch][self.rank :: self.world].tolist()
                for i in range(offset, self.iters_per_epoch)
            ]
            # Its own generator: a DataLoader iterator otherwise draws a seed from the global RNG, which would
            # make a resumed run (which opens a new iterator mid-epoch) drift from an uninterrupted one.
            loader = DataLoader(
                self.train_set, batch_sampler=batches, num_workers=self.recipe.data.num_workers, generator=generator
            )
            yield from loader

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return prepare_batch(
            x.to(self.device, non_blocking=True), binarize=self.binarize, num_bits=self.recipe.model.output.num_x_bits
        )

    def training_batch(self, x: torch.Tensor) -> torch.Tensor:
        """``prepare`` plus the training-only augmentation: the random horizontal flip of ``data.hflip``."""
        x = self.prepare(x)
        return random_hflip(x) if self.recipe.data.hflip else x

    # --------------------------------------------------------------------------------------- loop
    def run(self, resume: bool) -> RunSummary:
        self.started = datetime.now(timezone.utc)
        checkpoint = self.out_dir / CHECKPOINT_NAME
        if resume and checkpoint.exists():
            self._resume(checkpoint)
        elif checkpoint.exists():
            raise RunDirError(
                f"{self.out_dir} already holds a run; pass --resume to continue it or choose another --out"
            )
        if self.main:
            self._trim_metrics()  # a fresh start also drops the rows of an attempt killed before its first checkpoint
            atomic_write_text(self.out_dir / RESOLVED_RECIPE, dump_recipe(self.recipe))
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tb"))
        restore_signals = self.stop.install()
        try:
            status, cause, diverged_step = self._loop()
        except BaseException:
            if self.writer is not None:
                self.writer.close()
            raise
        finally:
            restore_signals()
        return self._finish(status, cause, diverged_step)

    def _loop(self) -> tuple[TrialStatus, str | None, int | None]:
        progress = Progress(self) if (self.cfg.progress and self.main) else None
        last_save = clock()
        batches = self._batches()
        status, cause, diverged_step = TrialStatus.COMPLETED, None, None
        try:
            while not self.budget.reached(self.step, self.elapsed, self.ranks):
                if self.ranks.any(self.stop.reason is not None):
                    return TrialStatus.STOPPED, self.stop.reason or "interrupted on another rank", None
                x = self.training_batch(next(batches))
                t0 = clock()
                divergence, info = self.train_step(x)
                dt = clock() - t0
                self.elapsed += dt
                self.step += 1
                self.step_times.append(dt)
                if divergence is not None:
                    return TrialStatus.DIVERGED, divergence, self.step
                self.budget.replan(self.step, self.elapsed, self.step_times, self.ranks)
                if info is not None and (self.step % self.cfg.log_every == 0 or self.step == 1):
                    metrics = self._metrics(info)
                    self.log(metrics)
                    if explosion := self.tracker.observe_nelbo(self.step, metrics["nelbo_nats"]):
                        return TrialStatus.EXPLODED, explosion, self.step
                    if self.reporter is not None and self.reporter(self.step, metrics):
                        status, cause = TrialStatus.STOPPED, "pruned"
                        break
                if progress is not None:
                    progress.update(info)
                if self.step % self.cfg.image_every_steps == 0:
                    self.log_images(x)
                if self.step % self.cfg.checkpoint_every_steps == 0 or self.ranks.any(
                    clock() - last_save > self.cfg.checkpoint_every_minutes * 60
                ):
                    self.save()
                    last_save = clock()
        finally:
            if progress is not None:
                progress.close()
        return status, cause, diverged_step

    def _finish(self, status: TrialStatus, cause: str | None, diverged_step: int | None) -> RunSummary:
        if status == TrialStatus.COMPLETED and (explosion := self.tracker.final_explosion(self.step)):
            status, cause, diverged_step = TrialStatus.EXPLODED, explosion, self.step
        if status not in BROKE:
            self._recalibrate_ema()
            self.save()
        eval_result = None
        if status == TrialStatus.COMPLETED and self.cfg.eval_at_end and self.main:
            eval_result = self.final_eval().to_dict()
        kl = self.last_metrics.get("kl_per_group", [])
        units = self.last_metrics.get("active_units_per_group", [])
        if status == TrialStatus.COMPLETED:  # collapsed or spiky: still completed runs, with their values
            status, cause = end_of_run_status(
                units,
                self.recipe.model.num_latent_per_group,
                self.tracker.loss_spikes,
                self.step,
                self.cfg.collapse_fraction,
                self.cfg.spiky_fraction,
            )
        summary = RunSummary(
            status=status,
            cause=cause,
            diverged_step=diverged_step,
            steps=self.step,
            total_steps=self.total_steps,
            epochs=self.step / self.iters_per_epoch,
            wall_s=self.elapsed,
            params=self.params,
            step_time_s=statistics.median(self.step_times[-200:]) if self.step_times else None,
            peak_memory_mb=peak_memory_mb(self.device),
            grad_norm_max=self.tracker.grad_norm_max,
            grad_norm_mean=self.tracker.grad_norm_mean,
            loss_spikes=self.tracker.loss_spikes,
            skipped_steps=self.tracker.skipped_steps,
            nonfinite_events=self.tracker.nonfinite_events,
            unit=self.unit,
            train_nelbo=self.last_metrics.get("nelbo"),
            kl_per_group=kl,
            active_units=units,
            active_groups=sum(1 for u in units if u > 0),
            num_groups=sum(self.recipe.model.groups_per_scale()),
            eval=eval_result,
            out_dir=str(self.out_dir),
            precision=self.precision,
            global_batch=self.batch * self.world,
            warnings=self.warnings,
            provenance=self._provenance() if self.main else None,
        )
        if self.main:
            atomic_write_text(self.out_dir / "summary.json", json.dumps(summary.to_dict(), indent=2))
            if self.writer is not None:
                self._write_hparams(summary)
                self.writer.close()
        return summary

    def _recalibrate_ema(self) -> None:
        """The EMA copy's BN statistics for its own weights (see :mod:`.training.ema`); every rank takes part, so
        that synchronised BN layers meet in their collectives."""
        if self.ema is None or self.step == 0 or self.cfg.ema_bn_batches == 0:
            return
        recalibrate_batch_norm(
            self.ema.module,
            self.train_set,
            self.prepare,
            batches=self.cfg.ema_bn_batches,
            batch_size=self.batch,
            seed=self.cfg.seed,
            device=self.device,
        )
        self.ema_bn_recalibrated = True

    def final_eval(self) -> Any:
        test_set = build_dataset(
            self.recipe.data,
            split="test",
            resolution=self.recipe.model.resolution,
            channels=self.recipe.model.input_channels,
        )
        model = self.ema.module if self.ema is not None else self.model
        return evaluate(
            model,
            test_set,
            prepare=self.prepare,
            iw_samples=self.cfg.eval_iw_samples,
            batch_size=self.recipe.eval.batch_size,
            chunk=self.recipe.eval.chunk,
            images=self.cfg.eval_images,
            device=self.device,
        )


def train(
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
    device: str | torch.device | None = None,
) -> RunSummary:
    """Train a recipe into ``out_dir`` (created if needed) and return the run's summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(recipe, out, pick_device(device), reporter)
    return trainer.run(resume)
