"""Counting the bytes of a fake-tensor training step: live storages and their peak (:class:`StorageTracker`), and a
memo of output shapes that skips the fake mode's dispatch for ops seen before (:class:`ShapeCache`). Used by
:mod:`nvae_search.memory`."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ShapeCache", "StorageTracker"]

_DEVICE = torch.ops.prim.device.default


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created by ops run under it, and the peak of their sum.

    Storages made before it was entered count only when passed to :meth:`track` (parameters, optimizer state).
    Also answers data-dependent scalar reads of fake tensors (``int(t)``, ``t.item()``, ``bool(t)``), since a fake
    tensor has no value, as a steady step after the first would read them: numbers 1 (the power-iteration counter
    is past its first call: 4 iterations, not 40), flags False (data-dependent init done, nothing non-finite).
    """

    def __init__(self, block_bytes: int = 1, shapes: ShapeCache | None = None) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        super().__init__()
        self.shapes = shapes
        self._fake_type = FakeTensor
        self.block_bytes = block_bytes
        self._live: dict[int, tuple[weakref.ref[Any], int, str]] = {}
        self.current = 0
        self.by_kind: dict[str, int] = {}
        self.peak = 0
        self.peak_by_kind: dict[str, int] = {}
        self.kind = "activations"
        self.grads = 0  # gradient bytes currently held in .grad (kept by hooks, see track_gradients)

    def _size(self, storage: torch.UntypedStorage) -> int:
        return math.ceil(storage.nbytes() / self.block_bytes) * self.block_bytes

    def track(self, tensor: torch.Tensor, kind: str | None = None) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        entry = self._live.get(key)
        if entry is not None and entry[0]() is storage:
            return  # a view of, or the same tensor as, one already counted
        size, kind = self._size(storage), kind or self.kind
        self._live[key] = (weakref.ref(storage, self._released(key)), size, kind)
        self.current += size
        self.by_kind[kind] = self.by_kind.get(kind, 0) + size
        if self.current > self.peak:
            self.peak = self.current
            self.peak_by_kind = {**self.by_kind, "grads": self.grads}

    def _released(self, key: int) -> Callable[[Any], None]:
        def release(ref: weakref.ref[Any]) -> None:
            entry = self._live.get(key)
            if entry is None or entry[0] is not ref:
                return
            del self._live[key]
            self.current -= entry[1]
            self.by_kind[entry[2]] -= entry[1]

        return release

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_by_kind = {**self.by_kind, "grads": self.grads}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            return False if args[0].dtype == torch.bool else 1
        kwargs = kwargs or {}
        if func is _DEVICE and type(args[0]) is self._fake_type:
            return args[0].fake_device  # asked by every `.device` (12,000 times a step of a small recipe)
        key = self.shapes.key(func, args, kwargs) if self.shapes is not None else None
        out = self.shapes.replay(key, args) if key is not None else None
        if out is None:
            out = func(*args, **kwargs)
            if key is not None:
                self.shapes.record(key, args, out)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


class ShapeCache:
    """Output shapes of fake-tensor ops by (op, input shapes and arguments): a faster memo than the fake mode's own.

    NVAE repeats the same cells at the same shapes, so nearly every op of a step was seen before with the same
    inputs; answering from here skips the fake mode's general dispatch (its cache key alone costs more than the
    rest). Only ops whose outputs are new tensors are memoised (no views, no in-place or ``out=`` ops) and only on
    plain fake inputs: their outputs' metadata depend on nothing but the inputs' metadata and the arguments.
    """

    def __init__(self, fake_mode: Any) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        self.fake_mode, self._fake_type = fake_mode, FakeTensor
        self._entries: dict[Any, Any] = {}
        self._kinds: dict[Any, str | None] = {}
        self.hits = self.misses = 0

    def _kind(self, func: Any) -> str | None:
        """``fresh``: returns new tensors only; ``self``: updates its first argument's data in place and returns it
        (``add_``, ``mul_``: no metadata change); None: anything else (views, ``out=``, metadata-changing ops)."""
        if func in self._kinds:
            return self._kinds[func]
        schema, tags = func._schema, func.tags
        kind = None
        if any(t in tags for t in (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)):
            pass
        elif not schema.is_mutable and len(schema.returns) > 0:
            plain = all(
                r.alias_info is None and str(r.type) in ("Tensor", "Tensor[]", "Tensor?") for r in schema.returns
            )
            if plain and all(arg.alias_info is None for arg in schema.arguments):
                kind = "fresh"
        elif torch.Tag.inplace_view not in tags and len(schema.returns) == 1 and schema.arguments:
            first, ret = schema.arguments[0].alias_info, schema.returns[0].alias_info
            others = [arg.alias_info for arg in schema.arguments[1:]]
            if first is not None and first.is_write and ret is not None and ret.before_set == first.before_set:
                kind = "self" if all(o is None for o in others) else None
        self._kinds[func] = kind
        return kind

    def _arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            if type(a) is not self._fake_type or a.constant is not None or a.fake_mode is not self.fake_mode:
                raise _Uncacheable
            return (a.shape, a.stride(), a.dtype, a.device, a.storage_offset(), a.is_sparse)
        if isinstance(a, (list, tuple)):
            return (type(a), *(self._arg(b) for b in a))
        if a is None or isinstance(
            a, (bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)
        ):
            return (type(a), a)
        raise _Uncacheable

    def key(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if self._kind(func) is None:
            return None
        try:
            return (func, self._arg(args), tuple((k, self._arg(v)) for k, v in kwargs.items()))
        except _Uncacheable:
            return None

    def replay(self, key: Any, args: Any) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        kind, metas = entry
        if kind == "self":
            return args[0]
        with torch._C._DisableTorchDispatch():  # plain meta tensors, made without a round trip through the modes
            outs = [None if m is None else self._make(*m) for m in metas]
        return outs[0] if kind == "one" else (tuple(outs) if kind == "tuple" else outs)

    def _make(self, shape: Any, stride: Any, dtype: Any, device: Any) -> torch.Tensor:
        meta = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        return self._fake_type(self.fake_mode, meta, device)

    def _replayable(self, t: Any) -> bool:
        # A replayed output gets a storage of exactly the span of its strides: true only of one that owns all of it.
        return (
            type(t) is self._fake_type
            and t.constant is None
            and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == _span(t)
        )

    def record(self, key: Any, args: Any, out: Any) -> None:
        if self._kind(key[0]) == "self":
            if out is args[0] and self._arg(out) == key[1][1]:  # the same tensor, its metadata unchanged
                self._entries[key] = ("self", None)
            return
        outs, kind = (
            ((out,), "one") if isinstance(out, torch.Tensor) else (out, "tuple" if isinstance(out, tuple) else "list")
        )
        metas = []
        for t in outs:
            if t is None:
                metas.append(None)
            elif self._replayable(t):
                metas.append((t.shape, t.stride(), t.dtype, t.device))
            else:
                return
        self._entries[key] = (kind, metas)


def _span(t: torch.Tensor) -> int:
    """Bytes a tensor's strides reach: its storage's size when the tensor owns all of it."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))) * t.element_size()


class _Uncacheable(Exception):
    pass


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)
