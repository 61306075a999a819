"""kd-orchestrator: knowledge distillation on Ray (Data, Train, Tune) with MLflow tracking.

The public API, for driver scripts and notebooks (imported on first use, so `import orchestrator` stays
light; the CLI is `distill`, see README):

    from orchestrator import load_config, run_job, run_sweep
    rows = run_job(load_config("configs/mnist_kd.yaml", ["train.epochs=3"]))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "load_config": "orchestrator.config",  # YAML + dotted overrides -> a validated JobConfig
    "JobConfig": "orchestrator.config",
    "ConfigError": "orchestrator.config",
    "run_job": "orchestrator.flows.pipeline",  # teacher -> soft targets -> students and twins -> summary rows
    "run_teacher_job": "orchestrator.flows.pipeline",
    "run_soft_targets_job": "orchestrator.flows.pipeline",
    "run_sweep": "orchestrator.flows.sweep",  # Ray Tune over T, alpha, lr, students and teacher-assistant chains
    "run_report": "orchestrator.compress.compress_report",  # quantize, measure and export a finished run's models
    "TERMS": "orchestrator.losses.terms",  # the loss terms a config names, each its own parameter model
    "SHORTHANDS": "orchestrator.losses.terms",  # loss: kd | dkd | kd_ls | dkd_ls | ce, built from terms
    "ViewPolicy": "orchestrator.data.views",
    "mcnemar": "orchestrator.flows.paired",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
