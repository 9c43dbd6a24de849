"""Import layering of the package, read from the import statements of every module (NVAE STYLE §7.2).

- the schema, config and search-space modules never import torch;
- network modules under ``model/`` (except ``builder.py``) never see the schema or the spaces;
- no module imports optuna or ray when it is itself imported (only inside functions);
- nothing imports the CLI (``__main__`` excepted, which exists to run it);
- every module sits on one of six floors (:data:`FLOORS`) and imports only from its own floor or lower, function-local
  imports included (``TYPE_CHECKING`` imports excepted: they never run);
- the CLI imports no network module, and the report reaches neither training nor a search backend.
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
    *(f"nvae_search.schema.{m}" for m in ("cells", "data", "ops", "recipe", "space_checks", "specs", "study")),
}
TORCH = ("torch", "torchvision")
SEARCH_BACKENDS = ("optuna", "ray")
CONFIG_MODULES = ("nvae_search.schema", "nvae_search.spaces")


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    runs_on_import: bool  # executed when the importing module is imported: not in a function, not TYPE_CHECKING
    line: int
    type_only: bool = False  # under ``if TYPE_CHECKING:``: never executed
    maybe_attribute: bool = False  # the ``name`` of ``from pkg import name``: a submodule or just an attribute


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


def _records(
    node: ast.Import | ast.ImportFrom, module_name: str, is_package: bool, runs: bool, type_only: bool = False
) -> list[Import]:
    if isinstance(node, ast.Import):
        return [Import(alias.name, runs, node.lineno, type_only) for alias in node.names]
    base = resolve(module_name, is_package, node.level, node.module)
    # `from pkg import name` may import the submodule pkg.name, so both count.
    return [Import(base, runs, node.lineno, type_only)] + [
        Import(f"{base}.{a.name}", runs, node.lineno, type_only, maybe_attribute=True) for a in node.names
    ]


def imports_of(source: str, module_name: str, is_package: bool = False) -> list[Import]:
    """Every import statement of a module, each marked with whether it runs when the module is imported."""
    found: list[Import] = []

    def walk(node: ast.AST, runs: bool, type_only: bool = False) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                walk(child, False, True)
            for child in node.orelse:
                walk(child, runs, type_only)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.extend(_records(node, module_name, is_package, runs, type_only))
        inside_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            walk(child, runs and not inside_function, type_only)

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
        in_cli = module_name == "nvae_search.cli" or module_name.startswith("nvae_search.cli.")
        if module_name != "nvae_search.__main__" and not in_cli and _hits(imp, ("nvae_search.cli",)):
            out.append(f"{where}: nothing imports the CLI")
        if in_cli and not imp.type_only and _hits(imp, ("nvae_search.model",)):
            out.append(f"{where}: the CLI parses and prints; the network is for the modules below it")
    return out


# Each module's floor: an import may point to its own floor or lower, never up. A package name covers its
# submodules unless one is listed itself; a new module needs a row here (the test says which).
FLOORS: dict[str, int] = {
    # 0: configuration and vocabulary: torch-free
    "nvae_search": 0,
    "nvae_search.schema": 0,
    "nvae_search.schema_docs": 0,
    "nvae_search.config_io": 0,
    "nvae_search.spaces": 0,
    "nvae_search.status": 0,
    "nvae_search.rundir": 0,
    "nvae_search.runtime": 0,
    "nvae_search.provenance": 0,
    "nvae_search.builtins": 0,
    "nvae_search.datasets": 0,
    # 1: the network modules; they never see the schema
    "nvae_search.model.ops": 1,
    "nvae_search.model.cells": 1,
    "nvae_search.model.distributions": 1,
    "nvae_search.model.flows": 1,
    "nvae_search.model.nvae": 1,
    # 2: schema meets network (the builder), data, objectives, stability, checkpoints, evaluation
    "nvae_search.model": 2,
    "nvae_search.model.builder": 2,
    "nvae_search.data": 2,
    "nvae_search.data_formats": 2,
    "nvae_search.image_folders": 2,
    "nvae_search.images": 2,
    "nvae_search.objectives": 2,
    "nvae_search.telemetry": 2,
    "nvae_search.checkpoint": 2,
    "nvae_search.evaluate": 2,
    # 3: training, run directories, profiling, memory, tracking
    "nvae_search.train": 3,
    "nvae_search.training": 3,
    "nvae_search.distributed": 3,
    "nvae_search.runs": 3,
    "nvae_search.outputs": 3,
    "nvae_search.profile": 3,
    "nvae_search.memory": 3,
    "nvae_search.memory_tracking": 3,
    "nvae_search.fake_tensors": 3,
    "nvae_search.memory_trace": 3,
    "nvae_search.memory_cache": 3,
    "nvae_search.memory_step": 3,
    "nvae_search.bench": 3,
    "nvae_search.tracking": 3,
    # 4: search backends, repeats and the report
    "nvae_search.search": 4,
    # 5: the command line
    "nvae_search.cli": 5,
    "nvae_search.__main__": 5,
}


def floor_of(module: str) -> int | None:
    """The floor of a package module (its longest listed prefix); None for one not listed."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        floor = FLOORS.get(".".join(parts[:end]))
        if floor is not None and (end == len(parts) or ".".join(parts[:end]) != "nvae_search"):
            return floor
    return None


def upward_imports(module_name: str, source: str, is_package: bool, known: set[str]) -> list[str]:
    """Imports of package modules on a higher floor than ``module_name`` (function-local ones included)."""
    own = floor_of(module_name)
    out = []
    for imp in imports_of(source, module_name, is_package):
        target = imp.module
        # A module's own packages are imported before it anyway (`from . import x` names one of them).
        if imp.type_only or target not in known or module_name.startswith(f"{target}.") or target == module_name:
            continue
        floor = floor_of(target)
        if own is not None and floor is not None and floor > own:
            out.append(f"{module_name} (floor {own}):{imp.line} imports {target} (floor {floor})")
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
def _package_sources() -> tuple[list[tuple[str, str, bool]], set[str]]:
    modules = [(name, path.read_text(encoding="utf-8"), pkg) for name, path, pkg in package_modules()]
    return modules, {name for name, _, _ in modules}


def test_every_module_has_a_floor() -> None:
    unlisted = [name for name, _, _ in package_modules() if floor_of(name) is None]
    assert not unlisted, f"add these modules to FLOORS: {unlisted}"
    assert len(set(FLOORS.values())) <= 6


def test_every_import_of_the_package_names_an_existing_module() -> None:
    """A function-local import of a moved module fails only when the function runs: catch it here."""
    modules, known = _package_sources()
    missing = [
        f"{name}:{imp.line} imports {imp.module}"
        for name, source, pkg in modules
        for imp in imports_of(source, name, pkg)
        if imp.module.startswith("nvae_search") and not imp.maybe_attribute and imp.module not in known
    ]
    assert not missing, "\n".join(missing)


def test_every_import_points_to_its_own_floor_or_lower() -> None:
    modules, known = _package_sources()
    upward = [v for name, source, pkg in modules for v in upward_imports(name, source, pkg, known)]
    assert not upward, "\n".join(upward)


def _reachable(start: str) -> set[str]:
    """Package modules that importing ``start`` may import, at once or later in a function (not TYPE_CHECKING)."""
    modules, _ = _package_sources()
    sources = {name: (source, pkg) for name, source, pkg in modules}
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in sources:
            continue
        seen.add(name)
        todo += [i.module for i in imports_of(sources[name][0], name, sources[name][1]) if not i.type_only]
    return seen


def test_the_report_reaches_neither_training_nor_a_search_backend() -> None:
    reached = _reachable("nvae_search.search.report")
    forbidden = {"nvae_search.train", "nvae_search.search.runner", "nvae_search.search.ray_backend"}
    forbidden |= {"nvae_search.search.repeats", "nvae_search.distributed"}
    assert not reached & forbidden, sorted(reached & forbidden)


MAX_MODULE_LINES = 500  # issue 12's rooms: a newcomer reads a module, or a class, in one sitting
MAX_CLASS_LINES = 250


def test_no_module_or_class_outgrows_its_room() -> None:
    too_big = []
    for name, path, _pkg in package_modules():
        source = path.read_text(encoding="utf-8")
        if (lines := len(source.splitlines())) > MAX_MODULE_LINES:
            too_big.append(f"module {name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and (size := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES:
                too_big.append(f"class {name}.{node.name}: {size} lines")
    assert not too_big, "\n".join(too_big)


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
        "assert set(nvae_search.__all__) == {'Recipe', 'Space', 'build_model', 'evaluate', 'load_recipe', 'load_run',"
        " 'load_space', 'report', 'sample', 'search', 'train'}\n"
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
        ("nvae_search.cli.run_commands", "def f():\n    from ..model.nvae import NVAE\n", "the CLI parses"),
    ],
)
def test_checker_flags_a_synthetic_violation(module: str, source: str, fragment: str) -> None:
    is_package = module == "nvae_search.search"
    found = violations(module, source, is_package)
    assert any(fragment in v for v in found), found


@pytest.mark.parametrize(
    ("module", "source", "upward"),
    [
        ("nvae_search.data", "def f():\n    from .train import pick_device\n", True),  # function-local counts too
        ("nvae_search.search.report", "from .runner import run_trial\n", False),  # same floor
        ("nvae_search.tracking", "def f():\n    from .search.runner import TRIALS_DIR\n", True),
        ("nvae_search.model.cells", "from .builder import build_model\n", True),
        ("nvae_search.checkpoint", "if TYPE_CHECKING:\n    from .train import RunSummary\n", False),
        ("nvae_search.cli.common", "from ..search.report import build_report\n", False),
    ],
)
def test_floor_checker_on_synthetic_imports(module: str, source: str, upward: bool) -> None:
    _, known = _package_sources()
    assert bool(upward_imports(module, source, False, known)) is upward


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("nvae_search.model.builder", "from ..schema import ModelConfig\n"),
        ("nvae_search.search.tune", "def run():\n    import optuna\n    from ray import tune\n"),
        ("nvae_search.search.compile", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import optuna\n"),
        ("nvae_search.__main__", "from nvae_search.cli import main\n"),
        ("nvae_search.cli.run_commands", "from .common import app\n"),
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
