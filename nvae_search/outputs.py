"""Sample and reconstruction files beyond the single PNG grid: one image per sample for metric tools (a folder of
PNGs or an ``.npz``), temperature sweeps (one grid row per temperature) and inputs beside reconstructions."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config_io import atomic_write_bytes
from .data import build_dataset, needs_binarize, prepare_batch
from .images import make_grid, save_png
from .runs import LoadedRun, readjust_batch_norm

NPZ_KEY = "arr_0"  # the key FID tools read from an .npz of samples (N, H, W, 3) uint8


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [0, 1] → (N, H, W, C) uint8."""
    return (images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_folder(images: torch.Tensor, folder: Path) -> Path:
    """One PNG per image, ``000000.png`` …, in the data's channels (grey stays grey)."""
    for i, array in enumerate(to_uint8(images)):
        atomic_write_bytes(folder / f"{i:06d}.png", _png_bytes(array))
    return folder


def save_npz(images: torch.Tensor, path: Path) -> Path:
    """All images in one array under ``arr_0``, grey expanded to RGB as Inception-based metrics expect."""
    arrays = to_uint8(images)
    if arrays.shape[-1] == 1:
        arrays = np.repeat(arrays, 3, axis=-1)
    buffer = io.BytesIO()
    np.savez(buffer, **{NPZ_KEY: arrays})
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_samples(
    run: LoadedRun,
    *,
    n: int | None,
    temperatures: list[float | None],
    fmt: str,
    out: Path | None = None,
    readjust_bn: int | None = None,
    seed: int | None = None,
    scale_pixels: bool = False,
) -> Path:
    """Draw ``n`` samples at each temperature and write them as a grid (a row per temperature), a folder of PNGs or
    an ``.npz`` (one sub-folder or file per temperature when there are several); returns the path written.

    Unset values come from the recipe's ``eval`` section, as for :func:`nvae_search.runs.sample_run`; pixels are drawn
    at temperature 1 unless ``scale_pixels``."""
    defaults = run.recipe.eval
    n = defaults.num_samples if n is None else n
    temperatures = [defaults.temperature if t is None else t for t in temperatures]
    readjust_bn = defaults.readjust_bn_steps if readjust_bn is None else readjust_bn
    if seed is not None:
        torch.manual_seed(seed)
    drawn: list[torch.Tensor] = []
    for t in temperatures:
        if readjust_bn:
            readjust_batch_norm(run.model, readjust_bn, t)
        drawn.append(run.model.sample(n, t, run.device, pixel_temperature=t if scale_pixels else 1.0))
    tag = "-".join(f"{t:g}" for t in temperatures)
    if fmt == "grid":
        path = out or run.run_dir / f"samples_t{tag}_step{run.step}.png"
        save_png(make_grid(torch.cat(drawn), nrow=n), path)
        return path
    if fmt == "folder":
        root = out or run.run_dir / f"samples_t{tag}_step{run.step}"
        for t, images in zip(temperatures, drawn, strict=True):
            save_folder(images, root if len(temperatures) == 1 else root / f"t{t:g}")
        return root
    if len(temperatures) == 1:
        return save_npz(drawn[0], out or run.run_dir / f"samples_t{tag}_step{run.step}.npz")
    root = out or run.run_dir / f"samples_step{run.step}"
    for t, images in zip(temperatures, drawn, strict=True):
        save_npz(images, root / f"samples_t{t:g}.npz")
    return root


@torch.no_grad()
def reconstructions(run: LoadedRun, x: torch.Tensor) -> torch.Tensor:
    """The decoder's mean (Bernoulli) or a sample at temperature 1 for each input, as training logs them."""
    output = run.model(x).output
    return output.mean() if run.recipe.model.output.distribution == "bernoulli" else output.sample(1.0)


def _first_images(run: LoadedRun, n: int) -> torch.Tensor:
    recipe = run.recipe
    dataset = build_dataset(
        recipe.data, split=recipe.eval.split, resolution=recipe.model.resolution, channels=recipe.model.input_channels
    )
    batch = torch.stack([_image_of(dataset[i]) for i in range(min(n, len(dataset)))])
    binarize = needs_binarize(recipe.data)
    return prepare_batch(batch, binarize=binarize, num_bits=recipe.model.output.num_x_bits).to(run.device)


def _image_of(item: Any) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


def reconstruct_run(run: LoadedRun, *, n: int = 16, per_row: int = 8, out: Path | None = None) -> Path:
    """A PNG of the first ``n`` evaluation images: each row of inputs is followed by their reconstructions."""
    x = _first_images(run, n)
    recon = reconstructions(run, x)
    rows = [part for i in range(0, len(x), per_row) for part in (x[i : i + per_row], recon[i : i + per_row])]
    width = min(per_row, len(x))
    padded = [torch.cat([r, torch.ones(width - len(r), *r.shape[1:], device=r.device)]) for r in rows]
    path = out or run.run_dir / f"reconstructions_step{run.step}.png"
    save_png(make_grid(torch.cat(padded), nrow=width), path)
    return path
