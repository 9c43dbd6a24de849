"""Values of a run's bookkeeping against hand-computed references: what the stability report counts, how a run
is classified at its end, the learning rate at each step, what a resume refuses and restores, and the data a batch
is turned into.

Guards (most tests kill a mutation the rest of the suite let through; the others pin, by value, rules it checks
only through whole runs):

* ``nvae_search/telemetry.py``: active units (mean KL above 0.1 nats, counted per channel), loss spikes (20 losses
  of history, above the running *median* of the last 50 by (``spike_factor`` − 1) × its magnitude, the window kept
  across a resume), the lowest / first / last logged NELBO behind the explosion rules, gradient-norm extremes;
* ``end_of_run_status``: the collapse fraction is of *all* latent units (groups × channels per group);
* ``nvae_search/training/budget.py``: linear warm-up per iteration, then cosine down to ``learning_rate_min``
  (torch's ``CosineAnnealingLR`` as the reference, per step and per epoch), held at the minimum after the plan;
* ``nvae_search/training/state.py``: resume refuses another budget (steps, epochs, minutes) but lets
  ``model.numerics`` and other training settings change; the CPU RNG and the stability counters come back;
* ``nvae_search/checkpoint.py``: a negative step is refused;
* ``nvae_search/data.py``: bit reduction lands every 8-bit level in its own bin, also a hair off k/255.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nvae_search.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from nvae_search.data import prepare_batch
from nvae_search.schema import dump_recipe, load_recipe
from nvae_search.status import TrialStatus
from nvae_search.telemetry import StabilityTracker, active_units, end_of_run_status
from nvae_search.train import LRSchedule, Trainer
from nvae_search.training.state import RunDirError, refuse_changed_recipe

TINY = Path(__file__).resolve().parents[1] / "recipes" / "cpu" / "tiny.yaml"


# ------------------------------------------------------------------------------------------ telemetry
def test_a_latent_channel_is_active_when_its_mean_kl_exceeds_a_tenth_of_a_nat() -> None:
    groups = [torch.tensor([0.05, 0.1, 0.11, 2.0]), torch.tensor([0.0, 0.09]), torch.tensor([0.3, 0.3, 0.3])]
    assert active_units(groups) == [2, 0, 3]  # counted per channel, 0.1 itself not active


def test_a_loss_spike_needs_twenty_losses_of_history() -> None:
    short = StabilityTracker()
    for _ in range(19):
        short.observe_loss(1.0)
    assert not short.observe_loss(100.0)  # 19 losses before it: too little history
    full = StabilityTracker()
    for _ in range(20):
        full.observe_loss(1.0)
    assert full.observe_loss(100.0) and full.loss_spikes == 1


def test_a_loss_spike_is_above_spike_factor_times_the_running_median() -> None:
    tracker = StabilityTracker(spike_factor=3.0)
    for _ in range(20):
        tracker.observe_loss(1.0)
    assert not tracker.observe_loss(2.9)  # above the median, within 3x: no spike
    assert tracker.observe_loss(3.2)
    assert tracker.loss_spikes == 1


def test_a_negative_loss_spikes_when_it_jumps_up_not_when_it_improves() -> None:
    """A continuous decoder's NELBO can be negative: the spike is measured upwards from the median, by
    (factor − 1) × |median| (200 nats here), so a sharp improvement is no spike and a jump of 350 nats is one."""
    tracker = StabilityTracker(spike_factor=3.0)
    for _ in range(20):
        tracker.observe_loss(-100.0)
    assert not tracker.observe_loss(-350.0)  # 250 nats better
    assert not tracker.observe_loss(99.0)  # 199 nats worse: within (3 − 1) × 100
    assert tracker.observe_loss(250.0)  # 350 nats worse
    assert tracker.loss_spikes == 1


def test_one_huge_early_loss_does_not_hide_later_spikes_the_median_is_robust() -> None:
    tracker = StabilityTracker(spike_factor=3.0)
    tracker.observe_loss(100.0)
    for _ in range(19):
        tracker.observe_loss(1.0)
    # median of [100, 1 x 19] is 1 (a mean would be 5.95 and hide a loss of 4)
    assert tracker.observe_loss(4.0)


def test_a_resumed_tracker_keeps_a_window_of_the_last_fifty_losses() -> None:
    before = StabilityTracker()
    for _ in range(50):
        before.observe_loss(1.0)
    resumed = StabilityTracker()
    resumed.load_state_dict(before.state_dict())
    for _ in range(50):
        resumed.observe_loss(10.0)  # the first of them is a spike against the median of 1
    assert len(resumed.recent_losses) == 50
    spikes = resumed.loss_spikes
    # the window now holds only 10s: 20 is within 3x of them (with the old 1s still there the median would be 5.5)
    assert not resumed.observe_loss(20.0) and resumed.loss_spikes == spikes


def test_a_run_that_ends_above_its_first_logged_nelbo_is_exploded_at_its_end() -> None:
    tracker = StabilityTracker(explode_factor=2.0, explode_patience=3)
    for step, nelbo in ((10, 100.0), (20, 80.0), (30, 110.0)):
        assert tracker.observe_nelbo(step, nelbo) is None  # 110 is below 2 × 80: the rule never fires
    assert (tracker.first_nelbo, tracker.last_nelbo, tracker.lowest_nelbo) == (100.0, 110.0, 80.0)
    cause = tracker.final_explosion(30)
    assert cause is not None and "above its first logged 100" in cause


def test_the_explosion_rule_compares_with_the_lowest_nelbo_so_far() -> None:
    tracker = StabilityTracker(explode_factor=2.0)
    for step, nelbo in ((1, 300.0), (2, 100.0), (3, 150.0)):
        assert tracker.observe_nelbo(step, nelbo) is None
    assert tracker.lowest_nelbo == 100.0 and tracker.lowest_nelbo_step == 2
    cause = tracker.observe_nelbo(4, 201.0)
    assert cause is not None and "100 at step 2" in cause


def test_gradient_norm_max_and_mean_skip_non_finite_norms() -> None:
    tracker = StabilityTracker()
    for norm in (3.0, 5.0, 1.0, math.inf, math.nan):
        tracker.observe_grad_norm(norm)
    assert tracker.grad_norm_max == 5.0 and tracker.grad_norm_mean == pytest.approx(3.0)
    assert StabilityTracker().grad_norm_mean == 0.0


def test_collapse_counts_active_units_against_every_group_times_its_channels() -> None:
    # 3 of 3 × 4 = 12 units active: 25 % < 50 % is collapsed (against 4 units it would be 75 %)
    status, cause = end_of_run_status([1, 1, 1], 4, loss_spikes=0, steps=100, collapse=0.5, spiky=0.02)
    assert status == TrialStatus.COLLAPSED and cause is not None and "3 of 12" in cause
    assert end_of_run_status([2, 2, 2], 4, 0, 100, 0.5, 0.02) == (TrialStatus.COMPLETED, None)
    assert end_of_run_status([2, 2, 2], 4, 3, 100, 0.5, 0.02)[0] == TrialStatus.SPIKY  # 3 % > 2 % of the steps


# ---------------------------------------------------------------------------------------- LR schedule
def _cosine_reference(lr: float, lr_min: float, t_max: int, steps: int) -> list[float]:
    """The learning rates of torch's CosineAnnealingLR (the official code's scheduler) after 0 … ``steps`` steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=lr_min)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def test_per_step_lr_warms_up_linearly_then_follows_the_cosine_to_the_minimum() -> None:
    lr, lr_min = 1e-2, 1e-4
    schedule = LRSchedule(lr, lr_min, warmup_steps=10, total_steps=110, iters_per_epoch=10, warmup_epochs=1, per="step")
    assert [schedule.factor(s) for s in (0, 5, 9)] == [0.0, 0.5, 0.9]
    reference = _cosine_reference(lr, lr_min, t_max=110 - 10 - 1, steps=99)
    for step in (10, 11, 40, 60, 108, 109):
        assert schedule.factor(step) * lr == pytest.approx(reference[step - 10], rel=1e-6), step
    assert schedule.factor(109) * lr == pytest.approx(lr_min)  # the last step runs at the minimum


def test_the_lr_stays_at_its_minimum_after_the_planned_steps() -> None:
    schedule = LRSchedule(1e-2, 1e-4, warmup_steps=10, total_steps=110, iters_per_epoch=10, warmup_epochs=1, per="step")
    for step in (110, 150, 300):
        assert schedule.factor(step) * 1e-2 == pytest.approx(1e-4)


def test_per_epoch_lr_follows_the_cosine_of_the_epochs_after_the_warm_up() -> None:
    lr, lr_min = 1e-2, 1e-4
    # 10 epochs of 10 steps, 2 warm-up epochs: CosineAnnealingLR(T_max = 10 − 2 − 1), stepped once per later epoch
    schedule = LRSchedule(
        lr, lr_min, warmup_steps=20, total_steps=100, iters_per_epoch=10, warmup_epochs=2, per="epoch"
    )
    reference = _cosine_reference(lr, lr_min, t_max=7, steps=7)
    for epoch in range(2, 10):
        for step in (10 * epoch, 10 * epoch + 9):
            assert schedule.factor(step) * lr == pytest.approx(reference[epoch - 2], rel=1e-6), step
    assert schedule.factor(99) * lr == pytest.approx(lr_min)


def test_a_fractional_warm_up_starts_the_cosine_at_the_first_epoch_after_it() -> None:
    # warm-up 2.5 epochs (25 steps): the official loop steps the cosine at the start of every epoch > 2.5
    schedule = LRSchedule(
        1e-2, 1e-4, warmup_steps=25, total_steps=100, iters_per_epoch=10, warmup_epochs=2.5, per="epoch"
    )
    assert schedule.factor(25) == pytest.approx(1.0) and schedule.factor(29) == pytest.approx(1.0)
    assert schedule.factor(30) < 1.0


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    "changed",
    [
        {"train.steps": 61},
        {"train.steps": None, "train.epochs": 3},
        {"train.minutes": 5.0},
        {"model.num_latent_per_group": 8},
    ],
)
def test_resume_refuses_another_budget_or_architecture(tmp_path: Path, changed: dict[str, object]) -> None:
    saved = dump_recipe(load_recipe(TINY))
    with pytest.raises(RunDirError, match="refuses to change"):
        refuse_changed_recipe(tmp_path / "checkpoint.pt", saved, load_recipe(TINY, overrides=changed))


@pytest.mark.parametrize("changed", [{"model.numerics.precision": "bf16"}, {"train.learning_rate": 3e-3}])
def test_resume_accepts_changed_numerics_and_training_settings(tmp_path: Path, changed: dict[str, object]) -> None:
    saved = dump_recipe(load_recipe(TINY))
    refuse_changed_recipe(tmp_path / "checkpoint.pt", saved, load_recipe(TINY, overrides=changed))


def test_a_resumed_trainer_continues_the_random_stream_and_the_stability_counters(tmp_path: Path) -> None:
    recipe = load_recipe(TINY, overrides={"train.progress": False, "train.eval_at_end": False})
    first = Trainer(recipe, tmp_path / "first", torch.device("cpu"), None)
    resumed = Trainer(recipe, tmp_path / "resumed", torch.device("cpu"), None)
    first.tracker.loss_spikes, first.tracker.skipped_steps, first.tracker.lowest_nelbo = 2, 3, 91.5
    torch.manual_seed(1234)
    state = first.state_dict()
    expected = torch.rand(5)
    torch.manual_seed(99)  # another stream, as in a fresh process
    resumed.load_state_dict(state)
    assert torch.equal(torch.rand(5), expected)
    tracker = resumed.tracker
    assert (tracker.loss_spikes, tracker.skipped_steps, tracker.lowest_nelbo) == (2, 3, 91.5)


def test_a_checkpoint_with_a_negative_step_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.zeros(1)}, "step": -1})
    with pytest.raises(CheckpointError, match="non-negative"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("error", [0.0, -2e-6, 2e-6])
def test_bit_reduction_puts_every_eight_bit_level_in_its_own_bin(error: float) -> None:
    """Level k/255 reduces to 5-bit level k // 8, also when float arithmetic left it a hair off k/255."""
    levels = torch.arange(256)
    y = prepare_batch(levels.float() / 255 + error, binarize=False, num_bits=5)
    assert torch.equal(torch.round(y * 31).long(), levels // 8)


def test_binarised_batches_keep_zero_and_one_pixels_fixed() -> None:
    x = torch.tensor([0.0, 1.0] * 500)
    torch.manual_seed(0)
    assert torch.equal(prepare_batch(x, binarize=True, num_bits=1), x)
