"""What every command shares: the Typer app, common options, the console, and the one-screen error exits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from ..builtins import resolve_config
from ..config_io import ConfigError, clear_other_budgets, parse_override
from ..schema import Recipe, load_recipe
from .tables import config_error_panel

app = typer.Typer(
    name="nvae-search",
    help="Declarative NVAE: validate, profile, train, evaluate, sample and search NVAE variants.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks whose figures the README reports.", no_args_is_help=True)

CONFIG_EXIT_CODE = 2
_QUIET = False  # -q: the stdout console prints nothing (errors on stderr still do)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value before validation: dotted.key=value (value read as YAML)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
EmaOption = Annotated[
    bool,
    typer.Option(
        "--ema/--no-ema",
        help="Use the EMA copy of the weights when the run kept one (train.ema_decay); --no-ema: the trained weights.",
    ),
]
TrackOption = Annotated[
    str | None, typer.Option("--track", help="Track in mlflow or wandb (or none); default: the file's tracking:.")
]


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def _console(stderr: bool = False) -> Console:
    # Built per call so that the width follows the terminal (and COLUMNS) of this invocation.
    return Console(stderr=stderr, highlight=False, quiet=_QUIET and not stderr)


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


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's input (bad data folder, bad run dir, bad checkpoint): one line, exit 2."""
    from ..checkpoint import CheckpointError
    from ..data import DataError
    from ..tracking import TrackingError
    from ..train import RunDirError

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


def _load_run_or_fail(run_dir: Path, device: str | None, ema: bool = True) -> Any:
    from ..runs import load_run

    try:
        return load_run(run_dir, device, ema=ema)
    except ConfigError as err:
        fail_config(err)
    except _user_errors() as err:
        fail_user(err)


def _load_space_or_fail(path: Path) -> Any:
    from ..spaces import load_space

    try:
        return load_space(resolve_config(path, "spaces"))
    except ConfigError as err:
        fail_config(err)


def _tracking_config(configured: Any, track: str | None) -> Any:
    """The file's ``tracking:`` with ``--track`` replacing its backend (its uri and project are kept)."""
    if track is None:
        return configured
    if track not in ("none", "mlflow", "wandb"):
        fail_config(ConfigError("--track", [("track", f"expected mlflow, wandb or none, got {track!r}")]))
    return configured.model_copy(update={"backend": track})
