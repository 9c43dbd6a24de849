"""Global options, the built-in recipes and spaces (``ls``, ``cp``), and the console-script entry point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from ..config_io import ConfigError
from .common import JsonOption, _console, app, fail_config, set_quiet


def _version_callback(value: bool) -> None:
    if value:
        from ..provenance import package_version

        typer.echo(f"nvae-search {package_version()}")
        raise typer.Exit()


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

    set_quiet(quiet)
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("nvae_search").setLevel(level)
    if verbose:
        # optuna keeps its own handler and level; -v lets its trial lines through
        logging.getLogger("optuna").setLevel(level)


KindArgument = Annotated[str | None, typer.Argument(help="recipes or spaces (default: both).", show_default=False)]


def list_command(kind: KindArgument = None, json_output: JsonOption = False) -> None:
    """List the built-in recipes and spaces, which every command accepts by name (cpu/tiny, quickstart)."""
    from ..builtins import KINDS, list_builtins

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


def copy_command(
    name: Annotated[str, typer.Argument(help="A built-in recipe or space (see `nvae-search ls`).", show_default=False)],
    dest: Annotated[Path, typer.Argument(help="File to write, or a folder to copy into.", show_default=False)],
) -> None:
    """Copy a built-in recipe or space out to edit; a copied space still finds its built-in base recipe."""
    from ..builtins import copy_builtin

    try:
        target = copy_builtin(name, dest)
    except (FileNotFoundError, FileExistsError) as err:
        fail_config(ConfigError(name, [("", str(err))]))
    _console().print(f"wrote {target}")


def main() -> None:
    """Entry point of the ``nvae-search`` console script."""
    from ..runtime import tune_allocator

    tune_allocator()
    app(prog_name="nvae-search")
