"""``nvae-search bench``: the benchmarks whose figures the README reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..profile import cpu_contention
from .common import JsonOption, SetOption, _console, load_or_fail
from .tables import gpu_table


def bench_step(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    batch: Annotated[int, typer.Option("--batch", min=1)] = 8,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps after one warm-up step.")] = 5,
    threads: Annotated[int, typer.Option("--threads", min=1)] = 2,
    sets: SetOption = None,
    json_output: JsonOption = False,
) -> None:
    """Median and best time of full training steps (forward, SR + BN terms, backward, Adamax) on real data."""
    from ..bench import bench_train_step

    result = bench_train_step(load_or_fail(recipe, sets), batch=batch, steps=steps, threads=threads)
    if json_output:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    _console().print(
        f"{result.recipe}: {result.params:,} params, batch {batch}, {threads} threads: "
        f"median {result.median_s:.3f} s, best {result.best_s:.3f} s over {steps} steps "
        f"({', '.join(f'{t:.3f}' for t in result.times_s)})"
    )
    busy = cpu_contention(threads)
    if busy:
        _console().print(f"[yellow]warning:[/] {busy}")


def bench_eval_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `train`.", show_default=False)],
    images: Annotated[int, typer.Option("--images", min=1)] = 100,
    iw_samples: Annotated[int, typer.Option("--iw-samples", min=1)] = 1000,
    chunk: Annotated[int, typer.Option("--chunk", min=1)] = 100,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 10,
    threads: Annotated[int, typer.Option("--threads", min=1)] = 2,
    json_output: JsonOption = False,
) -> None:
    """IW evaluation batched over K versus K sequential passes: time, image-passes per second, both estimates."""
    from ..bench import bench_eval

    result = bench_eval(
        run_dir, images=images, iw_samples=iw_samples, chunk=chunk, batch_size=batch_size, threads=threads
    )
    if json_output:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    _console().print(
        f"IW-{iw_samples} on {images} images: batched {result.batched_s:.1f} s "
        f"({result.batched_image_passes_per_s:.0f} image-passes/s, NLL {result.batched_nll:.3f}); "
        f"sequential {result.sequential_s:.1f} s ({result.sequential_image_passes_per_s:.0f}/s, "
        f"NLL {result.sequential_nll:.3f}); speed-up {result.speedup:.2f}x"
    )


def bench_gpu_command(
    recipe: Annotated[
        Path | None,
        typer.Option("--recipe", help="Recipe to check (default: paper/cifar10; cpu/tiny with --cpu-rehearsal)."),
    ] = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Per-GPU batch (default: the recipe's).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps per setting, after one warm-up.")] = 3,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the JSON report to this file.")] = None,
    rehearse: Annotated[
        bool,
        typer.Option(
            "--cpu-rehearsal",
            help="Run every part on the CPU instead (step times, no GPU figures): check the install before GPU time.",
        ),
    ] = False,
    json_output: JsonOption = False,
    sets: SetOption = None,
) -> None:
    """The first thing to run on a new GPU machine: training step in fp16+scaler, bf16 and fp32 with and without
    checkpointing (time, measured peak next to the predicted one), batched IW evaluation, sampling."""
    import torch

    from ..bench import CPU_REHEARSAL_RECIPE, GPU_BENCH_RECIPE, bench_gpu

    console = _console()
    if not rehearse and not torch.cuda.is_available():
        message = "no CUDA device (torch.cuda.is_available() is False): nothing to check here"
        if json_output:
            typer.echo(json.dumps({"cuda": False, "message": message}))
        else:
            console.print(message)
        return
    loaded = load_or_fail(recipe or (CPU_REHEARSAL_RECIPE if rehearse else GPU_BENCH_RECIPE), sets)
    log = None if json_output else console.print
    report = bench_gpu(loaded, batch=batch, steps=steps, log=log, device="cpu" if rehearse else "cuda")
    if out is not None:
        from ..config_io import atomic_write_text

        atomic_write_text(out, json.dumps(report, indent=2))
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    console.print(gpu_table(report))
