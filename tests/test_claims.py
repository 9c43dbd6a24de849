"""README claims that no other test covers: the optimizer, clipping and the skip threshold, loss spikes and active
units in the summary, the samplers' temperature, and the allocator opt-out."""

from __future__ import annotations

import ctypes
import importlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from nvae_search.checkpoint import load_checkpoint
from nvae_search.model.distributions import DiscMixLogistic, NormalOutput
from nvae_search.schema import load_recipe
from nvae_search.telemetry import gradient_norm
from nvae_search.train import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"
FAST = {"train.progress": False, "train.eval_at_end": False, "train.image_every_steps": 1000}
LOGISTIC_STD = math.pi / math.sqrt(3)  # standard deviation of a logistic variable of scale 1


def tiny(**overrides: Any) -> Any:
    return load_recipe(TINY, overrides={**FAST, **overrides})


def trainer(tmp_path: Path, **overrides: Any) -> Trainer:
    return Trainer(tiny(**overrides), tmp_path, torch.device("cpu"), None)


def first_batch(t: Trainer) -> torch.Tensor:
    return t.prepare(next(t._batches()))


# ------------------------------------------------------------------------------------------------ the optimizer
def test_adamax_with_eps_1e_3_and_weight_decay_coupled_into_the_gradient(tmp_path: Path) -> None:
    """NVAE_SPEC §2.8: Adamax, ε = 1e-3, weight decay 3e-4 added to the gradient (coupled, not AdamW-style). With
    zero gradients a coupled decay moves p by lr · wd·p / (wd·|p| + ε) on the first step; a decoupled one by
    lr · wd · p, 4 times less here."""
    t = trainer(tmp_path)
    opt = t.optimizer
    assert type(opt) is torch.optim.Adamax
    (group,) = opt.param_groups
    assert group["eps"] == 1e-3 and group["weight_decay"] == 3e-4 and group["betas"] == (0.9, 0.999)
    assert sum(p.numel() for p in group["params"]) == t.params  # decay on every parameter
    lr = 1e-2
    group["lr"] = lr  # the warm-up starts at 0
    param = next(p for p in t.model.parameters() if p.numel() > 8)
    before = param.detach().clone()
    for p in t.model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    decayed = 3e-4 * before
    expected = before - lr * decayed / (decayed.abs() + 1e-3)
    assert torch.allclose(param.detach(), expected, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------------- clipping and the skip threshold
def test_grad_clip_bounds_the_norm_of_the_applied_gradient(tmp_path: Path) -> None:
    """The logged norm is the raw one; the optimizer sees the clipped gradient (left in .grad after the step)."""
    for clip in (None, 0.5):
        t = trainer(tmp_path / str(clip), **{"train.grad_clip": clip, "train.warmup_epochs": 0})
        _, info = t.train_step(first_batch(t))
        assert info is not None and info["grad_norm"] > 1.0, "the raw norm must exceed the clip for this check"
        applied = float(gradient_norm([p for p in t.model.parameters() if p.grad is not None]))
        if clip is None:
            assert applied == pytest.approx(info["grad_norm"], rel=1e-5)
        else:
            assert applied == pytest.approx(clip, rel=1e-4)


def test_skip_threshold_skips_the_update_and_counts_it(tmp_path: Path) -> None:
    """Every step's gradient norm is above 1e-6: all three steps are skipped, no parameter moves, the run still
    completes and the summary counts them."""
    initial = {k: v.clone() for k, v in trainer(tmp_path / "init").model.named_parameters()}
    summary = train(
        tiny(**{"train.steps": 3, "train.skip_threshold": 1e-6, "train.warmup_epochs": 0}), tmp_path / "run"
    )
    assert summary.status == "completed" and summary.steps == 3
    assert summary.skipped_steps == 3 and summary.grad_norm_max > 1e-6
    weights = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    for name, value in initial.items():
        assert torch.equal(weights[name], value), name
    loose = train(tiny(**{"train.steps": 3, "train.skip_threshold": 1e9}), tmp_path / "loose")
    assert loose.skipped_steps == 0


# ----------------------------------------------------------------------------- loss spikes and active units
def test_a_loss_spike_is_counted_in_the_metrics_and_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss of step 23 is made 10× its value (after the 20 steps of history the spike rule needs): one spike,
    logged from that step on and reported in the summary with the per-group active units of the last log line."""
    real_loss = Trainer.compute_loss

    def one_spike(self: Trainer, x: torch.Tensor) -> Any:
        loss, info = real_loss(self, x)
        return (loss * 10 if self.step == 22 else loss), info

    monkeypatch.setattr(Trainer, "compute_loss", one_spike)
    summary = train(tiny(**{"train.steps": 25, "train.log_every": 1}), tmp_path)
    # one spike in 25 steps is above train.spiky_fraction (2 %): a spiky run, which keeps its values
    assert summary.status == "spiky" and summary.loss_spikes == 1 and "1 loss spikes in 25 steps" in str(summary.cause)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["loss_spikes"] for row in rows] == [0] * 22 + [1] * 3
    last = rows[-1]
    assert summary.active_units == last["active_units_per_group"] and len(summary.active_units) == 3
    assert summary.active_groups == sum(1 for u in summary.active_units if u > 0) > 0
    assert all(0 <= u <= 4 for u in summary.active_units)  # 4 latent channels per group
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["loss_spikes"] == 1 and on_disk["active_units"] == summary.active_units


# ------------------------------------------------------------------------------------- samplers' temperature
def test_the_discretized_logistic_sampler_scales_its_noise_by_s_times_t() -> None:
    """One mixture, mean 0, scale s = 0.05, no channel coupling: the samples (mapped back to [-1, 1]) have the
    standard deviation of a logistic of scale s·t (the official code uses s/t: wider when colder)."""
    torch.manual_seed(0)
    s, side = 0.05, 96
    params = torch.zeros(1, 10, side, side)
    for c in range(3):  # layout per channel c: mean, log-scale, coefficient at 1 + 3c, 2 + 3c, 3 + 3c
        params[:, 2 + 3 * c] = math.log(s)
    out = DiscMixLogistic(params, num_mixtures=1)
    for t in (1.0, 0.5):
        x = out.sample(t) * 2 - 1
        assert float(x.std()) == pytest.approx(s * t * LOGISTIC_STD, rel=0.05), t


def test_the_normal_decoder_honours_the_temperature() -> None:
    torch.manual_seed(0)
    params = torch.zeros(1, 2, 128, 128)
    params[:, 1] = -2.5  # log σ before the soft clamp
    out = NormalOutput(params)
    sigma = float(out.dist.sigma.mean())
    assert 0.05 < sigma < 0.2
    for t in (1.0, 0.5):
        x = out.sample(t) * 2 - 1
        assert float(x.std()) == pytest.approx(sigma * t, rel=0.05), t


# --------------------------------------------------------------------------------------- allocator opt-out
class _RecordingLibc:
    """Stands in for ctypes.CDLL(libc): records mallopt calls instead of changing this process's allocator."""

    calls: ClassVar[list[tuple[int, int]]] = []

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return 1


@pytest.fixture
def recorded_mallopt(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    runtime = importlib.import_module("nvae_search.runtime")
    calls: ClassVar[list[tuple[int, int]]] = []
    monkeypatch.setattr(_RecordingLibc, "calls", calls)
    monkeypatch.setattr(ctypes, "CDLL", _RecordingLibc)
    runtime.tune_allocator.cache_clear()
    yield calls
    runtime.tune_allocator.cache_clear()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_the_allocator_opt_out_leaves_malloc_alone(
    monkeypatch: pytest.MonkeyPatch, recorded_mallopt: list[tuple[int, int]]
) -> None:
    from nvae_search.runtime import tune_allocator

    monkeypatch.setenv("NVAE_SEARCH_DEFAULT_MALLOC", "1")
    assert tune_allocator() is False and recorded_mallopt == []
    tune_allocator.cache_clear()
    monkeypatch.delenv("NVAE_SEARCH_DEFAULT_MALLOC")
    assert tune_allocator() is True
    assert recorded_mallopt == [(-3, 1 << 30), (-1, 1 << 31)]  # M_MMAP_THRESHOLD, then M_TRIM_THRESHOLD
