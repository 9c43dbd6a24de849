"""Objectives over seeds (``study.aggregate``): a trial trains its configuration on N seeds in sub-runs, its value
aggregates theirs, and a seed that diverges or explodes fails the whole configuration, in both backends."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from conftest import trials_by_learning_rate

from nvae_search.config_io import ConfigError
from nvae_search.search.report import build_report
from nvae_search.search.seeds import aggregate, run_configuration
from nvae_search.search.trial import TrialOutcome
from nvae_search.spaces import Space, load_space
from nvae_search.status import TrialStatus

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "cpu" / "tiny.yaml"
State = optuna.trial.TrialState


def space_doc(name: str, agg: dict[str, Any] | None, lrs: list[float], ray: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "base_recipe": str(TINY),
        "study": {"name": name, "n_trials": len(lrs), "seed": 0, "enqueue": [{"train.learning_rate": x} for x in lrs]},
        "budget": {"steps": 8, "eval_iw_samples": 2, "eval_images": 32, "report_every_steps": 4},
        "sampler": {"type": "random"},
        "pruner": {"type": "median", "n_startup_trials": 5},
        "space": {
            "train.learning_rate": {"type": "categorical", "choices": lrs},
            "train.explode_patience": {"type": "fixed", "value": 1},  # stopped at its first blown-up log
        },
    }
    if agg is not None:
        doc["study"]["aggregate"] = agg
    if ray:
        doc["ray"] = {"max_concurrent": 1, "scheduler": {"type": "none"}}
    return doc


def make_space(tmp_path: Path, doc: dict[str, Any]) -> Space:
    path = tmp_path / f"{doc['study']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_space(path)


def test_aggregates_lean_against_the_direction() -> None:
    values = [100.0, 104.0, 96.0]
    assert aggregate(values, "mean", 1.0, "minimize") == pytest.approx(100.0)
    assert aggregate(values, "worst", 1.0, "minimize") == 104.0
    assert aggregate(values, "worst", 1.0, "maximize") == 96.0
    assert aggregate(values, "mean_plus_std", 2.0, "minimize") == pytest.approx(108.0)  # std 4
    assert aggregate(values, "mean_plus_std", 2.0, "maximize") == pytest.approx(92.0)


def test_aggregate_needs_two_seeds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"study\.aggregate\.seeds"):
        make_space(tmp_path, space_doc("one", {"seeds": 1}, [0.01]))


def test_seeds_run_in_sub_runs_report_with_offsets_and_a_failed_seed_ends_the_configuration(tmp_path: Path) -> None:
    """The driver alone, with a stand-in for training one run: which seeds run, where, with which report steps."""
    space = make_space(tmp_path, space_doc("driver", {"seeds": 3, "how": "mean"}, [0.01]))
    calls: list[tuple[int, Path]] = []
    reported: list[int] = []

    def train_one(values: Mapping[str, Any], run_dir: Path, report: Any, resume: bool) -> TrialOutcome:
        seed = values["train.seed"]
        calls.append((seed, run_dir))
        for step in (1, 4, 8):
            report(step, {"nelbo": 100.0})
        if seed == 2:  # the second seed explodes
            return TrialOutcome(status=TrialStatus.EXPLODED, cause="NELBO 5e4 ...", diverged_step=8, steps=8)
        return TrialOutcome(status=TrialStatus.COMPLETED, steps=8, values=[100.0 + seed], eval_nelbo=100.0 + seed)

    outcome = run_configuration(space, {"train.seed": 1}, tmp_path / "t", train_one, lambda s, m: reported.append(s))
    assert calls == [(1, tmp_path / "t" / "seed_1"), (2, tmp_path / "t" / "seed_2")]  # seed 3 never trained
    assert reported == [1, 4, 8, 9, 12, 16]  # seed i reports at i x budget.steps + step
    assert outcome.status == TrialStatus.EXPLODED and outcome.values is None
    assert outcome.cause == "seed 2 of 3: NELBO 5e4 ..." and outcome.steps == 16
    assert [r["seed"] for r in json.loads(str(outcome.seed_runs))] == [1, 2]


@pytest.mark.parametrize("backend", ["optuna", "ray"])
def test_both_backends_aggregate_over_seeds_and_fail_the_configuration_on_an_exploded_seed(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    doc = space_doc(f"seeds_{backend}", {"seeds": 2, "how": "worst"}, [0.01, 3.0], ray=backend == "ray")
    doc["budget"]["keep_checkpoints"] = "none"
    space = make_space(tmp_path, doc)
    study_dir, by_lr = trials_by_learning_rate(space, backend, tmp_path, request)

    good = by_lr[0.01]
    run_dir = Path(good.user_attrs["run_dir"])
    seeds = [json.loads((run_dir / f"seed_{s}" / "summary.json").read_text()) for s in (1, 2)]  # tiny's seed is 1
    per_seed = [s["eval"]["nelbo"] for s in seeds]
    assert good.state == State.COMPLETE and good.value == pytest.approx(max(per_seed))  # worst of the two seeds
    assert per_seed[0] != per_seed[1] and good.user_attrs["steps"] == 16
    assert [r["seed"] for r in json.loads(good.user_attrs["seed_runs"])] == [1, 2]
    if backend == "optuna":  # the second seed's reports come after the first's
        assert sorted(good.intermediate_values) == [1, 4, 8, 9, 12, 16]

    bad = by_lr[3.0]
    assert bad.state == State.FAIL and bad.user_attrs["status"] == "exploded"
    assert bad.user_attrs["cause"].startswith("seed 1 of 2: NELBO")
    assert not (Path(bad.user_attrs["run_dir"]) / "seed_2").exists()  # the configuration failed on its first seed

    assert not list(study_dir.glob("trials/*/seed_*/checkpoint.pt"))  # keep_checkpoints reaches the seed runs
    report = build_report(study_dir)
    assert "trajectories.png" in report.files


def test_a_resumed_configuration_keeps_its_ended_seeds_and_resumes_the_interrupted_one(tmp_path: Path) -> None:
    """A trial restarted (by Ray, or a worker resuming the study) trains only what is left of it."""
    space = make_space(tmp_path, space_doc("resumed", {"seeds": 3, "how": "mean"}, [0.01]))
    trial = tmp_path / "t"
    (trial / "seed_1").mkdir(parents=True)
    ended = {"status": "completed", "steps": 8, "train_nelbo": 101.0, "eval": {"nelbo": 101.0, "nll": 99.0}}
    ended |= {"params": 1000, "step_time_s": 0.01, "peak_memory_mb": 1.0}  # what summary.json always holds
    (trial / "seed_1" / "summary.json").write_text(json.dumps(ended))
    (trial / "seed_2").mkdir()
    (trial / "seed_2" / "checkpoint.pt").write_bytes(b"")  # cut off mid-run: its checkpoint is there, no summary
    calls: list[tuple[int, bool]] = []

    def train_one(values: Mapping[str, Any], run_dir: Path, report: Any, resume: bool) -> TrialOutcome:
        calls.append((values["train.seed"], resume))
        nelbo = 100.0 + values["train.seed"]
        return TrialOutcome(status=TrialStatus.COMPLETED, steps=8, values=[nelbo], eval_nelbo=nelbo, eval_nll=nelbo - 2)

    outcome = run_configuration(space, {"train.seed": 1}, trial, train_one, None)
    assert calls == [(2, True), (3, False)]  # seed 1 not retrained; seed 2 resumed from its checkpoint
    assert outcome.values == pytest.approx([102.0])  # mean of 101, 102, 103
    assert outcome.eval_nll == pytest.approx(100.0) and outcome.steps == 24


def test_a_seed_that_broke_before_a_restart_still_fails_the_configuration(tmp_path: Path) -> None:
    space = make_space(tmp_path, space_doc("broke", {"seeds": 2, "how": "mean"}, [0.01]))
    (tmp_path / "t" / "seed_4").mkdir(parents=True)
    broke = {"status": "diverged", "cause": "non-finite loss at step 3", "diverged_step": 3, "steps": 3}
    (tmp_path / "t" / "seed_4" / "summary.json").write_text(json.dumps(broke))

    def train_one(values: Mapping[str, Any], run_dir: Path, report: Any, resume: bool) -> TrialOutcome:
        raise AssertionError(f"seed {values['train.seed']} trained again")

    outcome = run_configuration(space, {"train.seed": 4}, tmp_path / "t", train_one, None)
    assert outcome.status == TrialStatus.DIVERGED and outcome.values is None
    assert outcome.cause == "seed 4 of 2: non-finite loss at step 3"


def test_a_configurations_figures_over_its_seeds(tmp_path: Path) -> None:
    """Means for the evaluation figures, sums for counts, the maximum gradient norm, and the first seed's number."""
    space = make_space(tmp_path, space_doc("figures", {"seeds": 2, "how": "mean"}, [0.01]))
    per_seed = {
        7: TrialOutcome(status=TrialStatus.COMPLETED, steps=8, values=[90.0], eval_nelbo=90.0, eval_nll=88.0,
                        train_nelbo=91.0, grad_norm_max=5.0, loss_spikes=1, skipped_steps=0),
        8: TrialOutcome(status=TrialStatus.COMPLETED, steps=8, values=[94.0], eval_nelbo=94.0, eval_nll=91.0,
                        train_nelbo=95.0, grad_norm_max=3.0, loss_spikes=2, skipped_steps=1),
    }  # fmt: skip

    def train_one(values: Mapping[str, Any], run_dir: Path, report: Any, resume: bool) -> TrialOutcome:
        return per_seed[values["train.seed"]]

    outcome = run_configuration(space, {"train.seed": 7}, tmp_path / "t", train_one, None)
    assert outcome.seed == 7 and outcome.values == pytest.approx([92.0])
    assert (outcome.eval_nelbo, outcome.eval_nll, outcome.train_nelbo) == pytest.approx((92.0, 89.5, 93.0))
    assert (outcome.steps, outcome.loss_spikes, outcome.skipped_steps, outcome.grad_norm_max) == (16, 3, 1, 5.0)
