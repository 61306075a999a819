"""JobConfig: the whole job, its cross-section checks, and `with_values` (dotted-path values set on a copy)."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from orchestrator.config.overrides import apply_override, field_exists, format_error
from orchestrator.config.sections import (
    DatasetConfig,
    KDConfig,
    ModelSpec,
    SoftTargetConfig,
    StrictModel,
    StudentConfig,
    TeacherConfig,
    TrackingConfig,
    TrainConfig,
    TransferConfig,
    ViewsConfig,
)
from orchestrator.config.sweep import SHORT_PATHS, SWEEPABLE_PREFIXES, SearchDim, SweepConfig
from orchestrator.errors import ConfigError
from orchestrator.losses.terms import SHORTHANDS, check_students

_JOB_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class JobConfig(StrictModel):
    name: str = Field("distill", description="job name (default: the config file's stem); the MLflow experiment unless tracking.experiment")
    seed: int = Field(0, ge=0, description="seeds the split, initialisation, shuffling and each epoch's views: the same config, seed and worker count repeat the same test errors")  # numpy's generators refuse negative seeds
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="where the examples come from")
    teachers: list[TeacherConfig] = Field(default_factory=lambda: [TeacherConfig()], description="one teacher, or several (a weighted ensemble)")
    students: list[StudentConfig] = Field(default_factory=lambda: [StudentConfig()], description="trained together, every batch read once")
    baseline: bool = Field(True, description="also train each student on labels alone (its twin), on the same views and batches")
    chain: list[ModelSpec] = Field(default_factory=list, description=(
        "teacher-assistant chain (Mirzadeh et al. 2020): model specs distilled in turn between the teachers and the students, "
        "each teaching the next through its own cached soft targets; [] = the students learn from the teachers directly"))
    kd: KDConfig = Field(default_factory=KDConfig, description="temperature and alpha of the `kd`-family losses")
    views: ViewsConfig = Field(default_factory=ViewsConfig, description="the augmented views students and twins train on; soft targets are cached per view")
    transfer: TransferConfig = Field(default_factory=TransferConfig, description="what the students learn from (Hinton et al.'s transfer set)")
    soft_targets: SoftTargetConfig = Field(default_factory=SoftTargetConfig, description="the teacher actors and the soft-target cache")
    train: TrainConfig = Field(default_factory=TrainConfig, description="how students are trained (all students of a job share it)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow")
    sweep: SweepConfig | None = Field(None, description="turns the job into a Ray Tune sweep (docs/sweeps.md)")
    teacher_mode: Literal["cached", "online"] = Field("cached", description="`cached`: students read the soft-target cache; `online`: teachers also run in the train workers on each view (feature terms need it)")

    @field_validator("name")
    @classmethod
    def _name_is_a_plain_word(cls, name: str) -> str:
        # The name becomes a Ray Train run directory and an MLflow experiment: no path
        # separators, no leading dot (a hidden or parent directory), nothing empty.
        if not _JOB_NAME.fullmatch(name):
            raise ValueError(f"must be letters, digits, '.', '_' or '-' and not start with '.', got {name!r}")
        return name

    @model_validator(mode="after")
    def _names_unique(self) -> "JobConfig":
        if not self.teachers:
            raise ValueError("teachers: at least one teacher is needed")
        if not self.students:
            raise ValueError("students: at least one student is needed")
        for group, items in (("teachers", self.teachers), ("students", self.students)):
            names = [item.name for item in items]
            if len(names) != len(set(names)):
                raise ValueError(f"{group}: names must be unique, got {names}")
        for i, student in enumerate(self.students):
            if isinstance(student.loss, str) and student.loss not in SHORTHANDS:
                raise ValueError(f"students.{i}.loss: unknown loss {student.loss!r} (known: {', '.join(sorted(SHORTHANDS))})")
        check_students(self)
        if self.soft_targets.worker_reads == "cache" and not self.train.cache_shard_in_memory:
            raise ValueError("soft_targets.worker_reads: cache needs train.cache_shard_in_memory true (a worker reads the soft targets "
                             "of the rows it holds, so it must hold them all first)")
        if self.chain and self.sweep is not None:
            raise ValueError("chain: a sweep varies its chains with sweep.space.chain")
        if self.chain and self.teacher_mode == "online":
            raise ValueError("chain: the online teacher runs the teachers themselves in the workers; a chain needs teacher_mode cached")
        if self.sweep is not None:
            self._check_sweep(self.sweep)
        if not self.dataset.train_labels:
            self._check_unlabelled_training_rows()
        return self

    def _check_unlabelled_training_rows(self) -> None:
        """dataset.train_labels false: nothing may read a training label (they are UNLABELLED, -1), and nothing of
        the job may train on labels: the teachers come given, the students learn from them alone."""
        needs = "the training rows have no labels (dataset.train_labels false)"
        if self.transfer.labels:
            raise ValueError(f"transfer.labels: must be false: {needs}, so the students learn from the teacher alone")
        if self.baseline:
            raise ValueError(f"baseline: must be false: {needs}; a label-only twin has nothing to learn from")
        if self.dataset.val_fraction:
            raise ValueError(f"dataset.val_fraction: must be 0: {needs}, so none can be held out to validate on")
        for i, teacher in enumerate(self.teachers):
            if not (teacher.checkpoint or teacher.mlflow_model):
                raise ValueError(f"teachers.{i}: needs a checkpoint or mlflow_model: {needs} to train it on")
        for field, value in (("chain", self.chain), ("transfer.exclude_classes", self.transfer.exclude_classes), ("sweep", self.sweep)):
            if value:
                raise ValueError(f"{field}: not with unlabelled training rows ({needs})")

    def _check_sweep(self, sweep: SweepConfig) -> None:
        names = [s.name for s in self.students]
        for path, dim in sweep.space.paths.items():
            self._check_swept_path(path, dim)
        if sweep.space.student is not None:
            unknown = [v for v in sweep.space.student.values() or [] if v not in names]
            if unknown:
                raise ValueError(f"sweep.space.student: {unknown} are not names in students ({names})")
        if sweep.space.chain is not None:
            for i, chain in enumerate(sweep.space.chain.values() or []):
                if not isinstance(chain, list):
                    raise ValueError(f"sweep.space.chain.{i}: a chain is a list of model specs ([] = direct KD)")
                for j, spec in enumerate(chain):
                    try:
                        ModelSpec.model_validate(spec)
                    except ValidationError as err:
                        raise ValueError(f"sweep.space.chain.{i}.{j}: {format_error(err)}") from None

    def _check_swept_path(self, path: str, dim: SearchDim) -> None:
        """A swept path must name a field of the students' training, and every value it can take must be valid there."""
        where = f"sweep.space.paths.{path}"
        if path in SHORT_PATHS:
            raise ValueError(f"{where}: sweep it as sweep.space.{SHORT_PATHS[path]}")
        if not path.startswith(SWEEPABLE_PREFIXES):
            raise ValueError(f"{where}: only paths under {', '.join(SWEEPABLE_PREFIXES)} can be swept (the rest is shared by every trial)")
        if dim.values() is not None:
            samples = dim.values()
        else:  # the bounds, and a point between them: a float range on an integer field fails here, not in a trial
            low, high = dim.uniform or dim.loguniform
            samples = [low, high, math.sqrt(low * high) if dim.loguniform else (low + high) / 2]
        if not field_exists(self.model_dump(mode="json"), path.split(".")):
            raise ValueError(f"{where}: no such field")
        for value in samples:
            try:
                with_values(self, {path: value}, exclude={"sweep"})  # the sweep left out: it would check itself again
            except ConfigError as err:
                raise ValueError(f"{where}: {err}") from None
            except ValidationError as err:
                raise ValueError(f"{where}: {value!r}: {format_error(err)}") from None


def with_values(cfg: JobConfig, values: dict[str, Any], *, exclude: set[str] | None = None) -> JobConfig:
    """A copy of `cfg` with these dotted-path values set (as `a.b=value` overrides are), validated anew."""
    tree = cfg.model_dump(mode="json", exclude=exclude)
    for path, value in values.items():
        apply_override(tree, path.split("."), value)
    return JobConfig.model_validate(tree)
