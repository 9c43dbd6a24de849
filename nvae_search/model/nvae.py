"""The hierarchical VAE: stem, pre-process, encoder tower, latent groups, decoder tower, post-process.

Built from plain arguments (see :class:`NVAEArch`); ``builder.py`` translates a recipe into them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .cells import Cell, DecCombiner, EncCombiner
from .distributions import LatentNormal, OutputDistribution, make_output, output_channels
from .flows import PairedARCell
from .ops import Conv2D, NormSpec, OpSpec, is_batch_norm


@dataclass(frozen=True)
class NVAEArch:
    """Every number that shapes the network. Widths are per resolution level, finest first."""

    resolution: int
    input_channels: int
    widths_enc: tuple[int, ...]
    widths_dec: tuple[int, ...]
    num_preprocess_blocks: int
    num_preprocess_cells: int
    num_postprocess_blocks: int
    num_postprocess_cells: int
    groups_per_scale: tuple[int, ...]  # encoder order: finest scale first
    latent_per_group: int
    cells_per_cond_enc: int
    cells_per_cond_dec: int
    ops: Mapping[str, tuple[OpSpec, ...]]
    use_se: bool = True
    res_dist: bool = True
    num_flows: int = 0
    norm: NormSpec = field(default_factory=NormSpec)
    output: str = "bernoulli"
    num_mixtures: int = 10
    num_bits: int = 8
    crop: int = 0

    @property
    def num_latent_scales(self) -> int:
        return len(self.groups_per_scale)

    @property
    def vanilla(self) -> bool:
        return self.num_latent_scales == 1 and self.groups_per_scale[0] == 1


@dataclass
class ForwardResult:
    """What training and evaluation need from one pass. Group lists are in decoder order (top first)."""

    output: OutputDistribution
    kl: list[torch.Tensor]  # per group, shape (B,)
    kl_per_channel: list[torch.Tensor]  # per group, shape (C,): batch mean of the spatially summed KL
    log_q: torch.Tensor  # (B,) summed over all groups
    log_p: torch.Tensor  # (B,)


class NVAE(nn.Module):
    def __init__(self, arch: NVAEArch) -> None:
        super().__init__()
        self.arch = arch
        a, norm = arch, arch.norm
        p, scales = a.num_preprocess_blocks, a.num_latent_scales
        enc, dec = a.widths_enc, a.widths_dec
        self.stem = Conv2D(a.input_channels, enc[0], 3, padding=1, bias=True, weight_norm=norm.weight_norm)
        self.pre_process = nn.ModuleList(_stage_cells(self._cell, enc, 0, p, a.num_preprocess_cells, "pre"))
        self.enc_tower, self.enc_combiners = self._build_encoder()
        top = enc[p + scales - 1]
        self.enc0 = nn.Sequential(nn.ELU(), Conv2D(top, top, 1, bias=True, weight_norm=norm.weight_norm), nn.ELU())
        self.enc_sampler, self.dec_sampler, self.flows = self._build_samplers()
        self.dec_tower, self.dec_combiners = self._build_decoder()
        top_dec = dec[p + scales - 1]
        side = a.resolution // 2 ** (p + scales - 1)
        if a.vanilla:
            self.stem_decoder = Conv2D(a.latent_per_group, top_dec, 1, bias=True, weight_norm=norm.weight_norm)
        else:
            self.prior_ftr0 = nn.Parameter(torch.rand(top_dec, side, side))
        self.post_process = nn.ModuleList(_post_cells(self._cell, a))
        out_c = output_channels(a.output, a.input_channels, a.num_mixtures)
        self.image_conditional = nn.Sequential(
            nn.ELU(), Conv2D(dec[0], out_c, 3, padding=1, bias=True, weight_norm=norm.weight_norm)
        )
        self.z0_shape = (a.latent_per_group, side, side)

    # ------------------------------------------------------------------------------------ building
    def _cell(self, c_in: int, c_out: int, stride: int, role: str) -> Cell:
        return Cell(c_in, c_out, stride, self.arch.ops[role], self.arch.use_se, self.arch.norm, role)

    def _build_encoder(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        """Encoder cells per group; a combiner follows each group except the very last (the top one)."""
        a, p = self.arch, self.arch.num_preprocess_blocks
        tower: list[nn.Module] = []
        combiners: list[nn.Module] = []
        if a.vanilla:  # one scale, one group: the official builds no encoder tower (z comes from the pre-process)
            return nn.ModuleList(), nn.ModuleList()
        for s, groups in enumerate(a.groups_per_scale):
            c_enc, c_dec = a.widths_enc[p + s], a.widths_dec[p + s]
            for g in range(groups):
                stage = nn.Sequential(*(self._cell(c_enc, c_enc, 1, "normal_enc") for _ in range(a.cells_per_cond_enc)))
                tower.append(stage)
                if not (s == a.num_latent_scales - 1 and g == groups - 1):
                    combiners.append(EncCombiner(c_enc, c_dec, a.norm))
            if s < a.num_latent_scales - 1:
                tower.append(self._cell(c_enc, a.widths_enc[p + s + 1], 2, "down_enc"))
        combiners.reverse()  # the decoder consumes them top first
        return nn.ModuleList(tower), nn.ModuleList(combiners)

    def _decoder_scales(self) -> list[tuple[int, int, int]]:
        """(scale index from the top, groups, resolution level) in decoder order."""
        a, p = self.arch, self.arch.num_preprocess_blocks
        n = a.num_latent_scales
        return [(s, a.groups_per_scale[n - 1 - s], p + n - 1 - s) for s in range(n)]

    def _build_samplers(self) -> tuple[nn.ModuleList, nn.ModuleList, nn.ModuleList]:
        a = self.arch
        z2 = 2 * a.latent_per_group
        enc_sampler, dec_sampler, flows = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s, groups, level in self._decoder_scales():
            for g in range(groups):
                enc_sampler.append(
                    Conv2D(a.widths_enc[level], z2, 3, padding=1, bias=True, weight_norm=a.norm.weight_norm)
                )
                flows.append(nn.Sequential(*(PairedARCell(a.latent_per_group) for _ in range(a.num_flows))))
                if not (s == 0 and g == 0):
                    conv = Conv2D(a.widths_dec[level], z2, 1, bias=True, weight_norm=a.norm.weight_norm)
                    dec_sampler.append(nn.Sequential(nn.ELU(), conv))
        return enc_sampler, dec_sampler, flows

    def _build_decoder(self) -> tuple[nn.ModuleList, nn.ModuleList]:
        """Decoder cells before each group (none before the first), a combiner per group, up cells between scales."""
        a = self.arch
        tower: list[nn.Module] = []
        combiners: list[nn.Module] = []
        if a.vanilla:
            return nn.ModuleList(), nn.ModuleList()
        for s, groups, level in self._decoder_scales():
            c = a.widths_dec[level]
            for g in range(groups):
                count = 0 if (s == 0 and g == 0) else a.cells_per_cond_dec
                tower.append(nn.Sequential(*(self._cell(c, c, 1, "normal_dec") for _ in range(count))))
                combiners.append(DecCombiner(c, a.latent_per_group, a.norm))
            if s < a.num_latent_scales - 1:
                tower.append(self._cell(c, a.widths_dec[level - 1], -1, "up_dec"))
        return nn.ModuleList(tower), nn.ModuleList(combiners)

    # ------------------------------------------------------------------------------------- running
    def set_checkpointing(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, Cell):
                module.checkpointing = enabled
                for conv in module.modules():
                    if isinstance(conv, Conv2D):
                        conv.cache_weight = not enabled  # a cached weight would pin the checkpointed graph

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottom-up pass. Returns the top feature and the features stored for each combiner, top first."""
        s = self.stem(2 * x - 1.0)
        for cell in self.pre_process:
            s = cell(s)
        stored: list[torch.Tensor] = []
        groups_left = list(self.arch.groups_per_scale)
        scale = 0
        for module in self.enc_tower:
            if isinstance(module, Cell) and module.role == "down_enc":
                s = module(s)
                scale += 1
                continue
            s = module(s)
            groups_left[scale] -= 1
            is_top = scale == self.arch.num_latent_scales - 1 and groups_left[scale] == 0
            if not is_top:
                stored.append(s)
        stored.reverse()
        return s, stored

    def _initial_state(self, batch: int) -> torch.Tensor:
        return self.prior_ftr0.unsqueeze(0).expand(batch, -1, -1, -1)

    def _iter_decoder(self):  # type: ignore[no-untyped-def]
        """Yields ("cells", module) for decoder cell stacks/up cells and ("group", index) at each latent group."""
        group = 0
        for module in self.dec_tower:
            yield "cells", module
            if not isinstance(module, Cell):  # a group's cell stack is followed by its latent group
                yield "group", group
                group += 1

    def forward(self, x: torch.Tensor, samples: int = 1) -> ForwardResult:
        """One posterior sample per image, or ``samples`` per image (sample-major: row ``k·B + i`` is sample k of
        image i, like ``x.repeat(samples, 1, 1, 1)``). The bottom-up pass does not depend on the sample, so it runs
        once and its features are tiled: K importance samples cost one encoder pass and K decoder passes."""
        top_feature, stored = self.encode(x)
        if samples > 1:
            top_feature = top_feature.repeat(samples, 1, 1, 1)
            stored = [t.repeat(samples, 1, 1, 1) for t in stored]
        ftr = self.enc0(top_feature)
        mu_q, log_sigma_q = self.enc_sampler[0](ftr).float().chunk(2, dim=1)
        q = LatentNormal(mu_q, log_sigma_q)
        z = q.sample()
        log_q_terms = [q.log_prob(z)]
        z = self.flows[0](z)
        prior = LatentNormal.standard(z)
        log_p_terms = [prior.log_prob(z)]
        qs, ps = [q], [prior]
        if self.arch.vanilla:
            s = self.stem_decoder(z)
        else:
            s = self._initial_state(top_feature.shape[0])
            for kind, item in self._iter_decoder():
                if kind == "cells":
                    s = item(s)
                    continue
                g = item
                if g > 0:
                    mu_p, log_sigma_p = self.dec_sampler[g - 1](s).float().chunk(2, dim=1)
                    feature = self.enc_combiners[g - 1](stored[g - 1], s)
                    d_mu, d_log_sigma = self.enc_sampler[g](feature).float().chunk(2, dim=1)
                    if self.arch.res_dist:
                        q = LatentNormal(mu_p + d_mu, log_sigma_p + d_log_sigma)
                    else:
                        q = LatentNormal(d_mu, d_log_sigma)
                    z = q.sample()
                    log_q_terms.append(q.log_prob(z))
                    z = self.flows[g](z)
                    prior = LatentNormal(mu_p, log_sigma_p)
                    log_p_terms.append(prior.log_prob(z))
                    qs.append(q)
                    ps.append(prior)
                s = self.dec_combiners[g](s, z)
        for cell in self.post_process:
            s = cell(s)
        # Latent and output parameters are kept in fp32 under autocast: log-densities need the precision.
        output = self.make_output(self.image_conditional(s).float())
        with_flows = self.arch.num_flows > 0
        kl_maps = [
            lq - lp if with_flows else q_.kl(p_)
            for q_, p_, lq, lp in zip(qs, ps, log_q_terms, log_p_terms, strict=True)
        ]
        return ForwardResult(
            output=output,
            kl=[k.sum(dim=(1, 2, 3)) for k in kl_maps],
            kl_per_channel=[k.sum(dim=(2, 3)).mean(dim=0) for k in kl_maps],
            log_q=sum(t.sum(dim=(1, 2, 3)) for t in log_q_terms),  # type: ignore[arg-type]
            log_p=sum(t.sum(dim=(1, 2, 3)) for t in log_p_terms),  # type: ignore[arg-type]
        )

    def make_output(self, params: torch.Tensor) -> OutputDistribution:
        return make_output(self.arch.output, params, self.arch.num_mixtures, self.arch.num_bits)

    def reconstruction_loss(self, output: OutputDistribution, x: torch.Tensor) -> torch.Tensor:
        """−log p(x|z) per image, summed over the (cropped) pixels and channels."""
        c = self.arch.crop
        cropped = output.crop(c)
        target = x[:, :, c:-c, c:-c] if c else x
        log_prob = cropped.log_prob(target)
        dims = tuple(range(1, log_prob.dim()))
        return -log_prob.sum(dim=dims)

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, device: torch.device | None = None, *, pixel_temperature: float = 1.0
    ) -> torch.Tensor:
        """Draw n images at temperature t (prior σ scaled by t), returned in [0, 1].

        Pixels are drawn from the output distribution at ``pixel_temperature``: 1 by default, as the paper's
        sampling script does; pass t to also scale the pixel-level mixture logits and noise.
        """
        return self.sample_output(n, temperature, device).mean_or_sample(pixel_temperature)  # type: ignore[attr-defined]

    def sample_output(self, n: int, temperature: float = 1.0, device: torch.device | None = None) -> _Sampled:
        device = device or next(self.parameters()).device
        z = LatentNormal.standard(torch.empty(n, *self.z0_shape, device=device), temperature).sample()
        if self.arch.vanilla:
            s = self.stem_decoder(z)
        else:
            s = self._initial_state(n)
            for kind, item in self._iter_decoder():
                if kind == "cells":
                    s = item(s)
                    continue
                if item > 0:
                    mu, log_sigma = self.dec_sampler[item - 1](s).float().chunk(2, dim=1)
                    z = LatentNormal(mu, log_sigma, temperature).sample()
                s = self.dec_combiners[item](s, z)
        for cell in self.post_process:
            s = cell(s)
        return _Sampled(self.make_output(self.image_conditional(s).float()), self.arch.output)

    def conv_layers(self) -> list[nn.Conv2d]:
        return [m for m in self.modules() if isinstance(m, nn.Conv2d)]

    def batch_norms(self) -> list[nn.Module]:
        """Every batch norm, also after ``nn.SyncBatchNorm.convert_sync_batchnorm`` replaced the class."""
        return [m for m in self.modules() if is_batch_norm(m)]


CellMaker = Callable[[int, int, int, str], Cell]  # (channels in, channels out, stride, role) -> cell


def _stage_cells(make: CellMaker, widths: Sequence[int], first: int, blocks: int, cells: int, kind: str) -> list[Cell]:
    """The pre-process cells: ``cells`` per block, the last one of each block halving the resolution."""
    out = []
    for b in range(first, first + blocks):
        for c in range(cells):
            if c == cells - 1:
                out.append(make(widths[b], widths[b + 1], 2, f"down_{kind}"))
            else:
                out.append(make(widths[b], widths[b], 1, f"normal_{kind}"))
    return out


def _post_cells(make: CellMaker, a: NVAEArch) -> list[Cell]:
    """The post-process cells: the first one of each block doubles the resolution."""
    dec = a.widths_dec
    out = []
    for b in reversed(range(a.num_postprocess_blocks)):
        for c in range(a.num_postprocess_cells):
            if c == 0:
                out.append(make(dec[b + 1], dec[b], -1, "up_post"))
            else:
                out.append(make(dec[b], dec[b], 1, "normal_post"))
    return out


@dataclass
class _Sampled:
    output: OutputDistribution
    kind: str

    def mean_or_sample(self, temperature: float) -> torch.Tensor:
        """Bernoulli images are shown as their means (as the paper does); the others are sampled."""
        if self.kind == "bernoulli":
            return self.output.mean()
        return self.output.sample(temperature)
