"""What a model costs: architecture summary, FLOPs per image, step time and peak memory (``validate``, ``profile``).

torch and the model code are imported inside the functions, so that the CLI can import this module and still
answer ``--help`` without torch.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
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


def build_or_raise(recipe: Recipe, source: str) -> NVAE:
    """Build the model; a builder refusal is a config problem of the file, not a crash."""
    from .model.builder import build_model

    try:
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


def _summarize_file(path: Path, overrides: dict[str, Any], workers: int = 1) -> dict[str, Any]:
    recipe = load_recipe(path, overrides=overrides)
    return model_summary(recipe, build_or_raise(recipe, str(path)), str(path), workers)


def summarize_config(ref: Path, overrides: dict[str, Any], workers: int = 1) -> dict[str, Any]:
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


def predict_memory(path: Path, overrides: dict[str, Any], options: dict[str, Any], workers: int) -> dict[str, Any]:
    from .memory import memory_report

    recipe = load_recipe(resolve_config(path, "recipes"), overrides=overrides)
    return memory_report(recipe, workers=workers, **options)


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


def profile_recipe(recipe: Recipe, source: str, batch: int, steps: int, threads: int | None) -> dict[str, Any]:
    """Profile one recipe with gradient checkpointing off and on, each in its own fresh process."""
    import torch

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
    return {**profile_report(recipe, source, runs, job), "cpu_contention": busy}
