"""The study commands: ``search``, ``report`` and ``repeat``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ..config_io import ConfigError
from ..status import TrialStatus
from .common import (
    TrackOption,
    _console,
    _load_space_or_fail,
    _tracking_config,
    _user_errors,
    fail_config,
    fail_user,
)


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
    from ..search.view import SearchView

    space = _load_space_or_fail(space_file)
    if backend not in ("optuna", "ray"):
        fail_config(ConfigError("--backend", [("backend", f"expected optuna or ray, got {backend!r}")]))
    tracking = _tracking_config(space.tracking, track)
    console = _console()
    view = SearchView(_console(stderr=True), steps=space.budget.steps, quiet=quiet, verbose=verbose)
    start = time.perf_counter()
    try:
        if backend == "ray":
            from ..search.ray_backend import run_ray_search

            study_dir = run_ray_search(
                space,
                address=address,
                n_trials=n_trials,
                storage=storage,
                root=root,
                on_start=view.start,
                verbose=verbose,
                tracking=tracking,
            )
        else:
            from ..search.runner import run_optuna_search

            study_dir = run_optuna_search(
                space, n_trials=n_trials, storage=storage, root=root, on_start=view.start, tracking=tracking
            )
    except ConfigError as err:  # e.g. a storage that cannot be used: nothing was written
        fail_config(err)
    except _user_errors() as err:
        fail_user(err)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM during a trial (TrialInterrupted); exit 0 as `train` does
        interrupted = str(err) or "Ctrl-C"
    else:
        interrupted = None
    finally:
        view.stop()
    if interrupted is not None:
        after = (
            "the next run restores its Ray experiment"
            if backend == "ray"
            else "a trial it was training is failed as interrupted, not counted, and runs again from its start"
        )
        console.print(f"[yellow]search stopped[/] ({interrupted}): {after}; run the same command to continue the study")
        return
    console.print(f"search finished in {time.perf_counter() - start:.0f} s; study directory: [bold]{study_dir}[/]")
    console.print(f"next: nvae-search report {study_dir}")
    typer.echo(str(study_dir))


def report(
    study_dir: Annotated[Path, typer.Argument(help="A study directory made by `search`.", show_default=False)],
    no_repeats: Annotated[
        bool, typer.Option("--no-repeats", hidden=True, help="Ignored: report never trains.")
    ] = False,
) -> None:
    """Leaderboard, stability per configuration, parameter importances, CSV/JSON and PNG plots. Reads only: seed
    repeats come from `nvae-search repeat`."""
    from ..search.report import build_report

    try:
        build_report(study_dir, console=_console())
    except ConfigError as err:
        fail_config(err)


def repeat(
    study_dir: Annotated[Path, typer.Argument(help="A study directory made by `search`.", show_default=False)],
    backend: Annotated[str, typer.Option("--backend", help="optuna (in-process, one after the other) or ray.")] = (
        "optuna"
    ),
    address: Annotated[str | None, typer.Option("--address", help="Ray: local, auto or HOST:PORT.")] = None,
) -> None:
    """Train the seed repeats of the best configurations (the space's `repeats: {top_k, seeds}`) for `report`.
    Resumable: finished repeats are skipped, cut-off ones resume from their checkpoint."""
    from ..search.repeats import run_repeats

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
    stopped = sum(status == TrialStatus.STOPPED for _job, status in result.ran)
    console.print(
        f"repeats: {len(result.already_done)} already done, {len(result.ran) - stopped} run now"
        + (f", {stopped} stopped (run the command again to resume)" if stopped else "")
        + (f", {len(result.failed)} failed" if result.failed else "")
        + (f", {len(result.busy)} taken by another `repeat` process" if result.busy else "")
    )
    console.print(f"next: nvae-search report {result.study_dir}")
