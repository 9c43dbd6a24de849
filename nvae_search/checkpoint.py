"""Atomic, weights-only checkpoints."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config_io import atomic_write_bytes

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "nvae-search/checkpoint/v1"


class CheckpointError(Exception):
    """A checkpoint that cannot be read: missing, truncated, or not written by this toolkit."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Serialise to memory first, then write and rename, so a kill never leaves a half-written file."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no checkpoint file here")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"{p}: not a readable nvae-search checkpoint (truncated or foreign file): {reason}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an nvae-search checkpoint (format tag {FORMAT!r} missing)")
    return state
