"""Counting the bytes of a fake-tensor training step: live storages and their peak (:class:`StorageTracker`), and a
memo of output shapes that skips the fake mode's dispatch for ops seen before (:class:`ShapeCache`). Used by
:mod:`nvae_search.memory`; the step's storage events go to a :class:`~nvae_search.memory_trace.StepTrace`."""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .fake_tensors import fake_constructor, fake_mode_runs_meta_kernel
from .memory_trace import StepTrace, rounded

__all__ = ["FakeShapeCache", "MetaShapeCache", "ShapeCache", "StorageTracker"]

_DEVICE = torch.ops.prim.device.default
# Views the fake mode answers with its own code (a decomposition, or a rule for sizes unknown until run time) where
# the meta kernel would do: with every size a plain integer (the predictor's fake mode has no symbolic shapes) both
# give the same sizes, strides and offset. A fifth of a step's ops; checked op by op in tests/test_memory.py.
_VIEWS_WITH_STATIC_SHAPES = frozenset(
    {
        torch.ops.aten.view.default,
        torch.ops.aten.select.int,
        torch.ops.aten.squeeze.dim,
        torch.ops.aten.slice.Tensor,
    }
)


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of live tensor storages created by ops run under it, and the peak of their sum.

    Storages made before it was entered count only when passed to :meth:`track` (parameters, optimizer state).
    Also answers data-dependent scalar reads of fake tensors (``int(t)``, ``t.item()``, ``bool(t)``), since a fake
    tensor has no value, as a steady step after the first would read them: numbers 1 (the power-iteration counter
    is past its first call: 4 iterations, not 40), flags False (data-dependent init done, nothing non-finite).
    """

    def __init__(self, block_bytes: int = 1, shapes: ShapeCache | None = None, trace: StepTrace | None = None) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        super().__init__()
        self.shapes, self.trace = shapes, trace
        self._fake_type = FakeTensor
        self.block_bytes = block_bytes
        self._live: dict[int, tuple[weakref.ref[Any], int, str, int]] = {}
        self.current = 0
        self.by_kind: dict[str, int] = {}
        self.peak = 0
        self.peak_by_kind: dict[str, int] = {}
        self.kind = "activations"
        self.grads = 0  # gradient bytes currently held in .grad (kept by hooks, see track_gradients)

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a dispatch mode's __torch_dispatch__ in a guard against compiling it unless this says False.
        # Nothing here is compiled, and the guard costs more than the tracker itself (~180,000 calls a step).
        return False

    def _size(self, storage: torch.UntypedStorage) -> int:
        return int(rounded(storage.nbytes(), self.block_bytes))

    def track(self, tensor: torch.Tensor, kind: str | None = None) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        entry = self._live.get(key)
        if entry is not None and entry[0]() is storage:
            return  # a view of, or the same tensor as, one already counted
        size, kind = self._size(storage), kind or self.kind
        index = self.trace.alloc(storage.nbytes(), kind) if self.trace is not None else -1
        self._live[key] = (weakref.ref(storage, self._released(key)), size, kind, index)
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
            if self.trace is not None:
                self.trace.free(entry[3])
            self.current -= entry[1]
            self.by_kind[entry[2]] -= entry[1]

        return release

    def add_grad(self, storage: torch.UntypedStorage) -> None:
        """A parameter's gradient, counted apart (it is also live as the backward op's output)."""
        self.grads += self._size(storage)
        if self.trace is not None:
            self.trace.grad(storage.nbytes())

    def add_transient(self, nbytes: int) -> None:
        """A peak candidate: ``nbytes`` allocated on top of what is live now, then freed (a phase simulated apart)."""
        if self.current + nbytes > self.peak:
            self.peak = self.current + nbytes
            self.peak_by_kind = {**self.by_kind, "grads": self.grads}

    def reset_peak(self) -> None:
        if self.trace is not None:
            self.trace.mark("reset")
        self.peak = self.current
        self.peak_by_kind = {**self.by_kind, "grads": self.grads}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            return False if args[0].dtype == torch.bool else 1
        kwargs = kwargs or {}
        if func is _DEVICE and type(args[0]) is self._fake_type:
            return args[0].fake_device  # asked by every `.device` (12,000 times a step of a small recipe)
        out = self.shapes.run(func, args, kwargs) if self.shapes is not None else func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


class ShapeCache(ABC):
    """Output shapes of ops by (op, input shapes and arguments), for tensors that hold no data: a memo that answers an
    op seen before without running it.

    NVAE repeats the same cells at the same shapes, so nearly every op of a step was seen before with the same
    inputs. Only ops whose outputs are new tensors are memoised (no views, no in-place or ``out=`` ops) and only on
    plain inputs (:meth:`_plain`): their outputs' metadata depend on nothing but the inputs' metadata and the
    arguments. :class:`FakeShapeCache` serves fake tensors (the simulated step), :class:`MetaShapeCache` plain meta
    tensors (the optimizer phase); each adds its own shortcuts to :meth:`run`.
    """

    def __init__(self) -> None:
        self._entries: dict[Any, Any] = {}
        self._kinds: dict[Any, str | None] = {}
        self.hits = self.misses = 0

    def run(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """``func(*args, **kwargs)``, answered by the first shortcut that applies: a multi-tensor op on meta tensors
        (:meth:`foreach`), a memoised op (:meth:`replay`), a new one on its bare meta kernel (:meth:`compute`), a
        view (:meth:`view`); else the op itself, its outputs memoised when they can be."""
        handled, out = self.foreach(func, args, kwargs)
        if handled:
            return out
        key = self.key(func, args, kwargs)
        if key is None:
            out = self.view(func, args, kwargs)
        else:
            out = self.replay(key, args)
            if out is None:
                out = self.compute(key, func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
            if key is not None:
                self.record(key, args, out)
        return out

    def foreach(self, func: Any, args: Any, kwargs: dict[str, Any]) -> tuple[bool, Any]:
        """(True, the result) where a whole multi-tensor op is answered at once; (False, None) here."""
        return False, None

    def compute(self, key: Any, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """A new memoisable op run faster than by ``func`` itself, or None (here: always None)."""
        return None

    def view(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """A view op run faster than by ``func`` itself, or None (here: always None)."""
        return None

    @abstractmethod
    def _plain(self, t: Any) -> bool:
        """Whether ``t``'s metadata is all an op's output depends on."""

    def _device(self, t: torch.Tensor) -> Any:
        return t.device

    @abstractmethod
    def _make(self, shape: Any, stride: Any, dtype: Any, device: Any) -> torch.Tensor:
        """A tensor of this metadata, of the kind this memo serves."""

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
            if not self._plain(a):
                raise _Uncacheable
            return (a.shape, a.stride(), a.dtype, self._device(a), a.storage_offset(), a.is_sparse)
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

    def _replayable(self, t: Any) -> bool:
        # A replayed output gets a storage of exactly the span of its strides: true only of one that owns all of it.
        return self._plain(t) and t.storage_offset() == 0 and t.untyped_storage().nbytes() == _span(t)

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
                metas.append((t.shape, t.stride(), t.dtype, self._device(t)))
            else:
                return
        self._entries[key] = (kind, metas)


class FakeShapeCache(ShapeCache):
    """The memo for fake tensors of one fake mode, a faster one than the fake mode's own (its cache key alone costs
    more than the rest); new ops and views run on bare meta kernels where the fake mode itself would."""

    def __init__(self, fake_mode: Any) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        super().__init__()
        self.fake_mode, self._fake_type = fake_mode, FakeTensor
        self.new_fake = fake_constructor(fake_mode)  # FakeTensor(fake_mode, meta, device), faster
        self.computed = self.viewed = 0  # new ops run on meta kernels, views made without the fake mode
        self._meta_ok: dict[Any, bool] = {}
        self._views: dict[Any, bool] = {}

    def _plain(self, t: Any) -> bool:
        """A fake tensor of this mode, not a constant."""
        return type(t) is self._fake_type and t.constant is None and t.fake_mode is self.fake_mode

    def _device(self, t: torch.Tensor) -> Any:
        return t.fake_device  # what ``t.device`` answers, without its Python property

    def _make(self, shape: Any, stride: Any, dtype: Any, device: Any) -> torch.Tensor:
        meta = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        return self.new_fake(meta, device)

    def compute(self, key: Any, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """A new op of kind ``fresh`` run on plain meta tensors (torch's meta kernel, in C++) instead of through the
        fake mode's general dispatch, its outputs made fake on the inputs' device and memoised; None where that
        cannot stand in for the fake mode: the op is not fresh, its tensors lie on several devices, it names a
        device, or it has no meta kernel (the fake mode then runs it, with its own fallbacks)."""
        if self._kind(func) != "fresh" or "device" in kwargs:
            return None
        if not self._meta_stands_in(func):
            return None
        devices: set[Any] = set()
        try:
            with torch._C._DisableTorchDispatch():
                meta_args = _to_meta(args, devices)
                meta_kwargs = {k: _to_meta(v, devices) for k, v in kwargs.items()}
                if len(devices) != 1:
                    return None
                out = func(*meta_args, **meta_kwargs)
        except Exception:
            self._meta_ok[func] = False
            return None
        (device,) = devices
        with torch._C._DisableTorchDispatch():
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if not all(t is None or (isinstance(t, torch.Tensor) and t.device.type == "meta") for t in outs):
                self._meta_ok[func] = False
                return None
            fakes = [None if t is None else self.new_fake(t, device) for t in outs]
        result = fakes[0] if isinstance(out, torch.Tensor) else type(out)(fakes)
        self.computed += 1
        self.record(key, args, result)
        return result

    def view(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """A view op (``view``, ``detach``, ``t``, ...) on one plain fake tensor, run by its meta kernel as the fake
        mode runs it (its tensors read as meta), without the fake mode's general dispatch; None for anything else.
        The output aliases the input's storage, as through the fake mode (a third of a step's dispatch time)."""
        if not self._is_view(func):
            return None
        if func not in _VIEWS_WITH_STATIC_SHAPES and not self._meta_stands_in(func):
            return None
        first = args[0] if args else None
        if not self._plain(first) or any(isinstance(a, torch.Tensor) for a in (*args[1:], *kwargs.values())):
            return None
        from torch._subclasses.fake_tensor import in_kernel_invocation_manager

        with in_kernel_invocation_manager(self.fake_mode):
            out = func(*args, **kwargs)
        self.viewed += 1
        return self.new_fake(out, first.fake_device)

    def _is_view(self, func: Any) -> bool:
        if func not in self._views:
            schema = func._schema
            ret = schema.returns[0].alias_info if len(schema.returns) == 1 else None
            first = schema.arguments[0].alias_info if schema.arguments else None
            self._views[func] = (
                ret is not None
                and str(schema.returns[0].type) == "Tensor"
                and not ret.is_write
                and first is not None
                and not first.is_write
                and ret.before_set == first.before_set
                and torch.Tag.inplace_view not in func.tags
                and not schema.is_mutable
            )
        return self._views[func]

    def _meta_stands_in(self, func: Any) -> bool:
        if func not in self._meta_ok:
            try:
                self._meta_ok[func] = fake_mode_runs_meta_kernel(self.fake_mode, func)
            except Exception:  # torch internals moved: every new op through the fake mode, as before
                self._meta_ok[func] = False
        return self._meta_ok[func]


class MetaShapeCache(ShapeCache):
    """The memo for plain meta tensors (the optimizer phase, where torch's meta kernels for elementwise ops are Python
    references that cost more than the memo), with multi-tensor ops answered once per distinct element."""

    def _plain(self, t: Any) -> bool:
        return type(t) is torch.Tensor and t.is_meta

    def _make(self, shape: Any, stride: Any, dtype: Any, device: Any) -> torch.Tensor:
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")

    def foreach(self, func: Any, args: Any, kwargs: dict[str, Any]) -> tuple[bool, Any]:
        """A multi-tensor op (``_foreach_*``) on lists of plain meta tensors, run on one element per distinct
        (metadata, scalar) combination and its outputs copied to the rest: (True, its result), or (False, None) where
        it does not apply (other arguments). An element's output depends on nothing but its own
        inputs, and torch's meta kernels for these ops loop over every element in Python (the optimizer's update)."""
        if not func._schema.name.startswith("aten::_foreach_"):
            return False, None
        lists = [a for a in args if isinstance(a, (list, tuple))]
        try:
            per_list = [self._arg(a)[1:] for a in lists]
            for a in args:
                if not isinstance(a, (list, tuple)):
                    self._arg(a)  # a scalar or single tensor, the same for every element
            for a in kwargs.values():
                if isinstance(a, (list, tuple)):
                    raise _Uncacheable  # its elements would need splitting like the positional lists'
                self._arg(a)  # ``alpha`` and the like
        except _Uncacheable:
            return False, None
        if not lists or any(len(a) != len(lists[0]) for a in lists):
            return False, None
        signatures = list(zip(*per_list, strict=True))
        first_of: dict[Any, int] = {}
        for i, signature in enumerate(signatures):
            first_of.setdefault(signature, i)
        rows = sorted(first_of.values())
        out = func(*(type(a)(a[i] for i in rows) if isinstance(a, (list, tuple)) else a for a in args), **kwargs)
        if out is None:
            return True, None  # in place: meta tensors hold no data
        if not isinstance(out, list) or len(out) != len(rows) or not all(self._replayable(t) for t in out):
            return False, None
        position = {row: k for k, row in enumerate(rows)}
        with torch._C._DisableTorchDispatch():
            full = [
                out[position[i]] if i in position else self._make(*self._meta_of(out[position[first_of[sig]]]))
                for i, sig in enumerate(signatures)
            ]
        self.hits += len(full) - len(rows)
        return True, full

    @staticmethod
    def _meta_of(t: torch.Tensor) -> tuple[Any, ...]:
        return t.shape, t.stride(), t.dtype, t.device


def _to_meta(a: Any, devices: set[Any]) -> Any:
    """A plain meta tensor of each (fake) tensor's shape, strides and dtype; the fake devices go to ``devices``."""
    if isinstance(a, torch.Tensor):
        devices.add(a.fake_device)
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
    if isinstance(a, (list, tuple)):
        return type(a)(_to_meta(b, devices) for b in a)
    return a


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
