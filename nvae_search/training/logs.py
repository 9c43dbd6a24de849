"""What a run writes as it goes: metrics.jsonl, TensorBoard scalars, images and hparams, the progress bar, and the
provenance block of summary.json. Only rank 0 writes; the metrics are global-batch figures on every rank."""

from __future__ import annotations

import json
import math
import resource
import statistics
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import provenance, tracking
from ..config_io import atomic_write_text, read_jsonl
from ..evaluate import to_unit
from ..images import make_grid
from ..model.nvae import NVAE
from ..schema import Recipe, recipe_to_dict
from ..status import BROKE
from ..telemetry import StabilityTracker, active_units
from .control import Ranks

if TYPE_CHECKING:
    from ..train import RunSummary, Trainer

_SCALARS = ("loss", "nelbo", "recon", "kl", "beta", "lambda", "lr", "grad_norm", "active_units")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class RunLogging:
    """The logging of the trainer: one metrics row per log step, written to metrics.jsonl, TensorBoard and the
    tracking backend; the last row (``last_metrics``) feeds the summary."""

    recipe: Recipe
    out_dir: Path
    device: torch.device
    ranks: Ranks
    model: NVAE
    ema: nn.Module | None
    optimizer: torch.optim.Optimizer
    tracker: StabilityTracker
    step: int
    elapsed: float
    iters_per_epoch: int
    unit: str
    dims: int
    started: datetime
    resumed_from: int | None
    writer: Any
    last_metrics: dict[str, Any]

    def _metrics(self, info: dict[str, Any]) -> dict[str, Any]:
        # Called at the same steps on every rank, so the all-reduce lines up; the logged figures are global-batch.
        packed = self.ranks.mean(torch.stack([info["nelbo"], info["recon"], *info["kl"]]).float()).tolist()
        nelbo, recon, kl = packed[0], packed[1], packed[2:]
        units = active_units(info["kl_per_channel"])
        return {
            "step": self.step,
            "epoch": self.step / self.iters_per_epoch,
            "loss": info["loss"],
            "nelbo": to_unit(nelbo, self.unit, self.dims),
            "nelbo_nats": nelbo,
            "recon": recon,
            "kl": sum(kl),
            "beta": info["beta"],
            "lambda": info["lambda"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": info["grad_norm"],
            "loss_spikes": self.tracker.loss_spikes,
            "skipped_steps": self.tracker.skipped_steps,
            "active_units": sum(units),
            "active_groups": sum(1 for u in units if u > 0),
            "kl_per_group": kl,
            "active_units_per_group": units,
            "time": self.elapsed,
            # An fp16 step whose gradients overflowed: the scaler skipped it (no update, a lower scale).
            **({"scaler_skipped": True} if info.get("scaler_skipped") else {}),
        }

    def log(self, metrics: dict[str, Any]) -> None:
        self.last_metrics = metrics
        if not self.ranks.main:
            return
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics) + "\n")
        tracking.on_step(self.step, metrics)
        if self.writer is not None:
            for key in _SCALARS:
                # Non-finite values (an fp16 step the gradient scaler skipped) stay in metrics.jsonl only:
                # tensorboardX prints a line for each one, through the progress bar.
                if math.isfinite(metrics[key]):
                    self.writer.add_scalar(f"train/{key}", metrics[key], self.step)
            for g, value in enumerate(metrics["kl_per_group"]):
                self.writer.add_scalar(f"kl_group/{g:02d}", value, self.step)

    @torch.no_grad()
    def log_images(self, x: torch.Tensor) -> None:
        if not self.ranks.main or self.writer is None:
            return
        model = self.ema.module if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        n = min(16, self.recipe.eval.num_samples)
        samples = model.sample(n, self.recipe.eval.temperature, self.device)
        recon_out = model(x[:n]).output
        recon = recon_out.mean() if self.recipe.model.output.distribution == "bernoulli" else recon_out.sample(1.0)
        self.writer.add_image("samples", make_grid(samples), self.step)
        self.writer.add_image("reconstructions", make_grid(torch.cat([x[:n], recon])), self.step)
        model.train(was_training)

    def _trim_metrics(self) -> None:
        """Forget the log lines written after the checkpoint (they will be re-done), and a line torn by a kill."""
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [row for row in read_jsonl(path) if isinstance(row.get("step"), int) and row["step"] <= self.step]
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
        if kept:  # the summary's training figures come from the last log line, also when no step is left to take
            self.last_metrics = kept[-1]

    def _provenance(self) -> dict[str, Any]:
        """Where the run came from: this process's, or for a resumed run the first one's, with each resume that
        took steps listed under ``resumes`` (resuming a finished run leaves the record as it was)."""
        current = provenance.collect(self.started)
        previous = _summary_provenance(self.out_dir) if self.resumed_from is not None else None
        if previous is None:
            return current
        if self.step > self.resumed_from:
            keys = ("started", "command", "host", "git", "nvae_search", "torch")
            previous.setdefault("resumes", []).append(
                {k: current.get(k) for k in keys} | {"from_step": self.resumed_from}
            )
        return previous

    def _write_hparams(self, summary: RunSummary) -> None:
        flat = _flatten(recipe_to_dict(self.recipe)["model"], "model")
        flat.update(_flatten(recipe_to_dict(self.recipe)["train"], "train"))
        hparams = {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}
        metrics = {
            "hparam/train_nelbo": summary.train_nelbo or float("nan"),
            "hparam/diverged": float(summary.status in BROKE),
        }
        if summary.eval:
            metrics["hparam/eval_nll"] = summary.eval["nll"]
            metrics["hparam/eval_nelbo"] = summary.eval["nelbo"]
        self.writer.add_hparams(hparams, metrics, name="hparams")


def _summary_provenance(run_dir: Path) -> dict[str, Any] | None:
    """The provenance block of the run's existing summary.json, if it has a readable one."""
    try:
        block = json.loads((run_dir / "summary.json").read_text(encoding="utf-8")).get("provenance")
    except (OSError, ValueError, AttributeError):
        return None
    return block if isinstance(block, dict) else None


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        elif value is not None:
            out[name] = value
    return out


class Progress:
    """A rich progress bar: step, loss, NELBO in nats or bits/dim, it/s and ETA."""

    def __init__(self, trainer: Trainer) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.trainer = trainer
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.progress.add_task(
            trainer.recipe.name, total=trainer.total_steps or None, completed=trainer.step, stats="", speed=""
        )
        self.progress.start()

    def update(self, info: dict[str, Any] | None) -> None:
        t = self.trainer
        fields: dict[str, Any] = {"completed": t.step, "total": t.total_steps or None}
        if info is not None and (t.step % t.cfg.log_every == 0 or t.step == 1):
            nelbo = to_unit(float(info["nelbo"]), t.unit, t.dims)
            fields["stats"] = f"loss {info['loss']:.2f}  nelbo {nelbo:.3f} {t.unit}  |g| {info['grad_norm']:.2g}"
        recent = t.step_times[-20:]
        if recent:
            fields["speed"] = f"{1.0 / statistics.median(recent):.1f} it/s"
        self.progress.update(self.task, **fields)

    def close(self) -> None:
        self.progress.stop()
