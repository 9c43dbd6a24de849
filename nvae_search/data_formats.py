"""Readers of the dataset file formats: MNIST IDX (gzipped or not, or the copy embedded in the package), binarized
MNIST ``.amat`` text and CIFAR-10 python pickle batches (unpickled with an allow-list, never a full unpickle).

Each reader returns uint8 arrays and reports a missing or malformed file as a :class:`DataError` naming the files
expected and the folder searched.
"""

from __future__ import annotations

import codecs
import gzip
import pickle
import zlib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .schema import DataConfig

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


class DataError(Exception):
    """A dataset is missing or malformed; the message names the files expected and the folder searched."""


def data_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(f"dataset '{cfg.dataset}' needs data.root (the folder holding its files)")
    return Path(cfg.root).expanduser()


def require_folder(folder: Path, what: str, expected: str) -> None:
    if not folder.is_dir():
        raise DataError(f"{what}: expected {expected} in {folder}, but that folder does not exist")


def _name_variants(name: str) -> tuple[str, str]:
    """A file name with and without ``.gz``: both the gzipped download and the unpacked file are accepted."""
    return (name, name[: -len(".gz")]) if name.endswith(".gz") else (name, name + ".gz")


def _find_variant(folder: Path, name: str, what: str) -> Path:
    variants = _name_variants(name)
    expected = f"{variants[0]} (or {variants[1]})"
    require_folder(folder, what, expected)
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
def load_mnist(cfg: DataConfig, split: Split) -> np.ndarray:
    name = _MNIST_FILES[split]
    if cfg.root:
        return load_idx_file(data_root(cfg), name, "MNIST")
    entry = resources.files(_EMBEDDED_MNIST) / name
    if not entry.is_file():
        raise DataError(
            f"MNIST: expected {name} in the embedded copy ({resources.files(_EMBEDDED_MNIST)}); "
            "reinstall nvae_search or set data.root to a folder holding the MNIST IDX files"
        )
    return _parse_idx(_decompress(entry.read_bytes(), str(entry), "MNIST"), str(entry), "MNIST")


def load_idx_file(folder: Path, name: str, what: str) -> np.ndarray:
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
def load_amat(folder: Path, split: Split) -> np.ndarray:
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


def load_cifar10(root: Path, split: Split, limit: int | None) -> np.ndarray:
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
