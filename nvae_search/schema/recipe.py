"""The recipe tree: one frozen, validated pydantic model per recipe file, and its loading.

This module must import without torch (a layering test enforces it). Network code never sees these
classes: ``nvae_search.model.builder`` is the only place where the schema meets torch.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ..config_io import ConfigError, dump_yaml, pydantic_problems, read_yaml_file, set_dotted
from .cells import ARCH_PRESETS, CELL_ROLES, CellsConfig, MBConvOp, PresetName, Strict
from .data import DataConfig

__all__ = [
    "PAPER_GLOBAL_BATCH",
    "PAPER_PROCESSES",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "Recipe",
    "TrainConfig",
    "dump_recipe",
    "load_recipe",
    "paper_batch_warning",
    "recipe_from_dict",
    "recipe_json_schema",
]


# --------------------------------------------------------------------------------------- sub-configs
class BatchNormConfig(Strict):
    momentum: float = Field(0.05, gt=0, le=1, description="Running-statistics momentum (PyTorch convention).")
    eps: float = Field(1e-5, gt=0)


class NormConfig(Strict):
    batch_norm: BatchNormConfig = BatchNormConfig()
    weight_norm: bool = Field(True, description="Weight normalisation (with a log-scale) on every non-MBConv conv.")


class OutputConfig(Strict):
    distribution: Literal["bernoulli", "dmol", "normal"] = "bernoulli"
    num_mixtures: int = Field(10, ge=1, le=100, description="Mixture components of the discretized logistic mixture.")
    num_x_bits: int = Field(8, ge=1, le=8, description="Bit depth of the data (5 for CelebA-HQ / FFHQ).")
    crop: int = Field(0, ge=0, description="Pixels cropped on each side before the likelihood (2 for MNIST 28→32).")


class LossConfig(Strict):
    kl_anneal_portion: float = Field(0.3, ge=0, le=1, description="Fraction of training over which β rises to 1.")
    kl_const_portion: float = Field(1e-4, ge=0, le=1, description="Fraction of training held at kl_const_coeff.")
    kl_const_coeff: float = Field(1e-4, ge=0, le=1)
    kl_balance: bool = Field(True, description="Balance the KL of the groups during warm-up.")
    kl_balance_rule: Literal["square", "linear", "sqrt", "equal"] = "square"
    spectral_coeff: float = Field(0.0, ge=0, description="λ: spectral regularisation coefficient (weight_decay_norm).")
    spectral_anneal: bool = Field(False, description="Anneal λ log-linearly from spectral_init, driven by β.")
    spectral_init: float = Field(10.0, gt=0, description="Starting λ when annealing (weight_decay_norm_init).")
    spectral_power_iters: int = Field(4, ge=1, le=100, description="Power iterations per step (10× on the first).")
    bn_regularization: bool = Field(True, description="Add λ·Σ max|γ| over affine BN layers.")


class NumericsConfig(Strict):
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="auto = the official setting: fp16 with a gradient scaler (2^10) on CUDA, fp32 on CPU."
    )
    checkpointing: Literal["off", "cell"] = "off"

    def resolved_precision(self, device_type: str) -> Literal["fp32", "bf16", "fp16"]:
        """The precision a run on this device type uses (``auto`` resolved; the recipe itself keeps ``auto``)."""
        if self.precision == "auto":
            return "fp16" if device_type == "cuda" else "fp32"
        return self.precision


# --------------------------------------------------------------------------------------------- model
class ModelConfig(Strict):
    """Everything that shapes the network or its loss. Names follow the official flags where one exists."""

    resolution: int = Field(32, ge=4, le=1024, description="Input height and width (square).")
    input_channels: int = Field(1, ge=1, le=4)
    preset: PresetName = Field("res_mbconv", description="The official arch_instance filling in the cell roles.")
    cells: CellsConfig = Field(description="Per-role op lists; roles left out come from the preset.")
    use_se: bool = True
    num_channels_enc: int | tuple[int, ...] = Field(
        32, description="Base width (doubling at each down-sample), or a width per resolution level, finest first."
    )
    num_channels_dec: int | tuple[int, ...] = 32
    num_preprocess_blocks: int = Field(2, ge=0, le=8)
    num_preprocess_cells: int = Field(3, ge=1, le=16)
    num_postprocess_blocks: int = Field(2, ge=0, le=8)
    num_postprocess_cells: int = Field(3, ge=1, le=16)
    num_latent_scales: int = Field(1, ge=1, le=8)
    num_groups_per_scale: int | tuple[int, ...] = Field(
        10, description="Groups at the finest latent scale (halved per scale with ada_groups), or one count per scale."
    )
    ada_groups: bool = False
    min_groups_per_scale: int = Field(1, ge=1)
    num_latent_per_group: int = Field(20, ge=1, le=512)
    num_cell_per_cond_enc: int = Field(2, ge=0, le=16)
    num_cell_per_cond_dec: int = Field(2, ge=0, le=16)
    res_dist: bool = Field(True, description="Residual Normal posterior relative to the prior.")
    num_nf: int = Field(0, ge=0, le=8, description="Paired autoregressive flow cells per latent group.")
    norm: NormConfig = NormConfig()
    output: OutputConfig = OutputConfig()
    loss: LossConfig = LossConfig()
    numerics: NumericsConfig = NumericsConfig()

    @model_validator(mode="before")
    @classmethod
    def _fill_cells_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "res_mbconv")
        if preset not in ARCH_PRESETS:
            preset = "res_mbconv"  # the Literal check reports the bad name; fill the roles so it is the only error
        cells = data.get("cells") or {}
        if not isinstance(cells, dict):
            return data
        merged = {role: ARCH_PRESETS[preset][role] for role in CELL_ROLES}
        merged.update(cells)
        return {**data, "cells": merged}

    @field_validator("num_channels_enc", "num_channels_dec", "num_groups_per_scale")
    @classmethod
    def _positive(cls, value: int | tuple[int, ...]) -> int | tuple[int, ...]:
        values = (value,) if isinstance(value, int) else value
        if not values or any(v < 1 for v in values):
            raise ValueError("must be a positive integer or a non-empty list of positive integers")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ModelConfig:
        levels = self.num_preprocess_blocks + self.num_latent_scales
        factor = 2 ** (levels - 1)
        if self.resolution % factor:
            raise ValueError(
                f"resolution {self.resolution} must be divisible by 2^(num_preprocess_blocks + num_latent_scales - 1)"
                f" = {factor}"
            )
        if self.num_postprocess_blocks != self.num_preprocess_blocks:
            raise ValueError(
                f"num_postprocess_blocks ({self.num_postprocess_blocks}) must equal num_preprocess_blocks "
                f"({self.num_preprocess_blocks}) so that the decoder returns to the input resolution"
            )
        for name in ("num_channels_enc", "num_channels_dec"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != levels:
                raise ValueError(
                    f"{name} lists {len(value)} widths; it needs one per resolution level "
                    f"(num_preprocess_blocks + num_latent_scales = {levels})"
                )
        groups = self.num_groups_per_scale
        if isinstance(groups, tuple):
            if len(groups) != self.num_latent_scales:
                raise ValueError(
                    f"num_groups_per_scale lists {len(groups)} counts but num_latent_scales is {self.num_latent_scales}"
                )
            if self.ada_groups:
                raise ValueError("ada_groups must be false when num_groups_per_scale is an explicit list")
        elif self.ada_groups and self.min_groups_per_scale > groups:
            raise ValueError(
                f"min_groups_per_scale ({self.min_groups_per_scale}) must be <= num_groups_per_scale ({groups})"
            )
        out = self.output
        if out.distribution == "dmol" and self.input_channels != 3:
            raise ValueError("output.distribution 'dmol' models RGB images: input_channels must be 3")
        if 2 * out.crop >= self.resolution:
            raise ValueError(f"output.crop {out.crop} leaves no pixels at resolution {self.resolution}")
        self._check_groups_in_ops()
        return self

    def _check_groups_in_ops(self) -> None:
        for role in CELL_ROLES:
            for i, op in enumerate(getattr(self.cells, role)):
                if isinstance(op, MBConvOp) and op.groups > 0:
                    for width in self._widths_for_role(role):
                        hidden = round(width * op.expansion)
                        if hidden % op.groups:
                            raise ValueError(
                                f"cells.{role}.{i}: groups={op.groups} does not divide the hidden width {hidden} "
                                f"(= round({width} × {op.expansion}))"
                            )

    def _widths_for_role(self, role: str) -> list[int]:
        enc, dec = self.widths_enc(), self.widths_dec()
        p = self.num_preprocess_blocks
        if role in ("normal_pre", "down_pre"):
            return enc[: p + 1]
        if role in ("normal_enc", "down_enc"):
            return enc[p:]
        if role in ("normal_dec", "up_dec"):
            return dec[p:]
        return dec[: p + 1]

    # --- derived quantities shared by the builder, the CLI summary and the trainer -----------------
    def groups_per_scale(self) -> list[int]:
        """Groups per latent scale in encoder order (finest first), as the official helper yields them."""
        if isinstance(self.num_groups_per_scale, tuple):
            return list(self.num_groups_per_scale)
        n, out = self.num_groups_per_scale, []
        for _ in range(self.num_latent_scales):
            out.append(n)
            if self.ada_groups:
                n = max(self.min_groups_per_scale, n // 2)
        return out

    def _widths(self, base: int | tuple[int, ...]) -> list[int]:
        levels = self.num_preprocess_blocks + self.num_latent_scales
        if isinstance(base, tuple):
            return list(base)
        return [base * 2**i for i in range(levels)]

    def widths_enc(self) -> list[int]:
        """Encoder width at each resolution level, finest (input resolution) first."""
        return self._widths(self.num_channels_enc)

    def widths_dec(self) -> list[int]:
        return self._widths(self.num_channels_dec)

    def latent_resolutions(self) -> list[int]:
        p = self.num_preprocess_blocks
        return [self.resolution // 2 ** (p + s) for s in range(self.num_latent_scales)]

    def total_latent_dims(self) -> int:
        return sum(
            g * self.num_latent_per_group * r * r
            for g, r in zip(self.groups_per_scale(), self.latent_resolutions(), strict=True)
        )

    def data_dims(self) -> int:
        side = self.resolution - 2 * self.output.crop
        return self.input_channels * side * side


# ------------------------------------------------------------------------------------- train / eval
class TrainConfig(Strict):
    seed: int = 1
    batch_size: int = Field(200, ge=1, description="Per process; the global batch is batch_size × world size.")
    global_batch_size: int | None = Field(
        None, ge=1, description="When set: images per step over all processes; each takes global / world size."
    )
    epochs: int | None = Field(None, ge=1, description="Budget in epochs (the default when nothing is set: 200).")
    steps: int | None = Field(None, ge=1, description="Budget in optimizer steps.")
    minutes: float | None = Field(
        None,
        gt=0,
        description="Budget in minutes of training steps (data loading, logging and evaluation not counted). Alone, "
        "it is turned into a step count from the measured step time, revised through the first half of the run, "
        "and the cosine and KL schedules end with it; with `steps` or `epochs`, whichever comes first ends the run.",
    )
    learning_rate: float = Field(1e-2, gt=0)
    learning_rate_min: float = Field(1e-4, ge=0)
    weight_decay: float = Field(3e-4, ge=0, description="Coupled L2 inside Adamax, on every parameter.")
    adamax_eps: float = Field(1e-3, gt=0)
    warmup_epochs: float = Field(5, ge=0, description="Linear LR warm-up length, counted per iteration.")
    cosine_per: Literal["epoch", "step"] = Field(
        "epoch", description="Cosine decay stepped per epoch (the paper) or per step (short budgets)."
    )
    grad_clip: float | None = Field(None, gt=0, description="Clip the global gradient norm (off, like the paper).")
    skip_threshold: float | None = Field(None, gt=0, description="Skip steps whose gradient norm exceeds this.")
    nonfinite: Literal["skip", "stop", "raise"] = Field(
        "stop", description="What a non-finite loss or gradient does: skip the step, stop as diverged, or raise."
    )
    max_skipped_steps: int = Field(20, ge=1, description="With nonfinite=skip, diverged after this many in a row.")
    spike_factor: float = Field(
        3.0,
        gt=1,
        description="A loss above its running median by more than (factor − 1) × |median| (for positive losses: above "
        "factor × the median) counts as a spike.",
    )
    explode_factor: float | None = Field(
        2.0,
        gt=1,
        description="The run stops as exploded at a logged NELBO above factor × the lowest NELBO logged before it "
        "(healthy runs stay within 1.2×; null: never).",
    )
    explode_patience: int = Field(
        2,
        ge=1,
        description="Logged NELBOs in a row above explode_factor × the lowest before the run stops as exploded: 2 "
        "spares runs that spike once and recover (common at the first steps without warm-up); a run still blown "
        "up at its end (last NELBO above its first, or above the rule) ends exploded anyway.",
    )
    collapse_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="A run that trained to its end is collapsed when fewer than this fraction of its latent units "
        "are active (KL > 0.1 nats) at its last log step; it keeps its objective values.",
    )
    spiky_fraction: float = Field(
        0.02,
        ge=0,
        description="A run that trained to its end is spiky when more than this fraction of its steps were loss "
        "spikes (see spike_factor); it keeps its objective values. Collapsed takes precedence.",
    )
    ema_decay: float | None = Field(None, gt=0, lt=1, description="EMA of weights used for evaluation.")
    ema_bn_batches: int = Field(
        100,
        ge=0,
        description="Training batches that re-estimate the EMA copy's batch-norm statistics before it is evaluated "
        "or sampled (averaged statistics do not fit averaged weights); 0 keeps the averaged ones.",
    )
    log_every: int = Field(10, ge=1)
    eval_every_epochs: int | None = Field(None, ge=1)
    checkpoint_every_steps: int = Field(200, ge=1)
    checkpoint_every_minutes: float = Field(10.0, gt=0)
    image_every_steps: int = Field(500, ge=1)
    eval_at_end: bool = Field(True, description="Evaluate NELBO and IW NLL on the test split when the run ends.")
    eval_iw_samples: int = Field(10, ge=1, description="Importance samples of the end-of-run evaluation.")
    eval_images: int | None = Field(1000, ge=1, description="Test images of the end-of-run evaluation (null = all).")
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _one_batch(cls, data: Any) -> Any:
        # With a global batch, batch_size mirrors it (the batch of a single process), so that a resolved recipe
        # reloads; a different batch_size would be silently ignored, so it is refused.
        if not isinstance(data, dict) or data.get("global_batch_size") is None:
            return data
        glob, per = data["global_batch_size"], data.get("batch_size")
        if per is not None and per != glob:
            raise ValueError(
                f"train.batch_size ({per}) and train.global_batch_size ({glob}) are both set: give the global batch "
                "alone (each process takes global / processes), or set global_batch_size to null"
            )
        return {**data, "batch_size": glob}

    @model_validator(mode="after")
    def _budget(self) -> TrainConfig:
        if self.learning_rate_min > self.learning_rate:
            raise ValueError("learning_rate_min must not exceed learning_rate")
        if self.epochs is not None and self.steps is not None:
            raise ValueError("set either train.epochs or train.steps, not both (minutes may be combined with either)")
        return self

    def per_process_batch(self, world: int) -> int:
        """The batch of one process among ``world``: global_batch_size / world when set, else batch_size."""
        if self.global_batch_size is None:
            return self.batch_size
        if self.global_batch_size % world:
            raise ValueError(
                f"train.global_batch_size {self.global_batch_size} is not divisible by the {world} processes"
            )
        return self.global_batch_size // world


# The paper's global batch per paper recipe (NVAE_SPEC §3-4: per-GPU batch × GPUs of the README commands).
PAPER_GLOBAL_BATCH: dict[str, int] = {
    "paper-mnist": 400,
    "paper-cifar10": 256,
    "paper-celeba64": 128,
    "paper-imagenet32": 576,
    "paper-celebahq256": 96,
    "paper-ffhq256": 96,
}
# The processes (GPUs) the paper trained each recipe on: its per-GPU batch is the global batch over these.
PAPER_PROCESSES: dict[str, int] = {
    "paper-mnist": 2,
    "paper-cifar10": 8,
    "paper-celeba64": 8,
    "paper-imagenet32": 24,
    "paper-celebahq256": 24,
    "paper-ffhq256": 24,
}


def paper_batch_warning(recipe: Recipe, world: int) -> str | None:
    """A warning when a paper recipe runs at a global batch other than the paper's, else None."""
    paper = PAPER_GLOBAL_BATCH.get(recipe.name)
    if paper is None:
        return None
    actual = recipe.train.per_process_batch(world) * world
    if actual == paper:
        return None
    return (
        f"{recipe.name} runs at a global batch of {actual} ({world} process(es)); the paper trained at {paper}: "
        "results and schedules may differ from the paper's"
    )


class TrackingConfig(Strict):
    """Where runs are tracked besides their run directory (also ``--track`` on the command line)."""

    backend: Literal["none", "mlflow", "wandb"] = "none"
    uri: str | None = Field(
        None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db); W&B: host."
    )
    project: str | None = Field(None, description="MLflow experiment or W&B project (default: the study name).")


class EvalConfig(Strict):
    iw_samples: int = Field(1000, ge=1, description="Importance samples for the NLL.")
    batch_size: int = Field(16, ge=1, description="Images per batch during evaluation.")
    chunk: int = Field(64, ge=1, description="Importance samples per forward pass (memory bound).")
    split: Literal["test", "train"] = "test"
    temperature: float = Field(0.7, gt=0)
    readjust_bn_steps: int = Field(0, ge=0, description="Calls of sample() that re-estimate BN statistics.")
    num_samples: int = Field(64, ge=1)


class Recipe(Strict):
    name: str = Field("nvae", description="A short name for runs made from this recipe.")
    description: str = ""
    data: DataConfig = DataConfig()
    model: ModelConfig = Field(default_factory=lambda: ModelConfig.model_validate({}))
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _data_fits_model(self) -> Recipe:
        d, m = self.data, self.model
        grey = d.dataset in ("mnist", "binarized_mnist", "idx")
        if grey and m.input_channels != 1:
            raise ValueError(f"data.dataset '{d.dataset}' is grey-level: model.input_channels must be 1")
        if d.dataset == "cifar10" and m.input_channels != 3:
            raise ValueError("data.dataset 'cifar10' is RGB: model.input_channels must be 3")
        if grey and 28 + 2 * d.pad != m.resolution:
            raise ValueError(
                f"28×28 images padded by data.pad={d.pad} give {28 + 2 * d.pad}, but model.resolution is {m.resolution}"
            )
        if d.dataset == "cifar10" and m.resolution != 32:
            raise ValueError("CIFAR-10 images are 32×32: model.resolution must be 32")
        binary = d.dataset == "binarized_mnist" or (grey and d.binarize == "dynamic")
        if binary and m.output.distribution != "bernoulli":
            raise ValueError("binary data needs model.output.distribution 'bernoulli'")
        return self


# -------------------------------------------------------------------------------------------- loading
def recipe_from_dict(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(source, [("", f"expected a mapping at the top level, got {type(data).__name__}")])
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        from .space_checks import with_suggestions  # space_checks imports this module

        raise ConfigError(source, with_suggestions(Recipe, pydantic_problems(exc.errors()))) from None


def load_recipe(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, override (``{"model.use_se": False}``) and validate a recipe file."""
    data = read_yaml_file(path)
    if isinstance(data, dict):
        for key, value in (overrides or {}).items():
            try:
                set_dotted(data, key, value)
            except (TypeError, ValueError, IndexError, AttributeError):
                raise ConfigError(str(path), [(key, "cannot set this path in the recipe")]) from None
    return recipe_from_dict(data, str(path))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")


def dump_recipe(recipe: Recipe) -> str:
    return dump_yaml(recipe_to_dict(recipe))


def recipe_json_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()
