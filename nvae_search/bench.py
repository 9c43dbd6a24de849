"""Benchmarks whose figures go into the README: training-step time and batched IW evaluation speed."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .schema import Recipe


@dataclass
class StepBench:
    recipe: str
    batch: int
    threads: int
    params: int
    times_s: list[float]
    median_s: float
    best_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_train_step(recipe: Recipe, *, batch: int, steps: int, threads: int, warmup: int = 1) -> StepBench:
    """Time full training steps of the real trainer (forward, loss with SR and BN terms, backward, Adamax).

    Uses the first images of the recipe's training data, so the timings are the ones a run would see.
    """
    from .train import Trainer, pick_device

    torch.set_num_threads(threads)
    train_cfg = recipe.train.model_copy(
        update={
            "batch_size": batch,
            "global_batch_size": None,
            "steps": warmup + steps,
            "epochs": None,
            "progress": False,
        }
    )
    recipe = recipe.model_copy(update={"train": train_cfg})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(recipe, Path(tmp), pick_device("cpu"), None)
        batches = trainer._batches()
        times = []
        for i in range(warmup + steps):
            x = trainer.prepare(next(batches))
            start = time.perf_counter()
            trainer.train_step(x)
            trainer.step += 1
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return StepBench(recipe.name, batch, threads, trainer.params, times, statistics.median(times), min(times))


@dataclass
class EvalBench:
    images: int
    iw_samples: int
    batched_s: float
    sequential_s: float
    batched_nll: float
    sequential_nll: float
    speedup: float
    batched_image_passes_per_s: float
    sequential_image_passes_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_eval(
    run_dir: str | Path, *, images: int, iw_samples: int, chunk: int, batch_size: int, threads: int
) -> EvalBench:
    """K-sample IW evaluation of the first images, batched over K vs K sequential passes, in one process."""
    from .runs import evaluate_run, load_run

    torch.set_num_threads(threads)
    run = load_run(run_dir)
    common = dict(iw_samples=iw_samples, images=images, batch_size=batch_size, progress=False)
    torch.manual_seed(0)
    batched = evaluate_run(run, chunk=chunk, **common)  # type: ignore[arg-type]
    torch.manual_seed(0)
    sequential = evaluate_run(run, sequential=True, **common)  # type: ignore[arg-type]
    passes = images * iw_samples
    return EvalBench(
        images,
        iw_samples,
        batched.seconds,
        sequential.seconds,
        batched.nll,
        sequential.nll,
        sequential.seconds / batched.seconds,
        passes / batched.seconds,
        passes / sequential.seconds,
    )


# ------------------------------------------------------------------------------------------- bench gpu
GPU_BENCH_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "paper" / "cifar10.yaml"
CPU_REHEARSAL_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"
GPU_SETTINGS = [(p, c) for p in ("fp16", "bf16", "fp32") for c in ("off", "cell")]
MIB = 1024 * 1024


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _timed(fn: Any, device: str) -> float:
    """Seconds of one call, between device synchronisations (CUDA work is asynchronous)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def gpu_train_setting(
    recipe: Recipe, batch: int, precision: str, checkpointing: str, steps: int, device: str = "cuda"
) -> dict[str, Any]:
    """Step time and measured peak of the real training step in one precision/checkpointing setting.

    The peak is ``max_memory_allocated`` over the timed steps, reset after a warm-up step (so it is the steady
    step, as the prediction is: parameters, Adamax state and everything the step allocates); a CPU rehearsal
    measures no peak. An out-of-memory error is reported in the row; everything is freed before the next setting.
    """
    row: dict[str, Any] = {"precision": precision, "checkpointing": checkpointing, "batch": batch}
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        return {**row, "outcome": "not supported", "error": "bf16 needs an Ampere or newer GPU: not run"}
    return {**row, **_reported(partial(_measure_train, recipe, batch, precision, checkpointing, steps, device), device)}


def _reported(measure: Callable[[], dict[str, Any]], device: str) -> dict[str, Any]:
    """``measure()``'s figures with ``"outcome": "ok"``, or its error as an outcome (``out of memory``, ``failed``)
    and a message: one failing part must not cost the others' figures. Everything it allocated is freed before the
    next part."""
    try:
        return {**measure(), "outcome": "ok"}
    except torch.cuda.OutOfMemoryError as err:
        return {"outcome": "out of memory", "error": f"out of memory: {_first_line(err)}"}
    except Exception as err:
        return {"outcome": "failed", "error": f"{type(err).__name__}: {_first_line(err)}"}
    finally:
        _free(device)  # the failed part's frames are gone by now: its tensors can be released


def _measure_train(
    recipe: Recipe, batch: int, precision: str, checkpointing: str, steps: int, device: str
) -> dict[str, Any]:
    from .memory_step import build_step_parts, gradient_scaler, init_optimizer_state, training_step

    torch.manual_seed(0)
    cuda = device == "cuda"
    parts = build_step_parts(recipe, batch, precision, checkpointing == "cell", foreach=cuda, device=device)  # type: ignore[arg-type]
    init_optimizer_state(parts.optimizer)
    scaler = gradient_scaler(precision, device)
    _timed(lambda: training_step(parts, scaler), device)  # warm-up: cuDNN autotuning, allocator growth
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    allocated = torch.cuda.memory_allocated() if cuda else None
    times = [_timed(lambda: training_step(parts, scaler), device) for _ in range(steps)]
    measured: dict[str, Any] = (
        {"allocated_before_bytes": allocated, "measured_peak_bytes": torch.cuda.max_memory_allocated()} if cuda else {}
    )
    return {**measured, "step_s": statistics.median(times), "step_times_s": times}


def gpu_eval_sample(
    recipe: Recipe, *, images: int, iw_samples: int, chunk: int, sample_n: int, device: str = "cuda"
) -> dict[str, Any]:
    """Batched IW evaluation throughput and sampling time per image of the recipe's (untrained) model, fp32."""
    measure = partial(_measure_eval_sample, recipe, images, iw_samples, chunk, sample_n, device)
    setting = {"images": images, "iw_samples": iw_samples, "chunk": chunk, "sample_n": sample_n}
    return {**setting, **_reported(measure, device)}


def _first_line(err: BaseException) -> str:
    lines = str(err).splitlines()
    return lines[0] if lines else repr(err)


def _measure_eval_sample(
    recipe: Recipe, images: int, iw_samples: int, chunk: int, sample_n: int, device: str
) -> dict[str, Any]:
    from .evaluate import iw_bound
    from .model.builder import build_model

    torch.manual_seed(0)
    cfg = recipe.model
    model = build_model(cfg).to(device).eval()
    x = torch.rand(images, cfg.input_channels, cfg.resolution, cfg.resolution, device=device)
    if cfg.output.distribution == "bernoulli":
        x = torch.bernoulli(x)
    iw_bound(model, x[:2], 2, 2)  # warm-up
    iw_s = _timed(lambda: iw_bound(model, x, iw_samples, chunk), device)
    with torch.no_grad():
        model.sample(2, 1.0, torch.device(device))  # warm-up
        sample_s = _timed(lambda: model.sample(sample_n, 1.0, torch.device(device)), device)
    return {
        "iw_s": iw_s,
        "iw_image_passes_per_s": images * iw_samples / iw_s,
        "sample_s": sample_s,
        "sample_s_per_image": sample_s / sample_n,
    }


def gpu_batch(recipe: Recipe) -> int:
    """The batch one GPU takes: a paper recipe's global batch split over the GPUs the paper trained it on."""
    from .schema import PAPER_PROCESSES

    return recipe.train.per_process_batch(PAPER_PROCESSES.get(recipe.name, 1))


def bench_gpu(
    recipe: Recipe,
    *,
    batch: int | None = None,
    steps: int = 3,
    iw_images: int = 16,
    iw_samples: int = 100,
    chunk: int = 25,
    sample_n: int = 64,
    log: Any = None,
    device: str = "cuda",
) -> dict[str, Any]:
    """The GPU check: training step per precision × checkpointing (time, measured vs predicted peak), batched IW
    evaluation throughput and sampling time. Returns ``{"cuda": False, ...}`` without a CUDA device.
    ``device="cpu"``: a rehearsal that runs every part on the CPU (step times, no measured peak), so the check's
    own code is known to work before GPU time is spent on it."""
    if device == "cuda" and not torch.cuda.is_available():
        return {"cuda": False, "message": "no CUDA device: torch.cuda.is_available() is False; nothing was run"}
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    from .memory import MemoryPredictor

    batch = batch or gpu_batch(recipe)
    start = time.perf_counter()
    cuda = device == "cuda"
    report: dict[str, Any] = {
        "cuda": cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu (rehearsal)",
        "total_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "torch": torch.__version__,
        "recipe": recipe.name,
        "batch": batch,
        "train": [],
    }
    predictor = MemoryPredictor(recipe, device="cuda")
    for precision, checkpointing in GPU_SETTINGS:
        row = gpu_train_setting(recipe, batch, precision, checkpointing, steps, device)
        try:
            predicted = predictor.predict(batch, precision, checkpointing).peak_bytes
        except Exception as err:  # a prediction failure must not hide the measurements
            row["prediction_error"] = repr(err)
        else:
            row["predicted_peak_bytes"] = predicted
            if "measured_peak_bytes" in row:
                row["predicted_over_measured"] = predicted / row["measured_peak_bytes"]
        report["train"].append(row)
        if log:
            log(gpu_row_text(row))
    report["eval_sample"] = gpu_eval_sample(
        recipe, images=iw_images, iw_samples=iw_samples, chunk=chunk, sample_n=sample_n, device=device
    )
    report["seconds"] = time.perf_counter() - start
    return report


def gpu_row_text(row: dict[str, Any]) -> str:
    def mib(key: str) -> str:
        return f"{row[key] / MIB:,.0f} MiB" if key in row else "–"

    step = f"{row['step_s']:.3f} s/step" if "step_s" in row else row.get("error", "–")
    ratio = f"{row['predicted_over_measured']:.2f}" if "predicted_over_measured" in row else "–"
    return (
        f"{row['precision']:>4} checkpointing {row['checkpointing']:>4}: {step}, "
        f"measured peak {mib('measured_peak_bytes')}, predicted {mib('predicted_peak_bytes')} "
        f"(predicted/measured {ratio})"
    )
