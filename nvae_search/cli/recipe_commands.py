"""The commands that look at a recipe without training it: ``validate``, ``schema`` and ``profile``."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..config_io import ConfigError
from ..profile import predict_memory, profile_recipe, summarize_config
from ..schema import recipe_json_schema
from .common import (
    CONFIG_EXIT_CODE,
    JsonOption,
    SetOption,
    _console,
    fail_config,
    load_or_fail,
    parse_sets,
    print_config_error,
)
from .tables import profile_table, space_summary_table, summary_table

if TYPE_CHECKING:
    from rich.status import Status


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
    # With a memory prediction to follow, the summary's network is built on the meta device (see build_or_raise).
    build_on = "meta" if memory_options is not None else "cpu"
    for path in recipes:
        try:
            summaries.append(summarize_config(path, overrides, workers, build_on))
            if memory_options is not None and "space" not in summaries[-1]:
                # Tens of seconds for the largest recipes: a spinner on stderr says which part is running.
                with _console(stderr=True).status(f"{path}: predicting memory") as status:
                    summaries[-1]["memory"] = predict_memory(
                        path, overrides, memory_options, workers, functools.partial(_say, status, path)
                    )
        except ConfigError as err:
            print_config_error(err)
            failed = True
    _print_summaries(summaries, json_output, several=len(recipes) > 1)
    if failed:
        raise typer.Exit(CONFIG_EXIT_CODE)


def _say(status: Status, path: Path, what: str) -> None:
    status.update(f"{path}: {what}")


def _print_summaries(summaries: list[dict[str, Any]], json_output: bool, several: bool) -> None:
    if json_output:
        if summaries:
            typer.echo(json.dumps(summaries if several else summaries[0], indent=2))
        return
    console = _console()
    for summary in summaries:
        console.print(space_summary_table(summary) if "space" in summary else summary_table(summary))
        if "memory" in summary:
            from ..memory import memory_lines

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


def schema(
    space: Annotated[bool, typer.Option("--space", help="Print the schema of a search-space file instead.")] = False,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the recipe reference page (docs/recipes.md) instead.")
    ] = False,
) -> None:
    """Print the JSON schema of recipe files (or of search-space files with --space)."""
    if markdown:
        from ..schema_docs import recipe_reference_markdown

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


def profile(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE", help="Recipe YAML file.", show_default=False)],
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per step.")] = 8,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed steps (after one warm-up step).")] = 5,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch.set_num_threads.")] = None,
    json_output: JsonOption = False,
    sets: SetOption = None,
) -> None:
    """Parameters, FLOPs per image, step time and peak memory of one full training step (forward, loss,
    regularisers, backward, optimizer step) with gradient checkpointing off and on, next to the memory prediction."""
    recipe = load_or_fail(recipe_path, sets)
    report = profile_recipe(recipe, str(recipe_path), batch, steps, threads)
    busy = report["cpu_contention"]
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    console = _console()
    console.print(profile_table(report))
    if busy:
        console.print(f"[yellow]warning:[/] {busy}")
