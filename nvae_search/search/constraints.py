"""Constraints a space puts on its trials before anything is built: today, the GPU memory of a training step.

A trial predicted (by :mod:`nvae_search.memory`, on fake tensors) to need more than ``constraints.gpu_memory_gib`` is
pruned with status ``over_memory`` and the prediction, untrained: out-of-memory at trial start is the most common
failure NVAE users report. One that runs out of CUDA memory all the same (no limit set, or a device with less free
memory than the limit says) ends the same way, with ``oom`` recording the error, and the worker goes on.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

from ..schema import Recipe
from ..spaces import Space
from ..status import TrialStatus
from .trial import InvalidCombination

__all__ = ["OutOfDeviceMemory", "OverMemory", "check_memory_constraint", "out_of_memory_as_over_memory"]

GIB = 2**30


class OverMemory(InvalidCombination):
    """A trial predicted to need more GPU memory than its space allows: pruned before anything is built on it."""

    status = TrialStatus.OVER_MEMORY

    def __init__(self, prediction: Any, limit_gib: float) -> None:
        super().__init__(
            f"predicted peak {prediction.peak_gib:.2f} GiB > gpu_memory_gib {limit_gib:g} at batch {prediction.batch}, "
            f"{prediction.precision}, checkpointing {prediction.checkpointing}"
        )
        self.attrs: dict[str, Any] = {"memory": prediction.to_dict(), "predicted_peak_gib": prediction.peak_gib}


def check_memory_constraint(space: Space, recipe: Recipe, workers: int = 1) -> Any:
    """Raise :class:`OverMemory` when the space limits GPU memory and this trial's recipe, at the batch of one of its
    ``workers`` processes, is predicted over it; returns the prediction (None without a limit)."""
    limit = space.constraints.gpu_memory_gib
    if limit is None:
        return None
    from ..memory import predict_step_memory

    prediction = predict_step_memory(recipe, device="cuda", batch=recipe.train.per_process_batch(workers))
    if prediction.peak_bytes > limit * GIB:
        raise OverMemory(prediction, limit)
    return prediction


class OutOfDeviceMemory(InvalidCombination):
    """A trial that ran out of CUDA memory while it trained: the configuration does not fit this device. Pruned with
    status ``over_memory`` like a predicted overflow, not a failure that would end the worker."""

    status = TrialStatus.OVER_MEMORY

    def __init__(self, error: str) -> None:
        super().__init__(f"out of CUDA memory while training (measured): {error}")
        self.attrs: dict[str, Any] = {"oom": error}

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return type(self), (self.attrs["oom"],)


@contextlib.contextmanager
def out_of_memory_as_over_memory() -> Iterator[None]:
    """Turn ``torch.cuda.OutOfMemoryError`` raised inside into :class:`OutOfDeviceMemory`, after the failed trial's
    tensors are freed and the caching allocator's blocks returned, so the worker's next trial starts clean."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        error = str(err).strip().splitlines()[0] if str(err).strip() else "CUDA out of memory"
    else:
        return
    # The traceback (and the trainer's tensors its frames hold) is gone once the except block has ended.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise OutOfDeviceMemory(error)
