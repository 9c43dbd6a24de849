"""Import layering of the package, read from the import statements of every module (NVAE STYLE §7.2).

- the schema, config and search-space modules never import torch;
- network modules under ``model/`` (except ``builder.py``) never see the schema or the spaces;
- no module imports optuna or ray when it is itself imported (only inside functions);
- nothing imports the CLI (``__main__`` excepted, which exists to run it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nvae_search"

TORCH_FREE = {
    "nvae_search.config_io",
    "nvae_search.spaces",
    "nvae_search.schema",
    *(f"nvae_search.schema.{m}" for m in ("cells", "ops", "recipe", "space_checks", "specs", "study")),
}
TORCH = ("torch", "torchvision")
SEARCH_BACKENDS = ("optuna", "ray")
CONFIG_MODULES = ("nvae_search.schema", "nvae_search.spaces")


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    runs_on_import: bool  # executed when the importing module is imported: not in a function, not TYPE_CHECKING
    line: int


def resolve(module_name: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` inside ``module_name``."""
    if level == 0:
        return target or ""
    parts = module_name.split(".") if is_package else module_name.split(".")[:-1]
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _records(node: ast.Import | ast.ImportFrom, module_name: str, is_package: bool, runs: bool) -> list[Import]:
    if isinstance(node, ast.Import):
        return [Import(alias.name, runs, node.lineno) for alias in node.names]
    base = resolve(module_name, is_package, node.level, node.module)
    # `from pkg import name` may import the submodule pkg.name, so both count.
    return [Import(base, runs, node.lineno)] + [Import(f"{base}.{a.name}", runs, node.lineno) for a in node.names]


def imports_of(source: str, module_name: str, is_package: bool = False) -> list[Import]:
    """Every import statement of a module, each marked with whether it runs when the module is imported."""
    found: list[Import] = []

    def walk(node: ast.AST, runs: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                walk(child, False)
            for child in node.orelse:
                walk(child, runs)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.extend(_records(node, module_name, is_package, runs))
        inside_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            walk(child, runs and not inside_function)

    walk(ast.parse(source), True)
    return found


def _hits(imp: Import, names: tuple[str, ...] | set[str]) -> bool:
    return any(imp.module == n or imp.module.startswith(n + ".") for n in names)


def violations(module_name: str, source: str, is_package: bool = False) -> list[str]:
    """The layering rules broken by one module's source."""
    out: list[str] = []
    for imp in imports_of(source, module_name, is_package):
        where = f"{module_name}:{imp.line} imports {imp.module}"
        if module_name in TORCH_FREE and _hits(imp, TORCH):
            out.append(f"{where}: must stay torch-free")
        in_model = module_name.startswith("nvae_search.model.") and module_name != "nvae_search.model.builder"
        if in_model and _hits(imp, CONFIG_MODULES):
            out.append(f"{where}: only model.builder may see the schema or the spaces")
        if imp.runs_on_import and _hits(imp, SEARCH_BACKENDS):
            out.append(f"{where}: search backends are imported inside functions only")
        if module_name != "nvae_search.__main__" and _hits(imp, ("nvae_search.cli",)):
            out.append(f"{where}: nothing imports the CLI")
    return out


def package_modules() -> list[tuple[str, Path, bool]]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules.append((name, path, is_package))
    return modules


# ----------------------------------------------------------------------------------- the real package
def test_the_package_keeps_its_layers() -> None:
    modules = package_modules()
    assert {"nvae_search.schema", "nvae_search.model.builder", "nvae_search.cli"} <= {m for m, _, _ in modules}
    broken = [v for name, path, pkg in modules for v in violations(name, path.read_text(encoding="utf-8"), pkg)]
    assert not broken, "\n".join(broken)


def test_config_modules_import_without_torch_at_runtime() -> None:
    names = ["nvae_search", *sorted(m for m in TORCH_FREE if (PACKAGE / f"{m.split('.')[-1]}.py").exists())]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = sorted(m for m in ('torch', 'optuna', 'ray') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_public_api_is_lazy() -> None:
    code = (
        "import sys, nvae_search\n"
        "assert 'torch' not in sys.modules\n"
        "assert set(nvae_search.__all__) == {'Recipe', 'build_model', 'evaluate', 'load_recipe', 'train'}\n"
        "from nvae_search.model.builder import build_model\n"
        "assert nvae_search.build_model is build_model\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ["train", "evaluate"])
def test_public_train_and_evaluate_are_the_functions_not_the_submodules(name: str) -> None:
    if not (PACKAGE / f"{name}.py").exists():
        pytest.skip(f"nvae_search/{name}.py is not written yet")
    import importlib

    import nvae_search

    module = importlib.import_module(f"nvae_search.{name}")  # binding the submodule must not shadow the function
    value = getattr(nvae_search, name)
    assert callable(value) and not isinstance(value, types.ModuleType)
    assert value is getattr(module, name)


# ------------------------------------------------------------------------- the checker catches violations
@pytest.mark.parametrize(
    ("module", "source", "fragment"),
    [
        ("nvae_search.schema", "import torch\n", "torch-free"),
        ("nvae_search.spaces", "def f():\n    from torch import nn\n", "torch-free"),
        ("nvae_search.config_io", "if TYPE_CHECKING:\n    import torch.nn\n", "torch-free"),
        ("nvae_search.model.cells", "from ..schema import ModelConfig\n", "only model.builder"),
        ("nvae_search.model.ops", "from nvae_search import spaces\n", "only model.builder"),
        ("nvae_search.train", "import optuna\n", "inside functions only"),
        (
            "nvae_search.search.tune",
            "try:\n    from ray import tune\nexcept ImportError:\n    pass\n",
            "inside functions only",
        ),
        ("nvae_search.search.tune", "class A:\n    import optuna.samplers\n", "inside functions only"),
        ("nvae_search.train", "from . import cli\n", "nothing imports the CLI"),
        ("nvae_search.search", "from ..cli import app\n", "nothing imports the CLI"),
    ],
)
def test_checker_flags_a_synthetic_violation(module: str, source: str, fragment: str) -> None:
    is_package = module == "nvae_search.search"
    found = violations(module, source, is_package)
    assert any(fragment in v for v in found), found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("nvae_search.model.builder", "from ..schema import ModelConfig\n"),
        ("nvae_search.search.tune", "def run():\n    import optuna\n    from ray import tune\n"),
        ("nvae_search.search.compile", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import optuna\n"),
        ("nvae_search.__main__", "from nvae_search.cli import main\n"),
        ("nvae_search.model.nvae", "import torch\nfrom .ops import Conv2D\n"),
    ],
)
def test_checker_accepts_allowed_imports(module: str, source: str) -> None:
    assert violations(module, source) == []


def test_relative_imports_resolve() -> None:
    assert resolve("nvae_search.model.builder", False, 2, "schema") == "nvae_search.schema"
    assert resolve("nvae_search.search", True, 1, "compile") == "nvae_search.search.compile"
    assert resolve("nvae_search.search.compile", False, 2, None) == "nvae_search"
    assert resolve("nvae_search.cli", False, 0, "torch") == "torch"
