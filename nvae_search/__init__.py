"""Declarative NVAE (Vahdat & Kautz, 2020) built from YAML recipes.

Public API::

    from nvae_search import load_recipe, build_model, train, evaluate

``import nvae_search`` does not import torch: ``Recipe`` and ``load_recipe`` come from the torch-free schema,
and ``build_model``, ``train`` and ``evaluate`` are imported on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .schema import Recipe, load_recipe

__all__ = ["Recipe", "build_model", "evaluate", "load_recipe", "train"]

# public name → (module, attribute), imported on first access
_LAZY: dict[str, tuple[str, str]] = {
    "build_model": ("nvae_search.model.builder", "build_model"),
    "train": ("nvae_search.train", "train"),
    "evaluate": ("nvae_search.evaluate", "evaluate"),
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
