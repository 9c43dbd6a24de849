"""The exact edges of the run and search controls a user relies on, each tested on both sides of its boundary.

- ``train.max_skipped_steps`` N (nonfinite: skip): N − 1 skips in a row are tolerated, the N-th ends the run
  (docs/recipes.md: "diverged after this many in a row"); an update in between starts the count again.
- fp16: a run whose gradient scale falls below 2⁻²⁰ (from the official 2¹⁰, halved at each overflow: the 31st
  overflow in a row) stops as diverged with "persistent fp16 gradient overflow", and not one overflow before.
- The instability pruner's gradient baseline is the median of the early reports, and its streak of unstable
  reports is reset by a stable one (``patience`` reports *in a row*).
- A multi-objective trial with one non-finite objective is diverged without values, never COMPLETE.
- A journal storage whose first line is JSON but not an Optuna journal record is refused, not appended to.
- A minutes-only budget is re-planned through the first half of its plan and not after.
- FFHQ's permutation split is NumPy's ``default_rng(0)`` permutation (docs/fidelity.md), its held-out count the
  rounded fraction; CelebA's crop box is scaled with half-up rounding, the centre crop offsets are torchvision's
  ``round`` (half to even).

Unit level throughout: no training run, no Ray; the whole file takes a few seconds.
"""

from __future__ import annotations

import json
import math
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from nvae_search.config_io import ConfigError
from nvae_search.image_folders import CropBox, decode_images, partition_files
from nvae_search.schema import DataConfig, TrainConfig
from nvae_search.search.instability import InstabilityRule
from nvae_search.search.storage import check_storage
from nvae_search.search.trial import outcome_from_summary
from nvae_search.spaces import Space, space_from_dict
from nvae_search.status import BROKE, TrialStatus
from nvae_search.telemetry import StabilityTracker
from nvae_search.train import RunSummary
from nvae_search.training.budget import Budget
from nvae_search.training.control import Ranks
from nvae_search.training.step import OptimizerStep, gradient_scaler

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"
CPU = torch.device("cpu")
ONE_PROCESS = Ranks(1, 0, CPU)


# ------------------------------------------------------------------------------------------ the optimizer step
class _Step(OptimizerStep):
    """The trainer's optimizer step on a two-weight model, without a trainer: ``loss`` gives each step's loss.
    With ``overflow`` every gradient is infinite (what an fp16 overflow looks like to the scaler)."""

    def __init__(self, cfg: TrainConfig, *, precision: str, loss: str, overflow: bool = False) -> None:
        self.cfg, self.device, self.ranks = cfg, CPU, ONE_PROCESS
        self.model = nn.Linear(2, 1)  # type: ignore[assignment]
        if overflow:
            for p in self.model.parameters():
                p.register_hook(lambda g: torch.full_like(g, math.inf))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _step: 1.0)
        self.scaler = gradient_scaler(precision, "cpu")
        self.ema = None
        self.tracker = StabilityTracker()
        self.step, self.total_steps = 0, 1000
        self.loss = loss

    def compute_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.model(x).sum()
        return (out * math.nan if self.loss == "nan" else out), {}

    def take(self) -> str | None:
        """One step, counted like the trainer counts them; returns the divergence cause, if any."""
        self.step += 1
        cause, _info = self.train_step(torch.ones(1, 2))
        return cause


def test_nonfinite_skip_tolerates_one_less_than_max_skipped_steps_in_a_row_and_stops_at_the_limit() -> None:
    cfg = TrainConfig(nonfinite="skip", max_skipped_steps=3)
    run = _Step(cfg, precision="fp32", loss="nan")
    assert run.take() is None and run.take() is None  # 2 skips in a row: tolerated
    assert run.tracker.consecutive_skips == 2
    assert run.take() == "non-finite loss in 3 consecutive steps"  # the 3rd in a row ends the run
    assert run.step == 3 and run.tracker.skipped_steps == 3


def test_an_update_between_nonfinite_steps_restarts_the_skip_count() -> None:
    run = _Step(TrainConfig(nonfinite="skip", max_skipped_steps=3), precision="fp32", loss="nan")
    assert run.take() is None and run.take() is None
    run.loss = "finite"
    assert run.take() is None and run.tracker.consecutive_skips == 0  # an update
    run.loss = "nan"
    assert run.take() is None and run.take() is None  # 4 skips in all, 2 in a row
    assert run.take() == "non-finite loss in 3 consecutive steps"
    assert run.tracker.skipped_steps == 5


def test_max_skipped_steps_of_one_stops_at_the_first_nonfinite_step() -> None:
    run = _Step(TrainConfig(nonfinite="skip", max_skipped_steps=1), precision="fp32", loss="nan")
    assert run.take() == "non-finite loss in 1 consecutive steps"


def test_fp16_run_stops_when_the_scale_falls_below_two_to_the_minus_20_and_not_one_overflow_before() -> None:
    """The scaler starts at 2¹⁰ and halves at each overflow: after 30 overflows it is 2⁻²⁰ (not below: the run goes
    on), the 31st takes it to 2⁻²¹ and ends the run as a diverged one."""
    run = _Step(TrainConfig(), precision="fp16", loss="finite", overflow=True)
    assert run.scaler.is_enabled() and run.scaler.get_scale() == 2.0**10
    for k in range(1, 31):
        assert run.take() is None, f"stopped after {k} overflows at scale {run.scaler.get_scale()}"
        assert run.scaler.get_scale() == 2.0 ** (10 - k)
    assert run.scaler.get_scale() == 2.0**-20
    cause = run.take()
    assert cause is not None and cause.startswith("persistent fp16 gradient overflow")
    assert run.scaler.get_scale() == 2.0**-21
    assert run.tracker.skipped_steps == 0  # the scaler's overflows are not skipped steps


# -------------------------------------------------------------------------------------- the instability pruner
def _feed(rule: InstabilityRule, reports: list[dict[str, float]]) -> list[str | None]:
    return [rule.observe(step, metrics) for step, metrics in enumerate(reports, start=1)]


def test_one_early_gradient_outlier_does_not_raise_the_pruners_baseline() -> None:
    """Early norms 1, 1, 1, 1, 100: the median baseline is 1 (a mean would be 20.8), so 20 is 20x it and two such
    reports in a row prune."""
    rule = InstabilityRule(grad_factor=10, nelbo_factor=None, baseline_steps=5, patience=2)
    said = _feed(rule, [{"grad_norm": g} for g in (1, 1, 1, 1, 100, 20, 20)])
    assert said[:6] == [None] * 6
    assert said[6] is not None and "early median 1" in said[6] and "at step 7" in said[6]


def test_one_low_early_gradient_does_not_lower_the_pruners_baseline() -> None:
    """Early norms 10, 10, 10, 10, 0: the median baseline is 10 (a mean would be 8), so 90 is under 10x it and
    never prunes, and 101 is over it."""
    early = [{"grad_norm": g} for g in (10, 10, 10, 10, 0)]
    calm = InstabilityRule(grad_factor=10, nelbo_factor=None, baseline_steps=5, patience=2)
    assert _feed(calm, [*early, *([{"grad_norm": 90}] * 4)]) == [None] * 9
    wild = InstabilityRule(grad_factor=10, nelbo_factor=None, baseline_steps=5, patience=2)
    assert _feed(wild, [*early, {"grad_norm": 101}, {"grad_norm": 101}])[-1] is not None


def test_a_stable_report_resets_the_pruners_streak() -> None:
    """NELBO 100, then 200 (2x the lowest) every other report: unstable reports never come two in a row."""
    alternating = [{"nelbo": v} for v in (100, 200, 100, 200, 100, 200, 100, 200)]
    rule = InstabilityRule(grad_factor=None, nelbo_factor=1.5, patience=2)
    assert _feed(rule, alternating) == [None] * 8
    rule = InstabilityRule(grad_factor=None, nelbo_factor=1.5, patience=2)
    said = _feed(rule, [{"nelbo": v} for v in (100, 200, 100, 200, 200)])
    assert said[:4] == [None] * 4 and said[4] is not None and "2 report(s) in a row" in said[4]


def test_a_stable_gradient_report_resets_the_streak_with_patience_three() -> None:
    rule = InstabilityRule(grad_factor=10, nelbo_factor=None, baseline_steps=2, patience=3)
    norms = (1, 1, 50, 50, 1, 50, 50, 1, 50, 50, 50)
    said = _feed(rule, [{"grad_norm": g} for g in norms])
    assert said[:10] == [None] * 10 and said[10] is not None and "3 report(s) in a row" in said[10]


# ----------------------------------------------------------------------------------------- a trial's outcome
def _two_objective_space(tmp_path: Path) -> Space:
    data = {
        "base_recipe": str(TINY),
        "study": {"name": "mo", "n_trials": 1, "objectives": [{"metric": "nll"}, {"metric": "params"}]},
        "budget": {"steps": 2},
        "sampler": {"type": "random"},
        "space": {"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    }
    return space_from_dict(data, tmp_path / "space.yaml")


def _summary(nll: float) -> RunSummary:
    return RunSummary(
        status=TrialStatus.COMPLETED,
        cause=None,
        diverged_step=None,
        steps=2,
        total_steps=2,
        epochs=0.1,
        wall_s=1.0,
        params=1234,
        step_time_s=0.5,
        peak_memory_mb=10.0,
        grad_norm_max=1.0,
        grad_norm_mean=1.0,
        loss_spikes=0,
        skipped_steps=0,
        nonfinite_events=0,
        unit="nats",
        train_nelbo=100.0,
        eval={"nll": nll, "nelbo": 101.0},
    )


def test_a_multi_objective_trial_with_one_nonfinite_objective_is_diverged_without_values(tmp_path: Path) -> None:
    space = _two_objective_space(tmp_path)
    values = {"train.learning_rate": 0.005}
    for nll in (math.nan, math.inf):
        outcome = outcome_from_summary(space, _summary(nll), values, 1.0)
        assert outcome.status == TrialStatus.DIVERGED and outcome.status in BROKE  # Optuna FAIL, not COMPLETE
        assert outcome.cause == "non-finite objective at the end of the run" and outcome.values is None
    finite = outcome_from_summary(space, _summary(90.0), values, 1.0)
    assert finite.status == TrialStatus.COMPLETED and finite.values == [90.0, 1234.0]


# ------------------------------------------------------------------------------------------------ the storage
def test_a_json_lines_file_without_op_code_is_refused_as_a_journal(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    content = '{"step": 1, "nelbo": 2.0}\n{"step": 2, "nelbo": 1.5}\n'
    metrics.write_text(content)
    with pytest.raises(ConfigError) as err:
        check_storage(f"journal:{metrics}", "src")
    assert "is not an Optuna journal" in str(err.value) and str(metrics) in str(err.value)
    assert metrics.read_text() == content  # nothing appended


def test_a_real_optuna_journal_is_accepted(tmp_path: Path) -> None:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path = tmp_path / "study.journal"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="s", storage=optuna.storages.JournalStorage(JournalFileBackend(str(path))))
    assert "op_code" in json.loads(path.read_text().splitlines()[0])
    check_storage(f"journal:{path}", "src")  # no error


# ------------------------------------------------------------------------------------------------ the budget
def test_a_minutes_budget_is_replanned_through_the_first_half_of_its_plan_and_not_after() -> None:
    """1,000 s at 1 s a step plans 1,000 steps; step times of 0.5 s from then on give a new plan wherever a revision
    happens (step + 2 × the seconds left). Revisions: every step up to 320, then every 100th step while 2 × step is
    at most the plan."""
    budget = Budget(TrainConfig(steps=None, epochs=None, minutes=1000 / 60), iters_per_epoch=50)
    assert budget.clock_only() and budget.total_steps == 0

    def replan(step: int, step_time: float) -> int:
        budget.replan(step, float(step), [step_time] * step, ONE_PROCESS)
        return budget.total_steps

    assert replan(4, 1.0) == 0  # before the probe's five steps: no plan yet
    assert replan(5, 1.0) == 1000
    assert replan(320, 1.0) == 1000
    assert replan(320, 0.5) == 320 + 2 * 680  # 1,680: the early revisions follow every step
    assert replan(350, 0.5) == 1680  # after step 320, not a multiple of 100: kept
    assert replan(400, 0.5) == 400 + 2 * 600  # 2 × 400 ≤ 1,680: revised to 1,600
    assert replan(800, 1.0) == 800 + 200  # 2 × 800 = 1,600: the last revision, exactly at half the plan
    for step in (900, 1000):  # 2 × step > 1,000: the second half keeps its plan
        assert replan(step, 0.5) == 1000, step
    assert budget.schedule.total_steps == 1000  # the schedule follows the plan


# ---------------------------------------------------------------------------------------------- image folders
def _empty_images(root: Path, n: int) -> list[str]:
    root.mkdir()
    names = [f"{i:05d}.png" for i in range(n)]
    for name in names:
        (root / name).touch()  # listing only: the partition never decodes them
    return names


def test_ffhq_permutation_is_numpys_default_rng_0_permutation(tmp_path: Path) -> None:
    names = _empty_images(tmp_path / "ffhq", 10)
    cfg = DataConfig(dataset="image_folder", root=str(tmp_path / "ffhq"), partition="permutation", valid_fraction=0.2)
    expected_order = [names[i] for i in np.random.default_rng(0).permutation(10)]
    # The pinned numbers (NumPy's PCG64 stream, stable across releases): a changed seed or RNG is a new split.
    assert [int(n[:5]) for n in expected_order] == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]
    valid = partition_files(cfg, tmp_path / "ffhq", "valid")
    train = partition_files(cfg, tmp_path / "ffhq", "train")
    assert [p.name for p in valid] == expected_order[8:] == ["00008.png", "00001.png"]
    assert [p.name for p in train] == expected_order[:8]
    saved = json.loads((tmp_path / "ffhq" / "nvae_search_partition.json").read_text())
    assert saved == {"seed": 0, "order": expected_order}


@pytest.mark.parametrize(("count", "fraction", "held_out"), [(15, 0.1, 2), (14, 0.1, 1), (35, 0.1, 4), (9, 0.5, 4)])
def test_permutation_holds_out_the_rounded_fraction(tmp_path: Path, count: int, fraction: float, held_out: int) -> None:
    """15 × 0.1 = 1.5 holds out 2 (truncation would give 1); 35 × 0.1 = 3.5 → 4; 9 × 0.5 = 4.5 → 4 (Python's
    round, half to even); 14 × 0.1 = 1.4 → 1."""
    assert held_out == int((count * Decimal(str(fraction))).quantize(Decimal(1), ROUND_HALF_EVEN))
    _empty_images(tmp_path / "imgs", count)
    cfg = DataConfig(
        dataset="image_folder", root=str(tmp_path / "imgs"), partition="permutation", valid_fraction=fraction
    )
    valid = partition_files(cfg, tmp_path / "imgs", "valid")
    train = partition_files(cfg, tmp_path / "imgs", "train")
    assert (len(valid), len(train)) == (held_out, count - held_out)
    assert not {p.name for p in valid} & {p.name for p in train}


def _half_up(value: Fraction) -> int:
    return int((Decimal(value.numerator) / Decimal(value.denominator)).quantize(Decimal(1), ROUND_HALF_UP))


def test_crop_box_edges_round_half_up_when_scaled() -> None:
    """CelebA's box (15, 40, 148, 148 on 178 wide) on a 1.5x copy (267 × 327): left 22.5 and right 244.5 round up
    to 23 and 245 (Python's round would give 22 and 244); on the half-size copy 7.5 and 81.5 give 8 and 82."""
    celeba = CropBox((15, 40, 148, 148), 178)
    for w, h in ((267, 327), (89, 109), (178, 218)):
        scale = Fraction(w, 178)
        want = tuple(_half_up(v * scale) for v in (15, 40, 163, 188))
        assert celeba.scaled((w, h), Path("x.png")) == want, (w, h)
    assert celeba.scaled((267, 327), Path("x.png")) == (23, 60, 245, 282)
    assert celeba.scaled((89, 109), Path("x.png")) == (8, 20, 82, 94)
    assert CropBox((5, 5, 10, 10), 20).scaled((10, 10), Path("x.png")) == (3, 3, 8, 8)  # 2.5 → 3, 7.5 → 8


def test_center_crop_offsets_follow_torchvisions_round_half_to_even(tmp_path: Path) -> None:
    """torchvision's CenterCrop offsets are int(round((size − crop) / 2)): a 7 wide, 9 high image cropped to 4
    starts at column round(1.5) = 2 (not floor's 1) and row round(2.5) = 2 (not half-up's 3)."""
    pixels = np.arange(9 * 7, dtype=np.uint8).reshape(9, 7)
    path = tmp_path / "img.png"
    Image.fromarray(pixels, mode="L").save(path)
    out = decode_images([path], channels=1, crop=4, resolution=4)
    left = int(Decimal("1.5").quantize(Decimal(1), ROUND_HALF_EVEN))
    top = int(Decimal("2.5").quantize(Decimal(1), ROUND_HALF_EVEN))
    assert (left, top) == (2, 2)
    assert np.array_equal(out[0, 0], pixels[top : top + 4, left : left + 4])
