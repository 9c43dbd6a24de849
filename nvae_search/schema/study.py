"""The sections of a search-space file around its tree: study, budget, repeats, sampler, pruner, Ray settings and
constraints. Validated with the file; used by the search backends. Torch-free and Optuna-free.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from .cells import Strict

__all__ = [
    "METRICS",
    "Budget",
    "Constraints",
    "Metric",
    "Objective",
    "PrunerConfig",
    "RayConfig",
    "Repeats",
    "SamplerConfig",
    "SeedAggregate",
    "StudyConfig",
    "TPESamplerConfig",
    "storage_form_problem",
]

Metric = Literal["nll", "nelbo", "train_nelbo", "params", "step_time", "peak_memory"]
METRICS: tuple[str, ...] = get_args(Metric)


def storage_form_problem(storage: str) -> str | None:
    """Why ``storage`` (the space's ``storage:`` key or ``--storage``) is not a storage URL; None when it is one."""
    if storage.startswith("journal:") and storage.removeprefix("journal:").strip():
        return None
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", storage):
        return None
    return "expected an Optuna storage URL (sqlite:///study.db, postgresql://...) or journal:PATH"


class Objective(Strict):
    metric: Metric = Field(
        description="nll: importance-weighted NLL at the end of the trial; nelbo: evaluation NELBO; train_nelbo; "
        "params: parameter count; step_time: seconds per step; peak_memory: MiB (CUDA allocations, else peak RSS)."
    )
    direction: Literal["minimize", "maximize"] = "minimize"


class SeedAggregate(Strict):
    """Each trial trains its configuration on several seeds; its objective values aggregate them."""

    seeds: int = Field(ge=2, le=100, description="Seeds per trial: train.seed s, s+1, ... from the trial's seed.")
    how: Literal["mean", "worst", "mean_plus_std"] = Field(
        "mean",
        description="mean; worst (the highest of a minimised objective, the lowest of a maximised one); "
        "mean_plus_std (mean + k x std for a minimised objective, mean - k x std for a maximised one).",
    )
    k: float = Field(1.0, ge=0, description="The std multiple of mean_plus_std.")


class Promote(Strict):
    """Successive halving run as studies: this study first trains the best configurations of an earlier rung."""

    study: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        max_length=100,
        description="The earlier rung's study name: its folder lies beside this study's (<root>/<name>/).",
    )
    top_k: int = Field(
        ge=1, description="How many of its best configurations (by its first objective) this study trains first."
    )


class StudyConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100, description="Folder runs/<name>/.")
    objectives: list[Objective] = Field(
        default_factory=lambda: [Objective(metric="nelbo", direction="minimize")],
        min_length=1,
        description="One entry: single-objective; two or more: a Pareto search.",
    )
    n_trials: int = Field(ge=1)
    timeout_minutes: float | None = Field(None, gt=0)
    seed: int = 0
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list, description="Warm-start points {parameter name: value}; unset parameters are sampled."
    )

    promote: Promote | None = Field(
        None,
        description="Enqueue the best top_k configurations of an earlier study (a shorter-budget rung over the same "
        "parameters) before `enqueue`; the parameters must be this space's.",
    )
    aggregate: SeedAggregate | None = Field(
        None,
        description="Train each trial's configuration on several seeds (sub-runs seed_<s>/ of the trial) and "
        "aggregate its objectives over them; a seed that diverges or explodes fails the whole configuration.",
    )

    @field_validator("objectives")
    @classmethod
    def _unique_metrics(cls, objectives: list[Objective]) -> list[Objective]:
        metrics = [o.metric for o in objectives]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"each metric may appear once, got {metrics}")
        return objectives

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1


class Budget(Strict):
    """The training budget of one trial; it replaces the recipe's train.steps / train.epochs / train.minutes."""

    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    minutes: float | None = Field(None, gt=0)
    eval_iw_samples: int = Field(10, ge=1, description="Importance samples of the end-of-trial evaluation.")
    eval_images: int | None = Field(
        None, ge=1, description="Evaluate on the first N test images; null keeps the recipe's train.eval_images."
    )
    report_every_steps: int = Field(50, ge=1, description="Steps between intermediate values sent to the pruner.")
    keep_checkpoints: Literal["all", "best", "none"] = Field(
        "best",
        description="Which trials keep checkpoint.pt once they end: all, the best keep_top_k by the first objective, "
        "or none. Metrics, summaries, resolved recipes and params stay for every trial.",
    )
    keep_top_k: int | None = Field(
        None, ge=1, description="Trials whose checkpoints `best` keeps; null: repeats.top_k, at least 1."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Budget:
        given = [k for k in ("steps", "epochs", "minutes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of steps, epochs or minutes (got {', '.join(given) or 'none'})")
        if self.keep_top_k is not None and self.keep_checkpoints != "best":
            raise ValueError(f"keep_top_k has no effect with keep_checkpoints: {self.keep_checkpoints}")
        return self


class Repeats(Strict):
    top_k: int = Field(0, ge=0, description="Re-run the best k configurations on each of `seeds`.")
    seeds: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Repeats:
        if self.top_k and not self.seeds:
            raise ValueError("top_k > 0 needs at least one seed to re-run on")
        if self.seeds and not self.top_k:
            raise ValueError("seeds have no effect while top_k is 0")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be unique, got {self.seeds}")
        return self


class TPESamplerConfig(Strict):
    type: Literal["tpe"]
    n_startup_trials: int = Field(10, ge=0)
    multivariate: bool = True
    group: bool = Field(False, description="Model each branch's parameters jointly (Optuna: experimental).")

    @model_validator(mode="after")
    def _group_needs_multivariate(self) -> TPESamplerConfig:
        if self.group and not self.multivariate:
            raise ValueError("group needs multivariate: true")
        return self


class RandomSamplerConfig(Strict):
    type: Literal["random"]


class GridSamplerConfig(Strict):
    type: Literal["grid"]


class CmaEsSamplerConfig(Strict):
    type: Literal["cmaes"]
    n_startup_trials: int = Field(1, ge=0)


class NSGA2SamplerConfig(Strict):
    type: Literal["nsga2"]
    population_size: int = Field(50, ge=2)


SamplerConfig = Annotated[
    TPESamplerConfig | RandomSamplerConfig | GridSamplerConfig | CmaEsSamplerConfig | NSGA2SamplerConfig,
    Field(discriminator="type"),
]


class NoPrunerConfig(Strict):
    type: Literal["none"]


class MedianPrunerConfig(Strict):
    type: Literal["median"]
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(0, ge=0, description="Training steps before pruning may start.")
    interval_steps: int = Field(1, ge=1)


class SuccessiveHalvingPrunerConfig(Strict):
    type: Literal["successive_halving"]
    min_resource: int | Literal["auto"] = "auto"
    reduction_factor: int = Field(4, ge=2)


class HyperbandPrunerConfig(Strict):
    type: Literal["hyperband"]
    min_resource: int = Field(1, ge=1, description="In training steps, the unit of trial.report.")
    max_resource: int | Literal["auto"] = "auto"
    reduction_factor: int = Field(3, ge=2)

    @model_validator(mode="after")
    def _range(self) -> HyperbandPrunerConfig:
        if isinstance(self.max_resource, int) and self.max_resource <= self.min_resource:
            raise ValueError(f"max_resource ({self.max_resource}) must exceed min_resource ({self.min_resource})")
        return self


class ThresholdPrunerConfig(Strict):
    type: Literal["threshold"]
    upper: float
    lower: float | None = None
    n_warmup_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _range(self) -> ThresholdPrunerConfig:
        if self.lower is not None and self.lower >= self.upper:
            raise ValueError(f"lower ({self.lower}) must be below upper ({self.upper})")
        return self


class InstabilityPrunerConfig(Strict):
    """Stops a trial whose reports show it breaking: ``patience`` consecutive reports with the gradient norm above
    grad_factor x its median over the first baseline_steps steps, or the NELBO above nelbo_factor x its lowest
    so far (or a non-finite NELBO or gradient norm). Needs no other trials; `nvae-search replay-pruner STUDY`
    measures it on a finished study."""

    type: Literal["instability"]
    grad_factor: float | None = Field(
        10.0, gt=1, description="Gradient norm above this x its early median is unstable (null: off)."
    )
    nelbo_factor: float | None = Field(
        1.5, gt=1, description="NELBO above this x its lowest reported value is unstable (null: off)."
    )
    baseline_steps: int = Field(5, ge=1, description="Reports up to this step form the gradient-norm baseline.")
    patience: int = Field(2, ge=1, description="Consecutive unstable reports that stop the trial.")
    n_warmup_steps: int = Field(0, ge=0, description="Training steps before it may stop a trial.")

    @model_validator(mode="after")
    def _one_rule(self) -> InstabilityPrunerConfig:
        if self.grad_factor is None and self.nelbo_factor is None:
            raise ValueError("set grad_factor, nelbo_factor or both: with neither the pruner never stops a trial")
        return self


PrunerConfig = Annotated[
    NoPrunerConfig
    | MedianPrunerConfig
    | SuccessiveHalvingPrunerConfig
    | HyperbandPrunerConfig
    | ThresholdPrunerConfig
    | InstabilityPrunerConfig,
    Field(discriminator="type"),
]


class RayResources(Strict):
    cpu: float = Field(1.0, ge=0)
    gpu: float = Field(0.0, ge=0, description="May be fractional (0.5: two trials share a GPU).")

    @field_validator("gpu")
    @classmethod
    def _whole_above_one(cls, gpu: float) -> float:
        if gpu > 1 and gpu != int(gpu):
            raise ValueError(f"Ray accepts fractional GPUs only below 1, got {gpu}")
        return gpu


class AshaConfig(Strict):
    type: Literal["asha"]
    grace_period: int = Field(
        2, ge=1, description="Reports a trial makes before it may be stopped (the first report is at step 1)."
    )
    reduction_factor: int = Field(3, ge=2)


class NoSchedulerConfig(Strict):
    type: Literal["none"]


class Constraints(Strict):
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Prune (status over_memory, nothing trained) every trial whose training step is predicted to "
        "need more than this many GiB of GPU memory at its batch and precision.",
    )


class RayConfig(Strict):
    """Settings of the Ray Tune backend; validated with the file, used only when that backend runs."""

    address: str = Field("local", min_length=1, description="local | auto | host:port")
    max_concurrent: int = Field(2, ge=1)
    resources_per_trial: RayResources = RayResources()
    workers_per_trial: int = Field(1, ge=1, description="Data-parallel workers inside one trial.")
    max_failures: int = Field(1, ge=-1, description="-1 retries forever.")
    reuse_actors: bool = True
    scheduler: Annotated[AshaConfig | NoSchedulerConfig, Field(discriminator="type")] = AshaConfig(type="asha")
