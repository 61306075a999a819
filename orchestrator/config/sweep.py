"""`sweep:` in a job's config: the Ray Tune search space (T, alpha, lr, students, teacher-assistant
chains, and any dotted path under kd., train., students., transfer.labels), the search and the scheduler."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.config.sections import ModelSpec, StrictModel


class SearchDim(StrictModel):
    """One dimension of a search space: exactly one of choice, grid, uniform, loguniform."""

    choice: list[Any] | None = Field(None, description="sample one of these values")
    grid: list[Any] | None = Field(None, description="every one of these values (search: random only)")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], uniform")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], uniform in log space")

    @model_validator(mode="after")
    def _exactly_one(self) -> "SearchDim":
        given = [k for k in ("choice", "grid", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of choice, grid, uniform, loguniform")
        values = getattr(self, given[0])
        if given[0] in ("choice", "grid") and not values:
            raise ValueError(f"{given[0]} is empty")
        if given[0] in ("uniform", "loguniform") and not values[0] < values[1]:
            raise ValueError(f"{given[0]} needs low < high, got {list(values)}")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    def values(self) -> list[Any] | None:
        return self.choice if self.choice is not None else self.grid


class SearchSpace(StrictModel):
    """What a sweep varies. Unset dimensions keep the job's value."""

    temperature: SearchDim | None = Field(None, description="kd.temperature")
    alpha: SearchDim | None = Field(None, description="kd.alpha")
    lr: SearchDim | None = Field(None, description="train.lr")
    student: SearchDim | None = Field(None, description="names from `students`")
    chain: SearchDim | None = Field(None, description="lists of assistant model specs between teacher and student; [] = direct KD")
    paths: dict[str, SearchDim] = Field(default_factory=dict, description=(
        "any other field of the students' training by its dotted path, under kd., train., students.N. or transfer.labels "
        "(e.g. `train.weight_decay: {loguniform: [1.0e-5, 1.0e-3]}`, `students.0.hidden: {grid: [[16], [32]]}`); "
        "teachers, data, views and soft targets are shared by every trial, so they cannot be swept"))

    def named(self) -> dict[str, SearchDim]:
        """The set dimensions by their Tune parameter names: the short ones (temperature, ...) and the dotted paths."""
        dims = {name: dim for name, dim in self if name != "paths" and dim is not None}
        return dims | dict(self.paths)


# Where a swept path may point: what one trial's student training reads. The rest (teachers, dataset, views,
# soft targets, tracking, the sweep itself) is prepared once for all trials.
SWEEPABLE_PREFIXES = ("kd.", "train.", "students.", "transfer.labels")
# Swept paths that duplicate a short dimension: one spelling only.
SHORT_PATHS = {"kd.temperature": "temperature", "kd.alpha": "alpha", "train.lr": "lr"}


# What a sampled value must satisfy: the same ranges KDConfig and TrainConfig enforce on fixed values.
_SAMPLED_RANGES = {
    "temperature": (lambda v: 0 < v < math.inf, "finite and > 0"),
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lr": (lambda v: 0 < v < math.inf, "finite and > 0"),
}


def _check_sampled_range(name: str, dim: SearchDim) -> None:
    ok, wanted = _SAMPLED_RANGES[name]
    bounds = dim.values() or list(dim.uniform or dim.loguniform or ())
    bad = [v for v in bounds if not ok(v)]  # NaN fails every comparison, so it lands here too
    if bad:
        raise ValueError(f"space.{name}: values must be {wanted}, got {bad[0]!r}")


class SweepConfig(StrictModel):
    num_samples: int = Field(4, ge=1, description="samples of the space (per grid point)")
    metric: str = Field("val_accuracy", description="the final stage's metric Tune compares, reported every epoch")
    mode: Literal["max", "min"] = Field("max", description="`max` or `min` of the metric")
    search: Literal["random", "optuna"] = Field("random", description="`random` (Tune's variant generator) or `optuna` (TPE)")
    scheduler: Literal["fifo", "asha"] = Field("fifo", description="`fifo` (every trial runs all its epochs) or `asha` (early stopping)")
    grace_period: int | None = Field(None, ge=1, description="asha: epochs before a trial can be stopped (default: half of train.epochs)")
    seeds: int = Field(1, ge=1, description="run every sampled point under this many seeds (search: random)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: what fits beside the teacher actors (workers x CPUs and GPUs)")
    register_as: str | None = Field(None, description="registered model name of the best student (default: `<name>-student`)")
    space: SearchSpace = Field(default_factory=SearchSpace, description="what the sweep varies")

    @model_validator(mode="after")
    def _space_usable(self) -> "SweepConfig":
        dims = self.space.named()
        if not dims:
            raise ValueError("space: empty search space (set at least one of temperature, alpha, lr, student, chain, paths)")
        for name in ("temperature", "alpha", "lr"):
            dim = dims.get(name)
            for value in (dim.values() or []) if dim else []:
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f"space.{name}: values must be numbers, got {value!r}")
            if dim is not None:
                _check_sampled_range(name, dim)
        if self.search == "optuna" and any(d.grid is not None for d in dims.values()):
            raise ValueError("space: grid dimensions need search=random (Optuna samples, it does not enumerate)")
        if self.search == "optuna" and self.seeds > 1:
            raise ValueError("seeds: repeating points over seeds needs search=random (Optuna samples, it does not enumerate)")
        return self

    def chains(self) -> list[list[ModelSpec]]:
        dim = self.space.chain
        if dim is None:
            return [[]]
        return [[ModelSpec.model_validate(spec) for spec in chain] for chain in dim.values() or []]
