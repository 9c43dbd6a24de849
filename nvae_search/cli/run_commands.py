"""The commands on one run directory: ``train``, ``eval``, ``sample`` and ``reconstruct``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config_io import ConfigError
from ..status import BROKE
from .common import (
    EmaOption,
    JsonOption,
    SetOption,
    TrackOption,
    _console,
    _load_run_or_fail,
    _tracking_config,
    _user_errors,
    fail_config,
    fail_user,
    load_or_fail,
)
from .tables import run_summary_table


def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    sets: SetOption = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Data-parallel processes (DDP).")] = 1,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 … (default: cuda if any).")] = None,
    track: TrackOption = None,
) -> None:
    """Train a recipe with the paper's objective; writes a run directory and prints its summary."""
    from ..tracking import tracked_run

    loaded = load_or_fail(recipe, sets)
    run_dir = out or Path("runs") / loaded.name
    from ..distributed import batch_problem, launched_by_torchrun, torchrun_world_size, train_under_torchrun

    problem = batch_problem(loaded, torchrun_world_size() or workers)
    if problem or (workers > 1 and launched_by_torchrun()):
        where = "train.global_batch_size" if problem else "--workers"
        fail_config(ConfigError(str(recipe), [(where, problem or "under torchrun the ranks come from torchrun")]))
    try:
        with tracked_run(_tracking_config(loaded.tracking, track), loaded, run_dir) as finish_tracking:
            if launched_by_torchrun():
                rank, result = train_under_torchrun(loaded, run_dir, resume=resume, device=device)
                if rank != 0:  # rank 0 prints the summary
                    raise typer.Exit(3 if result.status in BROKE else 0)
            elif workers > 1:
                from ..distributed import train_data_parallel

                result = train_data_parallel(loaded, run_dir, workers=workers, resume=resume)
            else:
                from ..train import train as run_training

                result = run_training(loaded, run_dir, resume=resume, device=device)
            finish_tracking(result.to_dict())
    except ConfigError as err:  # e.g. a damaged metrics.jsonl in the run directory
        fail_config(err)
    except _user_errors() as err:
        fail_user(err)
    summary = result.to_dict()
    _console().print(run_summary_table(summary))
    if summary["status"] in BROKE:  # diverged or exploded
        raise typer.Exit(3)


def eval_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `train`.", show_default=False)],
    iw_samples: Annotated[int | None, typer.Option("--iw-samples", min=1, help="Importance samples K.")] = None,
    images: Annotated[int | None, typer.Option("--images", min=1, help="Only the first N test images.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    chunk: Annotated[int | None, typer.Option("--chunk", min=1, help="Importance samples per forward pass.")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="K passes one after another (slow).")] = False,
    device: Annotated[str | None, typer.Option("--device")] = None,
    ema: EmaOption = True,
    json_output: JsonOption = False,
) -> None:
    """Importance-weighted NLL and NELBO on the recipe's evaluation split (nats, or bits per dim)."""
    from ..runs import evaluate_run

    run = _load_run_or_fail(run_dir, device, ema)
    try:
        result = evaluate_run(
            run,
            iw_samples=iw_samples,
            images=images,
            batch_size=batch_size,
            chunk=chunk,
            sequential=sequential,
            progress=not json_output,
        )
    except _user_errors() as err:
        fail_user(err)
    if json_output:
        typer.echo(json.dumps({"step": run.step, "weights": run.weights, **result.to_dict()}, indent=2))
        return
    unit = result.unit
    console = _console()
    weights = f", {run.weights} weights" if run.has_ema else ""
    console.print(f"[bold]{run_dir}[/] (step {run.step:,}{weights}), {result.images:,} images, K = {result.iw_samples}")
    console.print(f"  NLL   {result.nll:.4f} {unit}" + (f"  ({result.nll_nats:.2f} nats)" if unit != "nats" else ""))
    console.print(f"  NELBO {result.nelbo:.4f} {unit}")
    console.print(f"  active units per group {result.active_units}  ({result.seconds:.1f} s)")


def sample(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `train`.", show_default=False)],
    temperature: Annotated[
        float | None, typer.Option("--temperature", "-t", min=0.0, help="Prior σ scale [default: eval.temperature].")
    ] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="Number of images [default: eval.num_samples].")] = None,
    readjust_bn: Annotated[
        int | None,
        typer.Option(
            "--readjust-bn", min=0, help="Re-estimate BN on N sample batches [default: eval.readjust_bn_steps]."
        ),
    ] = None,
    scale_pixels: Annotated[
        bool,
        typer.Option(
            "--scale-pixels/--no-scale-pixels",
            help="Also apply the temperature to the pixel-level distribution (mixture logits and noise). Default: "
            "off, pixels drawn at temperature 1 as the paper's sampling script does.",
        ),
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", help="PNG path (default: inside the run).")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    device: Annotated[str | None, typer.Option("--device")] = None,
    fmt: Annotated[str, typer.Option("--format", help="grid (one PNG), folder (one PNG per image) or npz.")] = "grid",
    temperatures: Annotated[
        str | None, typer.Option("--temperatures", help="A sweep, e.g. 0.6,0.8,1.0: one grid row per temperature.")
    ] = None,
    ema: EmaOption = True,
) -> None:
    """Draw a PNG grid of samples at a temperature, optionally re-estimating BN statistics first."""
    from ..runs import sample_run

    run = _load_run_or_fail(run_dir, device, ema)
    if fmt != "grid" or temperatures:
        sweep = _temperatures_or_fail(temperatures) if temperatures else [temperature]
        path = sample_outputs(
            run,
            n=n,
            temperatures=sweep,
            fmt=fmt,
            out=out,
            readjust_bn=readjust_bn,
            seed=seed,
            scale_pixels=scale_pixels,
        )
        _console().print(f"wrote {path}")
        return
    path = sample_run(
        run, n=n, temperature=temperature, readjust_bn=readjust_bn, out=out, seed=seed, scale_pixels=scale_pixels
    )
    _console().print(f"wrote {path}")


def _temperatures_or_fail(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        fail_config(ConfigError("--temperatures", [("temperatures", f"expected e.g. 0.6,0.8,1.0, got {text!r}")]))
    return values


def sample_outputs(
    run: Any, *, n: int | None, temperatures: list[float | None], fmt: str, out: Path | None, **kwargs: Any
) -> Path:
    """`sample` with --format folder/npz or --temperatures (the plain PNG grid stays in runs.sample_run)."""
    from ..outputs import write_samples

    if fmt not in ("grid", "folder", "npz"):
        fail_config(ConfigError("--format", [("format", f"expected grid, folder or npz, got {fmt!r}")]))
    return write_samples(run, n=n, temperatures=temperatures, fmt=fmt, out=out, **kwargs)


def reconstruct(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `train`.", show_default=False)],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of evaluation images.")] = 16,
    out: Annotated[Path | None, typer.Option("--out", help="PNG path (default: inside the run).")] = None,
    device: Annotated[str | None, typer.Option("--device")] = None,
) -> None:
    """A PNG grid of evaluation images, each row of inputs followed by a row of their reconstructions."""
    from ..outputs import reconstruct_run

    run = _load_run_or_fail(run_dir, device)
    try:
        path = reconstruct_run(run, n=n, out=out)
    except _user_errors() as err:
        fail_user(err)
    _console().print(f"wrote {path}")
