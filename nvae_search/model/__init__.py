"""NVAE network modules. Only ``builder`` knows about the recipe schema."""

from .builder import build_model
from .nvae import NVAE, ForwardResult, NVAEArch

__all__ = ["NVAE", "ForwardResult", "NVAEArch", "build_model"]
