"""A simulated step's storage events (:class:`StepTrace`) and their replay at any batch size from two traced ones
(:class:`AffineTrace`): the step's peak in a millisecond instead of a simulated step. Used by
:mod:`nvae_search.memory`."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["AffineTrace", "StepTrace", "rounded"]


class StepTrace:
    """The storage events of one simulated step in order: allocations (bytes before rounding, kind), releases (of
    which allocation), gradients, and marks (``reset``: where the peak starts to count; ``end``: where the
    optimizer phase starts). The same step at another batch makes the same events with other sizes."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.types: list[int] = []  # 0 allocation, 1 release, 2 gradient, 3 reset, 4 end
        self.values: list[int] = []  # allocation / gradient: bytes; release: the allocation's index
        self.kinds: list[str] = []  # per allocation
        self.sizes: list[int] = []  # per allocation

    def alloc(self, nbytes: int, kind: str) -> int:
        self.types.append(0)
        self.values.append(len(self.sizes))
        self.sizes.append(nbytes)
        self.kinds.append(kind)
        return len(self.sizes) - 1

    def free(self, index: int) -> None:
        self.types.append(1)
        self.values.append(index)

    def grad(self, nbytes: int) -> None:
        self.types.append(2)
        self.values.append(nbytes)

    def mark(self, what: str) -> None:
        self.types.append({"reset": 3, "end": 4}[what])
        self.values.append(0)

    def to_arrays(self) -> dict[str, Any]:
        names = sorted(set(self.kinds))
        return {
            "batch": np.array(self.batch),
            "types": np.array(self.types, dtype=np.int8),
            "values": np.array(self.values, dtype=np.int64),
            "sizes": np.array(self.sizes, dtype=np.int64),
            "kind_codes": np.array([names.index(k) for k in self.kinds], dtype=np.int16),
            "kind_names": np.array(names, dtype=str),
        }

    @classmethod
    def from_arrays(cls, arrays: Any) -> StepTrace:
        trace = cls(int(arrays["batch"]))
        names = [str(n) for n in arrays["kind_names"]]
        trace.types, trace.values = arrays["types"].tolist(), arrays["values"].tolist()
        trace.sizes, trace.kinds = arrays["sizes"].tolist(), [names[c] for c in arrays["kind_codes"].tolist()]
        if len(trace.types) != len(trace.values) or len(trace.sizes) != len(trace.kinds):
            raise ValueError("a damaged step trace")
        return trace


class AffineTrace:
    """Two traces of one step at two batch sizes, each event's bytes an affine function of the batch: the step's
    peak at any other batch, by replaying the events (no tensors, no dispatch: a millisecond instead of a simulated
    step). :meth:`fit` returns None where the traces do not line up event for event or a size is not affine with
    whole bytes per image; the caller then simulates."""

    def __init__(self, types: Any, refs: Any, kinds: list[str], alloc_a: Any, alloc_b: Any, grad_a: Any, grad_b: Any):
        self.types, self.refs, self.kind_names = types, refs, sorted(set(kinds))
        self.kind_codes = np.array([self.kind_names.index(k) for k in kinds], dtype=np.int64)
        self.alloc_a, self.alloc_b, self.grad_a, self.grad_b = alloc_a, alloc_b, grad_a, grad_b

    @classmethod
    def fit(cls, one: StepTrace, two: StepTrace) -> AffineTrace | None:
        if one.batch == two.batch or one.types != two.types or one.kinds != two.kinds:
            return None
        types = np.array(one.types, dtype=np.int8)
        v1, v2 = (_sorted_release_runs(types, np.array(t.values, dtype=np.int64)) for t in (one, two))
        if not np.array_equal(v1[types == 1], v2[types == 1]) or (types == 3).sum() != 1 or (types == 4).sum() != 1:
            return None
        lines = [
            _affine(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64), one.batch, two.batch)
            for a, b in ((one.sizes, two.sizes), (v1[types == 2], v2[types == 2]))
        ]
        if any(line is None for line in lines):
            return None
        (alloc_a, alloc_b), (grad_a, grad_b) = lines  # type: ignore[misc]
        return cls(types, np.where(types == 1, v1, 0), one.kinds, alloc_a, alloc_b, grad_a, grad_b)

    @classmethod
    def of(cls, trace: StepTrace) -> AffineTrace | None:
        """One trace as a "fit" with nothing per image: replayed at its own batch it gives that step's figures,
        with any optimizer phase (None for a trace without its two marks)."""
        types = np.array(trace.types, dtype=np.int8)
        if (types == 3).sum() != 1 or (types == 4).sum() != 1:
            return None
        values, sizes = np.array(trace.values, dtype=np.int64), np.array(trace.sizes, dtype=np.int64)
        grads = values[types == 2]
        refs = np.where(types == 1, values, 0)
        return cls(types, refs, trace.kinds, sizes, np.zeros_like(sizes), grads, np.zeros_like(grads))

    def to_arrays(self) -> dict[str, Any]:
        return {
            "types": self.types,
            "refs": self.refs,
            "kind_codes": self.kind_codes,
            "kind_names": np.array(self.kind_names, dtype=str),
            **{name: getattr(self, name) for name in ("alloc_a", "alloc_b", "grad_a", "grad_b")},
        }

    @classmethod
    def from_arrays(cls, arrays: Any) -> AffineTrace:
        names = [str(n) for n in arrays["kind_names"]]
        kinds = [names[c] for c in arrays["kind_codes"].tolist()]
        lines = [arrays[name].astype(np.int64) for name in ("alloc_a", "alloc_b", "grad_a", "grad_b")]
        types, refs = arrays["types"].astype(np.int8), arrays["refs"].astype(np.int64)
        if len(kinds) != len(lines[0]) or (types == 0).sum() != len(kinds) or len(refs) != len(types):
            raise ValueError("a damaged trace fit")
        return cls(types, refs, kinds, *lines)

    def replay(self, batch: int, block_bytes: int, after_end: int = 0) -> tuple[int, dict[str, int]]:
        """Peak live bytes and their kinds (``grads`` apart), as :class:`StorageTracker` keeps them, at ``batch``;
        ``after_end``: bytes the optimizer phase adds on top of what is live at the ``end`` mark."""
        sizes = rounded(self.alloc_a + self.alloc_b * batch, block_bytes)
        grads = rounded(self.grad_a + self.grad_b * batch, block_bytes)
        types = self.types
        alloc_at = np.flatnonzero(types == 0)
        free_at = np.flatnonzero(types == 1)
        delta = np.zeros(len(types), dtype=np.int64)
        delta[alloc_at] = sizes
        delta[free_at] = -sizes[self.refs[free_at]]
        current = np.cumsum(delta)
        grad_delta = np.zeros(len(types), dtype=np.int64)
        grad_delta[types == 2] = grads
        grads_live = np.cumsum(grad_delta)
        reset, end = int(np.flatnonzero(types == 3)[0]), int(np.flatnonzero(types == 4)[0])
        at = reset + int(np.argmax(current[reset : end + 1]))
        peak = int(current[at])
        if int(current[end]) + after_end > peak:
            at, peak = end, int(current[end]) + after_end
        event_kind = np.full(len(types), -1, dtype=np.int64)
        event_kind[alloc_at] = self.kind_codes
        event_kind[free_at] = self.kind_codes[self.refs[free_at]]
        kinds = {
            name: int(delta[: at + 1][event_kind[: at + 1] == code].sum()) for code, name in enumerate(self.kind_names)
        }
        return peak, {**kinds, "grads": int(grads_live[at])}


def _sorted_release_runs(types: Any, values: Any) -> Any:
    """Releases in a row (a container of tensors freed at once) come in no fixed order; none of them can be a peak,
    so each run is put in index order before two traces are compared."""
    values = values.copy()
    released = types == 1
    run = np.cumsum(released & np.r_[True, ~released[:-1]])
    at = np.flatnonzero(released)
    values[at] = values[at][np.lexsort((values[at], run[at]))]
    return values


def _affine(one: Any, two: Any, b1: int, b2: int) -> tuple[Any, Any] | None:
    """Per-event bytes at batch 0 and per image through two batch sizes, or None unless both are whole and >= 0."""
    per_image, remainder = np.divmod(two - one, b2 - b1)
    intercept = one - per_image * b1
    if remainder.any() or (per_image < 0).any() or (intercept < 0).any():
        return None
    return intercept, per_image


def rounded(nbytes: Any, block_bytes: int) -> Any:
    return (nbytes + block_bytes - 1) // block_bytes * block_bytes
