"""Values of the training objective and of the evaluation that a user relies on, against references computed by hand.

Guards (NVAE_SPEC §2.8, §2.9): the KL warm-up β_t including its constant phase; the log-linear anneal of the
spectral/BN coefficient λ; the KL-balancing priors α and coefficients c_g (constants: no gradient flows through
them); the spectral regulariser's value (the largest singular values) and its gradient; the BN regulariser
Σ max|γ| and its λ-weighted place in the training loss; the importance-weighted bound logsumexp(log w) − log K;
bits per dimension over the cropped pixels; the EMA of the weights (d·old + (1 − d)·new).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nvae_search.evaluate import evaluate, to_unit
from nvae_search.model.builder import build_model
from nvae_search.model.distributions import LatentNormal
from nvae_search.objectives import (
    SpectralRegularizer,
    balanced_kl,
    bn_regularization,
    kl_balance_alpha,
    kl_coefficient,
    spectral_lambda,
)
from nvae_search.schema import Recipe, load_recipe
from nvae_search.train import Trainer

TINY = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"
QUIET = {"train.progress": False, "train.eval_at_end": False, "train.image_every_steps": 1000}
EVALUATE_MODULE = importlib.import_module("nvae_search.evaluate")  # the package re-exports evaluate()


def tiny(**overrides: Any) -> Recipe:
    return load_recipe(TINY, overrides={**QUIET, **overrides})


def trainer(tmp_path: Path, **overrides: Any) -> Trainer:
    return Trainer(tiny(**overrides), tmp_path, torch.device("cpu"), None)


# ------------------------------------------------------------------------------------------ KL warm-up and λ
def test_kl_warmup_holds_the_minimum_during_the_constant_phase_then_rises_linearly() -> None:
    """β_t = max(min((t − c)/a, 1), β_min) with c = 0.1·T = 100 and a = 0.3·T = 300 steps of T = 1000."""
    total, anneal, const, beta_min = 1000, 0.3, 0.1, 1e-4
    expected = {
        0: beta_min,
        50: beta_min,  # inside the constant phase: not 50/300
        100: beta_min,  # its last step: (100 − 100)/300 = 0, clamped up to β_min
        130: 30 / 300,
        250: 150 / 300,  # half-way through the anneal
        399: 299 / 300,
        400: 1.0,
        900: 1.0,
    }
    for step, beta in expected.items():
        assert kl_coefficient(step, total, anneal, const, beta_min) == pytest.approx(beta, rel=1e-9), step
    assert kl_coefficient(10, total, 0.0, const, beta_min) == 1.0  # no anneal: the full KL from the start


def test_spectral_lambda_is_annealed_log_linearly_between_init_and_coeff() -> None:
    init, coeff = 1.0, 1e-2
    assert spectral_lambda(0.0, coeff, True, init) == pytest.approx(init)
    assert spectral_lambda(1.0, coeff, True, init) == pytest.approx(coeff)
    assert spectral_lambda(0.5, coeff, True, init) == pytest.approx(0.1)  # the geometric mean, not 0.505
    assert spectral_lambda(0.25, coeff, True, init) == pytest.approx(10**-0.5)
    assert spectral_lambda(0.75, 1e-3, True, 10.0) == pytest.approx(10.0**0.25 * 1e-3**0.75)
    assert spectral_lambda(0.5, coeff, False, init) == coeff  # not annealed: constant


# ------------------------------------------------------------------------------------------------ KL balancing
def test_kl_balance_priors_per_rule_with_the_coarsest_scale_first() -> None:
    root2 = math.sqrt(2.0)
    torch.testing.assert_close(kl_balance_alpha([1, 1, 1], "sqrt"), torch.tensor([1.0, root2, 2.0]))
    torch.testing.assert_close(kl_balance_alpha([2, 1], "sqrt"), torch.tensor([1.0, 1.0, root2]))
    torch.testing.assert_close(kl_balance_alpha([1, 1, 1], "linear"), torch.tensor([1.0, 2.0, 4.0]))
    torch.testing.assert_close(kl_balance_alpha([1, 2], "equal"), torch.tensor([1.0, 1.0, 1.0]))
    # square: 4^i / groups = [1/1, 4/2, 16/4], rescaled so that the smallest is 1.
    torch.testing.assert_close(kl_balance_alpha([1, 2, 4], "square"), torch.tensor([1.0, 2, 2, 4, 4, 4, 4]))


def test_kl_balancing_coefficients_are_constants_that_carry_no_gradient() -> None:
    """c_g = G·(κ_g/α_g)/Σ_h(κ_h/α_h) with κ_g = mean_b|KL_g| + 0.01, detached: d(balanced KL)/dKL_g = β·c_g."""
    beta = 0.5
    values = [[1.0, 3.0], [-2.0, 6.0], [0.5, 0.5]]  # (group, image); a negative one-sample KL counts by |·|
    alpha = torch.tensor([1.0, 2.0, 4.0])
    kl = [torch.tensor(v, requires_grad=True) for v in values]
    out, coeffs = balanced_kl(kl, beta, alpha)
    kappa = [sum(abs(x) for x in v) / len(v) + 0.01 for v in values]
    weights = [k / a for k, a in zip(kappa, alpha.tolist(), strict=True)]
    expected = [len(values) * w / sum(weights) for w in weights]
    torch.testing.assert_close(coeffs.detach(), torch.tensor(expected))
    per_image = [beta * sum(c * v[i] for c, v in zip(expected, values, strict=True)) for i in range(2)]
    torch.testing.assert_close(out.detach(), torch.tensor(per_image))
    out.sum().backward()
    for g, tensor in enumerate(kl):
        assert tensor.grad is not None
        torch.testing.assert_close(tensor.grad, torch.full((2,), beta * expected[g]), msg=f"group {g}")


# ----------------------------------------------------------------------------------------------- regularisers
def test_spectral_regulariser_is_the_sum_of_largest_singular_values_and_has_their_gradient() -> None:
    torch.manual_seed(0)
    # Two convs of the same shape (one stacked power iteration) and two of other shapes.
    convs = [nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 1)]
    model = nn.Sequential(*convs)
    regulariser = SpectralRegularizer(model, 4)
    for _ in range(10):  # 40 iterations on the first call, 4 on each further one
        regulariser()
    matrices = [c.weight.detach().reshape(c.weight.shape[0], -1) for c in convs]
    norms = [float(torch.linalg.matrix_norm(w, ord=2)) for w in matrices]
    sigma = regulariser()
    assert float(sigma.detach()) == pytest.approx(sum(norms), rel=1e-4)
    sigma.backward()
    for conv, w in zip(convs, matrices, strict=True):
        # dσ/dW = u₁v₁ᵀ (the top singular vectors; their product does not depend on the signs).
        left, _, right = torch.linalg.svd(w, full_matrices=False)
        assert conv.weight.grad is not None
        torch.testing.assert_close(
            conv.weight.grad.reshape(w.shape), torch.outer(left[:, 0], right[0]), atol=1e-3, rtol=1e-3
        )
    # A gradient step on the penalty lowers the spectral norms: the regularisation acts on the weights.
    with torch.no_grad():
        for conv in convs:
            assert conv.weight.grad is not None
            conv.weight -= 0.1 * conv.weight.grad
    after = sum(float(torch.linalg.matrix_norm(c.weight.detach().reshape(c.weight.shape[0], -1), ord=2)) for c in convs)
    assert after < sum(norms) - 0.3


def test_spectral_regulariser_of_the_model_reaches_its_weight_normalised_parameters() -> None:
    model = build_model(tiny().model)
    SpectralRegularizer(model, 4)().backward()
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    assert any(name.endswith("log_weight_norm") for name in with_grad)
    assert any(name.endswith(".weight") for name in with_grad)


def test_bn_regulariser_sums_the_largest_absolute_gamma_of_every_affine_batch_norm() -> None:
    first, second, third = nn.BatchNorm2d(2), nn.BatchNorm2d(3), nn.SyncBatchNorm(2)
    plain = nn.BatchNorm2d(4, affine=False)  # no γ: not counted
    with torch.no_grad():
        first.weight.copy_(torch.tensor([-3.0, 1.0]))  # a negative scale counts by its absolute value
        second.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        third.weight.copy_(torch.tensor([-0.25, -0.75]))
    model = nn.Sequential(first, nn.ReLU(), second, plain, third)
    assert float(bn_regularization(model).detach()) == pytest.approx(3.0 + 2.0 + 0.75)


def test_training_loss_adds_lambda_times_the_bn_regulariser(tmp_path: Path) -> None:
    """Mid warm-up of a 60-step run (c = 6, a = 30 steps) at step 21: β = 0.5 and λ = √(1 · 0.01) = 0.1. The loss
    with ``loss.bn_regularization`` exceeds the one without by exactly λ·Σ max|γ|."""
    loss_cfg = {
        "model.loss.spectral_coeff": 1e-2,
        "model.loss.spectral_anneal": True,
        "model.loss.spectral_init": 1.0,
        "model.loss.kl_anneal_portion": 0.5,
        "model.loss.kl_const_portion": 0.1,
        "model.loss.bn_regularization": True,
    }
    t = trainer(tmp_path, **loss_cfg)
    assert t.total_steps == 60
    x = t.prepare(next(t._batches()))
    t.compute_loss(x)  # the first forward pass runs the data-dependent initialisation
    norms = [m for m in t.model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    assert len(norms) > 1
    with torch.no_grad():
        norms[0].weight[0] = -7.0  # the largest |γ| of that layer is the negative one
    term = sum(max(abs(g) for g in m.weight.tolist()) for m in norms)
    t.step = 21
    spectral_state = {k: v.clone() for k, v in t.spectral.state_dict().items()}
    torch.manual_seed(5)
    with_bn, info = t.compute_loss(x)
    assert info["beta"] == pytest.approx(0.5)
    assert info["lambda"] == pytest.approx(0.1)
    t.recipe = tiny(**{**loss_cfg, "model.loss.bn_regularization": False})
    t.spectral.load_state_dict(spectral_state)  # the same power-iteration vectors as in the first call
    torch.manual_seed(5)  # the same latent noise
    without_bn, _ = t.compute_loss(x)
    assert float((with_bn - without_bn).detach()) == pytest.approx(0.1 * term, rel=1e-4)


# ------------------------------------------------------------------------------------------------- evaluation
def test_importance_weighted_bound_is_logsumexp_of_the_log_weights_minus_log_k(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With known log-weights (K = 3 samples of 2 images), log p̂(x) = log((1/K)·Σ_k w_k), computed in Python,
    however the samples are split into passes."""
    table = [[0.0, -50.0], [math.log(3.0), -52.0], [-1.0, -49.0]]  # [sample k][image b]
    served = 0

    def log_weights(model: Any, x: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
        nonlocal served
        rows = table[served : served + samples]
        served += samples
        log_w = torch.tensor([w for row in rows for w in row])  # sample-major, as the model's rows
        return log_w, torch.full_like(log_w, 60.0), [torch.ones(1)]

    monkeypatch.setattr(EVALUATE_MODULE, "_log_weights", log_weights)
    expected = [math.log(sum(math.exp(row[b]) for row in table) / 3) for b in range(2)]
    x = torch.zeros(2, 1, 4, 4)
    for chunk, sequential in [(3, False), (2, False), (1, True)]:
        served = 0
        log_px, nelbo, _ = EVALUATE_MODULE.iw_bound(None, x, 3, chunk, sequential)
        torch.testing.assert_close(log_px, torch.tensor(expected), msg=f"chunk {chunk}")
        torch.testing.assert_close(nelbo, torch.tensor([60.0, 60.0]))


def test_nats_to_bits_per_dimension() -> None:
    assert to_unit(math.log(2) * 3072, "bpd", 3072) == pytest.approx(1.0)
    assert to_unit(7.5 * math.log(2) * 2352, "bpd", 2352) == pytest.approx(7.5)
    assert to_unit(85.0, "nats", 784) == 85.0


@pytest.fixture
def dmol_model() -> tuple[Any, list[torch.Tensor]]:
    """A tiny untrained RGB model with a DMoL output, 2 pixels cropped on each side, and 8-bit images in [0, 1]."""
    recipe = tiny(
        **{
            "data.dataset": "cifar10",
            "data.root": "unused",
            "model.input_channels": 3,
            "model.output": {"distribution": "dmol", "num_mixtures": 2, "num_x_bits": 8, "crop": 2},
        }
    )
    torch.manual_seed(0)
    model = build_model(recipe.model)
    images = torch.randint(0, 256, (6, 3, 32, 32)).float() / 255
    with torch.no_grad():
        model(images)  # data-dependent initialisation and BN statistics
    return model, list(images)


def test_bits_per_dim_divide_the_nats_by_log2_times_the_cropped_pixel_count(
    dmol_model: tuple[Any, list[torch.Tensor]],
) -> None:
    model, images = dmol_model
    torch.manual_seed(1)
    result = evaluate(model, images, prepare=lambda x: x, iw_samples=2, batch_size=4)
    dims = 3 * (32 - 2 * 2) ** 2  # 2352 likelihood terms per image, not 3·32²
    assert result.unit == "bpd" and result.images == 6
    assert math.isfinite(result.nll_nats) and result.nll_nats > 0
    assert result.nll == pytest.approx(result.nll_nats / (math.log(2) * dims), rel=1e-9)
    assert result.nelbo == pytest.approx(result.nelbo_nats / (math.log(2) * dims), rel=1e-9)


def test_equal_importance_weights_give_the_single_sample_bound(
    dmol_model: tuple[Any, list[torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a deterministic posterior sampler all K log-weights of an image are equal, and
    logsumexp_k(log w) − log K is that log w: the IW-K NLL equals the IW-1 NLL."""
    model, images = dmol_model
    monkeypatch.setattr(LatentNormal, "sample", lambda latent: latent.mu)
    one = evaluate(model, images, prepare=lambda x: x, iw_samples=1, batch_size=6)
    many = evaluate(model, images, prepare=lambda x: x, iw_samples=8, batch_size=6, chunk=4)
    assert many.nll_nats == pytest.approx(one.nll_nats, abs=1e-3)


# ------------------------------------------------------------------------------------------------------- EMA
def test_ema_weights_are_decay_times_old_plus_one_minus_decay_times_new(tmp_path: Path) -> None:
    decay = 0.9
    t = trainer(tmp_path, **{"train.ema_decay": decay})
    assert t.ema is not None
    batches = t._batches()
    snapshots: list[dict[str, torch.Tensor]] = []
    for _ in range(3):
        divergence, info = t.train_step(t.prepare(next(batches)))
        assert divergence is None and info is not None
        t.step += 1
        snapshots.append({k: p.detach().clone() for k, p in t.model.named_parameters()})
    expected = dict(snapshots[0])  # the first update copies the weights
    for later in snapshots[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * later[k] for k in expected}
    averaged = dict(t.ema.module.named_parameters())
    assert any(not torch.allclose(snapshots[-1][k], expected[k]) for k in expected)  # the average lags behind
    for k, value in expected.items():
        torch.testing.assert_close(averaged[k].detach(), value, atol=1e-6, rtol=1e-5, msg=k)
