"""Residual cells and the combiner cells that join encoder, decoder and latents (NVAE_SPEC §2.1-2.2)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .ops import Conv2D, FactorizedReduce, NormSpec, OpSpec, SqueezeExcite, UpSkip, frozen_running_stats, make_op

RESIDUAL_SCALE = 0.1


def _recompute_context(cell: nn.Module) -> tuple[object, object]:
    """Checkpoint contexts: nothing special in the forward pass; BN statistics are put back after the recompute."""
    return contextlib.nullcontext(), frozen_running_stats(cell)


class Cell(nn.Module):
    """``skip(x) + 0.1·SE(ops(x))``; op 0 carries the stride (1, 2 = down, -1 = up) and the width change."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        ops: Sequence[OpSpec],
        use_se: bool,
        norm: NormSpec,
        role: str,
    ) -> None:
        super().__init__()
        self.role = role
        self.checkpointing = False
        if stride == 1:
            if c_in != c_out:
                raise ValueError(f"a stride-1 cell keeps its width, got {c_in} → {c_out}")
            self.skip: nn.Module = nn.Identity()
        elif stride == 2:
            self.skip = FactorizedReduce(c_in, c_out, norm)
        elif stride == -1:
            self.skip = UpSkip(c_in, c_out, norm)
        else:
            raise ValueError(f"stride must be 1, 2 or -1, got {stride}")
        self.ops = nn.Sequential(
            *(
                make_op(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, spec, norm)
                for i, spec in enumerate(ops)
            )
        )
        self.se = SqueezeExcite(c_out) if use_se else None

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ops(x)
        if self.se is not None:
            out = self.se(out)
        return torch.add(self.skip(x), out, alpha=RESIDUAL_SCALE)  # one pass over the activations, not two

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                self._residual, x, use_reentrant=False, context_fn=functools.partial(_recompute_context, self)
            )
        return self._residual(x)


class EncCombiner(nn.Module):
    """Posterior features: encoder feature + 1×1 conv of the decoder state."""

    def __init__(self, c_enc: int, c_dec: int, norm: NormSpec) -> None:
        super().__init__()
        self.conv = Conv2D(c_dec, c_enc, 1, bias=True, weight_norm=norm.weight_norm)

    def forward(self, enc_feature: torch.Tensor, dec_state: torch.Tensor) -> torch.Tensor:
        return enc_feature + self.conv(dec_state)


class DecCombiner(nn.Module):
    """New decoder state: 1×1 conv of [state, z]."""

    def __init__(self, c_dec: int, c_z: int, norm: NormSpec) -> None:
        super().__init__()
        self.conv = Conv2D(c_dec + c_z, c_dec, 1, bias=True, weight_norm=norm.weight_norm)

    def forward(self, state: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([state, z], dim=1))
