"""Dataset loading for training and evaluation.

Every dataset is decoded once, at construction, into one uint8 tensor ``(N, C, H, W)``; an item is a slice of it
divided by 255. The datasets are small and training is CPU-bound, so a cheap ``__getitem__`` matters more than memory.
Dynamic binarization and bit reduction are batch-wise (``prepare_batch``) so that they run on the training device and
draw from the global torch RNG, which makes runs reproducible from a seed.
"""

from __future__ import annotations

import codecs
import gzip
import json
import math
import pickle
import zlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .config_io import atomic_write_text
from .schema import DataConfig

__all__ = ["DataError", "ImageTensorDataset", "build_dataset", "needs_binarize", "prepare_batch", "random_hflip"]

Split = Literal["train", "test"]

_MNIST_FILES: dict[str, str] = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
_EMBEDDED_MNIST = f"{__package__}.datasets.mnist"
_IDX_UBYTE_3D = 0x00000803  # two zero bytes, type 0x08 (unsigned byte), 3 dimensions
_AMAT_FILES: dict[str, str] = {"train": "binarized_mnist_train.amat", "test": "binarized_mnist_test.amat"}
_AMAT_SIDE = 28
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR_EXPECTED = "data_batch_1..5 and test_batch (python pickle batches)"
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_VALID_FOLDERS = ("valid", "val", "test")
_IMAGE_EXPECTED = "PNG/JPEG images (*.png, *.jpg, *.jpeg), optionally split into train/ and valid/ (or val/, test/)"
_PIL_MODES: dict[int, str] = {1: "L", 3: "RGB", 4: "RGBA"}


class DataError(Exception):
    """A dataset is missing or malformed; the message names the files expected and the folder searched."""


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
        return _pad(_load_mnist(cfg, split)[:limit], cfg.pad)
    if cfg.dataset == "idx":
        name = cfg.train_images if split == "train" else cfg.test_images
        return _pad(_load_idx_file(_root(cfg), name, "IDX")[:limit], cfg.pad)
    if cfg.dataset == "binarized_mnist":
        return _pad(_load_amat(_root(cfg), split)[:limit], cfg.pad)
    if cfg.dataset == "cifar10":
        return _load_cifar10(_root(cfg), split, limit)
    if cfg.dataset == "image_folder":
        files = _partition_files(cfg, _root(cfg), split)[:limit]
        box = _CropBox(cfg.crop_box, cfg.crop_box_width) if cfg.crop_box is not None else None
        return _decode_images(
            files,
            channels=channels,
            crop=cfg.center_crop,
            resolution=resolution,
            box=box,
            resample=_RESAMPLE[cfg.resize_filter],
        )
    raise DataError(f"dataset '{cfg.dataset}' has no file loader in nvae_search.data")


def _root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(f"dataset '{cfg.dataset}' needs data.root (the folder holding its files)")
    return Path(cfg.root).expanduser()


def _pad(images: np.ndarray, pad: int) -> np.ndarray:
    """``(N, H, W)`` grey images → ``(N, 1, H + 2·pad, W + 2·pad)``, zero border."""
    return np.pad(images, ((0, 0), (pad, pad), (pad, pad)))[:, None]


def _require_folder(folder: Path, what: str, expected: str) -> None:
    if not folder.is_dir():
        raise DataError(f"{what}: expected {expected} in {folder}, but that folder does not exist")


def _name_variants(name: str) -> tuple[str, str]:
    """A file name with and without ``.gz``: both the gzipped download and the unpacked file are accepted."""
    return (name, name[: -len(".gz")]) if name.endswith(".gz") else (name, name + ".gz")


def _find_variant(folder: Path, name: str, what: str) -> Path:
    variants = _name_variants(name)
    expected = f"{variants[0]} (or {variants[1]})"
    _require_folder(folder, what, expected)
    for candidate in variants:
        if (folder / candidate).is_file():
            return folder / candidate
    raise DataError(f"{what}: expected {expected} in {folder}; not found")


def _decompress(raw: bytes, source: str, what: str) -> bytes:
    if raw[:2] != b"\x1f\x8b":  # the gzip magic, so names need not tell whether a file is compressed
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{what}: {source} is a damaged gzip file ({exc})") from exc


# ---------------------------------------------------------------------------------------------- IDX
def _load_mnist(cfg: DataConfig, split: Split) -> np.ndarray:
    name = _MNIST_FILES[split]
    if cfg.root:
        return _load_idx_file(_root(cfg), name, "MNIST")
    entry = resources.files(_EMBEDDED_MNIST) / name
    if not entry.is_file():
        raise DataError(
            f"MNIST: expected {name} in the embedded copy ({resources.files(_EMBEDDED_MNIST)}); "
            "reinstall nvae_search or set data.root to a folder holding the MNIST IDX files"
        )
    return _parse_idx(_decompress(entry.read_bytes(), str(entry), "MNIST"), str(entry), "MNIST")


def _load_idx_file(folder: Path, name: str, what: str) -> np.ndarray:
    path = _find_variant(folder, name, what)
    return _parse_idx(_decompress(path.read_bytes(), str(path), what), str(path), what)


def _parse_idx(data: bytes, source: str, what: str) -> np.ndarray:
    """An IDX file of unsigned bytes with 3 dimensions → ``(N, rows, cols)`` uint8 (read-only view of ``data``)."""
    if len(data) < 16:
        raise DataError(f"{what}: {source} holds {len(data)} bytes, fewer than the 16-byte IDX image header")
    magic, n, rows, cols = (int(v) for v in np.frombuffer(data, ">u4", count=4))
    if magic != _IDX_UBYTE_3D:
        raise DataError(
            f"{what}: {source} is not an IDX image file: magic number 0x{magic:08x}, "
            f"expected 0x{_IDX_UBYTE_3D:08x} (unsigned bytes, 3 dimensions)"
        )
    if not (n and rows and cols):
        raise DataError(f"{what}: {source} declares {n} images of {rows}×{cols}: no pixels")
    expected = 16 + n * rows * cols
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "followed by extra bytes"
        raise DataError(
            f"{what}: {source} holds {len(data)} bytes, but its header ({n} images of {rows}×{cols}) "
            f"needs {expected}: the file is {state}"
        )
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)


# --------------------------------------------------------------------------------------------- amat
def _load_amat(folder: Path, split: Split) -> np.ndarray:
    what = "binarized MNIST"
    path = _find_variant(folder, _AMAT_FILES[split], what)
    return _parse_amat(_decompress(path.read_bytes(), str(path), what), str(path), what)


# Byte classes of an .amat file: everything else is an error.
_BAD, _SPACE, _NEWLINE, _DIGIT = 0, 1, 2, 3
_AMAT_CLASS = np.zeros(256, np.uint8)
_AMAT_CLASS[[ord(" "), ord("\t"), ord("\r")]] = _SPACE
_AMAT_CLASS[ord("\n")] = _NEWLINE
_AMAT_CLASS[[ord("0"), ord("1")]] = _DIGIT


def _parse_amat(text: bytes, source: str, what: str) -> np.ndarray:
    """Rows of 784 space-separated 0/1 values → ``(N, 28, 28)`` uint8 in {0, 255}.

    Vectorised over the whole file (78 MB of text for the training set): a per-token Python parse takes seconds.
    """
    raw = np.frombuffer(text, np.uint8)
    kind = _AMAT_CLASS[raw]
    is_newline = kind == _NEWLINE
    is_digit = kind == _DIGIT
    expected = f"rows of {_AMAT_SIDE * _AMAT_SIDE} space-separated 0/1 values"

    def fail(pos: int, problem: str) -> DataError:
        line = int(np.count_nonzero(is_newline[:pos])) + 1
        return DataError(f"{what}: {source} line {line}: {problem}; expected {expected}")

    bad = np.flatnonzero(kind == _BAD)
    if bad.size:
        raise fail(int(bad[0]), f"unexpected character {chr(raw[bad[0]])!r}")
    glued = np.flatnonzero(is_digit[1:] & is_digit[:-1])  # "10" or "11": a value that is not a single 0/1
    if glued.size:
        raise fail(int(glued[0]), "a value other than 0 or 1")
    starts = np.concatenate(([0], np.flatnonzero(is_newline) + 1))
    starts = starts[starts < raw.size]
    counts = np.add.reduceat(is_digit, starts, dtype=np.int64) if starts.size else np.zeros(0, np.int64)
    wrong = np.flatnonzero((counts > 0) & (counts != _AMAT_SIDE * _AMAT_SIDE))
    if wrong.size:
        raise fail(int(starts[wrong[0]]), f"{counts[wrong[0]]} values")
    if not np.any(counts):
        raise DataError(f"{what}: {source} holds no rows; expected {expected}")
    bits = raw[is_digit] - np.uint8(ord("0"))
    return (bits * np.uint8(255)).reshape(-1, _AMAT_SIDE, _AMAT_SIDE)


# ------------------------------------------------------------------------------------------ CIFAR-10
# Exactly what a pickled dict of numpy arrays needs; any other global (os.system, eval, ...) is refused unrun.
# `_codecs.encode` rebuilds bytes pickled by Python 3 under protocol 2; it only encodes strings.
_RECONSTRUCT = np.empty(0, np.uint8).__reduce__()[0]
_SCALAR = np.uint8(0).__reduce__()[0]
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, strings, numbers and numpy arrays, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def _load_cifar10(root: Path, split: Split, limit: int | None) -> np.ndarray:
    nested = root / _CIFAR_FOLDER
    folder = nested if nested.is_dir() else root
    where = f"{nested} or {root}"
    if not root.is_dir():
        raise DataError(f"CIFAR-10: expected {_CIFAR_EXPECTED} in {where}, but {root} does not exist")
    missing = [name for name in _CIFAR_FILES[split] if not (folder / name).is_file()]
    if missing:
        hint = " (extract cifar-10-python.tar.gz first)" if (root / "cifar-10-python.tar.gz").is_file() else ""
        raise DataError(f"CIFAR-10: expected {_CIFAR_EXPECTED} in {where}; missing: {', '.join(missing)}{hint}")
    batches: list[np.ndarray] = []
    for name in _CIFAR_FILES[split]:
        if limit is not None and sum(len(b) for b in batches) >= limit:
            break  # the limit is met: skip unpickling the remaining batches
        batches.append(_read_cifar_batch(folder / name, where))
    return np.concatenate(batches)[:limit]


def _read_cifar_batch(path: Path, where: str) -> np.ndarray:
    """One pickle batch → ``(N, 3, 32, 32)`` uint8; its rows are already channel-major R, G, B planes of 32×32."""

    def fail(problem: str) -> DataError:
        return DataError(f"CIFAR-10: {path} is not a CIFAR-10 batch ({problem}); expected {_CIFAR_EXPECTED} in {where}")

    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()  # bytes: the batches were pickled by Python 2
    except Exception as exc:  # whatever an untrusted file makes the unpickler raise is the same data error
        raise fail(f"{type(exc).__name__}: {exc}") from exc
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise fail(f"its b'data' entry should be an N×3072 uint8 array, found {found}")
    return data.reshape(-1, 3, 32, 32)


# -------------------------------------------------------------------------------------- image folder
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())


def _image_folder_files(root: Path, split: Split, valid_fraction: float) -> list[Path]:
    """The files of one split: train/ and valid/ subfolders when both exist, else a held-out tail of the sorted list."""
    what = "image folder"
    _require_folder(root, what, _IMAGE_EXPECTED)
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


def _decode_images(
    files: Sequence[Path],
    *,
    channels: int,
    crop: int | None,
    resolution: int,
    box: _CropBox | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> np.ndarray:
    mode = _PIL_MODES.get(channels)
    if mode is None:
        raise DataError(f"image folder: images can be decoded to 1, 3 or 4 channels, not {channels}")
    out = np.empty((len(files), channels, resolution, resolution), np.uint8)
    for i, path in enumerate(files):
        out[i] = _decode_image(path, mode=mode, crop=crop, resolution=resolution, box=box, resample=resample)
    return out


def _decode_image(
    path: Path,
    *,
    mode: str,
    crop: int | None,
    resolution: int,
    box: _CropBox | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> np.ndarray:
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
        img = img.resize((resolution, resolution), resample)
    pixels = np.asarray(img, np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


# ----------------------------------------------------------------------------- official preparation
_RESAMPLE: dict[str, Image.Resampling] = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
CELEBA_PARTITION_FILE = "list_eval_partition.txt"
PERMUTATION_FILE = "nvae_search_partition.json"
PERMUTATION_SEED = 0


class _CropBox:
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


def _partition_files(cfg: DataConfig, root: Path, split: Split) -> list[Path]:
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
    return _image_folder_files(root, split, cfg.valid_fraction)


def _required_folder_files(root: Path, split: Split) -> list[Path]:
    what = "image folder (data.partition: folders)"
    expected = f"train/ and a separate validation folder ({', '.join(n + '/' for n in _VALID_FOLDERS)})"
    _require_folder(root, what, expected)
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
    _require_folder(root, what, _IMAGE_EXPECTED)
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
