"""Values of the model's densities, KLs and sampling against independent references (NVAE_SPEC §2.2-2.7).

Guards what a user reads off a trained model: the latent Normal (σ = exp(5·tanh(log σ/5)) + 0.01, times the
temperature), its log-density and analytic KL (against ``torch.distributions``), the Bernoulli, Normal and
discretized-logistic-mixture likelihoods (against hand-written formulas in float64: 8-bit edge bins, the R→G→B
channel conditioning, the far-tail fallback), the mixture temperature in pixel sampling, the residual posterior,
log q / log p / KL of a forward pass (with and without flows, recomputed from the network's raw sampler outputs),
the latent temperature of ``model.sample``, squeeze-excitation pooling and the data-dependent conv init.
Every reference is computed here, never through the code path under test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from nvae_search.model.builder import build_model
from nvae_search.model.distributions import BernoulliOutput, DiscMixLogistic, LatentNormal, NormalOutput
from nvae_search.model.nvae import NVAE
from nvae_search.model.ops import Conv2D, SqueezeExcite
from nvae_search.schema import load_recipe

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ------------------------------------------------------------------------------------------ references
def documented_mu(mu: torch.Tensor) -> torch.Tensor:
    """NVAE_SPEC §2.4: μ ← 5·tanh(μ/5)."""
    return 5.0 * torch.tanh(mu / 5.0)


def documented_sigma(log_sigma: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """NVAE_SPEC §2.4: σ = exp(5·tanh(log σ/5)) + 0.01, times the temperature."""
    return (torch.exp(5.0 * torch.tanh(log_sigma / 5.0)) + 0.01) * temperature


def documented_normal(mu: torch.Tensor, log_sigma: torch.Tensor) -> Normal:
    return Normal(documented_mu(mu.double()), documented_sigma(log_sigma.double()))


def log_sigmoid64(t: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(torch.exp(-t))


def reference_dmol_log_prob(
    x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, raw_coeffs: torch.Tensor
) -> torch.Tensor:
    """PixelCNN++ / NVAE DMoL log-likelihood per pixel, in float64, written from NVAE_SPEC §2.7.

    x: (B, 3, H, W) in [0, 1], 8 bits. logits: (B, M, H, W). means, log_scales, raw_coeffs: (B, 3, M, H, W), where
    raw coefficient slot 0 is G's dependence on R, slot 1 B's on R and slot 2 B's on G (each through tanh).
    Edge bins: 2x−1 < −0.999 takes the lower tail CDF(x + h), 2x−1 > 0.99 the upper tail 1 − CDF(x − h); the other
    bins take the exact mass CDF(x + h) − CDF(x − h), with h = 1/255.
    """
    x, logits, means = x.double(), logits.double(), means.double()
    log_scales, coeffs = log_scales.double().clamp(min=-7.0), torch.tanh(raw_coeffs.double())
    y = 2 * x - 1
    r, g = y[:, 0:1], y[:, 1:2]
    channel_means = torch.stack(
        [
            means[:, 0],
            means[:, 1] + coeffs[:, 0] * r,
            means[:, 2] + coeffs[:, 1] * r + coeffs[:, 2] * g,
        ],
        dim=1,
    )
    s = torch.exp(log_scales)
    ye = y.unsqueeze(2)
    h = 1.0 / 255.0
    upper = (ye + h - channel_means) / s
    lower = (ye - h - channel_means) / s
    lower_tail = log_sigmoid64(upper)  # log CDF(x + h)
    upper_tail = log_sigmoid64(-lower)  # log (1 − CDF(x − h))
    # log(σ(u) − σ(l)) = log σ(u) + log(1 − exp(log σ(l) − log σ(u))), stable in float64 in both tails
    mass = log_sigmoid64(upper) + torch.log(-torch.expm1(log_sigmoid64(lower) - log_sigmoid64(upper)))
    per_channel = torch.where(ye < -0.999, lower_tail, torch.where(ye > 0.99, upper_tail, mass))
    joint = per_channel.sum(dim=1) + torch.log_softmax(logits, dim=1)
    return torch.logsumexp(joint, dim=1)


def dmol_params(
    logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, raw_coeffs: torch.Tensor
) -> torch.Tensor:
    """The network's DMoL parameter tensor (B, 10·M, H, W): M logits, then per colour M means, M log-scales and
    M coefficients (the layout documented on DiscMixLogistic)."""
    per_colour = torch.cat([means, log_scales, raw_coeffs], dim=2)  # (B, 3, 3M, H, W)
    b, _, _, h, w = per_colour.shape
    return torch.cat([logits, per_colour.reshape(b, -1, h, w)], dim=1)


def tiny_model(seed: int = 0, **overrides: Any) -> NVAE:
    """recipes/cpu/tiny.yaml (32×32 MNIST, 2 scales, groups [2, 1], 4 latent channels), with model overrides."""
    recipe = load_recipe(TINY_RECIPE, {f"model.{k}": v for k, v in overrides.items()})
    torch.manual_seed(seed)
    return build_model(recipe.model)


@contextmanager
def captured_latents(model: NVAE) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Records, per latent group (decoder order), the raw outputs of the encoder and decoder samplers, the latent
    entering the flows (z₀) and the latent fed to the decoder combiner (z after the flows)."""
    seen: dict[str, dict[int, torch.Tensor]] = {"enc": {}, "dec": {}, "z0": {}, "zk": {}}
    handles = []

    def keep(kind: str, g: int):  # type: ignore[no-untyped-def]
        def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
            seen[kind][g] = output.detach().float().clone()

        return hook

    def keep_input(kind: str, g: int):  # type: ignore[no-untyped-def]
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[kind][g] = args[-1].detach().clone()

        return hook

    for g, module in enumerate(model.enc_sampler):
        handles.append(module.register_forward_hook(keep("enc", g)))
    for g, module in enumerate(model.dec_sampler, start=1):
        handles.append(module.register_forward_hook(keep("dec", g)))
    for g, module in enumerate(model.flows):
        handles.append(module.register_forward_pre_hook(keep_input("z0", g)))
    for g, module in enumerate(model.dec_combiners):
        handles.append(module.register_forward_pre_hook(keep_input("zk", g)))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def binary_batch(n: int = 2, side: int = 32, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, 1, side, side), 0.3), generator=generator)


# ------------------------------------------------------------------------------------------ latent Normal
def test_latent_normal_sigma_is_soft_clamped_exp_plus_floor_and_top_prior_sigma_is_1_01() -> None:
    generator = torch.Generator().manual_seed(0)
    mu, log_sigma = 8 * torch.randn(50, generator=generator), 8 * torch.randn(50, generator=generator)
    dist = LatentNormal(mu, log_sigma)
    torch.testing.assert_close(dist.mu, documented_mu(mu), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dist.sigma, documented_sigma(log_sigma), rtol=1e-5, atol=1e-7)
    # the floor: however negative log σ gets, σ ≥ exp(−5) + 0.01
    floor = LatentNormal(torch.zeros(1), torch.full((1,), -1e4)).sigma
    torch.testing.assert_close(floor, torch.tensor([math.exp(-5.0) + 0.01]), rtol=1e-5, atol=0.0)
    top = LatentNormal.standard(torch.zeros(2, 3, 4, 4))
    torch.testing.assert_close(top.sigma, torch.full((2, 3, 4, 4), 1.01))
    torch.testing.assert_close(top.mu, torch.zeros(2, 3, 4, 4))


def test_latent_normal_temperature_scales_sigma_and_not_mu() -> None:
    generator = torch.Generator().manual_seed(1)
    mu, log_sigma = torch.randn(40, generator=generator), torch.randn(40, generator=generator)
    for t in (0.0, 0.3, 0.7):
        cold = LatentNormal(mu, log_sigma, temperature=t)
        torch.testing.assert_close(cold.sigma, documented_sigma(log_sigma, t), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(cold.mu, documented_mu(mu), rtol=1e-5, atol=1e-6)
    assert torch.equal(LatentNormal.standard(torch.zeros(3), temperature=0.5).sigma, torch.full((3,), 0.505))


def test_latent_normal_log_prob_matches_torch_normal() -> None:
    generator = torch.Generator().manual_seed(2)
    mu, log_sigma, z = (3 * torch.randn(200, generator=generator) for _ in range(3))
    expected = documented_normal(mu, log_sigma).log_prob(z.double())
    torch.testing.assert_close(LatentNormal(mu, log_sigma).log_prob(z).double(), expected, rtol=1e-4, atol=1e-4)


def test_latent_normal_kl_matches_torch_kl_divergence() -> None:
    generator = torch.Generator().manual_seed(3)
    mq, lq, mp, lp = (2 * torch.randn(300, generator=generator) for _ in range(4))
    expected = kl_divergence(documented_normal(mq, lq), documented_normal(mp, lp))
    got = LatentNormal(mq, lq).kl(LatentNormal(mp, lp)).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got >= -1e-6).all()  # a KL is never negative


# ------------------------------------------------------------------------------------------ output distributions
def test_bernoulli_log_likelihood_matches_torch_and_rewards_a_correct_prediction() -> None:
    generator = torch.Generator().manual_seed(4)
    logits = 4 * torch.randn(2, 1, 5, 5, generator=generator)
    x = torch.bernoulli(torch.full_like(logits, 0.5), generator=generator)
    got = BernoulliOutput(logits).log_prob(x)
    torch.testing.assert_close(got, Bernoulli(logits=logits).log_prob(x), rtol=1e-5, atol=1e-5)
    assert (got <= 0).all()
    confident = BernoulliOutput(torch.full((1, 1, 2, 2), 6.0))
    assert (confident.log_prob(torch.ones(1, 1, 2, 2)) > confident.log_prob(torch.zeros(1, 1, 2, 2))).all()
    assert confident.log_prob(torch.ones(1, 1, 2, 2)).sum() > -0.01  # near-certain and right: ≈ 0 nats


def test_normal_output_scores_pixels_on_the_minus_one_to_one_scale() -> None:
    generator = torch.Generator().manual_seed(5)
    mu, log_sigma = 0.8 * torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    x = torch.rand(2, 3, 4, 4, generator=generator)
    output = NormalOutput(torch.cat([mu, log_sigma], dim=1))
    expected = documented_normal(mu, log_sigma).log_prob(2 * x.double() - 1)
    torch.testing.assert_close(output.log_prob(x).double(), expected, rtol=1e-4, atol=1e-4)
    # a pixel at the decoder's mean (mapped back to [0, 1]) scores better than a shifted one
    at_mean = output.mean()
    assert (output.log_prob(at_mean) > output.log_prob((at_mean + 0.25).clamp(max=1.0) - 0.1)).all()


def test_dmol_log_prob_matches_pixelcnnpp_formula_with_r_g_b_conditioning() -> None:
    """One component with chosen parameters: B's mean moves with both R and G (different coefficients)."""
    levels = torch.tensor(
        [[[200.0, 40.0], [128.0, 17.0]], [[30.0, 220.0], [99.0, 250.0]], [[128.0, 60.0], [5.0, 180.0]]]
    )
    x = (levels / 255.0).unsqueeze(0)  # (1, 3, 2, 2)
    shape = (1, 3, 1, 2, 2)
    means = torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1, 1).expand(shape).clone()
    log_scales = torch.tensor([-2.0, -1.5, -2.5]).view(1, 3, 1, 1, 1).expand(shape).clone()
    raw_coeffs = torch.tensor([0.5, -0.7, 0.9]).view(1, 3, 1, 1, 1).expand(shape).clone()
    logits = torch.zeros(1, 1, 2, 2)
    got = DiscMixLogistic(dmol_params(logits, means, log_scales, raw_coeffs), num_mixtures=1).log_prob(x)
    expected = reference_dmol_log_prob(x, logits, means, log_scales, raw_coeffs)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    # changing only G changes the likelihood of B (through coefficient slot 2), by the reference's amount
    x2 = x.clone()
    x2[:, 1] = 0.5
    got2 = DiscMixLogistic(dmol_params(logits, means, log_scales, raw_coeffs), num_mixtures=1).log_prob(x2)
    torch.testing.assert_close(
        got2.double(), reference_dmol_log_prob(x2, logits, means, log_scales, raw_coeffs), rtol=1e-4, atol=1e-4
    )


def test_dmol_log_prob_matches_reference_for_random_three_component_mixtures() -> None:
    generator = torch.Generator().manual_seed(6)
    b, m, h, w = 2, 3, 4, 4
    means = 0.6 * torch.randn(b, 3, m, h, w, generator=generator)
    log_scales = -1.0 - 1.5 * torch.rand(b, 3, m, h, w, generator=generator)
    raw_coeffs = torch.randn(b, 3, m, h, w, generator=generator)
    logits = torch.randn(b, m, h, w, generator=generator)
    x = torch.randint(1, 250, (b, 3, h, w), generator=generator).float() / 255.0
    got = DiscMixLogistic(dmol_params(logits, means, log_scales, raw_coeffs), num_mixtures=m).log_prob(x)
    expected = reference_dmol_log_prob(x, logits, means, log_scales, raw_coeffs)
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3)


def test_dmol_8bit_edge_levels_use_the_cdf_tails() -> None:
    """Level 0 (2x−1 = −1) takes CDF(x + h); levels 255 and 254 (2x−1 = 0.992 > 0.99, the official threshold kept
    on purpose, NVAE_SPEC §2.7) take 1 − CDF(x − h); levels 1 and 253 are ordinary bins."""
    r_levels = torch.tensor([0.0, 1.0, 128.0, 253.0, 254.0, 255.0])
    x = torch.stack([r_levels, torch.full_like(r_levels, 100.0), torch.full_like(r_levels, 150.0)]) / 255.0
    x = x.view(1, 3, 1, 6)
    shape = (1, 3, 1, 1, 6)
    means = torch.tensor([0.6, -0.1, 0.2]).view(1, 3, 1, 1, 1).expand(shape).clone()
    log_scales = torch.full(shape, -1.0)
    raw_coeffs = torch.zeros(shape)
    logits = torch.zeros(1, 1, 1, 6)
    got = DiscMixLogistic(dmol_params(logits, means, log_scales, raw_coeffs), num_mixtures=1).log_prob(x)
    expected = reference_dmol_log_prob(x, logits, means, log_scales, raw_coeffs)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # every term by hand for this pixel row: s = e^-1, h = 1/255, coefficients 0
    s, h = math.exp(-1.0), 1.0 / 255.0

    def cdf(v: float, mean: float) -> float:
        return 1.0 / (1.0 + math.exp(-(v - mean) / s))

    def bin_term(level: float, mean: float) -> float:
        y = 2 * level / 255 - 1
        return math.log(cdf(y + h, mean) - cdf(y - h, mean))

    g_and_b = bin_term(100.0, -0.1) + bin_term(150.0, 0.2)
    by_hand = {
        0: math.log(cdf(-1 + h, 0.6)),
        1: bin_term(1.0, 0.6),
        128: bin_term(128.0, 0.6),
        253: bin_term(253.0, 0.6),
        254: math.log(1.0 - cdf(254 / 255 * 2 - 1 - h, 0.6)),
        255: math.log(1.0 - cdf(1 - h, 0.6)),
    }
    for i, level in enumerate(r_levels.tolist()):
        assert float(got[0, 0, i]) == pytest.approx(g_and_b + by_hand[int(level)], abs=2e-4), level


def test_dmol_far_tail_bin_falls_back_to_density_times_bin_width() -> None:
    """A bin whose CDF difference is below 1e-5 is scored as pdf(x)·(2/255): it must still approximate the bin's
    exact probability mass (computed here in float64)."""
    r_levels = torch.tensor([26.0, 40.0, 230.0])
    x = torch.stack([r_levels, torch.full_like(r_levels, 128.0), torch.full_like(r_levels, 128.0)]).view(1, 3, 1, 3)
    x = x / 255.0
    shape = (1, 3, 1, 1, 3)
    means = torch.tensor([[0.9, 0.9, -0.8], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).view(1, 3, 1, 1, 3)
    log_scales = torch.full(shape, math.log(0.1))
    raw_coeffs = torch.zeros(shape)
    logits = torch.zeros(1, 1, 1, 3)
    dmol = DiscMixLogistic(dmol_params(logits, means, log_scales, raw_coeffs), num_mixtures=1)
    # the R bins are in the fallback branch: their exact mass is far below 1e-5
    y, mu_r = 2 * r_levels.double() / 255 - 1, means[0, 0, 0, 0].double()
    exact_r = torch.sigmoid((y + 1 / 255 - mu_r) / 0.1) - torch.sigmoid((y - 1 / 255 - mu_r) / 0.1)
    assert (exact_r < 1e-6).all() and (exact_r > 1e-30).all()
    got = dmol.log_prob(x)
    expected = reference_dmol_log_prob(x, logits, means, log_scales, raw_coeffs)
    torch.testing.assert_close(got.double(), expected, rtol=0.0, atol=1e-2)


def test_dmol_sampling_temperature_sharpens_the_mixture_choice() -> None:
    """Two components (logits 0 and 2) far apart: at t = 1 about softmax = 88 % of pixels come from the second,
    at t = 0.1 virtually all, at t = 10 about 55 %."""
    h = w = 64
    logits = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, h, w).clone()
    shape = (1, 3, 2, h, w)
    means = torch.tensor([-0.8, 0.8]).view(1, 1, 2, 1, 1).expand(shape).clone()
    log_scales = torch.full(shape, -7.0)
    raw_coeffs = torch.zeros(shape)
    dmol = DiscMixLogistic(dmol_params(logits, means, log_scales, raw_coeffs), num_mixtures=2)
    expected = {
        0.1: 1.0 / (1.0 + math.exp(-20.0)),
        1.0: 1.0 / (1.0 + math.exp(-2.0)),
        10.0: 1.0 / (1.0 + math.exp(-0.2)),
    }
    for t, p_second in expected.items():
        torch.manual_seed(7)
        pixels = dmol.sample(t)
        second = (pixels[:, 0] > 0.5).double().mean().item()
        assert second == pytest.approx(p_second, abs=0.025), t
        # the colour channels share the component of their pixel
        assert torch.equal(pixels[:, 0] > 0.5, pixels[:, 2] > 0.5)


# ------------------------------------------------------------------------------------------ the network
@pytest.mark.parametrize("num_nf", [0, 1])
def test_forward_log_q_log_p_and_kl_match_the_residual_posterior_and_prior(num_nf: int) -> None:
    """Recomputed from the raw sampler outputs: q = N(μ_p + Δμ, log σ_p + Δlog σ) (soft clamp and floor on the sums),
    log q scored at z₀ under q, log p at the flowed z under the prior (N(0, 1.01²) for the top group), and the KL
    the analytic one without flows and log q − log p with them."""
    model = tiny_model(seed=0, num_nf=num_nf)
    x = binary_batch()
    torch.manual_seed(11)
    with torch.no_grad(), captured_latents(model) as seen:
        result = model(x)
    groups = len(model.enc_sampler)
    assert groups == 3 and len(result.kl) == groups
    log_q = torch.zeros(x.shape[0], dtype=torch.float64)
    log_p = torch.zeros(x.shape[0], dtype=torch.float64)
    for g in range(groups):
        d_mu, d_log_sigma = seen["enc"][g].double().chunk(2, dim=1)
        if g == 0:
            q = documented_normal(d_mu, d_log_sigma)
            p = Normal(torch.zeros_like(d_mu), torch.full_like(d_mu, 1.01))
        else:
            mu_p, log_sigma_p = seen["dec"][g].double().chunk(2, dim=1)
            q = documented_normal(mu_p + d_mu, log_sigma_p + d_log_sigma)
            p = documented_normal(mu_p, log_sigma_p)
        z0, zk = seen["z0"][g].double(), seen["zk"][g].double()
        if num_nf == 0:
            assert torch.equal(z0, zk)
        lq_map, lp_map = q.log_prob(z0), p.log_prob(zk)
        kl_map = lq_map - lp_map if num_nf else kl_divergence(q, p)
        log_q += lq_map.sum(dim=(1, 2, 3))
        log_p += lp_map.sum(dim=(1, 2, 3))
        torch.testing.assert_close(result.kl[g].double(), kl_map.sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-2)
        # per channel: the batch mean of the spatially summed KL
        expected_channels = kl_map.sum(dim=(2, 3)).mean(dim=0)
        torch.testing.assert_close(result.kl_per_channel[g].double(), expected_channels, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(result.log_q.double(), log_q, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(result.log_p.double(), log_p, rtol=1e-4, atol=1e-2)
    if num_nf:
        torch.testing.assert_close(torch.stack(result.kl).sum(dim=0), result.log_q - result.log_p, rtol=1e-5, atol=1e-3)


def test_residual_posterior_equals_the_prior_when_the_encoder_deltas_are_zero() -> None:
    model = tiny_model(seed=1)
    with torch.no_grad():
        for sampler in model.enc_sampler[1:]:
            sampler.weight.zero_()
            sampler.bias.zero_()
        result = model(binary_batch())
    assert result.kl[0].abs().min() > 0.1  # the top group keeps its own posterior
    for kl in result.kl[1:]:
        torch.testing.assert_close(kl, torch.zeros_like(kl), rtol=0.0, atol=1e-5)


def test_sample_temperature_scales_the_noise_of_every_latent_group() -> None:
    """With a fixed seed, z_g = μ_g + t·σ_g·ε_g with the same ε at every temperature (top group: μ = 0, σ = 1.01);
    at t = 0 every latent is its prior mean, so the images do not depend on the seed."""
    model = tiny_model(seed=2).eval()
    noise: dict[float, list[torch.Tensor]] = {}
    for t in (1.0, 0.4):
        torch.manual_seed(5)
        with captured_latents(model) as seen:
            model.sample(3, temperature=t)
        eps = []
        for g in sorted(seen["zk"]):
            z = seen["zk"][g].double()
            if g == 0:
                mu, sigma = torch.zeros_like(z), torch.full_like(z, 1.01)
            else:
                raw_mu, raw_log_sigma = seen["dec"][g].double().chunk(2, dim=1)
                mu, sigma = documented_mu(raw_mu), documented_sigma(raw_log_sigma)
            eps.append((z - mu) / (t * sigma))
        noise[t] = eps
    assert len(noise[1.0]) == 3
    for cold, warm in zip(noise[0.4], noise[1.0], strict=True):
        torch.testing.assert_close(cold, warm, rtol=1e-3, atol=1e-3)
    images = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        images.append(model.sample(2, temperature=0.0))
    torch.testing.assert_close(images[0], images[1], rtol=0.0, atol=1e-6)


# ------------------------------------------------------------------------------------------ ops
def test_squeeze_excite_gates_channels_by_their_spatial_mean() -> None:
    se = SqueezeExcite(4)  # hidden width max(4 // 16, 4) = 4
    w1 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    w2 = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [2.0, 0.0, 0.0, -1.0]])
    with torch.no_grad():
        se.fc1.weight.copy_(w1)
        se.fc1.bias.copy_(torch.tensor([0.1, 0.0, 0.2, -0.1]))
        se.fc2.weight.copy_(w2)
        se.fc2.bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.1]))
    x = torch.zeros(2, 4, 4, 4)
    x[:, :, 1, 2] = torch.tensor([[8.0, 4.0, -2.0, 6.0], [1.0, 2.0, 3.0, 4.0]])  # one bright pixel per channel
    x[:, :, 3, 0] = 0.5
    pooled = x.sum(dim=(2, 3)) / 16.0
    hidden = torch.clamp(pooled @ w1.T + torch.tensor([0.1, 0.0, 0.2, -0.1]), min=0.0)
    gate = 1.0 / (1.0 + torch.exp(-(hidden @ w2.T + torch.tensor([0.0, 0.3, -0.2, 0.1]))))
    torch.testing.assert_close(se(x), x * gate.view(2, 4, 1, 1), rtol=1e-5, atol=1e-6)


def test_data_dependent_init_gives_zero_mean_and_one_fifth_std_outputs() -> None:
    torch.manual_seed(8)
    conv = Conv2D(4, 8, 3, padding=1, bias=True, data_init=True)
    x = 3.0 * torch.randn(16, 4, 8, 8) + 1.0
    assert bool(conv.needs_data_init)
    with torch.no_grad():
        conv(x)  # the first training-mode call initialises
        assert not bool(conv.needs_data_init)
        out = conv(x)
    per_channel = out.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(dim=1), torch.zeros(8), rtol=0.0, atol=1e-4)
    torch.testing.assert_close(per_channel.std(dim=1), torch.full((8,), 0.2), rtol=1e-3, atol=0.0)
    before = [p.detach().clone() for p in (conv.bias, conv.log_weight_norm)]
    with torch.no_grad():
        conv(2 * x)  # later calls leave the parameters alone
    assert all(torch.equal(a, p) for a, p in zip(before, (conv.bias, conv.log_weight_norm), strict=True))
