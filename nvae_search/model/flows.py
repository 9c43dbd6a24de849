"""Shift-only autoregressive flow cells on the latents (NVAE_SPEC §2.6).

Each cell computes z' = z − μ(z) with μ strictly autoregressive in raster order (pixel-major,
channel-minor), so the log-determinant is zero. ``mirror`` reverses the spatial order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WN_EPS = 1e-5


def _channel_mask(c_in: int, c_out: int, groups: int, zero_diag: bool) -> torch.Tensor:
    """Which input channels each output channel may see at the centre tap."""
    if groups == c_in == c_out:  # depthwise: a channel sees only itself
        return torch.full((c_out, 1), 0.0 if zero_diag else 1.0, device="cpu")
    if groups != 1:
        raise ValueError("masked convs support groups=1 or depthwise only")
    out_idx = torch.arange(c_out, device="cpu").view(-1, 1)
    in_idx = torch.arange(c_in, device="cpu").view(1, -1)
    if c_out >= c_in:
        if c_out % c_in:
            raise ValueError(f"c_out ({c_out}) must be a multiple of c_in ({c_in})")
        block = out_idx // (c_out // c_in)  # the input channel an output block belongs to
        allowed = in_idx < block if zero_diag else in_idx <= block
    else:
        if c_in % c_out:
            raise ValueError(f"c_in ({c_in}) must be a multiple of c_out ({c_out})")
        block = in_idx // (c_in // c_out)
        allowed = block < out_idx if zero_diag else block <= out_idx
    return allowed.float()


def autoregressive_mask(c_in: int, c_out: int, kernel: int, groups: int, zero_diag: bool, mirror: bool) -> torch.Tensor:
    """On the CPU whatever the default device (the caller moves it): on the meta device, where the memory
    prediction builds the network, each of these small ops would cost a Python meta kernel."""
    mask = torch.zeros(c_out, c_in // groups, kernel, kernel, device="cpu")
    centre = kernel // 2
    mask[:, :, :centre, :] = 1.0  # rows above
    mask[:, :, centre, :centre] = 1.0  # left half of the centre row
    mask[:, :, centre, centre] = _channel_mask(c_in, c_out, groups, zero_diag)
    if mirror:
        mask = torch.flip(mask, dims=(2, 3))
    return mask


class ARConv2d(nn.Conv2d):
    """Masked conv with weight normalisation applied to the masked weight."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        padding: int,
        groups: int = 1,
        bias: bool = False,
        zero_diag: bool = False,
        mirror: bool = False,
        weight_init_coeff: float = 1.0,
    ) -> None:
        super().__init__(c_in, c_out, kernel, 1, padding, 1, groups, bias)
        self.register_buffer(
            "mask",
            autoregressive_mask(c_in, c_out, kernel, groups, zero_diag, mirror).to(self.weight.device),
            persistent=False,
        )
        init = (self.weight.detach() * self.mask).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        # The official gain: log(‖W⊙M‖ + 0.01) + log(coeff), i.e. the coefficient scales the +0.01 as well.
        self.log_weight_norm = nn.Parameter(torch.log(init + 1e-2) + math.log(weight_init_coeff))
        self.cache_weight = True
        self.weight_cache: tuple[torch.Tensor, int] | None = None

    def normalized_weight(self) -> torch.Tensor:
        masked = self.weight * self.mask
        norm = masked.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return torch.exp(self.log_weight_norm) * masked / (norm + WN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.normalized_weight()
        if self.cache_weight and self.training and torch.is_grad_enabled():
            self.weight_cache = (weight, self.weight._version)  # reused by the spectral regulariser
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ARCell(nn.Module):
    """μ(z) from a masked inverted residual (3×3 expand ×6, depthwise 5×5), then z − μ."""

    def __init__(self, num_z: int, mirror: bool, expansion: int = 6, kernel: int = 5) -> None:
        super().__init__()
        hidden = num_z * expansion
        self.expand = ARConv2d(num_z, hidden, 3, 1, zero_diag=True, mirror=mirror)
        self.depthwise = ARConv2d(hidden, hidden, kernel, kernel // 2, groups=hidden, mirror=mirror)
        self.mu = ARConv2d(hidden, num_z, 1, 0, bias=True, mirror=mirror, weight_init_coeff=0.1)

    def shift(self, z: torch.Tensor) -> torch.Tensor:
        h = F.elu(self.depthwise(F.elu(self.expand(z))))
        return self.mu(F.elu(h))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.shift(z)


class PairedARCell(nn.Module):
    """One cell in raster order and one in reverse raster order. Volume preserving: log det = 0."""

    def __init__(self, num_z: int) -> None:
        super().__init__()
        self.forward_cell = ARCell(num_z, mirror=False)
        self.mirror_cell = ARCell(num_z, mirror=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mirror_cell(self.forward_cell(z))
