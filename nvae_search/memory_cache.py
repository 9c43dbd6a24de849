"""The memory predictor's disk store: traced training steps, their fits and the optimizer phase's bytes, kept by
everything they depend on, so that a network predicted once is answered by a replay (milliseconds) afterwards:
``validate --memory`` run again at another batch, the trials of a search that share an architecture.

A trace depends on the recipe's ``model`` section (architecture, loss terms, numerics), the precision and
checkpointing, the target device and where the step was simulated, torch's version and this package's code: the
store's folder is named by a hash of all of them (the code by a hash of every source file of the package), so an
upgrade or an edit never reads an older entry. The optimizer phase depends on the parameters' shapes (the model) and
on whether Adamax decays weights. Entries are written atomically; an entry that cannot be read is ignored (and
rewritten by the next simulation), and a store that cannot be written costs nothing but the speed-up.

Location: ``$NVAE_SEARCH_MEMORY_CACHE`` when it names a folder, ``off`` (or ``0``) to use none; else
``$XDG_CACHE_HOME/nvae-search/memory`` or ``~/.cache/nvae-search/memory``. Deleting the folder is always safe; past
2 GiB a network new to the store removes those used longest ago.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config_io import atomic_write_bytes
from .memory_trace import AffineTrace, StepTrace
from .schema import Recipe

__all__ = ["CACHE_ENV", "TraceStore", "cache_root"]

CACHE_ENV = "NVAE_SEARCH_MEMORY_CACHE"
# Past this, a network new to the store makes room by removing the networks used longest ago (about 1 MB each for
# the paper's largest recipes: hundreds of architectures fit).
STORE_MAX_BYTES = 2 * 1024**3


def cache_root() -> Path | None:
    """The store's folder, or None when ``$NVAE_SEARCH_MEMORY_CACHE`` turns it off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "false", "no", "none"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no home directory to be found (some containers): no store
            return None
    return Path(base) / "nvae-search" / "memory"


@functools.cache
def code_digest() -> str:
    """A hash of torch's version and every source file of this package: what a simulated step's code is."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class TraceStore:
    """One network's entries (one folder): step traces by setting and batch, fits by setting, refusals, numbers."""

    def __init__(self, root: Path, recipe: Recipe, device: str, simulated_on: str) -> None:
        what = {
            "model": recipe.model.model_dump(mode="json"),
            "device": device,
            "simulated_on": simulated_on,
            "code": code_digest(),
        }
        self.root = root
        self.folder = root / hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]

    @classmethod
    def open(cls, recipe: Recipe, device: str, simulated_on: str) -> TraceStore | None:
        root = cache_root()
        if root is None:
            return None
        try:
            store = cls(root, recipe, device, simulated_on)
        except OSError:  # the package's sources unreadable for the code hash: no store, the prediction stands
            return None
        with contextlib.suppress(OSError):
            os.utime(store.folder)  # used now: the last to be removed when the store makes room
        return store

    # ------------------------------------------------------------------------------------------- traces and fits
    def save_trace(self, setting: tuple[str, str], trace: StepTrace) -> None:
        self._save_arrays(self._name(setting, f"b{trace.batch}.npz"), trace.to_arrays())

    def trace(self, setting: tuple[str, str], batch: int) -> StepTrace | None:
        arrays = self._load_arrays(self._name(setting, f"b{batch}.npz"))
        return self._parse(StepTrace.from_arrays, arrays)

    def traced_batches(self, setting: tuple[str, str]) -> list[int]:
        prefix = self._name(setting, "b")
        found = []
        for path in self.folder.glob(f"{prefix}*.npz"):
            digits = path.name[len(prefix) : -len(".npz")]
            if digits.isdigit():
                found.append(int(digits))
        return sorted(found)

    def save_fit(self, setting: tuple[str, str], fit: AffineTrace) -> None:
        """The fit; the setting's traces at batches of 2 or more go (the fit replays each of them exactly)."""
        self._save_arrays(self._name(setting, "fit.npz"), fit.to_arrays())
        for batch in self.traced_batches(setting):
            if batch >= 2:
                with contextlib.suppress(OSError):
                    (self.folder / self._name(setting, f"b{batch}.npz")).unlink(missing_ok=True)

    def fit(self, setting: tuple[str, str]) -> AffineTrace | None:
        return self._parse(AffineTrace.from_arrays, self._load_arrays(self._name(setting, "fit.npz")))

    # ------------------------------------------------------------------------------------------- small entries
    def save_refusal(self, setting: tuple[str, str], batch: int, message: str) -> None:
        """The recipe's own refusal of this batch (batch norm over one value per channel): raised again, not
        simulated again."""
        self._save_json(self._name(setting, f"b{batch}.refused.json"), {"message": message})

    def refusal(self, setting: tuple[str, str], batch: int) -> str | None:
        entry = self._load_json(self._name(setting, f"b{batch}.refused.json"))
        return entry.get("message") if isinstance(entry, dict) and isinstance(entry.get("message"), str) else None

    def save_number(self, name: str, value: int) -> None:
        self._save_json(f"{name}.json", {"value": int(value)})

    def number(self, name: str) -> int | None:
        entry = self._load_json(f"{name}.json")
        value = entry.get("value") if isinstance(entry, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    # ------------------------------------------------------------------------------------------- files
    @staticmethod
    def _name(setting: tuple[str, str], rest: str) -> str:
        precision, checkpointing = setting
        return f"{precision}-{checkpointing}-{rest}"

    def _save_arrays(self, name: str, arrays: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        self._write(name, buffer.getvalue())

    def _load_arrays(self, name: str) -> dict[str, Any] | None:
        try:
            with np.load(self.folder / name, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        except Exception:  # missing, torn or foreign: as if absent
            return None

    def _save_json(self, name: str, entry: dict[str, Any]) -> None:
        self._write(name, json.dumps(entry).encode())

    def _load_json(self, name: str) -> Any:
        try:
            return json.loads((self.folder / name).read_text(encoding="utf-8"))
        except Exception:
            return None

    def _write(self, name: str, data: bytes) -> None:
        with contextlib.suppress(OSError):  # a read-only or full disk: the prediction stands, only the speed-up goes
            new = not self.folder.exists()
            atomic_write_bytes(self.folder / name, data)
            if new:
                self._make_room()

    def _make_room(self) -> None:
        """Remove the networks used longest ago (never this one) while the store is over :data:`STORE_MAX_BYTES`."""
        folders = []
        for folder in self.root.iterdir():
            if folder.is_dir() and folder != self.folder:
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                folders.append((folder.stat().st_mtime, size, folder))
        total = sum(size for _, size, _ in folders) + sum(f.stat().st_size for f in self.folder.iterdir())
        for _, size, folder in sorted(folders, key=lambda entry: entry[0]):
            if total <= STORE_MAX_BYTES:
                break
            shutil.rmtree(folder, ignore_errors=True)
            total -= size

    @staticmethod
    def _parse(parse: Any, arrays: dict[str, Any] | None) -> Any:
        if arrays is None:
            return None
        try:
            return parse(arrays)
        except Exception:
            return None
