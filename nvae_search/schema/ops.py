"""The one table of cell ops: every op name a recipe may use, and what it is made of.

The recipe schema's op ``Literal``s, the YAML tags stripped from error paths and the builder's op specs are all
derived from :data:`OPS`; ``model/ops.py`` only maps a *kind* to its torch constructor. Adding an op that is a
variant of an existing kind is one line here; a new kind of block also adds its constructor in ``model/ops.py``.

A leaf module: it imports nothing from the package (``config_io`` reads it while the schema is being imported).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ACTIVATION_NAMES", "OPS", "OpInfo", "op_names"]

OpKind = Literal["act_conv", "inverted_residual"]
ACTIVATION_NAMES: tuple[str, ...] = ("swish", "elu", "relu")


@dataclass(frozen=True)
class OpInfo:
    """What an op name stands for. ``act_conv``: [BN →] activation → conv; ``inverted_residual``: MBConv, whose
    kernel, expansion, groups and activation come from the recipe."""

    kind: OpKind
    activation: str = "swish"
    dilation: int = 1
    batch_norm: bool = True
    data_init: bool = False  # data-dependent init of the conv (the official ELU cells)


OPS: dict[str, OpInfo] = {
    "res_bnswish": OpInfo("act_conv", activation="swish"),
    "res_bnswish5": OpInfo("act_conv", activation="swish", dilation=2),
    "res_elu": OpInfo("act_conv", activation="elu", batch_norm=False, data_init=True),
    "res_bnelu": OpInfo("act_conv", activation="elu"),
    "mbconv": OpInfo("inverted_residual"),
}


def op_names(kind: OpKind) -> tuple[str, ...]:
    """The op names of one kind, in table order (the order the JSON Schema lists them)."""
    return tuple(name for name, info in OPS.items() if info.kind == kind)
