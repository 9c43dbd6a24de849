"""Benchmarks whose figures go into the README: training-step time and batched IW evaluation speed."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
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
