"""Dataset loading for training and evaluation.

Every dataset is decoded once, at construction, into one uint8 tensor ``(N, C, H, W)``; an item is a slice of it
divided by 255. The datasets are small and training is CPU-bound, so a cheap ``__getitem__`` matters more than memory.
Dynamic binarization and bit reduction are batch-wise (``prepare_batch``) so that they run on the training device and
draw from the global torch RNG, which makes runs reproducible from a seed.

The file formats are read in :mod:`.data_formats`, image folders in :mod:`.image_folders`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .data_formats import DataError, Split, data_root, load_amat, load_cifar10, load_idx_file, load_mnist
from .image_folders import PERMUTATION_FILE, RESAMPLE, CropBox, decode_images, partition_files
from .schema import DataConfig

__all__ = [
    "PERMUTATION_FILE",
    "DataError",
    "ImageTensorDataset",
    "build_dataset",
    "needs_binarize",
    "prepare_batch",
    "random_hflip",
]


class ImageTensorDataset(Dataset[torch.Tensor]):
    """Images held as one uint8 tensor ``(N, C, H, W)`` (``.images``); items are float32 in [0, 1]."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index].float().div_(255)

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        # The DataLoader calls this with a whole batch: one gather and one conversion instead of one per image.
        return list(self.images[torch.as_tensor(indices, dtype=torch.long)].float().div_(255).unbind(0))


# ------------------------------------------------------------------------------------------ public API
def build_dataset(cfg: DataConfig, *, split: Split, resolution: int, channels: int) -> ImageTensorDataset:
    """The ``split`` images of ``cfg`` as float32 ``(channels, resolution, resolution)`` items in [0, 1]."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    limit = cfg.limit_train if split == "train" else cfg.limit_eval
    images = _load_uint8(cfg, split, limit, resolution, channels)
    _, c, h, w = images.shape
    if (c, h, w) != (channels, resolution, resolution):
        raise DataError(
            f"{cfg.dataset}: the images are {c}×{h}×{w} (channels × height × width"
            f"{', after data.pad' if cfg.dataset in ('mnist', 'idx', 'binarized_mnist') else ''}), "
            f"but the model expects {channels}×{resolution}×{resolution}"
        )
    if not images.flags.writeable:  # a view of a bytes buffer; torch wants memory it may write
        images = images.copy()
    return ImageTensorDataset(torch.from_numpy(np.ascontiguousarray(images)))


def prepare_batch(x: torch.Tensor, *, binarize: bool, num_bits: int) -> torch.Tensor:
    """Batch-wise transform of float images in [0, 1]: dynamic binarization, then reduction to ``num_bits``."""
    if binarize:
        x = torch.bernoulli(x)  # a fresh draw per call, from the global RNG, so a seed fixes the whole run
    if num_bits < 8:
        # Rounding first makes k/255 land on level k exactly; float32 can give k - 1e-5 and floor into the bin below.
        x = torch.floor(torch.round(x * 255) / 2 ** (8 - num_bits)) / (2**num_bits - 1)
    return x


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Each image of the batch ``(B, C, H, W)`` flipped left-right with probability 1/2 (the official training
    augmentation). Drawn from the global RNG on the batch's device, so a seed (and a resumed run) fixes it."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def needs_binarize(cfg: DataConfig) -> bool:
    """Whether ``prepare_batch`` must binarize: grey-level data under ``binarize: dynamic``."""
    return cfg.dataset in ("mnist", "idx") and cfg.binarize == "dynamic"


# ---------------------------------------------------------------------------------------- dispatching
def _load_uint8(cfg: DataConfig, split: Split, limit: int | None, resolution: int, channels: int) -> np.ndarray:
    if cfg.dataset == "mnist":
        return _pad(load_mnist(cfg, split)[:limit], cfg.pad)
    if cfg.dataset == "idx":
        name = cfg.train_images if split == "train" else cfg.test_images
        return _pad(load_idx_file(data_root(cfg), name, "IDX")[:limit], cfg.pad)
    if cfg.dataset == "binarized_mnist":
        return _pad(load_amat(data_root(cfg), split)[:limit], cfg.pad)
    if cfg.dataset == "cifar10":
        return load_cifar10(data_root(cfg), split, limit)
    if cfg.dataset == "image_folder":
        files = partition_files(cfg, data_root(cfg), split)[:limit]
        box = CropBox(cfg.crop_box, cfg.crop_box_width) if cfg.crop_box is not None else None
        return decode_images(
            files,
            channels=channels,
            crop=cfg.center_crop,
            resolution=resolution,
            box=box,
            resample=RESAMPLE[cfg.resize_filter],
        )
    raise DataError(f"dataset '{cfg.dataset}' has no file loader in nvae_search.data")


def _pad(images: np.ndarray, pad: int) -> np.ndarray:
    """``(N, H, W)`` grey images → ``(N, 1, H + 2·pad, W + 2·pad)``, zero border."""
    return np.pad(images, ((0, 0), (pad, pad), (pad, pad)))[:, None]
