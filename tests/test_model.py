"""Model behaviour: presets and ops run, checkpointing is exact, flows are autoregressive, likelihoods normalise."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.autograd.functional import jacobian

from nvae_search.model.builder import build_model, op_spec
from nvae_search.model.distributions import DiscMixLogistic
from nvae_search.model.flows import ARCell, PairedARCell
from nvae_search.model.nvae import NVAE
from nvae_search.model.ops import OP_TABLE, NormSpec, OpSpec, make_op
from nvae_search.schema import ARCH_PRESETS, OPS, MBConvOp, ModelConfig, ResOp, load_recipe

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def tiny_config(**overrides: Any) -> ModelConfig:
    """Two latent scales ([2, 1] groups) at 16×16 with width 8: every cell role is used once or more.

    Width 8 keeps `mbconv_den` valid: its pre/post ops use groups=8, and round(8·3) and round(16·3) divide by 8.
    """
    base: dict[str, Any] = {
        "resolution": 16,
        "input_channels": 1,
        "num_channels_enc": 8,
        "num_channels_dec": 8,
        "num_preprocess_blocks": 1,
        "num_preprocess_cells": 1,
        "num_postprocess_blocks": 1,
        "num_postprocess_cells": 1,
        "num_latent_scales": 2,
        "num_groups_per_scale": 2,
        "ada_groups": True,
        "num_latent_per_group": 4,
        "num_cell_per_cond_enc": 1,
        "num_cell_per_cond_dec": 1,
    }
    return ModelConfig.model_validate({**base, **overrides})


def batch_for(cfg: ModelConfig, n: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (n, cfg.input_channels, cfg.resolution, cfg.resolution)
    x = torch.rand(shape, generator=generator)
    return torch.bernoulli(x, generator=generator) if cfg.output.distribution == "bernoulli" else x


def nelbo(model: NVAE, x: torch.Tensor) -> torch.Tensor:
    result = model(x)
    return (model.reconstruction_loss(result.output, x) + torch.stack(result.kl).sum(dim=0)).mean()


def assert_trains(model: NVAE, x: torch.Tensor) -> None:
    """One forward/backward: finite loss, the output has the image's shape, every gradient finite."""
    model.train()
    result = model(x)
    assert result.output.mean().shape == x.shape
    loss = (model.reconstruction_loss(result.output, x) + torch.stack(result.kl).sum(dim=0)).mean()
    loss.backward()
    assert math.isfinite(loss.item())
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ------------------------------------------------------------------------------------- presets and ops
@pytest.mark.parametrize("preset", sorted(ARCH_PRESETS))
def test_every_preset_builds_and_trains(preset: str) -> None:
    cfg = tiny_config(preset=preset)
    torch.manual_seed(0)
    assert_trains(build_model(cfg), batch_for(cfg))


def op_spec_for(name: str) -> OpSpec:
    """The network spec of a recipe op, through the builder (so the op table's meaning of the name is used)."""
    if OPS[name].kind == "inverted_residual":
        return op_spec(MBConvOp(type=name, kernel=5, expansion=3.0, groups=0))
    return op_spec(ResOp(type=name, kernel=3))


def test_op_table_gives_the_official_meaning_of_each_op_name() -> None:
    assert op_spec_for("res_bnswish") == OpSpec("act_conv", kernel=3, dilation=1, activation="swish")
    assert op_spec_for("res_bnswish5") == OpSpec("act_conv", kernel=3, dilation=2, activation="swish")
    assert op_spec_for("res_bnelu") == OpSpec("act_conv", kernel=3, dilation=1, activation="elu")
    assert op_spec_for("res_elu") == OpSpec("act_conv", activation="elu", batch_norm=False, data_init=True)
    assert op_spec_for("mbconv") == OpSpec("inverted_residual", kernel=5, expansion=3.0, groups=0)


def test_every_op_kind_of_the_table_has_a_constructor() -> None:
    assert {info.kind for info in OPS.values()} == set(OP_TABLE)


# stride → (output channels, output side) for an 8-channel 8×8 input
STRIDE_SHAPES = {1: (8, 8), 2: (16, 4), -1: (4, 16)}


@pytest.mark.parametrize(("name", "stride"), list(itertools.product(sorted(OPS), STRIDE_SHAPES)))
def test_op_output_shape(name: str, stride: int) -> None:
    c_out, side = STRIDE_SHAPES[stride]
    op = make_op(8, c_out, stride, op_spec_for(name), NormSpec()).train()
    out = op(torch.randn(2, 8, 8, 8))
    assert out.shape == (2, c_out, side, side)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("stride", sorted(STRIDE_SHAPES))
@pytest.mark.parametrize("side", [4, 16])  # below and above the size where the op switches to channels-last
def test_eval_mode_inverted_residual_folds_batch_norm_without_changing_the_output(stride: int, side: int) -> None:
    c_out = STRIDE_SHAPES[stride][0]
    op = make_op(8, c_out, stride, OpSpec(kind="inverted_residual", expansion=3, kernel=5), NormSpec())
    generator = torch.Generator().manual_seed(0)
    for module in op.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # trained-looking statistics and affine parameters
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(n, generator=generator))
            module.bias.data.copy_(torch.randn(n, generator=generator))
    op.eval()
    x = torch.randn(3, 8, side, side, generator=generator)
    with torch.no_grad():
        folded = op(x)
        reference = op.layers(torch.nn.functional.interpolate(x, scale_factor=2) if stride == -1 else x)
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ checkpointing
def one_step(model: NVAE, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same latent samples in both runs
    loss = nelbo(model, x)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("rel", ["recipes/cpu/tiny.yaml", "recipes/variants/iaf_like_mnist.yaml"])
def test_checkpointing_gives_the_same_loss_gradients_and_bn_statistics(rel: str) -> None:
    cfg = load_recipe(ROOT / rel).model
    torch.manual_seed(0)
    plain = build_model(cfg)
    checkpointed = build_model(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_checkpointing(True)
    x = batch_for(cfg, n=8)
    loss_plain, grads_plain = one_step(plain, x, seed=1)
    loss_ckpt, grads_ckpt = one_step(checkpointed, x, seed=1)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-5, atol=1e-5)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # Recomputation must not update the running statistics a second time.
    for bn_plain, bn_ckpt in zip(plain.batch_norms(), checkpointed.batch_norms(), strict=True):
        torch.testing.assert_close(bn_ckpt.running_mean, bn_plain.running_mean, rtol=0, atol=1e-7)
        torch.testing.assert_close(bn_ckpt.running_var, bn_plain.running_var, rtol=0, atol=1e-7)
        assert int(bn_ckpt.num_batches_tracked) == int(bn_plain.num_batches_tracked) == 1


# ------------------------------------------------------------------------------------------------ flows
def raster_jacobian(f: Any, z: torch.Tensor, reverse_pixels: bool) -> torch.Tensor:
    """Jacobian of f at z with both sides flattened pixel-major, channel-minor: index = (h·W + w)·C + c."""
    _, c, h, w = z.shape
    jac = jacobian(f, z)[0, :, :, :, 0]  # (C, H, W, C, H, W)
    if reverse_pixels:
        jac = jac.flip(1, 2, 4, 5)
    return jac.permute(1, 2, 0, 4, 5, 3).reshape(h * w * c, h * w * c)


@pytest.mark.parametrize("mirror", [False, True])
def test_ar_cell_shift_is_strictly_autoregressive(mirror: bool) -> None:
    torch.manual_seed(0)
    cell = ARCell(num_z=3, mirror=mirror)
    z = torch.randn(1, 3, 4, 4)
    jac = raster_jacobian(cell.shift, z, reverse_pixels=mirror)
    assert torch.all(torch.triu(jac) == 0), "μ(z) depends on a z at or after its own position"
    assert torch.tril(jac, diagonal=-1).abs().sum() > 0


def test_ar_cell_flow_has_unit_diagonal() -> None:
    torch.manual_seed(0)
    cell = ARCell(num_z=3, mirror=False)
    jac = raster_jacobian(cell, torch.randn(1, 3, 4, 4), reverse_pixels=False)
    assert torch.equal(torch.diagonal(jac), torch.ones(jac.shape[0]))
    assert torch.all(torch.triu(jac, diagonal=1) == 0)


def test_paired_ar_cell_is_volume_preserving() -> None:
    torch.manual_seed(0)
    paired = PairedARCell(num_z=3)
    jac = raster_jacobian(paired, torch.randn(1, 3, 4, 4), reverse_pixels=False)
    sign, logdet = torch.linalg.slogdet(jac.double())
    assert sign.item() == 1.0
    assert abs(logdet.item()) < 1e-6


# ---------------------------------------------------------------------------------- output distributions
@pytest.mark.parametrize("num_bits", [3, 1])
def test_dmol_probabilities_sum_to_one(num_bits: int) -> None:
    levels = 2**num_bits
    torch.manual_seed(0)
    params = torch.randn(1, 10 * 3, 1, 1)
    values = torch.arange(levels, dtype=torch.float32) / (levels - 1)
    rgb = torch.cartesian_prod(values, values, values)  # every RGB colour, (levels³, 3)
    x = rgb.view(-1, 3, 1, 1)
    dist = DiscMixLogistic(params.expand(x.shape[0], -1, -1, -1), num_mixtures=3, num_bits=num_bits)
    log_p = dist.log_prob(x)
    assert log_p.shape == (x.shape[0], 1, 1)
    assert abs(log_p.double().exp().sum().item() - 1.0) < 1e-4


def test_bernoulli_likelihood_ignores_the_mnist_padding() -> None:
    cfg = load_recipe(ROOT / "recipes/cpu/tiny.yaml").model
    assert cfg.output.crop == 2
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = batch_for(cfg, n=2)
    with torch.no_grad():
        output = model(x).output
        loss = model.reconstruction_loss(output, x)
        border, centre = x.clone(), x.clone()
        border[0, 0, 0, 0] = 1 - border[0, 0, 0, 0]
        border[0, 0, 31, 1] = 1 - border[0, 0, 31, 1]
        centre[0, 0, 2, 2] = 1 - centre[0, 0, 2, 2]
        assert torch.equal(model.reconstruction_loss(output, border), loss)
        assert not torch.equal(model.reconstruction_loss(output, centre), loss)


# --------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize(
    "overrides",
    [{}, {"input_channels": 3, "output": {"distribution": "dmol", "num_mixtures": 3}}],
    ids=["bernoulli", "dmol"],
)
def test_sample_shape_and_range(overrides: dict[str, Any]) -> None:
    cfg = tiny_config(**overrides)
    torch.manual_seed(0)
    images = build_model(cfg).eval().sample(4, temperature=0.7)
    assert images.shape == (4, cfg.input_channels, cfg.resolution, cfg.resolution)
    assert images.min() >= 0 and images.max() <= 1


def test_vanilla_vae_builds_trains_and_samples() -> None:
    cfg = tiny_config(num_latent_scales=1, num_groups_per_scale=1, ada_groups=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.arch.vanilla and not hasattr(model, "prior_ftr0")
    assert_trains(model, batch_for(cfg))
    assert model.eval().sample(2, temperature=1.0).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("overrides", [{}, {"num_nf": 1}, {"res_dist": False}])
def test_k_samples_share_one_encoder_pass_with_the_same_result(overrides: dict[str, Any]) -> None:
    """`model(x, samples=K)` (one encoder pass, tiled features) must equal `model(x.repeat(K))` draw for draw: the
    batched IW evaluation relies on it."""
    cfg = tiny_config(**overrides)
    model = build_model(cfg).eval()
    x = batch_for(cfg, n=3)
    with torch.no_grad():
        torch.manual_seed(1)
        shared = model(x, samples=4)
        torch.manual_seed(1)
        tiled = model(x.repeat(4, 1, 1, 1))
    assert shared.log_q.shape == (12,)
    torch.testing.assert_close(shared.log_q, tiled.log_q, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(shared.log_p, tiled.log_p, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(shared.output.mean(), tiled.output.mean(), rtol=1e-5, atol=1e-5)
