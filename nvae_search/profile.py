"""What a model costs: architecture summary, FLOPs per image, step time and peak memory (``validate``, ``profile``).

torch and the model code are imported inside the functions, so that the CLI can import this module and still
answer ``--help`` without torch.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .builtins import resolve_config
from .config_io import ConfigError
from .schema import Recipe, load_recipe

if TYPE_CHECKING:
    import torch

    from .model.nvae import NVAE
    from .schema import ModelConfig

MIB = 1024 * 1024


def build_or_raise(recipe: Recipe, source: str, device: str = "cpu") -> NVAE:
    """Build the model on ``device``; a builder refusal is a config problem of the file, not a crash. ``meta`` builds
    shapes only: no 330 M weights initialised (2.5-2.9 s of system time for paper/ffhq256), but torch's first use of
    its meta kernels costs 1-1.7 s more than building cpu/tiny's weights, which pays only where a memory prediction
    (it needs them anyway) follows."""
    import torch

    from .model.builder import build_model

    try:
        with torch.device(device):
            return build_model(recipe.model)
    except (ValueError, KeyError) as exc:
        raise ConfigError(source, [("model", f"the builder refused it: {exc}")]) from None


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


def _summarize_file(path: Path, overrides: dict[str, Any], workers: int = 1, device: str = "cpu") -> dict[str, Any]:
    recipe = load_recipe(path, overrides=overrides)
    return model_summary(recipe, build_or_raise(recipe, str(path), device), str(path), workers)


def summarize_config(ref: Path, overrides: dict[str, Any], workers: int = 1, device: str = "cpu") -> dict[str, Any]:
    """A recipe's architecture summary, or for a space file its size and its base recipe's summary; the network is
    built on ``device`` (see :func:`build_or_raise`)."""
    from .config_io import read_yaml_file

    path = resolve_config(ref, "recipes")
    if not path.exists():
        path = resolve_config(ref, "spaces")
    data = read_yaml_file(path)
    if not (isinstance(data, dict) and "base_recipe" in data):
        return _summarize_file(path, overrides, workers, device)
    from .spaces import load_space, space_size

    space = load_space(path)
    base = _summarize_file(space.base_recipe_path, overrides)
    return {"file": str(path), "space": space.study.name, **space_size(space), "base_recipe": base}


def predict_memory(
    path: Path,
    overrides: dict[str, Any],
    options: dict[str, Any],
    workers: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from .memory import memory_report

    recipe = load_recipe(resolve_config(path, "recipes"), overrides=overrides)
    return memory_report(recipe, workers=workers, progress=progress, **options)


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


def count_flops(model: NVAE, x: torch.Tensor, backward: bool) -> int:
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


def _rss_peak_mib() -> float:
    peak = _proc_status_mib("VmHWM")
    return peak if peak is not None else _ru_maxrss_mib()


STEP_MEMORY = "peak of one full training step: forward, loss, spectral and BN regularisers, backward, optimizer step"
_MEASURED = "nvae-search:measured-step"


def _step_state(job: dict[str, Any]) -> tuple[Any, Any, Any]:
    """What the trainer holds during a step: model, regulariser, Adamax (with its state), the input batch, the
    fp16 gradient scaler and the EMA copy (when the recipe has one). Built as :mod:`nvae_search.memory` simulates."""
    import copy

    import torch

    from .memory_step import build_step_parts, gradient_scaler, init_optimizer_state

    torch.manual_seed(0)
    recipe = Recipe.model_validate(job["recipe"])
    device = job["device"]
    parts = build_step_parts(
        recipe, job["batch"], job["precision"], job["checkpointing"], foreach=device == "cuda", device=device
    )
    parts.x = random_input(recipe.model, job["batch"], torch.device(device))
    init_optimizer_state(parts.optimizer)
    scaler = gradient_scaler(job["precision"], device)
    ema = copy.deepcopy(parts.model) if recipe.train.ema_decay else None  # AveragedModel holds such a copy
    return parts, scaler, ema


def _allocator_peak_bytes(prof: Any) -> tuple[int, int]:
    """(bytes live at the start of the marked step, peak bytes live during it) in torch's CPU allocator.

    With memory profiling on, the allocator reports every allocation and free together with its running total of
    bytes allocated since profiling began; everything the step touches was allocated after that, so the total is
    the process's live tensor memory.
    """
    from torch._C._profiler import _EventType

    def walk(nodes: list[Any]) -> Any:
        for node in nodes:
            yield node
            yield from walk(node.children)

    nodes = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    mark = next(n for n in nodes if n.name == _MEASURED)
    allocations = sorted(
        (n for n in nodes if n.tag == _EventType.Allocation and str(n.extra_fields.device).startswith("cpu")),
        key=lambda n: n.start_time_ns,
    )
    before = [a.extra_fields.total_allocated for a in allocations if a.start_time_ns < mark.start_time_ns]
    during = [
        a.extra_fields.total_allocated for a in allocations if mark.start_time_ns <= a.start_time_ns <= mark.end_time_ns
    ]
    # The running total is process-wide: blocks from an earlier profiling session that are still alive count in it.
    offset = allocations[0].extra_fields.total_allocated - allocations[0].extra_fields.alloc_size if allocations else 0
    start = before[-1] if before else offset
    return start - offset, max([start, *during]) - offset


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ backend logs its start and stop there (Python errors still
    propagate as exceptions)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _measure_step_memory(job: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Peak memory of one steady training step (after a warm-up step that allocates what every step reuses).

    CUDA: ``max_memory_allocated`` over the step. CPU: torch's CPU allocator statistics, read from the profiler's
    memory events (the process's RSS also holds library workspaces and freed pages glibc keeps, see docs/gpus.md).
    """
    import torch

    from .memory_step import training_step

    if job["device"] == "cuda":
        parts, scaler, ema = _step_state(job)
        training_step(parts, scaler)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        training_step(parts, scaler)
        torch.cuda.synchronize()
        peak, source = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    else:
        from torch.profiler import ProfilerActivity, profile, record_function

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            parts, scaler, ema = _step_state(job)
            training_step(parts, scaler)
            with record_function(_MEASURED):
                training_step(parts, scaler)
        start, peak = _allocator_peak_bytes(prof)
        source = "torch CPU allocator (profiler memory events)"
    memory = {"what": f"{STEP_MEMORY}, {job['precision']}", "peak_bytes": peak, "start_bytes": start, "source": source}
    return parts, (scaler, ema), memory


def _measure_steps(job: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one full training step, then the median time of ``steps`` more (and their RSS growth)."""
    import torch

    from .memory_step import training_step

    rss_base = _proc_status_mib("VmRSS") or _ru_maxrss_mib()  # before anything of the model exists
    parts, (scaler, _ema), memory = _measure_step_memory(job)
    _reset_peak_rss()  # the profiler's own buffers are not the step's
    cuda = job["device"] == "cuda"

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        training_step(parts, scaler)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = [timed() for _ in range(job["steps"])]
    peak_mib = memory["peak_bytes"] / MIB
    return {
        "step_time_median_s": statistics.median(times),
        "step_times_s": times,
        "memory": memory,
        "peak_memory_mib": peak_mib,
        "cuda_peak_mib": peak_mib if cuda else None,
        "peak_rss_delta_mib": max(0.0, _rss_peak_mib() - rss_base),
        "memory_source": memory["source"],
        "model": parts.model,
        "x": parts.x,
    }


def profile_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process, so that its memory figures belong to one checkpointing setting only."""
    import torch

    from .runtime import tune_allocator

    tune_allocator()  # a spawned process: measure memory and time as `train` runs, with the same allocator
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    result = _measure_steps(job)
    model, x = result.pop("model"), result.pop("x")
    batch = job["batch"]
    result["params"] = count_parameters(model)
    result["flops_fwd_per_image"] = count_flops(model, x, backward=False) / batch
    result["flops_fwd_bwd_per_image"] = count_flops(model, x, backward=True) / batch
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


def profile_report(
    recipe: Recipe,
    source: str,
    runs: dict[str, dict[str, Any]],
    job: dict[str, Any],
    predicted: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Both settings side by side; ``predicted`` (peak bytes per setting, ``off``/``on``) puts the prediction of
    :mod:`nvae_search.memory` for the same step next to each measured peak."""
    off, on = runs["off"], runs["on"]
    for name, run in runs.items():
        if predicted and "memory" in run:
            run["memory"]["predicted_peak_bytes"] = predicted[name]
            run["memory"]["predicted_over_measured"] = _ratio(predicted[name], run["memory"]["peak_bytes"])
    return {
        "file": source,
        "name": recipe.name,
        "device": job["device"],
        "batch": job["batch"],
        "precision": job.get("precision", "fp32"),
        "memory_what": f"{STEP_MEMORY}, {job.get('precision', 'fp32')}",
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


def profile_recipe(
    recipe: Recipe, source: str, batch: int, steps: int, threads: int | None, predict: bool = True
) -> dict[str, Any]:
    """Profile one recipe with gradient checkpointing off and on, each in its own fresh process, and (``predict``)
    put the memory prediction of the same training step next to each measured peak."""
    import torch

    from .memory import MemoryPredictor, resolve_precision

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    job = {
        "recipe": recipe.model_dump(mode="json"),
        "batch": batch,
        "steps": steps,
        "threads": threads,
        "device": device,
        "precision": resolve_precision(recipe.model.numerics.precision, device),
    }
    busy = cpu_contention(threads or torch.get_num_threads()) if device == "cpu" else None
    runs = {name: run_isolated({**job, "checkpointing": name == "on"}) for name in ("off", "on")}
    predicted = None
    if predict:
        predictor = MemoryPredictor(recipe, device=device)  # type: ignore[arg-type]
        predicted = {
            name: predictor.predict(batch, job["precision"], "cell" if name == "on" else "off").peak_bytes
            for name in ("off", "on")
        }
    return {**profile_report(recipe, source, runs, job, predicted), "cpu_contention": busy}
