"""Batch-norm statistics for the EMA copy of the weights (``train.ema_decay``).

``AveragedModel(use_buffers=True)`` averages the BN running statistics along with the weights, but an average of
statistics is not the statistics of the averaged network: a 30-minute ``recipes/cpu/mnist_searched.yaml`` run with
``ema_decay: 0.999`` evaluated at 94.38 nats (IW-100, 2,000 test images) on its averaged statistics, 88.02 on
re-estimated ones (its trained weights: 87.52; docs/search-campaign.md). So, as SWA does
with ``torch.optim.swa_utils.update_bn``, the EMA copy's statistics are re-estimated on training batches before it
is used: at the end of a run (the checkpoint then says so) and when ``eval`` or ``sample`` loads an EMA copy whose
statistics were not re-estimated (a mid-run checkpoint). The batches and the latent noise come from the run's seed,
so the same checkpoint always gets the same statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from ..data import ImageTensorDataset

ORDER_SEED_OFFSET = 7_919  # the batches' order: the run's seed shifted, so that it is not the first epoch's order


def recalibrate_batch_norm(
    model: nn.Module,
    dataset: ImageTensorDataset,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    *,
    batches: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> None:
    """Re-estimate every BN layer's running statistics of ``model`` (a cumulative average over ``batches`` training
    batches, forward passes in training mode without gradients). The caller's random state is left as it was."""
    if batches <= 0:
        return
    generator = torch.Generator().manual_seed(seed + ORDER_SEED_OFFSET)
    count = min(batches * batch_size, len(dataset))
    order = torch.randperm(len(dataset), generator=generator)[:count]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        inputs = (
            prepare(torch.stack(dataset.__getitems__(order[start : start + batch_size].tolist())).to(device))
            for start in range(0, count, batch_size)
        )
        update_bn(inputs, model)
