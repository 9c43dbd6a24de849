"""One explicit training loop with the paper's objective, optimizer and schedules (NVAE_SPEC §2.8, §3).

``train(recipe, out_dir)`` writes a self-contained run directory: the resolved recipe, metrics.jsonl,
TensorBoard events, atomic checkpoints and summary.json with the run's status and stability figures.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from . import provenance, tracking
from .checkpoint import CHECKPOINT_NAME, CheckpointError, check_weights, load_checkpoint, save_checkpoint
from .config_io import atomic_write_text, differences, read_jsonl
from .data import build_dataset, needs_binarize, prepare_batch, random_hflip
from .evaluate import evaluate, to_unit, unit_for
from .images import make_grid
from .model.builder import build_model
from .model.nvae import NVAE
from .objectives import (
    SpectralRegularizer,
    balanced_kl,
    bn_regularization,
    kl_balance_alpha,
    kl_coefficient,
    spectral_lambda,
)
from .rundir import RESOLVED_RECIPE
from .runtime import pick_device
from .schema import Recipe, dump_recipe, paper_batch_warning, recipe_to_dict
from .status import BROKE, TrialStatus
from .telemetry import StabilityTracker, active_units, end_of_run_status, gradient_norm

Reporter = Callable[[int, dict[str, float]], bool]
"""Called at every log step with the step and metrics; returning True stops the run (e.g. pruned)."""

DEFAULT_EPOCHS = 200
STEP_TIME_PROBE = 5  # steps timed to turn a wall-clock-only budget into a step count
# A minutes-only budget is re-planned after every step up to this one, from the time left and the recent step
# time: the first steps are slower (allocator and oneDNN warm-up, the first 40 power iterations), and a plan fixed
# at step 5 alone left a tenth of a 30-minute budget unused (4,935 steps in 26.8 minutes). The schedules (cosine,
# KL warm-up) follow the plan; after this step it stays fixed.
CLOCK_REPLAN_UNTIL = 320
MIN_GRAD_SCALE = 2.0**-20
# The trainer reads time only through this function (step times, the minutes budget, checkpoint_every_minutes),
# so a test can replace it with a fake clock and check budgets without depending on the machine's speed.
clock: Callable[[], float] = time.perf_counter


# Resuming continues the run that the checkpoint belongs to: another network cannot take its weights, and another
# budget would bend the cosine and KL schedules mid-run. Execution settings (model.numerics) may change.
RESUME_FIXED = ("model", "train.steps", "train.epochs", "train.minutes")
RESUME_FREE = ("model.numerics",)
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "spectral", "rng_cpu", "step", "total_steps", "elapsed")


class TrainingDiverged(FloatingPointError):
    """Raised with ``nonfinite: raise`` when the loss or the gradients stop being finite."""


class RunDirError(Exception):
    """The output directory cannot be used as asked (e.g. it already holds a run and --resume was not given)."""


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == root or path.startswith(root + ".") for root in roots)


def refuse_changed_recipe(checkpoint: Path, saved: Any, recipe: Recipe) -> None:
    """Refuse to resume with another architecture or budget than the checkpoint's, showing the difference."""
    if not isinstance(saved, str):
        return  # the checkpoint records no recipe; check_weights still guards the architecture
    try:
        old = yaml.safe_load(saved)
    except yaml.YAMLError:
        raise CheckpointError(f"{checkpoint}: its recorded recipe is not valid YAML (damaged checkpoint)") from None
    new = yaml.safe_load(dump_recipe(recipe))
    changed = [d for d in differences(old, new) if _under(d[0], RESUME_FIXED) and not _under(d[0], RESUME_FREE)]
    if not changed:
        return
    rows = "\n".join(f"  {path}: {json.dumps(a)} -> {json.dumps(b)}" for path, a, b in changed)
    sets = " ".join(f"--set '{path}={json.dumps(a)}'" for path, a, _b in changed)
    raise RunDirError(
        f"{checkpoint.parent}: --resume refuses to change the architecture or the budget of a run "
        f"(checkpoint -> now):\n{rows}\nResume with the run's own values ({sets}), or train into another --out."
    )


def resumable_state(checkpoint: Path, recipe: Recipe, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's state if ``recipe`` may resume from it (every entry there, same architecture and budget)."""
    state = load_checkpoint(checkpoint, device, required=RESUME_KEYS)
    refuse_changed_recipe(checkpoint, state.get("recipe"), recipe)
    return state


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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class LRSchedule:
    """Linear warm-up per iteration, then cosine decay per epoch (the paper) or per step."""

    def __init__(
        self,
        lr: float,
        lr_min: float,
        warmup_steps: int,
        total_steps: int,
        iters_per_epoch: int,
        warmup_epochs: float,
        per: str,
    ) -> None:
        self.lr, self.lr_min, self.warmup_steps = lr, lr_min, warmup_steps
        self.total_steps, self.iters_per_epoch, self.per = total_steps, iters_per_epoch, per
        self.warmup_epochs = int(warmup_epochs)
        self.total_epochs = max(1, math.ceil(total_steps / iters_per_epoch))

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.per == "epoch":
            # CosineAnnealingLR(T_max = epochs − warmup − 1), stepped at the start of each epoch after the warm-up.
            epoch = step // self.iters_per_epoch
            progress = max(0, epoch - self.warmup_epochs) / max(1, self.total_epochs - self.warmup_epochs - 1)
        else:
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps - 1)
        progress = min(progress, 1.0)
        lr = self.lr_min + (self.lr - self.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))
        return lr / self.lr


class _StopFlag:
    """Set by SIGTERM/SIGINT so the loop can checkpoint and end as 'stopped' instead of dying mid-write."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def install(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, _frame: Any) -> None:
            self.reason = f"interrupted by {signal.Signals(signum).name}"

        for sig in previous:
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore


class Trainer:
    """Holds the state of one run; :func:`train` is the entry point."""

    def __init__(self, recipe: Recipe, out_dir: Path, device: torch.device, reporter: Reporter | None) -> None:
        self.recipe, self.out_dir, self.device, self.reporter = recipe, out_dir, device, reporter
        self.cfg = recipe.train
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.main = self.rank == 0
        seed_everything(self.cfg.seed)
        self.model: NVAE = build_model(recipe.model).to(device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.net: nn.Module = self._wrap_distributed(self.model)
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
        self.total_steps = self._planned_steps()
        self.optimizer = torch.optim.Adamax(
            self.model.parameters(),
            lr=self.cfg.learning_rate,
            betas=(0.9, 0.999),
            eps=self.cfg.adamax_eps,
            weight_decay=self.cfg.weight_decay,
        )
        self.scheduler = self._make_scheduler()
        loss_cfg = recipe.model.loss
        self.spectral = SpectralRegularizer(self.model, loss_cfg.spectral_power_iters).to(device)
        groups_dec = list(reversed(recipe.model.groups_per_scale()))
        self.alpha = kl_balance_alpha(groups_dec, loss_cfg.kl_balance_rule).to(device) if loss_cfg.kl_balance else None
        precision = self.precision = recipe.model.numerics.resolved_precision(device.type)
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("model.numerics.precision fp16 needs a CUDA device (it uses a gradient scaler); use bf16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, enabled=precision == "fp16")
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.ema_decay), use_buffers=True)
            if self.cfg.ema_decay
            else None
        )
        self.tracker = StabilityTracker(
            spike_factor=self.cfg.spike_factor,
            explode_factor=self.cfg.explode_factor,
            explode_patience=self.cfg.explode_patience,
        )
        self.unit = unit_for(recipe.model.output.distribution)
        self.dims = recipe.model.data_dims()
        self.step = 0
        self.elapsed = 0.0
        self.step_times: list[float] = []
        self.last_metrics: dict[str, Any] = {}
        self.resumed_from: int | None = None  # the checkpoint's step, when resumed
        self.stop = _StopFlag()
        self.writer: Any = None
        if self.world > 1:
            # Same initial weights and power-iteration vectors on every rank (built above from one seed), but
            # each rank draws its own latent and binarisation noise from here on.
            torch.manual_seed(self.cfg.seed + self.rank)

    # ------------------------------------------------------------------------------------- setup
    def _wrap_distributed(self, model: NVAE) -> nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[assignment]
            return DistributedDataParallel(model, device_ids=[self.device.index])
        return DistributedDataParallel(model)

    def _planned_steps(self) -> int:
        if self.cfg.steps is not None:
            return self.cfg.steps
        if self._budget_is_clock_only():
            return 0  # planned after timing the first steps (CLOCK_REPLAN_UNTIL)
        return (self.cfg.epochs or DEFAULT_EPOCHS) * self.iters_per_epoch

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        warmup = round(self.cfg.warmup_epochs * self.iters_per_epoch)
        schedule = LRSchedule(
            self.cfg.learning_rate,
            self.cfg.learning_rate_min,
            warmup,
            max(self.total_steps, 1),
            self.iters_per_epoch,
            self.cfg.warmup_epochs,
            self.cfg.cosine_per,
        )
        self.schedule = schedule
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule.factor)

    def _set_total_steps(self, total: int) -> None:
        self.total_steps = total
        self.schedule.total_steps = total
        self.schedule.total_epochs = max(1, math.ceil(total / self.iters_per_epoch))

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "spectral": self.spectral.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rng_ranks": self._gather_rng_states(),
            "step": self.step,
            "total_steps": self.total_steps,
            "elapsed": self.elapsed,
            "step_times": self.step_times[-200:],
            "tracker": self.tracker.state_dict(),
            "recipe": dump_recipe(self.recipe),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.spectral.load_state_dict(state["spectral"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        ranks = state.get("rng_ranks") or []
        if self.world > 1 and len(ranks) == self.world:
            # Each rank draws its own latent and binarisation noise: restore its own stream, not rank 0's.
            cpu_state, cuda_state = ranks[self.rank]
            torch.set_rng_state(cpu_state)
            if cuda_state is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_state, self.device)
        self.step = int(state["step"])
        self._set_total_steps(int(state["total_steps"]))
        self.elapsed = float(state["elapsed"])
        self.step_times = list(state["step_times"])
        self.tracker.load_state_dict(state["tracker"])

    def save(self) -> None:
        """Called at the same step on every rank (the RNG gather is a collective); rank 0 writes."""
        state = self.state_dict()
        if self.main:
            save_checkpoint(self.out_dir / CHECKPOINT_NAME, state)

    def _gather_rng_states(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.world == 1:
            return []
        mine = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, mine)
        return states

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when it is true on one: ranks must leave the loop, and save, at the same step."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _rank0_int(self, value: int) -> int:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

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

    # ----------------------------------------------------------------------------------- one step
    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def compute_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        loss_cfg = self.recipe.model.loss
        beta = kl_coefficient(
            self.step,
            max(self.total_steps, 1),
            loss_cfg.kl_anneal_portion,
            loss_cfg.kl_const_portion,
            loss_cfg.kl_const_coeff,
        )
        with self._autocast():
            result = self.net(x)
            recon = self.model.reconstruction_loss(result.output, x)
            kl_term, _ = balanced_kl(result.kl, beta, self.alpha)
            nelbo_batch = recon + torch.stack(result.kl, dim=1).sum(dim=1)
            loss = (recon + kl_term).mean()
            lam = spectral_lambda(beta, loss_cfg.spectral_coeff, loss_cfg.spectral_anneal, loss_cfg.spectral_init)
            if lam > 0:
                loss = loss + lam * self.spectral()
                if loss_cfg.bn_regularization:
                    loss = loss + lam * bn_regularization(self.model).to(loss.device)
        info = {
            "beta": beta,
            "lambda": lam,
            "recon": recon.detach().mean(),
            "nelbo": nelbo_batch.detach().mean(),
            "kl": [k.detach().mean() for k in result.kl],
            "kl_per_channel": [k.detach() for k in result.kl_per_channel],
        }
        return loss, info

    def _nonfinite(self, what: str) -> str | None:
        """Apply the recipe's policy; returns a divergence cause when the run must end."""
        self.tracker.nonfinite_events += 1
        policy = self.cfg.nonfinite
        if policy == "raise":
            raise TrainingDiverged(f"non-finite {what} at step {self.step}")
        if policy == "stop":
            return f"non-finite {what}"
        self.tracker.skipped()
        if self.tracker.consecutive_skips >= self.cfg.max_skipped_steps:
            return f"non-finite {what} in {self.tracker.consecutive_skips} consecutive steps"
        return None

    def train_step(self, x: torch.Tensor) -> tuple[str | None, dict[str, Any] | None]:
        """One optimizer step. Returns (divergence cause or None, info for logging or None if skipped)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, info = self.compute_loss(x)
        loss_value = float(self._global_mean(loss.detach()))  # the same on every rank: no rank skips alone
        if not math.isfinite(loss_value):
            return self._nonfinite("loss"), None
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = float(gradient_norm(params))
        info.update(loss=loss_value, grad_norm=norm)
        if not math.isfinite(norm) and not self.scaler.is_enabled():
            return self._nonfinite("gradient"), None
        self.tracker.observe_grad_norm(norm)
        if self.cfg.skip_threshold is not None and norm > self.cfg.skip_threshold:
            self.tracker.skipped()
            self.scheduler.step()
            return None, None
        if self.cfg.grad_clip is not None and math.isfinite(norm):
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)  # with fp16, skips the update when the scaled gradients overflowed
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < MIN_GRAD_SCALE:
            # The scaler halves its scale at every overflow: this low, the gradients overflow at any scale.
            return "persistent fp16 gradient overflow (scale collapsed)", None
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.tracker.stepped()
        info["spike"] = self.tracker.observe_loss(loss_value)
        return None, info

    # ------------------------------------------------------------------------------------ logging
    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a per-rank batch mean (equal slices, so the mean over the global batch)."""
        if self.world == 1:
            return value
        value = value.detach().float().clone()
        dist.all_reduce(value)
        return value / self.world

    def _metrics(self, info: dict[str, Any]) -> dict[str, Any]:
        # Called at the same steps on every rank, so the all-reduce lines up; the logged figures are global-batch.
        packed = self._global_mean(torch.stack([info["nelbo"], info["recon"], *info["kl"]]).float()).tolist()
        nelbo, recon, kl = packed[0], packed[1], packed[2:]
        units = active_units(info["kl_per_channel"])
        return {
            "step": self.step,
            "epoch": self.step / self.iters_per_epoch,
            "loss": info["loss"],
            "nelbo": to_unit(nelbo, self.unit, self.dims),
            "nelbo_nats": nelbo,
            "recon": recon,
            "kl": sum(kl),
            "beta": info["beta"],
            "lambda": info["lambda"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": info["grad_norm"],
            "loss_spikes": self.tracker.loss_spikes,
            "skipped_steps": self.tracker.skipped_steps,
            "active_units": sum(units),
            "active_groups": sum(1 for u in units if u > 0),
            "kl_per_group": kl,
            "active_units_per_group": units,
            "time": self.elapsed,
        }

    def log(self, metrics: dict[str, Any]) -> None:
        self.last_metrics = metrics
        if not self.main:
            return
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\n")
        tracking.on_step(self.step, metrics)
        if self.writer is not None:
            for key in ("loss", "nelbo", "recon", "kl", "beta", "lambda", "lr", "grad_norm", "active_units"):
                self.writer.add_scalar(f"train/{key}", metrics[key], self.step)
            for g, value in enumerate(metrics["kl_per_group"]):
                self.writer.add_scalar(f"kl_group/{g:02d}", value, self.step)

    @torch.no_grad()
    def log_images(self, x: torch.Tensor) -> None:
        if not self.main or self.writer is None:
            return
        model = self.ema.module if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        n = min(16, self.recipe.eval.num_samples)
        samples = model.sample(n, self.recipe.eval.temperature, self.device)
        recon_out = model(x[:n]).output
        recon = recon_out.mean() if self.recipe.model.output.distribution == "bernoulli" else recon_out.sample(1.0)
        self.writer.add_image("samples", make_grid(samples), self.step)
        self.writer.add_image("reconstructions", make_grid(torch.cat([x[:n], recon])), self.step)
        model.train(was_training)

    def _trim_metrics(self) -> None:
        """Forget the log lines written after the checkpoint (they will be re-done), and a line torn by a kill."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [row for row in read_jsonl(path) if isinstance(row.get("step"), int) and row["step"] <= self.step]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
        if kept:  # the summary's training figures come from the last log line, also when no step is left to take
            self.last_metrics = kept[-1]

    def _provenance(self) -> dict[str, Any]:
        """Where the run came from: this process's, or for a resumed run the first one's, with each resume that
        took steps listed under ``resumes`` (resuming a finished run leaves the record as it was)."""
        current = provenance.collect(self.started)
        previous = _summary_provenance(self.out_dir) if self.resumed_from is not None else None
        if previous is None:
            return current
        if self.step > self.resumed_from:
            keys = ("started", "command", "host", "git", "nvae_search", "torch")
            previous.setdefault("resumes", []).append(
                {k: current.get(k) for k in keys} | {"from_step": self.resumed_from}
            )
        return previous

    def _resume(self, checkpoint: Path) -> None:
        """Continue from the checkpoint; one of another run, architecture or format is refused naming the file."""
        state = resumable_state(checkpoint, self.recipe, self.device)
        check_weights(self.model, state["model"], checkpoint)
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise CheckpointError(f"{checkpoint}: does not fit this run ({type(exc).__name__}: {reason})") from None
        self.resumed_from = self.step

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

    def _budget_is_clock_only(self) -> bool:
        return self.cfg.minutes is not None and self.cfg.steps is None and self.cfg.epochs is None

    def _steps_left_on_clock(self) -> int:
        """Step count that fills the minutes budget at the median time of the recent steps."""
        recent = statistics.median(self.step_times[-max(STEP_TIME_PROBE, self.step // 2) :])
        left = self.cfg.minutes * 60 - self.elapsed  # type: ignore[operator]
        return max(self.step + 1, self.step + int(left / recent))

    def _budget_reached(self) -> bool:
        if self.total_steps and self.step >= self.total_steps:
            return True  # the same step count on every rank
        return self._any_rank(self.cfg.minutes is not None and self.elapsed >= self.cfg.minutes * 60)

    def _loop(self) -> tuple[TrialStatus, str | None, int | None]:
        progress = _Progress(self) if (self.cfg.progress and self.main) else None
        last_save = clock()
        batches = self._batches()
        status, cause, diverged_step = TrialStatus.COMPLETED, None, None
        try:
            while not self._budget_reached():
                if self._any_rank(self.stop.reason is not None):
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
                if STEP_TIME_PROBE <= self.step <= CLOCK_REPLAN_UNTIL and self._budget_is_clock_only():
                    self._set_total_steps(self._rank0_int(self._steps_left_on_clock()))
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
                if self.step % self.cfg.checkpoint_every_steps == 0 or self._any_rank(
                    clock() - last_save > self.cfg.checkpoint_every_minutes * 60
                ):
                    self.save()
                    last_save = clock()
        finally:
            if progress is not None:
                progress.close()
        return status, cause, diverged_step

    def _finish(self, status: TrialStatus, cause: str | None, diverged_step: int | None) -> RunSummary:
        if status not in BROKE:
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

    def _write_hparams(self, summary: RunSummary) -> None:
        flat = _flatten(recipe_to_dict(self.recipe)["model"], "model")
        flat.update(_flatten(recipe_to_dict(self.recipe)["train"], "train"))
        hparams = {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}
        metrics = {
            "hparam/train_nelbo": summary.train_nelbo or float("nan"),
            "hparam/diverged": float(summary.status in BROKE),
        }
        if summary.eval:
            metrics["hparam/eval_nll"] = summary.eval["nll"]
            metrics["hparam/eval_nelbo"] = summary.eval["nelbo"]
        self.writer.add_hparams(hparams, metrics, name="hparams")


def _summary_provenance(run_dir: Path) -> dict[str, Any] | None:
    """The provenance block of the run's existing summary.json, if it has a readable one."""
    try:
        block = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("provenance")
    except (OSError, ValueError, AttributeError):
        return None
    return block if isinstance(block, dict) else None


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        elif value is not None:
            out[name] = value
    return out


class _Progress:
    """A rich progress bar: step, loss, NELBO in nats or bits/dim, it/s and ETA."""

    def __init__(self, trainer: Trainer) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.trainer = trainer
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.progress.add_task(
            trainer.recipe.name, total=trainer.total_steps or None, completed=trainer.step, stats="", speed=""
        )
        self.progress.start()

    def update(self, info: dict[str, Any] | None) -> None:
        t = self.trainer
        fields: dict[str, Any] = {"completed": t.step, "total": t.total_steps or None}
        if info is not None and (t.step % t.cfg.log_every == 0 or t.step == 1):
            nelbo = to_unit(float(info["nelbo"]), t.unit, t.dims)
            fields["stats"] = f"loss {info['loss']:.2f}  nelbo {nelbo:.3f} {t.unit}  |g| {info['grad_norm']:.2g}"
        recent = t.step_times[-20:]
        if recent:
            fields["speed"] = f"{1.0 / statistics.median(recent):.1f} it/s"
        self.progress.update(self.task, **fields)

    def close(self) -> None:
        self.progress.stop()


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
