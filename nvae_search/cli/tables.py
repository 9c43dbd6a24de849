"""The rich tables and panels that the commands print (pure functions of plain dicts)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..status import TrialStatus

if TYPE_CHECKING:
    from ..config_io import ConfigError

MIB = 1024 * 1024


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


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def profile_table(report: dict[str, Any]) -> Table:
    title = (
        f"{report['name']} ({report['file']}): device {report['device']}, batch {report['batch']}, "
        f"{report['steps']} timed steps, {report['threads']} threads"
    )
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    if "memory_what" in report:
        table.caption = f"step time and memory: {report['memory_what']}"
        table.caption_justify = "left"
    columns = ("", "params", "GFLOPs/img fwd", "GFLOPs/img fwd+bwd", "step time (median, s)", "peak memory (MiB)")
    for column in (*columns, "predicted (MiB)"):
        table.add_column(column, justify="left" if not column else "right")
    for label, key in (("checkpointing off", "checkpointing_off"), ("checkpointing on", "checkpointing_on")):
        run = report[key]
        predicted = run.get("memory", {}).get("predicted_peak_bytes")
        table.add_row(
            label,
            f"{run['params']:,}",
            _fmt(run["flops_fwd_per_image"] / 1e9, ".4f"),
            _fmt(run["flops_fwd_bwd_per_image"] / 1e9, ".4f"),
            _fmt(run["step_time_median_s"], ".4f"),
            _fmt(run["peak_memory_mib"], ".1f"),
            _fmt(predicted / 2**20 if predicted is not None else None, ".1f"),
        )
    ratio = report["ratio_on_off"]
    table.add_row(
        "ratio on/off",
        "",
        _fmt(ratio["flops_fwd_per_image"], ".2f"),
        _fmt(ratio["flops_fwd_bwd_per_image"], ".2f"),
        _fmt(ratio["step_time_median_s"], ".2f"),
        _fmt(ratio["peak_memory_mib"], ".2f"),
        "",
        style="italic",
    )
    return table


def run_summary_table(summary: dict[str, Any]) -> Table:
    colours = {TrialStatus.COMPLETED: "green", TrialStatus.DIVERGED: "red", TrialStatus.STOPPED: "yellow"}
    colours |= {TrialStatus.EXPLODED: "red", TrialStatus.COLLAPSED: "magenta", TrialStatus.SPIKY: "yellow"}
    colour = colours.get(summary["status"], "white")
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


_SHORT = {"out of memory": "OOM"}  # a setting's outcome as its row shows it


def gpu_table(report: dict[str, Any]) -> Table:
    memory = report["total_memory_bytes"]
    title = (
        f"{report['recipe']} on {report['device']}"
        + (f" ({memory / 2**30:.0f} GiB)" if memory else "")
        + f", batch {report['batch']}, torch {report['torch']}"
    )
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("precision", "checkpointing", "step (s)", "measured peak (MiB)", "predicted (MiB)", "pred/meas"):
        table.add_column(column, justify="right")
    for row in report["train"]:
        table.add_row(
            row["precision"],
            row["checkpointing"],
            _fmt(row.get("step_s"), ".3f") if row["outcome"] == "ok" else _SHORT.get(row["outcome"], row["outcome"]),
            _fmt(row.get("measured_peak_bytes", 0) / MIB or None, ",.0f"),
            _fmt(row.get("predicted_peak_bytes", 0) / MIB or None, ",.0f"),
            _fmt(row.get("predicted_over_measured"), ".2f"),
        )
    ev = report["eval_sample"]
    table.caption = (
        f"IW-{ev['iw_samples']} evaluation: {_fmt(ev.get('iw_image_passes_per_s'), ',.0f')} image-passes/s; "
        f"sampling: {_fmt(ev.get('sample_s_per_image'), '.4f')} s/image (n={ev['sample_n']}); "
        f"{report['seconds']:.0f} s in all" + (f"; eval/sample: {ev['error']}" if ev["outcome"] != "ok" else "")
    )
    return table
