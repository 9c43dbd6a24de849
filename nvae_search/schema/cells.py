"""Cell ops of the recipe schema: the op models (derived from the op table), the official presets, the cell roles.

Torch-free, like the whole schema package.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from .ops import ACTIVATION_NAMES, op_names

__all__ = ["ARCH_PRESETS", "CELL_ROLES", "CellsConfig", "MBConvOp", "Op", "PresetName", "ResOp", "Strict"]


class Strict(BaseModel):
    """Unknown keys are errors and validated trees are frozen: the base of every config model."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# Literal[tuple] is Literal[*tuple]: the names come from the op table, in its order.
ResOpName = Literal[op_names("act_conv")]  # type: ignore[valid-type]
MBConvOpName = Literal[op_names("inverted_residual")]  # type: ignore[valid-type]
Activation = Literal[ACTIVATION_NAMES]  # type: ignore[valid-type]


def _odd(k: int) -> int:
    if k % 2 == 0:
        raise ValueError(f"kernel must be odd, got {k}")
    return k


OddKernel = Annotated[int, AfterValidator(_odd)]


class ResOp(Strict):
    """A conv op with its own activation: ``res_bnswish`` = BN → Swish → conv (weight-normed)."""

    type: ResOpName
    kernel: OddKernel = Field(3, ge=1, le=15, description="Kernel size of the conv (odd).")


class MBConvOp(Strict):
    """Inverted residual: BN → 1×1 expand → BN-act → k×k grouped conv → BN-act → 1×1 project → BN."""

    type: MBConvOpName
    expansion: float = Field(6.0, gt=0, le=16, description="Hidden width = round(C_in × expansion).")
    kernel: OddKernel = Field(5, ge=1, le=15, description="Kernel size of the grouped conv (odd).")
    groups: int = Field(0, ge=0, description="Groups of the k×k conv; 0 = depthwise.")
    activation: Activation = "swish"


Op = Annotated[ResOp | MBConvOp, Field(discriminator="type")]


def _op_from_shorthand(value: Any) -> Any:
    return {"type": value} if isinstance(value, str) else value


CELL_ROLES = (
    "normal_pre",
    "down_pre",
    "normal_enc",
    "down_enc",
    "normal_dec",
    "up_dec",
    "normal_post",
    "up_post",
)

_BNSWISH = {"type": "res_bnswish"}
_BNSWISH5 = {"type": "res_bnswish5"}
_E6K5 = {"type": "mbconv", "expansion": 6, "kernel": 5, "groups": 0}
_E3K5 = {"type": "mbconv", "expansion": 3, "kernel": 5, "groups": 0}
_E3K5G8 = {"type": "mbconv", "expansion": 3, "kernel": 5, "groups": 8}
_E6K11 = {"type": "mbconv", "expansion": 6, "kernel": 11, "groups": 0}
_E6K9 = {"type": "mbconv", "expansion": 6, "kernel": 9, "groups": 0}
_E3K9 = {"type": "mbconv", "expansion": 3, "kernel": 9, "groups": 0}


def _preset(
    enc: list[dict[str, Any]], dec: list[dict[str, Any]], pre: list[dict[str, Any]], post: list[dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    return {
        "normal_enc": enc,
        "down_enc": enc,
        "normal_pre": pre,
        "down_pre": pre,
        "normal_dec": dec,
        "up_dec": dec,
        "normal_post": post,
        "up_post": post,
    }


def _uniform(op: str) -> dict[str, list[dict[str, Any]]]:
    ops = [{"type": op}, {"type": op}]
    return _preset(ops, ops, ops, ops)


# The official `arch_instance` table, expressed as op lists per cell role.
ARCH_PRESETS: dict[str, dict[str, list[dict[str, Any]]]] = {
    "res_mbconv": _preset([_BNSWISH, _BNSWISH], [_E6K5], [_BNSWISH, _BNSWISH], [_E3K5]),
    "res_elu": _uniform("res_elu"),
    "res_bnelu": _uniform("res_bnelu"),
    "res_bnswish": _uniform("res_bnswish"),
    "mbconv_sep": _preset([_E6K5], [_E6K5], [_E3K5], [_E3K5]),
    "mbconv_sep11": _preset([_E6K11], [_E6K11], [_E3K5], [_E3K5]),
    "res53_mbconv": _preset([_BNSWISH5, _BNSWISH], [_E6K5], [_BNSWISH5, _BNSWISH], [_E3K5]),
    "res35_mbconv": _preset([_BNSWISH, _BNSWISH5], [_E6K5], [_BNSWISH, _BNSWISH5], [_E3K5]),
    "res55_mbconv": _preset([_BNSWISH5, _BNSWISH5], [_E6K5], [_BNSWISH5, _BNSWISH5], [_E3K5]),
    "mbconv_res": _preset([_E6K5], [_BNSWISH, _BNSWISH], [_E3K5], [_BNSWISH, _BNSWISH]),
    "mbconv_den": _preset([_E6K5], [_E6K5], [_E3K5G8], [_E3K5G8]),
    # Broken in the official code (its k9 ops are missing from OPS); here the ops exist, so it works.
    "res_mbconv9": _preset([_BNSWISH, _BNSWISH], [_E6K9], [_BNSWISH, _BNSWISH], [_E3K9]),
}
PresetName = Literal[tuple(ARCH_PRESETS)]  # type: ignore[valid-type]


OpList = Annotated[tuple[Op, ...], Field(min_length=1)]


class CellsConfig(Strict):
    """The op list of each of the 8 cell roles. After validation every role is filled in."""

    normal_pre: OpList
    down_pre: OpList
    normal_enc: OpList
    down_enc: OpList
    normal_dec: OpList
    up_dec: OpList
    normal_post: OpList
    up_post: OpList

    @field_validator(*CELL_ROLES, mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [_op_from_shorthand(v) for v in value]
        return value
