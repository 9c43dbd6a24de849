"""`.ci/gpu-check`, the one command that runs the checks needing a GPU, runs nowhere in CI: these tests keep what it
names in step with the suite (a CUDA-only test it leaves out would go unrun on the next GPU machine too)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "gpu-check"
CUDA_ONLY = re.compile(r"@pytest\.mark\.skipif\(\s*not torch\.cuda\.is_available\(\).*?\)\s*\ndef (\w+)", re.S)


def _phase_body(name: str) -> str:
    text = SCRIPT.read_text(encoding="utf-8")
    match = re.search(rf"^phase_{name}\(\) \{{\n(.*?)^\}}", text, re.S | re.M)
    assert match, f"no phase_{name} in {SCRIPT}"
    return match.group(1)


def _named_tests(body: str) -> tuple[set[str], set[str]]:
    """The test files a phase runs whole, and the node ids (file::test) it runs one by one."""
    paths = re.findall(r"tests/\S+\.py(?:::\w+)?", body)
    return {p for p in paths if "::" not in p}, {p for p in paths if "::" in p}


def test_every_cuda_only_test_is_run_by_the_gpu_check() -> None:
    files, node_ids = _named_tests(_phase_body("cuda_tests"))
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for name in CUDA_ONLY.findall(path.read_text(encoding="utf-8")):
            node = f"tests/{path.name}::{name}"
            found.append(node)
            assert f"tests/{path.name}" in files or node in node_ids, f"{node} is CUDA-only but .ci/gpu-check skips it"
    assert len(found) >= 3, found  # the pattern still finds the suite's CUDA-only tests


def test_every_test_the_gpu_check_names_exists() -> None:
    for phase in ("cuda_tests", "gpu_visible"):
        files, node_ids = _named_tests(_phase_body(phase))
        for path in files:
            assert (ROOT / path).is_file(), path
        for node in node_ids:
            path, name = node.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(encoding="utf-8"), re.M), node


def test_the_gpu_check_refuses_an_unknown_phase(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(SCRIPT), "no-such-phase"],
        capture_output=True,
        text=True,
        env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2 and "unknown phase: no-such-phase" in result.stderr
