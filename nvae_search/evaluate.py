"""Importance-weighted NLL and NELBO, batched over the importance samples (NVAE_SPEC §2.9)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .model.nvae import NVAE
from .telemetry import active_units


@dataclass
class EvalResult:
    nll: float  # in `unit` (nats per image, or bits per dim)
    nelbo: float
    nll_nats: float  # per image
    nelbo_nats: float
    unit: str
    iw_samples: int
    images: int
    kl_per_group: list[float]
    active_units: list[int]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unit_for(output_kind: str) -> str:
    """Binary data is reported in nats per image, RGB data in bits per dimension, as in the paper."""
    return "nats" if output_kind == "bernoulli" else "bpd"


def to_unit(nats: float, unit: str, dims: int) -> float:
    return nats if unit == "nats" else nats / (math.log(2) * dims)


def _log_weights(model: NVAE, x: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One pass over ``samples`` posterior draws per image: log w = −R − log q + log p, the NELBO (β = 1, no
    balancing) and per-channel KLs, sample-major (``samples × B`` rows)."""
    result = model(x, samples=samples)
    recon = model.reconstruction_loss(result.output, x.repeat(samples, 1, 1, 1))
    log_w = -recon - result.log_q + result.log_p
    nelbo = recon + torch.stack(result.kl, dim=1).sum(dim=1)
    return log_w, nelbo, result.kl_per_channel


@torch.inference_mode()
def iw_bound(
    model: NVAE, x: torch.Tensor, iw_samples: int, chunk: int, sequential: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Per-image log p̂(x) = logsumexp_k log w_k − log K, and the mean NELBO over the K samples.

    Batched: ``chunk`` samples per image in one forward pass, sharing one encoder pass (BN is in eval mode, so
    images do not interact). Sequential: K full passes of the batch, as the official evaluation does.
    """
    b = x.shape[0]
    log_ws, nelbos = [], []
    kl_channels: list[torch.Tensor] | None = None
    per_pass = 1 if sequential else max(1, min(chunk, iw_samples))
    done = 0
    while done < iw_samples:
        k = min(per_pass, iw_samples - done)
        log_w, nelbo, kls = _log_weights(model, x, k)
        log_ws.append(log_w.view(k, b))
        nelbos.append(nelbo.view(k, b))
        kl_channels = kls if kl_channels is None else [a + c for a, c in zip(kl_channels, kls, strict=True)]
        done += k
    log_w_all = torch.cat(log_ws, dim=0)
    log_px = torch.logsumexp(log_w_all, dim=0) - math.log(iw_samples)
    passes = len(log_ws)
    return log_px, torch.cat(nelbos, dim=0).mean(dim=0), [k / passes for k in kl_channels or []]


def evaluate(
    model: NVAE,
    dataset: Dataset[torch.Tensor],
    *,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    iw_samples: int,
    batch_size: int = 16,
    chunk: int = 64,
    images: int | None = None,
    sequential: bool = False,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> EvalResult:
    """Evaluate the model (in eval mode, with BN running statistics) on the first ``images`` items."""
    import time

    start = time.perf_counter()
    if images is not None and images < len(dataset):  # type: ignore[arg-type]
        dataset = Subset(dataset, range(images))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    log_px_sum = nelbo_sum = 0.0
    count = 0
    kl_sum: list[torch.Tensor] | None = None
    for batch in loader:
        x = prepare(batch.to(device))
        log_px, nelbo, kls = iw_bound(model, x, iw_samples, chunk, sequential)
        log_px_sum += float(log_px.double().sum())
        nelbo_sum += float(nelbo.double().sum())
        count += x.shape[0]
        weighted = [k * x.shape[0] for k in kls]
        kl_sum = weighted if kl_sum is None else [a + b for a, b in zip(kl_sum, weighted, strict=True)]
        if on_batch is not None:
            on_batch(x.shape[0])
    model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation split holds no images")
    kl_mean = [k / count for k in kl_sum or []]
    unit = unit_for(model.arch.output)
    dims = model.arch.input_channels * (model.arch.resolution - 2 * model.arch.crop) ** 2
    nll_nats, nelbo_nats = -log_px_sum / count, nelbo_sum / count
    return EvalResult(
        nll=to_unit(nll_nats, unit, dims),
        nelbo=to_unit(nelbo_nats, unit, dims),
        nll_nats=nll_nats,
        nelbo_nats=nelbo_nats,
        unit=unit,
        iw_samples=iw_samples,
        images=count,
        kl_per_group=[float(k.sum()) for k in kl_mean],
        active_units=active_units(kl_mean),
        seconds=time.perf_counter() - start,
    )
