"""``nvae-search replay-pruner``: what a pruner would have done to a finished study's runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..config_io import ConfigError
from .common import _console, fail_config, fail_user


def replay_pruner(
    study_dir: Annotated[Path, typer.Argument(help="A study directory made by `search`.", show_default=False)],
    pruner: Annotated[
        list[str] | None,
        typer.Option("--pruner", help="instability, median or none (repeatable; default: all three)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the replay as JSON, per run included.")] = False,
) -> None:
    """Replay pruners over the study's unpruned runs (their metrics.jsonl, in trial order): the training steps each
    would have saved and its false stops (runs it would stop that trained to their end without diverging or
    exploding). The instability rule uses the space's `pruner:` settings when its type is instability, else its
    defaults; the median pruner is Optuna's, fed the recorded NELBO trajectories. Reads only."""
    from ..search.instability import replay_pruners

    try:
        results = replay_pruners(study_dir, pruner or ["instability", "median", "none"])
    except ConfigError as err:
        fail_config(err)
    except ValueError as err:
        fail_user(err)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    console = _console()
    console.print(f"[bold]Pruners replayed[/] on the unpruned runs of {study_dir}:")
    for r in results:
        false = f"{r['false_stops']}" + (f" (trials {r['false_stop_trials']})" if r["false_stops"] else "")
        console.print(
            f"  {r['pruner']}: stopped {r['stopped']} of {r['runs']} runs, saved {r['saved_steps']:,} of "
            f"{r['total_steps']:,} steps ({r['saved_fraction']:.0%}), false stops {false}, "
            f"broken runs stopped {r['broken_stopped']} of {r['broken_runs']}",
            soft_wrap=True,
        )
