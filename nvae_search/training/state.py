"""Checkpoints and resuming: what a checkpoint holds, and which recipe may continue from it.

Resuming continues the run that the checkpoint belongs to: another network cannot take its weights, and another
budget would bend the cosine and KL schedules mid-run. Execution settings (``model.numerics``) may change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..checkpoint import CHECKPOINT_NAME, CheckpointError, check_weights, load_checkpoint, save_checkpoint
from ..config_io import differences
from ..model.nvae import NVAE
from ..objectives import SpectralRegularizer
from ..schema import Recipe, dump_recipe
from ..telemetry import StabilityTracker
from .budget import Budget
from .control import Ranks

RESUME_FIXED = ("model", "train.steps", "train.epochs", "train.minutes")
RESUME_FREE = ("model.numerics",)
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "spectral", "rng_cpu", "step", "total_steps", "elapsed")


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


class CheckpointState:
    """The checkpoint of the trainer: everything a resumed run needs to take the same steps as an uninterrupted one
    (weights, optimizer, schedules, scaler, power-iteration vectors, EMA, every rank's RNG, the clock budget)."""

    recipe: Recipe
    out_dir: Path
    device: torch.device
    ranks: Ranks
    budget: Budget
    model: NVAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    spectral: SpectralRegularizer
    ema: nn.Module | None
    ema_bn_recalibrated: bool
    tracker: StabilityTracker
    step: int
    elapsed: float
    step_times: list[float]
    resumed_from: int | None

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "spectral": self.spectral.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            # Whether the EMA copy's BN statistics were re-estimated for its weights (the end of a run).
            "ema_bn_recalibrated": self.ema_bn_recalibrated,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rng_ranks": self.ranks.gather_rng_states(),
            "step": self.step,
            "total_steps": self.budget.total_steps,
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
        restore_cuda_rng_states(state["rng_cuda"])
        ranks = state.get("rng_ranks") or []
        if self.ranks.world > 1 and len(ranks) == self.ranks.world:
            # Each rank draws its own latent and binarisation noise: restore its own stream, not rank 0's.
            cpu_state, cuda_state = ranks[self.ranks.rank]
            torch.set_rng_state(cpu_state)
            if cuda_state is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_state, self.device)
        self.step = int(state["step"])
        self.budget.set_total_steps(int(state["total_steps"]))
        self.elapsed = float(state["elapsed"])
        self.step_times = list(state["step_times"])
        self.tracker.load_state_dict(state["tracker"])

    def save(self) -> None:
        """Called at the same step on every rank (the RNG gather is a collective); rank 0 writes."""
        state = self.state_dict()
        if self.ranks.main:
            save_checkpoint(self.out_dir / CHECKPOINT_NAME, state)

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


def restore_cuda_rng_states(states: list[torch.Tensor]) -> None:
    """Each visible CUDA device's generator state, from a checkpoint's list (one per device visible when it was
    written). A run resumed with fewer devices visible (another node, ``CUDA_VISIBLE_DEVICES``) restores those it
    has: ``torch.cuda.set_rng_state_all`` would fail on the first device missing."""
    if not states or not torch.cuda.is_available():
        return
    for index, generator_state in enumerate(states[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(generator_state, index)
