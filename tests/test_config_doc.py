"""docs/configuration.md is generated from the schema; `distill config` prints what a job would run with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from orchestrator.config import JobConfig, load_config
from orchestrator.config_doc import DOC, reference_markdown

REPO_ROOT = Path(__file__).resolve().parents[1]


def _models(model, seen=None):
    from orchestrator.config_doc import _models_of

    seen = seen if seen is not None else []
    if model not in seen:
        seen.append(model)
        for field in model.model_fields.values():
            for sub in _models_of(field.annotation)[0]:
                _models(sub, seen)
    return seen


def test_every_field_is_described():
    models = _models(JobConfig)
    missing = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items() if not f.description]
    assert not missing, f"fields without a description: {missing}"
    assert {"KD", "DKD", "FitNet", "DML"} <= {m.__name__ for m in models}  # every member of the loss-term union is walked


def test_configuration_doc_is_generated_from_the_schema():
    assert DOC.read_text() == reference_markdown(), "stale: run python -m orchestrator.config_doc"
    assert "| `views.max_shift` |" in DOC.read_text() and "| `students[].loss[]` |" in DOC.read_text()
    assert "## students[].loss[] (name: dkd)" in DOC.read_text() and "| `students[].loss[].warmup_epochs` |" in DOC.read_text()


def test_distill_config_prints_the_resolved_yaml():
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "config", str(REPO_ROOT / "configs/mnist_kd.yaml"), "kd.alpha=0.3"],
                         capture_output=True, text=True, check=True, cwd=REPO_ROOT).stdout
    tree = yaml.safe_load(out)
    assert tree["kd"]["alpha"] == 0.3 and tree["students"][0]["hidden"] == [800, 800]
    assert JobConfig.model_validate(tree) == load_config(REPO_ROOT / "configs/mnist_kd.yaml", ["kd.alpha=0.3"])
