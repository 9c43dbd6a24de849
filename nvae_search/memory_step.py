"""One training step as the trainer takes it, on fake or real tensors alike: what the memory prediction simulates
(:mod:`nvae_search.memory`), ``profile`` measures and ``bench gpu`` times. Split into the forward and backward
pass and the optimizer phase, which the prediction simulates once per recipe."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .memory_tracking import ShapeCache, StorageTracker
from .model.builder import build_model
from .objectives import SpectralRegularizer, balanced_kl, bn_regularization, kl_balance_alpha
from .schema import Recipe
from .telemetry import gradient_norm
from .training.step import gradient_scaler as trainer_scaler

Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def gradient_scaler(precision: str, device: str) -> torch.amp.GradScaler | None:
    """fp16's gradient scaler as the trainer makes it; None in the other precisions."""
    return trainer_scaler(precision, device) if precision == "fp16" else None


@dataclass
class StepParts:
    """What one training step touches; built on fake or real tensors alike."""

    model: nn.Module
    spectral: SpectralRegularizer
    optimizer: torch.optim.Optimizer
    alpha: torch.Tensor | None
    x: torch.Tensor
    recipe: Recipe
    autocast_dtype: torch.dtype | None


def build_step_parts(
    recipe: Recipe, batch: int, precision: Precision, checkpointing: bool, foreach: bool, device: str = "cpu"
) -> StepParts:
    """Model, regulariser and optimizer as the trainer makes them, and one input batch of the recipe's shape."""
    # Built under the device as default device, not moved: moving fake parameters fails (they cannot be swapped).
    with torch.device(device) if device != "cpu" else contextlib.nullcontext():
        return _build_step_parts(recipe, batch, precision, checkpointing, foreach, device)


def _build_step_parts(
    recipe: Recipe, batch: int, precision: Precision, checkpointing: bool, foreach: bool, device: str
) -> StepParts:
    cfg = recipe.model
    model = build_model(cfg).train()
    model.set_checkpointing(checkpointing)
    spectral = SpectralRegularizer(model, cfg.loss.spectral_power_iters)
    optimizer = torch.optim.Adamax(
        model.parameters(),
        lr=recipe.train.learning_rate,
        eps=recipe.train.adamax_eps,
        weight_decay=recipe.train.weight_decay,
        foreach=foreach,
    )
    alpha = kl_balance_alpha(list(reversed(cfg.groups_per_scale())), cfg.loss.kl_balance_rule)
    x = torch.rand(batch, cfg.input_channels, cfg.resolution, cfg.resolution, device=device)
    return StepParts(
        model, spectral, optimizer, alpha if cfg.loss.kl_balance else None, x, recipe, AUTOCAST_DTYPES.get(precision)
    )


def on_fake_tensors(
    parts: StepParts, make_fake: Callable[[torch.Tensor, torch.device], torch.Tensor], device: str
) -> StepParts:
    """Parts built on the meta device (:func:`build_step_parts` with ``device="meta"``: shapes only, torch's own meta
    kernels, no dispatch in Python) with every parameter, buffer and the input turned into fake tensors on ``device``
    by ``make_fake`` (``FakeTensor(fake_mode, meta, device)`` or its equivalent), sharing their meta storages: what
    building under the fake mode would give, at a fraction of the cost. The optimizer is made again over the fake
    parameters; its state stays on meta (it takes part in no op of the simulated step, only in the count of live
    bytes)."""
    target = torch.device(device)
    made: dict[int, torch.Tensor] = {}
    originals: list[torch.Tensor] = []  # alive until the end, so no id is reused by a new tensor

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            originals.append(t)
            made[id(t)] = make_fake(t.detach(), target)
        return made[id(t)]

    def parameter(p: torch.Tensor) -> torch.Tensor:
        if id(p) not in made:
            originals.append(p)
            made[id(p)] = nn.Parameter(fake(p.detach()), requires_grad=p.requires_grad)
        return made[id(p)]

    meta_params = list(parts.model.parameters())
    for module in (*parts.model.modules(), *parts.spectral.modules()):
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = parameter(p)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = fake(b)
    old = parts.optimizer
    parts.optimizer = type(old)(parts.model.parameters(), **old.defaults)
    for meta_p, fake_p in zip(meta_params, parts.model.parameters(), strict=True):
        if meta_p in old.state:
            parts.optimizer.state[fake_p] = old.state[meta_p]
    parts.alpha = fake(parts.alpha) if parts.alpha is not None else None
    parts.x = fake(parts.x)
    return parts


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Adamax allocates its state at the first step: make it exist, as in every step after the first."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def zero_adamax_state(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Adamax's state as its first step makes it (step count, first moment, infinity norm), without the step: the
    predictor then measures a steady step, and saves simulating the first one (thousands of new fake ops)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.zeros(()),  # as torch.tensor(0.0), without a real tensor made fake
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_inf": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
    return optimizer


def training_step(parts: StepParts, scaler: torch.amp.GradScaler | None = None) -> None:
    """The trainer's step with the warm-up's extras on (KL balancing, λ-weighted spectral and BN terms).

    ``scaler``: fp16's gradient scaler, as the trainer uses it (the prediction leaves it out: it scales in place).
    """
    held = forward_backward(parts, scaler)
    optimizer_phase(parts, scaler)
    del held


def forward_backward(parts: StepParts, scaler: torch.amp.GradScaler | None = None) -> tuple[Any, ...]:
    """Forward, loss and backward of :func:`training_step`; returns what the trainer's step still holds while the
    optimizer runs (the model's outputs and the loss), for the caller to keep alive until then."""
    loss_cfg = parts.recipe.model.loss
    model = parts.model
    parts.optimizer.zero_grad(set_to_none=True)
    autocast = (
        torch.autocast(parts.x.device.type, dtype=parts.autocast_dtype)
        if parts.autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        result = model(parts.x)
        recon = model.reconstruction_loss(result.output, parts.x)
        kl_term, kl_coeffs = balanced_kl(result.kl, 0.5, parts.alpha)
        loss = (recon + kl_term).mean()
        if loss_cfg.spectral_coeff > 0:
            loss = loss + loss_cfg.spectral_coeff * parts.spectral()
            if loss_cfg.bn_regularization:
                loss = loss + loss_cfg.spectral_coeff * bn_regularization(model).to(loss.device)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(parts.optimizer)
    return result, recon, kl_term, kl_coeffs, loss


def optimizer_phase(parts: StepParts, scaler: torch.amp.GradScaler | None = None) -> None:
    """The rest of :func:`training_step`: the gradient norm and the Adamax update."""
    update(list(parts.model.parameters()), parts.optimizer, scaler)


def update(
    parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None
) -> None:
    """The optimizer phase on any parameters (the predictor's meta copies too): gradient norm, then the step."""
    gradient_norm([p for p in parameters if p.grad is not None])
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def state_tensors(optimizer: torch.optim.Optimizer, device: str = "cpu") -> Iterator[torch.Tensor]:
    """The optimizer's state in ``device``'s memory: on the CPU all of it; on CUDA torch keeps each parameter's step
    count on the host unless the optimizer is ``capturable`` (the trainer's Adamax is not)."""
    host_steps = device == "cuda" and not any(group.get("capturable") for group in optimizer.param_groups)
    for state in optimizer.state.values():
        yield from (v for key, v in state.items() if isinstance(v, torch.Tensor) and not (host_steps and key == "step"))


def optimizer_phase_bytes(
    params: list[torch.Tensor],
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    shapes: ShapeCache | None,
    block_bytes: int,
) -> int:
    """Bytes the gradient norm and the Adamax update allocate above what is live when they start.

    They see only parameters, gradients and optimizer state, whose shapes no batch size, precision or checkpointing
    changes: the predictor simulates them once and adds them to every prediction's live bytes after the backward pass
    (a third of a simulated step's ops are the multi-tensor Adamax's, on every parameter). On plain meta tensors,
    where the fake mode's answer is the meta kernel's anyway, ``shapes`` is a memo of their own
    (:class:`~nvae_search.memory_tracking.MetaShapeCache`: each multi-tensor op runs once per distinct parameter shape).
    """
    optimizer = make_optimizer(params)
    tracker = StorageTracker(block_bytes, shapes)
    for p in params:
        p.grad = torch.zeros_like(p)
        tracker.track(p.grad, "grads")
    for t in (*params, *state_tensors(optimizer)):
        tracker.track(t, "params")
    start = tracker.current
    tracker.reset_peak()
    try:
        with tracker:
            update(params, optimizer)
    finally:
        optimizer.zero_grad(set_to_none=True)
    return tracker.peak - start
