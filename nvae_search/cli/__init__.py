"""The ``nvae-search`` command line: argument parsing and printing only.

torch and the model code are imported inside the commands (the work itself lives in :mod:`nvae_search.profile`,
:mod:`nvae_search.runs`, :mod:`nvae_search.search` …), so ``--help`` and ``schema`` stay fast and work on machines
without torch. Nothing in the package imports this package (a layering test enforces it). The table below is the
one list of commands, in the order ``--help`` shows them.
"""

from __future__ import annotations

from . import bench_commands, general, recipe_commands, replay_commands, run_commands, study_commands
from .common import app, bench_app

__all__ = ["app", "main"]

main = general.main

for _name, _command in (
    ("validate", recipe_commands.validate),
    ("schema", recipe_commands.schema),
    ("profile", recipe_commands.profile),
    ("train", run_commands.train),
    ("eval", run_commands.eval_command),
    ("sample", run_commands.sample),
    ("search", study_commands.search),
    ("report", study_commands.report),
    ("repeat", study_commands.repeat),
    ("replay-pruner", replay_commands.replay_pruner),
    ("ls", general.list_command),
    ("cp", general.copy_command),
    ("reconstruct", run_commands.reconstruct),
):
    app.command(_name)(_command)
app.add_typer(bench_app, name="bench")
app.callback()(general.global_options)
for _name, _command in (
    ("step", bench_commands.bench_step),
    ("eval", bench_commands.bench_eval_command),
    ("gpu", bench_commands.bench_gpu_command),
):
    bench_app.command(_name)(_command)
