"""The run's length in steps and the learning-rate schedule that follows it.

``train.steps`` and ``train.epochs`` fix the step count up front; a minutes-only budget (``train.minutes`` alone)
is planned from the measured step time and re-planned during the first steps, and the cosine and KL schedules end
with the plan.
"""

from __future__ import annotations

import math
import statistics

import torch

from ..schema import TrainConfig
from .control import Ranks

DEFAULT_EPOCHS = 200
STEP_TIME_PROBE = 5  # steps timed to turn a wall-clock-only budget into a step count
# A minutes-only budget is re-planned after every step up to this one, from the time left and the recent step
# time: the first steps are slower (allocator and oneDNN warm-up, the first 40 power iterations), and a plan fixed
# at step 5 alone left a tenth of a 30-minute budget unused (4,935 steps in 26.8 minutes). The schedules (cosine,
# KL warm-up) follow the plan. After this step the plan is revised every CLOCK_REPLAN_EVERY steps until half of
# it is done: the first few hundred steps still run slower than the rest (a 30-minute run of recipes/cpu/mnist_b16
# timed 0.33 s per step over steps 150-300 and 0.30 s afterwards, and stopped after 27.4 minutes). Each revision
# moves the schedules' end by a few per cent; the second half keeps its plan, and the clock stays a hard cap.
CLOCK_REPLAN_UNTIL = 320
CLOCK_REPLAN_EVERY = 100


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


class Budget:
    """How many steps the run takes (``total_steps``; 0 until a minutes-only budget is first planned) and when it
    has taken them. The learning-rate ``schedule`` is re-planned with it."""

    def __init__(self, cfg: TrainConfig, iters_per_epoch: int) -> None:
        self.cfg, self.iters_per_epoch = cfg, iters_per_epoch
        self.total_steps = self._planned_steps()
        self.schedule = LRSchedule(
            cfg.learning_rate,
            cfg.learning_rate_min,
            round(cfg.warmup_epochs * iters_per_epoch),
            max(self.total_steps, 1),
            iters_per_epoch,
            cfg.warmup_epochs,
            cfg.cosine_per,
        )

    def clock_only(self) -> bool:
        return self.cfg.minutes is not None and self.cfg.steps is None and self.cfg.epochs is None

    def _planned_steps(self) -> int:
        if self.cfg.steps is not None:
            return self.cfg.steps
        if self.clock_only():
            return 0  # planned after timing the first steps (CLOCK_REPLAN_UNTIL)
        return (self.cfg.epochs or DEFAULT_EPOCHS) * self.iters_per_epoch

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule.factor)

    def set_total_steps(self, total: int) -> None:
        self.total_steps = total
        self.schedule.total_steps = total
        self.schedule.total_epochs = max(1, math.ceil(total / self.iters_per_epoch))

    def steps_left_on_clock(self, step: int, elapsed: float, step_times: list[float]) -> int:
        """Step count that fills the minutes budget at the median time of the recent steps."""
        recent = statistics.median(step_times[-max(STEP_TIME_PROBE, step // 2) :])
        left = self.cfg.minutes * 60 - elapsed  # type: ignore[operator]
        return max(step + 1, step + int(left / recent))

    def replan(self, step: int, elapsed: float, step_times: list[float], ranks: Ranks) -> None:
        """Plan the step count of a minutes-only budget anew (rank 0's plan for all): after every one of the first
        steps, then every CLOCK_REPLAN_EVERY steps through the first half of the plan. Decided by the step and the
        shared plan alone, so that every rank takes part in the same revisions."""
        if not self.clock_only() or step < STEP_TIME_PROBE:
            return
        early = step <= CLOCK_REPLAN_UNTIL
        if early or (step % CLOCK_REPLAN_EVERY == 0 and 2 * step <= self.total_steps):
            self.set_total_steps(ranks.rank0_int(self.steps_left_on_clock(step, elapsed, step_times)))

    def reached(self, step: int, elapsed: float, ranks: Ranks) -> bool:
        if self.total_steps and step >= self.total_steps:
            return True  # the same step count on every rank
        return ranks.any(self.cfg.minutes is not None and elapsed >= self.cfg.minutes * 60)
