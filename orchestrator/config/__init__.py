"""Typed job configuration: YAML in, dotted overrides, validation with one-line errors.

Every job has one `JobConfig` (job.py), made of sections (sections.py) and an optional sweep (sweep.py).
Defaults live there and nowhere else. Worker functions receive `cfg.model_dump()` (Ray's boundary is a
dict) and rebuild the typed object with `JobConfig.model_validate(d)` in their first line. Callers import
from here; the modules below import each other directly.
"""

from orchestrator.config.job import JobConfig, with_values
from orchestrator.config.load import absolute_paths, check_paths, load_config, validate_config
from orchestrator.config.overrides import apply_override, parse_override
from orchestrator.config.sections import (
    AUTO_TEACHER_GPU_FRACTION,
    DatasetConfig,
    KDConfig,
    ModelSpec,
    OptimConfig,
    SoftTargetConfig,
    StudentConfig,
    TeacherConfig,
    TrackingConfig,
    TrainConfig,
    TransferConfig,
    ViewsConfig,
    spec_of,
)
from orchestrator.config.sweep import SearchDim, SearchSpace, SweepConfig
from orchestrator.errors import ConfigError, RayStartError

__all__ = [
    "AUTO_TEACHER_GPU_FRACTION", "ConfigError", "DatasetConfig", "JobConfig", "KDConfig", "ModelSpec", "OptimConfig",
    "RayStartError", "SearchDim", "SearchSpace", "SoftTargetConfig", "StudentConfig", "SweepConfig", "TeacherConfig",
    "TrackingConfig", "TrainConfig", "TransferConfig", "ViewsConfig", "absolute_paths", "apply_override", "check_paths",
    "load_config", "parse_override", "spec_of", "validate_config", "with_values",
]
