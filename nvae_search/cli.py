"""The ``nvae-search`` command line: validate recipes, print the schema, profile a model.

torch and the model code are imported inside the commands, so ``--help`` and ``schema`` stay fast and work
on machines without torch. Nothing in the package imports this module (a layering test enforces it).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .builtins import resolve_config
from .config_io import ConfigError, clear_other_budgets, parse_override
from .schema import Recipe, load_recipe, recipe_json_schema

if TYPE_CHECKING:
    import torch

    from .model.nvae import NVAE
    from .schema import ModelConfig

app = typer.Typer(
    name="nvae-search",
    help="Declarative NVAE: validate, profile, train, evaluate, sample and search NVAE variants.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
)

CONFIG_EXIT_CODE = 2
MIB = 1024 * 1024
_QUIET = False  # -q: the stdout console prints nothing (errors on stderr still do)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value before validation: dotted.key=value (value read as YAML)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
TrackOption = Annotated[
    str | None, typer.Option("--track", help="Track in mlflow or wandb (or none); default: the file's tracking:.")
]


# ------------------------------------------------------------------------------------ shared helpers
def _console(stderr: bool = False) -> Console:
    # Built per call so that the width follows the terminal (and COLUMNS) of this invocation.
    return Console(stderr=stderr, highlight=False, quiet=_QUIET and not stderr)


def config_error_panel(err: ConfigError) -> Panel:
    """One screen for a bad config file: the file, then one row per field path with its reason."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    table.add_column("field", style="bold cyan", overflow="fold")
    table.add_column("problem", overflow="fold")
    for path, reason in err.problems or [("", "invalid configuration")]:
        table.add_row(Text(path or "<file>"), Text(reason))
    header = Text.assemble(("file: ", "bold"), (err.source, "yellow"))
    return Panel(
        Group(header, Text(""), table),
        title="[bold red]invalid configuration",
        title_align="left",
        border_style="red",
        expand=False,
    )


def print_config_error(err: ConfigError) -> None:
    _console(stderr=True).print(config_error_panel(err))


def fail_config(err: ConfigError) -> NoReturn:
    """Report a bad config file on one screen and exit with code 2, without a traceback."""
    print_config_error(err)
    raise typer.Exit(CONFIG_EXIT_CODE)


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``["model.use_se=false", "train.steps=10"]`` → ``{"model.use_se": False, "train.steps": 10}``."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, value = parse_override(item)
        overrides[key] = value
    return clear_other_budgets(overrides)


def load_or_fail(path: Path, sets: list[str] | None) -> Recipe:
    """Load, override and validate a recipe; a bad file ends the command via :func:`fail_config`."""
    try:
        return load_recipe(resolve_config(path, "recipes"), overrides=parse_sets(sets))
    except ConfigError as err:
        fail_config(err)


def build_or_raise(recipe: Recipe, source: str) -> NVAE:
    """Build the model; a builder refusal is a config problem of the file, not a crash."""
    from .model.builder import build_model

    try:
        return build_model(recipe.model)
    except (ValueError, KeyError) as exc:
        raise ConfigError(source, [("model", f"the builder refused it: {exc}")]) from None


# ------------------------------------------------------------------------------------------ validate
def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_summary(recipe: Recipe, model: NVAE, source: str, workers: int = 1) -> dict[str, Any]:
    """The architecture facts of one recipe, as plain JSON-able values."""
    from torch import nn

    from .model.flows import PairedARCell

    cfg = recipe.model
    convs = model.conv_layers()
    return {
        "file": source,
        "name": recipe.name,
        "groups_per_scale": cfg.groups_per_scale(),
        "latent_resolutions": cfg.latent_resolutions(),
        "latent_channels_per_group": cfg.num_latent_per_group,
        "total_latent_dims": cfg.total_latent_dims(),
        "params": count_parameters(model),
        "convs": len(convs),
        # WN convs are the ones carrying a learned log-norm (Conv2D with weight_norm, and every masked AR conv).
        "weight_normed_convs": sum(isinstance(getattr(c, "log_weight_norm", None), nn.Parameter) for c in convs),
        "batch_norms": len(model.batch_norms()),
        "flow_cells": sum(isinstance(m, PairedARCell) for m in model.modules()),
        "output_distribution": cfg.output.distribution,
        "data_dims": cfg.data_dims(),
        **batch_summary(recipe, workers, source),
    }


def batch_summary(recipe: Recipe, workers: int, source: str) -> dict[str, Any]:
    """The per-process and global batch on ``workers`` processes; a global batch that does not divide is an error."""
    from .schema import paper_batch_warning

    try:
        per_process = recipe.train.per_process_batch(workers)
    except ValueError as exc:
        raise ConfigError(source, [("train.global_batch_size", str(exc))]) from None
    return {
        "workers": workers,
        "batch_per_process": per_process,
        "global_batch": per_process * workers,
        "batch_warning": paper_batch_warning(recipe, workers),
    }


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(
        title=f"{summary['name']}  ({summary['file']})", box=box.SIMPLE_HEAD, show_header=False, title_justify="left"
    )
    table.add_column("property", style="bold")
    table.add_column("value", justify="right")
    groups = summary["groups_per_scale"]
    rows = [
        ("groups per scale (fine→coarse)", f"{groups} = {sum(groups)}"),
        ("latent resolutions", ", ".join(str(r) for r in summary["latent_resolutions"])),
        ("latent channels per group", str(summary["latent_channels_per_group"])),
        ("total latent dims", f"{summary['total_latent_dims']:,}"),
        ("parameters", f"{summary['params']:,}"),
        ("conv layers", f"{summary['convs']:,}"),
        ("weight-normed convs", f"{summary['weight_normed_convs']:,}"),
        ("batch-norm layers", f"{summary['batch_norms']:,}"),
        ("paired AR flow cells", f"{summary['flow_cells']:,}"),
        ("output distribution", summary["output_distribution"]),
        ("data dims", f"{summary['data_dims']:,}"),
    ]
    if "batch_per_process" in summary:
        rows.append(
            ("batch", f"{summary['batch_per_process']} per process × {summary['workers']} = {summary['global_batch']}")
        )
        if summary["batch_warning"]:
            rows.append(("warning", f"[yellow]{summary['batch_warning']}[/]"))
    for key, value in rows:
        table.add_row(key, value)
    return table


def _summarize_file(path: Path, overrides: dict[str, Any], workers: int = 1) -> dict[str, Any]:
    recipe = load_recipe(path, overrides=overrides)
    return model_summary(recipe, build_or_raise(recipe, str(path)), str(path), workers)


@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(metavar="RECIPE", help="Recipe YAML files.", show_default=False)],
    json_output: JsonOption = False,
    sets: SetOption = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Processes to plan for: shows the per-process batch.")
    ] = 1,
    memory: Annotated[
        bool,
        typer.Option(
            "--memory",
            help="Predict the GPU memory of one training step (implied by --batch, --precision, --checkpointing).",
        ),
    ] = False,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Batch of the memory prediction.")] = None,
    precision: Annotated[
        str | None, typer.Option("--precision", help="fp32 | bf16 | fp16 | auto for the memory prediction.")
    ] = None,
    checkpointing: Annotated[
        str | None, typer.Option("--checkpointing", help="off | cell for the memory prediction.")
    ] = None,
) -> None:
    """Load, validate and build each recipe, and summarise its architecture (and its training-step memory)."""
    try:
        overrides = parse_sets(sets)
        memory_options = _memory_options(memory, batch, precision, checkpointing)
    except ConfigError as err:
        fail_config(err)
    summaries, failed = [], False
    for path in recipes:
        try:
            summaries.append(_summarize_config(path, overrides, workers))
            if memory_options is not None and "space" not in summaries[-1]:
                summaries[-1]["memory"] = _predict_memory(path, overrides, memory_options, workers)
        except ConfigError as err:
            print_config_error(err)
            failed = True
    _print_summaries(summaries, json_output, several=len(recipes) > 1)
    if failed:
        raise typer.Exit(CONFIG_EXIT_CODE)


def _summarize_config(ref: Path, overrides: dict[str, Any], workers: int = 1) -> dict[str, Any]:
    """A recipe's architecture summary, or for a space file its size and its base recipe's summary."""
    from .config_io import read_yaml_file

    path = resolve_config(ref, "recipes")
    if not path.exists():
        path = resolve_config(ref, "spaces")
    data = read_yaml_file(path)
    if not (isinstance(data, dict) and "base_recipe" in data):
        return _summarize_file(path, overrides, workers)
    from .spaces import load_space, space_size

    space = load_space(path)
    base = _summarize_file(space.base_recipe_path, overrides)
    return {"file": str(path), "space": space.study.name, **space_size(space), "base_recipe": base}


def space_summary_table(summary: dict[str, Any]) -> Group:
    table = Table(
        title=f"space {summary['space']}  ({summary['file']})",
        box=box.SIMPLE_HEAD,
        show_header=False,
        title_justify="left",
    )
    table.add_column("property", style="bold")
    table.add_column("value")
    grid = summary["grid_points"]
    table.add_row("searched parameters", ", ".join(summary["parameters"]) or "-")
    table.add_row("parameters in the tree", str(len(summary["parameters"])))
    table.add_row("grid points", f"{grid:,}" if grid is not None else "continuous (no finite grid)")
    table.add_row("trials", f"{summary['n_trials']:,}")
    base = summary["base_recipe"]
    return Group(table, summary_table(base))


def _print_summaries(summaries: list[dict[str, Any]], json_output: bool, several: bool) -> None:
    if json_output:
        if summaries:
            typer.echo(json.dumps(summaries if several else summaries[0], indent=2))
        return
    console = _console()
    for summary in summaries:
        console.print(space_summary_table(summary) if "space" in summary else summary_table(summary))
        if "memory" in summary:
            from .memory import memory_lines

            console.print("\n".join(memory_lines(summary["memory"])))


def _memory_options(memory: bool, batch: int | None, precision: str | None, ckpt: str | None) -> dict[str, Any] | None:
    """The memory prediction's settings, or None when none was asked for."""
    problems = []
    if precision is not None and precision not in ("fp32", "bf16", "fp16", "auto"):
        problems.append(("--precision", f"must be fp32, bf16, fp16 or auto, got {precision!r}"))
    if ckpt is not None and ckpt not in ("off", "cell"):
        problems.append(("--checkpointing", f"must be off or cell, got {ckpt!r}"))
    if problems:
        raise ConfigError("command line", problems)
    if not (memory or batch or precision or ckpt):
        return None
    return {"batch": batch, "precision": precision, "checkpointing": ckpt}


def _predict_memory(path: Path, overrides: dict[str, Any], options: dict[str, Any], workers: int) -> dict[str, Any]:
    from .memory import memory_report

    recipe = load_recipe(resolve_config(path, "recipes"), overrides=overrides)
    return memory_report(recipe, workers=workers, **options)


# -------------------------------------------------------------------------------------------- schema
@app.command()
def schema(
    space: Annotated[bool, typer.Option("--space", help="Print the schema of a search-space file instead.")] = False,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the recipe reference page (docs/recipes.md) instead.")
    ] = False,
) -> None:
    """Print the JSON schema of recipe files (or of search-space files with --space)."""
    if markdown:
        from .schema_docs import recipe_reference_markdown

        typer.echo(recipe_reference_markdown(), nl=False)
        return
    typer.echo(json.dumps(_space_schema() if space else recipe_json_schema(), indent=2))


def _space_schema() -> dict[str, Any]:
    # Search spaces are optional: only a missing module is reported this way, a broken one raises.
    if importlib.util.find_spec("nvae_search.spaces") is None:
        _console(stderr=True).print("[red]error:[/] search spaces are not available (no module nvae_search.spaces)")
        raise typer.Exit(CONFIG_EXIT_CODE)
    spaces = importlib.import_module("nvae_search.spaces")
    make_schema = getattr(spaces, "space_json_schema", None)
    if make_schema is None:
        _console(stderr=True).print("[red]error:[/] nvae_search.spaces has no space_json_schema()")
        raise typer.Exit(CONFIG_EXIT_CODE)
    return make_schema()


# ------------------------------------------------------------------------------------------- profile
def random_input(cfg: ModelConfig, batch: int, device: torch.device) -> torch.Tensor:
    """A batch shaped like the recipe's data: binary for Bernoulli, uniform in [0, 1] otherwise."""
    import torch

    shape = (batch, cfg.input_channels, cfg.resolution, cfg.resolution)
    if cfg.output.distribution == "bernoulli":
        return torch.bernoulli(torch.full(shape, 0.5, device=device))
    return torch.rand(shape, device=device)


def training_loss(model: NVAE, x: torch.Tensor) -> torch.Tensor:
    """mean over the batch of reconstruction + summed KL: the unweighted NELBO."""
    import torch

    result = model(x)
    recon = model.reconstruction_loss(result.output, x)
    return (recon + torch.stack(result.kl).sum(dim=0)).mean()


def _synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(model: NVAE, x: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    _synchronize(x.device)
    start = time.perf_counter()
    training_loss(model, x).backward()
    _synchronize(x.device)
    return time.perf_counter() - start


def _conv_forward_flops(
    x_shape: Sequence[int], w_shape: Sequence[int], out_shape: Sequence[int], transposed: bool
) -> int:
    """2·multiply-adds of a (grouped) conv: w_shape already holds C_in/groups (C_out/groups if transposed)."""
    spatial = (x_shape if transposed else out_shape)[2:]
    return 2 * x_shape[0] * math.prod(spatial) * math.prod(w_shape)


def _conv_backward_flops(
    grad_out_shape: Sequence[int],
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """grad_input and grad_weight each cost one forward conv.

    Replaces torch's formula, which counts grad_weight of a grouped conv as if it were dense (×groups too
    many: 49× for NVAE's depthwise 5×5 convs with 48 channels).
    """
    transposed, output_mask = args[4], args[7]
    return _conv_forward_flops(x_shape, w_shape, grad_out_shape, transposed) * sum(map(bool, output_mask[:2]))


def _count_flops(model: NVAE, x: torch.Tensor, backward: bool) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.zero_grad(set_to_none=True)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        loss = training_loss(model, x)
        if backward:
            loss.backward()
    return int(counter.get_total_flops())


def _proc_status_mib(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in MiB."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def _reset_peak_rss() -> bool:
    # Linux resets the high-water mark (VmHWM) to the current RSS when 5 is written to clear_refs.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _ru_maxrss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _rss_baseline_mib() -> float:
    if _reset_peak_rss():
        current = _proc_status_mib("VmRSS")
        if current is not None:
            return current
    return _ru_maxrss_mib()


def _rss_peak_mib() -> float:
    peak = _proc_status_mib("VmHWM")
    return peak if peak is not None else _ru_maxrss_mib()


def _measure_steps(model: NVAE, x: torch.Tensor, steps: int) -> dict[str, Any]:
    """Median step time and peak memory over ``steps`` forward+backward passes after one warm-up.

    A 2-image step first pays the one-time costs (lazy library set-up: ~40 MiB of RSS on CPU, more with
    checkpointing) that would otherwise swamp the activation memory of small models; the memory baseline is
    taken after it. Two images, because batch norm needs more than one value per channel at a 1×1 scale.
    """
    import torch

    cuda = x.device.type == "cuda"
    _timed_step(model, x[:2])
    rss_base = _rss_baseline_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats(x.device)
        cuda_base = torch.cuda.memory_allocated(x.device)
    _timed_step(model, x)  # warm-up: allocator, kernels, data-dependent init
    times = [_timed_step(model, x) for _ in range(steps)]
    rss_delta = max(0.0, _rss_peak_mib() - rss_base)
    cuda_peak = (torch.cuda.max_memory_allocated(x.device) - cuda_base) / MIB if cuda else None
    return {
        "step_time_median_s": statistics.median(times),
        "step_times_s": times,
        "peak_rss_delta_mib": rss_delta,
        "cuda_peak_mib": cuda_peak,
        "peak_memory_mib": cuda_peak if cuda else rss_delta,
        "memory_source": "cuda max_memory_allocated" if cuda else "process RSS high-water mark",
    }


def profile_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process, so that its peak RSS belongs to one checkpointing setting only."""
    import torch

    from .model.builder import build_model
    from .runtime import tune_allocator
    from .schema import ModelConfig

    tune_allocator()  # a spawned process: measure memory and time as `train` runs, with the same allocator
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    device = torch.device(job["device"])
    cfg = ModelConfig.model_validate(job["model"])
    model = build_model(cfg).to(device).train()
    model.set_checkpointing(job["checkpointing"])
    x = random_input(cfg, job["batch"], device)
    result = _measure_steps(model, x, job["steps"])
    batch = job["batch"]
    result["params"] = count_parameters(model)
    result["flops_fwd_per_image"] = _count_flops(model, x, backward=False) / batch
    result["flops_fwd_bwd_per_image"] = _count_flops(model, x, backward=True) / batch
    result["threads"] = torch.get_num_threads()
    return result


def run_isolated(job: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`profile_worker` in a fresh spawned process (spawn: no inherited torch state or RSS)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(profile_worker, job).result()


def _ratio(on: float | None, off: float | None) -> float | None:
    if on is None or off is None or off == 0:
        return None
    return on / off


def profile_report(recipe: Recipe, source: str, runs: dict[str, dict[str, Any]], job: dict[str, Any]) -> dict[str, Any]:
    off, on = runs["off"], runs["on"]
    return {
        "file": source,
        "name": recipe.name,
        "device": job["device"],
        "batch": job["batch"],
        "steps": job["steps"],
        "threads": off["threads"],
        "params": off["params"],
        "checkpointing_off": off,
        "checkpointing_on": on,
        "ratio_on_off": {
            "flops_fwd_per_image": _ratio(on["flops_fwd_per_image"], off["flops_fwd_per_image"]),
            "flops_fwd_bwd_per_image": _ratio(on["flops_fwd_bwd_per_image"], off["flops_fwd_bwd_per_image"]),
            "step_time_median_s": _ratio(on["step_time_median_s"], off["step_time_median_s"]),
            "peak_memory_mib": _ratio(on["peak_memory_mib"], off["peak_memory_mib"]),
        },
    }


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def profile_table(report: dict[str, Any]) -> Table:
    title = (
        f"{report['name']} ({report['file']}): device {report['device']}, batch {report['batch']}, "
        f"{report['steps']} timed steps, {report['threads']} threads"
    )
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("", "params", "GFLOPs/img fwd", "GFLOPs/img fwd+bwd", "step time (median, s)", "peak memory (MiB)"):
        table.add_column(column, justify="left" if not column else "right")
    for label, key in (("checkpointing off", "checkpointing_off"), ("checkpointing on", "checkpointing_on")):
        run = report[key]
        table.add_row(
            label,
            f"{run['params']:,}",
            _fmt(run["flops_fwd_per_image"] / 1e9, ".4f"),
            _fmt(run["flops_fwd_bwd_per_image"] / 1e9, ".4f"),
            _fmt(run["step_time_median_s"], ".4f"),
            _fmt(run["peak_memory_mib"], ".1f"),
        )
    ratio = report["ratio_on_off"]
    table.add_row(
        "ratio on/off",
        "",
        _fmt(ratio["flops_fwd_per_image"], ".2f"),
        _fmt(ratio["flops_fwd_bwd_per_image"], ".2f"),
        _fmt(ratio["step_time_median_s"], ".2f"),
        _fmt(ratio["peak_memory_mib"], ".2f"),
        style="italic",
    )
    return table


@app.command()
def profile(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML file.", show_default=False)],
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per step.")] = 8,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps (after one warm-up step).")] = 5,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch.set_num_threads.")] = None,
    json_output: JsonOption = False,
    sets: SetOption = None,
) -> None:
    """Parameters, FLOPs per image, step time and peak memory, with gradient checkpointing off and on."""
    import torch

    recipe = load_or_fail(recipe_path, sets)
    if threads:
        torch.set_num_threads(threads)
    job = {
        "model": recipe.model.model_dump(mode="json"),
        "batch": batch,
        "steps": steps,
        "threads": threads,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    busy = cpu_contention(threads or torch.get_num_threads()) if job["device"] == "cpu" else None
    runs = {name: run_isolated({**job, "checkpointing": name == "on"}) for name in ("off", "on")}
    report = {**profile_report(recipe, str(recipe_path), runs, job), "cpu_contention": busy}
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    console = _console()
    console.print(profile_table(report))
    if busy:
        console.print(f"[yellow]warning:[/] {busy}")


def cpu_contention(threads: int) -> str | None:
    """A note when other processes already keep the cores busy.

    Worth saying: with 2 intra-op threads on 2 cores and one other busy process, a step was measured 60× slower
    than with 1 thread, because each small op waits for its descheduled second thread.
    """
    if not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load + threads <= cores + 0.5:
        return None
    hint = " (try --threads 1)" if threads > 1 else ""
    return (
        f"load average {load:.1f} on {cores} cores before profiling with {threads} threads: other processes "
        f"compete for the CPU, so step times may be inflated{hint}"
    )


# --------------------------------------------------------------------------------- train / eval / sample
def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's input (bad data folder, bad run dir, bad checkpoint): one line, exit 2."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .tracking import TrackingError
    from .train import RunDirError

    return (DataError, CheckpointError, RunDirError, TrackingError)


def fail_user(err: Exception) -> NoReturn:
    _console(stderr=True).print(
        Panel(
            Text(str(err)),
            title=f"[bold red]{type(err).__name__}",
            title_align="left",
            border_style="red",
            expand=False,
        )
    )
    raise typer.Exit(CONFIG_EXIT_CODE)


def run_summary_table(summary: dict[str, Any]) -> Table:
    colour = {"completed": "green", "diverged": "red", "stopped": "yellow"}.get(summary["status"], "white")
    table = Table(title=f"run {summary['out_dir']}", box=box.SIMPLE_HEAD, show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    status = summary["status"] + (f" ({summary['cause']})" if summary.get("cause") else "")
    if summary.get("diverged_step"):
        status += f" at step {summary['diverged_step']}"
    unit = summary["unit"]
    # A minutes-only budget fixes its step count after timing the first steps; a run stopped earlier has none.
    planned = f"{summary['total_steps']:,}" if summary["total_steps"] else "(not planned yet)"
    rows = [
        ("status", f"[{colour}]{status}[/]"),
        ("steps", f"{summary['steps']:,} of {planned} ({summary['epochs']:.2f} epochs)"),
        # wall_s counts time inside training steps (what a minutes budget counts), not evaluation or checkpoints
        ("time in steps", f"{summary['wall_s']:.1f} s, {summary['step_time_s'] or 0:.3f} s/step (median)"),
        ("train NELBO", f"{summary['train_nelbo']:.3f} {unit}" if summary.get("train_nelbo") is not None else "-"),
    ]
    if summary.get("eval"):
        ev = summary["eval"]
        rows.append(
            (
                "eval",
                f"NELBO {ev['nelbo']:.3f} {unit}, IW-{ev['iw_samples']} NLL {ev['nll']:.3f} {unit} "
                f"on {ev['images']} images",
            )
        )
    rows += [
        ("gradient norm", f"max {summary['grad_norm_max']:.3g}, mean {summary['grad_norm_mean']:.3g}"),
        ("loss spikes / skipped", f"{summary['loss_spikes']} / {summary['skipped_steps']}"),
        (
            "active groups",
            f"{summary['active_groups']} of {summary['num_groups']} (units per group: {summary['active_units']})",
        ),
    ]
    if summary.get("precision"):  # numerics.precision as resolved on the device (auto → fp16 on CUDA, else fp32)
        rows.append(("precision / global batch", f"{summary['precision']} / {summary.get('global_batch', '-')}"))
    rows += [("warning", f"[yellow]{w}[/]") for w in summary.get("warnings", [])]
    for key, value in rows:
        table.add_row(key, value)
    return table


@app.command()
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
    from .tracking import tracked_run

    loaded = load_or_fail(recipe, sets)
    run_dir = out or Path("runs") / loaded.name
    from .distributed import batch_problem, launched_by_torchrun, torchrun_world_size, train_under_torchrun

    problem = batch_problem(loaded, torchrun_world_size() or workers)
    if problem or (workers > 1 and launched_by_torchrun()):
        where = "train.global_batch_size" if problem else "--workers"
        fail_config(ConfigError(str(recipe), [(where, problem or "under torchrun the ranks come from torchrun")]))
    try:
        with tracked_run(_tracking_config(loaded.tracking, track), loaded, run_dir) as finish_tracking:
            if launched_by_torchrun():
                rank, result = train_under_torchrun(loaded, run_dir, resume=resume, device=device)
                if rank != 0:  # rank 0 prints the summary
                    raise typer.Exit(3 if result.status == "diverged" else 0)
            elif workers > 1:
                from .distributed import train_data_parallel

                result = train_data_parallel(loaded, run_dir, workers=workers, resume=resume)
            else:
                from .train import train as run_training

                result = run_training(loaded, run_dir, resume=resume, device=device)
            finish_tracking(result.to_dict())
    except ConfigError as err:  # e.g. a damaged metrics.jsonl in the run directory
        fail_config(err)
    except _user_errors() as err:
        fail_user(err)
    summary = result.to_dict()
    _console().print(run_summary_table(summary))
    if summary["status"] == "diverged":
        raise typer.Exit(3)


def _load_run_or_fail(run_dir: Path, device: str | None) -> Any:
    from .runs import load_run

    try:
        return load_run(run_dir, device)
    except ConfigError as err:
        fail_config(err)
    except _user_errors() as err:
        fail_user(err)


@app.command("eval")
def eval_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `train`.", show_default=False)],
    iw_samples: Annotated[int | None, typer.Option("--iw-samples", min=1, help="Importance samples K.")] = None,
    images: Annotated[int | None, typer.Option("--images", min=1, help="Only the first N test images.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    chunk: Annotated[int | None, typer.Option("--chunk", min=1, help="Importance samples per forward pass.")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="K passes one after another (slow).")] = False,
    device: Annotated[str | None, typer.Option("--device")] = None,
    json_output: JsonOption = False,
) -> None:
    """Importance-weighted NLL and NELBO on the recipe's evaluation split (nats, or bits per dim)."""
    from .runs import evaluate_run

    run = _load_run_or_fail(run_dir, device)
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
        typer.echo(json.dumps({"step": run.step, **result.to_dict()}, indent=2))
        return
    unit = result.unit
    console = _console()
    console.print(f"[bold]{run_dir}[/] (step {run.step:,}), {result.images:,} images, K = {result.iw_samples}")
    console.print(f"  NLL   {result.nll:.4f} {unit}" + (f"  ({result.nll_nats:.2f} nats)" if unit != "nats" else ""))
    console.print(f"  NELBO {result.nelbo:.4f} {unit}")
    console.print(f"  active units per group {result.active_units}  ({result.seconds:.1f} s)")


@app.command()
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
) -> None:
    """Draw a PNG grid of samples at a temperature, optionally re-estimating BN statistics first."""
    from .runs import sample_run

    run = _load_run_or_fail(run_dir, device)
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


# ------------------------------------------------------------------------------------- search / report
def _load_space_or_fail(path: Path) -> Any:
    from .spaces import load_space

    try:
        return load_space(resolve_config(path, "spaces"))
    except ConfigError as err:
        fail_config(err)


@app.command()
def search(
    space_file: Annotated[Path, typer.Argument(metavar="SPACE", help="Search-space YAML file.", show_default=False)],
    n_trials: Annotated[int | None, typer.Option("--n-trials", min=1, help="Override study.n_trials.")] = None,
    storage: Annotated[
        str | None, typer.Option("--storage", help="Optuna storage URL (sqlite:///…, journal:PATH).")
    ] = None,
    backend: Annotated[str, typer.Option("--backend", help="optuna (in-process) or ray.")] = "optuna",
    address: Annotated[str | None, typer.Option("--address", help="Ray: local, auto or HOST:PORT.")] = None,
    root: Annotated[Path, typer.Option("--root", help="Folder of study directories.")] = Path("runs"),
    track: TrackOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="One line per finished trial, no live view.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Trial lines with parameters; Ray's own progress tables.")
    ] = False,
) -> None:
    """Run (or continue) a search; prints the study directory to pass to `report`.

    Start the same command several times (one worker per GPU, or one per machine on a shared journal file or
    database URL) to share one study: n_trials is the study's total."""
    from .search.view import SearchView

    space = _load_space_or_fail(space_file)
    if backend not in ("optuna", "ray"):
        fail_config(ConfigError("--backend", [("backend", f"expected optuna or ray, got {backend!r}")]))
    tracking = _tracking_config(space.tracking, track)
    if backend == "ray" and tracking.backend != "none":
        fail_config(ConfigError("--track", [("tracking", "tracking works with the optuna backend only, not ray")]))
    console = _console()
    view = SearchView(_console(stderr=True), steps=space.budget.steps, quiet=quiet, verbose=verbose)
    start = time.perf_counter()
    try:
        if backend == "ray":
            from .search.ray_backend import run_ray_search

            study_dir = run_ray_search(
                space,
                address=address,
                n_trials=n_trials,
                storage=storage,
                root=root,
                on_start=view.start,
                verbose=verbose,
            )
        else:
            from .search.runner import run_optuna_search

            study_dir = run_optuna_search(
                space, n_trials=n_trials, storage=storage, root=root, on_start=view.start, tracking=tracking
            )
    except ConfigError as err:  # e.g. a storage that cannot be used: nothing was written
        fail_config(err)
    except _user_errors() as err:
        fail_user(err)
    finally:
        view.stop()
    console.print(f"search finished in {time.perf_counter() - start:.0f} s; study directory: [bold]{study_dir}[/]")
    console.print(f"next: nvae-search report {study_dir}")
    typer.echo(str(study_dir))


@app.command()
def report(
    study_dir: Annotated[Path, typer.Argument(help="A study directory made by `search`.", show_default=False)],
    no_repeats: Annotated[
        bool, typer.Option("--no-repeats", hidden=True, help="Ignored: report never trains.")
    ] = False,
) -> None:
    """Leaderboard, stability per configuration, parameter importances, CSV/JSON and PNG plots. Reads only: seed
    repeats come from `nvae-search repeat`."""
    from .report import build_report

    try:
        build_report(study_dir, console=_console())
    except ConfigError as err:
        fail_config(err)


@app.command()
def repeat(
    study_dir: Annotated[Path, typer.Argument(help="A study directory made by `search`.", show_default=False)],
    backend: Annotated[str, typer.Option("--backend", help="optuna (in-process, one after the other) or ray.")] = (
        "optuna"
    ),
    address: Annotated[str | None, typer.Option("--address", help="Ray: local, auto or HOST:PORT.")] = None,
) -> None:
    """Train the seed repeats of the best configurations (the space's `repeats: {top_k, seeds}`) for `report`.
    Resumable: finished repeats are skipped, cut-off ones resume from their checkpoint."""
    from .search.repeats import run_repeats

    console = _console()
    try:
        result = run_repeats(study_dir, backend=backend, address=address, **_repeat_progress(console, backend))
    except ConfigError as err:
        fail_config(err)
    except _user_errors() as err:
        fail_user(err)
    _print_repeat_result(console, result)
    if result.failed:
        raise typer.Exit(1)


def _repeat_progress(console: Console, backend: str) -> dict[str, Any]:
    def on_start(job: Any, index: int, total: int, resumed: bool) -> None:
        how = "resuming from its checkpoint" if resumed else "training"
        how += " (queued on Ray)" if backend == "ray" else ""
        console.print(f"repeat {index}/{total}: config {job.config} (trial {job.trial}), seed {job.seed}: {how}")

    def on_end(job: Any, status: str, error: str | None) -> None:
        console.print(f"  {status}" + (f": {error}" if error else "") + f"  ({job.run_dir})")

    return {"on_start": on_start, "on_end": on_end}


def _print_repeat_result(console: Console, result: Any) -> None:
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    stopped = sum(status == "stopped" for _job, status in result.ran)
    console.print(
        f"repeats: {len(result.already_done)} already done, {len(result.ran) - stopped} run now"
        + (f", {stopped} stopped (run the command again to resume)" if stopped else "")
        + (f", {len(result.failed)} failed" if result.failed else "")
    )
    console.print(f"next: nvae-search report {result.study_dir}")


# ---------------------------------------------------------------------------------------- benchmarks
bench_app = typer.Typer(help="Benchmarks whose figures the README reports.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("step")
def bench_step(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    batch: Annotated[int, typer.Option("--batch", min=1)] = 8,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps after one warm-up step.")] = 5,
    threads: Annotated[int, typer.Option("--threads", min=1)] = 2,
    sets: SetOption = None,
    json_output: JsonOption = False,
) -> None:
    """Median and best time of full training steps (forward, SR + BN terms, backward, Adamax) on real data."""
    from .bench import bench_train_step

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


@bench_app.command("eval")
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
    from .bench import bench_eval

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


# ----------------------------------------------------------------- global options, built-in recipes and spaces
def _version_callback(value: bool) -> None:
    if value:
        from .provenance import package_version

        typer.echo(f"nvae-search {package_version()}")
        raise typer.Exit()


@app.callback()
def global_options(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and machine-readable output.")] = False,
) -> None:
    """Declarative NVAE: validate, profile, train, evaluate, sample and search NVAE variants."""
    import logging

    global _QUIET
    _QUIET = quiet
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("nvae_search").setLevel(level)
    if verbose:
        # optuna keeps its own handler and level; -v lets its trial lines through
        logging.getLogger("optuna").setLevel(level)


KindArgument = Annotated[str | None, typer.Argument(help="recipes or spaces (default: both).", show_default=False)]


@app.command("ls")
def list_command(kind: KindArgument = None, json_output: JsonOption = False) -> None:
    """List the built-in recipes and spaces, which every command accepts by name (cpu/tiny, quickstart)."""
    from .builtins import KINDS, list_builtins

    if kind not in (None, *KINDS):
        fail_config(ConfigError("ls", [("kind", f"expected recipes or spaces, got {kind!r}")]))
    kinds = [kind] if kind else list(KINDS)
    found = {k: list_builtins(k) for k in kinds}  # type: ignore[arg-type]
    if json_output:
        payload = {k: [{"name": b.name, "description": b.description} for b in items] for k, items in found.items()}
        typer.echo(json.dumps(payload, indent=2))
        return
    console = _console()
    for k, items in found.items():
        table = Table(title=k, box=box.SIMPLE_HEAD, title_justify="left")
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("description", overflow="fold")
        for item in items:
            table.add_row(item.name, item.description)
        console.print(table)


@app.command("cp")
def copy_command(
    name: Annotated[str, typer.Argument(help="A built-in recipe or space (see `nvae-search ls`).", show_default=False)],
    dest: Annotated[Path, typer.Argument(help="File to write, or a folder to copy into.", show_default=False)],
) -> None:
    """Copy a built-in recipe or space out to edit; a copied space still finds its built-in base recipe."""
    from .builtins import copy_builtin

    try:
        target = copy_builtin(name, dest)
    except (FileNotFoundError, FileExistsError) as err:
        fail_config(ConfigError(name, [("", str(err))]))
    _console().print(f"wrote {target}")


def _tracking_config(configured: Any, track: str | None) -> Any:
    """The file's ``tracking:`` with ``--track`` replacing its backend (its uri and project are kept)."""
    if track is None:
        return configured
    if track not in ("none", "mlflow", "wandb"):
        fail_config(ConfigError("--track", [("track", f"expected mlflow, wandb or none, got {track!r}")]))
    return configured.model_copy(update={"backend": track})


# ------------------------------------------------------------------------------ sample formats, reconstructions
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
    from .outputs import write_samples

    if fmt not in ("grid", "folder", "npz"):
        fail_config(ConfigError("--format", [("format", f"expected grid, folder or npz, got {fmt!r}")]))
    return write_samples(run, n=n, temperatures=temperatures, fmt=fmt, out=out, **kwargs)


@app.command()
def reconstruct(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by `train`.", show_default=False)],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of evaluation images.")] = 16,
    out: Annotated[Path | None, typer.Option("--out", help="PNG path (default: inside the run).")] = None,
    device: Annotated[str | None, typer.Option("--device")] = None,
) -> None:
    """A PNG grid of evaluation images, each row of inputs followed by a row of their reconstructions."""
    from .outputs import reconstruct_run

    run = _load_run_or_fail(run_dir, device)
    try:
        path = reconstruct_run(run, n=n, out=out)
    except _user_errors() as err:
        fail_user(err)
    _console().print(f"wrote {path}")


@bench_app.command("gpu")
def bench_gpu_command(
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Recipe to check (default: the CIFAR-10 paper recipe).")
    ] = None,
    batch: Annotated[int | None, typer.Option("--batch", min=1, help="Per-GPU batch (default: the recipe's).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps per setting, after one warm-up.")] = 3,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the JSON report to this file.")] = None,
    json_output: JsonOption = False,
    sets: SetOption = None,
) -> None:
    """The first thing to run on a new GPU machine: training step in fp16+scaler, bf16 and fp32 with and without
    checkpointing (time, measured peak next to the predicted one), batched IW evaluation, sampling."""
    import torch

    from .bench import GPU_BENCH_RECIPE, bench_gpu

    console = _console()
    if not torch.cuda.is_available():
        message = "no CUDA device (torch.cuda.is_available() is False): nothing to check here"
        if json_output:
            typer.echo(json.dumps({"cuda": False, "message": message}))
        else:
            console.print(message)
        return
    loaded = load_or_fail(recipe or GPU_BENCH_RECIPE, sets)
    log = None if json_output else console.print
    report = bench_gpu(loaded, batch=batch, steps=steps, log=log)
    if out is not None:
        from .config_io import atomic_write_text

        atomic_write_text(out, json.dumps(report, indent=2))
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    console.print(_gpu_table(report))


def _gpu_table(report: dict[str, Any]) -> Table:
    title = (
        f"{report['recipe']} on {report['device']} ({report['total_memory_bytes'] / 2**30:.0f} GiB), "
        f"batch {report['batch']}, torch {report['torch']}"
    )
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("precision", "checkpointing", "step (s)", "measured peak (MiB)", "predicted (MiB)", "pred/meas"):
        table.add_column(column, justify="right")
    for row in report["train"]:
        table.add_row(
            row["precision"],
            row["checkpointing"],
            _fmt(row.get("step_s"), ".3f") if "error" not in row else "OOM",
            _fmt(row.get("measured_peak_bytes", 0) / MIB or None, ",.0f"),
            _fmt(row.get("predicted_peak_bytes", 0) / MIB or None, ",.0f"),
            _fmt(row.get("predicted_over_measured"), ".2f"),
        )
    ev = report["eval_sample"]
    table.caption = (
        f"IW-{ev['iw_samples']} evaluation: {_fmt(ev.get('iw_image_passes_per_s'), ',.0f')} image-passes/s; "
        f"sampling: {_fmt(ev.get('sample_s_per_image'), '.4f')} s/image (n={ev['sample_n']}); "
        f"{report['seconds']:.0f} s in all" + (f"; eval/sample: {ev['error']}" if "error" in ev else "")
    )
    return table


def main() -> None:
    """Entry point of the ``nvae-search`` console script."""
    from .runtime import tune_allocator

    tune_allocator()
    app(prog_name="nvae-search")
