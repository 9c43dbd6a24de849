"""Working with a finished (or running) run directory: load its model, evaluate it, sample from it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CHECKPOINT_NAME, MODEL_KEYS, CheckpointError, check_weights, load_checkpoint
from .config_io import ConfigError, atomic_write_text
from .data import build_dataset, needs_binarize, prepare_batch
from .evaluate import EvalResult, evaluate
from .images import make_grid, save_png
from .model.builder import build_model
from .model.nvae import NVAE
from .rundir import RESOLVED_RECIPE
from .runtime import pick_device
from .schema import Recipe, load_recipe


@dataclass
class LoadedRun:
    recipe: Recipe
    model: NVAE
    step: int
    device: torch.device
    run_dir: Path
    weights: str = "trained"  # "ema" when the run kept an EMA copy and it was loaded
    has_ema: bool = False


def load_run(run_dir: str | os.PathLike[str], device: str | torch.device | None = None, ema: bool = True) -> LoadedRun:
    """Rebuild the model of a run from its resolved recipe and checkpoint (EMA weights when the run kept them)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ConfigError(str(root), [("", "no such run directory" if not root.exists() else "not a directory")])
    if not (root / RESOLVED_RECIPE).is_file():
        raise ConfigError(str(root), [("", f"not a run directory: {RESOLVED_RECIPE} is missing")])
    if not (root / CHECKPOINT_NAME).is_file():
        raise CheckpointError(f"{root}: no {CHECKPOINT_NAME} yet (has the run saved a checkpoint?)")
    recipe = load_recipe(root / RESOLVED_RECIPE)
    dev = pick_device(device)
    state = load_checkpoint(root / CHECKPOINT_NAME, dev, required=MODEL_KEYS)
    model = build_model(recipe.model).to(dev)
    weights = state["model"]
    has_ema = isinstance(state.get("ema"), dict)
    use_ema = ema and has_ema
    if use_ema:
        # AveragedModel keeps the averaged copy under "module." next to its step counter.
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    check_weights(model, weights, root / CHECKPOINT_NAME)
    model.load_state_dict(weights)
    if use_ema and recipe.train.ema_bn_batches and not state.get("ema_bn_recalibrated"):
        _recalibrate_ema(model, recipe, dev)  # a mid-run checkpoint (or one from an older version)
    model.eval()
    return LoadedRun(recipe, model, int(state["step"]), dev, root, "ema" if use_ema else "trained", has_ema)


def _batch_preparation(recipe: Recipe) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the trainer's ``prepare`` does to a batch of this recipe's images (binarisation, bit depth)."""
    binarize, num_bits = needs_binarize(recipe.data), recipe.model.output.num_x_bits
    return lambda x: prepare_batch(x, binarize=binarize, num_bits=num_bits)


def _recalibrate_ema(model: NVAE, recipe: Recipe, device: torch.device) -> None:
    """The BN statistics of an EMA copy saved without them, as the end of a run makes them."""
    from .training.ema import recalibrate_batch_norm

    cfg = recipe.model
    train_set = build_dataset(recipe.data, split="train", resolution=cfg.resolution, channels=cfg.input_channels)
    recalibrate_batch_norm(
        model,
        train_set,
        _batch_preparation(recipe),
        batches=recipe.train.ema_bn_batches,
        batch_size=recipe.train.per_process_batch(1),
        seed=recipe.train.seed,
        device=device,
    )


def evaluate_run(
    run: LoadedRun,
    *,
    iw_samples: int | None = None,
    images: int | None = None,
    batch_size: int | None = None,
    chunk: int | None = None,
    sequential: bool = False,
    progress: bool = True,
) -> EvalResult:
    """IW NLL and NELBO on the recipe's evaluation split; the result is also written to eval.json."""
    recipe = run.recipe
    split = recipe.eval.split
    dataset = build_dataset(
        recipe.data, split=split, resolution=recipe.model.resolution, channels=recipe.model.input_channels
    )
    total = min(images, len(dataset)) if images else len(dataset)
    prepare = _batch_preparation(recipe)

    k = iw_samples or recipe.eval.iw_samples
    kwargs: dict[str, Any] = dict(
        prepare=prepare,
        iw_samples=k,
        batch_size=batch_size or recipe.eval.batch_size,
        chunk=chunk or recipe.eval.chunk,
        images=images,
        sequential=sequential,
        device=run.device,
    )
    if progress:
        from rich.progress import Progress

        with Progress() as bar:
            task = bar.add_task(f"IW-{k} evaluation ({split})", total=total)
            result = evaluate(run.model, dataset, on_batch=lambda n: bar.advance(task, n), **kwargs)
    else:
        result = evaluate(run.model, dataset, **kwargs)
    payload = {"step": run.step, "split": split, "weights": run.weights, **result.to_dict()}
    # A run with an EMA copy is evaluated on it by default; its trained weights get their own file.
    suffix = "_trained" if run.has_ema and run.weights == "trained" else ""
    atomic_write_text(run.run_dir / f"eval_iw{k}_{result.images}{suffix}.json", json.dumps(payload, indent=2))
    return result


@torch.no_grad()
def readjust_batch_norm(model: NVAE, steps: int, temperature: float, batch: int = 16) -> None:
    """Re-estimate BN running statistics on generated batches at this temperature, as the paper samples."""
    model.train()
    for _ in range(steps):
        model.sample(batch, temperature)
    model.eval()


def sample(
    run: LoadedRun,
    *,
    n: int | None = None,
    temperature: float | None = None,
    readjust_bn: int | None = None,
    seed: int | None = None,
    scale_pixels: bool = False,
) -> torch.Tensor:
    """Draw n images (N, C, H, W) in [0, 1] from a loaded run at this temperature.

    Unset options come from the recipe's ``eval`` section (num_samples, temperature, readjust_bn_steps). Pixels are
    drawn at temperature 1 (the paper's sampling script) unless ``scale_pixels`` also applies t to them.
    """
    defaults = run.recipe.eval
    n = defaults.num_samples if n is None else n
    temperature = defaults.temperature if temperature is None else temperature
    readjust_bn = defaults.readjust_bn_steps if readjust_bn is None else readjust_bn
    if seed is not None:
        torch.manual_seed(seed)
    if readjust_bn:
        readjust_batch_norm(run.model, readjust_bn, temperature)
    pixel_temperature = temperature if scale_pixels else 1.0
    return run.model.sample(n, temperature, run.device, pixel_temperature=pixel_temperature)


def sample_run(
    run: LoadedRun,
    *,
    n: int | None = None,
    temperature: float | None = None,
    readjust_bn: int | None = None,
    out: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    scale_pixels: bool = False,
) -> Path:
    """Write an n-image PNG grid drawn by :func:`sample` and return its path."""
    images = sample(run, n=n, temperature=temperature, readjust_bn=readjust_bn, seed=seed, scale_pixels=scale_pixels)
    t = run.recipe.eval.temperature if temperature is None else temperature
    path = Path(out) if out else run.run_dir / f"samples_t{t:g}_step{run.step}.png"
    save_png(make_grid(images), path)
    return path
