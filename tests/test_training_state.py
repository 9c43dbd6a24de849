"""The trainer's checkpoint state (nvae_search/training/state.py) carries what the recipe cannot recompute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nvae_search.schema import load_recipe
from nvae_search.train import Trainer

TINY = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"
MINUTES_ONLY = {
    "train.steps": None,
    "train.minutes": 1.0,
    "train.progress": False,
    "train.eval_at_end": False,
    "train.cosine_per": "step",
}


def test_a_resumed_minutes_budget_keeps_its_planned_step_count(tmp_path: Path) -> None:
    """A minutes-only budget is planned from the measured step time, so the recipe cannot give the step count
    again: the checkpoint does, and the cosine schedule and KL warm-up of the resumed run follow that plan."""
    recipe = load_recipe(TINY, overrides=MINUTES_ONLY)
    first = Trainer(recipe, tmp_path / "first", torch.device("cpu"), None)
    assert first.total_steps == 0  # not planned before the first steps are timed
    first.budget.set_total_steps(37)
    first.step, first.elapsed, first.step_times = 12, 3.5, [0.25] * 12
    resumed = Trainer(recipe, tmp_path / "resumed", torch.device("cpu"), None)
    resumed.load_state_dict(first.state_dict())
    assert (resumed.step, resumed.total_steps, resumed.elapsed) == (12, 37, 3.5)
    assert resumed.budget.schedule.total_steps == 37
    assert resumed.budget.schedule.factor(30) == first.budget.schedule.factor(30) < 1.0


def test_a_checkpoint_from_a_node_with_more_gpus_resumes_with_the_devices_visible(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkpoint holds one CUDA generator state per device visible when it was written (8 on a full node); a run
    resumed where fewer are visible restores the states of those it has, instead of failing on the first missing
    device (what ``torch.cuda.set_rng_state_all`` does). CUDA stood in for: only the bookkeeping is checked here."""
    from nvae_search.training import state as state_module

    restored: list[tuple[int, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, index: restored.append((int(s[0]), index)))
    state_module.restore_cuda_rng_states([torch.tensor([k], dtype=torch.uint8) for k in range(8)])
    assert restored == [(0, 0), (1, 1)]
    restored.clear()
    state_module.restore_cuda_rng_states([])  # written without CUDA
    assert restored == []
