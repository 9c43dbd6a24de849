"""Predict the device memory of one training step without real data or real computation.

The step (forward, reconstruction + balanced KL, spectral and BN regularisation, backward, gradient norm, Adamax)
runs on fake tensors (``FakeTensorMode``: shapes, dtypes and storages, no data, no arithmetic) while a dispatch
mode counts the bytes of every live tensor storage and keeps the peak. That is the quantity
``torch.cuda.max_memory_allocated`` reports, apart from what no tensor holds (cuDNN workspaces, the CUDA context,
allocator fragmentation): :func:`usable_bytes` leaves headroom for those when it says whether a GPU is big enough.

A CPU-only torch cannot make fake CUDA tensors, so there the step is simulated on the CPU with the CPU autocast
rules; with CUDA present it is simulated on ``cuda`` with the CUDA rules. Either way the figures are for the target
device: CUDA's 512-byte allocation granularity and the multi-tensor (``foreach``) Adamax that torch picks on CUDA.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from .memory_cache import TraceStore
from .memory_step import (
    AUTOCAST_DTYPES,
    Precision,
    StepParts,
    build_step_parts,
    forward_backward,
    init_optimizer_state,
    on_fake_tensors,
    optimizer_phase_bytes,
    state_tensors,
    zero_adamax_state,
)
from .memory_trace import AffineTrace, StepTrace, rounded
from .memory_tracking import FakeShapeCache, MetaShapeCache, ShapeCache, StorageTracker
from .schema import Recipe

GIB = 1024**3
GPU_SIZES_GB = (16, 24, 40, 80)
CUDA_BLOCK_BYTES = 512  # the caching allocator's smallest block: every CUDA tensor takes a multiple of it
# Device memory no tensor accounts for: the CUDA context and cuDNN/cuBLAS handles (~0.5 GiB) and allocator
# fragmentation and conv workspaces (a share of the peak). Without this margin "fits" would mean "OOMs sometimes".
CONTEXT_RESERVE_BYTES = GIB // 2
FRAGMENTATION_RESERVE = 0.10

Checkpointing = Literal["off", "cell"]
Device = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class MemoryPrediction:
    """Bytes of one training step; at the peak, params + grads + optimizer + activations = peak."""

    device: str
    batch: int
    precision: str
    checkpointing: str
    peak_bytes: int
    params_bytes: int  # parameters and buffers (BN statistics, power-iteration vectors), EMA copy included
    grads_bytes: int  # gradients alive at the peak
    optimizer_bytes: int  # Adamax state
    activations_bytes: int  # everything else alive at the peak: saved activations and temporaries
    simulated_on: str  # where the fake step ran (CPU autocast rules stand in for CUDA's on a CPU-only torch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def resolve_precision(precision: str, device: str) -> Precision:
    """``auto`` (fp16 with a gradient scaler on CUDA, fp32 elsewhere) as the trainer resolves it."""
    if precision == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r} (fp32, bf16, fp16 or auto)")
    return precision  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- prediction
class MemoryPredictor:
    """Builds a recipe's model once on fake tensors and predicts one training step at any batch and setting."""

    def __init__(
        self,
        recipe: Recipe,
        device: Device = "cuda",
        *,
        replay: bool = True,
        progress: Callable[[str], None] | None = None,
        cache: bool = True,
    ) -> None:
        """``replay``: after two simulated batch sizes of a setting, replay its step at other batch sizes (exact,
        see :class:`AffineTrace`); False simulates every prediction. ``progress`` is told what is being done (each
        part takes seconds for a large recipe). ``cache``: keep traces in the disk store of
        :mod:`nvae_search.memory_cache` and answer from it (with ``replay``); the network is then built only when a
        step must be simulated."""
        self.recipe, self.device, self.replay = recipe, device, replay
        self.progress = progress or (lambda _: None)
        self.simulated_on = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
        self.block_bytes = CUDA_BLOCK_BYTES if device == "cuda" else 1
        self._tracker: StorageTracker | None = None
        self._counted: set[int] = set()
        # Per (precision, checkpointing): traces of simulated steps at batches >= 2, and their affine fit once two
        # batch sizes are traced (batch 1 is never replayed from a fit: batch norm may refuse one value per channel;
        # it is simulated, or its own trace taken from the store).
        self._traces: dict[tuple[str, str], list[StepTrace]] = {}
        self._fits: dict[tuple[str, str], AffineTrace] = {}
        self.replays = self.simulations = 0
        self.store = TraceStore.open(recipe, device, self.simulated_on) if replay and cache else None
        self._parts: StepParts | None = None
        self._optimizer_extra: int | None = None
        if self.store is None:
            self._build_or_fall_back()

    @property
    def parts(self) -> StepParts:
        """The network, regulariser and optimizer on fake tensors (built on first use)."""
        if self._parts is None:
            self._build_or_fall_back()
        assert self._parts is not None
        return self._parts

    @property
    def optimizer_extra_bytes(self) -> int:
        """Bytes the optimizer phase adds above what is live after the backward pass (see
        :meth:`_measure_optimizer_phase`); from the store when it has them."""
        if self._optimizer_extra is None and self.store is not None:
            self._optimizer_extra = self.store.number(self._optimizer_entry())
        if self._optimizer_extra is None:
            self.parts  # noqa: B018  # building measures it
        assert self._optimizer_extra is not None
        return self._optimizer_extra

    def _optimizer_entry(self) -> str:
        # The multi-tensor Adamax allocates the same at any learning rate or epsilon; weight decay adds a list.
        return f"optimizer-wd{int(bool(self.recipe.train.weight_decay))}"

    def _build_or_fall_back(self) -> None:
        try:
            with _without_cyclic_gc():
                self._parts = self._build()
        except Exception:
            if self.simulated_on == "cpu":
                raise
            self._simulate_on_cpu()

    def _build(self) -> StepParts:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.progress("building the network")
        if self.simulated_on == "cuda" and not torch.backends.cuda.is_built():
            # Fake CUDA tensors on a torch built without CUDA abort the process at their first autograd op.
            raise RuntimeError("this torch is built without CUDA: fake CUDA tensors are not possible")
        self.fake_mode = FakeTensorMode()
        shapes = FakeShapeCache(self.fake_mode)
        self.shapes: ShapeCache | None = shapes
        # Built on the meta device (torch's meta kernels, no Python dispatch per op), then made fake: a third of the
        # time of building under the fake mode. On CUDA torch picks the multi-tensor Adamax, whose temporaries span
        # all parameters at once.
        parts = build_step_parts(self.recipe, 1, "fp32", False, self.device == "cuda", "meta")
        self._optimizer_extra = self._measure_optimizer_phase(parts)
        if self.store is not None:
            self.store.save_number(self._optimizer_entry(), self._optimizer_extra)
        parts = on_fake_tensors(parts, shapes.new_fake, self.simulated_on)
        for p in parts.model.parameters():
            p.register_post_accumulate_grad_hook(self._count_grad)
        return parts

    def _measure_optimizer_phase(self, parts: StepParts) -> int:
        """The optimizer phase's extra bytes (:func:`~nvae_search.memory_step.optimizer_phase_bytes`) on meta copies
        of the parameters (plain tensors: their memo answers the multi-tensor ops once per distinct shape). The
        state of that steady step becomes the optimizer's own."""
        copies = [
            torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="meta") for p in parts.model.parameters()
        ]
        optimizer = zero_adamax_state(torch.optim.Adamax(copies, **parts.optimizer.defaults))
        try:
            extra = optimizer_phase_bytes(copies, lambda _: optimizer, MetaShapeCache(), self.block_bytes)
        except KeyError:  # this torch's Adamax keeps other state: let a first step make it, then measure the next
            optimizer.state.clear()
            init_optimizer_state(optimizer)
            extra = optimizer_phase_bytes(copies, lambda _: optimizer, MetaShapeCache(), self.block_bytes)
        for p, copy in zip(parts.model.parameters(), copies, strict=True):
            parts.optimizer.state[p] = optimizer.state[copy]
        return extra

    def _simulate_on_cpu(self) -> None:
        # Fake CUDA tensors failed on this torch build or machine: simulate on the CPU (CPU autocast rules) instead.
        self.simulated_on = "cpu"
        self._traces.clear()  # traced under CUDA's rules: not to be mixed with the CPU's
        self._fits.clear()
        self._optimizer_extra = None
        if self.store is not None:
            self.store = TraceStore.open(self.recipe, self.device, "cpu")
        with _without_cyclic_gc():
            self._parts = self._build()

    def _count_grad(self, p: torch.Tensor) -> None:
        # set_to_none at the start of each step: a gradient is allocated once per parameter per step.
        if self._tracker is not None and id(p) not in self._counted and p.grad is not None:
            self._counted.add(id(p))
            self._tracker.add_grad(p.grad.untyped_storage())

    def can_replay(self, precision: str, checkpointing: str) -> bool:
        """Whether steps at this setting are replayed from two traced batch sizes instead of simulated."""
        return self._fit((resolve_precision(precision, self.device), checkpointing)) is not None

    def _fit(self, setting: tuple[str, str]) -> AffineTrace | None:
        if setting not in self._fits and self.store is not None:
            fit = self.store.fit(setting)
            if fit is not None:
                self._fits[setting] = fit
        return self._fits.get(setting)

    def _stored_step(self, batch: int, setting: tuple[str, str]) -> tuple[int, dict[str, int]] | None:
        """The figures of a step traced before at this very batch (or its refusal), from the store."""
        if self.store is None:
            return None
        refusal = self.store.refusal(setting, batch)
        if refusal is not None:
            raise ValueError(refusal)
        trace = self.store.trace(setting, batch)
        single = AffineTrace.of(trace) if trace is not None else None
        if single is None:
            return None
        self.replays += 1
        return single.replay(batch, self.block_bytes, self.optimizer_extra_bytes)

    def predict(
        self, batch: int | None = None, precision: str | None = None, checkpointing: str | None = None
    ) -> MemoryPrediction:
        """Peak bytes of one training step (defaults: the recipe's batch, precision and checkpointing)."""
        recipe = self.recipe
        batch = batch or recipe.train.batch_size
        prec = resolve_precision(precision or recipe.model.numerics.precision, self.device)
        ckpt = checkpointing or recipe.model.numerics.checkpointing
        if ckpt not in ("off", "cell"):
            raise ValueError(f"unknown checkpointing {ckpt!r} (off or cell)")
        if self.simulated_on == "cpu":
            return self._predict(batch, prec, ckpt)
        try:
            return self._predict(batch, prec, ckpt)
        except ValueError:
            raise  # the recipe's own refusal (e.g. batch norm over one value), the same on any device
        except Exception:
            self._simulate_on_cpu()
            return self._predict(batch, prec, ckpt)

    def _predict(self, batch: int, prec: Precision, ckpt: str) -> MemoryPrediction:
        fit = self._fit((prec, ckpt)) if batch >= 2 and self.replay else None
        if fit is not None:
            self.replays += 1
            peak, kinds = fit.replay(batch, self.block_bytes, self.optimizer_extra_bytes)
        else:
            peak, kinds = self._stored_step(batch, (prec, ckpt)) or self._simulate(batch, prec, ckpt)
        # AveragedModel(use_buffers=True): a copy of the model's parameters and buffers, and its step count (a long);
        # not of the spectral regulariser's power-iteration vectors, which it does not hold.
        model_state = kinds.get("params", 0)
        ema = model_state + int(rounded(8, self.block_bytes)) if self.recipe.train.ema_decay else 0
        params = model_state + kinds.get("regulariser", 0) + ema
        grads, opt = kinds.get("grads", 0), kinds.get("optimizer", 0)
        peak += ema
        return MemoryPrediction(
            self.device, batch, prec, ckpt, peak, params, grads, opt, peak - params - grads - opt, self.simulated_on
        )

    def _simulate(self, batch: int, prec: Precision, ckpt: str) -> tuple[int, dict[str, int]]:
        """One training step on fake tensors; its storage events are kept for replays at other batch sizes."""
        self.simulations += 1
        self.progress(f"simulating a training step at batch {batch} ({prec}, checkpointing {ckpt})")
        parts, cfg = self.parts, self.recipe.model
        trace = StepTrace(batch)
        tracker = StorageTracker(self.block_bytes, self.shapes, trace)
        with _without_cyclic_gc(), self.fake_mode:
            parts.model.set_checkpointing(ckpt == "cell")
            parts.autocast_dtype = AUTOCAST_DTYPES.get(prec)
            parts.x = torch.rand(batch, cfg.input_channels, cfg.resolution, cfg.resolution, device=self.simulated_on)
            for t in (*parts.model.parameters(), *parts.model.buffers()):
                tracker.track(t, "params")
            for t in parts.spectral.buffers():
                tracker.track(t, "regulariser")
            for t in state_tensors(parts.optimizer, self.device):
                tracker.track(t, "optimizer")
            tracker.track(parts.x, "activations")
            tracker.reset_peak()
            self._tracker, self._counted = tracker, set()
            try:
                with tracker:
                    held = forward_backward(parts)
                trace.mark("end")
                tracker.add_transient(self.optimizer_extra_bytes)  # the optimizer phase, measured once
                del held
            except ValueError as err:  # the recipe refuses this batch (batch norm over one value per channel)
                if self.store is not None:
                    self.store.save_refusal((prec, ckpt), batch, str(err))
                raise
            finally:
                self._tracker = None
                parts.optimizer.zero_grad(set_to_none=True)
                parts.x = parts.x.new_empty(0)
        if self.store is not None:
            self.store.save_trace((prec, ckpt), trace)
        if self.replay and batch >= 2 and (prec, ckpt) not in self._fits:
            self._fit_traces((prec, ckpt), trace)
        return tracker.peak, tracker.peak_by_kind

    def _fit_traces(self, setting: tuple[str, str], trace: StepTrace) -> None:
        """Fit the new trace with one of another batch (of this predictor, else from the store)."""
        others = [t for t in self._traces.get(setting, []) if t.batch != trace.batch][-1:]
        if not others and self.store is not None:
            for batch in self.store.traced_batches(setting):
                stored = self.store.trace(setting, batch) if batch >= 2 and batch != trace.batch else None
                if stored is not None:
                    others = [stored]
                    break
        self._traces[setting] = [*others, trace]
        fit = AffineTrace.fit(*others, trace) if others else None
        if fit is not None:
            self._fits[setting] = fit
            del self._traces[setting]
            if self.store is not None:
                self.store.save_fit(setting, fit)


@contextlib.contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """Python's cycle collector paused: a simulated step makes some 200,000 short-lived objects, enough to start a
    full collection over the half million the memo and the network hold (0.4 s of a 2.6 s step of paper/ffhq256).
    The step's own objects are freed by their reference counts; anything cyclic waits for the next collection."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def predict_step_memory(
    recipe: Recipe,
    *,
    batch: int | None = None,
    precision: str | None = None,
    checkpointing: str | None = None,
    device: Device = "cuda",
) -> MemoryPrediction:
    """Peak bytes of one training step of ``recipe`` on ``device`` (defaults: the recipe's own settings)."""
    return MemoryPredictor(recipe, device).predict(batch, precision, checkpointing)


# ------------------------------------------------------------------------------------- fitting a GPU
def usable_bytes(gpu_gb: float) -> int:
    """What a tensor peak may reach on a GPU sold as ``gpu_gb`` GB (its GiB, less context and fragmentation)."""
    return int(gpu_gb * GIB * (1 - FRAGMENTATION_RESERVE) - CONTEXT_RESERVE_BYTES)


def fits(prediction: MemoryPrediction, gpu_gb: float) -> bool:
    return prediction.peak_bytes <= usable_bytes(gpu_gb)


def largest_batches(
    predictor: MemoryPredictor, base: MemoryPrediction, limits: dict[str, int], *, cap: int = 1 << 16
) -> dict[str, int]:
    """The largest batch whose predicted peak stays within each limit in bytes (0: not even the smallest batch).

    Two simulated steps (the base batch and twice it) let the predictor replay the step at any batch of 2 or more
    (:class:`AffineTrace`), so each limit gets an exact search (doubling, then bisection; batch 1 is simulated only
    when batch 2 does not fit). Where the two steps' traces do not line up, memory is taken as affine in the batch:
    two predictions give the line, a third checks its guess for the first size, and only if the line missed by more
    than 1 % is every guess checked and moved down until it fits.
    """
    cache = {base.batch: base.peak_bytes}

    def peak(b: int) -> float:
        if b not in cache:
            try:
                cache[b] = predictor.predict(b, base.precision, base.checkpointing).peak_bytes
            except ValueError:  # batch norm refuses one value per channel (a batch of 1 at a 1x1 scale)
                cache[b] = math.inf
        return cache[b]

    b1 = max(base.batch, 2)
    peak(b1), peak(2 * b1)  # two batch sizes: what the predictor fits its replays on
    if predictor.can_replay(base.precision, base.checkpointing):
        return {name: _largest_within(peak, limit, cap) for name, limit in limits.items()}
    per_image = max((peak(2 * b1) - peak(b1)) / b1, 1.0)
    fixed = peak(b1) - per_image * b1
    guesses = {name: min(cap, max(0, int((limit - fixed) / per_image))) for name, limit in limits.items()}
    probe = next((g for g in guesses.values() if g >= 1), 0)
    line_holds = probe == 0 or abs(peak(probe) - (fixed + per_image * probe)) <= 0.01 * peak(probe)
    result: dict[str, int] = {}
    for name, guess in guesses.items():
        limit = limits[name]
        while guess >= 1 and (not line_holds or guess in cache) and peak(guess) > limit:
            guess = max(0, min(guess - 1, int(guess * 0.97)))
        result[name] = guess
    return result


def _largest_within(peak: Callable[[int], float], limit: int, cap: int) -> int:
    """The largest batch in [1, cap] with ``peak(batch) <= limit`` (0 if none); the peak grows with the batch."""
    if peak(2) > limit:
        return 1 if peak(1) <= limit else 0
    fits_ = 2
    while fits_ * 2 <= cap and peak(fits_ * 2) <= limit:
        fits_ *= 2
    over = min(fits_ * 2, cap + 1)  # does not fit, or is past the cap; never evaluated
    while over - fits_ > 1:
        middle = (fits_ + over) // 2
        fits_, over = (middle, over) if peak(middle) <= limit else (fits_, middle)
    return fits_


def memory_report(
    recipe: Recipe,
    *,
    workers: int = 1,
    batch: int | None = None,
    precision: str | None = None,
    checkpointing: str | None = None,
    largest: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The ``memory`` entry of ``validate --json``: the prediction, which GPU sizes fit, the largest batch each.
    The batch defaults to one process's among ``workers`` (``train.global_batch_size`` / workers when set);
    ``progress`` is told each part of the work (see :class:`MemoryPredictor`)."""
    predictor = MemoryPredictor(recipe, progress=progress)
    prediction = predictor.predict(batch or recipe.train.per_process_batch(workers), precision, checkpointing)
    report = prediction.to_dict()
    report["fits_gb"] = {str(size): fits(prediction, size) for size in GPU_SIZES_GB}
    if largest:
        limits = {str(size): usable_bytes(size) for size in GPU_SIZES_GB}
        report["largest_batch"] = largest_batches(predictor, prediction, limits)
    return report


def format_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def memory_lines(report: dict[str, Any]) -> list[str]:
    """The text form of :func:`memory_report` for ``validate`` without ``--json``."""
    parts = ", ".join(
        f"{k} {format_bytes(report[k + '_bytes'])}" for k in ("params", "grads", "optimizer", "activations")
    )
    fitting = [size for size, ok in report["fits_gb"].items() if ok]
    lines = [
        f"memory of one training step on {report['device']} (batch {report['batch']}, {report['precision']}, "
        f"checkpointing {report['checkpointing']}): peak {format_bytes(report['peak_bytes'])}, at that moment {parts}",
        f"fits on {' / '.join(fitting) if fitting else 'none of ' + ' / '.join(report['fits_gb'])} GB "
        f"at batch {report['batch']}",
    ]
    if "largest_batch" in report:
        lines.append(
            "largest batch that fits: " + ", ".join(f"{size} GB: {b}" for size, b in report["largest_batch"].items())
        )
    return lines


# ------------------------------------------------------------------------------------- the docs' table
def paper_table(paths: list[str]) -> list[dict[str, Any]]:
    """Predicted CUDA peak of each recipe at its per-GPU batch in the paper, fp16/fp32 x checkpointing off/cell."""
    from .schema import PAPER_PROCESSES, load_recipe

    rows = []
    for path in paths:
        recipe = load_recipe(path)
        per_gpu = recipe.train.per_process_batch(PAPER_PROCESSES.get(recipe.name, 1))
        predictor = MemoryPredictor(recipe)
        for precision in ("fp16", "fp32"):
            for ckpt in ("off", "cell"):
                p = predictor.predict(per_gpu, precision, ckpt)
                rows.append(
                    {
                        "recipe": path,
                        "params": sum(q.numel() for q in predictor.parts.model.parameters()),
                        **p.to_dict(),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":  # python -m nvae_search.memory RECIPE...: one JSON line per recipe and setting
    import sys

    paper_table(sys.argv[1:])
