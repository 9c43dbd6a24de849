"""Atomic, weights-only checkpoints, and the checks that a loaded one fits the run it is loaded into."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config_io import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "nvae-search/checkpoint/v1"
# What `eval` and `sample` need (load_run asks for them); training resumes need more (the trainer's own list).
MODEL_KEYS = ("model", "step")
_SHOWN = 3  # mismatching weight names listed per kind: enough to recognise the difference, still one screen


class CheckpointError(Exception):
    """A checkpoint that cannot be read: missing, truncated, or not written by this toolkit."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Serialise to memory first, then write and rename, so a kill never leaves a half-written file."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    required: Sequence[str] = (),
) -> dict[str, Any]:
    """Load with ``weights_only=True`` (a pickled object that would run code is refused, never executed) and
    check that the ``required`` entries are there, the weights are tensors and the step is an integer."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no checkpoint file here")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # untrusted bytes: the weights-only unpickler fails in many ways (IndexError, …)
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"{p}: not a readable nvae-search checkpoint (truncated or foreign file): {reason}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an nvae-search checkpoint (format tag {FORMAT!r} missing)")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{p}: the checkpoint lacks {', '.join(missing)} (damaged, or from another tool)")
    step = state.get("step")
    if "step" in state and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise CheckpointError(f"{p}: step is {step!r}, expected a non-negative integer")
    if "model" in state and not _is_weights(state["model"]):
        raise CheckpointError(f"{p}: model is not a mapping of weight names to tensors")
    return state


def _is_weights(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def check_weights(module: torch.nn.Module, weights: Mapping[str, Any], source: str | os.PathLike[str]) -> None:
    """Refuse weights of another architecture, naming what differs, before ``load_state_dict`` fails on them."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [
        f"{k}: {_shape(weights[k])} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and _shape(weights[k]) != tuple(v.shape)
    ]
    parts = [
        _listing(f"{len(missing)} weights of the recipe's network are missing", missing),
        _listing(f"{len(unexpected)} weights are not in the recipe's network", unexpected),
        _listing(f"{len(reshaped)} weights have another shape (checkpoint vs recipe)", reshaped),
    ]
    found = [part for part, names in zip(parts, (missing, unexpected, reshaped), strict=True) if names]
    if found:
        raise CheckpointError(
            f"{source}: holds another architecture than the recipe's (was the recipe changed?): " + "; ".join(found)
        )


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _listing(what: str, names: Sequence[str]) -> str:
    more = f", … {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"{what} ({', '.join(names[:_SHOWN])}{more})"
