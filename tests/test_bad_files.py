"""A corpus of bad space, recipe and run files, each through the real CLI: exit code 2, one screen naming the file
and, on one line, the field or key with the reason; no exception escapes; nothing is written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner, Result

from nvae_search.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from nvae_search.cli import app
from nvae_search.schema import load_recipe
from nvae_search.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes/cpu/tiny.yaml"
WIDE = {"COLUMNS": "300"}  # one line per problem, so that a field and its reason are seen together
MARKER = "payload-ran"

SPACE = """\
base_recipe: base.yaml
study: {name: bad, n_trials: 2, seed: 0}
budget: {steps: 2, eval_iw_samples: 2, eval_images: 16}
sampler: {type: random}
pruner: {type: none}
space:
  train.learning_rate: {type: float, low: 1.0e-3, high: 2.0e-2, log: true}
  model.num_latent_per_group: {type: int, low: 2, high: 4}
"""
BRANCH = """\
  model.decoder_cell:
    type: categorical
    choices:
      mbconv: {model.cells.normal_dec: {type: fixed, value: [{type: mbconv, expansion: 3}]}}
      mbconv: {model.cells.normal_dec: {type: fixed, value: [res_bnswish]}}
"""


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def tiny_text(old: str = "", new: str = "") -> str:
    """The tiny recipe's text with one line replaced (or lines added after ``old``)."""
    text = TINY.read_text()
    assert old in text, old
    return text.replace(old, new, 1)


# --------------------------------------------------------------------------------------------- the corpus
@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]  # writes the bad file(s) into the folder; returns the CLI arguments
    file: str  # how the screen names the file
    line: tuple[str, ...]  # fragments that must appear together on one line: the field or key, and the reason


def space_case(name: str, text: str | bytes, line: tuple[str, ...], base: str | None = None) -> Case:
    def setup(folder: Path) -> list[str]:
        (folder / "base.yaml").write_text(TINY.read_text() if base is None else base)
        path = folder / "space.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["search", "space.yaml", "--root", "runs"]

    return Case(name, setup, "space.yaml", line)


def recipe_case(name: str, text: str, line: tuple[str, ...], *extra: str) -> Case:
    def setup(folder: Path) -> list[str]:
        (folder / "recipe.yaml").write_text(text)
        return ["train", "recipe.yaml", "--out", "runs/r", *extra]

    return Case(name, setup, "recipe.yaml", line)


SPACE_CASES = [
    space_case(
        "space_duplicate_top_level_key",
        SPACE + "study: {name: again, n_trials: 3}\n",
        ("study", "duplicate key 'study': first at line 2, again at line 9"),
    ),
    space_case(
        "space_duplicate_key_inside_space",
        SPACE + "  train.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2}\n",
        ("space.train.learning_rate", "duplicate key 'train.learning_rate': first at line 7, again at line 9"),
    ),
    space_case(
        "space_duplicate_key_in_a_spec",
        SPACE.replace("{type: int, low: 2, high: 4}", "{type: int, low: 2, high: 4, low: 3}"),
        ("space.model.num_latent_per_group.low", "duplicate key 'low': first at line 8, column 43, again at column 60"),
    ),
    space_case(
        "space_duplicate_branch_label",
        SPACE + BRANCH,
        ("space.model.decoder_cell.choices.mbconv", "duplicate key 'mbconv': first at line 12, again at line 13"),
    ),
    space_case("space_empty", "", ("<file>", "the file is empty")),
    space_case("space_only_comments", "# to do\n\n", ("<file>", "the file is empty")),
    space_case("space_null", "null\n", ("<file>", "the file is empty")),
    space_case("space_not_yaml", "study: {name: x, n_trials: [1\n", ("<file>", "not valid YAML")),
    space_case("space_a_list", "- base_recipe\n- study\n", ("<file>", "expected a mapping at the top level")),
    space_case("space_not_utf8", b"\xff\xfe\x00base_recipe", ("<file>", "not a UTF-8 text file")),
    space_case("space_unknown_key", SPACE + "searcher: tpe\n", ("searcher", "unknown key")),
    space_case(
        "space_wrong_type",
        SPACE.replace("n_trials: 2", "n_trials: many"),
        ("study.n_trials", "valid integer"),
    ),
    space_case(
        "space_bad_range",
        SPACE.replace("low: 1.0e-3, high: 2.0e-2", "low: 2.0e-2, high: 1.0e-3"),
        ("space.train.learning_rate", "must be below high"),
    ),
    space_case(
        "space_index_past_the_end",
        SPACE + "  model.cells.normal_enc.7.kernel: {type: categorical, choices: [3, 5]}\n",
        ("space.model.cells.normal_enc.7.kernel", "index 7 is past the end of model.cells.normal_enc: it has 2 items"),
    ),
    space_case(
        "space_index_into_a_number",
        SPACE + "  model.num_channels_enc.1: {type: int, low: 4, high: 8}\n",
        ("space.model.num_channels_enc.1", "model.num_channels_enc is 4 in the base recipe base.yaml, not a list"),
    ),
    space_case(
        "space_base_recipe_missing",
        SPACE.replace("base.yaml", "nowhere/base.yaml"),
        ("base_recipe", "file not found"),
    ),
    space_case(
        "space_base_recipe_invalid",
        SPACE,
        ("base_recipe", "is invalid: model.num_latent_per_group", "valid integer"),
        base=tiny_text("num_latent_per_group: 4", "num_latent_per_group: four"),
    ),
    space_case(
        "space_base_recipe_duplicate_key",
        SPACE,
        ("base_recipe", "is invalid: model.use_se: duplicate key 'use_se'"),
        base=tiny_text("  use_se: true\n", "  use_se: true\n  use_se: false\n"),
    ),
    space_case("space_base_recipe_empty", SPACE, ("base_recipe", "the file is empty"), base="# nothing yet\n"),
    space_case(
        "space_count_refers_to_itself",
        SPACE
        + "  model.num_groups_per_scale:\n"
        + "    {type: per_scale, count: model.num_groups_per_scale, each: {type: int, low: 1, high: 2}}\n",
        ("space.model.num_groups_per_scale.count", "model.num_groups_per_scale is this entry itself"),
    ),
    space_case(
        "space_circular_alias",
        SPACE + "  model.cells.normal_enc: &loop {type: fixed, value: [*loop]}\n",
        ("<file>", "line 9: an alias refers to a node that contains it (circular)"),
    ),
    space_case("space_alias_bomb", alias_bomb(), ("<file>", "alias bomb")),
    space_case(
        "space_python_tag",
        f'base_recipe: !!python/object/apply:os.mkdir ["{MARKER}"]\n',
        ("<file>", "not valid YAML", "could not determine a constructor"),
    ),
    space_case("space_nested_too_deeply", "[" * 5000 + "]" * 5000, ("<file>", "nested too deeply")),
    space_case(
        "space_enqueue_outside_the_range",
        SPACE.replace("seed: 0}", "seed: 0, enqueue: [{model.num_latent_per_group: 9}]}"),
        ("study.enqueue.0.model.num_latent_per_group", "9 is outside the distribution"),
    ),
]

RECIPE_CASES = [
    recipe_case(
        "recipe_duplicate_top_level_key",
        tiny_text() + "train: {steps: 5}\n",
        ("train", "duplicate key 'train': first at line 29, again at line 42"),
    ),
    recipe_case(
        "recipe_duplicate_nested_key",
        tiny_text("  num_channels_dec: 4\n", "  num_channels_dec: 4\n  num_channels_enc: 8\n"),
        ("model.num_channels_enc", "duplicate key 'num_channels_enc': first at line 13, again at line 15"),
    ),
    recipe_case(
        "recipe_duplicate_key_in_a_list_item",
        tiny_text("  preset: res_mbconv\n", "  cells: {normal_enc: [{type: res_bnswish, kernel: 3, kernel: 5}]}\n"),
        ("model.cells.normal_enc.0.kernel", "duplicate key 'kernel'"),
    ),
    recipe_case("recipe_empty", "", ("<file>", "the file is empty")),
    recipe_case("recipe_only_comments", "# name: draft\n# model: {}\n", ("<file>", "the file is empty")),
    recipe_case("recipe_a_number", "42\n", ("<file>", "expected a mapping at the top level, got int")),
    recipe_case("recipe_unknown_key", tiny_text() + "optimiser: adam\n", ("optimiser", "unknown key")),
    recipe_case(
        "recipe_bad_override", tiny_text(), ("train.steps", "greater than or equal to 1"), "--set", "train.steps=0"
    ),
]


# ------------------------------------------------------------------------------------------ run-file cases
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run of the tiny recipe (the run files of the cases below are damaged copies of it)."""
    out = tmp_path_factory.mktemp("bad_files") / "run"
    overrides = {"train.steps": 4, "train.progress": False, "train.eval_at_end": False, "train.log_every": 1}
    assert train(load_recipe(TINY, overrides=overrides), out).status == "completed"
    return out


def _edit_checkpoint(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        edit(state)
        state.pop("format", None)
        save_checkpoint(run / "checkpoint.pt", state)

    return damage


class Payload:
    """Unpickling this calls os.mkdir: a checkpoint holding it must be refused before anything runs."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (MARKER,))


def _write_payload(run: Path) -> None:
    torch.save({"format": FORMAT, "model": Payload(), "step": 1}, run / "checkpoint.pt")


def _resolved(old: str, new: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / "recipe.resolved.yaml"
        text = path.read_text()
        assert old in text, old
        path.write_text(text.replace(old, new, 1))

    return damage


def _study_dir(study_json: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / "study.json").write_text(study_json)

    return damage


RESUME = ["train", "run/recipe.resolved.yaml", "--out", "run", "--resume"]
EVAL = ["eval", "run", "--images", "4", "--iw-samples", "2"]
SAMPLE = ["sample", "run", "--n", "4"]
REPORT = ["report", "run", "--no-repeats"]
RUN_CASES_SPEC: list[tuple[str, Callable[[Path], None], list[str], str, tuple[str, ...]]] = [
    (
        "checkpoint_text_file",
        lambda run: (run / "checkpoint.pt").write_text("not a checkpoint\n"),
        EVAL,
        "checkpoint.pt",
        ("not a readable nvae-search checkpoint",),
    ),
    (
        "checkpoint_yaml_text",  # the weights-only unpickler fails on this one with an IndexError
        lambda run: (run / "checkpoint.pt").write_text("a: 1\n"),
        SAMPLE,
        "checkpoint.pt",
        ("not a readable nvae-search checkpoint",),
    ),
    (
        "checkpoint_truncated",
        lambda run: (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:4000]),
        RESUME,
        "checkpoint.pt",
        ("truncated or foreign",),
    ),
    (
        "checkpoint_of_another_tool",
        lambda run: torch.save({"weights": torch.zeros(3)}, run / "checkpoint.pt"),
        SAMPLE,
        "checkpoint.pt",
        ("not an nvae-search checkpoint", "format tag"),
    ),
    (
        "checkpoint_without_weights",
        _edit_checkpoint(lambda s: s.pop("model")),
        EVAL,
        "checkpoint.pt",
        ("the checkpoint lacks model",),
    ),
    (
        "checkpoint_without_optimizer_state",
        _edit_checkpoint(lambda s: s.pop("optimizer")),
        RESUME,
        "checkpoint.pt",
        ("the checkpoint lacks optimizer",),
    ),
    (
        "checkpoint_step_is_text",
        _edit_checkpoint(lambda s: s.update(step="4")),
        SAMPLE,
        "checkpoint.pt",
        ("step is '4', expected a non-negative integer",),
    ),
    (
        "checkpoint_step_is_fractional",
        _edit_checkpoint(lambda s: s.update(step=2.5)),
        RESUME,
        "checkpoint.pt",
        ("step is 2.5, expected a non-negative integer",),
    ),
    (
        "checkpoint_weights_not_tensors",
        _edit_checkpoint(lambda s: s.update(model={"conv.weight": "0.5"})),
        EVAL,
        "checkpoint.pt",
        ("model is not a mapping of weight names to tensors",),
    ),
    (
        "checkpoint_optimizer_state_of_another_model",
        _edit_checkpoint(lambda s: s["optimizer"]["param_groups"][0].update(params=[0])),
        RESUME,
        "checkpoint.pt",
        ("does not fit this run",),
    ),
    (
        "checkpoint_pickle_payload",
        _write_payload,
        EVAL,
        "checkpoint.pt",
        ("not a readable nvae-search checkpoint", "Weights only load failed"),
    ),
    (
        "checkpoint_of_another_architecture",
        _resolved("num_latent_per_group: 4", "num_latent_per_group: 6"),
        EVAL,
        "checkpoint.pt",
        ("holds another architecture than the recipe's", "weights have another shape"),
    ),
    (
        "checkpoint_of_another_architecture_without_its_recipe",
        lambda run: (
            _edit_checkpoint(lambda s: s.pop("recipe"))(run),
            _resolved("use_se: true", "use_se: false")(run),
        ),
        RESUME,
        "checkpoint.pt",
        ("holds another architecture", "are not in the recipe's network"),
    ),
    (
        "resume_changes_the_architecture",
        _resolved("num_latent_per_group: 4", "num_latent_per_group: 6"),
        RESUME,
        "run",
        ("model.num_latent_per_group: 4 -> 6",),
    ),
    (
        "resume_changes_the_budget",
        _resolved("steps: 4", "steps: 9"),
        RESUME,
        "run",
        ("train.steps: 4 -> 9",),
    ),
    (
        "resume_with_workers_changes_the_budget",
        _resolved("steps: 4", "steps: 9"),
        [*RESUME, "--workers", "2"],
        "run",
        ("train.steps: 4 -> 9",),
    ),
    (
        "metrics_damaged_before_the_last_line",
        lambda run: (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n'),
        RESUME,
        "metrics.jsonl",
        ("line 2", "not a JSON object: the file is damaged"),
    ),
    (
        "resolved_recipe_empty",
        lambda run: (run / "recipe.resolved.yaml").write_text(""),
        SAMPLE,
        "recipe.resolved.yaml",
        ("<file>", "the file is empty"),
    ),
    (
        "resolved_recipe_duplicate_key",
        _resolved("  use_se: true\n", "  use_se: true\n  use_se: false\n"),
        EVAL,
        "recipe.resolved.yaml",
        ("model.use_se", "duplicate key 'use_se'"),
    ),
    (
        "study_json_not_json",
        _study_dir('{"study_name": "bad", "sto'),
        REPORT,
        "study.json",
        ("<file>", "not valid JSON (truncated or damaged?)"),
    ),
    (
        "study_json_a_list",
        _study_dir('["bad", "journal:x"]'),
        REPORT,
        "study.json",
        ("<file>", "expected a JSON object, got list"),
    ),
    (
        "study_json_without_storage",
        _study_dir('{"study_name": "bad", "space_file": "space.yaml"}'),
        REPORT,
        "study.json",
        ("storage", "missing"),
    ),
    (
        "study_json_storage_not_a_string",
        _study_dir('{"study_name": "bad", "space_file": "space.yaml", "storage": 3}'),
        REPORT,
        "study.json",
        ("storage", "expected a non-empty string, got 3"),
    ),
]


def run_case(name: str, damage: Callable[[Path], None], args: list[str], file: str, line: tuple[str, ...]) -> Case:
    def setup(folder: Path) -> list[str]:
        damage(folder / "run")
        return list(args)

    return Case(name, setup, file, line)


RUN_CASES = [run_case(*spec) for spec in RUN_CASES_SPEC]
CASES = SPACE_CASES + RECIPE_CASES + RUN_CASES


# ------------------------------------------------------------------------------------------------- checks
def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its bytes: any write shows up as a difference."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def on_one_line(output: str, fragments: tuple[str, ...]) -> bool:
    return any(all(f in line for f in fragments) for line in output.splitlines())


def assert_clean_refusal(result: Result, case: Case) -> None:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert case.file in result.output, result.output
    assert on_one_line(result.output, case.line), result.output


def test_the_corpus_is_large_and_varied() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 30
    assert len(SPACE_CASES) >= 15 and len(RECIPE_CASES) >= 5 and len(RUN_CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_file_is_refused_cleanly_and_writes_nothing(
    case: Case, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # short relative names, so that each screen line is whole
    if case in RUN_CASES:
        shutil.copytree(tiny_run, tmp_path / "run")
    args = case.setup(tmp_path)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, args, env=WIDE)
    assert_clean_refusal(result, case)
    assert snapshot(tmp_path) == before, "the refused command wrote files"
    assert not (tmp_path / MARKER).exists(), "a payload in the file ran"


def test_the_real_process_prints_no_traceback(tmp_path: Path) -> None:
    """CliRunner keeps exceptions in result.exception; a real process shows what a user would see."""
    (tmp_path / "space.yaml").write_text(SPACE + "  model.num_latent_per_group: {type: int, low: 1, high: 2}\n")
    (tmp_path / "base.yaml").write_text(TINY.read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "nvae_search", "search", "space.yaml", "--root", "runs"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **WIDE},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert on_one_line(proc.stderr, ("space.model.num_latent_per_group", "first at line 8, again at line 9"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.yaml", "space.yaml"]


def test_a_payload_checkpoint_in_a_real_process(tiny_run: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_run, tmp_path / "run")
    _write_payload(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "nvae_search", "eval", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **WIDE},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert on_one_line(proc.stderr, ("run/checkpoint.pt", "not a readable nvae-search checkpoint"))
    assert not (tmp_path / MARKER).exists()


# ------------------------------------------------------------------------------------------ direct checks
def test_a_pickled_payload_is_refused_and_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves weights_only=True: a plain torch.load of this file would create the marker folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    _write_payload(tmp_path / "run")
    with pytest.raises(CheckpointError, match="not a readable nvae-search checkpoint"):
        load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert not (tmp_path / MARKER).exists()


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path: Path) -> None:
    """A kill in the middle of a metrics write leaves half a line; the resumed run logs every step exactly once."""
    overrides = {
        "train.steps": 6,
        "train.progress": False,
        "train.eval_at_end": False,
        "train.log_every": 1,
        "train.checkpoint_every_steps": 1000,
    }
    recipe = load_recipe(TINY, overrides=overrides)
    stopped = train(recipe, tmp_path, reporter=lambda step, _metrics: step >= 3)
    assert stopped.status == "stopped" and load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    metrics = tmp_path / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    # Steps logged after the checkpoint, then a torn line, as a kill during step 5's write leaves them.
    extra = json.dumps({**json.loads(rows[-1]), "step": 4})
    metrics.write_text("\n".join(rows) + "\n" + extra + "\n" + extra[: len(extra) // 2])
    resumed = train(recipe, tmp_path, resume=True)
    assert resumed.status == "completed" and resumed.steps == 6
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_duplicate_keys_in_shipped_files_are_none(repo_root: Path) -> None:
    """Every recipe and space the project ships still loads under the duplicate-key check."""
    from nvae_search.config_io import read_yaml_file

    files = sorted(repo_root.glob("recipes/**/*.yaml")) + sorted(repo_root.glob("spaces/*.yaml"))
    assert files
    for path in files:
        assert isinstance(read_yaml_file(path), dict), path


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    """`<<: *base` then the same key is YAML's way to override a merged value, not a duplicate."""
    from nvae_search.config_io import parse_yaml_text

    text = "base: &b {kernel: 3, type: res_bnswish}\nop:\n  <<: *b\n  kernel: 5\n"
    assert parse_yaml_text(text, "x.yaml")["op"] == {"kernel": 5, "type": "res_bnswish"}
    assert yaml.safe_load(text) == parse_yaml_text(text, "x.yaml")
