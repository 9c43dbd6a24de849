"""Image folders: the files of a split (train/ and valid/ folders, CelebA's official partition file, a saved seeded
permutation, or a held-out tail) and their decoding (center crop or a crop box scaled to each image, then resize)
into one uint8 array (NVAE_SPEC §5)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .config_io import atomic_write_text
from .data_formats import DataError, Split, require_folder
from .schema import DataConfig

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_VALID_FOLDERS = ("valid", "val", "test")
_IMAGE_EXPECTED = "PNG/JPEG images (*.png, *.jpg, *.jpeg), optionally split into train/ and valid/ (or val/, test/)"
_PIL_MODES: dict[int, str] = {1: "L", 3: "RGB", 4: "RGBA"}


# -------------------------------------------------------------------------------------- image folder
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())


def image_folder_files(root: Path, split: Split, valid_fraction: float) -> list[Path]:
    """The files of one split: train/ and valid/ subfolders when both exist, else a held-out tail of the sorted list."""
    what = "image folder"
    require_folder(root, what, _IMAGE_EXPECTED)
    valid = next((root / name for name in _VALID_FOLDERS if (root / name).is_dir()), None)
    if (root / "train").is_dir() and valid is not None:
        folder = root / "train" if split == "train" else valid
        files = _image_files(folder)
        if not files:
            raise DataError(f"{what}: expected {_IMAGE_EXPECTED} in {folder}; found none")
        return files
    files = _image_files(root)
    if not files:
        raise DataError(f"{what}: expected {_IMAGE_EXPECTED} in {root}; found none")
    if valid_fraction == 0:
        return files  # no held-out set: evaluation sees the training images
    held_out = max(1, round(len(files) * valid_fraction))
    if held_out >= len(files):
        raise DataError(
            f"{what}: {root} holds {len(files)} images, too few to hold out valid_fraction={valid_fraction} "
            "and keep some for training"
        )
    return files[:-held_out] if split == "train" else files[-held_out:]


@dataclass(frozen=True)
class _Decoding:
    """How every image of a folder is decoded: PIL mode, center crop, crop box, output side and resize filter."""

    mode: str
    crop: int | None
    resolution: int
    box: CropBox | None
    resample: Image.Resampling


def decode_images(
    files: Sequence[Path],
    *,
    channels: int,
    crop: int | None,
    resolution: int,
    box: CropBox | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> np.ndarray:
    mode = _PIL_MODES.get(channels)
    if mode is None:
        raise DataError(f"image folder: images can be decoded to 1, 3 or 4 channels, not {channels}")
    how = _Decoding(mode, crop, resolution, box, resample)
    out = np.empty((len(files), channels, resolution, resolution), np.uint8)
    for i, path in enumerate(files):
        out[i] = _decode_image(path, how)
    return out


def _decode_image(path: Path, how: _Decoding) -> np.ndarray:
    mode, crop, resolution, box = how.mode, how.crop, how.resolution, how.box
    try:
        with Image.open(path) as src:
            img = src.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"image folder: cannot decode {path} as a PNG/JPEG image ({exc})") from exc
    if crop is not None:
        w, h = img.size
        if crop > min(w, h):
            raise DataError(f"image folder: {path} is {w}×{h}, smaller than data.center_crop={crop}")
        left, top = round((w - crop) / 2), round((h - crop) / 2)  # torchvision CenterCrop's offsets
        img = img.crop((left, top, left + crop, top + crop))
    if box is not None:
        img = img.crop(box.scaled(img.size, path))
    if img.size != (resolution, resolution):
        # Pillow widens the kernel by the reduction factor, so either filter antialiases a downscale. BICUBIC (the
        # default) is sharper and rings less than LANCZOS on hard edges; BILINEAR is torchvision Resize's default,
        # which the official CelebA 64 loader uses.
        img = img.resize((resolution, resolution), how.resample)
    pixels = np.asarray(img, np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


# ----------------------------------------------------------------------------- official preparation
RESAMPLE: dict[str, Image.Resampling] = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
PERMUTATION_FILE = "nvae_search_partition.json"
PERMUTATION_SEED = 0


class CropBox:
    """(left, top, width, height) given on an image ``reference_width`` wide, scaled to each image's width, so the
    CelebA box (15, 40, 148, 148 on 178 × 218) also fits a half-resolution copy (89 × 109: 8, 20, 74, 74)."""

    def __init__(self, box: tuple[int, int, int, int], reference_width: int | None) -> None:
        self.box, self.reference_width = box, reference_width

    def scaled(self, size: tuple[int, int], path: Path) -> tuple[int, int, int, int]:
        w, h = size
        scale = w / self.reference_width if self.reference_width else 1.0
        left, top, width, height = self.box
        # Half-up rounding of the edges (not Python's round-half-even): 7.5 → 8 and 81.5 → 82 keep the width 74.
        edges = tuple(math.floor(v * scale + 0.5) for v in (left, top, left + width, top + height))
        if edges[0] < 0 or edges[1] < 0 or edges[2] > w or edges[3] > h or edges[2] <= edges[0] or edges[3] <= edges[1]:
            raise DataError(
                f"image folder: {path} is {w}×{h}; data.crop_box {list(self.box)}"
                f"{f' scaled by {w}/{self.reference_width}' if self.reference_width else ''} gives {list(edges)}, "
                "which is not inside the image"
            )
        return edges  # type: ignore[return-value]


def partition_files(cfg: DataConfig, root: Path, split: Split) -> list[Path]:
    """The files of ``split`` under the recipe's ``data.partition`` rule (NVAE_SPEC §5)."""
    if cfg.partition == "folders":
        return _required_folder_files(root, split)
    if cfg.partition == "celeba":
        listing = next(
            (d / CELEBA_PARTITION_FILE for d in (root, root.parent) if (d / CELEBA_PARTITION_FILE).is_file()), None
        )
        if listing is not None:
            return _celeba_partition_files(root, listing, split)
    if cfg.partition == "permutation":
        return _permutation_files(root, split, cfg.valid_fraction)
    return image_folder_files(root, split, cfg.valid_fraction)


def _required_folder_files(root: Path, split: Split) -> list[Path]:
    what = "image folder (data.partition: folders)"
    expected = f"train/ and a separate validation folder ({', '.join(n + '/' for n in _VALID_FOLDERS)})"
    require_folder(root, what, expected)
    valid = next((root / name for name in _VALID_FOLDERS if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or valid is None:
        raise DataError(f"{what}: expected {expected} in {root}")
    folder = root / "train" if split == "train" else valid
    files = _image_files(folder)
    if not files:
        raise DataError(f"{what}: expected {_IMAGE_EXPECTED} in {folder}; found none")
    return files


def _celeba_partition_files(root: Path, listing: Path, split: Split) -> list[Path]:
    """CelebA's official partition: 0 = train, 1 = validation (the official code evaluates on it), 2 = test."""
    wanted = "0" if split == "train" else "1"
    names: list[str] = []
    for number, line in enumerate(listing.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"CelebA: {listing} line {number}: expected '<image file> <0|1|2>', got {line!r}")
        if parts[1] == wanted:
            names.append(parts[0])
    files = [root / name for name in sorted(names) if (root / name).is_file()]
    if not files:
        label = "train (0)" if split == "train" else "validation (1)"
        raise DataError(
            f"CelebA: none of the {len(names)} images of partition {label} listed in {listing} is in {root}"
        )
    return files


def _permutation_files(root: Path, split: Split, valid_fraction: float) -> list[Path]:
    """A seeded permutation of the sorted images, saved beside them on first use and reused after; the last
    ``valid_fraction`` of it is held out (FFHQ: 63,000 / 7,000 of 70,000)."""
    what = "image folder (data.partition: permutation)"
    require_folder(root, what, _IMAGE_EXPECTED)
    files = _image_files(root)
    if not files:
        raise DataError(f"{what}: expected {_IMAGE_EXPECTED} in {root}; found none")
    names = [f.relative_to(root).as_posix() for f in files]
    saved = root / PERMUTATION_FILE
    if saved.is_file():
        try:
            order = json.loads(saved.read_text())["order"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{what}: {saved} is not a partition file written by nvae_search ({exc})") from exc
        if sorted(order) != names:
            raise DataError(
                f"{what}: {saved} lists {len(order)} images but {root} now holds {len(names)} others or more; "
                "delete the file to draw a new permutation (evaluation results will no longer be comparable)"
            )
    else:
        perm = np.random.default_rng(PERMUTATION_SEED).permutation(len(names))
        order = [names[i] for i in perm]
        try:
            atomic_write_text(saved, json.dumps({"seed": PERMUTATION_SEED, "order": order}))
        except OSError as exc:
            raise DataError(f"{what}: cannot save the permutation beside the data as {saved} ({exc})") from exc
    held_out = max(1, round(len(order) * valid_fraction))
    if held_out >= len(order):
        raise DataError(f"{what}: {root} holds {len(order)} images, too few to hold out {valid_fraction}")
    chosen = order[:-held_out] if split == "train" else order[-held_out:]
    return [root / name for name in chosen]
