"""Stability telemetry of a run: gradient norms, loss spikes, skipped steps, active latent units."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .status import TrialStatus, completed_outcome, explosion_cause

ACTIVE_UNIT_KL = 0.1  # the paper's rule: a latent channel is active when its mean KL exceeds 0.1 nats
SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 20


@dataclass
class StabilityTracker:
    """Counts what a reader of a stability report wants: spikes, skipped steps, gradient-norm extremes."""

    spike_factor: float = 3.0
    explode_factor: float | None = None
    explode_patience: int = 1  # consecutive logged NELBOs above the rule before the run counts as exploded
    explode_streak: int = 0
    lowest_nelbo: float = math.inf  # the lowest logged NELBO so far and its step: the explosion rule's reference
    lowest_nelbo_step: int = 0
    first_nelbo: float = math.nan  # the first and the latest logged NELBO: the end-of-run rule's figures
    last_nelbo: float = math.nan
    grad_norm_max: float = 0.0
    grad_norm_sum: float = 0.0
    grad_norm_count: int = 0
    loss_spikes: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    nonfinite_events: int = 0
    recent_losses: deque[float] = field(default_factory=lambda: deque(maxlen=SPIKE_WINDOW))

    def observe_loss(self, loss: float) -> bool:
        """Record a finite loss; returns True if it is a spike against the running median: above it by more than
        (factor − 1) × |median|, which for positive losses is above factor × median. Measured upwards from the
        median, so a continuous decoder's negative NELBO spikes when it jumps up, not when it improves."""
        spike = False
        if len(self.recent_losses) >= SPIKE_MIN_HISTORY:
            median = statistics.median(self.recent_losses)
            spike = loss - median > max((self.spike_factor - 1) * abs(median), 1e-8)
        self.loss_spikes += int(spike)
        self.recent_losses.append(loss)
        return spike

    def observe_nelbo(self, step: int, nelbo: float) -> str | None:
        """Record a logged NELBO; returns the explosion cause if it is far above the lowest one before it."""
        cause = explosion_cause(nelbo, step, self.lowest_nelbo, self.lowest_nelbo_step, self.explode_factor)
        self.explode_streak = self.explode_streak + 1 if cause else 0
        if math.isfinite(nelbo):
            self.first_nelbo = nelbo if math.isnan(self.first_nelbo) else self.first_nelbo
            self.last_nelbo = nelbo
        if math.isfinite(nelbo) and nelbo < self.lowest_nelbo:
            self.lowest_nelbo, self.lowest_nelbo_step = nelbo, step
        if cause and self.explode_patience > 1:
            cause += f" ({self.explode_streak} logs in a row; train.explode_patience {self.explode_patience})"
        return cause if self.explode_streak >= self.explode_patience else None

    def final_explosion(self, step: int) -> str | None:
        """At the end of a run that was not stopped: its last logged NELBO above its first one (it ended worse
        than untrained), or above the explosion rule with no log left to recover in (a run that stays blown up
        but never crosses the rule ``explode_patience`` logs in a row). None when the rule is off."""
        last, first = self.last_nelbo, self.first_nelbo
        if self.explode_factor is None or not (math.isfinite(last) and math.isfinite(first)) or first <= 0:
            return None
        if last > first:
            return f"ended at step {step} with NELBO {last:.4g}, above its first logged {first:.4g}"
        cause = explosion_cause(last, step, self.lowest_nelbo, self.lowest_nelbo_step, self.explode_factor)
        return None if cause is None else f"ended with {cause}"

    def observe_grad_norm(self, norm: float) -> None:
        if math.isfinite(norm):
            self.grad_norm_max = max(self.grad_norm_max, norm)
            self.grad_norm_sum += norm
            self.grad_norm_count += 1

    def skipped(self) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1

    def stepped(self) -> None:
        self.consecutive_skips = 0

    @property
    def grad_norm_mean(self) -> float:
        return self.grad_norm_sum / max(self.grad_norm_count, 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "grad_norm_max": self.grad_norm_max,
            "grad_norm_sum": self.grad_norm_sum,
            "grad_norm_count": self.grad_norm_count,
            "loss_spikes": self.loss_spikes,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "nonfinite_events": self.nonfinite_events,
            "lowest_nelbo": self.lowest_nelbo,
            "lowest_nelbo_step": self.lowest_nelbo_step,
            "explode_streak": self.explode_streak,
            "first_nelbo": self.first_nelbo,
            "last_nelbo": self.last_nelbo,
            "recent_losses": list(self.recent_losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key == "recent_losses":
                self.recent_losses = deque(value, maxlen=SPIKE_WINDOW)
            else:
                setattr(self, key, value)


def end_of_run_status(
    units_per_group: list[int], latent_per_group: int, loss_spikes: int, steps: int, collapse: float, spiky: float
) -> tuple[TrialStatus, str | None]:
    """The status of a run that trained to its end, from its last log step's active units and its spike count."""
    total = latent_per_group * len(units_per_group)
    return completed_outcome(sum(units_per_group), total, loss_spikes, steps, collapse, spiky)


def active_units(kl_per_channel: list[torch.Tensor]) -> list[int]:
    """Active latent channels per group (batch-mean KL above 0.1 nats)."""
    return [int((k > ACTIVE_UNIT_KL).sum()) for k in kl_per_channel]


def gradient_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
