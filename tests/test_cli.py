"""The ``nvae-search`` commands, run in-process with typer's CliRunner (and once as ``python -m``)."""

from __future__ import annotations

import glob
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from nvae_search.cli import app
from nvae_search.cli.tables import profile_table
from nvae_search.profile import profile_report
from nvae_search.schema import load_recipe

ROOT = Path(__file__).resolve().parents[1]
CPU_RECIPES = sorted(glob.glob("recipes/cpu/*.yaml", root_dir=ROOT))
WIDE = {"COLUMNS": "200"}


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(app, args, env=WIDE)


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # recipe paths below are relative to the repository


def test_validate_paper_mnist_json() -> None:
    result = invoke(["validate", "recipes/paper/mnist.yaml", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["params"] == 33_363_134
    assert (summary["convs"], summary["batch_norms"], summary["flow_cells"]) == (255, 214, 0)
    assert summary["groups_per_scale"] == [10, 5]
    assert summary["latent_resolutions"] == [8, 4]
    assert summary["total_latent_dims"] == 14_400
    assert summary["file"] == "recipes/paper/mnist.yaml"


def test_validate_with_memory_counts_the_network_without_making_its_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before a memory prediction the summary needs shapes only: the 330 M weights of paper/ffhq256 are neither
    allocated nor initialised (seconds and 1.3 GB saved), and the counts are the paper network's; without one, the
    network is built on the CPU (the meta kernels' first use would cost more than a small recipe's weights)."""
    from nvae_search import profile

    built_on: list[str] = []
    real_build = profile.build_or_raise

    def recording_build(recipe: Any, source: str, device: str = "cpu") -> Any:
        built_on.append(device)
        return real_build(recipe, source, device)

    monkeypatch.setattr(profile, "build_or_raise", recording_build)
    monkeypatch.setattr("nvae_search.cli.recipe_commands.predict_memory", lambda *args: {"peak_bytes": 1})
    assert json.loads(invoke(["validate", "recipes/paper/ffhq256.yaml", "--json", "--memory"]).stdout)["memory"]
    assert invoke(["validate", "recipes/cpu/tiny.yaml", "--json"]).exit_code == 0
    assert built_on == ["meta", "cpu"]
    model = real_build(load_recipe(ROOT / "recipes/paper/ffhq256.yaml"), "ffhq256", "meta")
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    assert sum(p.numel() for p in model.parameters()) == 330_798_664  # the paper network, parameter for parameter


def test_validate_applies_set_overrides() -> None:
    result = invoke(["validate", "recipes/cpu/tiny.yaml", "--json", "--set", "model.num_latent_per_group=8"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total_latent_dims"] == 2 * 2_304  # tiny has 2,304 at 4 channels per group


def test_validate_all_cpu_recipes_at_once() -> None:
    assert len(CPU_RECIPES) >= 2
    result = invoke(["validate", *CPU_RECIPES, "--json"])
    assert result.exit_code == 0, result.output
    summaries = json.loads(result.stdout)
    assert [s["file"] for s in summaries] == CPU_RECIPES
    assert all(s["params"] > 0 and s["convs"] > 0 for s in summaries)


def test_validate_table_names_every_recipe() -> None:
    result = invoke(["validate", *CPU_RECIPES])
    assert result.exit_code == 0, result.output
    for rel in CPU_RECIPES:
        assert rel in result.stdout
    assert "27,998" in result.stdout  # tiny's parameters, with thousands separators


def test_schema_is_json_with_the_model_section() -> None:
    result = invoke(["schema"])
    assert result.exit_code == 0, result.output
    assert "model" in json.loads(result.stdout)["properties"]


def test_schema_space() -> None:
    result = invoke(["schema", "--space"])
    if (ROOT / "nvae_search/spaces.py").exists():
        assert result.exit_code == 0, result.output
        assert isinstance(json.loads(result.stdout), dict)
    else:
        assert result.exit_code == 2


def test_schema_space_without_the_module_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    result = invoke(["schema", "--space"])
    assert result.exit_code == 2
    assert "nvae_search.spaces" in result.output


def test_profile_tiny_json(tiny_profile: dict[str, Any]) -> None:
    report = tiny_profile  # --batch 8 --steps 2 --threads 1 --json
    assert report["params"] == 27_998
    assert (report["batch"], report["steps"], report["threads"]) == (8, 2, 1)
    for key in ("checkpointing_off", "checkpointing_on"):
        run = report[key]
        assert run["params"] == 27_998
        assert 0 < run["flops_fwd_per_image"] < run["flops_fwd_bwd_per_image"]
        assert run["step_time_median_s"] > 0 and len(run["step_times_s"]) == 2
        assert run["peak_memory_mib"] >= 0 and run["peak_rss_delta_mib"] >= 0
    on, off = report["checkpointing_on"], report["checkpointing_off"]
    assert on["flops_fwd_per_image"] == off["flops_fwd_per_image"]
    assert on["flops_fwd_bwd_per_image"] > off["flops_fwd_bwd_per_image"]  # the recomputed forward
    assert report["ratio_on_off"]["flops_fwd_bwd_per_image"] > 1


def fake_run(step_time: float, memory: float, flops: float) -> dict[str, Any]:
    return {
        "params": 1234,
        "threads": 2,
        "flops_fwd_per_image": 1e9,
        "flops_fwd_bwd_per_image": flops,
        "step_time_median_s": step_time,
        "step_times_s": [step_time],
        "peak_memory_mib": memory,
        "peak_rss_delta_mib": memory,
        "cuda_peak_mib": None,
    }


def test_profile_table_has_both_settings_and_ratios() -> None:
    recipe = load_recipe(ROOT / "recipes/cpu/tiny.yaml")
    runs = {"off": fake_run(0.5, 100.0, 3e9), "on": fake_run(0.75, 40.0, 4e9)}
    job = {"device": "cpu", "batch": 8, "steps": 3}
    report = profile_report(recipe, "tiny.yaml", runs, job)
    assert report["ratio_on_off"]["step_time_median_s"] == pytest.approx(1.5)
    assert report["ratio_on_off"]["peak_memory_mib"] == pytest.approx(0.4)
    console = Console(width=200, record=True)
    console.print(profile_table(report))
    text = console.export_text()
    for fragment in ("checkpointing off", "checkpointing on", "ratio on/off", "1,234", "3.0000", "1.50", "0.40"):
        assert fragment in text


def test_python_dash_m_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nvae_search", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("validate", "schema", "profile"):
        assert command in proc.stdout


def test_cli_module_does_not_import_torch() -> None:
    code = "import sys, nvae_search.cli\nassert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
