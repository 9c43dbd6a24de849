"""Declarative NVAE (Vahdat & Kautz, 2020) built from YAML recipes.

Public API, for notebooks and scripts::

    from nvae_search import load_recipe, build_model, train, evaluate, load_run, sample
    from nvae_search import load_space, search, report

``import nvae_search`` does not import torch: ``Recipe``, ``load_recipe``, ``Space`` and ``load_space`` come from the
torch-free schema, and the others are imported on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .schema import Recipe, load_recipe
from .spaces import Space, load_space

__all__ = [
    "Recipe",
    "Space",
    "build_model",
    "evaluate",
    "load_recipe",
    "load_run",
    "load_space",
    "report",
    "sample",
    "search",
    "train",
]

# public name → (module, attribute), imported on first access
_LAZY: dict[str, tuple[str, str]] = {
    "build_model": ("nvae_search.model.builder", "build_model"),
    "train": ("nvae_search.train", "train"),
    "evaluate": ("nvae_search.evaluate", "evaluate"),
    "load_run": ("nvae_search.runs", "load_run"),
    "sample": ("nvae_search.runs", "sample"),
    "search": ("nvae_search.search.api", "search"),
    "report": ("nvae_search.search.report", "build_report"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _PublicAPI(types.ModuleType):
    """Keeps ``nvae_search.train`` / ``.evaluate`` the functions, not the submodules of the same name.

    Importing a submodule binds it as an attribute of its package; without this guard, importing
    ``nvae_search.train`` anywhere would make ``from nvae_search import train`` return the module.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PublicAPI
