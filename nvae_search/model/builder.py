"""The only place where the recipe schema meets torch: ``build_model(recipe.model)``."""

from __future__ import annotations

from ..schema import CELL_ROLES, OPS, MBConvOp, ModelConfig, ResOp
from .nvae import NVAE, NVAEArch
from .ops import NormSpec, OpSpec


def op_spec(op: ResOp | MBConvOp) -> OpSpec:
    """The network's spec of one recipe op: what the op table says its name stands for, and the recipe's values."""
    info = OPS[op.type]
    if isinstance(op, MBConvOp):
        return OpSpec(info.kind, kernel=op.kernel, expansion=op.expansion, groups=op.groups, activation=op.activation)
    return OpSpec(
        info.kind,
        kernel=op.kernel,
        dilation=info.dilation,
        activation=info.activation,
        batch_norm=info.batch_norm,
        data_init=info.data_init,
    )


def arch_from_config(cfg: ModelConfig) -> NVAEArch:
    bn = cfg.norm.batch_norm
    return NVAEArch(
        resolution=cfg.resolution,
        input_channels=cfg.input_channels,
        widths_enc=tuple(cfg.widths_enc()),
        widths_dec=tuple(cfg.widths_dec()),
        num_preprocess_blocks=cfg.num_preprocess_blocks,
        num_preprocess_cells=cfg.num_preprocess_cells,
        num_postprocess_blocks=cfg.num_postprocess_blocks,
        num_postprocess_cells=cfg.num_postprocess_cells,
        groups_per_scale=tuple(cfg.groups_per_scale()),
        latent_per_group=cfg.num_latent_per_group,
        cells_per_cond_enc=cfg.num_cell_per_cond_enc,
        cells_per_cond_dec=cfg.num_cell_per_cond_dec,
        ops={role: tuple(op_spec(op) for op in getattr(cfg.cells, role)) for role in CELL_ROLES},
        use_se=cfg.use_se,
        res_dist=cfg.res_dist,
        num_flows=cfg.num_nf,
        norm=NormSpec(bn_momentum=bn.momentum, bn_eps=bn.eps, weight_norm=cfg.norm.weight_norm),
        output=cfg.output.distribution,
        num_mixtures=cfg.output.num_mixtures,
        num_bits=cfg.output.num_x_bits,
        crop=cfg.output.crop,
    )


def build_model(cfg: ModelConfig) -> NVAE:
    """Build the network a recipe's ``model`` section describes (on the CPU, in fp32)."""
    model = NVAE(arch_from_config(cfg))
    model.set_checkpointing(cfg.numerics.checkpointing == "cell")
    return model
