"""The config schema: recipes (``recipe``), their cell ops (``cells``, from the one op table in ``ops``).

Torch-free (a layering test enforces it). ``from nvae_search.schema import Recipe, load_recipe, ...`` is the
import path the rest of the package uses; the submodules are an implementation detail.
"""

from __future__ import annotations

from .cells import ARCH_PRESETS, CELL_ROLES, CellsConfig, MBConvOp, Op, ResOp, Strict
from .ops import OPS, OpInfo
from .recipe import (
    PAPER_GLOBAL_BATCH,
    PAPER_PROCESSES,
    BatchNormConfig,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    NormConfig,
    NumericsConfig,
    OutputConfig,
    Recipe,
    TrackingConfig,
    TrainConfig,
    dump_recipe,
    load_recipe,
    paper_batch_warning,
    recipe_from_dict,
    recipe_json_schema,
    recipe_to_dict,
)

__all__ = [
    "ARCH_PRESETS",
    "CELL_ROLES",
    "OPS",
    "PAPER_GLOBAL_BATCH",
    "PAPER_PROCESSES",
    "BatchNormConfig",
    "CellsConfig",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "MBConvOp",
    "ModelConfig",
    "NormConfig",
    "NumericsConfig",
    "Op",
    "OpInfo",
    "OutputConfig",
    "Recipe",
    "ResOp",
    "Strict",
    "TrackingConfig",
    "TrainConfig",
    "dump_recipe",
    "load_recipe",
    "paper_batch_warning",
    "recipe_from_dict",
    "recipe_json_schema",
    "recipe_to_dict",
]
