"""One optimizer step with the paper's objective (NVAE_SPEC §2.8, §3): the loss under autocast, the recipe's policy
for non-finite values, the skip threshold, clipping, the fp16 gradient scaler, the scheduler and the EMA.

:class:`OptimizerStep` is a part of :class:`nvae_search.train.Trainer`; it builds the objects a step changes
(``_setup_step``) and reads the run's position (``step``, ``total_steps``) and ``ranks`` from the trainer.
"""

from __future__ import annotations

import math
import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..model.nvae import NVAE
from ..objectives import (
    SpectralRegularizer,
    balanced_kl,
    bn_regularization,
    kl_balance_alpha,
    kl_coefficient,
    spectral_lambda,
)
from ..schema import Recipe, TrainConfig
from ..telemetry import StabilityTracker, gradient_norm
from .budget import Budget
from .control import Ranks

MIN_GRAD_SCALE = 2.0**-20
FP16_INIT_SCALE = 2.0**10  # the official gradient scaler's initial scale
# fp16 autocast and its gradient scaler run on CPUs too, slowly: users are sent to bf16 there, the tests lift this.
FP16_DEVICES: tuple[str, ...] = ("cuda",)


def gradient_scaler(precision: str, device_type: str) -> torch.amp.GradScaler:
    """The trainer's gradient scaler: the official one in fp16, a pass-through (disabled) in other precisions."""
    return torch.amp.GradScaler(device_type, init_scale=FP16_INIT_SCALE, enabled=precision == "fp16")


class TrainingDiverged(FloatingPointError):
    """Raised with ``nonfinite: raise`` when the loss or the gradients stop being finite; ``step`` is the step that
    diverged, numbered as a ``stop`` policy's ``diverged_step``."""

    def __init__(self, what: str, step: int) -> None:
        super().__init__(f"non-finite {what} at step {step}")
        self.what, self.step = what, step

    def __reduce__(self) -> tuple[type, tuple[str, int]]:  # pickled whole across processes (Ray, spawned ranks)
        return type(self), (self.what, self.step)


class OptimizerStep:
    """The step of the trainer: ``train_step`` (and the ``compute_loss`` it calls) on the trainer's state."""

    recipe: Recipe
    cfg: TrainConfig
    device: torch.device
    ranks: Ranks
    budget: Budget
    model: NVAE
    net: nn.Module
    step: int
    total_steps: int

    def _setup_step(self) -> None:
        """Optimizer, scheduler, regularizers, precision and EMA, built in this order (the spectral regularizer
        draws its power-iteration vectors from the seeded RNG)."""
        recipe, cfg, device = self.recipe, self.cfg, self.device
        self.optimizer = torch.optim.Adamax(
            self.model.parameters(),
            lr=cfg.learning_rate,
            betas=(0.9, 0.999),
            eps=cfg.adamax_eps,
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = self.budget.scheduler(self.optimizer)
        loss_cfg = recipe.model.loss
        self.spectral = SpectralRegularizer(self.model, loss_cfg.spectral_power_iters).to(device)
        groups_dec = list(reversed(recipe.model.groups_per_scale()))
        self.alpha = kl_balance_alpha(groups_dec, loss_cfg.kl_balance_rule).to(device) if loss_cfg.kl_balance else None
        precision = self.precision = recipe.model.numerics.resolved_precision(device.type)
        if precision == "fp16" and device.type not in FP16_DEVICES:
            raise ValueError("model.numerics.precision fp16 needs a CUDA device (it uses a gradient scaler); use bf16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = gradient_scaler(precision, device.type)
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
            if cfg.ema_decay
            else None
        )
        self.tracker = StabilityTracker(
            spike_factor=cfg.spike_factor, explode_factor=cfg.explode_factor, explode_patience=cfg.explode_patience
        )

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
            raise TrainingDiverged(what, self.step + 1)  # the trainer counts this step once it has ended
        if policy == "stop":
            return f"non-finite {what}"
        self.tracker.skipped()
        if self.tracker.consecutive_skips >= self.cfg.max_skipped_steps:
            return f"non-finite {what} in {self.tracker.consecutive_skips} consecutive steps"
        return None

    def _advance_schedule(self) -> None:
        with warnings.catch_warnings():
            # A step skipped before any update (the skip threshold, or the fp16 scaler's overflow at the first steps)
            # makes torch warn that the schedule moved before the optimizer; it follows the step count on purpose.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()

    def train_step(self, x: torch.Tensor) -> tuple[str | None, dict[str, Any] | None]:
        """One optimizer step. Returns (divergence cause or None, info for logging or None if skipped)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, info = self.compute_loss(x)
        loss_value = float(self.ranks.mean(loss.detach()))  # the same on every rank: no rank skips alone
        if not math.isfinite(loss_value):
            return self._nonfinite("loss"), None
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = float(gradient_norm(params))
        info.update(loss=loss_value, grad_norm=norm)
        # With fp16, non-finite gradients are the scaler's overflow: its step skips the update and its update lowers
        # the scale, so neither the non-finite policy nor the skip threshold may take the step from it.
        overflow = not math.isfinite(norm)
        if overflow and not self.scaler.is_enabled():
            return self._nonfinite("gradient"), None
        info["scaler_skipped"] = overflow
        self.tracker.observe_grad_norm(norm)
        if not overflow and self.cfg.skip_threshold is not None and norm > self.cfg.skip_threshold:
            self.tracker.skipped()
            self.scaler.update()  # closes this step's unscale_ (the next one would raise); the scale stays
            self._advance_schedule()
            return None, None
        if self.cfg.grad_clip is not None and math.isfinite(norm):
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)  # with fp16, skips the update when the scaled gradients overflowed
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < MIN_GRAD_SCALE:
            # The scaler halves its scale at every overflow: this low, the gradients overflow at any scale.
            return "persistent fp16 gradient overflow (scale collapsed)", None
        self._advance_schedule()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.tracker.stepped()
        info["spike"] = self.tracker.observe_loss(loss_value)
        return None, info
