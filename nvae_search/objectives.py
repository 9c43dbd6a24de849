"""The paper's training objective: KL warm-up and balancing, spectral and BN regularisation (NVAE_SPEC §2.8)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .model.flows import ARConv2d
from .model.ops import Conv2D, is_batch_norm

NORMALIZE_EPS = 1e-3


def kl_coefficient(step: int, total_steps: int, anneal_portion: float, const_portion: float, min_coeff: float) -> float:
    """β_t = max(min((t − c)/a, 1), β_min) with a and c given as fractions of the run."""
    anneal = anneal_portion * total_steps
    const = const_portion * total_steps
    if anneal <= 0:
        return 1.0
    return max(min((step - const) / anneal, 1.0), min_coeff)


def kl_balance_alpha(groups_decoder_order: Sequence[int], rule: str) -> torch.Tensor:
    """Per-group prior α of the balancer; scale index 0 is the coarsest. Rescaled so that min α = 1."""
    values: list[float] = []
    for i, groups in enumerate(groups_decoder_order):
        if rule == "equal":
            a = 1.0
        elif rule == "linear":
            a = 2.0**i
        elif rule == "sqrt":
            a = math.sqrt(2.0**i)
        elif rule == "square":
            a = 4.0**i / groups
        else:
            raise KeyError(f"unknown KL balancing rule {rule!r}")
        values += [a] * groups
    alpha = torch.tensor(values)
    return alpha / alpha.min()


def balanced_kl(
    kl_groups: Sequence[torch.Tensor], beta: float, alpha: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """β·Σ_g c_g·KL_g per image, with c_g ∝ (mean|KL_g| + 0.01)/α_g normalised to sum to G (only while β < 1).

    Returns the per-image balanced KL and the coefficients used.
    """
    kl = torch.stack(kl_groups, dim=1)  # (B, G)
    if alpha is None or beta >= 1.0:
        return beta * kl.sum(dim=1), torch.ones(kl.shape[1], device=kl.device)
    kappa = kl.detach().abs().mean(dim=0) + 0.01  # mean of |KL|: one-sample KLs (flows) can be negative
    weights = kappa / alpha.to(kl.device)
    coeffs = weights * kl.shape[1] / weights.sum()
    return beta * (kl * coeffs).sum(dim=1), coeffs


def spectral_lambda(beta: float, coeff: float, anneal: bool, init: float) -> float:
    """λ_t: log-linear from ``init`` to ``coeff`` as β goes 0 → 1 when annealing, else constant."""
    if not anneal or coeff <= 0:
        return coeff
    return math.exp((1.0 - beta) * math.log(init) + beta * math.log(coeff))


def _used_weight(layer: nn.Module) -> torch.Tensor:
    """The weight the layer applied in this step's forward pass (taken once), else recomputed."""
    if isinstance(layer, (Conv2D, ARConv2d)):
        cached, layer.weight_cache = layer.weight_cache, None
        if cached is not None and cached[1] == layer.weight._version:  # not updated since that forward
            return cached[0]
        return layer.normalized_weight()
    assert isinstance(layer, nn.Conv2d)
    return layer.weight


class SpectralRegularizer(nn.Module):
    """Σ of the largest singular value of every conv weight, by batched power iteration.

    Weights of the same shape are stacked and share one batched iteration. The u/v vectors are buffers,
    so they are saved in checkpoints and restored on resume (the official code re-initialises them).
    """

    def __init__(self, model: nn.Module, iterations: int = 4) -> None:
        super().__init__()
        self.iterations = iterations
        self.layers = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, layer in enumerate(self.layers):
            w = layer.weight
            by_shape.setdefault((w.shape[0], w[0].numel()), []).append(i)
        self.groups = list(by_shape.items())
        for k, ((rows, cols), members) in enumerate(self.groups):
            self.register_buffer(f"u{k}", F.normalize(torch.randn(len(members), rows), dim=1, eps=NORMALIZE_EPS))
            self.register_buffer(f"v{k}", F.normalize(torch.randn(len(members), cols), dim=1, eps=NORMALIZE_EPS))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self) -> torch.Tensor:
        iterations = self.iterations * (10 if int(self.calls) == 0 else 1)
        total = torch.zeros((), device=self.calls.device)
        for k, ((rows, cols), members) in enumerate(self.groups):
            weights = torch.stack([_used_weight(self.layers[i]).reshape(rows, cols) for i in members])
            u, v = getattr(self, f"u{k}"), getattr(self, f"v{k}")
            with torch.no_grad():
                w = weights.detach().float()
                for _ in range(iterations):
                    v = F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), dim=1, eps=NORMALIZE_EPS)
                    u = F.normalize(torch.bmm(w, v.unsqueeze(2)).squeeze(2), dim=1, eps=NORMALIZE_EPS)
                getattr(self, f"u{k}").copy_(u)
                getattr(self, f"v{k}").copy_(v)
            sigma = torch.bmm(u.unsqueeze(1), torch.bmm(weights.float(), v.unsqueeze(2)))
            total = total + sigma.sum()
        self.calls += 1
        return total


def bn_regularization(model: nn.Module) -> torch.Tensor:
    """Σ over affine batch norms of max_c |γ_c|: any torch batch-norm class, so SyncBatchNorm counts too."""
    terms = [m.weight.abs().max() for m in model.modules() if is_batch_norm(m) and m.affine]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
