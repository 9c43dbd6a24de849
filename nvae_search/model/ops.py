"""Convolutions, normalisation and the cell ops of NVAE (NVAE_SPEC §2.2-2.3).

Every module here takes plain arguments; none of them knows about the recipe schema.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

WN_EPS = 1e-5
CHANNELS_LAST_MIN_SIDE = 8  # below this feature-map side NHWC brings nothing on CPU (measured, see README)


@dataclass(frozen=True)
class NormSpec:
    """Normalisation settings shared by every layer of one network."""

    bn_momentum: float = 0.05
    bn_eps: float = 1e-5
    weight_norm: bool = True


@dataclass(frozen=True)
class OpSpec:
    """One op of a cell. ``kind`` is a key of :data:`OP_TABLE`; ``batch_norm`` and ``data_init`` are read by
    ``act_conv``, ``expansion`` and ``groups`` by ``inverted_residual``."""

    kind: str
    kernel: int = 3
    dilation: int = 1
    expansion: float = 1.0
    groups: int = 0
    activation: str = "swish"
    batch_norm: bool = True
    data_init: bool = False


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "swish": F.silu,
    "elu": F.elu,
    "relu": F.relu,
}

# Gradient checkpointing re-runs a cell's forward during backward; batch norm must not update its running statistics
# a second time then. The guard works on any torch batch-norm class (the project's, nn.BatchNorm2d, and the
# nn.SyncBatchNorm that convert_sync_batchnorm swaps in for multi-GPU training), so it keys on _BatchNorm.
BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


def is_batch_norm(module: nn.Module) -> bool:
    """Any torch batch norm (BatchNorm1d/2d/3d, SyncBatchNorm, subclasses)."""
    return isinstance(module, BATCH_NORM_TYPES)


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Runs the body, then puts back the running statistics of every batch norm inside ``module``.

    The recompute uses the real buffers (so it saves the same tensors as the first forward, which
    torch.utils.checkpoint checks) and the values it wrote are undone afterwards.
    """
    saved = [
        (bn, [buf.detach().clone() for buf in (bn.running_mean, bn.running_var, bn.num_batches_tracked)])
        for bn in module.modules()
        if is_batch_norm(bn)
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_batches_tracked is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, (mean, var, tracked) in saved:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(tracked)


class BatchNorm(nn.BatchNorm2d):
    """The network's batch norm (a plain BatchNorm2d; its own class so that counts and tests can find it)."""


def batch_norm(channels: int, norm: NormSpec) -> BatchNorm:
    return BatchNorm(channels, eps=norm.bn_eps, momentum=norm.bn_momentum)


class Conv2D(nn.Conv2d):
    """Conv with optional weight normalisation w = exp(g)·W/‖W‖ and optional data-dependent init."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        weight_norm: bool = True,
        data_init: bool = False,
    ) -> None:
        super().__init__(c_in, c_out, kernel, stride, padding, dilation, groups, bias)
        self.weight_norm = weight_norm
        if weight_norm:
            init = self.weight.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            self.log_weight_norm = nn.Parameter(torch.log(init + 1e-2))
        # A buffer, so that a checkpoint remembers whether the init already happened.
        self.register_buffer("needs_data_init", torch.tensor(bool(data_init)), persistent=True)
        # The spectral regulariser reuses the weight of this step's forward pass (as the official code does)
        # instead of normalising every weight a second time; off inside checkpointed cells.
        self.cache_weight = True
        self.weight_cache: tuple[torch.Tensor, int] | None = None

    def normalized_weight(self) -> torch.Tensor:
        if not self.weight_norm:
            return self.weight
        norm = self.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return torch.exp(self.log_weight_norm) * self.weight / (norm + WN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and bool(self.needs_data_init):
            self._data_dependent_init(x)
        weight = self.normalized_weight()
        if self.cache_weight and self.training and torch.is_grad_enabled():
            self.weight_cache = (weight, self.weight._version)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def _data_dependent_init(self, x: torch.Tensor) -> None:
        """Scale (and shift) the first batch's outputs to zero mean and std 1/5, as the official ELU cells do."""
        weight = self.weight / (self.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + WN_EPS)
        out = F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
        # Statistics over the global batch (sums all-reduced across data-parallel ranks), so that a DDP run
        # initialises exactly like one process with the whole batch. (The official code averages per-GPU stds.)
        flat = out.transpose(0, 1).flatten(1).double()
        stats = torch.stack([flat.sum(dim=1), (flat * flat).sum(dim=1), torch.full_like(flat[:, 0], flat.shape[1])])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        total, squares, count = stats
        mean = total / count
        std = 5 * torch.sqrt(((squares - count * mean * mean) / (count - 1)).clamp(min=0))
        mean, std = mean.to(out.dtype), std.to(out.dtype)
        if self.bias is not None:
            self.bias.copy_(-mean / (std + WN_EPS))
        if self.weight_norm:
            self.log_weight_norm.copy_(-torch.log(std.view(-1, 1, 1, 1) + WN_EPS))
        self.needs_data_init.fill_(False)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


def _upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class ActConv(nn.Module):
    """[BN →] activation → [nearest ×2 up] → conv: the ``res_*`` ops."""

    def __init__(self, c_in: int, c_out: int, stride: int, spec: OpSpec, norm: NormSpec) -> None:
        super().__init__()
        self.upsample = stride == -1
        self.bn = batch_norm(c_in, norm) if spec.batch_norm else None
        self.activation = ACTIVATIONS[spec.activation]
        padding = spec.dilation * (spec.kernel - 1) // 2
        self.conv = Conv2D(
            c_in,
            c_out,
            spec.kernel,
            stride=abs(stride),
            padding=padding,
            dilation=spec.dilation,
            bias=True,
            weight_norm=norm.weight_norm,
            data_init=spec.data_init,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            x = self.bn(x)
        x = self.activation(x)
        if self.upsample:
            x = _upsample_nearest(x)
        return self.conv(x)


class ConvBNAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, groups: int, act: str, norm: NormSpec) -> None:
        super().__init__(
            Conv2D(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False, weight_norm=False),
            batch_norm(c_out, norm),
            _Activation(act),
        )


class _Activation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.name](x)


class InvertedResidual(nn.Module):
    """MBConv without an inner residual (the cell supplies it); its convs are not weight-normed."""

    def __init__(self, c_in: int, c_out: int, stride: int, spec: OpSpec, norm: NormSpec) -> None:
        super().__init__()
        hidden = round(c_in * spec.expansion)
        groups = hidden if spec.groups == 0 else spec.groups
        self.upsample = stride == -1
        self.layers = nn.Sequential(
            batch_norm(c_in, norm),
            ConvBNAct(c_in, hidden, 1, 1, 1, spec.activation, norm),
            ConvBNAct(hidden, hidden, spec.kernel, abs(stride), groups, spec.activation, norm),
            Conv2D(hidden, c_out, 1, bias=False, weight_norm=False),
            batch_norm(c_out, norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = _upsample_nearest(x)
        run = self.layers if self.training else self._folded
        if x.device.type == "cpu" and x.shape[-1] >= CHANNELS_LAST_MIN_SIDE:
            # oneDNN's depthwise conv (above all its backward) is ~2x faster in NHWC on CPU; the residual ops are
            # not, so only this block switches layout, and hands back the usual NCHW.
            return run(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return run(x)

    def _folded(self, x: torch.Tensor) -> torch.Tensor:
        """Eval mode: each BN is an affine map beside a convolution (the first one feeds a 1×1 conv), so it is
        folded into that convolution's weight and bias. The same function up to rounding, with four fewer passes
        over the activations: evaluation with many importance samples is mostly such passes."""
        bn_in, expand, spatial, project, bn_out = self.layers
        w1, b1 = _fold_bn_after(expand[0].normalized_weight(), expand[1])
        scale_in, shift_in = _bn_affine(bn_in)
        b1 = b1 + w1.flatten(1) @ shift_in
        w1 = w1 * scale_in.view(1, -1, 1, 1)
        x = expand[2](F.conv2d(x, w1, b1))
        conv = spatial[0]
        w2, b2 = _fold_bn_after(conv.normalized_weight(), spatial[1])
        x = spatial[2](F.conv2d(x, w2, b2, conv.stride, conv.padding, conv.dilation, conv.groups))
        w3, b3 = _fold_bn_after(project.normalized_weight(), bn_out)
        return F.conv2d(x, w3, b3)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = scale·x + shift per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)  # type: ignore[operator]
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale  # type: ignore[operator]
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _fold_bn_after(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of conv-then-BN (a bias-free conv) as one conv."""
    scale, shift = _bn_affine(bn)
    return weight * scale.view(-1, 1, 1, 1), shift


OpFactory = Callable[[int, int, int, OpSpec, NormSpec], nn.Module]

# An op kind (of the op table in ``schema/ops.py``, which the builder reads) to the module that implements it.
OP_TABLE: dict[str, OpFactory] = {
    "act_conv": ActConv,
    "inverted_residual": InvertedResidual,
}


def make_op(c_in: int, c_out: int, stride: int, spec: OpSpec, norm: NormSpec) -> nn.Module:
    if spec.kind not in OP_TABLE:
        raise KeyError(f"unknown op {spec.kind!r}; known: {sorted(OP_TABLE)}")
    return OP_TABLE[spec.kind](c_in, c_out, stride, spec, norm)


class FactorizedReduce(nn.Module):
    """Stride-2 skip path: Swish, then four 1×1 stride-2 convs on shifted copies, concatenated."""

    def __init__(self, c_in: int, c_out: int, norm: NormSpec) -> None:
        super().__init__()
        quarter = c_out // 4
        widths = [quarter, quarter, quarter, c_out - 3 * quarter]
        self.convs = nn.ModuleList(
            Conv2D(c_in, w, 1, stride=2, bias=True, weight_norm=norm.weight_norm) for w in widths
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(x)
        shifted = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat([conv(t) for conv, t in zip(self.convs, shifted, strict=True)], dim=1)


class UpSkip(nn.Module):
    """Upsampling skip path: bilinear ×2 (corners aligned), then a 1×1 conv to the new width."""

    def __init__(self, c_in: int, c_out: int, norm: NormSpec) -> None:
        super().__init__()
        self.conv = Conv2D(c_in, c_out, 1, weight_norm=norm.weight_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))
