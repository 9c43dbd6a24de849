"""Image grids for TensorBoard and PNG files (no torchvision needed)."""

from __future__ import annotations

import io
import math
import os

import torch
from PIL import Image

from .config_io import atomic_write_bytes


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] → one (3, H', W') image with a white gap between tiles."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    images = images.detach().float().clamp(0, 1).cpu()
    if c == 1:
        images = images.expand(-1, 3, -1, -1)
    grid = torch.ones(3, rows * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i, :3]
    return grid


def save_png(grid: torch.Tensor, path: str | os.PathLike[str]) -> None:
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
