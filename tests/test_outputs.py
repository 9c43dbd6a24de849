"""What a run leaves for users: provenance, file modes, sample formats, reconstructions, and the small CLI
behaviours around recipes (budget overrides, "did you mean", -q)."""

from __future__ import annotations

import json
import os
import platform
import socket
import stat
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from nvae_search import outputs
from nvae_search.cli import app
from nvae_search.config_io import atomic_write_text
from nvae_search.outputs import to_uint8
from nvae_search.provenance import package_version
from nvae_search.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "train.progress=false", "--set", "train.eval_images=8", "--set", "train.eval_iw_samples=2"]
runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, torch_single_thread: None) -> Iterator[Path]:
    """`nvae-search train cpu/tiny` from an empty folder, under umask 022."""
    folder = tmp_path_factory.mktemp("empty")
    previous_cwd, previous_mask = Path.cwd(), os.umask(0o022)
    os.chdir(folder)
    try:
        result = runner.invoke(app, ["train", "cpu/tiny", "--set", "train.steps=4", *FAST])
        assert result.exit_code == 0, result.output
    finally:
        os.chdir(previous_cwd)
        os.umask(previous_mask)
    yield folder / "runs" / "cpu-tiny"


def test_a_builtin_recipe_trains_from_an_empty_folder(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4


def test_one_budget_override_replaces_the_recipes_budget() -> None:
    # cpu/tiny has `steps: 60`; epochs and steps together would be refused without clearing the others
    result = runner.invoke(app, ["validate", "cpu/tiny", "--set", "train.epochs=2", "--json"])
    assert result.exit_code == 0, result.output
    both = runner.invoke(app, ["validate", "cpu/tiny", "--set", "train.epochs=2", "--set", "train.steps=3"])
    assert both.exit_code == 2  # two budget keys given on purpose: still the schema's rule


def test_summary_records_provenance(run_dir: Path) -> None:
    before = datetime.now(timezone.utc)
    prov = json.loads((run_dir / "summary.json").read_text())["provenance"]
    assert prov["nvae_search"] == package_version() != "unknown"
    assert prov["torch"] == torch.__version__ and prov["python"] == platform.python_version()
    assert prov["cuda"] == torch.version.cuda and prov["host"] == socket.gethostname()
    assert prov["threads"] == torch.get_num_threads()  # the fixture trained in this process
    assert prov["command"]  # the command line of the process that trained
    assert datetime.fromisoformat(prov["started"]) <= before
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    if head.returncode == 0:  # a clone: the commit and whether it had uncommitted changes
        assert prov["git"]["commit"] == head.stdout.strip() and isinstance(prov["git"]["dirty"], bool)


def test_run_files_follow_the_umask(run_dir: Path, tmp_path: Path) -> None:
    for name in ("summary.json", "recipe.resolved.yaml", "checkpoint.pt", "metrics.jsonl"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o644, name  # written under umask 022
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o755
    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o640


def test_sample_formats_for_metric_tools(run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    result = runner.invoke(app, ["sample", str(run_dir), "--n", "5", "--format", "folder", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    assert Image.open(pngs[0]).size == (32, 32)  # one image per sample, at the model's resolution
    npz = tmp_path / "s.npz"
    result = runner.invoke(app, ["sample", str(run_dir), "--n", "3", "--format", "npz", "--out", str(npz)])
    assert result.exit_code == 0, result.output
    arrays = np.load(npz)["arr_0"]
    assert arrays.shape == (3, 32, 32, 3) and arrays.dtype == np.uint8


def test_temperature_sweep_is_one_grid_row_per_temperature(run_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    result = runner.invoke(
        app, ["sample", str(run_dir), "--n", "4", "--temperatures", "0.6,0.8,1.0", "--out", str(png), "--seed", "0"]
    )
    assert result.exit_code == 0, result.output
    width, height = Image.open(png).size
    tile = 32 + 2
    assert (width, height) == (4 * tile + 2, 3 * tile + 2)
    bad = runner.invoke(app, ["sample", str(run_dir), "--temperatures", "0.6,hot"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_reconstruct_puts_inputs_above_their_reconstructions(run_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "recon.png"
    result = runner.invoke(app, ["reconstruct", str(run_dir), "--n", "10", "--out", str(png)])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(png).convert("L"), dtype=np.float32) / 255
    tile = 32 + 2
    assert grid.shape == (4 * tile + 2, 8 * tile + 2)  # 10 images, 8 per row: 2 rows of inputs, 2 of outputs
    inputs, recons = grid[2 : 2 + 32, 2 : 2 + 32], grid[2 + tile : 2 + tile + 32, 2 : 2 + 32]
    assert set(np.unique(inputs)) <= {0.0, 1.0}  # binarised MNIST input
    assert not np.array_equal(inputs, recons)  # the row below holds Bernoulli means, not the input again
    assert len(np.unique(recons)) > 2  # means, not a binary sample of them
    # the second half-row is padding: white, not another image
    assert np.all(grid[2 + 2 * tile : 2 + 2 * tile + 32, 2 + 2 * tile :] == 1.0)


def test_recipe_typo_gets_did_you_mean(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", "cpu/tiny", "--set", "model.num_chanels_enc=8"], env={"COLUMNS": "250"})
    assert result.exit_code == 2 and "(did you mean model.num_channels_enc" in result.output


def test_completion_and_verbosity_options_exist() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--install-completion" in result.output and "--verbose" in result.output
    assert runner.invoke(app, ["-vv", "validate", "cpu/tiny"]).exit_code == 0


def test_quiet_prints_nothing_but_errors(tmp_path: Path) -> None:
    quiet = runner.invoke(app, ["-q", "validate", "cpu/tiny"])
    assert quiet.exit_code == 0 and quiet.output == ""
    loud = runner.invoke(app, ["validate", "cpu/tiny"])
    assert "parameters" in loud.output
    failing = runner.invoke(app, ["-q", "validate", str(tmp_path / "missing.yaml")])
    assert failing.exit_code == 2 and "file not found" in failing.output


def test_did_you_mean_knows_initials_and_neighbours() -> None:
    """A mistyped recipe key is matched first against the fields beside it, by name or by initials."""
    from nvae_search.schema.space_checks import recipe_path_suggestions

    assert recipe_path_suggestions("train.lr")[0] == "train.learning_rate"
    assert recipe_path_suggestions("train.wd")[0] == "train.weight_decay"
    assert recipe_path_suggestions("eval.batch_sise")[0] == "eval.batch_size"
    assert "train" not in recipe_path_suggestions("train.lr")  # not the section it was typed in


def test_uint8_images_take_the_nearest_level() -> None:
    x = torch.tensor([0.0, 0.5, 0.999, 1.0, 1.5, -0.1, 100.4 / 255]).view(1, 1, 1, -1)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 128, 255, 255, 255, 0, 100]  # truncation: 127, 254, 99


def test_samples_follow_the_recipes_eval_section_the_pixel_temperature_and_the_seed(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = load_run(run_dir)
    update = {"num_samples": 3, "temperature": 0.6, "readjust_bn_steps": 2}
    run.recipe = run.recipe.model_copy(update={"eval": run.recipe.eval.model_copy(update=update)})
    readjusted: list[tuple[int, float]] = []
    monkeypatch.setattr(outputs, "readjust_batch_norm", lambda model, steps, t: readjusted.append((steps, t)))
    drawn: list[tuple[int, float, float]] = []
    real_sample = run.model.sample

    def sample(n: int, t: float, device: Any, *, pixel_temperature: float = 1.0) -> torch.Tensor:
        drawn.append((n, t, pixel_temperature))
        return real_sample(n, t, device, pixel_temperature=pixel_temperature)

    monkeypatch.setattr(run.model, "sample", sample)

    def npz(name: str, **kwargs: Any) -> np.ndarray:
        args: dict[str, Any] = {"n": None, "temperatures": [None], "fmt": "npz", "seed": 5, **kwargs}
        return np.load(outputs.write_samples(run, out=tmp_path / name, **args))["arr_0"]

    first = npz("a.npz")
    assert readjusted == [(2, 0.6)] and drawn == [(3, 0.6, 1.0)]  # the recipe's n, t and BN steps; pixels at 1
    assert first.shape == (3, 32, 32, 3)
    assert np.array_equal(npz("b.npz"), first) and not np.array_equal(npz("c.npz", seed=6), first)
    npz("d.npz", n=2, temperatures=[0.9], readjust_bn=0, scale_pixels=True)
    assert drawn[-1] == (2, 0.9, 0.9) and len(readjusted) == 3  # no re-estimation asked this time
