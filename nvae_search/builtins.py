"""The recipes and search spaces shipped with the package, found by name (``cpu/tiny``, ``quickstart``).

In a source checkout they are the top-level ``recipes/`` and ``spaces/`` folders; in an installed wheel the same
files live under ``nvae_search/_builtin/`` (the build maps those folders there, see setup.py), so the relative
``base_recipe: ../recipes/cpu/tiny.yaml`` of a shipped space resolves in both layouts. Torch-free.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Literal

Kind = Literal["recipes", "spaces"]
KINDS: tuple[Kind, ...] = ("recipes", "spaces")
_SUFFIX = ".yaml"
# `../recipes/cpu/tiny.yaml`, `../../recipes/paper/mnist.yaml`: how shipped spaces name their base recipe
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!al\.)\s+(?=[A-Z0-9])")  # not after "et al."
_CLAUSE_END = re.compile(r"[:;]\s")
_SHIPPED_RECIPE_REF = re.compile(r"^(?:\.\./)*recipes/(?P<name>[\w./-]+)\.ya?ml$")


@dataclass(frozen=True)
class Builtin:
    kind: Kind
    name: str  # `cpu/tiny`: the path below the kind's folder, without .yaml
    path: Path
    description: str


def builtin_root(kind: Kind) -> Path:
    """The folder holding the shipped files of one kind (wheel layout first, then the source checkout)."""
    installed = Path(str(files("nvae_search").joinpath("_builtin", kind)))
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / kind


def describe(path: Path, limit: int = 100) -> str:
    """The first sentence of the file's leading comment (every shipped file starts with one), or its first clause
    when the sentence is longer than ``limit`` characters."""
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        body = line.strip().removeprefix("#")
        # stop at the end of the comment, a blank comment line, or an indented block (e.g. the official flags)
        if not line.strip().startswith("#") or not body.strip() or body.startswith("   "):
            break
        lines.append(body.strip())
    sentence = _SENTENCE_END.split(" ".join(lines), maxsplit=1)[0]
    if len(sentence) > limit:
        sentence = _CLAUSE_END.split(sentence, maxsplit=1)[0]
        if sentence.count("(") > sentence.count(")"):  # cut inside a parenthesis: leave the parenthesis out
            sentence = sentence[: sentence.rindex("(")]
    return sentence.rstrip(":;., ")


def list_builtins(kind: Kind) -> list[Builtin]:
    root = builtin_root(kind)
    if not root.is_dir():
        return []
    found = sorted(root.rglob(f"*{_SUFFIX}"))
    return [Builtin(kind, p.relative_to(root).with_suffix("").as_posix(), p, describe(p)) for p in found]


def find_builtin(name: str, kind: Kind) -> Path | None:
    """The shipped file called ``name`` (``cpu/tiny`` or ``cpu/tiny.yaml``), or None."""
    stem = name.removesuffix(_SUFFIX)
    if not stem or stem.startswith(("/", ".")) or ".." in stem.split("/"):
        return None
    path = builtin_root(kind) / f"{stem}{_SUFFIX}"
    return path if path.is_file() else None


def resolve_config(ref: str | os.PathLike[str], kind: Kind) -> Path:
    """A path the user gave, or a built-in name: an existing file wins, then a shipped file of that name.

    Unknown names come back unchanged, so that the loader reports "file not found" for the path as typed.
    """
    path = Path(ref)
    if path.exists():
        return path
    return find_builtin(str(ref), kind) or path


def shipped_base_recipe(ref: str) -> Path | None:
    """A space's ``base_recipe`` that names a shipped recipe, by name (``cpu/tiny``) or by the relative path the
    shipped spaces use (``../recipes/cpu/tiny.yaml``), for a space copied out of the package."""
    match = _SHIPPED_RECIPE_REF.match(ref.replace(os.sep, "/"))
    return find_builtin(match["name"] if match else ref, "recipes")


def kind_of(name: str) -> Kind | None:
    """Which kind a shipped name belongs to (recipes first), or None."""
    return next((k for k in KINDS if find_builtin(name, k) is not None), None)


def copy_builtin(name: str, dest: Path, kind: Kind | None = None) -> Path:
    """Copy a shipped file to ``dest`` (a file path, or an existing folder to copy into); never overwrites."""
    kind = kind or kind_of(name)
    source = find_builtin(name, kind) if kind else None
    if source is None:
        raise FileNotFoundError(f"no built-in recipe or space called {name!r} (see `nvae-search ls`)")
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
